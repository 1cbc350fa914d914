"""``tilefuse info``: what a layout holds and what fusing it will take, before any pixel is read."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np

from tilefuse.errors import InputError
from tilefuse.fuse import DEFAULT_CACHE_BYTES, plan_fusion
from tilefuse.geometry import neighbour_overlaps, union_box
from tilefuse.kernel import resolve_backend
from tilefuse.layout import Layout
from tilefuse.timeseries import TimeSeries

__all__ = ["choose_chunk", "describe", "describe_series", "estimate_peak_bytes", "parse_bytes",
           "total_memory"]

_BASELINE_BYTES = 200 * 2**20  # interpreter, numpy, dask, zarr, codecs
_COMPILED_KERNEL_BYTES = 160 * 2**20  # numba and LLVM, loaded once per process


def estimate_peak_bytes(
    chunk_pixels: int, n_channels: int, itemsize: int, threads: int, cache_bytes: int,
    backend: str = "auto",
) -> int:
    """Peak memory of a fusion: per thread, the float32 accumulators plus temporaries of one
    chunk and its encoded copy; plus the tile cache and a fixed baseline (larger with the
    compiled kernel, which loads numba and LLVM)."""
    per_thread = chunk_pixels * (n_channels * 4 * 3 + 4 + 1 + 2 * n_channels * itemsize)
    baseline = _BASELINE_BYTES
    if resolve_backend(backend) == "numba":
        baseline += _COMPILED_KERNEL_BYTES
    return int(threads * per_thread + cache_bytes + baseline)


def total_memory() -> int:
    """Physical memory of this machine in bytes (8 GiB if it cannot be read)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def parse_bytes(text: str) -> int:
    """``"4GB"``, ``"512MiB"``, ``"2e9"`` or a fraction of RAM like ``"0.5"`` -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in units:
        raise InputError(f"memory limit {text!r}: expected e.g. 4GB, 512MiB or a fraction 0.5")
    value = float(m.group(1))
    if not m.group(2) and 0 < value <= 1:
        return int(value * total_memory())
    return int(value * units[m.group(2).lower()])


def choose_chunk(
    ndim: int, n_channels: int, itemsize: int, threads: int, cache_bytes: int, budget: int,
    backend: str = "auto",
) -> int:
    """The largest chunk side (1024 down to 64) whose fusion fits ``budget`` bytes.

    Raises
    ------
    InputError
        Not even 64-pixel chunks fit (the budget is below the tile cache and the baseline).
    """
    for side in (1024, 512, 256, 128, 64):
        pixels = side**2 * (min(side, 64) if ndim == 3 else 1)
        need = estimate_peak_bytes(pixels, n_channels, itemsize, threads, cache_bytes, backend)
        if need <= budget:
            return side
    raise InputError(f"memory limit {_fmt_bytes(budget)} is below what fusing needs at all "
                     f"(~{_fmt_bytes(need)}); raise --memory-limit or lower --cache-mb")


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
) -> list[str]:
    """Human-readable lines describing a layout and its fusion plan."""
    plan = plan_fusion(layout, chunk=chunk, cache_bytes=cache_bytes)
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
        f"pixel size:   {' x '.join(f'{s:g}' for s in layout.pixel_size)} {layout.unit} ({axes})",
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
    chunk_px = int(np.prod(plan.chunks.chunk_shape))
    peak = estimate_peak_bytes(chunk_px, len(layout.channels), layout.dtype.itemsize, threads,
                               cache_bytes, plan.backend)
    per_chunk = np.diff(plan.chunks.indptr)
    lines += [
        f"chunks:       {plan.chunks.n_chunks} of {' x '.join(map(str, plan.chunks.chunk_shape))}"
        f", tiles per chunk max {per_chunk.max()}, mean {per_chunk.mean():.1f}",
        f"peak memory:  ~{_fmt_bytes(peak)} with {threads} thread(s) and a "
        f"{_fmt_bytes(cache_bytes)} tile cache",
    ]
    return lines + _position_lines(layout)


def describe_series(
    series: TimeSeries,
    *,
    timepoint: int = 0,
    chunk: int | Sequence[int] | None = None,
    threads: int = 1,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> list[str]:
    """Lines describing a time series: its time points and shared output grid, then
    :func:`describe` of time point ``timepoint``."""
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
        *describe(layout, chunk=chunk, threads=threads, cache_bytes=cache_bytes),
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
