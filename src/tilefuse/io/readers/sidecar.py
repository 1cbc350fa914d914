"""What tilefuse adds to the layout files it writes, so that they read back to the same run.

A layout file (CSV or TileConfiguration) names tiles and places them; the rest of what a run used
travels in comment lines that other programs skip (Fiji ignores ``#`` lines; ``pandas.read_csv``
takes ``comment="#"``) and tilefuse reads back::

    # tilefuse.dtype = "uint8"
    # tilefuse.channels = ["00", "01"]
    # tilefuse.pixel_size_xyz = [0.24050019550342, 0.24050019550342]
    # tilefuse.unit = "micrometer"
    # tilefuse.pixel_size_source = "OME-XML"
    # tilefuse.czi_scene = 1            (tiles of one scene of a CZI file)
    # tilefuse.shared = true            (a time series whose tiles are the same at every t)

Each value is JSON (floats written with ``repr``, so they read back bit for bit). When a layout
file states them, the channel names, pixel size and unit are taken from it (not from the tiles'
headers), and the dtype and channel count are checked against the tiles: a tile set that changed
since the layout was written is refused, not silently fused differently. Files without these
lines (hand-written, Fiji's) read as before.

Only tiles stored in files can be written: a layout of in-memory arrays
(:func:`~tilefuse.io.readers.layout_from_arrays`) raises :class:`~tilefuse.errors.InputError`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import replace

import numpy as np

from tilefuse.errors import InputError
from tilefuse.io.readers.build import Entry, layout_from_entries
from tilefuse.model.layout import Layout, PixelSize, Tile
from tilefuse.model.timeseries import TimeSeries

__all__ = [
    "Header",
    "build_layout",
    "finish_layout",
    "header_lines",
    "parse_key",
    "relative_name",
    "series_of",
    "tile_files",
]

log = logging.getLogger(__name__)

_KEY = re.compile(r"^#\s*tilefuse\.([A-Za-z_]+)\s*=\s*(.*?)\s*$")
_LAYOUT_FILE = "layout file"  # source of a pixel size a layout file states without saying whence
_CHECKS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "dtype": (str, "a dtype name like \"uint16\""),
    "channels": (list, "a list of channel names"),
    "pixel_size_xyz": (list, "a list of positive numbers, x, y[, z]"),
    "unit": (str, "a unit name like \"micrometer\""),
    "pixel_size_source": (str, "a string"),
    "czi_scene": ((int, type(None)), "a scene number or null"),
    "shared": (bool, "true or false"),
    "tile": (dict, "an object like {\"more_files\": [...]}"),
}

Header = dict[str, tuple[object, str]]
"""Parsed ``# tilefuse.KEY = VALUE`` lines: key -> (value, ``file:line`` it came from)."""



def _positive_finite(value: float) -> bool:
    """A number > 0 that float holds (a JSON integer may be too large for one)."""
    try:
        number = float(value)
    except OverflowError:
        return False
    return bool(np.isfinite(number) and number > 0)

def parse_key(text: str, where: str) -> tuple[str, object] | None:
    """``(key, value)`` of a ``# tilefuse.KEY = JSON`` line, or None for any other line.

    Raises
    ------
    InputError
        The value is not JSON, or not of the type the key takes (``where`` names the line).
    """
    m = _KEY.match(text.strip())
    if m is None:
        return None
    key = m.group(1)
    try:
        value = json.loads(m.group(2))
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: tilefuse.{key} is not valid JSON ({exc.msg}): "
                         f"{m.group(2)!r}") from None
    if key not in _CHECKS:
        log.warning("%s: unknown layout key tilefuse.%s ignored", where, key)
        return None
    kind, expected = _CHECKS[key]
    bad_list = key == "channels" and isinstance(value, list) and not all(
        isinstance(v, str) for v in value)
    bad_list |= key == "pixel_size_xyz" and isinstance(value, list) and not all(
        isinstance(v, int | float) and not isinstance(v, bool) and _positive_finite(v)
        for v in value)
    if (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)
            or bad_list):
        raise InputError(f"{where}: tilefuse.{key} must be {expected}, got {m.group(2)}")
    return key, value


