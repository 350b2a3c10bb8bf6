"""The `corral` command line (typer)."""
