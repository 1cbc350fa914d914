"""``tilefuse info``: what a layout holds and what fusing it will take, before any pixel is read."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tilefuse.errors import InputError
from tilefuse.fusion.graph import cache_advice, plan_fusion
from tilefuse.fusion.jobs import reads_planes, window_planes
from tilefuse.fusion.kernel import resolve_backend
from tilefuse.fusion.resample import classify
from tilefuse.io.tile_cache import DEFAULT_CACHE_BYTES
from tilefuse.model.layout import Layout
from tilefuse.model.timeseries import TimeSeries
from tilefuse.plan.chunking import DEFAULT_CHUNK, chunk_shape
from tilefuse.plan.geometry import neighbour_overlaps, union_box
from tilefuse.plan.memory import memory_limits, parse_bytes, total_memory

__all__ = ["PeakEstimate", "choose_chunk", "chunk_peak", "describe", "describe_series",
           "estimate_peak", "estimate_peak_bytes", "layout_memory", "memory_limits", "parse_bytes",
           "task_geometry", "tile_sizes", "total_memory"]

# Measured (peak RSS, /usr/bin/time -v) by `tilefuse fuse` of one 64 x 64 tile to OME-Zarr on
# threads, Python 3.11, numpy 2.4, numba 0.68: 46 MiB with the numpy kernel, 172 MiB with numba
# (a local OME-Zarr write imports neither dask nor zarr-python; the dask paths, OME-TIFF and
# distributed, add ~65 MiB). benchmarks/bench_memory.py checks the whole estimate against
# measured peaks.
_BASELINE_BYTES = 48 * 2**20  # interpreter, numpy, tilefuse, tifffile, codecs
_COMPILED_KERNEL_BYTES = 126 * 2**20  # numba and LLVM, loaded once per process
_DASK_BYTES = 65 * 2**20  # dask and distributed: job queues, clusters, processes, OME-TIFF
# Decoded tiles and chunk buffers of several MB interleave in one glibc arena whose freed blocks
# are kept for reuse (tilefuse.cli.allocator): measured peaks ran up to 17% above the sum of the
# parts on benchmarks/bench_memory.py's sets, so the estimate adds a fifth of cache + tasks.
_HEAP_SLACK = 0.2


@dataclass(frozen=True, slots=True)
class PeakEstimate:
    """What a fusion's peak memory is made of, in bytes.

    Attributes
    ----------
    baseline : int
        The interpreter and the libraries (more with the compiled kernel).
    cache : int
        Decoded tiles held: the tile cache as far as the tiles fill it, plus one tile per
        thread being decoded or used past its eviction.
    per_thread : int
        Working memory of one chunk task: the larger of fusing one output chunk (float32
        accumulators, float64 above 16-bit samples; the rounded and the encoded chunk) and
        making one chunk of the next pyramid level (its 2 x 2 source chunks and their means).
    threads : int
        Chunk tasks running at once.
    slack : int
        Heap fragmentation: freed blocks between live ones, kept by the allocator.
    """

    baseline: int
    cache: int
    per_thread: int
    threads: int
    slack: int = 0

    @property
    def total(self) -> int:
        """The estimated peak in bytes."""
        return self.baseline + self.cache + self.threads * self.per_thread + self.slack

    def parts(self) -> str:
        """``"libraries 48.0 MiB + tile cache 14.5 MiB + 2 x 32.0 MiB per chunk task + heap
        slack 15.7 MiB"``."""
        return (f"libraries {_fmt_bytes(self.baseline)} + tile cache {_fmt_bytes(self.cache)}"
                f" + {self.threads} x {_fmt_bytes(self.per_thread)} per chunk task"
                f" + heap slack {_fmt_bytes(self.slack)}")


