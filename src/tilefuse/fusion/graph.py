"""Dask wiring: one task per output chunk, each carrying only the tiles that touch it.

The graph is built by hand from the chunk plan (not with ``map_blocks`` over a closure), so every
task holds a few tile descriptions (paths, affines), never the whole layout, and the same graph
runs on threads, processes or a distributed cluster.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast, overload

import numpy as np

from tilefuse.errors import InputError
from tilefuse.fusion.blend import BLENDS
from tilefuse.fusion.jobs import (
    ChunkJob,
    FusedPixels,
    FusionPlan,
    chunk_job,
    reads_planes,
    window_planes,
)
from tilefuse.fusion.kernel import (
    accumulator_dtype,
    check_fill,
    resolve_backend,
)
from tilefuse.fusion.resample import classify
from tilefuse.io.tile_cache import DEFAULT_CACHE_BYTES
from tilefuse.model.layout import Layout
from tilefuse.model.mosaic import Mosaic
from tilefuse.model.timeseries import TimeSeries
from tilefuse.plan.chunking import chunk_shape
from tilefuse.plan.geometry import (
    ChunkPlan,
    neighbour_overlaps,
    output_box,
    plan_chunks,
    union_box,
)

if TYPE_CHECKING:  # dask is imported when mosaic.data is read or a series is fused
    import dask.array as da

__all__ = [
    "ChunkJob",
    "FusionPlan",
    "SeriesPlan",
    "chunk_job",
    "fuse",
    "fused_axes",
    "plan_fusion",
]

log = logging.getLogger(__name__)

_FLOAT32 = np.dtype(np.float32)


@dataclass(frozen=True)
class SeriesPlan:
    """The plans of a time series: one per time point, all on one output grid.

    Attributes
    ----------
    plans : tuple of FusionPlan
        In time order; equal output grids (origin, shape, chunk shape).
    names : tuple of str
        Each time point's name (:attr:`tilefuse.TimeSeries.names`).
    """

    plans: tuple[FusionPlan, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        grids = {(tuple(p.chunks.origin), p.chunks.shape, p.chunks.chunk_shape)
                 for p in self.plans}
        if len(grids) != 1:
            raise InputError(f"time points planned on different output grids {sorted(grids)}; "
                             "plan them together: plan_fusion(series)")
        if len(self.names) != len(self.plans):
            raise InputError(f"{len(self.names)} time point names for {len(self.plans)} plans")

    def __len__(self) -> int:
        return len(self.plans)

    def __iter__(self) -> Iterator[FusionPlan]:
        return iter(self.plans)

    def __getitem__(self, index: int) -> FusionPlan:
        return self.plans[index]

    @property
    def chunks(self) -> ChunkPlan:
        """The output grid every time point shares (that of the first)."""
        return self.plans[0].chunks


def fused_axes(layout: Layout | TimeSeries) -> tuple[str, ...]:
    """Axis names of the mosaic :func:`fuse` makes of `layout`: ``(y, x)``, ``(z, y, x)``, with
    ``c`` first for several channels, and ``t`` first of all for a time series."""
    if isinstance(layout, TimeSeries):
        return ("t", *fused_axes(layout.at_time(0)))
    spatial = ("z", "y", "x")[-layout.ndim :]
    return ("c", *spatial) if len(layout.channels) > 1 else spatial


def default_widths(layout: Layout) -> tuple[float, ...]:
    """Feathering width per axis: the median neighbour overlap along it (1 where none)."""
    widths = neighbour_overlaps(layout).widths(layout.ndim)
    return tuple(max(1.0, w) if w is not None else 1.0 for w in widths)


@overload
def plan_fusion(
    layout: Layout, *, chunk: int | Sequence[int] | None = ..., blend: str = ...,
    blend_width: float | Sequence[float] | None = ..., dtype: np.dtype | str | None = ...,
    fill: float = ..., cache_bytes: int = ..., backend: str = ...,
    box: tuple[Sequence[int], Sequence[int]] | None = ...,
) -> FusionPlan: ...
@overload
def plan_fusion(
    layout: TimeSeries, *, chunk: int | Sequence[int] | None = ..., blend: str = ...,
    blend_width: float | Sequence[float] | None = ..., dtype: np.dtype | str | None = ...,
    fill: float = ..., cache_bytes: int = ..., backend: str = ...,
    box: tuple[Sequence[int], Sequence[int]] | None = ...,
) -> SeriesPlan: ...
@overload
def plan_fusion(
    layout: Layout | TimeSeries, *, chunk: int | Sequence[int] | None = ..., blend: str = ...,
    blend_width: float | Sequence[float] | None = ..., dtype: np.dtype | str | None = ...,
    fill: float = ..., cache_bytes: int = ..., backend: str = ...,
    box: tuple[Sequence[int], Sequence[int]] | None = ...,
) -> FusionPlan | SeriesPlan: ...
def plan_fusion(
    layout: Layout | TimeSeries,
    *,
    chunk: int | Sequence[int] | None = None,
    blend: str = "linear",
    blend_width: float | Sequence[float] | None = None,
    dtype: np.dtype | str | None = None,
    fill: float = 0,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    backend: str = "auto",
    box: tuple[Sequence[int], Sequence[int]] | None = None,
) -> FusionPlan | SeriesPlan:
    """Decide the output grid, the chunk -> tiles map and the blend parameters.

    Parameters
    ----------
    layout : Layout or TimeSeries
        The tiles and where they go; of a time series, every time point.
    chunk : int or sequence of int, optional
        Output chunk shape (default 1024 per axis; z chunks at most 64 for z-stacks: see
        :func:`tilefuse.plan.chunking.chunk_shape`).
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
        Chunk kernel: ``numba`` (compiled) or ``numpy``; ``auto`` takes numba unless the job
        is small and all translations (see :func:`tilefuse.fusion.kernel.resolve_backend`).
        The mosaic is the same either way.
    box : (origin, shape), optional
        Explicit output grid: mosaic pixel index (integers) of its first pixel, shape (ndim,),
        and its spatial shape; default the smallest grid holding every tile (of a time series,
        the union of every time point's box, so all share one grid).

    Returns
    -------
    FusionPlan or SeriesPlan
        A :class:`SeriesPlan` (one plan per time point) for a TimeSeries.

    Raises
    ------
    InputError
        An unknown blend, a bad chunk shape, a dtype that cannot be fused exactly (named), or a
        fill value the output dtype cannot hold.
    """
    def plan(one: Layout, grid: tuple | None) -> FusionPlan:
        return _plan_layout(one, chunk, blend, blend_width, dtype, fill, cache_bytes, backend,
                            grid)

    if isinstance(layout, TimeSeries):
        shared = union_box(layout.layouts) if box is None else box
        series = SeriesPlan(tuple(plan(one, shared) for one in layout.layouts), layout.names)
        _warn_cache(series.plans[0])  # once: every time point has the same tiles
        return series
    return _warn_cache(plan(layout, box))


def cache_advice(plan: FusionPlan) -> str | None:
    """What to do when tiles are larger than the plan's tile cache (None when they fit).

    Such a tile cannot stay in the cache, so it is decoded again for every chunk it touches:
    a light-sheet stack of 2 GiB under a 512 MiB cache, read some 30 times, when its source
    reads it whole. A stack read by planes (:func:`tilefuse.fusion.jobs.reads_planes`) counts
    as the planes of one chunk.
    """
    sizes = np.array(read_sizes(plan.layout, plan.chunks.chunk_shape, plan.paths))
    touches = np.bincount(plan.chunks.indices, minlength=len(sizes))
    over = (sizes > plan.cache_bytes) & (touches > 1)
    if not over.any():
        return None
    return (f"tiles of up to {_size(sizes.max())} do not fit the {_size(plan.cache_bytes)} tile "
            f"cache: each is decoded again for every chunk it touches (up to "
            f"{int(touches[over].max())} times); a cache of four tiles (--cache-mb "
            f"{math.ceil(4 * sizes.max() / 2**20)}) reads each far fewer times, if memory allows")


def read_sizes(layout: Layout, chunk_shape: Sequence[int],
               paths: Sequence[str] | None = None) -> list[int]:
    """Bytes a chunk reads of each tile: a chunk's planes (and an interpolation tap) of a
    z-stack read by planes (:func:`tilefuse.fusion.jobs.reads_planes`), else the whole tile.

    Parameters
    ----------
    layout : Layout
    chunk_shape : sequence of int
        Spatial chunk shape.
    paths : sequence of str, optional
        Each tile's resampling path (default: :func:`tilefuse.fusion.resample.classify`).
    """
    per_px = len(layout.channels) * layout.dtype.itemsize
    paths = [classify(t.affine) for t in layout.tiles] if paths is None else paths
    depth = window_planes(chunk_shape[0])
    return [math.prod((min(t.shape[0], depth), *t.shape[1:]) if reads_planes(t, path)
                      else t.shape) * per_px
            for t, path in zip(layout.tiles, paths, strict=True)]


def largest_read(layout: Layout, chunk_shape: Sequence[int]) -> int:
    """The most bytes a chunk reads of one tile (:func:`read_sizes`)."""
    return max(read_sizes(layout, chunk_shape), default=0)


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.0f} KiB"


def _warn_cache(plan: FusionPlan) -> FusionPlan:
    advice = cache_advice(plan)
    if advice:
        log.warning(advice)
    return plan


def layout_backend(layout: Layout, backend: str = "auto", *,
                   shape: Sequence[int] | None = None,
                   paths: Sequence[str] | None = None) -> str:
    """The kernel a plan of `layout` runs (:func:`tilefuse.fusion.kernel.resolve_backend` for
    its output pixels and whether some tile is affine).

    Parameters
    ----------
    shape, paths : optional
        The output grid's shape and the tiles' resampling paths, when already known (default:
        the smallest grid holding every tile, and each tile's :func:`classify`).
    """
    if shape is None:
        shape = output_box(layout)[1]
    if paths is None:
        paths = [classify(t.affine) for t in layout.tiles]
    return resolve_backend(backend, pixels=math.prod(shape) * len(layout.channels),
                           affine="affine" in paths)


def _plan_layout(
    layout: Layout,
    chunk: int | Sequence[int] | None,
    blend: str,
    blend_width: float | Sequence[float] | None,
    dtype: np.dtype | str | None,
    fill: float,
    cache_bytes: int,
    backend: str,
    box: tuple | None,
) -> FusionPlan:
    """:func:`plan_fusion` of one layout."""
    if not isinstance(layout, Layout):
        raise InputError(f"plan_fusion and fuse take a Layout or a TimeSeries, got "
                         f"{type(layout).__name__}")
    if blend not in BLENDS:
        raise InputError(f"unknown blend {blend!r}; expected one of {', '.join(BLENDS)}")
    chunks = plan_chunks(layout, chunk_shape(chunk, layout.ndim), box=box)
    widths: tuple[float, ...]
    if blend_width is None:
        widths = default_widths(layout) if blend == "linear" else (1.0,) * layout.ndim
    elif np.ndim(blend_width) == 0:
        widths = (float(blend_width),) * layout.ndim  # type: ignore[arg-type]
    else:
        widths = tuple(float(w) for w in blend_width)  # type: ignore[union-attr]
    out_dtype = np.dtype(dtype) if dtype is not None else layout.dtype
    accumulator = accumulator_dtype(layout.dtype, out_dtype)
    check_fill(fill, out_dtype)
    paths = tuple(classify(t.affine) for t in layout.tiles)
    backend = layout_backend(layout, backend, shape=chunks.shape, paths=paths)
    log.info(
        "plan: %d tiles -> mosaic %s in %d chunks of %s; blend %s; paths %s; %s kernel, "
        "%s accumulator",
        len(layout.tiles), chunks.shape, chunks.n_chunks, chunks.chunk_shape, blend,
        {p: paths.count(p) for p in set(paths)}, backend, accumulator,
    )
    return FusionPlan(layout, chunks, blend, widths, out_dtype, fill, paths, int(cache_bytes),
                      backend, accumulator)


_DEFAULTS: dict[str, object] = {
    "chunk": None, "blend": "linear", "blend_width": None, "dtype": None, "fill": 0,
    "cache_bytes": DEFAULT_CACHE_BYTES, "backend": "auto", "box": None,
}


def fuse(
    layout: Layout | TimeSeries | FusionPlan | SeriesPlan,
    *,
    chunk: int | Sequence[int] | None = None,
    blend: str = "linear",
    blend_width: float | Sequence[float] | None = None,
    dtype: np.dtype | str | None = None,
    fill: float = 0,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    backend: str = "auto",
    box: tuple[Sequence[int], Sequence[int]] | None = None,
) -> Mosaic:
    """The fused mosaic, lazy: one task per output chunk (and time point).

    Parameters
    ----------
    layout : Layout, TimeSeries, FusionPlan or SeriesPlan
        The tiles and where they go (every time point of a series), or a plan made by
        :func:`plan_fusion`, which already holds the options below.
    chunk, blend, blend_width, dtype, fill, cache_bytes, backend, box
        As in :func:`plan_fusion`.

    Returns
    -------
    Mosaic
        ``data`` of shape ``([t,] [c,] *spatial)``: ``t`` for a time series (chunk 1 along it),
        ``c`` for several channels; with the layout's pixel size, unit and channel names, the
        time point names, and ``origin``, the output grid's first pixel in the layout's pixel
        frame. Nothing is read until it is computed or written.

    Raises
    ------
    InputError
        As :func:`plan_fusion`; or options given with a plan (they belong to the plan).

    Examples
    --------
    >>> from tilefuse.testing import grid_tileset
    >>> ts = grid_tileset(grid=(2, 2), tile_shape=(32, 32), overlap=0.25, seed=0)
    >>> mosaic = fuse(ts.layout, chunk=16)
    >>> mosaic.axes, mosaic.shape == ts.truth.shape
    (('y', 'x'), True)
    """
    plan: FusionPlan | SeriesPlan
    if isinstance(layout, FusionPlan | SeriesPlan):
        options = {"chunk": chunk, "blend": blend, "blend_width": blend_width, "dtype": dtype,
                   "fill": fill, "cache_bytes": cache_bytes, "backend": backend, "box": box}
        given = sorted(k for k, v in options.items() if v is not _DEFAULTS[k]
                       and not (isinstance(v, int | float | str) and v == _DEFAULTS[k]))
        if given:
            raise InputError(f"options {given} go to plan_fusion, not with a plan")
        plan = layout
    else:
        plan = plan_fusion(layout, chunk=chunk, blend=blend, blend_width=blend_width,
                           dtype=dtype, fill=fill, cache_bytes=cache_bytes, backend=backend,
                           box=box)
    if isinstance(plan, SeriesPlan):
        first = plan.plans[0]
        import dask.array as da

        data = da.stack([FusedPixels(p).to_dask() for p in plan.plans])
        return _mosaic(data, first, ("t", *fused_axes(first.layout)), plan.names)
    return _mosaic(FusedPixels(plan), plan, fused_axes(plan.layout), None)


def _mosaic(data: da.Array | FusedPixels, plan: FusionPlan, axes: tuple[str, ...],
            timepoints: tuple[str, ...] | None) -> Mosaic:
    layout = plan.layout
    # block pixels are read back as a dask array (Mosaic.data): typed as what readers get
    return Mosaic(cast("da.Array", data), axes, pixel_size=tuple(layout.pixel_size),
                  unit=layout.unit, channel_names=layout.channels,
                  origin=tuple(float(v) for v in plan.chunks.origin), timepoints=timepoints)
