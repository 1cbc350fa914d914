"""Registration: refine tile positions from the pixels of their overlaps.

:func:`register` finds the neighbouring tiles of a layout, measures the shift of every pair in
parallel threads (:mod:`~tilefuse.registration.pairwise`), accepts the links whose correlation
clears a threshold learned from random non-overlapping crops (the chance level, within fixed
bounds), and places all tiles by a weighted least-squares solve that drops inconsistent links
(:mod:`~tilefuse.registration.solve`). Only translations change; the linear part of each affine
is kept. Tiles without an accepted link to the main group keep their stage positions, moved with
the rest, and a warning is logged. :class:`RegistrationReport` records every decision.

Examples
--------
>>> from tilefuse.testing import grid_tileset
>>> ts = grid_tileset(grid=(2, 2), tile_shape=(96, 96), overlap=0.25, position_error=4, seed=2)
>>> registered, report = register(ts.stage, workers=1)
>>> report.summary["tiles_by_image"]
4
"""

from __future__ import annotations

import functools
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from tilefuse.errors import InputError
from tilefuse.layout import Layout
from tilefuse.registration.pairwise import Measurement, Pair, find_pairs, make_pair, measure_crops
from tilefuse.registration.report import LinkRecord, RegistrationReport, TileRecord
from tilefuse.registration.solve import Solution, link_weights, solve_positions
from tilefuse.tileio import read_tile
from tilefuse.timeseries import TimeSeries

__all__ = ["LinkRecord", "RegistrationReport", "TileRecord", "register", "register_series"]

log = logging.getLogger(__name__)

MAX_SHIFT_FRACTION = 0.15
MIN_MAX_SHIFT = 10.0
NCC_FLOOR = 0.2
NCC_CAP = 0.6
NULL_QUANTILE = 0.95
NULL_SAMPLES = (24, 48)
EMPTY_FRACTION = 0.1