def estimate_peak(
    chunk_pixels: int, n_channels: int, itemsize: int, threads: int, cache_bytes: int,
    backend: str = "auto", *, tile_bytes: int | None = None, max_tile_bytes: int = 0,
    pyramid_pixels: int | None = None, affine: bool = False, dask: bool = False,
) -> PeakEstimate:
    """The peak memory of a fusion process, by part.

    Parameters
    ----------
    chunk_pixels : int
        Spatial pixels of one output chunk (as far as the mosaic fills it).
    n_channels, itemsize : int
        Channels and bytes per sample of the output.
    threads : int
        Chunk tasks at once (at most the number of chunks).
    cache_bytes : int
        The tile cache's limit.
    backend : {"auto", "numpy", "numba"}
        The chunk kernel; numba adds its compiler to the baseline.
    tile_bytes : int, optional
        Decoded bytes of every tile the run reads: the cache holds no more than that (default:
        assume the tiles fill the cache).
    max_tile_bytes : int
        Decoded bytes of the largest tile.
    pyramid_pixels : int, optional
        Output pixels of one pyramid task (default ``chunk_pixels``; 0: no pyramid level).
    affine : bool
        Some tiles take the general affine path (the numpy kernel then builds coordinate grids).
    dask : bool
        The process runs dask (a job queue's or cluster's worker, local processes, an OME-TIFF
        write); a local OME-Zarr write on threads does not.

    Returns
    -------
    PeakEstimate
    """
    compiled = resolve_backend(backend) == "numba"
    baseline = (_BASELINE_BYTES + (_COMPILED_KERNEL_BYTES if compiled else 0)
                + (_DASK_BYTES if dask else 0))
    held = cache_bytes if tile_bytes is None else min(cache_bytes, tile_bytes)
    c = n_channels
    # accumulators (and pyramid means) are float32 up to 16-bit samples, float64 above
    work = 4 if itemsize <= 2 else 8
    # per output pixel: the sums per channel, the weight sum and coverage, the rounded chunk
    # and its encoded copy, and one more encoded chunk queued for the background file writer
    # (chunkstore.FileWriter holds 2); the numpy kernel also keeps float copies of tile ∩ chunk
    if compiled:
        kernel = c * (work + 3 * itemsize) + work + 1
    else:
        kernel = c * (2 * work + 3 * itemsize) + 2 * work + 1
        if affine:
            kernel += 8 * 3 + 1 + work * c  # float64 coordinates, a mask, the sampled values
    # per output pixel of a pyramid chunk: 2 x 2 source chunks, their np.block, and the
    # y- then x-means with their temporaries
    pyramid = c * (8 * itemsize + 4 * work)
    pyramid_pixels = chunk_pixels if pyramid_pixels is None else pyramid_pixels
    per_thread = max(chunk_pixels * kernel, pyramid_pixels * pyramid)
    threads = max(1, int(threads))
    cache = int(held + threads * max_tile_bytes)
    slack = _HEAP_SLACK * (cache + threads * per_thread)
    return PeakEstimate(int(baseline), cache, int(per_thread), threads, int(slack))


def estimate_peak_bytes(
    chunk_pixels: int, n_channels: int, itemsize: int, threads: int, cache_bytes: int,
    backend: str = "auto", **options,
) -> int:
    """:func:`estimate_peak`'s total.

    Parameters
    ----------
    chunk_pixels, n_channels, itemsize, threads, cache_bytes, backend, **options
        As in :func:`estimate_peak` (``options``: its keyword-only parameters).

    Returns
    -------
    int
        Bytes.
    """
    return estimate_peak(chunk_pixels, n_channels, itemsize, threads, cache_bytes, backend,
                         **options).total


