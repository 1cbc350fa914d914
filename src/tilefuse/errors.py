"""Errors that mean "the input is wrong", as opposed to a bug in tilefuse.

The CLI turns an :class:`InputError` (and :class:`FileNotFoundError`, :class:`FileExistsError`)
into one line on stderr and exit status 2. Messages name the file, the line or the value, and
say what was expected.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """A user's input (file, layout, option) is malformed or inconsistent."""
