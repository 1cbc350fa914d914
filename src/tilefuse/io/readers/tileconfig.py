"""Fiji / BigStitcher ``TileConfiguration.txt``: read and write.

Format::

    # comments and blank lines anywhere
    dim = 2                      # or 3
    multiseries = true           # optional: the second field is a series index
    tile_01.tif; ; (0.0, 0.0)    # file; series; (x, y[, z]) in pixels, top-left corner

Spacing is lenient (``tile.tif;;(0,0)``). Paths are relative to the layout file's folder. A file
name with ``{z}`` is a z-stack stored one file per plane (as tilefuse writes ``{z}`` patterns).

What tilefuse writes (:func:`write_tileconfig`) stays a file Fiji opens: one line per tile with
its first file (Fiji's format has one file per tile) and the position of its first pixel, written
exactly (``repr`` of each float). What the format cannot hold goes into ``#`` lines, which Fiji
skips and tilefuse reads back:

- ``# tilefuse.KEY = VALUE`` lines: dtype, channel names, pixel size, unit
  (:mod:`tilefuse.io.readers.sidecar`);
- ``# tilefuse.tile = {...}`` right after a tile's line: ``"more_files"`` (the tile's further
  files, one per channel), ``"linear_xyz"`` (the rows of the affine's linear part, x, y[, z],
  for rotated or scaled tiles: the line's position stays the translation) and ``"name"``.

So tilefuse reads its TileConfiguration back to the same tiles, channels, affines, pixel size and
unit, while Fiji sees the first channel of each tile at its position (translation only). For
multi-channel or rotated tiles the CSV layout (:mod:`tilefuse.io.readers.csv`) is the format other
programs read in full; a time series can only be written as a CSV (a ``t`` column).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from tilefuse.errors import InputError
from tilefuse.io.readers.build import Entry
from tilefuse.io.readers.sidecar import (
    Header,
    build_layout,
    header_lines,
    parse_key,
    relative_name,
    series_of,
    tile_files,
)
from tilefuse.io.readers.text import read_text_lines
from tilefuse.io.tiles import resolve
from tilefuse.model.layout import Layout, translation_affine
from tilefuse.model.timeseries import TimeSeries

__all__ = ["parse_tileconfig", "read_tileconfig", "write_tileconfig"]

_DIM = re.compile(r"^dim\s*=\s*(\S+)\s*$", re.IGNORECASE)
_MULTI = re.compile(r"^multiseries\s*=\s*(\S+)\s*$", re.IGNORECASE)
_COORDS = re.compile(r"^\(\s*(.*?)\s*\)$")
_NOT_IN_NAMES = (";", "#", "\n", "\r")


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
    if not text.isdecimal():
        raise InputError(f"{where}: series must be a non-negative integer, got {text!r}")
    if not multiseries and int(text) != 0:
        raise InputError(f"{where}: series {text} given but 'multiseries = true' is not set")
    return int(text)


def _flip(ndim: int) -> np.ndarray:
    """The permutation that reverses ``ndim`` spatial axes (x, y, z <-> z, y, x)."""
    return np.eye(ndim)[::-1]


def _with_tile_extras(entry: Entry, extras: dict, base: Path, where: str) -> Entry:
    """A tile line's entry completed by the ``# tilefuse.tile`` line that follows it."""
    unknown = set(extras) - {"more_files", "linear_xyz", "name"}
    if unknown:
        raise InputError(f"{where}: tilefuse.tile has unknown keys {sorted(unknown)}")
    more = extras.get("more_files", [])
    if not isinstance(more, list) or not all(isinstance(f, str) and f for f in more):
        raise InputError(f"{where}: tilefuse.tile more_files must be a list of file names")
    affine = entry.affine.copy()
    if "linear_xyz" in extras:
        ndim = affine.shape[0] - 1
        try:
            linear = np.array(extras["linear_xyz"], dtype=np.float64)
        except (TypeError, ValueError):
            linear = np.empty(0)
        if linear.shape != (ndim, ndim) or not np.all(np.isfinite(linear)):
            raise InputError(f"{where}: tilefuse.tile linear_xyz must be {ndim} rows of {ndim} "
                             f"numbers (x, y{', z' if ndim == 3 else ''}), got "
                             f"{extras['linear_xyz']!r}")
        affine[:-1, :-1] = _flip(ndim) @ linear @ _flip(ndim)
    name = extras.get("name")
    if name is not None and not isinstance(name, str):
        raise InputError(f"{where}: tilefuse.tile name must be a string")
    paths = (*entry.paths, *(resolve(f, base) for f in more))
    return replace(entry, paths=paths, affine=affine, label=name or entry.label)