def task_geometry(
    mosaic_shape: Sequence[int] | None, chunk_shape: Sequence[int], threads: int
) -> tuple[int, int, int]:
    """Pixels of one chunk task and one pyramid task, and the tasks that can run at once.

    Parameters
    ----------
    mosaic_shape : sequence of int or None
        Spatial shape of the mosaic ((z,) y, x); None: unknown, assume it holds many chunks.
    chunk_shape : sequence of int
        Output chunk shape, same axes.
    threads : int

    Returns
    -------
    chunk_pixels, pyramid_pixels, threads : int
        The chunk as far as the mosaic fills it; a pyramid task's output (0 when the mosaic is
        one chunk in y and x, so there is no pyramid); ``threads`` capped by the chunk count.
    """
    if mosaic_shape is None:
        n = int(np.prod(chunk_shape))
        return n, n, max(1, threads)
    shape = [int(s) for s in mosaic_shape]
    chunk = [min(int(c), s) for c, s in zip(chunk_shape, shape, strict=True)]
    n_chunks = int(np.prod([-(-s // c) for s, c in zip(shape, chunk, strict=True)]))
    yx = [(s, c) for s, c in zip(shape[-2:], chunk[-2:], strict=True)]
    pyramid = 0
    if any(s > c for s, c in yx):
        pyramid = int(np.prod(chunk[:-2])) * int(np.prod([min(c, -(-s // 2)) for s, c in yx]))
    return int(np.prod(chunk)), pyramid, max(1, min(threads, n_chunks))


def tile_sizes(layout: Layout | TimeSeries) -> tuple[int, int]:
    """Decoded bytes of all tiles (every time point of a series) and of the largest one."""
    layouts = layout.layouts if isinstance(layout, TimeSeries) else (layout,)
    per_px = len(layout.channels) * layout.dtype.itemsize
    sizes = [int(np.prod(t.shape)) * per_px for lay in layouts for t in lay.tiles]
    return sum(sizes), max(sizes, default=0)


def layout_memory(layout: Layout | TimeSeries) -> dict:
    """What the memory estimate needs of a layout, as keywords of :func:`chunk_peak`.

    Returns
    -------
    dict
        ``mosaic_shape`` (spatial output shape; a series' union box), ``tile_bytes``,
        ``max_tile_bytes`` (:func:`tile_sizes`), ``affine`` (some tile is rotated, scaled or
        sheared), ``max_plane_bytes`` (the largest plane of a stack read by planes,
        :func:`tilefuse.fusion.jobs.reads_planes`; None when no tile is) and
        ``max_whole_bytes`` (the largest tile read whole; 0 when none is).
    """
    layouts = layout.layouts if isinstance(layout, TimeSeries) else (layout,)
    total, largest = tile_sizes(layout)
    paths = [(t, classify(t.affine)) for lay in layouts for t in lay.tiles]
    affine = any(path == "affine" for _, path in paths)
    per_px = len(layout.channels) * layout.dtype.itemsize
    by_planes = [reads_planes(t, path) for t, path in paths]
    plane = max((math.prod(t.shape[1:]) * per_px
                 for (t, _), planes in zip(paths, by_planes, strict=True) if planes), default=None)
    whole = max((math.prod(t.shape) * per_px
                 for (t, _), planes in zip(paths, by_planes, strict=True) if not planes),
                default=0)
    return {"mosaic_shape": union_box(layouts)[1], "tile_bytes": total,
            "max_tile_bytes": largest, "affine": affine, "max_plane_bytes": plane,
            "max_whole_bytes": whole}


def chunk_peak(
    chunk_shape: Sequence[int], n_channels: int, itemsize: int, threads: int, cache_bytes: int,
    backend: str = "auto", *, mosaic_shape: Sequence[int] | None = None,
    tile_bytes: int | None = None, max_tile_bytes: int = 0, affine: bool = False,
    dask: bool = False, max_plane_bytes: int | None = None, max_whole_bytes: int = 0,
) -> PeakEstimate:
    """:func:`estimate_peak` for output chunks of ``chunk_shape`` on a mosaic of ``mosaic_shape``.

    Parameters
    ----------
    chunk_shape : sequence of int
        Spatial chunk shape ((z,) y, x).
    n_channels, itemsize, threads, cache_bytes, backend
        As in :func:`estimate_peak`.
    mosaic_shape : sequence of int, optional
        Spatial mosaic shape: chunks are clipped to it, threads capped by the chunk count and
        the pyramid sized (:func:`task_geometry`); default: a mosaic of many chunks.
    tile_bytes, max_tile_bytes, affine
        As in :func:`estimate_peak`; :func:`layout_memory` gives them and ``mosaic_shape``.
    dask : bool
        As in :func:`estimate_peak`.
    max_plane_bytes : int, optional
        The largest plane of a stack read by planes: a task then holds at most a chunk's
        planes of it (and an interpolation tap), not the whole stack.
    max_whole_bytes : int
        With `max_plane_bytes`: the largest tile read whole (rotated, or a source that cannot
        read planes apart), which a task still holds whole.

    Returns
    -------
    PeakEstimate
    """
    pixels, pyramid, used = task_geometry(mosaic_shape, chunk_shape, threads)
    if max_plane_bytes is not None and len(chunk_shape) == 3:
        window = min(max_tile_bytes, max_plane_bytes * window_planes(chunk_shape[0]))
        max_tile_bytes = max(window, max_whole_bytes)
    return estimate_peak(pixels, n_channels, itemsize, used, cache_bytes, backend,
                         tile_bytes=tile_bytes, max_tile_bytes=max_tile_bytes,
                         pyramid_pixels=pyramid, affine=affine, dask=dask)


def choose_chunk(
    ndim: int, n_channels: int, itemsize: int, threads: int, cache_bytes: int, budget: int,
    backend: str = "auto", **layout_options,
) -> int:
    """The largest chunk side (1024 down to 64) whose fusion fits ``budget`` bytes.

    Parameters
    ----------
    ndim, n_channels, itemsize, threads, cache_bytes, backend
        As in :func:`estimate_peak`; z chunks are at most 64 when ``ndim`` is 3.
    budget : int
        Bytes the fusion may use.
    **layout_options
        ``mosaic_shape``, ``tile_bytes``, ``max_tile_bytes``, ``affine`` as in
        :func:`chunk_peak` (:func:`layout_memory` gives them); without them the estimate
        assumes a large mosaic whose tiles fill the cache.

    Raises
    ------
    InputError
        Not even 64-pixel chunks fit; the message gives what the smallest chunk needs, part by
        part, and what to change.
    """
    for side in (DEFAULT_CHUNK, 512, 256, 128, 64):
        shape = chunk_shape(side, ndim)
        need = chunk_peak(shape, n_channels, itemsize, threads, cache_bytes, backend,
                          **layout_options)
        if need.total <= budget:
            return side
    hint = ("raise --memory-limit" if need.cache <= need.total // 4 else
            "raise --memory-limit or lower --cache-mb")
    if resolve_backend(backend) == "numba":
        lean = chunk_peak(shape, n_channels, itemsize, threads, cache_bytes, "numpy",
                          **layout_options)
        if lean.total <= budget:
            hint += f", or use --backend numpy (~{_fmt_bytes(lean.total)}, the same mosaic)"
    raise InputError(f"memory limit {_fmt_bytes(budget)} is below what fusing needs with the "
                     f"smallest chunks (64): ~{_fmt_bytes(need.total)} ({need.parts()}); "
                     f"{hint}")


SHARD_ADVICE_FILES = 10_000
"""Chunk files per level above which ``info`` advises ``--shard``."""
_SHARD_TARGET_FILES = 1_000  # files per level the advised shard aims at
_SHARD_MAX_BYTES = 256 * 2**20  # one shard is held whole by its task


def shard_advice(grid: Sequence[int], chunk: Sequence[int], itemsize: int) -> str | None:
    """The ``--shard`` to advise for a level 0 of `grid` chunks of shape `chunk`, or None.

    Advised above :data:`SHARD_ADVICE_FILES` chunk files: y and x grow by the smallest power
    of 2 that brings the files under about 1,000, as long as a shard stays under 256 MiB.

    Parameters
    ----------
    grid, chunk : sequence of int, shape (ndim,)
        Chunks per spatial axis, and the chunk shape (z, y, x order).
    itemsize : int
        Bytes per pixel.

    Returns
    -------
    str or None
        One ``info`` line.
    """
    files = int(np.prod(grid, dtype=np.int64))
    if files <= SHARD_ADVICE_FILES:
        return None
    best = None
    k = 2
    while True:
        shard = [*chunk[:-2], chunk[-2] * k, chunk[-1] * k]
        if np.prod(shard, dtype=np.int64) * itemsize > _SHARD_MAX_BYTES:
            break
        shards = int(np.prod([*grid[:-2], -(-grid[-2] // k), -(-grid[-1] // k)]))
        best = (shard, shards, k)
        if shards <= _SHARD_TARGET_FILES:
            break
        k *= 2
    if best is None:
        return (f"sharding:     {files} chunk files per level; a smaller --chunk with --shard "
                "(a multiple of it) writes fewer files")
    shard, shards, k = best
    value = str(shard[-1]) if len(set(shard)) == 1 else " ".join(map(str, shard))
    return (f"sharding:     {files} chunk files per level; --shard {value} writes {shards} "
            f"(zarr v3 shards of {k} x {k} chunks in y and x, "
            f"{_fmt_bytes(int(np.prod(shard)) * itemsize)} each)")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def describe(
    layout: Layout,
    *,
    chunk: int | Sequence[int] | None = None,
    threads: int = 1,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    backend: str = "auto",
    tile_bytes: int | None = None,
) -> list[str]:
    """Human-readable lines describing a layout and its fusion plan.

    ``backend`` is the chunk kernel the memory estimate is for; ``tile_bytes`` the decoded
    bytes of every tile the run reads (default: this layout's; a series reads all of its
    time points' through one cache).
    """
    plan = plan_fusion(layout, chunk=chunk, cache_bytes=cache_bytes, backend=backend)
    shapes = {t.shape for t in layout.tiles}
    shape_text = " x ".join(map(str, next(iter(shapes)))) if len(shapes) == 1 else (
        f"{len(shapes)} different shapes")
    out_shape = plan.chunks.shape
    n_px = int(np.prod(out_shape, dtype=np.int64))
    size = n_px * len(layout.channels) * layout.dtype.itemsize
    overlaps = neighbour_overlaps(layout)
    axes = "zyx"[-layout.ndim :]
    reader = layout.metadata.get("reader")
    lines = [
        f"layout:       {layout.origin}" + (f" (read as {reader})" if reader else ""),
        f"tiles:        {len(layout.tiles)} of {shape_text} ({axes}), {layout.dtype}, "
        f"{len(layout.channels)} channel(s) {', '.join(layout.channels)}",
        f"pixel size:   {' x '.join(f'{s:g}' for s in layout.pixel_size)} {layout.unit} ({axes})"
        + _pixel_size_note(layout),
        f"mosaic:       {' x '.join(map(str, out_shape))} ({axes}), {n_px / 1e6:.1f} MPix, "
        f"{_fmt_bytes(size)} uncompressed",
        "placement:    " + ", ".join(f"{plan.paths.count(p)} {p}" for p in sorted(set(plan.paths)))
        + f"; {plan.backend} kernel",
    ]
    if len(overlaps.pairs):
        frac = overlaps.extent[np.arange(len(overlaps.axis)), overlaps.axis]
        lines.append(
            f"overlaps:     {len(overlaps.pairs)} neighbour pairs, width min {frac.min():.0f} px, "
            f"median {np.median(frac):.0f} px"
        )
    else:
        lines.append("overlaps:     none (tiles do not touch)")
    options = layout_memory(layout)
    if tile_bytes is not None:
        options["tile_bytes"] = tile_bytes
    peak = chunk_peak(plan.chunks.chunk_shape, len(layout.channels), layout.dtype.itemsize,
                      threads, cache_bytes, plan.backend, **options)
    limits = memory_limits()
    source = min(limits, key=limits.__getitem__) if limits else None
    per_chunk = np.diff(plan.chunks.indptr)
    lines += [
        f"chunks:       {plan.chunks.n_chunks} of {' x '.join(map(str, plan.chunks.chunk_shape))}"
        f", tiles per chunk max {per_chunk.max()}, mean {per_chunk.mean():.1f}",
        f"peak memory:  ~{_fmt_bytes(peak.total)} with {threads} thread(s) and a "
        f"{_fmt_bytes(cache_bytes)} tile cache:",
        f"              {peak.parts()}",
        f"memory:       {_fmt_bytes(limits[source])} available to this process ({source})"
        if source else "memory:       limit unknown",
    ]
    advice = shard_advice(plan.chunks.grid, plan.chunks.chunk_shape, layout.dtype.itemsize)
    cache = cache_advice(plan)
    lines += [f"tile cache:   {cache}"] if cache else []
    return lines + ([advice] if advice else []) + _position_lines(layout)


def describe_series(
    series: TimeSeries,
    *,
    timepoint: int = 0,
    chunk: int | Sequence[int] | None = None,
    threads: int = 1,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    backend: str = "auto",
) -> list[str]:
    """Lines describing a time series: its time points and shared output grid, then
    :func:`describe` of time point ``timepoint`` (its memory estimate counts the tiles of
    every time point, which go through one cache)."""
    layout = series.at_time(timepoint)
    _, shape = union_box(series.layouts)
    axes = "zyx"[-series.ndim :]
    names = ", ".join(series.names[:8]) + (", ..." if len(series) > 8 else "")
    how = "positions shared (one grid)" if series.shared else "positions per time point"
    size = int(np.prod(shape, dtype=np.int64)) * len(series) * len(series.channels) * (
        series.dtype.itemsize)
    return [
        f"time points:  {len(series)} ({names}); {how}; {series.n_tiles} tiles in all",
        f"output:       {len(series)} x {' x '.join(map(str, shape))} (t{axes}), "
        f"{_fmt_bytes(size)} uncompressed; every time point on one grid",
        f"time point {series.names[timepoint]} (--timepoint {timepoint}):",
        *describe(layout, chunk=chunk, threads=threads, cache_bytes=cache_bytes, backend=backend,
                  tile_bytes=tile_sizes(series)[0]),
    ]


def _position_lines(layout: Layout, limit: int = 8) -> list[str]:
    """The first tiles' positions as read (x, y[, z] in pixels), so nothing is guessed silently."""
    lines = ["positions:    tile: x, y" + (", z" if layout.ndim == 3 else "") + " (pixels)"]
    for tile in layout.tiles[:limit]:
        coords = ", ".join(f"{v:.2f}" for v in tile.position[::-1])
        lines.append(f"              {tile.name}: {coords}")
    if len(layout.tiles) > limit:
        lines.append(f"              ... and {len(layout.tiles) - limit} more")
    return lines


def _pixel_size_note(layout: Layout) -> str:
    """Where the pixel size came from, and what to do when it is only a default."""
    if not layout.pixel_size_known:
        return " (default: no file states one; pass --pixel-size)"
    if layout.pixel_size_source == "given":
        return " (as given)"
    return f" (from {layout.pixel_size_source})"
