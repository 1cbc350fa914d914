"""Writing a mosaic as a pyramidal OME-TIFF (tiled, SubIFD pyramid), out of core.

:func:`tilefuse.ome_tiff.writer.write_ome_tiff` is the public entry point (also
``tilefuse.write_ome_tiff``); :func:`output_format` tells which writer an output name asks for.
"""

from __future__ import annotations

import os
from pathlib import Path

from tilefuse.errors import InputError
from tilefuse.io.outputs import OME_TIFF_SUFFIXES

__all__ = ["COMPRESSIONS", "FORMATS", "OME_TIFF_SUFFIXES", "output_format"]

FORMATS = ("ome-zarr", "ome-tiff")
"""Output formats of ``tilefuse fuse --format``."""
COMPRESSIONS = ("deflate", "lzw", "none")
"""OME-TIFF tile compressions that Bio-Formats, QuPath and OMERO read."""


def output_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The output format of a fusion run: `fmt` if given, else by the name of `path`.

    ``NAME.ome.tif`` / ``NAME.ome.tiff`` (any case) is an OME-TIFF; anything else an OME-Zarr
    folder; `fmt` must agree with the name.

    >>> output_format("m.OME.TIF"), output_format("m.ome.zarr")
    ('ome-tiff', 'ome-zarr')
    >>> output_format("m.ome.tiff", "ome-tiff")
    'ome-tiff'

    Raises
    ------
    InputError
        An unknown `fmt`, or a name that contradicts it.
    """
    name = Path(path).name.lower()
    by_name = "ome-tiff" if name.endswith(OME_TIFF_SUFFIXES) else "ome-zarr"
    if fmt is None:
        return by_name
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "ome-tiff" and by_name != "ome-tiff":
        raise InputError(f"-o {path}: an OME-TIFF output is a file named NAME.ome.tif (or "
                         "NAME.ome.tiff)")
    if fmt == "ome-zarr" and by_name == "ome-tiff":
        raise InputError(f"-o {path} names an OME-TIFF but --format is ome-zarr: name the "
                         "output NAME.ome.zarr, or pass --format ome-tiff")
    return fmt
