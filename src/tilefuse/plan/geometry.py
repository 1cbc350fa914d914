"""Geometry: where tiles land, the output grid, and which tiles touch which output chunk.

Everything here is plain numpy and runs once per fusion. The plan is compact (CSR arrays), so it
stays small at 10,000 tiles and 100,000 chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tilefuse.errors import InputError
from tilefuse.model.layout import Layout

__all__ = [
    "EPS",
    "ChunkPlan",
    "Overlaps",
    "close_pairs",
    "neighbour_overlaps",
    "output_box",
    "plan_chunks",
    "union_box",
    "tile_bounds",
]

EPS = 1e-6
"""Tolerance, in pixels, for a coordinate that lands on a pixel centre or a tile edge."""
MAX_OUTPUT_VOXELS = 2**44  # 16 Tera-voxels: beyond this a layout is a mistake, not a mosaic


def tile_bounds(affines: np.ndarray, shapes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box of each tile's pixel centres in mosaic pixel coordinates.

    Parameters
    ----------
    affines : array, shape (n, ndim + 1, ndim + 1)
    shapes : array, shape (n, ndim)

    Returns
    -------
    lo, hi : numpy.ndarray, shape (n, ndim), float64
        Smallest and largest mosaic coordinate of any tile pixel centre.
    """
    ndim = shapes.shape[1]
    corners = np.array(np.meshgrid(*[[0, 1]] * ndim, indexing="ij")).reshape(ndim, -1)
    pts = corners[None] * (shapes[:, :, None] - 1)  # (n, ndim, 2**ndim)
    mapped = np.einsum("nij,njk->nik", affines[:, :-1, :-1], pts) + affines[:, :-1, -1:]
    return mapped.min(axis=2), mapped.max(axis=2)


