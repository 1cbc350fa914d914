"""What registration concluded: the report records, the refusal without links, the log lines.

Private helpers of :func:`tilefuse.registration.register`.
"""

from __future__ import annotations

import logging

import numpy as np

from tilefuse.errors import InputError
from tilefuse.model.layout import Layout
from tilefuse.registration.pairwise import OUTSIDE_REACH, Measurement, Pair
from tilefuse.registration.report import LinkRecord, RegistrationReport, TileRecord
from tilefuse.registration.solve import Solution
from tilefuse.registration.stage_model import StageModel

__all__ = ["build_report", "log_fallbacks", "refuse_no_link"]

log = logging.getLogger("tilefuse.registration")



def build_report(layout: Layout, pairs: list[Pair], found: list[Measurement], reasons: list[str],
                 solution: Solution, positions: np.ndarray, model: StageModel, threshold: float,
                 radius: float, n_null: int) -> RegistrationReport:
    """The report of a registration; ``positions`` are the final ones (after the model)."""
    stage = layout.positions
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
            placed_by="image" if by_image else ("model" if model.used else "stage"),
            component=comp,
        ))
    return RegistrationReport(links, tiles, threshold, radius, solution.limit, n_null,
                              stage_model=model.to_dict())


def _beyond(pair: Pair, m: Measurement, reason: str, radius: float) -> float | None:
    """How far the better match of a link rejected at ``max_shift`` lies (None otherwise)."""
    if "max_shift" not in reason:
        return None
    far = [float(np.abs(s - pair.nominal).max()) for s in (m.outside_shift, m.shift)
           if s is not None]
    far = [d for d in far if d > radius]
    return max(far) if far else OUTSIDE_REACH * radius


def refuse_no_link(report: RegistrationReport, channel: int, allow: bool) -> None:
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


def log_fallbacks(report: RegistrationReport) -> None:
    """Warn about tiles placed without a link; log the summary lines."""
    for kind, how in (("stage", "keep their stage positions (moved with the rest)"),
                      ("model", "are placed by the fitted stage model")):
        placed = [t for t in report.tiles if t.placed_by == kind]
        if placed:
            names = ", ".join(t.name for t in placed[:10]) + (" ..." if len(placed) > 10 else "")
            log.warning("%d of %d tiles have no accepted link to the main group and %s: %s",
                        len(placed), len(report.tiles), how, names)
    advice = report.advice()
    for line in report.summary_lines():
        log.log(logging.WARNING if line in advice else logging.INFO, "%s", line)
