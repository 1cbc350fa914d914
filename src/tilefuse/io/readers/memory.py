"""Layouts from tiles already in memory (numpy) or lazy (dask)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tilefuse.errors import InputError
from tilefuse.io.tiles import ArraySource
from tilefuse.model.layout import Layout, Tile, translation_affine

__all__ = ["layout_from_arrays"]


def layout_from_arrays(
    arrays: Sequence,
    *,
    positions: np.ndarray | None = None,
    affines: np.ndarray | None = None,
    channels: Sequence[str] | None = None,
    pixel_size: Sequence[float] | None = None,
    unit: str = "micrometer",
) -> Layout:
    """Build a layout from in-memory tiles.

    Parameters
    ----------
    arrays : sequence of array-like
        Each tile, shape ``(*spatial)`` or, with channels, ``(c, *spatial)``; numpy or dask.
    positions : array, shape (n_tiles, ndim), optional
        Mosaic pixel index of each tile's first pixel, zyx order.
    affines : array, shape (n_tiles, ndim + 1, ndim + 1), optional
        Tile index -> mosaic index, zyx order; instead of ``positions``.
    channels : sequence of str, optional
        Channel names when the tiles carry a leading channel axis.
    pixel_size : sequence of float, optional
        Zyx, in ``unit``; None: 1 per axis, recorded as a default
        (``layout.pixel_size_known`` is False).

    Notes
    -----
    Such a layout lives only in this process: :func:`~tilefuse.io.readers.write_csv_layout` and
    :func:`~tilefuse.io.readers.write_tileconfig` refuse it with an :class:`InputError` (a layout
    file can only name tiles stored in files). Save the tiles (e.g. ``tifffile.imwrite``) and
    read them as a layout to get one that can be written and read back.
    """
    if (positions is None) == (affines is None):
        raise InputError("give exactly one of positions or affines")
    if positions is not None:
        positions = np.asarray(positions, dtype=np.float64)
        if positions.ndim != 2 or positions.shape[0] != len(arrays):
            raise InputError(f"positions of shape {positions.shape} for {len(arrays)} tiles")
        affines = np.stack([translation_affine(p) for p in positions])
    affines = np.asarray(affines, dtype=np.float64)
    if affines.ndim != 3 or affines.shape[0] != len(arrays):
        raise InputError(f"affines of shape {affines.shape} for {len(arrays)} tiles")
    ndim = affines.shape[1] - 1
    dtypes = {np.dtype(a.dtype) for a in arrays}
    if len(dtypes) != 1:
        raise InputError(f"tiles mix dtypes {sorted(map(str, dtypes))}; expected one")
    tiles = []
    n_ch: set[int] = set()
    for i, (arr, aff) in enumerate(zip(arrays, affines, strict=True)):
        if arr.ndim == ndim:
            arr = arr[None]
        if arr.ndim != ndim + 1:
            raise InputError(f"tile {i} has shape {arr.shape}; expected {ndim}D (+ channels)")
        tiles.append(Tile(f"tile {i}", tuple(arr.shape[1:]), aff, ArraySource(arr, i)))
        n_ch.add(arr.shape[0])
    if len(n_ch) != 1:
        raise InputError(f"tiles have different channel counts {sorted(n_ch)}")
    names = tuple(channels) if channels is not None else tuple(str(i) for i in range(n_ch.pop()))
    return Layout(tuple(tiles), dtypes.pop(), names, pixel_size, unit, origin="memory")
