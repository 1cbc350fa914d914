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

__all__ = ["LinkRecord", "RegistrationReport", "TileRecord"]

_MAX_NAMES = 5


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
    """

    tiles: tuple[int, int]
    names: tuple[str, str]
    nominal: list[float]
    measured: list[float] | None
    ncc: float | None
    accepted: bool
    reason: str = ""
    residual: float | None = None


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
        "image" (the tile belongs to the largest linked group) or "stage" (no accepted link to
        that group: its stage position, moved with the rest).
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
        Lateral binning the overlaps were compared at (1: full resolution).
    """

    links: list[LinkRecord] = field(default_factory=list)
    tiles: list[TileRecord] = field(default_factory=list)
    threshold: float = float("nan")
    max_shift: float = float("nan")
    residual_limit: float = float("nan")
    null_samples: int = 0
    downsample: int = 1

    @property
    def summary(self) -> dict:
        """Counts and residual statistics, JSON-ready."""
        residuals = [lk.residual for lk in self.links if lk.accepted and lk.residual is not None]
        by_stage = sum(t.placed_by == "stage" for t in self.tiles)
        return {
            "links_tried": len(self.links),
            "links_accepted": sum(lk.accepted for lk in self.links),
            "tiles": len(self.tiles),
            "tiles_by_image": len(self.tiles) - by_stage,
            "tiles_by_stage": by_stage,
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
                   int(data.get("downsample", 1)))

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
            + (f", measured at 1/{self.downsample} resolution)" if self.downsample > 1 else ")"),
            f"tiles: {s['tiles_by_image']} placed by image, "
            f"{s['tiles_by_stage']} by stage position",
        ]
        if s["residual_rms"] is not None:
            lines.append(f"residuals: rms {s['residual_rms']:.2f} px, "
                         f"max {s['residual_max']:.2f} px")
        reasons = Counter(_reason_kind(lk.reason) for lk in self.links if not lk.accepted)
        if reasons:
            lines.append("rejected: " + ", ".join(f"{n} {k}" for k, n in reasons.most_common()))
        stage = [t.name for t in self.tiles if t.placed_by == "stage"]
        if stage:
            more = f" and {len(stage) - _MAX_NAMES} more" if len(stage) > _MAX_NAMES else ""
            lines.append("placed by stage position: " + ", ".join(stage[:_MAX_NAMES]) + more)
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
