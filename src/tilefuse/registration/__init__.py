"""Registration: refine tile positions from the pixels of their overlaps.

:func:`register` finds the neighbouring tiles of a layout, measures the shift of every pair in
parallel threads (:mod:`~tilefuse.registration.pairwise`), accepts the links whose correlation
clears a threshold learned from random non-overlapping crops (the chance level, within fixed
bounds), and places all tiles by a weighted least-squares solve that drops inconsistent links
(:mod:`~tilefuse.registration.solve`). Only translations change; the linear part of each affine
is kept. Tiles without an accepted link to the main group keep their stage positions, moved with
the rest, and a warning is logged. When no link is accepted at all the tiles most likely do not
match where the layout puts them (wrong order, overlap or search radius): :func:`register` then
raises :class:`~tilefuse.errors.InputError` unless stage positions are explicitly allowed.
Links whose best match lies beyond the search window, and a low share of accepted links, are
logged as warnings with what to try (also in :meth:`RegistrationReport.summary_lines`).
:class:`RegistrationReport` records every decision.

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
from tilefuse.model.layout import Layout
from tilefuse.model.timeseries import TimeSeries
from tilefuse.registration.pairwise import (
    OUTSIDE_REACH,
    Measurement,
    Pair,
    find_pairs,
    make_pair,
    measure_crops,
)
from tilefuse.registration.report import LinkRecord, RegistrationReport, TileRecord
from tilefuse.registration.solve import Solution, link_weights, solve_positions
from tilefuse.registration.threshold import link_threshold, null_scores, tile_pixels

__all__ = ["LinkRecord", "RegistrationReport", "TileRecord", "register", "register_series"]

log = logging.getLogger(__name__)

MAX_SHIFT_FRACTION = 0.15
MIN_MAX_SHIFT = 10.0
EMPTY_FRACTION = 0.1


def register(
    layout: Layout,
    *,
    max_shift: float | None = None,
    channel: int = 0,
    min_overlap_px: int = 8,
    workers: int | None = None,
    downsample: int = 1,
    allow_stage_positions: bool = False,
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
        Search overlaps binned ``downsample`` x ``downsample`` in y and x (z is kept), then
        refine each shift at full resolution within ``downsample + 1`` px of that estimate:
        for large tiles far less work per pair, while shifts, positions and residuals keep
        full-resolution quality (see ``benchmarks/bench_pairs.py``). Every value in, and in
        the report, is in full-resolution pixels.
    allow_stage_positions : bool
        When no link is accepted, return the stage positions (with a warning) instead of
        raising :class:`~tilefuse.errors.InputError`.

    Returns
    -------
    registered : Layout
        The same tiles with refined translations (linear parts untouched).
    report : RegistrationReport

    Raises
    ------
    InputError
        ``channel``, ``max_shift``, ``min_overlap_px``, ``workers`` or ``downsample`` is out of
        range; or tiles overlap but not one link (leaving out those over empty background) is
        accepted, unless ``allow_stage_positions``. The message says how many links were
        tried, why they were rejected and what to try.
    """
    _check(layout, max_shift, channel, min_overlap_px, workers, downsample)
    indices = find_pairs(layout, min_overlap_px)
    radius = default_max_shift(layout, indices) if max_shift is None else float(max_shift)
    pairs = [make_pair(layout, a, b, math.ceil(radius)) for a, b in indices]
    log.info("registering %d tiles: %d overlapping pairs, max shift %.1f px%s",
             len(layout.tiles), len(pairs), radius,
             f", searched at 1/{downsample} resolution, refined at full" if downsample > 1 else "")
    min_extent = max(2, int(min_overlap_px) // 2)
    measure = functools.partial(measure_crops, min_extent=min_extent, downsample=int(downsample))
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        found = list(pool.map(lambda p: _measure(layout, p, channel, radius, measure), pairs))
        null = null_scores(layout, pairs, channel, radius, measure, pool)
    threshold = link_threshold(null)
    reasons = _decide(layout, pairs, found, threshold, radius)
    solution = _solve(layout, pairs, found, reasons, radius)
    report = _report(layout, pairs, found, reasons, solution, threshold, radius, len(null))
    report.downsample = int(downsample)
    _refuse_no_link(report, channel, allow_stage_positions)
    _log_fallbacks(report)
    return layout.with_positions(solution.positions), report


def register_series(
    series: TimeSeries, *, timepoint: int = 0, allow_stage_positions: bool = False, **options
) -> tuple[TimeSeries, dict[int, RegistrationReport]]:
    """Register a time series: on one time point when positions are shared, else each alone.

    Parameters
    ----------
    series : TimeSeries
    timepoint : int
        With shared positions, the time point (counted from 0) whose pixels are registered; each
        tile's correction then moves the same tile at every time point.
    allow_stage_positions : bool
        As in :func:`register`: keep the stage positions of a time point where no link is
        accepted instead of raising :class:`~tilefuse.errors.InputError`.
    **options
        As in :func:`register` (``max_shift``, ``channel``, ``min_overlap_px``, ``workers``,
        ``downsample``).

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
    options["allow_stage_positions"] = allow_stage_positions
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


def _measure(layout: Layout, pair: Pair, channel: int, radius: float, measure) -> Measurement:
    crop_a = pair.crop(tile_pixels(layout, pair.a, channel), "a")
    crop_b = pair.crop(tile_pixels(layout, pair.b, channel), "b")
    return measure(crop_a, crop_b, pair.nominal, radius)


# ------------------------------------------------------------------------------------- decisions


def _decide(layout, pairs, found: list[Measurement], threshold: float, radius: float):
    """Why each link is rejected ("" when accepted)."""
    stds = [s for m in found for s in (m.std_a, m.std_b) if s > 0]
    typical = float(np.median(stds)) if stds else 0.0
    reasons = []
    for pair, m in zip(pairs, found, strict=True):
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
    for k, (pair, m) in enumerate(zip(pairs, found, strict=True)):
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
            beyond=_beyond(pair, m, reason, radius),
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


def _beyond(pair: Pair, m: Measurement, reason: str, radius: float) -> float | None:
    """How far the better match of a link rejected at ``max_shift`` lies (None otherwise)."""
    if "max_shift" not in reason:
        return None
    far = [float(np.abs(s - pair.nominal).max()) for s in (m.outside_shift, m.shift)
           if s is not None]
    far = [d for d in far if d > radius]
    return max(far) if far else OUTSIDE_REACH * radius


def _refuse_no_link(report: RegistrationReport, channel: int, allow: bool) -> None:
    """Raise when tiles overlap but no link (over image content) was accepted."""
    s = report.summary
    empty = sum(not lk.accepted and "empty" in lk.reason for lk in report.links)
    if s["links_accepted"] or s["links_tried"] == empty or allow:
        return  # allowed: RegistrationReport.advice says it, as a warning
    hint = report.window_hint()
    radius = (f"--max-shift, e.g. {hint[2]}" if hint else
              f"--max-shift, now {report.max_shift:.0f} px")
    raise InputError(
        f"registration accepted 0 of {s['links_tried']} links ({report.rejections()}): the "
        "tiles do not match where the layout puts them, so the mosaic would be scrambled. "
        f"Check the tile order (--order), the overlap (--overlap), the search radius ({radius})"
        f" and the channel (--channel, now {channel}); or fuse at the stage positions "
        "(--keep-stage-positions, allow_stage_positions=True)"
    )


def _log_fallbacks(report: RegistrationReport) -> None:
    stage = [t for t in report.tiles if t.placed_by == "stage"]
    if stage:
        names = ", ".join(t.name for t in stage[:10]) + (" ..." if len(stage) > 10 else "")
        log.warning("%d of %d tiles have no accepted link to the main group and keep their "
                    "stage positions (moved with the rest): %s", len(stage), len(report.tiles),
                    names)
    advice = report.advice()
    for line in report.summary_lines():
        log.log(logging.WARNING if line in advice else logging.INFO, "%s", line)
