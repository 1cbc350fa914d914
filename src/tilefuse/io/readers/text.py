"""Reading layout files as text, refusing binaries with a clear message."""

from __future__ import annotations

import os

import numpy as np

from tilefuse.errors import InputError

__all__ = ["finite_number", "read_text_lines"]

_MAX_LAYOUT_BYTES = 64 * 2**20


def read_text_lines(path: str) -> list[tuple[int, str]]:
    """Lines of a text layout file, numbered from 1; tolerates a UTF-8 BOM and CRLF endings.

    Raises
    ------
    FileNotFoundError
        No such file.
    InputError
        The file is binary, not UTF-8, or implausibly large for a layout.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"layout file not found: {path}")
    if os.path.getsize(path) > _MAX_LAYOUT_BYTES:
        raise InputError(f"{path}: {os.path.getsize(path)} bytes is too large for a layout file")
    with open(path, "rb") as fh:
        raw = fh.read()
    if b"\x00" in raw[:8192]:
        raise InputError(f"{path}: is a binary file, not a text layout (TileConfiguration or CSV)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return list(enumerate(text.splitlines(), start=1))


def finite_number(text: str, where: str, what: str) -> float:
    """``text`` as a finite float, or an InputError naming ``where`` and ``what`` it is.

    Parameters
    ----------
    where : str
        ``file:line`` (or the element) the value comes from.
    what : str
        What the value is, e.g. ``"column 'x'"``.
    """
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {what} must be a number, got {text!r}") from None
    if not np.isfinite(value):
        raise InputError(f"{where}: {what} is not finite: {text}")
    return value
