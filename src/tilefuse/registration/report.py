"""What registration did: every link tried, where every tile went, and a summary.

The report is plain data: :meth:`RegistrationReport.to_dict` / :meth:`~RegistrationReport.to_json`
write it, :meth:`~RegistrationReport.from_dict` / :meth:`~RegistrationReport.from_json` read it
back, and :meth:`~RegistrationReport.summary_lines` gives the few lines a command line prints.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field

from tilefuse.registration.stage_model import StageModel

__all__ = ["LinkRecord", "RegistrationReport", "TileRecord"]

_MAX_NAMES = 5
LOW_ACCEPTANCE = 0.5
HINT_MARGIN = 1.2
HINT_STEP = 5
TRY = ("check the tile order (--order), overlap (--overlap), search radius (--max-shift) and "
       "channel (--channel)")


def _clean(value):
    """JSON-safe copy: NaN and infinities become None, tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@dataclass
class LinkRecord:
    """One pair of overlapping tiles.

    Attributes
    ----------
    tiles : tuple of int
        Layout indices ``(i, j)``.
    names : tuple of str
        Tile names.
    nominal : list of float
        Stage ``position[j] - position[i]``, zyx pixels.
    measured : list of float or None
        Measured ``position[j] - position[i]``, zyx pixels; None when nothing was found.
    ncc : float or None
        Pearson correlation of the overlap at the measured shift.
    accepted : bool
        Whether the final solve used the link.
    reason : str
        Why the link was rejected; empty when accepted.
    residual : float or None
        ``|solved offset - measured|`` after the solve, pixels (also for rejected links).
    beyond : float or None
        Set when the link was rejected at the edge of the search window (``max_shift``): how
        far from the stage offset (pixels, largest axis) the better match lies, where the
        search looked beyond the window, else the reach of that look; None otherwise.
    """

    tiles: tuple[int, int]
    names: tuple[str, str]
    nominal: list[float]
    measured: list[float] | None
    ncc: float | None
    accepted: bool
    reason: str = ""
    residual: float | None = None
    beyond: float | None = None


@dataclass
class TileRecord:
    """Where one tile went.

    Attributes
    ----------
    index : int
    name : str
    position : list of float
        Final position, zyx pixels.
    stage_distance : float
        Distance from its stage (input) position, pixels.
    placed_by : str
        "image" (the tile belongs to the largest linked group), "model" (no accepted link to
        that group: placed by the stage model fitted to the linked tiles, see
        :mod:`~tilefuse.registration.stage_model`) or "stage" (no link and no significant
        model: its stage position, moved with the rest).
    component : int
        Group of linked tiles it belongs to; 0 is the largest.
    """

    index: int
    name: str
    position: list[float]
    stage_distance: float
    placed_by: str
    component: int = 0


