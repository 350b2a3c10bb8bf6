"""`python -m corral.cli` runs the CLI (through the command server when one is up)."""

from corral.cli.launcher import main

main()
