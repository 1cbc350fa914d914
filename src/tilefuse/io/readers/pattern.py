"""Tiles named by a file name pattern, placed on a regular grid.

A pattern is a path relative to a folder, with fields in braces::

    ImageName_t01_p{index}.tif                       # index in acquisition order + a grid
    r{row}_c{col}.tif                                # grid row and column in the name
    field--X{col}--Y{row}/image--*--C{channel}.tif   # sub-folders, wildcards, one file per channel

Fields: ``{row}``, ``{col}``, ``{index}`` (digits, zero padding allowed) and ``{channel}`` (any
text without ``/``; the shortest that makes the whole name match). A field may repeat (the values
must then agree). ``*`` and ``?`` are wildcards within one folder level, ``**/`` any sub-folders.

``{z}`` (digits): one file per z plane; the planes of a tile (same grid position and channel) are
stacked in z order into one 3D tile (:class:`~tilefuse.io.tiles.PlaneStackSource`), and every tile
needs the same number of planes. Their spacing is ``z_step`` lateral pixels (``--z-step``),
else PhysicalSizeZ of OME-TIFF planes, else 1.

``{t}`` (digits): one tile set per time point, all on the same grid (positions shared), returned
as a :class:`~tilefuse.model.timeseries.TimeSeries` in time order; every time point needs every tile
and the same channels.

Nominal positions: ``(row, col) * step`` with ``step = round(tile_shape * (1 - overlap))`` pixels
per axis (integer steps, as in :func:`tilefuse.testing.grid_positions`), the tile shape taken from
the first tile's header.

A grid position without a file stays empty in the mosaic; one WARNING (logger
``tilefuse.io.readers.pattern``) names every such position and the file expected there (the
first ten, then how many more).
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tilefuse.errors import InputError
from tilefuse.io.readers._grid import ORDERS, grid_index_to_rc, parse_grid
from tilefuse.io.readers._pattern_gaps import log_gaps
from tilefuse.io.readers.build import Entry, layout_from_entries
from tilefuse.io.tiles import probe_tile
from tilefuse.model.layout import Layout, PixelSize, translation_affine
from tilefuse.model.timeseries import TimeSeries

__all__ = ["ORDERS", "grid_index_to_rc", "read_pattern"]

log = logging.getLogger(__name__)

_FIELDS = ("row", "col", "index", "channel", "z", "t")
_TOKEN = re.compile(r"\{([^{}]*)\}|\*\*/|\*|\?")
_VENDOR = (".czi", ".nd2", ".lif", ".lsm", ".ims", ".vsi", ".oib", ".oir", ".svs", ".ndpi",
           ".scn", ".dv", ".h5", ".hdf5", ".zarr")


@dataclass(frozen=True, slots=True)
class _Match:
    """One file the pattern matched: its path, name relative to the folder, and field values."""

    path: str
    rel: str
    fields: dict
    z_span: tuple[int, int] | None = None

    def z_template(self) -> str:
        """The name relative to the folder with ``{z}`` in place of the plane number."""
        assert self.z_span is not None  # only matches of a pattern with {z} have a template
        start, end = self.z_span
        return self.rel[:start] + "{z}" + self.rel[end:]


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
                + ", ".join(f"{{{f}}}" for f in _FIELDS)
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
        z_span = m.span("z") if "z" in fields else None
        found[rel] = _Match(str(path), rel, m.groupdict(), z_span)
    if not found:
        raise InputError(
            f"no file in {folder} matches the pattern {pattern!r}; check the folder and the "
            "pattern (fields {row} {col} {index} {channel} {z} {t}, wildcards * and **/)"
        )
    return [found[k] for k in sorted(found)], fields


def _rc_from_index(
    matches: list[_Match], grid: tuple[int, int] | None, order: str, first_index: int | None,
    pattern: str,
) -> list[tuple[int, int]]:
    if grid is None:
        raise InputError(
            f"pattern {pattern!r} uses {{index}}: give the grid as ROWSxCOLS (--grid 5x4) and "
            "the order (--order), or name rows and columns with {row} and {col}"
        )
    indices = [int(m.fields["index"]) for m in matches]
    first = min(indices) if first_index is None else int(first_index)
    n = grid[0] * grid[1]
    out = []
    for m, idx in zip(matches, indices, strict=True):
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
    for m, (r, c) in zip(matches, out, strict=True):
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
    return (0, int(value), value) if value.isdecimal() else (1, 0, value)


Cells = dict[tuple[int, int], dict[tuple[str, int], _Match]]


def _group(
    matches: list[_Match], rcs: list[tuple[int, int]], fields: set[str]
) -> tuple[Cells, list[str]]:
    """Files per grid position, keyed by (channel, plane); refuses duplicates, missing channels."""
    cells: Cells = {}
    for m, rc in zip(matches, rcs, strict=True):
        key = (m.fields.get("channel", ""), int(m.fields.get("z", -1)))
        cell = cells.setdefault(rc, {})
        if key in cell:
            what = (f" channel {key[0]!r}" if "channel" in fields else "") + (
                f" plane z={key[1]}" if "z" in fields else "")
            raise InputError(
                f"{m.path}: grid row {rc[0]}, column {rc[1]}{what} is already taken by "
                f"{cell[key].path}; each grid position needs one file per channel"
                + (" and plane" if "z" in fields else "")
            )
        cell[key] = m
    channels = sorted({c for cell in cells.values() for c, _ in cell}, key=_channel_key)
    for rc, cell in sorted(cells.items()):
        missing = [c for c in channels if c not in {c for c, _ in cell}]
        if missing:
            have = ", ".join(m.path for m in cell.values())
            raise InputError(
                f"grid row {rc[0]}, column {rc[1]} has no file for channel(s) "
                f"{', '.join(map(repr, missing))} (found: {have}); every tile needs every channel"
            )
    return cells, channels


def _by_time(
    matches: list[_Match], rcs: list[tuple[int, int]], with_t: bool
) -> list[tuple[str, list[_Match], list[tuple[int, int]]]]:
    """Matches split by time point, in time order: (name as written, matches, grid positions)."""
    if not with_t:
        return [("", matches, rcs)]
    times: dict[int, tuple[str, list, list]] = {}
    for m, rc in zip(matches, rcs, strict=True):
        _, ms, rs = times.setdefault(int(m.fields["t"]), (m.fields["t"], [], []))
        ms.append(m)
        rs.append(rc)
    return [times[t] for t in sorted(times)]


def _check_times(grouped: list[tuple[str, Cells, list[str]]], keys: list[tuple[int, int]]) -> None:
    """Every time point needs the same channels and a file for every grid position."""
    name0, _, channels0 = grouped[0]
    for name, cells, channels in grouped:
        if channels != channels0:
            raise InputError(
                f"time point {name} has channel(s) {', '.join(map(repr, channels))}, time point "
                f"{name0} has {', '.join(map(repr, channels0))}; every time point needs the same "
                "channels"
            )
        for rc in keys:
            if rc not in cells:
                other_name, other = next((n, c) for n, c, _ in grouped if rc in c)
                example = next(iter(other[rc].values())).path
                raise InputError(
                    f"grid row {rc[0]}, column {rc[1]} has no file at time point {name} (time "
                    f"point {other_name} has {example}); with {{t}} every time point needs "
                    "every tile"
                )


Stack = tuple[tuple[_Match, ...], ...]  # stack[k] = plane k's files, one per channel


def _stack(rc: tuple[int, int], cell: dict, channels: list[str]) -> Stack:
    """A tile's files as planes (z order) of channel files; every channel needs every plane."""
    zs = sorted({z for _, z in cell})
    for c in channels:
        missing = [z for z in zs if (c, z) not in cell]
        if missing:
            raise InputError(
                f"grid row {rc[0]}, column {rc[1]}, channel {c!r} has no file for plane(s) "
                f"z={', '.join(map(str, missing))}; every channel of a tile needs every plane"
            )
    return tuple(tuple(cell[(c, z)] for c in channels) for z in zs)


