"""Registration: refine tile positions from the pixels of their overlaps.

:func:`register` finds the neighbouring tiles of a layout, measures the shift of every pair in
parallel threads (:mod:`~tilefuse.registration.pairwise`), accepts the links whose correlation
clears a threshold learned from random non-overlapping crops (the chance level, within fixed
bounds), and places all tiles by a weighted least-squares solve that drops inconsistent links
(:mod:`~tilefuse.registration.solve`). Only translations change; the linear part of each affine
is kept. Candidate pairs are those that could overlap once moved by the search radius.

A stage model (:mod:`~tilefuse.registration.stage_model`: rotation, scale per axis, shear) is
fitted to the linked tiles; when it differs significantly from the stage, the rejected links are
measured again in small search windows centred where the model puts them (a second pass), and
tiles without an accepted link to the main group are placed by the model (else they keep their
stage positions, moved with the rest); a warning is logged either way. When no link is
accepted at all the tiles most likely do not match where the layout puts them (wrong order,
overlap or search radius): :func:`register` then raises :class:`~tilefuse.errors.InputError`
unless stage positions are explicitly allowed.
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
import time
from concurrent.futures import Executor
from dataclasses import replace

import numpy as np

from tilefuse.errors import InputError
from tilefuse.model.layout import Layout
from tilefuse.model.timeseries import TimeSeries
from tilefuse.registration._jobs import (
    SOLVE_LABEL,
    Progress,
    Runner,
    executor_for,
    measure_pair,
)
from tilefuse.registration._outcome import build_report, log_fallbacks, refuse_no_link
from tilefuse.registration.pairwise import (
    Measurement,
    Pair,
    find_pairs,
    make_pair,
    measure_crops,
)
from tilefuse.registration.report import LinkRecord, RegistrationReport, TileRecord
from tilefuse.registration.solve import Solution, link_weights, solve_positions
from tilefuse.registration.stage_model import StageModel, fit_stage_model
from tilefuse.registration.threshold import link_threshold, null_jobs, null_scores

__all__ = ["LinkRecord", "RegistrationReport", "StageModel", "TileRecord", "register",
           "register_series"]

log = logging.getLogger(__name__)

MAX_SHIFT_FRACTION = 0.15
MIN_MAX_SHIFT = 10.0
EMPTY_FRACTION = 0.1
SECOND_WINDOW_SIGMAS = 3.0
SECOND_WINDOW_MIN = 3.0


def register(
    layout: Layout,
    *,
    max_shift: float | None = None,
    channel: int = 0,
    min_overlap_px: int = 8,
    workers: int | None = None,
    downsample: int = 1,
    allow_stage_positions: bool = False,
    progress: Progress | None = None,
    executor: Executor | None = None,
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
        Threads measuring pairs; default ``os.cpu_count()``. With ``executor``: how many jobs
        it runs at once (sizes the submission window).
    downsample : int
        Search overlaps binned ``downsample`` x ``downsample`` in y and x (z is kept), then
        refine each shift at full resolution within ``downsample + 1`` px of that estimate:
        for large tiles far less work per pair, while shifts, positions and residuals keep
        full-resolution quality (see ``benchmarks/bench_pairs.py``). Every value in, and in
        the report, is in full-resolution pixels.
    allow_stage_positions : bool
        When no link is accepted, return the stage positions (with a warning) instead of
        raising :class:`~tilefuse.errors.InputError`.
    progress : callable, optional
        ``progress(done, total, label)``: called as pairs are measured (label
        ``"registering pairs"``, the chance-level samples counted in) at most a few times a
        second, and around the solve (label ``"solving"``, ``total`` 0 while busy, then
        ``(1, 1)``).
    executor : concurrent.futures.Executor, optional
        Runs the pair measurements (e.g. ``distributed.Client.get_executor()``): the jobs are
        module-level functions of plain data, tiles read by their source on the worker.
        Default: a local thread pool of ``workers`` threads.

    Returns
    -------
    registered : Layout
        The same tiles with refined translations (linear parts untouched).
    report : RegistrationReport
        With ``stage_model``: the stage-to-camera map fitted to the linked tiles, by which tiles
        without an accepted link are placed when it is significant (``placed_by == "model"``).

    Raises
    ------
    InputError
        ``channel``, ``max_shift``, ``min_overlap_px``, ``workers`` or ``downsample`` is out of
        range; or tiles overlap but not one link (leaving out those over empty background) is
        accepted, unless ``allow_stage_positions``. The message says how many links were
        tried, why they were rejected and what to try.
    """
    _check(layout, max_shift, channel, min_overlap_px, workers, downsample)
    near = find_pairs(layout, min_overlap_px)
    radius = default_max_shift(layout, near) if max_shift is None else float(max_shift)
    indices = find_pairs(layout, min_overlap_px, reach=radius)
    pairs = [make_pair(layout, a, b, math.ceil(radius)) for a, b in indices]
    log.info("registering %d tiles: %d candidate pairs (%d overlapping at the stage positions, "
             "the rest within max shift %.1f px)%s", len(layout.tiles), len(pairs), len(near),
             radius,
             f", searched at 1/{downsample} resolution, refined at full" if downsample > 1 else "")
    min_extent = max(2, int(min_overlap_px) // 2)
    measure = functools.partial(measure_crops, min_extent=min_extent, downsample=int(downsample))
    started = time.perf_counter()
    with executor_for(executor, workers) as (pool, count):
        runner = Runner(pool, count, progress)
        samples = null_jobs(layout, pairs, radius)
        runner.start(len(pairs) + len(samples))
        tiles = layout.tiles
        found = runner.run(measure_pair, ((tiles[p.a], tiles[p.b], p, channel, radius, measure)
                                          for p in pairs))
        null = null_scores(layout, samples, channel, radius, measure, runner)
    measured = time.perf_counter()
    threshold = link_threshold(null)
    reasons = _decide(layout, pairs, found, threshold, radius)
    if progress is not None:
        progress(0, 0, SOLVE_LABEL)
    solution = _solve(layout, pairs, found, reasons, radius)
    model, positions = _place_by_model(layout, solution)
    window = _second_window(model, radius)
    redo = [k for k, r in enumerate(reasons) if r and "empty" not in r] if window else []
    second: dict = {}
    if redo:
        guess = layout.with_positions(positions)
        again = [make_pair(guess, pairs[k].a, pairs[k].b, math.ceil(window)) for k in redo]
        with executor_for(executor, workers) as (pool, count):
            runner = Runner(pool, count, progress)
            runner.start(len(again))
            remeasured = runner.run(measure_pair, ((tiles[p.a], tiles[p.b], p, channel, window,
                                                    measure) for p in again))
        typical = _typical_std(found)
        gained = 0
        for k, pair, m in zip(redo, again, remeasured, strict=True):
            if not _reason(layout, pair, m, threshold, window, typical):
                pairs[k], found[k], reasons[k] = pair, m, ""
                gained += 1
        log.info("second pass, search windows of %.1f px centred by the stage model: %d of %d "
                 "rejected links re-measured and accepted", window, gained, len(redo))
        second = {"window": window, "tried": len(redo), "accepted": gained}
        if gained:
            solution = _solve(layout, pairs, found, reasons, radius)
            model, positions = _place_by_model(layout, solution)
    if progress is not None:
        progress(1, 1, SOLVE_LABEL)
    report = build_report(layout, pairs, found, reasons, solution, positions, model, threshold,
                          radius, len(null))
    report.downsample = int(downsample)
    report.second_pass = second
    report.timings = {"pairs": measured - started, "solve": time.perf_counter() - measured,
                      "pairs_measured": len(pairs) + len(samples)}
    refuse_no_link(report, channel, allow_stage_positions)
    log_fallbacks(report)
    return layout.with_positions(positions), report


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
        ``downsample``, ``progress``, ``executor``).

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


