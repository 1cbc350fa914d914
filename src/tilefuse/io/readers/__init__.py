"""Readers: each turns a path into a :class:`~tilefuse.model.layout.Layout`, or a
:class:`~tilefuse.model.timeseries.TimeSeries` when the input names time points (``{t}`` in a
pattern, a ``t`` column in a CSV); :func:`read_layout` picks the reader.

The readers of the text layouts tilefuse also writes (CSV, TileConfiguration) and of OME-Zarr
tiles are imported with this package; the others (CZI, OME-TIFF, BigStitcher, patterns, arrays
in memory) when first used, so that a command reading a TileConfiguration does not pay for
them (~30 ms).
"""

from __future__ import annotations

import csv as csvlib  # the name csv is this package's module
import importlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tilefuse.errors import InputError
from tilefuse.io.readers.csv import read_csv_layout, write_csv_layout
from tilefuse.io.readers.omezarr import is_ngff_image, read_omezarr_tiles
from tilefuse.io.readers.tileconfig import read_tileconfig, write_tileconfig
from tilefuse.io.tiles import TIFF_SUFFIXES
from tilefuse.model.layout import Layout
from tilefuse.model.timeseries import TimeSeries

if TYPE_CHECKING:
    from tilefuse.io.readers.bigstitcher import read_bigstitcher
    from tilefuse.io.readers.czi import read_czi
    from tilefuse.io.readers.memory import layout_from_arrays
    from tilefuse.io.readers.ometiff import read_ome_tiff
    from tilefuse.io.readers.pattern import read_pattern

_LAZY = {"read_bigstitcher": "bigstitcher", "read_czi": "czi",
         "layout_from_arrays": "memory", "read_ome_tiff": "ometiff", "read_pattern": "pattern"}