def _tile_label(stack: Stack, time: str) -> str:
    m = stack[0][0]
    name = m.z_template() if m.z_span else m.rel
    return name + (f" (time point {time})" if time else "")


def _check_planes(stacks: list[tuple[str, list[Stack]]]) -> None:
    """Every tile, at every time point, needs as many planes as the first."""
    first_time, first_stacks = stacks[0]
    n0 = len(first_stacks[0])
    for time, per_tile in stacks:
        for stack in per_tile:
            if len(stack) != n0:
                raise InputError(
                    f"tile {_tile_label(stack, time)} has {len(stack)} z planes, tile "
                    f"{_tile_label(first_stacks[0], first_time)} has {n0}; every tile needs the "
                    "same number of planes"
                )


def _steps(first_path: str, overlap: float) -> tuple[tuple[int, ...], tuple[int, int]]:
    """Spatial shape of the first tile and the integer grid step (y, x) in pixels."""
    shape = probe_tile(first_path).shape
    return shape, (round(shape[-2] * (1 - overlap)), round(shape[-1] * (1 - overlap)))


def _check_options(order: str, overlap: float, z_step: float | None) -> None:
    if order not in ORDERS:
        raise InputError(f"--order {order}: expected one of {', '.join(ORDERS)}")
    if not (np.isfinite(overlap) and 0 <= overlap < 1):
        raise InputError(f"--overlap {overlap}: expected a fraction in [0, 1), e.g. 0.1 for 10%")
    if z_step is not None and not (np.isfinite(z_step) and z_step > 0):
        raise InputError(f"--z-step {z_step}: expected a positive number of pixels, e.g. 2.5")