# ------------------------------------------------------------------------------------- decisions


def _decide(layout, pairs, found: list[Measurement], threshold: float, radius: float):
    """Why each link is rejected ("" when accepted)."""
    typical = _typical_std(found)
    reasons = []
    for pair, m in zip(pairs, found, strict=True):
        reasons.append(_reason(layout, pair, m, threshold, radius, typical))
    return reasons


def _typical_std(found: list[Measurement]) -> float:
    """Median standard deviation of the crops (what an overlap with content shows)."""
    stds = [s for m in found for s in (m.std_a, m.std_b) if s > 0]
    return float(np.median(stds)) if stds else 0.0


def _second_window(model: StageModel, radius: float) -> float:
    """Search radius of the second pass, centred by the model; 0 for no second pass.

    ``SECOND_WINDOW_SIGMAS`` times the model's scatter about the linked tiles plus a pixel,
    at least ``SECOND_WINDOW_MIN``; no second pass when that is no smaller than ``radius`` or
    the model is not significant.
    """
    if not model.used or not np.isfinite(model.residual_rms):
        return 0.0
    window = max(SECOND_WINDOW_MIN, SECOND_WINDOW_SIGMAS * model.residual_rms + 1)
    return window if window < radius else 0.0


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


def _place_by_model(layout: Layout, solution: Solution) -> tuple[StageModel, np.ndarray]:
    """Fit the stage model to the main linked group; place the other groups by it."""
    main = solution.component == 0
    size = int(main.sum())
    pixel_size = tuple(layout.pixel_size) if layout.pixel_size_known else None
    if size < 2:
        model = fit_stage_model(np.zeros((0, layout.ndim)), np.zeros((0, layout.ndim)),
                                pixel_size=pixel_size)
        return model, solution.positions
    stage = layout.positions
    model = fit_stage_model(stage[main], solution.positions[main], pixel_size=pixel_size)
    return model, model.place(stage, solution.positions, solution.component, size)