def parse_tileconfig(path: str | os.PathLike) -> tuple[int, list[Entry], Header]:
    """Parse a TileConfiguration: its dimensionality, entries and ``# tilefuse.`` keys
    (nothing probed)."""
    path = str(path)
    base = Path(path).parent
    dim, multiseries = None, False
    entries: list[Entry] = []
    header: Header = {}
    for lineno, line in read_text_lines(path):
        where = f"{path}:{lineno}"
        if line.lstrip().startswith("#"):
            if (found := parse_key(line, where)) is None:
                continue
            if found[0] != "tile":
                header[found[0]] = (found[1], where)
            elif not entries:
                raise InputError(f"{where}: tilefuse.tile line before any tile line")
            else:
                assert isinstance(found[1], dict)  # parse_key checked
                entries[-1] = _with_tile_extras(entries[-1], found[1], base, where)
            continue
        text = line.split("#", 1)[0].strip()
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
    return dim, entries, header


def read_tileconfig(path: str | os.PathLike) -> Layout:
    """Read a Fiji/BigStitcher TileConfiguration into a :class:`Layout`.

    Entries naming a ``.czi`` file place that file's tiles (series in mosaic ``M`` order).

    Raises
    ------
    InputError
        A malformed line (``file:line`` and what was expected), an inconsistent tile set, tiles
        that differ from what the ``# tilefuse.`` lines say they were.
    FileNotFoundError
        The layout or a tile file is missing.
    """
    dim, entries, header = parse_tileconfig(path)
    return build_layout(entries, ndim=dim, origin=str(path), header=header)


def _tile_lines(layout: Layout, folder: Path, multiseries: bool) -> list[str]:
    """Each tile's Fiji line, and a ``# tilefuse.tile`` line for what Fiji cannot hold."""
    lines = []
    for tile in layout.tiles:
        files = [relative_name(p, folder) for p in tile_files(tile)]
        bad = next((f for f in files if any(c in f for c in _NOT_IN_NAMES)), None)
        if bad is not None:
            raise InputError(f"tile {tile.name}: file name {bad!r} holds ';', '#' or a line "
                             "break, which a TileConfiguration cannot hold; write a CSV layout")
        series = series_of(tile)
        coords = ", ".join(repr(float(v)) for v in tile.position[::-1])
        lines.append(f"{files[0]}; {series if multiseries else ''}; ({coords})")
        extras: dict[str, object] = {}
        if len(files) > 1:
            extras["more_files"] = files[1:]
        if not tile.is_translation:
            linear = _flip(tile.ndim) @ tile.affine[:-1, :-1] @ _flip(tile.ndim)
            extras["linear_xyz"] = [[float(v) for v in row] for row in linear]
        default_name = files[0] if series == 0 else f"{files[0]}#{series}"
        if tile.name != default_name:
            extras["name"] = tile.name
        if extras:
            lines.append(f"# tilefuse.tile = {json.dumps(extras, ensure_ascii=False)}")
    return lines


def write_tileconfig(layout: Layout, path: str | os.PathLike) -> Path:
    """Write a TileConfiguration that Fiji and BigStitcher open and tilefuse reads back whole.

    Tile paths are relative to the new file's folder; positions are the tiles' first pixels,
    exact. Channel files after the first, rotations/scales and names go into ``# tilefuse.``
    comment lines (see the module docstring), as do dtype, channel names, pixel size and unit.

    Raises
    ------
    InputError
        ``layout`` is a time series (write a CSV layout), a tile is not stored in a file (an
        in-memory layout), or a file name holds ``;`` or ``#``; nothing is written then.
    """
    if isinstance(layout, TimeSeries):
        raise InputError(f"{path}: a time series is saved as a CSV layout with a t column "
                         "(write_csv_layout), not as a TileConfiguration")
    path = Path(path)
    folder = path.parent.resolve()
    multiseries = any(series_of(t) for t in layout.tiles)
    tiles = _tile_lines(layout, folder, multiseries)  # refuses in-memory tiles first
    lines = [
        "# Written by tilefuse: tile positions in pixels (top-left corner, x = column)",
        "# Fiji reads the tile lines (each tile's first file); tilefuse also reads the "
        "'# tilefuse.' lines (all channel files, rotations, pixel size)",
        *header_lines(layout),
        f"dim = {layout.ndim}",
    ]
    if multiseries:
        lines.append("multiseries = true")
    path.write_text("\n".join([*lines, *tiles]) + "\n", encoding="utf-8")
    return path
