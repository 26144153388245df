"""The command line: ``unguide <command>``; each command parses its flags and calls the library."""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
