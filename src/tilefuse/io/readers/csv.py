"""CSV layouts with a header row.

Columns (names are case-insensitive):

- ``file`` (required): tile path, relative to the CSV's folder;
- ``x, y[, z]``: pixel position of the tile's top-left corner; or
- ``affine``: 6 numbers (2D) or 12 numbers (3D), row-major, mapping tile pixel ``(x, y[, z], 1)``
  to mosaic pixel ``(x, y[, z])``, for rotated, scaled or sheared tiles; separated by spaces or
  semicolons (or commas inside a quoted cell);
- ``file_2``, ``file_3``, ... (optional): the tile's further files, for tiles stored one file
  per channel; the tile's channels are those of ``file``, then ``file_2``, ... in order;
- ``series`` (optional): series index in a multi-series file (a TIFF series, or the tile of a
  CZI file: its index among the file's tiles in mosaic ``M`` order);
- ``name`` (optional): the tile's name in messages and reports (default: ``file``);
- ``t`` (optional): the time point of the row. A CSV with a ``t`` column reads as a
  :class:`~tilefuse.model.timeseries.TimeSeries`, time points in numeric order (else first
  appearance);
  its positions are *shared* when every time point lists its tiles at the same affines in the
  same order, otherwise each time point keeps its own.

A file name may hold ``{z}``: the tile is the z-stack of the files with a number in its place
(one file per plane, stacked in plane order), as tilefuse writes layouts of ``{z}`` patterns.

Lines starting with ``#`` before the header row are comments; ``# tilefuse.KEY = VALUE`` lines
state the dtype, channel names, pixel size and unit (see :mod:`tilefuse.io.readers.sidecar`).
:func:`write_csv_layout` writes all of the above, so its CSV is the faithful record of a run:
it reads back to the same tiles, every channel's file, names, affines (bit for bit), time
points, channel names, pixel size and unit.
"""

from __future__ import annotations

import csv
import os
import re
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
from tilefuse.io.readers.text import finite_number, read_text_lines
from tilefuse.io.tiles import resolve
from tilefuse.model.layout import Layout, translation_affine
from tilefuse.model.timeseries import TimeSeries

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


_MORE_FILES = re.compile(r"^file_(\d+)$")
_ABOUT = (
    "# tilefuse layout: one row per tile; affine = 6 (2D) or 12 (3D) numbers, row-major, tile "
    "pixel (x, y[, z], 1) -> mosaic pixel; file_2... = the tile's further (channel) files"
)


def _more_file_columns(cols: list[str]) -> list[str]:
    """``file_2``, ``file_3``, ... columns in number order."""
    found = [(int(m.group(1)), c) for c in cols if (m := _MORE_FILES.match(c))]
    return [c for _, c in sorted(found)]


def _row_entry(row: dict, cols: list[str], base: Path, where: str) -> tuple[int, Entry]:
    name = (row.get("file") or "").strip()
    if not name:
        raise InputError(f"{where}: empty 'file' value")
    more = [text for c in _more_file_columns(cols) if (text := (row.get(c) or "").strip())]
    series_text = (row.get("series") or "0").strip() or "0"
    if not series_text.isdecimal():
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
    paths = tuple(resolve(f, base) for f in (name, *more))
    label = (row.get("name") or "").strip() or None
    return ndim, Entry(name, paths, affine, int(series_text), where, label=label)


def _split_header(path: str, lines: list[tuple[int, str]]) -> tuple[Header, list]:
    """``# tilefuse.`` keys of the comment lines before the header row, and the lines after."""
    header: Header = {}
    for i, (lineno, text) in enumerate(lines):
        stripped = text.strip()
        if stripped and not stripped.startswith("#"):
            return header, lines[i:]
        if found := parse_key(stripped, f"{path}:{lineno}"):
            header[found[0]] = (found[1], f"{path}:{lineno}")
    return header, []