def _refuse_vendor_files(matches: list[_Match], fields: set[str], pattern: str) -> None:
    """Vendor files hold their own tiles, positions and time points: not a pattern's job."""
    for m in matches:
        suffix = Path(m.rel).suffix.lower()
        if suffix in _VENDOR:
            what = "{t} reads one image file per tile and time point" if "t" in fields else (
                "a pattern reads one image file per tile")
            raise InputError(
                f"{m.path}: pattern {pattern!r} matches a {suffix} file, but {what}; give a "
                f"{suffix} file itself as the layout, or export TIFF tiles (time series: "
                "TIFFs named with {t}, or a CSV layout with a t column)"
            )


def _entry(stack: Stack, rc: tuple[int, int], steps: tuple[int, int], ndim: int,
           folder: Path) -> Entry:
    """One tile's entry: its files (or, for z planes, the planes and their {z} templates)."""
    files = stack[0]
    pos = [0.0] * (ndim - 2) + [rc[0] * steps[0], rc[1] * steps[1]]
    where = f"{files[0].path} (grid row {rc[0]}, column {rc[1]})"
    if files[0].z_span is None:
        return Entry(files[0].rel, tuple(f.path for f in files), translation_affine(pos), 0, where)
    templates = tuple(str(folder / f.z_template()) for f in files)
    planes = tuple(tuple(f.path for f in plane) for plane in stack)
    return Entry(files[0].z_template(), templates, translation_affine(pos), 0, where, planes)


def _tile_order(matches: list[_Match], rcs: list[tuple[int, int]], fields: set[str]) -> list:
    """Grid positions in layout order: acquisition order with {index}, else row by row."""
    if "index" in fields:
        indices = [int(m.fields["index"]) for m in matches]
        return list(dict.fromkeys(rc for _, rc in sorted(zip(indices, rcs, strict=True))))
    return sorted(set(rcs))


