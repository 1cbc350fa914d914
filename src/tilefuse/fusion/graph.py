"""Dask wiring: one task per output chunk, each carrying only the tiles that touch it.

The graph is built by hand from the chunk plan (not with ``map_blocks`` over a closure), so every
task holds a few tile descriptions (paths, affines), never the whole layout, and the same graph
runs on threads, processes or a distributed cluster.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict, Unpack

import dask
import dask.array as da
import numpy as np

from tilefuse.errors import InputError
from tilefuse.fusion.blend import BLENDS
from tilefuse.fusion.kernel import (
    ChunkTile,
    accumulator_dtype,
    check_fill,
    fuse_chunk,
    resolve_backend,
)
from tilefuse.fusion.resample import classify
from tilefuse.io.tiles import read_tile
from tilefuse.model.layout import Layout
from tilefuse.model.timeseries import TimeSeries
from tilefuse.plan.geometry import ChunkPlan, neighbour_overlaps, plan_chunks, union_box

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_CHUNK",
    "FusionOptions",
    "FusionPlan",
    "fuse",
    "fused_axes",
    "fuse_series",
    "plan_fusion",
    "plan_series",
]

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 1024
DEFAULT_CACHE_BYTES = 512 * 2**20
_FLOAT32 = np.dtype(np.float32)


@dataclass(frozen=True)
class FusionPlan:
    """Everything decided once per run, before any pixel is read.

    Attributes
    ----------
    layout : Layout
    chunks : ChunkPlan
    blend : str
    widths : tuple of float
        Feathering width per spatial axis.
    dtype : numpy.dtype
        Output dtype.
    fill : float
    paths : tuple of str
        Resampling path per tile ("slice", "shift" or "affine").
    cache_bytes : int
        Tile cache budget per worker process.
    backend : {"numpy", "numba"}
        Chunk kernel (see :func:`tilefuse.fusion.kernel.resolve_backend`).
    accumulator : numpy.dtype
        float32, or float64 when the tiles or the output are wider than 16 bits
        (:func:`tilefuse.fusion.kernel.accumulator_dtype`).
    """

    layout: Layout
    chunks: ChunkPlan
    blend: str
    widths: tuple[float, ...]
    dtype: np.dtype
    fill: float
    paths: tuple[str, ...]
    cache_bytes: int
    backend: str = "numpy"
    accumulator: np.dtype = _FLOAT32

    @property
    def n_channels(self) -> int:
        return len(self.layout.channels)


def fused_axes(layout: Layout | TimeSeries) -> tuple[str, ...]:
    """Axis names of :func:`fuse`'s output: ``(y, x)``, ``(z, y, x)``, with ``c`` first if any;
    of :func:`fuse_series`'s: ``t`` first."""
    if isinstance(layout, TimeSeries):
        return ("t", *fused_axes(layout.at_time(0)))
    spatial = ("z", "y", "x")[-layout.ndim :]
    return ("c", *spatial) if len(layout.channels) > 1 else spatial


