"""The napari reader: a tile layout opens as its tiles, each placed where the layout puts it.

One image layer per tile and channel, placed by the tile's affine in mosaic pixel units (no
``scale``, so tiles and a fused mosaic overlay exactly), blended additively so overlaps (and any
misplacement) show up brighter. Layers are lazy dask arrays: opening a layout reads headers
only, and a tile is decoded when napari first draws it (through the tile cache, once for all of
its channels). A time series with shared positions opens with a time axis first.

Which files are layouts is decided from their names and first bytes
(:func:`tilefuse.io.readers.looks_like_layout`), so napari's other readers get every text, CSV
or TIFF file that is not one; a file that is a layout but cannot be read (a malformed line, a
missing tile) raises, and napari shows the error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tilefuse.io.readers import looks_like_layout, read_layout
from tilefuse.io.tile_cache import read_tile
from tilefuse.model.layout import Layout, Tile
from tilefuse.model.timeseries import TimeSeries

if TYPE_CHECKING:
    import dask.array as da
    import napari

__all__ = ["METADATA_KEY", "get_reader", "place_tile_layers", "tile_layers"]

log = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]
METADATA_KEY = "tilefuse"
COLORMAPS = ("green", "magenta", "cyan", "yellow", "red", "blue")


def get_reader(path: str | Sequence[str]) -> Callable[[Any], list[LayerData]] | None:
    """The reader for `path` when it is a tile layout, else None (napari tries other readers).

    Parameters
    ----------
    path : str or sequence of str
        What napari asks to open; a list is accepted when it holds exactly one path.

    Returns
    -------
    callable or None
        ``reader(path) -> list of LayerData``. It reads the layout (headers, no pixels) and
        raises when the layout is broken, so napari reports what is wrong with it.
    """
    if not isinstance(path, str | os.PathLike):
        if len(path) != 1:
            return None
        path = path[0]
    if not looks_like_layout(path):
        log.debug("tilefuse does not read %s: not a tile layout", path)
        return None
    source = resolved(path)
    return lambda _path: tile_layers(read_layout(path), source=source)


def tile_layers(layout: Layout | TimeSeries, *, source: str | None = None) -> list[LayerData]:
    """One image layer per tile and channel, placed by the tile's affine (mosaic pixels).

    Parameters
    ----------
    layout : Layout or TimeSeries
        The tiles. Of a time series with shared positions, each layer holds the tile at every
        time point (a ``t`` axis first); with positions per time point, the first time point.
    source : str, optional
        The layout file the tiles came from; stored in each layer's metadata so that the
        fusion widget can move the layers to their registered positions.

    Returns
    -------
    list of (data, meta, "image")
        ``data``: one channel of a tile, a lazy dask array of shape ``([t,] *tile.shape)``;
        ``meta``: name, affine (``(ndim + 1)`` square, one more for a ``t`` axis), additive
        blending, a colormap per channel, and the tile's identity in ``metadata``.
    """
    times: tuple[Layout, ...] = (layout,) if isinstance(layout, Layout) else (layout.layouts[0],)
    if isinstance(layout, TimeSeries):
        if layout.shared:
            times = layout.layouts
        else:
            log.info("%s: positions differ between time points; showing time point %s",
                     layout.origin, layout.names[0])
    first = times[0]
    multi = len(first.channels) > 1
    layers: list[LayerData] = []
    for i, tile in enumerate(first.tiles):
        pixels = _lazy_tile([one.tiles[i] for one in times], len(first.channels), first.dtype)
        affine = np.array(tile.affine)
        if len(times) > 1:
            affine = _with_time_axis(affine)
        for c, channel in enumerate(first.channels):
            meta = {
                "name": f"{tile.name} [{channel}]" if multi else tile.name,
                "affine": affine,
                "blending": "additive",
                "colormap": COLORMAPS[c % len(COLORMAPS)] if multi else "gray",
                "metadata": {METADATA_KEY: {"layout": source, "tile": tile.name,
                                            "channel": channel}},
            }
            layers.append((pixels[c], meta, "image"))
    return layers


def _lazy_tile(tiles: list[Tile], n_channels: int, dtype: np.dtype) -> da.Array:
    """The pixels of one tile (at each time point), ``(c, [t,] *spatial)``, decoded on demand."""
    import dask
    import dask.array as da

    stacks = [da.from_delayed(dask.delayed(read_tile, pure=True)(tile.source),
                              shape=(n_channels, *tile.shape), dtype=dtype) for tile in tiles]
    return stacks[0] if len(stacks) == 1 else da.stack(stacks, axis=1)


def _with_time_axis(affine: np.ndarray) -> np.ndarray:
    """The affine of a layer with a ``t`` axis first: time stays as it is."""
    out = np.eye(affine.shape[0] + 1)
    out[1:, 1:] = affine
    return out


def resolved(path: str | os.PathLike) -> str:
    """The absolute path layers remember their source by."""
    return str(Path(path).resolve())


def place_tile_layers(viewer: napari.Viewer, layout: Layout | TimeSeries, source: str) -> int:
    """Move the tile layers read from `source` to the placements in `layout`.

    Parameters
    ----------
    viewer : napari.Viewer
    layout : Layout or TimeSeries
        The same tiles (matched by name), e.g. after registration; of a time series, the
        first time point's placements (those a reader layer shows).
    source : str
        The layout file the layers were read from (resolved path).

    Returns
    -------
    int
        Number of layers moved.
    """
    first = layout.at_time(0) if isinstance(layout, TimeSeries) else layout
    affines = {tile.name: tile.affine for tile in first.tiles}
    moved = 0
    for layer in viewer.layers:
        info = layer.metadata.get(METADATA_KEY)
        if not isinstance(info, dict) or info.get("layout") != source:
            continue
        if info.get("tile") in affines:
            affine = np.array(affines[info["tile"]])
            if layer.ndim == affine.shape[0]:  # the layer has a t axis
                affine = _with_time_axis(affine)
            layer.affine = affine
            moved += 1
    return moved