@dataclass
class RegistrationReport:
    """Everything :func:`tilefuse.registration.register` measured and decided.

    Attributes
    ----------
    links : list of LinkRecord
    tiles : list of TileRecord
    threshold : float
        Correlation a link needed to be accepted.
    max_shift : float
        Largest accepted deviation of a link from its stage offset, pixels per axis.
    residual_limit : float
        Normalised residual (link standard deviations) above which the solve dropped the
        worst link.
    null_samples : int
        Number of random non-overlapping crop pairs behind the threshold.
    downsample : int
        Lateral binning the overlaps were searched at (1: full resolution); every link was
        then refined at full resolution.
    stage_model : dict
        :meth:`tilefuse.registration.stage_model.StageModel.to_dict`: the stage-to-camera map
        fitted to the linked tiles (angle, scale, corrected pixel size); empty when none.
    timings : dict
        Seconds spent measuring pairs (``"pairs"``) and solving (``"solve"``), and how many
        measurements the first (``"pairs_measured"``) made.
    second_pass : dict
        The links re-measured in search windows centred by the stage model: ``"window"``
        (radius, pixels), ``"tried"``, ``"accepted"``; empty when there was no second pass.
    """

    links: list[LinkRecord] = field(default_factory=list)
    tiles: list[TileRecord] = field(default_factory=list)
    threshold: float = float("nan")
    max_shift: float = float("nan")
    residual_limit: float = float("nan")
    null_samples: int = 0
    downsample: int = 1
    stage_model: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    second_pass: dict = field(default_factory=dict)

    @property
    def summary(self) -> dict:
        """Counts and residual statistics, JSON-ready."""
        residuals = [lk.residual for lk in self.links if lk.accepted and lk.residual is not None]
        by_stage = sum(t.placed_by == "stage" for t in self.tiles)
        by_model = sum(t.placed_by == "model" for t in self.tiles)
        model = self.stage_model or {}
        return {
            "links_tried": len(self.links),
            "links_accepted": sum(lk.accepted for lk in self.links),
            "tiles": len(self.tiles),
            "tiles_by_image": len(self.tiles) - by_stage - by_model,
            "tiles_by_stage": by_stage,
            "tiles_by_model": by_model,
            "stage_angle_deg": model.get("angle_deg"),
            "stage_scale_percent": model.get("scale_percent"),
            "residual_rms": math.sqrt(sum(r * r for r in residuals) / len(residuals))
            if residuals else None,
            "residual_max": max(residuals) if residuals else None,
            "threshold": self.threshold,
            "max_shift": self.max_shift,
        }

    def to_dict(self) -> dict:
        """Plain, JSON-safe dictionary (NaN written as None)."""
        out = {
            "summary": self.summary,
            "threshold": self.threshold,
            "max_shift": self.max_shift,
            "residual_limit": self.residual_limit,
            "null_samples": self.null_samples,
            "downsample": self.downsample,
            "stage_model": self.stage_model,
            "timings": self.timings,
            "second_pass": self.second_pass,
            "links": [asdict(lk) for lk in self.links],
            "tiles": [asdict(t) for t in self.tiles],
        }
        return _clean(out)

    def to_json(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as indented JSON to ``path``."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def from_dict(cls, data: dict) -> RegistrationReport:
        """Rebuild a report written by :meth:`to_dict`."""
        def number(v):
            return float("nan") if v is None else float(v)

        links = [
            LinkRecord(**{**lk, "tiles": tuple(lk["tiles"]), "names": tuple(lk["names"])})
            for lk in data.get("links", [])
        ]
        tiles = [TileRecord(**t) for t in data.get("tiles", [])]
        return cls(links, tiles, number(data.get("threshold")), number(data.get("max_shift")),
                   number(data.get("residual_limit")), int(data.get("null_samples", 0)),
                   int(data.get("downsample", 1)), dict(data.get("stage_model") or {}),
                   dict(data.get("timings") or {}), dict(data.get("second_pass") or {}))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> RegistrationReport:
        """Read a report written by :meth:`to_json`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def summary_lines(self) -> list[str]:
        """A few short lines for people: links, tiles, residuals, what fell back."""
        s = self.summary
        lines = [
            f"links: {s['links_accepted']} of {s['links_tried']} accepted "
            f"(ncc threshold {self.threshold:.2f}, max shift {self.max_shift:.1f} px"
            + (f", searched at 1/{self.downsample} resolution, refined at full)"
               if self.downsample > 1 else ")"),
            f"tiles: {s['tiles_by_image']} placed by image, "
            + (f"{s['tiles_by_model']} by the stage model, " if s["tiles_by_model"] else "")
            + f"{s['tiles_by_stage']} by stage position",
        ]
        if self.stage_model.get("kind", "none") != "none":
            lines.append(StageModel.from_dict(self.stage_model).summary_line())
        if s["residual_rms"] is not None:
            lines.append(f"residuals: rms {s['residual_rms']:.2f} px, "
                         f"max {s['residual_max']:.2f} px")
        if any(not lk.accepted for lk in self.links):
            lines.append("rejected: " + self.rejections())
        for kind, what in (("model", "the stage model"), ("stage", "stage position")):
            placed = [t.name for t in self.tiles if t.placed_by == kind]
            if placed:
                more = (f" and {len(placed) - _MAX_NAMES} more" if len(placed) > _MAX_NAMES
                        else "")
                lines.append(f"placed by {what}: " + ", ".join(placed[:_MAX_NAMES]) + more)
        return lines + self.advice()

    def rejections(self) -> str:
        """Rejected links by kind, most common first: "38 low correlation, 2 beyond max shift"."""
        reasons = Counter(_reason_kind(lk.reason) for lk in self.links if not lk.accepted)
        return ", ".join(f"{n} {k}" for k, n in reasons.most_common())

    def window_hint(self) -> tuple[int, float, int] | None:
        """Links rejected at the edge of the search window, and a ``max_shift`` that fits them.

        Returns
        -------
        (int, float, int) or None
            How many links hit the window, how far (pixels) the farthest better match lies from
            its stage offset, and a larger ``max_shift`` to try (``HINT_MARGIN`` times that, up
            to a multiple of ``HINT_STEP``); None when no link hit the window.
        """
        beyond = [lk.beyond for lk in self.links if lk.beyond is not None and not lk.accepted]
        if not beyond:
            return None
        far = max(beyond)
        larger = max(HINT_MARGIN * far, self.max_shift + HINT_STEP)
        return len(beyond), far, HINT_STEP * math.ceil(larger / HINT_STEP)

    def advice(self) -> list[str]:
        """What looks wrong and what to try: links beyond the window, few links accepted.

        An empty list when nothing does. Links rejected for empty background are not counted
        against the acceptance (sparse samples are normal).
        """
        lines = []
        hint = self.window_hint()
        if hint is not None:
            n, far, larger = hint
            lines.append(f"{n} link{'s' * (n > 1)} hit the edge of the search window (max shift "
                         f"{self.max_shift:.1f} px), best match{'es' * (n > 1)} up to "
                         f"{far:.0f} px from the stage offset: try --max-shift {larger}")
        s = self.summary
        empty = sum(not lk.accepted and "empty" in lk.reason for lk in self.links)
        judged = s["links_tried"] - empty
        if judged > 0 and s["links_accepted"] < LOW_ACCEPTANCE * judged:
            head = (f"only {s['links_accepted']} of {s['links_tried']} links accepted"
                    if s["links_accepted"] else
                    f"none of the {s['links_tried']} links accepted, tiles at their stage "
                    "positions")
            lines.append(f"{head} ({self.rejections()}): {TRY}")
        return lines


def _reason_kind(reason: str) -> str:
    """Short category of a rejection reason, for the summary."""
    for key, label in (
        ("empty", "empty background"),
        ("threshold", "low correlation"),
        ("max_shift", "beyond max shift"),
        ("overlap", "overlap too small"),
        ("global solve", "inconsistent (solve)"),
    ):
        if key in reason:
            return label
    return "other"
