"""The ``tilefuse`` command: parsing, checking options, progress; one library call per command."""

from tilefuse.cli.main import main

__all__ = ["main"]
