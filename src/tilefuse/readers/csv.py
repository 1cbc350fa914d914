"""CSV layouts with a header row.

Columns (names are case-insensitive):

- ``file`` (required): tile path, relative to the CSV's folder;
- ``x, y[, z]``: pixel position of the tile's top-left corner; or
- ``affine``: 6 numbers (2D) or 12 numbers (3D), row-major, mapping tile pixel ``(x, y[, z], 1)``
  to mosaic pixel ``(x, y[, z])``, for rotated, scaled or sheared tiles; separated by spaces or
  semicolons (or commas inside a quoted cell);
- ``series`` (optional): series index in a multi-series file;
- ``t`` (optional): the time point of the row. A CSV with a ``t`` column reads as a
  :class:`~tilefuse.timeseries.TimeSeries`, time points in numeric order (else first appearance);
  its positions are *shared* when every time point lists its tiles at the same affines in the
  same order, otherwise each time point keeps its own.

A file name may hold ``{z}``: the tile is the z-stack of the files with a number in its place
(one file per plane, stacked in plane order), as tilefuse writes layouts of ``{z}`` patterns.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np

from tilefuse.errors import InputError
from tilefuse.layout import Layout, translation_affine
from tilefuse.readers.build import Entry, layout_from_entries
from tilefuse.readers.text import finite_number, read_text_lines
from tilefuse.tileio import resolve
from tilefuse.timeseries import TimeSeries

__all__ = ["read_csv_layout", "write_csv_layout", "xy_affine_to_zyx"]


def xy_affine_to_zyx(values: list[float], where: str) -> np.ndarray:
    """Turn a row-major ``x, y(, z)`` affine (6 or 12 numbers) into a homogeneous zyx affine."""
    if len(values) == 6:
        ndim = 2
    elif len(values) == 12:
        ndim = 3
    else:
        raise InputError(f"{where}: affine needs 6 (2D) or 12 (3D) numbers, got {len(values)}")
    xy = np.eye(ndim + 1)
    xy[:ndim] = np.asarray(values, dtype=np.float64).reshape(ndim, ndim + 1)
    if not np.all(np.isfinite(xy)):
        raise InputError(f"{where}: affine is not finite: {values}")
    flip = np.eye(ndim + 1)[[*range(ndim - 1, -1, -1), ndim]]  # reverses the spatial axes
    return flip @ xy @ flip


def _number(row: dict, col: str, where: str) -> float:
    return finite_number((row.get(col) or "").strip(), where, f"column {col!r}")


def _row_entry(row: dict, cols: set, base: Path, where: str) -> tuple[int, Entry]:
    name = (row.get("file") or "").strip()
    if not name:
        raise InputError(f"{where}: empty 'file' value")
    series_text = (row.get("series") or "0").strip() or "0"
    if not series_text.isdigit():
        raise InputError(f"{where}: 'series' must be a non-negative integer, got {series_text!r}")
    if "affine" in cols and (row.get("affine") or "").strip():
        parts = [p for p in re.split(r"[\s;,]+", row["affine"].strip()) if p]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise InputError(f"{where}: 'affine' must be numbers, got {row['affine']!r}") from None
        affine = xy_affine_to_zyx(values, where)
    else:
        axes = ["x", "y", "z"] if "z" in cols else ["x", "y"]
        affine = translation_affine([_number(row, c, where) for c in axes][::-1])
    ndim = affine.shape[0] - 1
    return ndim, Entry(name, (resolve(name, base),), affine, int(series_text), where)


def read_csv_layout(path: str | os.PathLike) -> Layout | TimeSeries:
    """Read a CSV layout (see module docstring) into a :class:`Layout`.

    Returns
    -------
    Layout or TimeSeries
        A TimeSeries when the CSV has a ``t`` column.

    Raises
    ------
    InputError
        Missing columns, a malformed value (``file:line``), inconsistent tiles or time points.
    """
    path = str(path)
    lines = read_text_lines(path)
    rows = csv.DictReader([text for _, text in lines])
    if rows.fieldnames is None:
        raise InputError(f"{path}: empty CSV; expected a header like 'file,x,y'")
    header = [h.strip().lower() for h in rows.fieldnames]
    rows.fieldnames = header
    cols = set(header)
    if "file" not in cols or not ({"x", "y"} <= cols or "affine" in cols):
        raise InputError(
            f"{path}:1: header {','.join(header)!r} needs 'file' and 'x,y[,z]' or 'affine'"
        )
    line_numbers = [n for n, text in lines if text.strip()][1:]
    entries, ndims, times = [], set(), []
    base = Path(path).parent
    for lineno, row in zip(line_numbers, rows):
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue
        ndim, entry = _row_entry(row, cols, base, f"{path}:{lineno}")
        ndims.add(ndim)
        entries.append(entry)
        times.append(_time_value(row, cols, f"{path}:{lineno}"))
    if len(ndims) > 1:
        raise InputError(f"{path}: rows mix 2D and 3D positions/affines")
    ndim = ndims.pop() if ndims else 2
    if "t" not in cols:
        return layout_from_entries(entries, ndim=ndim, origin=path)
    return _time_series(path, entries, times, ndim)


def _time_value(row: dict, cols: set, where: str) -> str | None:
    if "t" not in cols:
        return None
    value = (row.get("t") or "").strip()
    if not value:
        raise InputError(f"{where}: empty 't' value; give every row its time point (0, 1, ...)")
    return value


def _time_series(path: str, entries: list[Entry], times: list[str], ndim: int) -> TimeSeries:
    """One layout per ``t`` value; positions shared when every time point places its tiles
    identically."""
    names = list(dict.fromkeys(times))
    if all(n.lstrip("-").isdigit() for n in names):
        names.sort(key=int)
    layouts = tuple(
        layout_from_entries([e for e, t in zip(entries, times) if t == name], ndim=ndim,
                            origin=path)
        for name in names
    )
    first = layouts[0].affines
    shared = all(len(lt.tiles) == len(first) and np.array_equal(lt.affines, first)
                 for lt in layouts)
    return TimeSeries(layouts, tuple(names), shared=shared)


def write_csv_layout(layout: Layout | TimeSeries, path: str | os.PathLike) -> Path:
    """Write a CSV layout with an ``affine`` column: an exact round trip of every tile's affine.

    Tile paths are written relative to the CSV's folder. A TimeSeries is written with a ``t``
    column (each time point's name), which :func:`read_csv_layout` reads back as the same series.
    """
    path = Path(path)
    folder = path.parent.resolve()
    series = layout if isinstance(layout, TimeSeries) else None
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        if series is None:
            writer.writerow(["file", "series", "affine"])
            writer.writerows(_rows(layout, folder))
            return path
        writer.writerow(["t", "file", "series", "affine"])
        for name, one in zip(series.names, series.layouts):
            writer.writerows([name, *row] for row in _rows(one, folder))
    return path


def _rows(layout: Layout, folder: Path) -> list[list]:
    """(file, series, affine) per tile, the affine as 6 or 12 row-major x, y(, z) numbers."""
    flip = np.eye(layout.ndim + 1)[[*range(layout.ndim - 1, -1, -1), layout.ndim]]
    rows = []
    for tile in layout.tiles:
        paths = getattr(tile.source, "paths", None)
        name = os.path.relpath(paths[0], folder) if paths else tile.name
        xy = (flip @ tile.affine @ flip)[:-1].ravel()
        rows.append([name, getattr(tile.source, "series", 0),
                     " ".join(repr(float(v)) for v in xy)])
    return rows
