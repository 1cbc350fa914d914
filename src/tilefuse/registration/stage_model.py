"""The stage model: how stage positions map to camera pixels, learned from the linked tiles.

Stages are miscalibrated against cameras: the camera is mounted at a small angle to the stage
axes and the stated pixel size (or the stage's step) is off by a few percent. Every tile the
links place measures that miscalibration, so :func:`fit_stage_model` fits an affine map
``position ~ matrix @ stage + translation`` to the tiles of the main linked group (their solved
positions against their stage positions) by robust least squares (Huber weights), and
:meth:`StageModel.place` puts every tile without an accepted link where the model says.

Only the lateral axes (y, x) are fitted; z keeps the stage's scale. What is fitted depends on
what the linked tiles determine: a full affine (rotation, scale per axis, shear) when they span
both lateral axes with room to spare, a similarity (rotation and one scale) when they lie on a
line (a strip, or a single link: two numbers, the angle and length of that one offset), nothing
with fewer than two tiles. The model is *used* only when it differs from the stage (the identity)
by more than its own uncertainty (chi-square of the difference, ``SIGNIFICANCE``); otherwise tiles
keep their stage positions relative to the rest, as without a model.

Examples
--------
>>> import numpy as np
>>> stage = np.array([[0.0, 0.0], [0.0, 100.0], [100.0, 0.0], [100.0, 100.0]])
>>> model = fit_stage_model(stage, stage * 1.03)
>>> model.kind, round(model.scale_percent[0], 2), abs(round(model.angle_deg, 3))
('affine', 3.0, 0.0)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["SIGNIFICANCE", "StageModel", "fit_stage_model"]

log = logging.getLogger(__name__)

SIGNIFICANCE = 25.0
"""Chi-square (in parameter standard deviations) a fitted model must differ from the stage by."""
STAGE_NOISE_FLOOR = 0.5
"""Smallest per-tile stage scatter assumed, pixels (whole-pixel stage readings)."""
MIN_SPREAD = 0.2
"""Smallest ratio of the stage positions' two lateral spreads for a full affine fit."""
HUBER = 1.345
TUKEY = 4.685
HUBER_ROUNDS = 5
ROBUST_ROUNDS = 20


