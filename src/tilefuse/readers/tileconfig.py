"""Fiji / BigStitcher ``TileConfiguration.txt``: read and write.

Format::

    # comments and blank lines anywhere
    dim = 2                      # or 3
    multiseries = true           # optional: the second field is a series index
    tile_01.tif; ; (0.0, 0.0)    # file; series; (x, y[, z]) in pixels, top-left corner

Spacing is lenient (``tile.tif;;(0,0)``). Paths are relative to the layout file's folder. A file
name with ``{z}`` is a z-stack stored one file per plane (as tilefuse writes ``{z}`` patterns).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from tilefuse.errors import InputError
from tilefuse.layout import Layout, translation_affine
from tilefuse.readers.build import Entry, layout_from_entries
from tilefuse.readers.text import read_text_lines
from tilefuse.tileio import resolve

__all__ = ["read_tileconfig", "write_tileconfig"]

_DIM = re.compile(r"^dim\s*=\s*(\S+)\s*$", re.IGNORECASE)
_MULTI = re.compile(r"^multiseries\s*=\s*(\S+)\s*$", re.IGNORECASE)
_COORDS = re.compile(r"^\(\s*(.*?)\s*\)$")


def _parse_coords(text: str, where: str) -> list[float]:
    m = _COORDS.match(text.strip())
    if not m:
        raise InputError(f"{where}: expected coordinates like (x, y) or (x, y, z), got {text!r}")
    try:
        values = [float(v) for v in m.group(1).split(",")]
    except ValueError:
        raise InputError(f"{where}: coordinates must be numbers, got {text.strip()!r}") from None
    if not all(np.isfinite(values)):
        raise InputError(f"{where}: coordinate is not finite: {text.strip()}")
    return values


def _parse_series(text: str, multiseries: bool, where: str) -> int:
    text = text.strip()
    if not text:
        return 0
    if not text.isdigit():
        raise InputError(f"{where}: series must be a non-negative integer, got {text!r}")
    if not multiseries and int(text) != 0:
        raise InputError(f"{where}: series {text} given but 'multiseries = true' is not set")
    return int(text)


def parse_tileconfig(path: str | os.PathLike) -> tuple[int, list[Entry]]:
    """Parse a TileConfiguration into its dimensionality and entries (nothing probed)."""
    path = str(path)
    base = Path(path).parent
    dim, multiseries, entries = None, False, []
    for lineno, line in read_text_lines(path):
        where = f"{path}:{lineno}"
        text = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if not text:
            continue
        if m := _DIM.match(text):
            if m.group(1) not in ("2", "3"):
                raise InputError(f"{where}: dim must be 2 or 3, got {m.group(1)!r}")
            dim = int(m.group(1))
            continue
        if m := _MULTI.match(text):
            multiseries = m.group(1).lower() == "true"
            continue
        fields = text.split(";")
        if len(fields) != 3:
            raise InputError(
                f"{where}: expected 'file; series; (x, y)' with two ';', got {text!r}"
            )
        name = fields[0].strip()
        if not name:
            raise InputError(f"{where}: missing file name")
        coords = _parse_coords(fields[2], where)
        if dim is None:
            raise InputError(f"{where}: tile line before 'dim = 2' or 'dim = 3'")
        if len(coords) != dim:
            raise InputError(f"{where}: dim = {dim} but {len(coords)} coordinates {fields[2]!r}")
        series = _parse_series(fields[1], multiseries, where)
        affine = translation_affine(coords[::-1])
        entries.append(Entry(name, (resolve(name, base),), affine, series, where))
    if dim is None:
        raise InputError(f"{path}: no 'dim = 2' or 'dim = 3' line; is this a TileConfiguration?")
    if not entries:
        raise InputError(f"{path}: the layout lists no tiles")
    return dim, entries


def read_tileconfig(path: str | os.PathLike) -> Layout:
    """Read a Fiji/BigStitcher TileConfiguration into a :class:`Layout`.

    Raises
    ------
    InputError
        A malformed line (``file:line`` and what was expected), an inconsistent tile set.
    FileNotFoundError
        The layout or a tile file is missing.
    """
    dim, entries = parse_tileconfig(path)
    if any(e.paths[0].lower().endswith(".czi") for e in entries):
        return _czi_series(entries, str(path))
    return layout_from_entries(entries, ndim=dim, origin=str(path))


def _czi_series(entries: list[Entry], origin: str) -> Layout:
    """Entries naming the series (tiles) of one CZI file, placed by the TileConfiguration."""
    from dataclasses import replace

    from tilefuse.readers.czi import read_czi

    files = {e.paths[0] for e in entries}
    if len(files) != 1:
        raise InputError(f"{origin}: lists several files with a CZI among them; a layout may "
                         "place the series of one CZI file")
    base = read_czi(files.pop())
    tiles = []
    for e in entries:
        if e.series >= len(base.tiles):
            raise InputError(f"{e.where}: series {e.series}, but the CZI has "
                             f"{len(base.tiles)} tiles")
        tiles.append(base.tiles[e.series].with_affine(e.affine))
    return replace(base, tiles=tuple(tiles), origin=origin)


def _relative_name(tile_path: str, folder: Path) -> str:
    try:
        return os.path.relpath(tile_path, folder)
    except ValueError:  # another drive on Windows
        return os.path.abspath(tile_path)


def write_tileconfig(layout: Layout, path: str | os.PathLike) -> Path:
    """Write the tiles' translations as a TileConfiguration Fiji and BigStitcher can reuse.

    Tile paths are written relative to the new file's folder. Tiles with a non-translation affine
    are written at the position of their first pixel with a comment saying so.
    """
    path = Path(path)
    folder = path.parent.resolve()
    multiseries = any(getattr(t.source, "series", 0) for t in layout.tiles)
    lines = [
        "# Written by tilefuse: tile positions in pixels (top-left corner, x = column)",
        f"dim = {layout.ndim}",
    ]
    if multiseries:
        lines.append("multiseries = true")
    if not all(t.is_translation for t in layout.tiles):
        lines.append("# some tiles are rotated/scaled: their first pixel's position is written")
    for tile in layout.tiles:
        paths = getattr(tile.source, "paths", None)
        name = _relative_name(paths[0], folder) if paths else tile.name
        series = getattr(tile.source, "series", 0)
        coords = ", ".join(f"{v:.4f}" for v in tile.position[::-1])
        lines.append(f"{name}; {series if multiseries else ''}; ({coords})")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
