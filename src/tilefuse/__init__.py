"""tilefuse: fuse overlapping microscope tiles into one seamless, out-of-core OME-Zarr mosaic.

The path data takes::

    layout = tilefuse.read_layout("tiles/TileConfiguration.txt")   # Layout (or TimeSeries)
    layout, report = tilefuse.register(layout)                     # optional
    mosaic = tilefuse.fuse(layout)                                 # Mosaic: lazy, with metadata
    tilefuse.write_ome_zarr(mosaic, "mosaic.ome.zarr")
    tilefuse.write_ome_tiff(mosaic, "mosaic.ome.tif")              # or a pyramidal OME-TIFF

A time series (``{t}`` in a pattern, a ``t`` column in a CSV) reads as a :class:`TimeSeries`
and fuses into a mosaic with a ``t`` axis first, through the same functions. The cycles of a
cyclic acquisition (CyCIF, CODEX) are aligned to cycle 1 and fused into one image holding
every channel of every cycle::

    aligned = tilefuse.align_cycles([cycle1, cycle2, cycle3], channel="DAPI")
    mosaic = tilefuse.fuse_cycles([a.layout for a in aligned])
:mod:`tilefuse.pipeline` runs all of it as ``tilefuse fuse`` does (checks, registration,
intensity correction, resumable writes, the layout saved beside the image).

The names below are the real objects, imported on first use (``import tilefuse`` loads neither
dask nor zarr); ``__init__.pyi`` lists them for type checkers and editors.
"""

from __future__ import annotations

import importlib
from typing import Any

# The one place the version is written: pyproject.toml reads it from here (hatch), so that
# importing tilefuse does not import importlib.metadata (~50 ms of every command's start).
__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "InputError": "tilefuse.errors",
    "Layout": "tilefuse.model.layout",
    "Tile": "tilefuse.model.layout",
    "TimeSeries": "tilefuse.model.timeseries",
    "Mosaic": "tilefuse.model.mosaic",
    "read_layout": "tilefuse.io.readers",
    "layout_from_arrays": "tilefuse.io.readers",
    "write_csv_layout": "tilefuse.io.readers",
    "write_tileconfig": "tilefuse.io.readers",
    "register": "tilefuse.registration",
    "align_cycles": "tilefuse.registration.cycles",
    "FusionPlan": "tilefuse.fusion.graph",
    "SeriesPlan": "tilefuse.fusion.graph",
    "plan_fusion": "tilefuse.fusion.graph",
    "fuse": "tilefuse.fusion.graph",
    "fuse_cycles": "tilefuse.fusion.cycles",
    "write_ome_zarr": "tilefuse.ome_zarr.writer",
    "write_ome_tiff": "tilefuse.ome_tiff.writer",
    "read_ome_zarr_level": "tilefuse.ome_zarr.writer",
}
_SUBMODULES = ("cli", "demo", "errors", "fusion", "intensity", "io", "model", "napari",
               "ome_tiff", "ome_zarr", "pipeline", "plan", "registration", "runner", "testing",
               "viz")

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    """Import a public name (or a subpackage) on first use, then keep it here."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
