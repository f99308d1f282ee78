"""The ``distill`` command line (typer)."""

from distill.cli.app import app, main

__all__ = ["app", "main"]
