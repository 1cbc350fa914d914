"""Cyclic imaging: every later cycle aligned to cycle 1 (CyCIF, CODEX, IBEX).

The slide is re-mounted between cycles, so a later cycle is offset and turned against cycle 1
as a whole. :func:`align_cycle` finds that global rigid model from binned overviews
(:mod:`~tilefuse.registration._cycle_global`), then refines each tile against the cycle-1
pixels it covers (:mod:`~tilefuse.registration._cycle_tiles`): cycle 1's tiles are resampled
(cubic splines) onto the tile's own pixel grid as the model places it, the pairwise matcher
(:func:`~tilefuse.registration.pairwise.measure_crops`) finds the remaining shift, and a
least-squares warp fit (shift, residual rotation and scale, the cycles' gain and offset,
against cycle 1 sampled straight from its tiles) makes it sub-pixel. The model's rotation
(and scale) is then the median of the tiles' own, and its translation fits their centres; a
tile that cannot be measured, scores low or lands far from the model is placed by the model
and reported.

Out of core: a job reads one tile and the few cycle-1 tiles around it; the only whole-mosaic
arrays are the two overviews of at most ``OVERVIEW_MAX`` pixels a side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tilefuse.errors import InputError
from tilefuse.model.layout import Layout, Tile, translation_affine
from tilefuse.plan.geometry import tile_bounds
from tilefuse.registration._cycle_global import (
    GlobalEstimate,
    apply_rigid,
    estimate_global,
    rigid_parts,
    robust_rigid,
)
from tilefuse.registration._cycle_tiles import MIN_TILE_SCORE, UNSEEN, measure_tile
from tilefuse.registration._jobs import Progress, Runner, executor_for

__all__ = ["MIN_TILE_SCORE", "CycleAlignment", "CycleTileRecord", "align_cycle", "align_cycles",
           "alignment_channels", "reference_alignment"]

log = logging.getLogger(__name__)

MIN_ACCEPTED_FRACTION = 0.5
"""Smallest fraction of the tiles that see cycle 1 that must match it where the model puts
them; fewer, and the model is not credible."""
MIN_MAX_SHIFT = 8.0
"""Smallest default search radius of the per-tile refinement, pixels."""


@dataclass(frozen=True)
class CycleTileRecord:
    """How one tile of a cycle was placed.

    Attributes
    ----------
    index : int
        Tile index in the cycle's layout.
    name : str
    correction : tuple of float
        (y, x) px in the cycle-1 mosaic: the refinement on top of the global model.
    score : float or None
        Correlation of the match with cycle 1 (None: not measured, e.g. a flat tile).
    placed_by_model : bool
        True: an outlier or unmeasurable, kept where the global model puts it.
    reason : str
        "" when measured and accepted; else why not.
    """

    index: int
    name: str
    correction: tuple[float, ...]
    score: float | None
    placed_by_model: bool
    reason: str


@dataclass(frozen=True)
class CycleAlignment:
    """One cycle placed in cycle 1's mosaic frame.

    Attributes
    ----------
    cycle : int
        1-based cycle number (1: the reference, identity).
    layout : Layout
        The cycle's tiles, affines from tile pixel to cycle-1 mosaic pixel.
    matrix : numpy.ndarray, shape (3, 3)
        Global model: the cycle's stage frame -> cycle-1 mosaic.
    rotation_deg, scale : float
    offset : (float, float)
        (y, x) translation part of ``matrix``.
    tiles : tuple of CycleTileRecord
    channel : int
        Alignment channel index used in this cycle.
    details : dict
        How the global model was found (binning, patches, residual); informative.
    """

    cycle: int
    layout: Layout
    matrix: np.ndarray
    rotation_deg: float
    offset: tuple[float, float]
    scale: float
    tiles: tuple[CycleTileRecord, ...]
    channel: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def placed_by_model(self) -> list[int]:
        """Indices of the tiles kept at the global model."""
        return [t.index for t in self.tiles if t.placed_by_model]

    def to_dict(self) -> dict:
        """JSON-ready record (plain floats, lists and strings)."""
        return {
            "cycle": self.cycle, "channel": self.channel,
            "matrix": [[float(v) for v in row] for row in self.matrix],
            "rotation_deg": float(self.rotation_deg),
            "offset": [float(v) for v in self.offset], "scale": float(self.scale),
            "details": {k: (float(v) if isinstance(v, float | np.floating) else v)
                        for k, v in self.details.items()},
            "tiles": [{"index": t.index, "name": t.name,
                       "correction": [float(v) for v in t.correction],
                       "score": None if t.score is None else float(t.score),
                       "placed_by_model": t.placed_by_model, "reason": t.reason}
                      for t in self.tiles],
        }

    def summary_lines(self) -> list[str]:
        """A few human lines: the model, the tiles refined, the ones placed by the model."""
        if self.cycle == 1:
            return [f"cycle 1: reference ({len(self.tiles)} tiles, channel {self.channel})"]
        moved = [float(np.hypot(t.correction[0], t.correction[1])) for t in self.tiles
                 if not t.placed_by_model]
        lines = [f"cycle {self.cycle}: rotation {self.rotation_deg:+.3f} deg, offset "
                 f"({self.offset[0]:+.1f}, {self.offset[1]:+.1f}) px"
                 + (f", scale {self.scale:.4f}" if self.scale != 1.0 else "")
                 + f", channel {self.channel}",
                 f"cycle {self.cycle}: {len(moved)} of {len(self.tiles)} tiles refined against "
                 f"cycle 1" + (f" (median correction {np.median(moved):.2f} px)" if moved else "")]
        lines += [f"cycle {self.cycle}: {t.name} placed by the cycle's model: {t.reason}"
                  for t in self.tiles if t.placed_by_model]
        return lines


def align_cycles(layouts: Sequence[Layout], *,
                 channel: int | str | Sequence[int | str] = 0,
                 max_shift: float | None = None, allow_scale: bool = False,
                 workers: int | None = None, executor: Executor | None = None,
                 progress: Progress | None = None, names: Sequence[str] | None = None,
                 message: Callable[[str], None] | None = None) -> list[CycleAlignment]:
    """Place every later cycle's tiles in cycle 1's mosaic frame: the alignment of
    ``tilefuse fuse CYCLE1 CYCLE2 ...``, for Python.

    >>> cycle1, report = tilefuse.register(cycle1)               # optional, as --register
    >>> aligned = tilefuse.align_cycles([cycle1, cycle2, cycle3], channel="DAPI")
    >>> mosaic = tilefuse.fuse_cycles([a.layout for a in aligned])

    Parameters
    ----------
    layouts : sequence of Layout
        One per cycle, cycle 1 first (as it will be fused: registered if wanted), later cycles
        at their stage positions; 2D, one dtype, one pixel size (within 1%).
    channel : int, str, or a sequence of them
        The channel every cycle shares (the nuclei stain), by index or name: one for all
        cycles, or one per cycle.
    max_shift, allow_scale, workers, executor, progress
        As in :func:`align_cycle`.
    names : sequence of str, optional
        What each cycle was read from: errors name it.
    message : callable, optional
        ``message(text)`` is told each later cycle's summary as it is aligned.

    Returns
    -------
    list of CycleAlignment
        One per cycle, cycle 1's the identity; each ``.layout`` is the cycle placed in cycle
        1's frame (for :func:`tilefuse.fuse_cycles`), ``.summary_lines()`` says what was done.

    Raises
    ------
    InputError
        As :func:`tilefuse.fusion.cycles.check_cycles`, :func:`alignment_channels` and
        :func:`align_cycle` (naming the cycle, and its input when `names` are given).
    """
    from tilefuse.fusion.cycles import check_cycles

    layouts = list(layouts)
    check_cycles(layouts, names)
    given = [channel] if isinstance(channel, (int, str)) else list(channel)
    channels = alignment_channels(layouts, given, paths=names)
    found = [reference_alignment(layouts[0], channel=channels[0])]
    for k, cycle in enumerate(layouts[1:], start=2):
        if progress is not None:
            progress(0, 0, f"aligning cycle {k}")
        try:
            one = align_cycle(layouts[0], cycle, cycle_number=k, reference_channel=channels[0],
                              channel=channels[k - 1], max_shift=max_shift,
                              allow_scale=allow_scale, workers=workers, executor=executor,
                              progress=progress)
        except InputError as exc:
            if not names:
                raise
            raise InputError(f"cycle {k} ({names[k - 1]}): {exc}") from exc
        if message is not None:
            message("\n".join(one.summary_lines()))
        found.append(one)
    return found


def alignment_channels(layouts: Sequence[Layout], given: Sequence[int | str], *,
                       paths: Sequence[str] | None = None,
                       option: str = "alignment channel") -> tuple[int, ...]:
    """Each cycle's alignment channel index, from none (channel 0), one (for every cycle) or
    one per cycle, each a channel name or index.

    Parameters
    ----------
    layouts : sequence of Layout
        One per cycle.
    given : sequence of int or str
        Channel indices (int) or names (str; a name that is not a channel but a number is an
        index).
    paths : sequence of str, optional
        What each cycle was read from, for the messages.
    option : str
        How messages name the setting (the CLI's ``--align-channel``).

    Raises
    ------
    InputError
        A count that is neither one nor one per cycle; a name or index a cycle does not have
        (naming the cycle and its channels).
    """
    values = list(given) or [0]
    if len(values) == 1:
        values *= len(layouts)
    if len(values) != len(layouts):
        raise InputError(f"{option} gives {len(values)} channels for {len(layouts)} cycles; "
                         "give one (for all) or one per cycle")
    out = []
    for k, (value, layout) in enumerate(zip(values, layouts, strict=True), start=1):
        names, text = layout.channels, str(value)
        if isinstance(value, int) and 0 <= value < len(names):  # an index, whatever the names
            out.append(value)
        elif text in names:
            out.append(names.index(text))
        elif text.isdigit() and int(text) < len(names):
            out.append(int(text))
        else:
            where = f" ({paths[k - 1]})" if paths else ""
            raise InputError(f"{option} {text}: cycle {k}{where} has no such channel; its "
                             f"channels are {', '.join(names)} (0..{len(names) - 1})")
    return tuple(out)


def reference_alignment(reference: Layout, *, channel: int = 0) -> CycleAlignment:
    """Cycle 1's record: identity model, every tile as it is."""
    _check(reference, channel, "cycle 1")
    records = tuple(CycleTileRecord(i, t.name, (0.0, 0.0), None, False, "")
                    for i, t in enumerate(reference.tiles))
    return CycleAlignment(1, reference, np.eye(3), 0.0, (0.0, 0.0), 1.0, records, channel)


def _check(layout: Layout, channel: int, what: str) -> None:
    where = f" ({layout.origin})" if layout.origin else ""
    if layout.ndim != 2:
        raise InputError(f"{what}{where} is {layout.ndim}D; cycle alignment takes 2D tiles "
                         "(y, x) only")
    if not 0 <= channel < len(layout.channels):
        raise InputError(f"{what}{where}: alignment channel {channel} does not exist; it has "
                         f"{len(layout.channels)} channel(s) {list(layout.channels)}")


def align_cycle(reference: Layout, cycle: Layout, *, cycle_number: int,
                reference_channel: int = 0, channel: int = 0,
                max_shift: float | None = None, allow_scale: bool = False,
                workers: int | None = None, executor: Executor | None = None,
                progress: Progress | None = None) -> CycleAlignment:
    """Place a later cycle's tiles in cycle 1's mosaic frame.

    Parameters
    ----------
    reference : Layout
        Cycle 1 as it will be fused (registered if asked).
    cycle : Layout
        The later cycle, tiles at their stage positions.
    cycle_number : int
        1-based, for messages and the record.
    reference_channel, channel : int
        Alignment channel index in cycle 1 and in this cycle (the shared nuclei stain).
    max_shift : float, optional
        Largest per-tile correction on top of the global model, pixels; default a few pixels
        beyond the model's residual spread (at least ``MIN_MAX_SHIFT``).
    allow_scale : bool
        Let the global model scale as well as turn and shift.
    workers, executor :
        Per-tile jobs run on ``executor``, or a thread pool of ``workers``.
    progress : callable, optional
        ``progress(done, total, label)``.

    Returns
    -------
    CycleAlignment

    Raises
    ------
    InputError
        A 3D layout, a missing channel, or no credible global model (no overlap with cycle 1,
        too few consistent measurements).
    """
    label = f"aligning cycle {cycle_number}"
    _check(reference, reference_channel, "cycle 1")
    _check(cycle, channel, f"cycle {cycle_number}")
    if max_shift is not None and not max_shift > 0:
        raise InputError(f"max_shift {max_shift} must be a positive number of pixels")
    with executor_for(executor, workers) as (pool, count):
        runner = Runner(pool, count, progress)
        estimate = estimate_global(reference, cycle, reference_channel=reference_channel,
                                   channel=channel, allow_scale=allow_scale, runner=runner,
                                   label=label)
        if isinstance(estimate, str):
            raise InputError(
                f"cycle {cycle_number}: no credible alignment to cycle 1: {estimate}. Check that "
                f"it images the same area as cycle 1 and that alignment channel {channel} "
                f"(cycle 1: {reference_channel}) shows the same structures in both")
        radius = (float(max_shift) if max_shift is not None
                  else max(MIN_MAX_SHIFT, 3 * estimate.rms + 2 * estimate.factor))
        runner.start(len(cycle.tiles), label)
        jobs = _tile_jobs(reference, list(cycle.tiles), estimate.matrix @ cycle.affines,
                          channel, reference_channel, radius)
        found = runner.run(measure_tile, jobs)
        matrix, stage, measured = _refit_to_tiles(cycle, estimate, found, radius, allow_scale)
    out = _finish(cycle, cycle_number, estimate, matrix, stage, measured, found, radius,
                  allow_scale, channel)
    seeing = [t for t in out.tiles if not t.reason.startswith(UNSEEN)]
    accepted = [t for t in seeing if not t.placed_by_model]
    if len(accepted) < max(1.0, MIN_ACCEPTED_FRACTION * len(seeing)):
        raise InputError(
            f"cycle {cycle_number}: no credible alignment to cycle 1: only {len(accepted)} of "
            f"{len(seeing)} tiles match cycle 1 where the global model puts them. Check that it "
            f"images the same area as cycle 1 and that alignment channel {channel} (cycle 1: "
            f"{reference_channel}) shows the same structures in both")
    for line in out.summary_lines():
        log.info("%s", line)
    return out


def _tile_jobs(reference: Layout, tiles: list[Tile], places: np.ndarray, channel: int,
               reference_channel: int, radius: float) -> list[tuple]:
    shapes = np.array([t.shape for t in reference.tiles], dtype=float)
    ref_lo, ref_hi = tile_bounds(reference.affines, shapes)
    lo, hi = tile_bounds(places, np.array([t.shape for t in tiles], dtype=float))
    jobs = []
    for tile, place, a, b in zip(tiles, places, lo, hi, strict=True):
        near = np.all((ref_lo <= b + radius) & (ref_hi >= a - radius), axis=1)
        neighbours = [reference.tiles[j] for j in np.flatnonzero(near)]
        jobs.append((tile, channel, place, neighbours, reference_channel, radius))
    return jobs


def _centres(cycle: Layout) -> list[np.ndarray]:
    return [(np.asarray(t.shape, dtype=float) - 1) / 2 for t in cycle.tiles]


def _refit_to_tiles(cycle: Layout, estimate: GlobalEstimate, found: list, radius: float,
                    allow_scale: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model refitted to the tiles' measurements; their stage and measured centres (n, 2)."""
    first = estimate.matrix @ cycle.affines
    centres = _centres(cycle)
    stage = np.array([apply_rigid(a, c) for a, c in zip(cycle.affines, centres, strict=True)])
    measured = np.full(stage.shape, np.nan)
    turns = []
    for i, (shift, _score, turn) in enumerate(found):
        if shift is not None:
            measured[i] = apply_rigid(first[i], centres[i] + shift)
            if turn is not None:
                turns.append(turn)
    return _refit(estimate, stage, measured, turns, allow_scale, radius), stage, measured


def _refit(estimate: GlobalEstimate, stage: np.ndarray, measured: np.ndarray, turns: list,
           allow_scale: bool, radius: float) -> np.ndarray:
    """The global model refitted to the measured tiles.

    The rotation (and scale) comes from the tiles' own residual turns (the warp fit of each),
    which stage errors do not disturb; the translation from the tiles' centres, robustly. With no
    turns measured, a rigid fit to the centres; with fewer than three tiles, the estimate.
    """
    ok = np.all(np.isfinite(measured), axis=1)
    if turns:
        w, a = np.median(np.array(turns), axis=0)
        c, s = np.cos(w), np.sin(w)
        linear = (1 + (a if allow_scale else 0.0)) * np.array([[c, -s], [s, c]])
        linear = linear @ estimate.matrix[:2, :2]
        offsets = measured[ok] - stage[ok] @ linear.T
        centre = np.median(offsets, axis=0)
        near = np.hypot(*(offsets - centre).T) <= radius
        matrix = np.eye(3)
        matrix[:2, :2] = linear
        matrix[:2, 2] = offsets[near].mean(axis=0) if near.any() else centre
        return matrix
    if ok.sum() >= 3:
        model, agree = robust_rigid(stage[ok], measured[ok], allow_scale, radius)
        if agree.sum() >= 3:
            return model
    return estimate.matrix


def _finish(cycle: Layout, number: int, estimate: GlobalEstimate, matrix: np.ndarray,
            stage: np.ndarray, measured: np.ndarray, found: list, radius: float,
            allow_scale: bool, channel: int) -> CycleAlignment:
    """Place the measured tiles where they were measured, the others by the model; record."""
    centres = _centres(cycle)
    off = np.hypot(*(stage @ matrix[:2, :2].T + matrix[:2, 2] - measured).T)
    affines, records = [], []
    for i, tile in enumerate(cycle.tiles):
        shift, score, reason = found[i]
        model_place = matrix @ cycle.affines[i]
        accepted = bool(off[i] <= radius)  # False for nan: not measured
        if accepted:
            correction = measured[i] - apply_rigid(model_place, centres[i])
            affines.append(translation_affine(correction) @ model_place)
            reason = ""
        else:
            correction = np.zeros(2)
            if shift is not None:
                reason = (f"its match lands {off[i]:.1f} px from the cycle's model (more than "
                          f"{radius:.1f})")
            affines.append(model_place)
        records.append(CycleTileRecord(i, tile.name, tuple(float(v) for v in correction),
                                       score, not accepted, str(reason)))
    rotation, scale = rigid_parts(matrix)
    if not allow_scale:
        scale = 1.0
    details = {"binning": estimate.factor, "overview_score": estimate.score,
               "patches_tried": estimate.patches, "patches_matched": estimate.measured,
               "patches_agreeing": estimate.agreeing, "patch_rms_px": estimate.rms,
               "max_shift_px": radius, "tiles_turn_measured": sum(
                   isinstance(f[2], np.ndarray) for f in found)}
    out = CycleAlignment(number, cycle.with_affines(np.stack(affines)), matrix, rotation,
                         (float(matrix[0, 2]), float(matrix[1, 2])), scale, tuple(records),
                         channel, details)
    return out