def _layout_arrays(layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    return layout.affines, np.array([t.shape for t in layout.tiles], dtype=np.float64)


def output_box(layout: Layout) -> tuple[np.ndarray, tuple[int, ...]]:
    """Origin and shape of the smallest pixel grid holding every tile.

    The grid spans the mosaic pixels whose centres fall inside some tile's bounding box of
    pixel centres, so an axis-aligned mosaic has no empty border row or column.

    Returns
    -------
    origin : numpy.ndarray, shape (ndim,), int64
        Mosaic pixel index of the output's first pixel.
    shape : tuple of int
        Output spatial shape.

    Raises
    ------
    InputError
        The mosaic would be absurdly large (positions far apart), reported before allocating.
    """
    lo, hi = tile_bounds(*_layout_arrays(layout))
    origin = np.ceil(lo.min(axis=0) - EPS).astype(np.int64)
    end = np.floor(hi.max(axis=0) + EPS).astype(np.int64)
    shape = tuple(int(v) for v in end - origin + 1)
    voxels = float(np.prod(shape, dtype=np.float64)) * len(layout.channels)
    if voxels > MAX_OUTPUT_VOXELS:
        raise InputError(
            f"the mosaic would be {' x '.join(map(str, shape))} pixels "
            f"({voxels * layout.dtype.itemsize / 1e12:.1f} TB); are the positions in pixels? "
            "(positions far apart, or micrometres given as pixels)"
        )
    return origin, shape


def union_box(layouts: Sequence[Layout]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Origin and shape of the smallest pixel grid holding every tile of every layout.

    Each layout's box is :func:`output_box`; the union is their bounding box, so a time series
    fused on it gives every time point the same grid.

    Returns
    -------
    origin : numpy.ndarray, shape (ndim,), int64
    shape : tuple of int
    """
    boxes = [output_box(layout) for layout in layouts]
    origin = np.min([o for o, _ in boxes], axis=0).astype(np.int64)
    end = np.max([o + np.asarray(s) for o, s in boxes], axis=0)
    return origin, tuple(int(v) for v in end - origin)


def _check_box(box, ndim: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """An explicit output box as (int64 origin, shape), refusing a malformed one."""
    origin, shape = box
    origin = np.asarray(origin)
    if origin.shape != (ndim,) or len(shape) != ndim or any(int(n) < 1 for n in shape):
        raise InputError(f"output box {tuple(origin)}, {tuple(shape)} must give {ndim} "
                         f"integer origins and {ndim} positive sizes")
    if not np.array_equal(origin, np.round(origin)):
        raise InputError(f"output box origin {tuple(origin)} must be integer pixel indices")
    return origin.astype(np.int64), tuple(int(n) for n in shape)


@dataclass(frozen=True)
class ChunkPlan:
    """The output grid and, for each output chunk, the tiles that touch it.

    Attributes
    ----------
    origin : numpy.ndarray, shape (ndim,), int64
        Mosaic pixel index of output pixel 0.
    shape : tuple of int
        Output spatial shape.
    chunk_shape : tuple of int
        Regular chunk shape (the last chunk along an axis may be smaller).
    grid : tuple of int
        Number of chunks per axis.
    indptr, indices : numpy.ndarray
        CSR: the tiles touching chunk ``k`` (C order over ``grid``) are
        ``indices[indptr[k]:indptr[k + 1]]``, in layout order.
    """

    origin: np.ndarray
    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    grid: tuple[int, ...]
    indptr: np.ndarray
    indices: np.ndarray

    @property
    def chunks(self) -> tuple[tuple[int, ...], ...]:
        """Dask-style chunk sizes per axis."""
        out = []
        for n, c in zip(self.shape, self.chunk_shape, strict=True):
            sizes = [c] * (n // c) + ([n % c] if n % c else [])
            out.append(tuple(sizes))
        return tuple(out)

    @property
    def n_chunks(self) -> int:
        return int(np.prod(self.grid))

    def chunk_box(self, block: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Mosaic pixel index of a chunk's first pixel and the chunk's shape."""
        start = np.asarray(block) * np.asarray(self.chunk_shape)
        stop = np.minimum(start + np.asarray(self.chunk_shape), self.shape)
        return self.origin + start, stop - start

    def tiles_of(self, block: Sequence[int]) -> np.ndarray:
        """Indices of the tiles touching chunk ``block`` (a chunk index per axis)."""
        k = int(np.ravel_multi_index(tuple(block), self.grid))
        return self.indices[self.indptr[k] : self.indptr[k + 1]]


def plan_chunks(
    layout: Layout,
    chunk_shape: Sequence[int],
    margin: float = 1.0,
    *,
    box: tuple[Sequence[int], Sequence[int]] | None = None,
) -> ChunkPlan:
    """Plan the output grid and the chunk -> tiles map.

    Parameters
    ----------
    layout : Layout
    chunk_shape : sequence of int
        Output chunk shape per spatial axis.
    margin : float
        Pixels added around each tile's footprint (interpolation reach); a superset is harmless,
        the kernel computes exact coverage.
    box : (origin, shape), optional
        Explicit output grid: mosaic pixel index of its first pixel, shape (ndim,), integers,
        and its shape; default :func:`output_box`. Tiles outside it are clipped.

    Returns
    -------
    ChunkPlan
    """
    ndim = layout.ndim
    origin, shape = output_box(layout) if box is None else _check_box(box, ndim)
    bad = f"chunk shape {tuple(chunk_shape)} must be {ndim} positive integers"
    if len(chunk_shape) != ndim:
        raise InputError(bad)
    chunk = np.array([min(int(c), n) for c, n in zip(chunk_shape, shape, strict=True)],
                     dtype=np.int64)
    if np.any(chunk < 1):
        raise InputError(bad)
    grid = tuple(int(v) for v in -(-np.asarray(shape) // chunk))
    lo, hi = tile_bounds(*_layout_arrays(layout))
    first = np.floor(lo - origin - margin).astype(np.int64) // chunk
    last = np.floor(hi - origin + margin).astype(np.int64) // chunk
    outside = np.any((last < 0) | (first > np.asarray(grid) - 1), axis=1)  # explicit box only
    first = np.clip(first, 0, np.asarray(grid) - 1)
    last = np.clip(last, 0, np.asarray(grid) - 1)
    counts = np.where(outside, 0, np.prod(last - first + 1, axis=1))
    tile_ids = np.repeat(np.arange(len(layout.tiles)), counts)
    # position of each pair inside its tile's chunk range, decoded per axis (C order)
    local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    span = (last - first + 1)[tile_ids]
    block = np.empty((len(tile_ids), ndim), dtype=np.int64)
    for ax in range(ndim - 1, -1, -1):
        block[:, ax] = first[tile_ids, ax] + local % span[:, ax]
        local //= span[:, ax]
    keys = np.ravel_multi_index(tuple(block.T), grid)
    order = np.argsort(keys, kind="stable")
    indptr = np.zeros(int(np.prod(grid)) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(np.bincount(keys, minlength=int(np.prod(grid))))
    return ChunkPlan(origin, shape, tuple(int(c) for c in chunk), grid, indptr, tile_ids[order])


@dataclass(frozen=True)
class Overlaps:
    """Neighbouring tile pairs and how much they overlap.

    Attributes
    ----------
    pairs : numpy.ndarray, shape (n_pairs, 2), int
        Tile indices ``i < j`` whose footprints overlap.
    extent : numpy.ndarray, shape (n_pairs, ndim), float64
        Size of each pair's overlap box per axis, in pixels.
    axis : numpy.ndarray, shape (n_pairs,), int
        The axis along which each pair is neighbours (the one with the thinnest overlap
        relative to the tile size).
    """

    pairs: np.ndarray
    extent: np.ndarray
    axis: np.ndarray

    def widths(self, ndim: int) -> list[float | None]:
        """Median overlap width along each axis among pairs neighbouring on it (None if none)."""
        return [_median(self.extent[self.axis == ax, ax]) if np.any(self.axis == ax) else None
                for ax in range(ndim)]


def _median(values: np.ndarray) -> float:
    """``np.median`` of a 1D array, bit for bit, without the ``numpy.ma`` import (16 ms of every
    command) that ``np.median`` makes on its first call."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    n = ordered.size
    middle = ordered[n // 2]
    return float(middle if n % 2 else (ordered[n // 2 - 1] + middle) / 2)


_BRUTE_FORCE_POINTS = 2048
"""Up to this many points, :func:`close_pairs` compares every pair in numpy (a few ms);
beyond, a k-d tree (scipy, ~0.2 s to import) finds them."""


def close_pairs(points: np.ndarray, radius: float) -> np.ndarray:
    """Every pair of points at most `radius` apart (Euclidean).

    Parameters
    ----------
    points : numpy.ndarray, shape (n, ndim)
    radius : float

    Returns
    -------
    numpy.ndarray, shape (n_pairs, 2), int64
        ``(i, j)`` with ``i < j``, sorted: what ``scipy.spatial.cKDTree(points)
        .query_pairs(radius)`` gives, sorted.
    """
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    if n > _BRUTE_FORCE_POINTS:
        from scipy.spatial import cKDTree

        found = cKDTree(points).query_pairs(radius, output_type="ndarray")
        return found[np.lexsort((found[:, 1], found[:, 0]))].astype(np.int64)
    pairs = []
    step = max(1, 2**20 // max(n, 1))  # rows per block: ~8 MB of distances
    for first in range(0, n, step):
        rows = points[first : first + step]
        d2 = ((rows[:, None, :] - points[None, :, :]) ** 2).sum(axis=-1)
        i, j = np.nonzero(d2 <= radius * radius)
        i += first
        keep = i < j
        pairs.append(np.stack([i[keep], j[keep]], axis=1))
    if not pairs:
        return np.zeros((0, 2), np.int64)
    out = np.concatenate(pairs).astype(np.int64)
    return out[np.lexsort((out[:, 1], out[:, 0]))]


def neighbour_overlaps(layout: Layout, min_extent: float = 1.0) -> Overlaps:
    """Find the pairs of tiles whose footprints overlap (bounding boxes, after affines).

    Parameters
    ----------
    min_extent : float
        Minimum overlap in pixels on every axis for a pair to count.
    """
    shapes = np.array([t.shape for t in layout.tiles], dtype=np.float64)
    lo, hi = tile_bounds(layout.affines, shapes)
    ndim = layout.ndim
    if len(layout.tiles) < 2:
        return Overlaps(np.zeros((0, 2), int), np.zeros((0, ndim)), np.zeros(0, int))
    centres = (lo + hi) / 2
    reach = float(np.max(hi - lo))
    pairs = close_pairs(centres, reach * 1.01)
    if len(pairs) == 0:
        return Overlaps(np.zeros((0, 2), int), np.zeros((0, ndim)), np.zeros(0, int))
    i, j = pairs[:, 0], pairs[:, 1]
    extent = np.minimum(hi[i], hi[j]) - np.maximum(lo[i], lo[j]) + 1
    keep = np.all(extent >= min_extent, axis=1)
    pairs, extent = pairs[keep], extent[keep]
    size = np.maximum(hi[pairs[:, 0]] - lo[pairs[:, 0]] + 1, 1)
    axis = np.argmin(extent / size, axis=1) if len(pairs) else np.zeros(0, int)
    return Overlaps(pairs, extent, axis)
