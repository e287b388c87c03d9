"""What every command module shares. cli.py imports the command modules; they import this, never cli.py."""
from __future__ import annotations


class CommandError(Exception):
    """A refusal: printed as one line, exit code 1."""
