"""Per-tile refinement of a later cycle against cycle 1 (the jobs of ``align_cycle``).

:class:`Cycle1View` samples cycle 1 through the cubic splines of the cycle-1 tiles around one
tile of the later cycle, at any point of that tile's pixel frame; :func:`measure_tile` finds the
tile's shift with the pairwise matcher on cycle 1 resampled onto the tile's grid, and
:func:`fit_warp` refines it (Gauss-Newton, with a residual rotation and scale, and the cycles'
different exposures) against cycle 1 sampled straight from its tiles: one interpolation,
whatever the shift, so the estimate is not biased by resampling twice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from tilefuse.model.layout import Tile
from tilefuse.registration._jobs import pixels
from tilefuse.registration.pairwise import measure_crops
from tilefuse.registration.subpixel import noise_sigma

__all__ = ["MIN_SHARED_PX", "MIN_TILE_SCORE", "UNSEEN", "Cycle1View", "fit_warp",
           "measure_tile"]

MIN_TILE_SCORE = 0.5
"""Smallest correlation of a tile with cycle 1 that is accepted as a measurement."""
MIN_SHARED_PX = 32
"""Fewest pixels per axis of a tile that must see cycle 1 for it to be measured."""
UNSEEN = "sees cycle 1"
"""How the reason for a tile outside cycle 1 begins."""
_FLAT = 1.5  # a tile whose std is within this factor of its noise shows no structure
_SPLINE_MARGIN = 4
_FIT_MARGIN = 4  # px left out at the crops' edges by the warp fit
_FIT_MAX_PIXELS = 2**16  # points the warp fit uses at most (a regular subsample)
_FIT_ITERATIONS = 16
_FIT_TOL = 1e-4  # px: the warp fit stops when no point moves more
_FIT_TRAVEL = 1.5  # px the warp fit may move the search's shift


def _valid_box(valid: np.ndarray) -> tuple[slice, slice] | None:
    """A box of the tile where cycle 1 is seen everywhere, or None if it would be thinner than
    ``MIN_SHARED_PX``: the edge row or column with the most unseen pixels is peeled off, again
    and again.

    Parameters
    ----------
    valid : numpy.ndarray of bool, shape (y, x)

    Returns
    -------
    (slice, slice) or None
    """
    lo, hi = [0, 0], list(valid.shape)
    cols = valid.astype(np.int64)
    while hi[0] - lo[0] >= MIN_SHARED_PX and hi[1] - lo[1] >= MIN_SHARED_PX:
        box = cols[lo[0]:hi[0], lo[1]:hi[1]]
        bad = [box.shape[1] - box[0].sum(), box.shape[1] - box[-1].sum(),
               box.shape[0] - box[:, 0].sum(), box.shape[0] - box[:, -1].sum()]
        worst = int(np.argmax(bad))
        if bad[worst] == 0:
            return slice(lo[0], hi[0]), slice(lo[1], hi[1])
        axis, end = divmod(worst, 2)
        if end == 0:
            lo[axis] += 1
        else:
            hi[axis] -= 1
    return None


class Cycle1View:
    """Cycle 1 as seen from one tile's pixel grid: cubic splines of the cycle-1 tiles around.

    Parameters
    ----------
    place : numpy.ndarray, shape (3, 3)
        The tile's pixel -> cycle-1 mosaic.
    shape : (y, x)
        The tile's shape.
    neighbours : list of Tile
        The cycle-1 tiles that may cover it.
    channel : int
        Cycle 1's alignment channel.
    reach : float
        How far (tile px) beyond the tile's own pixels points may be asked for.
    """

    def __init__(self, place: np.ndarray, shape: tuple[int, ...], neighbours: list[Tile],
                 channel: int, reach: float) -> None:
        corners = np.array([[0, 0, shape[0] - 1, shape[0] - 1],
                            [0, shape[1] - 1, 0, shape[1] - 1]], dtype=float)
        margin = _SPLINE_MARGIN + int(np.ceil(reach))
        self.parts = []
        for ref in neighbours:
            to_ref = np.linalg.inv(ref.affine) @ place
            mapped = to_ref[:2, :2] @ corners + to_ref[:2, 2:]
            lo = np.maximum(np.floor(mapped.min(axis=1)).astype(int) - margin, 0)
            hi = np.minimum(np.ceil(mapped.max(axis=1)).astype(int) + margin + 1, ref.shape)
            if np.any(hi - lo < 2):
                continue
            crop = pixels(ref, channel)[lo[0]:hi[0], lo[1]:hi[1]].astype(np.float64)
            coeffs = ndimage.spline_filter(crop, order=3, mode="mirror")
            self.parts.append((to_ref, lo, np.asarray(ref.shape, dtype=float), coeffs))

    def sample(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cycle 1 at tile-frame ``points`` (2, n): values (mean where tiles overlap), valid."""
        total, count = np.zeros(points.shape[1]), np.zeros(points.shape[1])
        for to_ref, lo, ref_shape, coeffs in self.parts:
            coords = to_ref[:2, :2] @ points + to_ref[:2, 2:]
            inside = np.all((coords >= 0) & (coords <= ref_shape[:, None] - 1), axis=0)
            if inside.any():
                total[inside] += ndimage.map_coordinates(
                    coeffs, coords[:, inside] - lo[:, None], order=3, mode="mirror",
                    prefilter=False)
                count[inside] += 1
        valid = count > 0
        return np.divide(total, count, out=np.zeros_like(total), where=valid), valid

    def on_grid(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Cycle 1 on the tile's pixel grid: values (float64) and valid (bool), ``shape``."""
        gy, gx = np.meshgrid(np.arange(shape[0], dtype=float),
                             np.arange(shape[1], dtype=float), indexing="ij")
        values, valid = self.sample(np.stack([gy.ravel(), gx.ravel()]))
        return values.reshape(shape), valid.reshape(shape)


def measure_tile(tile: Tile, channel: int, place: np.ndarray, neighbours: list[Tile],
                 reference_channel: int, radius: float) -> tuple[Any, float | None, Any]:
    """Where a tile matches cycle 1, relative to where ``place`` puts it (a picklable job).

    Cycle 1 is resampled onto the tile's pixel grid (:class:`Cycle1View`); the pairwise
    matcher finds the shift within ``radius``, and :func:`fit_warp` refines it together with a
    small residual rotation and scale.

    Returns
    -------
    shift : numpy.ndarray, shape (2,), or None
        The tile's centre ``c`` matches cycle 1 at ``place @ (c + shift)``.
    score : float or None
        Correlation of the match (None: not measured).
    turn : numpy.ndarray, shape (2,), or None, or str
        When measured: the tile's residual rotation (radians) and relative scale against
        ``place`` (None if the refinement failed); when not measured, why not (str).
    """
    view = Cycle1View(place, tile.shape, neighbours, reference_channel, radius + _FIT_TRAVEL)
    ref, valid = view.on_grid(tile.shape)
    box = _valid_box(valid)
    if box is None:
        return None, None, f"{UNSEEN} over less than {MIN_SHARED_PX} px per axis"
    own = pixels(tile, channel)[box].astype(np.float64)
    if own.std() <= _FLAT * noise_sigma(own):
        return None, None, "no structure above the noise in the alignment channel"
    downsample = 2 if max(own.shape) > 1024 else 1
    found = measure_crops(ref[box], own, np.zeros(2), radius,
                          max(MIN_SHARED_PX, min(own.shape) // 2), downsample=downsample)
    if found.shift is None:
        return None, None, found.reason or "no match with cycle 1"
    score = float(found.ncc)
    if not score >= MIN_TILE_SCORE:
        return None, score, f"correlation with cycle 1 {score:.2f} < {MIN_TILE_SCORE}"
    if found.edge:
        return None, score, (f"best match on the edge of the search, {radius:.1f} px from where "
                             "the global model puts it (max_shift) or at too thin an overlap")
    corner = np.array([box[0].start, box[1].start], dtype=float)
    fit = fit_warp(view, own, corner, found.shift, (np.asarray(tile.shape, dtype=float) - 1) / 2)
    if fit is None:
        return found.shift, score, None
    return fit[0], score, fit[1]


def fit_warp(view: Cycle1View, own: np.ndarray, corner: np.ndarray, start: np.ndarray,
             centre: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Least-squares fit of ``own(k) = g ref(k + s + (a I + w J)(k - centre)) + o``.

    Gauss-Newton from ``s = start``, ``w = a = 0``; ``ref`` is cycle 1 sampled straight from
    its tiles' cubic splines at the warped points (one interpolation, whatever ``s``), its
    gradient by central differences of the same splines; ``g`` and ``o`` (the cycles' different
    exposures) are fitted along. ``J`` turns (y, x) a quarter turn.

    Parameters
    ----------
    view : Cycle1View
    own : numpy.ndarray, shape (y, x)
        The tile's pixels over the box that sees cycle 1.
    corner : numpy.ndarray, shape (2,)
        Tile index of ``own[0, 0]``.
    start : numpy.ndarray, shape (2,)
        The shift found by the search.
    centre : numpy.ndarray, shape (2,)
        The tile's centre, tile px.

    Returns
    -------
    (shift, turn) or None
        ``shift`` (2,) at ``centre``; ``turn`` (2,): ``(w, a)``. None when the fit leaves
        ``start`` by more than ``_FIT_TRAVEL`` px or does not converge.
    """
    margin = int(np.ceil(np.abs(start).max())) + _FIT_MARGIN
    if min(own.shape) - 2 * margin < MIN_SHARED_PX:
        return None
    stride = max(1, int(np.ceil(np.sqrt(own.size / _FIT_MAX_PIXELS))))
    ky, kx = np.meshgrid(np.arange(margin, own.shape[0] - margin, stride),
                         np.arange(margin, own.shape[1] - margin, stride), indexing="ij")
    b = own[ky, kx].ravel()
    k = np.stack([ky.ravel(), kx.ravel()]).astype(float) + np.asarray(corner)[:, None]
    d = k - np.asarray(centre, dtype=float)[:, None]
    quarter = np.stack([-d[1], d[0]])
    reach = float(np.abs(d).max())  # a turn or scale moves the farthest point by this much
    params = np.array([*start, 0.0, 0.0])  # s_y, s_x, w, a
    gain = offset = 0.0
    keep = np.ones(b.size, dtype=bool)
    for step in range(_FIT_ITERATIONS):
        warp = k + params[:2, None] + params[3] * d + params[2] * quarter
        value, valid = view.sample(warp)
        if step < 2:  # the gradient barely changes after the first step: keep it then
            sample = [view.sample(warp + e)[0]
                      for e in ([[0.5], [0]], [[-0.5], [0]], [[0], [0.5]], [[0], [-0.5]])]
            grad_y, grad_x = sample[0] - sample[1], sample[2] - sample[3]
            geometric = np.stack([grad_y, grad_x, grad_y * quarter[0] + grad_x * quarter[1],
                                  grad_y * d[0] + grad_x * d[1]], axis=1)
            if step == 0:
                keep = valid.copy()
                gain, offset = np.polyfit(value[keep], b[keep], 1)
        keep &= valid
        if keep.sum() < MIN_SHARED_PX**2:
            return None
        jac = np.hstack([gain * geometric, value[:, None], np.ones((value.size, 1))])[keep]
        delta = np.linalg.lstsq(jac, (b - gain * value - offset)[keep], rcond=None)[0]
        params += delta[:4]
        gain, offset = gain + delta[4], offset + delta[5]
        if not np.all(np.isfinite(params)) or np.abs(params[:2] - start).max() > _FIT_TRAVEL:
            return None
        if np.abs(delta[:2]).max() < _FIT_TOL and np.abs(delta[2:4]).max() * reach < _FIT_TOL:
            return params[:2].copy(), params[2:].copy()
    return None
