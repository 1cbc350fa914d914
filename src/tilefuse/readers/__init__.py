"""Readers: each turns a path into a :class:`~tilefuse.layout.Layout`."""

from __future__ import annotations

import os
from pathlib import Path

from tilefuse.errors import InputError
from tilefuse.layout import Layout
from tilefuse.readers.csv import read_csv_layout, write_csv_layout
from tilefuse.readers.memory import layout_from_arrays
from tilefuse.readers.tileconfig import read_tileconfig, write_tileconfig

__all__ = [
    "layout_from_arrays",
    "read_csv_layout",
    "read_layout",
    "read_tileconfig",
    "write_csv_layout",
    "write_tileconfig",
]


def read_layout(path: str | os.PathLike) -> Layout:
    """Read a layout file: a ``.csv`` with a header, or a Fiji ``TileConfiguration``.

    Parameters
    ----------
    path : str or path-like
        The layout file. Tile paths in it are resolved against its folder.

    Raises
    ------
    FileNotFoundError
        The layout or one of its tiles does not exist.
    InputError
        The layout is malformed or its tiles are inconsistent; the message names file and line.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(
            f"{path}: is a folder; give a TileConfiguration.txt or a CSV layout file"
        )
    if not path.exists():
        raise FileNotFoundError(f"layout file not found: {path}")
    if path.suffix.lower() == ".csv":
        return read_csv_layout(path)
    return read_tileconfig(path)