"""Readers imported when first used: name -> module of this package."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "layout_from_arrays",
    "looks_like_layout",
    "read_bigstitcher",
    "read_czi",
    "read_csv_layout",
    "read_layout",
    "read_ome_tiff",
    "read_omezarr_tiles",
    "read_pattern",
    "read_tileconfig",
    "write_csv_layout",
    "write_tileconfig",
]

ACCEPTED = (
    "a TileConfiguration (.txt), a CSV layout (.csv), an OME-TIFF with stage positions "
    "(.ome.tif), a Zeiss CZI (.czi), a BigStitcher dataset.xml, a folder of OME-Zarr images, "
    "or a folder of tiles with a pattern (--pattern)"
)
_PATTERN_OPTIONS = ("pattern", "grid", "order", "overlap", "first_index", "z_step")
_STAGE_OPTIONS = ("flip_x", "flip_y", "swap_xy")
_OPTIONS = {
    "pattern": _PATTERN_OPTIONS,
    "ome-tiff": _STAGE_OPTIONS,
    "czi": (*_STAGE_OPTIONS, "scene"),
    "csv": (),
    "tileconfig": (),
    "bigstitcher": (),
    "omezarr": (),
}
_NOT_LAYOUTS = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".nd2", ".lif", ".lsm", ".ims", ".h5", ".hdf5",
    ".zarr", ".n5", ".vsi", ".svs", ".oib", ".oir", ".ndpi", ".scn", ".dv", ".nrrd", ".mrc",
)


def _kind(path: Path) -> str:
    """Which reader a layout file needs, from its name (and, for TIFF, its OME-XML)."""
    name = path.name.lower()
    if name.endswith(".czi"):
        return "czi"
    if name.endswith((".ome.tif", ".ome.tiff")):
        return "ome-tiff"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".xml"):
        return "bigstitcher"
    if _lists_zarr_images(path):
        return "omezarr"
    if name.endswith(TIFF_SUFFIXES):
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


def _lists_zarr_images(path: Path) -> bool:
    """A text file whose lines (but blanks and # comments) all name ``.zarr`` folders."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except OSError:
        return False
    if b"\x00" in head:
        return False
    lines = [line.strip() for line in head.decode("utf-8", errors="replace").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    return bool(lines) and all(line.rstrip("/").lower().endswith(".zarr") for line in lines)


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
            raise InputError(  # named as typed on the command line, and as in Python
                f"{path}: --{key.replace('_', '-')} (option {key!r}) does not apply to a {kind} "
                "layout; it is for "
                + ("a folder with a pattern" if key in _PATTERN_OPTIONS else "CZI/OME-TIFF files")
            )
    return given


def read_layout(path: str | os.PathLike, **options: object) -> Layout | TimeSeries:
    """Read a layout: a layout file, a CZI or OME-TIFF acquisition, or a folder with a pattern.

    Parameters
    ----------
    path : str or path-like
        A ``.csv`` layout, a Fiji ``TileConfiguration`` (any other text file), a ``.czi``, an
        OME-TIFF with stage positions, or a folder of tiles (with ``pattern``).
    **options
        For a folder: ``pattern`` (required), ``grid``, ``order``, ``overlap``, ``first_index``,
        ``z_step`` (see :func:`~tilefuse.io.readers.pattern.read_pattern`). For CZI and OME-TIFF:
        ``flip_x``, ``flip_y``, ``swap_xy``; for CZI also ``scene``. Options set to None or
        False count as not given.

    Returns
    -------
    Layout or TimeSeries
        A :class:`~tilefuse.model.timeseries.TimeSeries` when the input names time points (a
        pattern with ``{t}``, a CSV with a ``t`` column; ``series.at_time(i)`` is one of
        them), else a Layout.

    Raises
    ------
    FileNotFoundError
        The layout or one of its tiles does not exist.
    InputError
        The layout is malformed, its tiles are inconsistent, the file type is not one tilefuse
        reads, or an option does not apply; the message names the file (and line).
    """
    path = Path(path)
    if path.is_dir() and options.get("pattern") is None and (
            is_ngff_image(path) or any(is_ngff_image(p) for p in path.glob("*.zarr"))):
        _check_options(path, "omezarr", options)
        return read_omezarr_tiles(path)
    if path.is_dir():
        given = _check_options(path, "pattern", options)
        if "pattern" not in given:
            raise InputError(
                f"{path}: is a folder; pass a file name pattern (--pattern 'tile_{{index}}.tif' "
                "--grid 5x4 --overlap 0.1), or give a TileConfiguration.txt or a CSV layout file"
            )
        from tilefuse.io.readers.pattern import read_pattern

        return read_pattern(path, given.pop("pattern"), **given)
    if not path.exists():
        raise FileNotFoundError(f"layout file not found: {path}")
    if options.get("pattern") is not None:
        raise InputError(f"{path}: a pattern needs a folder of tiles, not a file")
    kind = _kind(path)
    given = _check_options(path, kind, options)
    if kind == "czi":
        from tilefuse.io.readers.czi import read_czi

        return read_czi(path, **given)
    if kind == "ome-tiff":
        from tilefuse.io.readers.ometiff import read_ome_tiff

        return read_ome_tiff(path, **given)
    if kind == "csv":
        return read_csv_layout(path)
    if kind == "bigstitcher":
        from tilefuse.io.readers.bigstitcher import read_bigstitcher

        return read_bigstitcher(path)
    if kind == "omezarr":
        return read_omezarr_tiles(path)
    return read_tileconfig(path)


_CZI_MAGIC = b"ZISRAWFILE"
_DIM_LINE = re.compile(rb"^\s*dim\s*=\s*\S+\s*$", re.IGNORECASE | re.MULTILINE)
_SNIFF_BYTES = 1 << 16


def looks_like_layout(path: str | os.PathLike) -> bool:
    """Whether a file is a layout tilefuse reads, told from its name and first bytes only.

    True for a CZI (its magic number), an OME-TIFF whose OME-XML places images (``PositionX``
    or ``StageLabel``), a CSV whose header names ``file`` and ``x, y`` or ``affine``, and a text
    file with a ``dim = 2|3`` line (a TileConfiguration). Reading such a file may still fail
    (a malformed line, a missing tile): that is a broken layout, not another kind of file.
    Folders (a pattern is needed to read them) and everything else give False. Never raises.
    """
    path = Path(path)
    try:
        if not path.is_file():
            return False
        name = path.name.lower()
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
        if name.endswith(".czi"):
            return head.startswith(_CZI_MAGIC)
        if name.endswith(TIFF_SUFFIXES):
            return _places_images(path)
        if b"\x00" in head or name.endswith(_NOT_LAYOUTS):
            return False
        text = head.decode("utf-8-sig", errors="replace")
        if name.endswith(".csv"):
            return _csv_header_is_layout(text)
        if name.endswith(".xml"):
            return "<SpimData" in text
        if _lists_zarr_images(path):
            return True
        return _DIM_LINE.search(head.removeprefix(b"\xef\xbb\xbf")) is not None  # UTF-8 BOM
    except OSError:
        return False


def _places_images(path: Path) -> bool:
    """An OME-TIFF whose OME-XML holds stage positions (not a plain image)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            xml = tif.ome_metadata if tif.is_ome else None
    except Exception:  # not readable as TIFF: not a layout
        return False
    return isinstance(xml, str) and ("PositionX" in xml or "StageLabel" in xml)


def _csv_header_is_layout(text: str) -> bool:
    """The first line that is neither blank nor a # comment names file and x, y or affine."""
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            cols = {c.strip().lower() for c in next(csvlib.reader([line]), [])}
            return "file" in cols and ({"x", "y"} <= cols or "affine" in cols)
    return False