def header_lines(layout: Layout | TimeSeries) -> list[str]:
    """The ``# tilefuse.KEY = VALUE`` lines that make a layout file read back to ``layout``."""
    first = layout.layouts[0] if isinstance(layout, TimeSeries) else layout
    items: dict[str, object] = {
        "dtype": str(first.dtype),
        "channels": list(first.channels),
        "pixel_size_xyz": list(first.pixel_size)[::-1],
        "unit": first.unit,
        "pixel_size_source": first.pixel_size_source,
    }
    if first.metadata.get("reader") == "czi" and first.metadata.get("scene") is not None:
        items["czi_scene"] = int(first.metadata["scene"])
    if isinstance(layout, TimeSeries):
        items["shared"] = bool(layout.shared)
    return [f"# tilefuse.{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in items.items()]


def _pixel_size(header: Header, ndim: int) -> PixelSize | None:
    if "pixel_size_xyz" not in header:
        return None
    values, where = header["pixel_size_xyz"]
    assert isinstance(values, list)  # parse_key checked: a list of positive numbers
    if len(values) != ndim:
        raise InputError(f"{where}: tilefuse.pixel_size_xyz has {len(values)} values, but the "
                         f"tiles are {ndim}D; give {ndim}")
    source = header.get("pixel_size_source", (_LAYOUT_FILE, ""))[0]
    assert isinstance(source, str)  # parse_key checked
    return PixelSize([float(v) for v in values][::-1], source)


def finish_layout(layout: Layout, header: Header) -> Layout:
    """``layout`` with the channel names, pixel size and unit its layout file states.

    Raises
    ------
    InputError
        The tiles' dtype or channel count differs from what the layout file was written for.
    """
    channels: tuple[str, ...] | None = None
    unit: str | None = None
    if "dtype" in header:
        value, where = header["dtype"]
        assert isinstance(value, str)  # parse_key checked
        try:
            dtype = np.dtype(value)
        except (TypeError, ValueError):
            raise InputError(f"{where}: tilefuse.dtype {value!r} is not a dtype") from None
        if dtype != layout.dtype:
            raise InputError(
                f"{where}: the layout was written for {dtype} tiles, but {layout.tiles[0].name} "
                f"is {layout.dtype}; the tiles changed since (write the layout again)")
    if "channels" in header:
        names, where = header["channels"]
        assert isinstance(names, list)  # parse_key checked: a list of str
        if len(names) != len(layout.channels):
            raise InputError(
                f"{where}: the layout was written for {len(names)} channel(s) "
                f"({', '.join(names)}), but the tiles hold {len(layout.channels)}; a tile's "
                "channel files are missing or changed")
        channels = tuple(names)
    pixel = _pixel_size(header, layout.ndim)
    if "unit" in header:
        stated = header["unit"][0]
        assert isinstance(stated, str)  # parse_key checked
        unit = stated
    if channels is None and pixel is None and unit is None:
        return layout
    return replace(layout,
                   channels=layout.channels if channels is None else channels,
                   pixel_size=layout.pixel_size if pixel is None else pixel,
                   unit=layout.unit if unit is None else unit)


def build_layout(entries: list[Entry], *, ndim: int, origin: str, header: Header,
                 timepoint: str | None = None) -> Layout:
    """Entries of a layout file as a :class:`Layout`: the series of one CZI file (at
    `timepoint`, a ``t`` value, when the CZI has time points), or tiles probed from their
    files; then :func:`finish_layout`."""
    if any(e.paths[0].lower().endswith(".czi") for e in entries):
        scene = header.get("czi_scene", (None, ""))[0]
        assert scene is None or isinstance(scene, int)  # parse_key checked
        return finish_layout(_czi_tiles(entries, origin, scene, timepoint), header)
    pixel = _pixel_size(header, ndim)  # stated: the tiles' calibration need not be probed
    return finish_layout(layout_from_entries(entries, ndim=ndim, origin=origin,
                                             pixel_size=pixel), header)


def _czi_tiles(entries: list[Entry], origin: str, scene: int | None,
               timepoint: str | None = None) -> Layout:
    """Entries naming tiles (series, in ``M`` order) of one CZI file, placed by the entries."""
    from tilefuse.io.readers.czi import read_czi

    files = {e.paths[0] for e in entries}
    if len(files) != 1 or any(len(e.paths) != 1 for e in entries):
        raise InputError(f"{origin}: lists several files with a CZI among them; a layout may "
                         "place the tiles of one CZI file")
    file = files.pop()
    read = read_czi(file, scene=scene)
    if isinstance(read, TimeSeries):
        if timepoint not in read.names:
            raise InputError(f"{origin}: {file} has time points {', '.join(read.names)}; give "
                             "each row its time point in a t column")
        base = read.at_time(read.names.index(timepoint))
    elif timepoint not in (None, "0"):
        raise InputError(f"{origin}: t = {timepoint}, but {file} has no time points")
    else:
        base = read
    tiles: list[Tile] = []
    seen: dict[int, str] = {}
    for e in entries:
        if e.series >= len(base.tiles):
            raise InputError(f"{e.where}: series {e.series}, but the CZI has "
                             f"{len(base.tiles)} tiles")
        if e.series in seen:
            raise InputError(f"{e.where}: series {e.series} is listed twice (first at "
                             f"{seen[e.series]})")
        seen[e.series] = e.where
        tile = base.tiles[e.series]
        tiles.append(replace(tile, name=e.label or tile.name, affine=e.affine))
    return replace(base, tiles=tuple(tiles), origin=origin)


def tile_files(tile: Tile) -> tuple[str, ...]:
    """The files a layout file names for ``tile``: one, or one per channel (or ``{z}``
    templates of plane files).

    Raises
    ------
    InputError
        The tile is not stored in files (in memory, or made on the fly).
    """
    paths = getattr(tile.source, "paths", None)
    if not paths:
        raise InputError(
            f"tile {tile.name} is held in memory ({type(tile.source).__name__}), and a layout "
            "file can only name tiles stored in files; save the tiles first (e.g. "
            "tifffile.imwrite) and read them as a layout, or keep this layout in Python")
    return tuple(str(p) for p in paths)


def relative_name(path: str, folder: str | os.PathLike) -> str:
    """``path`` relative to ``folder`` (a resolved folder), as a layout file there names it.

    The tile's folder is resolved (symlinks) so the relative path leads to it from ``folder``;
    the file name is kept as it is. A path on another drive stays absolute.
    """
    real = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))),
                        os.path.basename(path))
    try:
        return os.path.relpath(real, os.path.realpath(folder))
    except ValueError:  # another drive on Windows
        return real


def series_of(tile: Tile) -> int:
    """The series (TIFF image, CZI tile) a layout file names for ``tile``."""
    return int(getattr(tile.source, "series", 0))