def read_pattern(
    folder: str | os.PathLike,
    pattern: str,
    *,
    grid: str | tuple[int, int] | None = None,
    order: str = "row-major",
    overlap: float = 0.1,
    first_index: int | None = None,
    z_step: float | None = None,
) -> Layout | TimeSeries:
    """Read tiles named by a pattern and place them on a regular grid.

    Parameters
    ----------
    folder : str or path-like
        Where the tiles are; ``pattern`` is matched against paths relative to it.
    pattern : str
        File name pattern with ``{row}``/``{col}`` or ``{index}``, optionally ``{channel}``,
        ``{z}`` and ``{t}`` (see the module docstring).
    grid : str or (int, int), optional
        ``"ROWSxCOLS"``; required with ``{index}``, checked against ``{row}``/``{col}`` otherwise.
    order : {"row-major", "column-major", "snake-rows", "snake-cols"}
        How ``{index}`` walks the grid (Fiji Grid/Collection orders).
    overlap : float
        Nominal overlap of neighbours as a fraction of the tile size, in [0, 1).
    first_index : int, optional
        Index of the grid's first tile (default: the smallest index found).
    z_step : float, optional
        Spacing of z planes in lateral pixels: the z pixel size is ``z_step`` times the y pixel
        size (default: PhysicalSizeZ of OME-TIFF planes, else 1). Planes are not resampled.

    Returns
    -------
    Layout or TimeSeries
        One tile per grid position, reading ``(n_channels, *tile_shape)``, ``tile_shape`` 3D
        ``(z, y, x)`` with ``{z}``; with ``{channel}`` one file per channel, sorted by channel
        value, named by the values. ``metadata`` records the pattern, grid, order, overlap,
        step and each tile's grid (row, col). With ``{t}``, a TimeSeries of such layouts, one per
        time point in time order, sharing positions.

    Raises
    ------
    InputError
        No file matches, a grid position is taken twice, a channel or plane file is missing,
        tiles with different plane counts, time points with different tiles or channels, an
        index outside the grid, ``{index}`` without a grid, vendor files, bad options.

    Notes
    -----
    Grid positions without a file are not an error: they are logged as one WARNING that
    names each position and the file name the pattern expected there.
    """
    _check_options(order, overlap, z_step)
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tile folder not found: {folder}")
    grid_rc = parse_grid(grid)
    matches, fields = _find(folder, pattern)
    _refuse_vendor_files(matches, fields, pattern)
    rcs = _grid_rc(matches, fields, grid_rc, order, first_index, pattern)
    keys = _tile_order(matches, rcs, fields)
    acquisition: dict[tuple[int, int], int] | None = None
    if "index" in fields:
        assert grid_rc is not None  # _grid_rc refuses {index} without a grid
        acquisition = {grid_index_to_rc(k, grid_rc, order): k
                       for k in range(grid_rc[0] * grid_rc[1])}
    log_gaps(log, [m.fields for m in matches], keys, grid_rc, acquisition, first_index, pattern)
    grouped = [(name, *_group(ms, rs, fields)) for name, ms, rs in _by_time(matches, rcs,
                                                                           "t" in fields)]
    _check_times(grouped, keys)
    channels = grouped[0][2]
    stacks = [(name, [_stack(rc, cells[rc], channels) for rc in keys])
              for name, cells, _ in grouped]
    _check_planes(stacks)
    first = stacks[0][1][0][0][0].path
    shape, steps = _steps(first, overlap)
    if "z" in fields and len(shape) != 2:
        raise InputError(f"{first}: holds a z-stack {shape}; with {{z}} each file must hold one "
                         "plane (drop {z} from the pattern to read stacks)")
    ndim = len(shape) + ("z" in fields)
    metadata = {
        "reader": "pattern", "pattern": pattern, "grid": grid_rc, "order": order,
        "overlap": float(overlap), "step_px": list(steps),
        "grid_positions": [list(rc) for rc in keys],
    }
    layouts = []
    for _, per_tile in stacks:
        entries = [_entry(stack, rc, steps, ndim, folder)
                   for stack, rc in zip(per_tile, keys, strict=True)]
        layout = layout_from_entries(
            entries, ndim=ndim, origin=str(folder),
            channel_names=channels if "channel" in fields else None,
            pixel_size=_pixel_size(first, ndim, "z" in fields, z_step),
        )
        layouts.append(replace(layout, metadata=metadata))
    if "t" not in fields:
        return layouts[0]
    return TimeSeries(tuple(layouts), tuple(name for name, _ in stacks), shared=True)


def _pixel_size(
    path: str, ndim: int, planes: bool, z_step: float | None
) -> tuple[float, ...] | None:
    """Pixel size (zyx): from OME-TIFF tiles, z from ``z_step`` lateral pixels when given."""
    if ndim == 2:
        if z_step is not None:
            raise InputError(
                "z step (--z-step) sets the spacing of z planes, but these tiles are 2D; add {z} "
                "to the pattern to stack one file per plane"
            )
        return _ome_pixel_size(path, 2)
    full = _ome_pixel_size(path, 3)
    if z_step is None and (full is not None or not planes):
        return full
    from tilefuse.model.layout import DEFAULT_SOURCE

    lateral = _ome_pixel_size(path, 2)
    y, x = lateral or (1.0, 1.0)
    source = DEFAULT_SOURCE if lateral is None else lateral.source + (
        "; z spacing not stated, taken equal to y" if z_step is None else "; z from --z-step")
    return PixelSize((float(1.0 if z_step is None else z_step) * y, y, x), source)


def _ome_pixel_size(path: str, ndim: int) -> PixelSize | None:
    """Pixel size (zyx, µm) a tile states (OME-XML, ImageJ, TIFF resolution), or None."""
    from tilefuse.io.readers.calibration import stated_pixel_size

    return stated_pixel_size(path, ndim)