def _chunk_shape(chunk: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if chunk is None:
        chunk = DEFAULT_CHUNK
    if isinstance(chunk, int | np.integer):
        chunk = (int(chunk),) * ndim
        if ndim == 3:  # z-stacks: keep chunks near the 2D budget
            chunk = (min(chunk[0], 64), *chunk[1:])
    chunk = tuple(int(c) for c in chunk)
    if len(chunk) != ndim or any(c < 1 for c in chunk):
        raise InputError(f"chunk {chunk} must be one positive integer or {ndim} of them")
    return chunk


def default_widths(layout: Layout) -> tuple[float, ...]:
    """Feathering width per axis: the median neighbour overlap along it (1 where none)."""
    widths = neighbour_overlaps(layout).widths(layout.ndim)
    return tuple(max(1.0, w) if w is not None else 1.0 for w in widths)


def plan_fusion(
    layout: Layout,
    *,
    chunk: int | Sequence[int] | None = None,
    blend: str = "linear",
    blend_width: float | Sequence[float] | None = None,
    dtype: np.dtype | str | None = None,
    fill: float = 0,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    backend: str = "auto",
    box: tuple[Sequence[int], Sequence[int]] | None = None,
) -> FusionPlan:
    """Decide the output grid, the chunk -> tiles map and the blend parameters.

    Parameters
    ----------
    layout : Layout
        The tiles and where they go.
    chunk : int or sequence of int, optional
        Output chunk shape (default 1024 per axis; z chunks at most 64 for z-stacks).
    blend : {"linear", "mean", "max", "min", "first", "last"}
        How overlapping tiles combine; ``linear`` is cosine feathering.
    blend_width : float or sequence of float, optional
        Feathering width in pixels per axis (default: the median neighbour overlap).
    dtype : dtype, optional
        Output dtype (default: the tiles'). Values are rounded, never truncated. Tiles and
        outputs wider than 16 bits are accumulated in float64, so uint32, int32 and float64
        values come through exactly; 64-bit integer and complex tiles are refused.
    fill : float
        Value of pixels no tile covers; for an integer output a whole number in its range.
    cache_bytes : int
        Decoded-tile cache budget per worker process.
    backend : {"auto", "numpy", "numba"}
        Chunk kernel: ``numba`` (compiled; ``pip install "tilefuse[fast]"``) or ``numpy``;
        ``auto`` takes numba when installed. The mosaic is the same either way.
    box : (origin, shape), optional
        Explicit output grid: mosaic pixel index (integers) of its first pixel, shape (ndim,),
        and its spatial shape; default the smallest grid holding every tile. A time series
        fuses every time point on one box (:func:`plan_series`).

    Returns
    -------
    FusionPlan

    Raises
    ------
    InputError
        An unknown blend, a bad chunk shape, a dtype that cannot be fused exactly (named), or a
        fill value the output dtype cannot hold.
    """
    if isinstance(layout, TimeSeries):
        raise InputError("plan_fusion and fuse take one Layout; give a TimeSeries to plan_series "
                         "or fuse_series")
    if blend not in BLENDS:
        raise InputError(f"unknown blend {blend!r}; expected one of {', '.join(BLENDS)}")
    chunks = plan_chunks(layout, _chunk_shape(chunk, layout.ndim), box=box)
    if blend_width is None:
        widths = default_widths(layout) if blend == "linear" else (1.0,) * layout.ndim
    elif np.ndim(blend_width) == 0:
        widths = (float(blend_width),) * layout.ndim
    else:
        widths = tuple(float(w) for w in blend_width)
    out_dtype = np.dtype(dtype) if dtype is not None else layout.dtype
    accumulator = accumulator_dtype(layout.dtype, out_dtype)
    check_fill(fill, out_dtype)
    paths = tuple(classify(t.affine) for t in layout.tiles)
    backend = resolve_backend(backend)
    log.info(
        "plan: %d tiles -> mosaic %s in %d chunks of %s; blend %s; paths %s; %s kernel, "
        "%s accumulator",
        len(layout.tiles), chunks.shape, chunks.n_chunks, chunks.chunk_shape, blend,
        {p: paths.count(p) for p in set(paths)}, backend, accumulator,
    )
    return FusionPlan(layout, chunks, blend, widths, out_dtype, fill, paths, int(cache_bytes),
                      backend, accumulator)


@dataclass(frozen=True)
class ChunkJob:
    """One output chunk's work: small, picklable, self-contained."""

    origin: np.ndarray
    shape: tuple[int, ...]
    tiles: tuple[tuple, ...]  # (affine, shape, path, source) per tile, layout order
    n_channels: int
    dtype: np.dtype
    blend: str
    widths: tuple[float, ...]
    fill: float
    cache_bytes: int
    squeeze_channel: bool
    backend: str = "numpy"
    accumulator: np.dtype = _FLOAT32

    def run(self) -> np.ndarray:
        """Fuse this chunk; shape ``(c, *shape)``, or ``shape`` for single-channel output."""
        tiles = [
            ChunkTile(aff, shp, path, _reader(src, self.cache_bytes))
            for aff, shp, path, src in self.tiles
        ]
        out = fuse_chunk(
            self.origin, self.shape, tiles, n_channels=self.n_channels, dtype=self.dtype,
            blend=self.blend, widths=self.widths, fill=self.fill, backend=self.backend,
            accumulator=self.accumulator,
        )
        return out[0] if self.squeeze_channel else out


def _reader(source, cache_bytes: int):
    return lambda: read_tile(source, cache_bytes)


def chunk_job(plan: FusionPlan, block: Sequence[int]) -> ChunkJob:
    """The job for output chunk ``block`` (a chunk index per spatial axis)."""
    origin, shape = plan.chunks.chunk_box(block)
    tiles = tuple(
        (t.affine, t.shape, plan.paths[i], t.source)
        for i in plan.chunks.tiles_of(block)
        for t in (plan.layout.tiles[i],)
    )
    return ChunkJob(
        origin, tuple(int(s) for s in shape), tiles, plan.n_channels, plan.dtype, plan.blend,
        plan.widths, plan.fill, plan.cache_bytes, squeeze_channel=plan.n_channels == 1,
        backend=plan.backend, accumulator=plan.accumulator,
    )


class FusionOptions(TypedDict, total=False):
    """Keyword options of :func:`plan_fusion`, accepted by :func:`fuse` too."""

    chunk: int | Sequence[int] | None
    blend: str
    blend_width: float | Sequence[float] | None
    dtype: np.dtype | str | None
    fill: float
    cache_bytes: int
    backend: str
    box: tuple[Sequence[int], Sequence[int]] | None


def fuse(layout: Layout | FusionPlan, **options: Unpack[FusionOptions]) -> da.Array:
    """The fused mosaic as a lazy dask array, one task per output chunk.

    Parameters
    ----------
    layout : Layout or FusionPlan
        The tiles and where they go, or a plan made by :func:`plan_fusion`.
    **options
        For a Layout: ``chunk``, ``blend``, ``blend_width``, ``dtype``, ``fill``,
        ``cache_bytes``, ``backend``, as in :func:`plan_fusion`. A plan already holds them.

    Returns
    -------
    dask.array.Array
        Shape ``(*spatial)`` for one channel, ``(c, *spatial)`` otherwise; see :func:`fused_axes`.
    """
    if isinstance(layout, FusionPlan):
        if options:
            raise InputError(f"options {sorted(options)} go to plan_fusion, not with a plan")
        plan = layout
    else:
        plan = plan_fusion(layout, **options)
    token = _token(plan)
    lead = () if plan.n_channels == 1 else ((plan.n_channels,),)
    chunks = (*lead, *plan.chunks.chunks)
    # The plan is one key of the graph (sent once to each worker); the chunk tasks are a
    # blockwise layer, made only for the chunks a compute asks for.
    shared = dask.delayed(plan, name="tilefuse-plan-" + token, pure=True)
    return da.map_blocks(_fuse_block, shared, name="tilefuse-" + token, chunks=chunks,
                         dtype=plan.dtype, meta=np.empty((0,) * len(chunks), dtype=plan.dtype))


def _fuse_block(plan: FusionPlan, block_id: tuple[int, ...] | None = None) -> np.ndarray:
    """The task of one output chunk: its job is looked up in the plan where it runs."""
    return chunk_job(plan, block_id[-plan.layout.ndim :]).run()


def _token(plan: FusionPlan) -> str:
    from dask.base import tokenize

    return tokenize(
        plan.layout.affines, [t.source.key for t in plan.layout.tiles], plan.chunks.chunk_shape,
        plan.chunks.origin, plan.chunks.shape, plan.blend, plan.widths, str(plan.dtype),
        plan.fill, plan.backend,
    )


def plan_series(series: TimeSeries, **options: Unpack[FusionOptions]) -> tuple[FusionPlan, ...]:
    """One plan per time point, all on the union of their output boxes.

    Parameters
    ----------
    series : TimeSeries
    **options
        As in :func:`plan_fusion`; ``box`` defaults to the union of every time point's box.

    Returns
    -------
    tuple of FusionPlan
        In time order, with equal output grids and chunk shapes.
    """
    options.setdefault("box", union_box(series.layouts))
    return tuple(plan_fusion(layout, **options) for layout in series.layouts)


def fuse_series(
    series: TimeSeries | Sequence[FusionPlan], **options: Unpack[FusionOptions]
) -> da.Array:
    """A fused time series as one lazy dask array, one task per (time point, output chunk).

    Parameters
    ----------
    series : TimeSeries or sequence of FusionPlan
        The time points, or plans made by :func:`plan_series`.
    **options
        For a TimeSeries, as in :func:`plan_fusion`; plans already hold them.

    Returns
    -------
    dask.array.Array
        Shape ``(t, *fuse_shape)``: each time point as :func:`fuse` makes it, stacked, with
        chunk 1 along t; see :func:`fused_axes`.
    """
    if isinstance(series, TimeSeries):
        plans = plan_series(series, **options)
    elif options:
        raise InputError(f"options {sorted(options)} go to plan_series, not with plans")
    else:
        plans = tuple(series)
    grids = {(tuple(p.chunks.origin), p.chunks.shape, p.chunks.chunk_shape) for p in plans}
    if len(grids) != 1:
        raise InputError(f"time points planned on different output grids {sorted(grids)}; "
                         "plan them together with plan_series")
    return da.stack([fuse(plan) for plan in plans])
