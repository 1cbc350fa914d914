"""Readers: each turns a path into a :class:`~tilefuse.model.layout.Layout`.

Inputs that name time points (``{t}`` in a pattern, a ``t`` column in a CSV) read as a
:class:`~tilefuse.model.timeseries.TimeSeries` through :func:`read_acquisition`; :func:`read_layout`
then returns one time point (``timepoint``).
"""

from __future__ import annotations

import os
from pathlib import Path

from tilefuse.errors import InputError
from tilefuse.io.readers.csv import read_csv_layout, write_csv_layout
from tilefuse.io.readers.memory import layout_from_arrays
from tilefuse.io.readers.tileconfig import read_tileconfig, write_tileconfig
from tilefuse.model.layout import Layout
from tilefuse.model.timeseries import TimeSeries

__all__ = [
    "layout_from_arrays",
    "read_acquisition",
    "read_czi",
    "read_csv_layout",
    "read_layout",
    "read_ome_tiff",
    "read_pattern",
    "read_tileconfig",
    "write_csv_layout",
    "write_tileconfig",
]

ACCEPTED = (
    "a TileConfiguration (.txt), a CSV layout (.csv), an OME-TIFF with stage positions "
    "(.ome.tif), a Zeiss CZI (.czi), or a folder of tiles with a pattern (--pattern)"
)
_PATTERN_OPTIONS = ("pattern", "grid", "order", "overlap", "first_index", "z_step")
_STAGE_OPTIONS = ("flip_x", "flip_y", "swap_xy")
_OPTIONS = {
    "pattern": _PATTERN_OPTIONS,
    "ome-tiff": _STAGE_OPTIONS,
    "czi": (*_STAGE_OPTIONS, "scene"),
    "csv": (),
    "tileconfig": (),
}
_TIFF = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
_NOT_LAYOUTS = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".nd2", ".lif", ".lsm", ".ims", ".h5", ".hdf5",
    ".zarr", ".n5", ".vsi", ".svs", ".oib", ".oir", ".ndpi", ".scn", ".dv", ".nrrd", ".mrc",
)


def read_czi(*args, **kwargs) -> Layout:
    """Read a Zeiss CZI mosaic; see :func:`tilefuse.io.readers.czi.read_czi`."""
    from tilefuse.io.readers.czi import read_czi as _read

    return _read(*args, **kwargs)


def read_ome_tiff(*args, **kwargs) -> Layout:
    """Read OME-TIFF tiles placed by stage positions; see :mod:`tilefuse.io.readers.ometiff`."""
    from tilefuse.io.readers.ometiff import read_ome_tiff as _read

    return _read(*args, **kwargs)


def read_pattern(*args, **kwargs) -> Layout | TimeSeries:
    """Read tiles named by a pattern on a grid; see :mod:`tilefuse.io.readers.pattern`."""
    from tilefuse.io.readers.pattern import read_pattern as _read

    return _read(*args, **kwargs)


def _kind(path: Path) -> str:
    """Which reader a layout file needs, from its name (and, for TIFF, its OME-XML)."""
    name = path.name.lower()
    if name.endswith(".czi"):
        return "czi"
    if name.endswith((".ome.tif", ".ome.tiff")):
        return "ome-tiff"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(_TIFF):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                if tif.is_ome:
                    return "ome-tiff"
        except Exception:  # not readable as TIFF: say what is accepted below
            pass
        raise InputError(f"{path}: a TIFF without OME-XML is a tile, not a layout; give {ACCEPTED}")
    if name.endswith(_NOT_LAYOUTS) or _is_binary(path):
        raise InputError(f"{path}: binary file of a type tilefuse does not read; give {ACCEPTED}")
    return "tileconfig"


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as fh:
        return b"\x00" in fh.read(8192)


def _check_options(path: Path, kind: str, options: dict) -> dict:
    """The options that were set, refusing unknown ones and those this reader cannot use."""
    known = {o for opts in _OPTIONS.values() for o in opts}
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    for key in given:
        if key not in known:
            raise InputError(f"unknown layout option {key!r}; known: {', '.join(sorted(known))}")
        if key not in _OPTIONS[kind]:
            raise InputError(
                f"{path}: option {key!r} does not apply to a {kind} layout; it is for "
                + ("a folder with a pattern" if key in _PATTERN_OPTIONS else "CZI/OME-TIFF files")
            )
    return given


def read_layout(path: str | os.PathLike, *, timepoint: int | None = None, **options) -> Layout:
    """Read a layout: a layout file, a CZI or OME-TIFF acquisition, or a folder with a pattern.

    Parameters
    ----------
    path : str or path-like
        A ``.csv`` layout, a Fiji ``TileConfiguration`` (any other text file), a ``.czi``, an
        OME-TIFF with stage positions, or a folder of tiles (with ``pattern``).
    timepoint : int, optional
        Which time point of a time series to return (counted from 0, in time order); required
        for a time series, 0 or None for anything else.
    **options
        For a folder: ``pattern`` (required), ``grid``, ``order``, ``overlap``, ``first_index``,
        ``z_step`` (see :func:`~tilefuse.io.readers.pattern.read_pattern`). For CZI and OME-TIFF:
        ``flip_x``, ``flip_y``, ``swap_xy``; for CZI also ``scene``. Options set to None or
        False count as not given.

    Raises
    ------
    FileNotFoundError
        The layout or one of its tiles does not exist.
    InputError
        The layout is malformed, its tiles are inconsistent, the file type is not one tilefuse
        reads, or an option does not apply; the message names the file (and line). A time
        series without ``timepoint``.
    """
    read = read_acquisition(path, **options)
    if isinstance(read, TimeSeries):
        if timepoint is None:
            raise InputError(
                f"{path}: holds {len(read)} time points; pick one (timepoint=N, --timepoint N) "
                "or read them all with read_acquisition"
            )
        return read.at_time(timepoint)
    if timepoint not in (None, 0):
        raise InputError(f"{path}: has no time points; time point {timepoint} does not exist")
    return read


def read_acquisition(path: str | os.PathLike, **options) -> Layout | TimeSeries:
    """Read a layout, or a time series when the input names time points.

    Parameters are those of :func:`read_layout` (without ``timepoint``).

    Returns
    -------
    Layout or TimeSeries
        A TimeSeries for a pattern with ``{t}`` or a CSV with a ``t`` column, else a Layout.
    """
    path = Path(path)
    if path.is_dir():
        given = _check_options(path, "pattern", options)
        if "pattern" not in given:
            raise InputError(
                f"{path}: is a folder; pass a file name pattern (--pattern 'tile_{{index}}.tif' "
                "--grid 5x4 --overlap 0.1), or give a TileConfiguration.txt or a CSV layout file"
            )
        return read_pattern(path, given.pop("pattern"), **given)
    if not path.exists():
        raise FileNotFoundError(f"layout file not found: {path}")
    if options.get("pattern") is not None:
        raise InputError(f"{path}: a pattern needs a folder of tiles, not a file")
    kind = _kind(path)
    given = _check_options(path, kind, options)
    if kind == "czi":
        return read_czi(path, **given)
    if kind == "ome-tiff":
        return read_ome_tiff(path, **given)
    if kind == "csv":
        return read_csv_layout(path)
    return read_tileconfig(path)