def register(
    layout: Layout,
    *,
    max_shift: float | None = None,
    channel: int = 0,
    min_overlap_px: int = 8,
    workers: int | None = None,
    downsample: int = 1,
) -> tuple[Layout, RegistrationReport]:
    """Refine tile positions so that overlapping tiles agree.

    Parameters
    ----------
    layout : Layout
        Tiles at their stage (nominal) positions, 2D or 3D.
    max_shift : float, optional
        Largest correction of a pair's offset, pixels per axis. Default: 15 % of the tile's
        smaller lateral size, at least 10 px, at most twice the typical nominal overlap.
    channel : int
        Channel whose pixels are compared.
    min_overlap_px : int
        Overlap, in every axis, that two tiles need at their stage positions to be linked; a
        measured shift may leave half of it (true overlaps are often thinner than planned).
    workers : int, optional
        Threads measuring pairs; default ``os.cpu_count()``.
    downsample : int
        Compare overlaps binned ``downsample`` x ``downsample`` in y and x (z is kept): for
        large tiles, about ``downsample**2`` times less work per pair for errors about
        ``downsample`` times larger (see ``benchmarks/bench_pairs.py``). Every value in, and in
        the report, stays in full-resolution pixels.

    Returns
    -------
    registered : Layout
        The same tiles with refined translations (linear parts untouched).
    report : RegistrationReport

    Raises
    ------
    InputError
        ``channel``, ``max_shift``, ``min_overlap_px``, ``workers`` or ``downsample`` is out of
        range.
    """
    _check(layout, max_shift, channel, min_overlap_px, workers, downsample)
    indices = find_pairs(layout, min_overlap_px)
    radius = default_max_shift(layout, indices) if max_shift is None else float(max_shift)
    pairs = [make_pair(layout, a, b, math.ceil(radius)) for a, b in indices]
    log.info("registering %d tiles: %d overlapping pairs, max shift %.1f px%s",
             len(layout.tiles), len(pairs), radius,
             f", measured at 1/{downsample} resolution" if downsample > 1 else "")
    min_extent = max(2, int(min_overlap_px) // 2)
    measure = functools.partial(measure_crops, min_extent=min_extent, downsample=int(downsample))
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        found = list(pool.map(lambda p: _measure(layout, p, channel, radius, measure), pairs))
        null = _null_scores(layout, pairs, channel, radius, measure, pool)
    threshold = _threshold(null)
    reasons = _decide(layout, pairs, found, threshold, radius)
    solution = _solve(layout, pairs, found, reasons, radius)
    report = _report(layout, pairs, found, reasons, solution, threshold, radius, len(null))
    report.downsample = int(downsample)
    _log_fallbacks(report)
    return layout.with_positions(solution.positions), report


def register_series(
    series: TimeSeries, *, timepoint: int = 0, **options
) -> tuple[TimeSeries, dict[int, RegistrationReport]]:
    """Register a time series: on one time point when positions are shared, else each alone.

    Parameters
    ----------
    series : TimeSeries
    timepoint : int
        With shared positions, the time point (counted from 0) whose pixels are registered; each
        tile's correction then moves the same tile at every time point.
    **options
        As in :func:`register` (``max_shift``, ``channel``, ``min_overlap_px``, ``workers``).

    Returns
    -------
    registered : TimeSeries
    reports : dict of int to RegistrationReport
        By time point index: ``{timepoint: report}`` with shared positions, one per time point
        otherwise.

    Examples
    --------
    >>> from tilefuse.testing import grid_tileset
    >>> ts = grid_tileset(grid=(1, 2), tile_shape=(96, 96), overlap=0.25, position_error=3)
    >>> series = TimeSeries((ts.stage, ts.stage), ("0", "1"), shared=True)
    >>> registered, reports = register_series(series, workers=1)
    >>> sorted(reports), registered.at_time(1).positions.tolist() == (
    ...     registered.at_time(0).positions.tolist())
    ([0], True)
    """
    if series.shared:
        before = series.at_time(timepoint)
        after, report = register(before, **options)
        return series.shifted_like(before, after), {int(timepoint): report}
    results = [register(layout, **options) for layout in series.layouts]
    registered = replace(series, layouts=tuple(layout for layout, _ in results))
    return registered, {i: report for i, (_, report) in enumerate(results)}


def _check(layout, max_shift, channel, min_overlap_px, workers, downsample) -> None:
    if not isinstance(layout, Layout):
        raise InputError(f"register expects a Layout, got {type(layout).__name__}")
    if not 0 <= int(channel) < len(layout.channels):
        raise InputError(f"channel {channel} does not exist; the layout has channels "
                         f"0..{len(layout.channels) - 1} ({', '.join(layout.channels)})")
    if max_shift is not None and not (np.isfinite(max_shift) and max_shift > 0):
        raise InputError(f"max_shift must be a positive number of pixels, got {max_shift}")
    if int(min_overlap_px) < 2:
        raise InputError(f"min_overlap_px must be at least 2, got {min_overlap_px}")
    if workers is not None and int(workers) < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    if int(downsample) != downsample or downsample < 1:
        raise InputError(f"downsample must be a whole number of at least 1, got {downsample}")
    small = min(min(t.shape[-2:]) for t in layout.tiles)
    if downsample > 1 and small // downsample < 16:
        raise InputError(f"downsample {downsample} leaves tiles of {small} px only "
                         f"{small // downsample} px wide; use at most {max(1, small // 16)}")


def default_max_shift(layout: Layout, pairs: list[tuple[int, int]]) -> float:
    """Search radius from the layout: a fraction of the tile size, bounded by the overlap.

    ``MAX_SHIFT_FRACTION`` of the smaller lateral tile size, at most twice the median
    thickness of the nominal overlaps (so that crops stay mostly overlap), at least
    ``MIN_MAX_SHIFT`` pixels.
    """
    shapes = np.array([t.shape[-2:] for t in layout.tiles], dtype=np.float64)
    radius = MAX_SHIFT_FRACTION * float(np.median(shapes, axis=0).min())
    if pairs:
        thickness = [_overlap_thickness(layout, a, b) for a, b in pairs]
        radius = min(radius, 2 * float(np.median(thickness)))
    return max(MIN_MAX_SHIFT, round(radius, 1))


def _overlap_thickness(layout: Layout, a: int, b: int) -> float:
    pa, pb = layout.tiles[a].position, layout.tiles[b].position
    sa, sb = np.asarray(layout.tiles[a].shape), np.asarray(layout.tiles[b].shape)
    extent = np.minimum(pa + sa, pb + sb) - np.maximum(pa, pb)
    return float(extent.min())


def _pixels(layout: Layout, index: int, channel: int) -> np.ndarray:
    tile = layout.tiles[index]
    return np.asarray(read_tile(tile.source)[channel]).reshape(tile.shape)


def _measure(layout: Layout, pair: Pair, channel: int, radius: float, measure) -> Measurement:
    crop_a = pair.crop(_pixels(layout, pair.a, channel), "a")
    crop_b = pair.crop(_pixels(layout, pair.b, channel), "b")
    return measure(crop_a, crop_b, pair.nominal, radius)


# ------------------------------------------------------------------------------------- threshold


def _box_bounds(layout: Layout, index: int, lo: np.ndarray, hi: np.ndarray):
    """Mosaic bounding box of the index box ``[lo, hi)`` of a tile."""
    affine = layout.tiles[index].affine
    corners = np.array(np.meshgrid(*zip(lo, hi - 1), indexing="ij")).reshape(lo.size, -1)
    mapped = affine[:-1, :-1] @ corners + affine[:-1, -1:]
    return mapped.min(axis=1), mapped.max(axis=1)


def _threshold(null: list[float]) -> float:
    """Correlation a link needs: a high quantile of the chance level, within [floor, cap]."""
    if not null:
        log.info("no room for random crop pairs; link threshold ncc %.2f", NCC_FLOOR)
        return NCC_FLOOR
    chance = float(np.quantile(null, NULL_QUANTILE))
    threshold = float(np.clip(chance, NCC_FLOOR, NCC_CAP))
    log.info("link threshold ncc %.3f (chance level %.3f from %d random crop pairs)",
             threshold, chance, len(null))
    if chance > NCC_CAP:
        log.warning("random non-overlapping crops correlate up to %.2f (low-texture content): "
                    "links are accepted from ncc %.2f and checked by the global solve only",
                    chance, NCC_CAP)
    return threshold


def _null_job(layout: Layout, pairs: list[Pair], radius: float, rng: np.random.Generator):
    """A random template pair and a crop elsewhere of the same shape, far from crop ``a``."""
    for _ in range(50):
        pair = pairs[int(rng.integers(len(pairs)))]
        other = int(rng.integers(len(layout.tiles)))
        size = pair.box_b[1] - pair.box_b[0]
        room = np.asarray(layout.tiles[other].shape) - size
        if np.any(room < 0):
            continue
        lo = np.array([int(rng.integers(0, r + 1)) for r in room])
        a_lo, a_hi = _box_bounds(layout, pair.a, pair.box_a[0], pair.box_a[1])
        c_lo, c_hi = _box_bounds(layout, other, lo, lo + size)
        if np.any((a_hi + radius < c_lo) | (c_hi + radius < a_lo)):
            return pair, other, lo
    return None


def _null_scores(layout, pairs, channel, radius, measure, pool) -> list[float]:
    """Best correlations found between crops that do not overlap (the chance level)."""
    if not pairs:
        return []
    rng = np.random.default_rng(0)
    n = int(np.clip(2 * len(pairs), *NULL_SAMPLES))
    jobs = [job for job in (_null_job(layout, pairs, radius, rng) for _ in range(n)) if job]

    def score(job) -> float:
        pair, other, lo = job
        crop_a = pair.crop(_pixels(layout, pair.a, channel), "a")
        size = pair.box_b[1] - pair.box_b[0]
        crop_c = _pixels(layout, other, channel)[tuple(slice(s, s + k) for s, k in
                                                        zip(lo, size))]
        found = measure(crop_a, crop_c, pair.nominal, radius, refine=False)
        usable = found.shift is not None and not found.edge and np.isfinite(found.ncc)
        return found.ncc if usable else 0.0

    return list(pool.map(score, jobs))


# ------------------------------------------------------------------------------------- decisions


def _decide(layout, pairs, found: list[Measurement], threshold: float, radius: float):
    """Why each link is rejected ("" when accepted)."""
    stds = [s for m in found for s in (m.std_a, m.std_b) if s > 0]
    typical = float(np.median(stds)) if stds else 0.0
    reasons = []
    for pair, m in zip(pairs, found):
        reasons.append(_reason(layout, pair, m, threshold, radius, typical))
    return reasons


def _reason(layout, pair: Pair, m: Measurement, threshold, radius, typical) -> str:
    empty = _empty_tile(layout, pair, m, typical)
    if m.shift is None:
        return f"{m.reason}{empty}"
    deviation = float(np.abs(m.shift - pair.nominal).max())
    if m.ncc < threshold:
        if m.outside_shift is not None and m.outside_ncc >= threshold:
            far = float(np.abs(m.outside_shift - pair.nominal).max())
            return (f"best match (ncc {m.outside_ncc:.2f}) shifts {far:.1f} px from the stage "
                    f"offset, beyond max_shift {radius:.1f}")
        return f"ncc {m.ncc:.2f} below threshold {threshold:.2f}{empty}"
    if m.edge:
        return (f"best match (ncc {m.ncc:.2f}) on the edge of the search, a better one lies "
                f"beyond: {m.edge}")
    if deviation > radius + 1:
        return f"shift {deviation:.1f} px from the stage offset exceeds max_shift {radius:.1f}"
    return ""


def _empty_tile(layout, pair: Pair, m: Measurement, typical: float) -> str:
    for index, std in ((pair.a, m.std_a), (pair.b, m.std_b)):
        if std <= EMPTY_FRACTION * typical:
            return (f" (empty background in {layout.tiles[index].name!r}: overlap std "
                    f"{std:.3g}, typical {typical:.3g})")
    return ""


def _solve(layout: Layout, pairs, found, reasons, radius: float) -> Solution:
    accepted = [k for k, r in enumerate(reasons) if not r]
    ndim = layout.ndim
    edges = np.array([(pairs[k].a, pairs[k].b) for k in accepted], dtype=np.int64).reshape(-1, 2)
    shifts = np.array([pairs[k].to_mosaic(found[k].shift) for k in accepted]).reshape(-1, ndim)
    covs = np.array([_mosaic_cov(pairs[k], found[k]) for k in accepted]).reshape(-1, ndim, ndim)
    return solve_positions(layout.positions, edges, shifts, link_weights(covs), radius)


def _mosaic_cov(pair: Pair, m: Measurement) -> np.ndarray:
    cov = np.eye(pair.lin.shape[0]) if m.cov is None else m.cov
    return pair.lin @ cov @ pair.lin.T


# ---------------------------------------------------------------------------------------- report


def _report(layout, pairs, found, reasons, solution: Solution, threshold, radius, n_null):
    positions, stage = solution.positions, layout.positions
    accepted = [k for k, r in enumerate(reasons) if not r]
    removed = {accepted[k]: why for k, why in solution.removed.items()}
    links = []
    for k, (pair, m) in enumerate(zip(pairs, found)):
        measured = None if m.shift is None else pair.to_mosaic(m.shift)
        residual = None
        if measured is not None:
            residual = float(np.linalg.norm(positions[pair.b] - positions[pair.a] - measured))
        reason = reasons[k] or removed.get(k, "")
        links.append(LinkRecord(
            tiles=(pair.a, pair.b),
            names=(layout.tiles[pair.a].name, layout.tiles[pair.b].name),
            nominal=[float(v) for v in stage[pair.b] - stage[pair.a]],
            measured=None if measured is None else [float(v) for v in measured],
            ncc=None if not np.isfinite(m.ncc) else float(m.ncc),
            accepted=not reason,
            reason=reason,
            residual=residual,
        ))
    sizes = np.bincount(solution.component)
    tiles = []
    for i, tile in enumerate(layout.tiles):
        comp = int(solution.component[i])
        by_image = comp == 0 and sizes[0] > 1
        tiles.append(TileRecord(
            index=i,
            name=tile.name,
            position=[float(v) for v in positions[i]],
            stage_distance=float(np.linalg.norm(positions[i] - stage[i])),
            placed_by="image" if by_image else "stage",
            component=comp,
        ))
    return RegistrationReport(links, tiles, threshold, radius, solution.limit, n_null)


def _log_fallbacks(report: RegistrationReport) -> None:
    stage = [t for t in report.tiles if t.placed_by == "stage"]
    if stage:
        names = ", ".join(t.name for t in stage[:10]) + (" ..." if len(stage) > 10 else "")
        log.warning("%d of %d tiles have no accepted link to the main group and keep their "
                    "stage positions (moved with the rest): %s", len(stage), len(report.tiles),
                    names)
    for line in report.summary_lines():
        log.info("%s", line)
