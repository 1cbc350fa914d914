"""Reading layout files as text, refusing binaries with a clear message."""

from __future__ import annotations

import os

from tilefuse.errors import InputError

__all__ = ["read_text_lines"]

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
