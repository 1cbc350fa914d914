"""Errors that mean "the input is wrong", as opposed to a bug in tilefuse.

The CLI turns an :class:`InputError` (and :class:`FileNotFoundError`, :class:`FileExistsError`)
into one line on stderr and exit status 2. Messages name the file, the line or the value, and
say what was expected.
"""

from __future__ import annotations

__all__ = ["USER_ERRORS", "InputError"]


class InputError(ValueError):
    """A user's input (file, layout, option) is malformed or inconsistent."""


USER_ERRORS: tuple[type[Exception], ...] = (
    InputError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
    IsADirectoryError,
)
"""The errors that mean "the input or the output named is wrong", not a bug: the command line
prints them as one line (exit status 2), the napari widget shows them in its status label."""