def read_csv_layout(path: str | os.PathLike) -> Layout | TimeSeries:
    """Read a CSV layout (see module docstring) into a :class:`Layout`.

    Returns
    -------
    Layout or TimeSeries
        A TimeSeries when the CSV has a ``t`` column.

    Raises
    ------
    InputError
        Missing columns, a malformed value (``file:line``), inconsistent tiles or time points,
        tiles that differ from what the ``# tilefuse.`` lines say they were.
    """
    path = str(path)
    header, lines = _split_header(path, read_text_lines(path))
    rows = csv.DictReader([text for _, text in lines])
    if rows.fieldnames is None:
        raise InputError(f"{path}: empty CSV; expected a header like 'file,x,y'")
    cols = [h.strip().lower() for h in rows.fieldnames]
    rows.fieldnames = cols
    if "file" not in cols or not ({"x", "y"} <= set(cols) or "affine" in cols):
        first = lines[0][0] if lines else 1
        raise InputError(
            f"{path}:{first}: header {','.join(cols)!r} needs 'file' and 'x,y[,z]' or 'affine'"
        )
    line_numbers = [n for n, _ in lines]
    entries: list[Entry] = []
    ndims: set[int] = set()
    times: list[str] = []  # one per entry when the CSV has a 't' column
    base = Path(path).parent
    for row in rows:
        # The file's number of the row's (last) line: csv counts the lines it has read, blank
        # and whitespace-only ones included, so rows never drift from their lines.
        lineno = line_numbers[rows.line_num - 1]
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue
        ndim, entry = _row_entry(row, cols, base, f"{path}:{lineno}")
        ndims.add(ndim)
        entries.append(entry)
        if (t := _time_value(row, cols, f"{path}:{lineno}")) is not None:
            times.append(t)
    if len(ndims) > 1:
        raise InputError(f"{path}: rows mix 2D and 3D positions/affines")
    ndim = ndims.pop() if ndims else 2
    if "t" not in cols:
        return build_layout(entries, ndim=ndim, origin=path, header=header)
    return _time_series(path, entries, times, ndim, header)


def _time_value(row: dict, cols: list[str], where: str) -> str | None:
    if "t" not in cols:
        return None
    value = (row.get("t") or "").strip()
    if not value:
        raise InputError(f"{where}: empty 't' value; give every row its time point (0, 1, ...)")
    return value


def _time_series(path: str, entries: list[Entry], times: list[str], ndim: int,
                 header: Header) -> TimeSeries:
    """One layout per ``t`` value; positions shared when every time point places its tiles
    identically (and the file does not say they are not)."""
    names = list(dict.fromkeys(times))
    if all(n.lstrip("-").isdecimal() for n in names):
        names.sort(key=int)
    layouts = tuple(
        build_layout([e for e, t in zip(entries, times, strict=True) if t == name], ndim=ndim,
                     origin=path, header=header, timepoint=name)
        for name in names
    )
    first = layouts[0].affines
    shared = all(len(lt.tiles) == len(first) and np.array_equal(lt.affines, first)
                 for lt in layouts)
    shared = shared and bool(header.get("shared", (True, ""))[0])
    return TimeSeries(layouts, tuple(names), shared=shared)


def write_csv_layout(layout: Layout | TimeSeries, path: str | os.PathLike) -> Path:
    """Write a CSV layout that reads back to ``layout`` (see the module docstring).

    One row per tile (and time point): ``name``, ``file`` and, for tiles stored one file per
    channel, ``file_2``, ...; ``series``; ``affine`` (exact: ``repr`` of every float). Tile paths
    are relative to the CSV's folder. A TimeSeries gets a ``t`` column (each time point's name).
    ``# tilefuse.`` comment lines before the header record dtype, channel names, pixel size
    (and where it came from), unit, a CZI scene and whether time points share positions.

    Raises
    ------
    InputError
        A tile is not stored in a file (an in-memory layout); nothing is written then.
    """
    path = Path(path)
    folder = path.parent.resolve()
    series = layout if isinstance(layout, TimeSeries) else None
    layouts = layout.layouts if isinstance(layout, TimeSeries) else (layout,)
    per_time = [_rows(one, folder) for one in layouts]  # refuses in-memory tiles first
    n_more = max((len(r[2]) for rows in per_time for r in rows), default=0)
    columns = ["name", "file", *(f"file_{k}" for k in range(2, n_more + 2)), "series", "affine"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        fh.write("\n".join([_ABOUT, *header_lines(layout)]) + "\n")
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["t", *columns] if series is not None else columns)
        for k, rows in enumerate(per_time):
            for name, first, more, number, affine in rows:
                row = [name, first, *more, *[""] * (n_more - len(more)), number, affine]
                writer.writerow([series.names[k], *row] if series is not None else row)
    return path


def _rows(layout: Layout, folder: Path) -> list[tuple]:
    """(name, first file, further files, series, affine) per tile, the affine as 6 or 12
    row-major x, y(, z) numbers."""
    flip = np.eye(layout.ndim + 1)[[*range(layout.ndim - 1, -1, -1), layout.ndim]]
    rows = []
    for tile in layout.tiles:
        files = [relative_name(p, folder) for p in tile_files(tile)]
        xy = (flip @ tile.affine @ flip)[:-1].ravel()
        rows.append((tile.name, files[0], files[1:], series_of(tile),
                     " ".join(repr(float(v)) for v in xy)))
    return rows
