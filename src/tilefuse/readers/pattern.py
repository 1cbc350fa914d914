"""Tiles named by a file name pattern, placed on a regular grid.

A pattern is a path relative to a folder, with fields in braces::

    ImageName_t01_p{index}.tif                       # index in acquisition order + a grid
    r{row}_c{col}.tif                                # grid row and column in the name
    field--X{col}--Y{row}/image--*--C{channel}.tif   # sub-folders, wildcards, one file per channel

Fields: ``{row}``, ``{col}``, ``{index}`` (digits, zero padding allowed) and ``{channel}`` (any
text without ``/``; the shortest that makes the whole name match). A field may repeat (the values
must then agree). ``*`` and ``?`` are wildcards within one folder level, ``**/`` any sub-folders.
``{z}`` and ``{t}`` are recognised but refused: planes must be stacked into one file per tile.

Nominal positions: ``(row, col) * step`` with ``step = round(tile_shape * (1 - overlap))`` pixels
per axis (integer steps, as in :func:`tilefuse.testing.grid_positions`), the tile shape taken from
the first tile's header.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tilefuse.errors import InputError
from tilefuse.layout import Layout, translation_affine
from tilefuse.readers.build import Entry, layout_from_entries
from tilefuse.tileio import probe_tile

__all__ = ["ORDERS", "grid_index_to_rc", "read_pattern"]

ORDERS = ("row-major", "column-major", "snake-rows", "snake-cols")
_FIELDS = ("row", "col", "index", "channel", "z", "t")
_TOKEN = re.compile(r"\{([^{}]*)\}|\*\*/|\*|\?")


@dataclass(frozen=True, slots=True)
class _Match:
    """One file the pattern matched: its path, name relative to the folder, and field values."""

    path: str
    rel: str
    fields: dict


def _compile(pattern: str) -> tuple[re.Pattern, str, set[str]]:
    """Turn a tile pattern into an anchored regex, a glob for :meth:`Path.glob`, and its fields."""
    absolute = pattern.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", pattern)
    if not pattern or absolute or ".." in pattern.split("/"):
        raise InputError(
            f"pattern {pattern!r} must be a file name inside the folder (no leading / or ..)"
        )
    regex, globpat, seen, pos = [], [], set(), 0
    for m in _TOKEN.finditer(pattern):
        literal = pattern[pos : m.start()]
        regex.append(re.escape(literal))
        globpat.append(glob.escape(literal))
        pos = m.end()
        token = m.group(0)
        if m.group(1) is None:  # a wildcard
            regex.append({"**/": "(?:[^/]+/)*", "*": "[^/]*", "?": "[^/]"}[token])
            globpat.append(token)
            continue
        name = m.group(1).strip().lower()
        if name not in _FIELDS:
            raise InputError(
                f"pattern {pattern!r}: unknown field {{{m.group(1)}}}; use "
                + ", ".join(f"{{{f}}}" for f in _FIELDS[:4])
            )
        if name in ("z", "t"):
            raise InputError(
                f"pattern {pattern!r}: {{{name}}} (one file per plane) is not supported yet; "
                "stack planes into one TIFF per tile"
            )
        value = r"[^/]+?" if name == "channel" else r"\d+"
        regex.append(f"(?P={name})" if name in seen else f"(?P<{name}>{value})")
        globpat.append("*")
        seen.add(name)
    regex.append(re.escape(pattern[pos:]))
    globpat.append(glob.escape(pattern[pos:]))
    return re.compile("".join(regex)), "".join(globpat), seen


def _find(folder: Path, pattern: str) -> tuple[list[_Match], set[str]]:
    """Files under ``folder`` matching ``pattern``, sorted by relative name.

    :meth:`Path.glob` never recurses into symlinked folders for ``**`` and otherwise descends only
    as deep as the pattern has folder levels, so symlink loops cannot make it run forever.
    """
    regex, globpat, fields = _compile(pattern)
    found: dict[str, _Match] = {}
    for path in folder.glob(globpat):
        rel = path.relative_to(folder).as_posix()
        m = regex.fullmatch(rel)
        if m is None or rel in found or not path.is_file():
            continue
        found[rel] = _Match(str(path), rel, m.groupdict())
    if not found:
        raise InputError(
            f"no file in {folder} matches the pattern {pattern!r}; check the folder and the "
            "pattern (fields {row} {col} {index} {channel}, wildcards * and **/)"
        )
    return [found[k] for k in sorted(found)], fields


def _parse_grid(grid: str | tuple[int, int] | None) -> tuple[int, int] | None:
    if grid is None:
        return None
    if isinstance(grid, str):
        m = re.fullmatch(r"\s*(\d+)\s*[xX\u00d7]\s*(\d+)\s*", grid)
        if not m:
            raise InputError(f"grid {grid!r} must be ROWSxCOLS, e.g. '5x4'")
        grid = (int(m.group(1)), int(m.group(2)))
    rows, cols = (int(v) for v in grid)
    if rows < 1 or cols < 1:
        raise InputError(f"grid {rows}x{cols} must have at least one row and one column")
    return rows, cols


def grid_index_to_rc(k: int, grid: tuple[int, int], order: str) -> tuple[int, int]:
    """Grid (row, column) of the ``k``-th tile (from 0) of a Fiji Grid/Collection order.

    Parameters
    ----------
    k : int
        Acquisition index counted from 0, ``0 <= k < rows * cols``.
    grid : (int, int)
        Rows and columns.
    order : {"row-major", "column-major", "snake-rows", "snake-cols"}
        ``snake-rows``: row 0 left to right, row 1 right to left, ...; ``snake-cols`` likewise
        down column 0, up column 1, ...
    """
    rows, cols = grid
    if order in ("row-major", "snake-rows"):
        row, col = divmod(k, cols)
        if order == "snake-rows" and row % 2:
            col = cols - 1 - col
        return row, col
    col, row = divmod(k, rows)
    if order == "snake-cols" and col % 2:
        row = rows - 1 - row
    return row, col


def _rc_from_index(
    matches: list[_Match], grid: tuple[int, int] | None, order: str, first_index: int | None,
    pattern: str,
) -> list[tuple[int, int]]:
    if grid is None:
        raise InputError(
            f"pattern {pattern!r} uses {{index}}: give the grid as ROWSxCOLS (grid='5x4', "
            "--grid 5x4) and the order, or name rows and columns with {row} and {col}"
        )
    indices = [int(m.fields["index"]) for m in matches]
    first = min(indices) if first_index is None else int(first_index)
    n = grid[0] * grid[1]
    out = []
    for m, idx in zip(matches, indices):
        if not 0 <= idx - first < n:
            raise InputError(
                f"{m.path}: index {idx} is outside the {grid[0]}x{grid[1]} grid (indices "
                f"{first}..{first + n - 1}); check the grid and the first index"
            )
        out.append(grid_index_to_rc(idx - first, grid, order))
    return out


def _rc_from_names(matches: list[_Match], grid: tuple[int, int] | None) -> list[tuple[int, int]]:
    raw = [(int(m.fields["row"]), int(m.fields["col"])) for m in matches]
    r0, c0 = min(r for r, _ in raw), min(c for _, c in raw)
    out = [(r - r0, c - c0) for r, c in raw]
    for m, (r, c) in zip(matches, out):
        if grid is not None and not (r < grid[0] and c < grid[1]):
            raise InputError(
                f"{m.path}: row {r}, column {c} (counted from the smallest found) is outside "
                f"the {grid[0]}x{grid[1]} grid; check the grid"
            )
    return out


def _grid_rc(
    matches: list[_Match], fields: set[str], grid: tuple[int, int] | None, order: str,
    first_index: int | None, pattern: str,
) -> list[tuple[int, int]]:
    """Grid (row, column) of every match, from {index} + grid or from {row} and {col}."""
    has_rc = {"row", "col"} & fields
    if "index" in fields and has_rc:
        raise InputError(f"pattern {pattern!r}: use either {{index}} or {{row}} and {{col}}")
    if "index" in fields:
        return _rc_from_index(matches, grid, order, first_index, pattern)
    if has_rc != {"row", "col"}:
        raise InputError(
            f"pattern {pattern!r} needs {{row}} and {{col}}, or {{index}} with a grid, "
            "to place the tiles"
        )
    return _rc_from_names(matches, grid)


def _channel_key(value: str) -> tuple:
    return (0, int(value), value) if value.isdigit() else (1, 0, value)


def _group(
    matches: list[_Match], rcs: list[tuple[int, int]], with_channels: bool
) -> tuple[dict[tuple[int, int], dict[str, _Match]], list[str]]:
    """Files per grid position (and per channel), refusing duplicates and missing channels."""
    cells: dict[tuple[int, int], dict[str, _Match]] = {}
    for m, rc in zip(matches, rcs):
        channel = m.fields["channel"] if with_channels else ""
        cell = cells.setdefault(rc, {})
        if channel in cell:
            what = f" channel {channel!r}" if with_channels else ""
            raise InputError(
                f"{m.path}: grid row {rc[0]}, column {rc[1]}{what} is already taken by "
                f"{cell[channel].path}; each grid position needs one file per channel"
            )
        cell[channel] = m
    channels = sorted({c for cell in cells.values() for c in cell}, key=_channel_key)
    for rc, cell in sorted(cells.items()):
        missing = [c for c in channels if c not in cell]
        if missing:
            have = ", ".join(m.path for m in cell.values())
            raise InputError(
                f"grid row {rc[0]}, column {rc[1]} has no file for channel(s) "
                f"{', '.join(map(repr, missing))} (found: {have}); every tile needs every channel"
            )
    return cells, channels


def _steps(first_path: str, overlap: float) -> tuple[tuple[int, ...], tuple[int, int]]:
    """Spatial shape of the first tile and the integer grid step (y, x) in pixels."""
    shape = probe_tile(first_path).shape
    return shape, (round(shape[-2] * (1 - overlap)), round(shape[-1] * (1 - overlap)))


def _check_options(order: str, overlap: float) -> None:
    if order not in ORDERS:
        raise InputError(f"order {order!r} is not one of {', '.join(ORDERS)}")
    if not (np.isfinite(overlap) and 0 <= overlap < 1):
        raise InputError(f"overlap {overlap} must be a fraction in [0, 1), e.g. 0.1 for 10%")


def _entries(
    cells: dict[tuple[int, int], dict[str, _Match]], keys: Iterable[tuple[int, int]],
    channels: list[str], steps: tuple[int, int], ndim: int,
) -> list[Entry]:
    entries = []
    for rc in keys:
        cell = cells[rc]
        files = [cell[c] for c in channels]
        pos = [0.0] * (ndim - 2) + [rc[0] * steps[0], rc[1] * steps[1]]
        where = f"{files[0].path} (grid row {rc[0]}, column {rc[1]})"
        entries.append(Entry(files[0].rel, tuple(f.path for f in files),
                             translation_affine(pos), 0, where))
    return entries


def read_pattern(
    folder: str | os.PathLike,
    pattern: str,
    *,
    grid: str | tuple[int, int] | None = None,
    order: str = "row-major",
    overlap: float = 0.1,
    first_index: int | None = None,
) -> Layout:
    """Read tiles named by a pattern and place them on a regular grid.

    Parameters
    ----------
    folder : str or path-like
        Where the tiles are; ``pattern`` is matched against paths relative to it.
    pattern : str
        File name pattern with ``{row}``/``{col}`` or ``{index}``, optionally ``{channel}``
        (see the module docstring).
    grid : str or (int, int), optional
        ``"ROWSxCOLS"``; required with ``{index}``, checked against ``{row}``/``{col}`` otherwise.
    order : {"row-major", "column-major", "snake-rows", "snake-cols"}
        How ``{index}`` walks the grid (Fiji Grid/Collection orders).
    overlap : float
        Nominal overlap of neighbours as a fraction of the tile size, in [0, 1).
    first_index : int, optional
        Index of the grid's first tile (default: the smallest index found).

    Returns
    -------
    Layout
        One tile per grid position, reading ``(n_channels, *tile_shape)``; with ``{channel}`` one
        file per channel, sorted by channel value, named by the values. ``metadata`` records
        the pattern, grid, order, overlap, step and each tile's grid (row, col).

    Raises
    ------
    InputError
        No file matches, a grid position is taken twice, a channel file is missing, an index is
        outside the grid, ``{index}`` without a grid, ``{z}``/``{t}`` fields, bad options.
    """
    _check_options(order, overlap)
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tile folder not found: {folder}")
    grid_rc = _parse_grid(grid)
    matches, fields = _find(folder, pattern)
    rcs = _grid_rc(matches, fields, grid_rc, order, first_index, pattern)
    cells, channels = _group(matches, rcs, "channel" in fields)
    if "index" in fields:  # acquisition order
        keys = list(dict.fromkeys(rc for _, rc in sorted(
            zip([int(m.fields["index"]) for m in matches], rcs))))
    else:
        keys = sorted(cells)
    first = cells[keys[0]][channels[0]].path
    shape, steps = _steps(first, overlap)
    entries = _entries(cells, keys, channels, steps, len(shape))
    layout = layout_from_entries(
        entries, ndim=len(shape), origin=str(folder),
        channel_names=channels if "channel" in fields else None,
        pixel_size=_ome_pixel_size(first, len(shape)),
    )
    metadata = {
        "reader": "pattern", "pattern": pattern, "grid": grid_rc, "order": order,
        "overlap": float(overlap), "step_px": list(steps),
        "grid_positions": [list(rc) for rc in keys],
    }
    return replace(layout, metadata=metadata)


def _ome_pixel_size(path: str, ndim: int) -> tuple[float, ...] | None:
    """Physical pixel size (zyx, µm) from an OME-TIFF tile, or None when it has none."""
    if not path.lower().endswith((".ome.tif", ".ome.tiff")):
        return None
    from tilefuse.readers.ometiff import ome_pixel_size_um

    return ome_pixel_size_um(path, ndim)
