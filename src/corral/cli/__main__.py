"""`python -m corral.cli` runs the CLI."""

from corral.cli.main import main

main()
