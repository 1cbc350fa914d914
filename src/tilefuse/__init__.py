"""tilefuse: fuse overlapping microscope tiles into one seamless, out-of-core OME-Zarr mosaic.

The path data takes: ``read_layout`` (or ``layout_from_arrays``) -> optional ``register`` ->
``fuse`` (a lazy dask array, one task per output chunk) -> ``write_ome_zarr``. Time series:
``read_acquisition`` -> :class:`TimeSeries` -> ``fuse_series`` (axes ``t`` first).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from tilefuse.errors import InputError
from tilefuse.fusion.graph import fuse, fuse_series, fused_axes, plan_fusion, plan_series
from tilefuse.io.readers import (
    layout_from_arrays,
    read_acquisition,
    read_layout,
    write_csv_layout,
    write_tileconfig,
)
from tilefuse.model.layout import Layout, Tile
from tilefuse.model.timeseries import TimeSeries

try:
    __version__ = version("tilefuse")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"


def register(*args, **kwargs):
    """Refine tile positions from the image content; see :func:`tilefuse.registration.register`."""
    from tilefuse.registration import register as _register

    return _register(*args, **kwargs)


def write_ome_zarr(*args, **kwargs):
    """Write a mosaic as multiscale OME-Zarr; see
    :func:`tilefuse.ome_zarr.writer.write_ome_zarr`."""
    from tilefuse.ome_zarr.writer import write_ome_zarr as _write

    return _write(*args, **kwargs)


__all__ = [
    "InputError",
    "Layout",
    "Tile",
    "TimeSeries",
    "__version__",
    "fuse",
    "fuse_series",
    "fused_axes",
    "layout_from_arrays",
    "plan_fusion",
    "plan_series",
    "read_acquisition",
    "read_layout",
    "register",
    "write_csv_layout",
    "write_ome_zarr",
    "write_tileconfig",
]