@dataclass(frozen=True)
class StageModel:
    """A fitted stage-to-camera map: ``position = matrix @ stage + translation`` (zyx pixels).

    Attributes
    ----------
    kind : {"affine", "similarity", "none"}
        What the linked tiles determined.
    matrix : numpy.ndarray, shape (ndim, ndim)
        Linear part; identity in z.
    translation : numpy.ndarray, shape (ndim,)
    used : bool
        Whether tiles without an accepted link are placed by the model (it differs from the
        stage by more than its uncertainty).
    tiles : int
        Linked tiles the fit used.
    residual_rms, residual_max : float
        Distance of those tiles from the model, pixels (robust fit: outliers included here).
    chi2 : float
        Squared difference of the linear part from the identity, in units of its covariance.
    pixel_size : tuple of float or None
        The stated pixel size (zyx) when the layout had one.
    """

    kind: str = "none"
    matrix: np.ndarray = field(default_factory=lambda: np.eye(2))
    translation: np.ndarray = field(default_factory=lambda: np.zeros(2))
    used: bool = False
    tiles: int = 0
    residual_rms: float = float("nan")
    residual_max: float = float("nan")
    chi2: float = 0.0
    pixel_size: tuple[float, ...] | None = None

    @property
    def lateral(self) -> np.ndarray:
        """The (y, x) block of :attr:`matrix`, shape (2, 2)."""
        return np.asarray(self.matrix)[-2:, -2:]

    @property
    def angle_deg(self) -> float:
        """Rotation of the camera's offsets against the stage's, degrees (as ``--rotate``)."""
        m = self.lateral
        return math.degrees(math.atan2(m[1, 0] - m[0, 1], m[0, 0] + m[1, 1]))

    @property
    def scale(self) -> tuple[float, float]:
        """Camera pixels per stage pixel along the stage's y and x axes."""
        m = self.lateral
        return float(np.linalg.norm(m[:, 0])), float(np.linalg.norm(m[:, 1]))

    @property
    def scale_percent(self) -> tuple[float, float]:
        """How far the camera's offsets differ from the stage's, percent, (y, x)."""
        return tuple(100.0 * (s - 1.0) for s in self.scale)  # type: ignore[return-value]

    @property
    def shear_deg(self) -> float:
        """How far the stage's axes are from perpendicular in camera pixels, degrees."""
        m = self.lateral
        cos = float(m[:, 0] @ m[:, 1]) / max(float(np.prod(self.scale)), 1e-12)
        return math.degrees(math.asin(float(np.clip(cos, -1.0, 1.0))))

    def corrected_pixel_size(self) -> tuple[float, ...] | None:
        """The pixel size (zyx) that would make the stage positions agree with the images.

        Stage positions in physical units are divided by the pixel size; the images say they
        move ``scale`` camera pixels per stage pixel, so the pixel size should be the stated one
        divided by ``scale`` (z kept). None without a stated pixel size or a model.
        """
        if self.pixel_size is None or self.kind == "none":
            return None
        size = list(self.pixel_size)
        sy, sx = self.scale
        size[-2] /= sy
        size[-1] /= sx
        return tuple(float(v) for v in size)

    def predict(self, stage: np.ndarray) -> np.ndarray:
        """Model positions of stage positions, shape (n, ndim)."""
        stage = np.asarray(stage, dtype=np.float64)
        return stage @ np.asarray(self.matrix).T + np.asarray(self.translation)

    def to_dict(self) -> dict:
        """JSON-ready description (also what the report writes under ``"stage_model"``)."""
        corrected = self.corrected_pixel_size()
        return {
            "kind": self.kind,
            "used": self.used,
            "tiles": self.tiles,
            "matrix": np.asarray(self.matrix).tolist(),
            "translation": np.asarray(self.translation).tolist(),
            "angle_deg": self.angle_deg,
            "scale_percent": list(self.scale_percent),
            "shear_deg": self.shear_deg,
            "residual_rms": self.residual_rms,
            "residual_max": self.residual_max,
            "chi2": self.chi2,
            "pixel_size": None if self.pixel_size is None else list(self.pixel_size),
            "corrected_pixel_size": None if corrected is None else list(corrected),
        }

    @classmethod
    def from_dict(cls, data: dict) -> StageModel:
        """Rebuild a model written by :meth:`to_dict`."""
        def number(v):
            return float("nan") if v is None else float(v)

        size = data.get("pixel_size")
        return cls(str(data.get("kind", "none")), np.asarray(data["matrix"], dtype=np.float64),
                   np.asarray(data["translation"], dtype=np.float64), bool(data.get("used")),
                   int(data.get("tiles", 0)), number(data.get("residual_rms")),
                   number(data.get("residual_max")), float(data.get("chi2") or 0.0),
                   None if size is None else tuple(float(v) for v in size))

    def summary_line(self) -> str:
        """One line for people: the angle and scale, and what the metadata got wrong."""
        if self.kind == "none":
            return "stage model: too few linked tiles to fit one"
        sy, sx = self.scale_percent
        scale = (f"scale {sy:+.2f} %" if self.kind == "similarity" or abs(sy - sx) < 0.005
                 else f"scale y {sy:+.2f} % x {sx:+.2f} %")
        what = ("one direction" if self.kind == "similarity"
                else f"shear {self.shear_deg:+.2f} deg")
        line = (f"stage model ({self.kind}, {self.tiles} tiles): rotated "
                f"{self.angle_deg:+.3f} deg, {scale}, {what}, rms {self.residual_rms:.2f} px")
        corrected = self.corrected_pixel_size()
        stated = self.pixel_size
        if corrected is not None and stated is not None and max(abs(sy), abs(sx)) >= 0.1:
            line += (f"; pixel size by the stage {', '.join(f'{v:.4g}' for v in corrected[-2:])}"
                     f" (stated {', '.join(f'{v:.4g}' for v in stated[-2:])})")
        if not self.used:
            line += "; not significant, unused"
        return line

    def place(self, stage: np.ndarray, positions: np.ndarray, component: np.ndarray,
              main_size: int) -> np.ndarray:
        """Move every group of tiles outside the main one to where the model puts it.

        Parameters
        ----------
        stage, positions : numpy.ndarray, shape (n_tiles, ndim)
            Stage positions and solved positions.
        component : numpy.ndarray, shape (n_tiles,), int
            Linked group of each tile; 0 is the main one.
        main_size : int
            Tiles in group 0 (a group of one is no main group: nothing is moved).

        Returns
        -------
        numpy.ndarray, shape (n_tiles, ndim)
            Each other group shifted as a whole so that its mean position is the model's.
        """
        out = np.array(positions, dtype=np.float64)
        if not self.used or main_size < 2:
            return out
        target = self.predict(stage)
        for c in np.unique(component):
            if c == 0:
                continue
            members = component == c
            out[members] += (target[members] - out[members]).mean(axis=0)
        return out


