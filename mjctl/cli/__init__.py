"""The `mjctl` command line: a thin layer that parses options, calls the core and renders output."""

from mjctl.cli.main import app, main

__all__ = ["app", "main"]