def _similarity_design(centred: np.ndarray) -> np.ndarray:
    """Design rows for ``[a, b]`` in ``[[a, -b], [b, a]] @ (y, x)``: shape (2 n, 2)."""
    y, x = centred[:, 0], centred[:, 1]
    rows = np.empty((2 * len(centred), 2))
    rows[0::2] = np.stack([y, -x], axis=1)
    rows[1::2] = np.stack([x, y], axis=1)
    return rows


def _affine_design(centred: np.ndarray) -> np.ndarray:
    """Design rows for ``[m00, m01, m10, m11]`` in ``m @ (y, x)``: shape (2 n, 4)."""
    n = len(centred)
    rows = np.zeros((2 * n, 4))
    rows[0::2, 0:2] = centred
    rows[1::2, 2:4] = centred
    return rows


def _to_matrix(kind: str, beta: np.ndarray) -> np.ndarray:
    if kind == "similarity":
        a, b = beta
        return np.array([[a, -b], [b, a]])
    return beta.reshape(2, 2)


def fit_stage_model(stage: np.ndarray, positions: np.ndarray, *,
                    pixel_size: tuple[float, ...] | None = None) -> StageModel:
    """Fit ``positions ~ matrix @ stage + translation`` robustly over linked tiles.

    Parameters
    ----------
    stage : numpy.ndarray, shape (n, ndim)
        Stage positions of the tiles of the main linked group, pixels (zyx).
    positions : numpy.ndarray, shape (n, ndim)
        Their solved positions.
    pixel_size : tuple of float, optional
        The layout's stated pixel size (zyx), for :meth:`StageModel.corrected_pixel_size`.

    Returns
    -------
    StageModel
        ``kind`` "none" (identity, unused) with fewer than two tiles.
    """
    stage = np.asarray(stage, dtype=np.float64)
    positions = np.asarray(positions, dtype=np.float64)
    n, ndim = stage.shape
    eye = np.eye(ndim)
    if n < 2:
        return StageModel("none", eye, np.zeros(ndim), tiles=n, pixel_size=pixel_size)
    centre_s, centre_p = stage.mean(axis=0), positions.mean(axis=0)
    lat_s, lat_p = stage[:, -2:] - centre_s[-2:], positions[:, -2:] - centre_p[-2:]
    spread = np.linalg.svd(lat_s, compute_uv=False)
    if spread[0] <= 1e-9:
        return StageModel("none", eye, centre_p - centre_s, tiles=n, pixel_size=pixel_size)
    kind = "affine" if n >= 4 and spread[1] >= MIN_SPREAD * spread[0] else "similarity"
    linear = _similarity_design(lat_s) if kind == "similarity" else _affine_design(lat_s)
    intercept = np.tile(np.eye(2), (n, 1))  # the translation is fitted robustly too
    design = np.hstack([linear, intercept])
    target = lat_p.reshape(-1)
    weights = np.ones(n)
    for step in range(ROBUST_ROUNDS):  # Huber weights first, then Tukey's (outliers: 0)
        w = np.repeat(np.sqrt(weights), 2)
        beta = np.linalg.lstsq(design * w[:, None], target * w, rcond=None)[0]
        resid = np.linalg.norm((target - design @ beta).reshape(n, 2), axis=1)
        scale = max(1.4826 * float(np.median(resid)), STAGE_NOISE_FLOOR / 2)
        if step < HUBER_ROUNDS:
            new = np.minimum(1.0, HUBER * scale / np.maximum(resid, 1e-12))
        else:
            new = np.clip(1 - (resid / (TUKEY * scale)) ** 2, 0, None) ** 2
        if step >= HUBER_ROUNDS and np.allclose(new, weights, atol=1e-6):
            break
        weights = new
    k = linear.shape[1]
    matrix = eye.copy()
    matrix[-2:, -2:] = _to_matrix(kind, beta[:k])
    translation = centre_p - matrix @ centre_s
    translation[-2:] += beta[k:]
    dof = max(2 * n - design.shape[1], 0)
    sigma = math.sqrt(float(np.sum(weights * resid**2)) / dof) if dof else 0.0
    sigma = max(sigma, STAGE_NOISE_FLOOR)
    identity = np.array([1.0, 0.0]) if kind == "similarity" else np.eye(2).ravel()
    cov = np.linalg.pinv(design.T @ design)[:k, :k] * sigma**2
    diff = beta[:k] - identity
    chi2 = float(diff @ np.linalg.pinv(cov) @ diff)
    model = StageModel(kind, matrix, translation, chi2 > SIGNIFICANCE, n,
                       float(np.sqrt(np.mean(resid**2))), float(resid.max()), chi2, pixel_size)
    log.info("%s", model.summary_line())
    return model
