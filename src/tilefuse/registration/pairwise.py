"""Pairwise registration: which tiles overlap, and the shift that best aligns each pair.

Every shift here lives in a *crop frame*: crop ``a`` and crop ``b`` are arrays cut from two tiles,
and a shift ``s`` (one value per axis) says that pixel ``k`` of crop ``b`` shows the same point as
pixel ``k + s`` of crop ``a``. Candidates come from the peaks of the phase correlation and of the
plain cross-correlation of the windowed crops (each peak read in all its periodic
interpretations) plus the nominal shift; each candidate is scored by the Pearson correlation over
exactly the pixels that overlap at that shift, climbed to a local maximum of that score, and
refined to sub-pixel precision by Gauss-Newton on the same score.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import ndimage
from scipy.signal.windows import tukey
from scipy.spatial import cKDTree

from tilefuse.geometry import tile_bounds
from tilefuse.layout import Layout

__all__ = [
    "Measurement",
    "Pair",
    "find_pairs",
    "make_pair",
    "measure_crops",
    "ncc_at",
    "overlap_slices",
]

N_PEAKS = 8
N_CLIMB = 3
TUKEY_ALPHA = 0.25
NEIGHBOUR_FRACTION = 0.25
_REFINE_MARGIN = 3
_REFINE_ITERS = 12
MAX_TRAVEL = 3.0
SELECT_KAPPA = 12.0


@dataclass(frozen=True, slots=True, eq=False)
class Pair:
    """Two tiles whose nominal footprints overlap, and the crops that cover their overlap.

    Attributes
    ----------
    a, b : int
        Tile indices, ``a < b``.
    offset : numpy.ndarray, shape (ndim,)
        Nominal index of tile ``b``'s first pixel in tile ``a``'s index frame.
    lin : numpy.ndarray, shape (ndim, ndim)
        Linear part of the pair's affines (mean of the two): index offsets -> mosaic offsets.
    box_a, box_b : numpy.ndarray, shape (2, ndim), int
        ``[lo, hi)`` crop boxes in each tile's index frame: the nominal overlap enlarged by the
        search radius and clipped to the tile.
    """

    a: int
    b: int
    offset: np.ndarray
    lin: np.ndarray
    box_a: np.ndarray
    box_b: np.ndarray

    @property
    def nominal(self) -> np.ndarray:
        """Nominal crop-frame shift, shape (ndim,)."""
        return self.offset + self.box_b[0] - self.box_a[0]

    def to_mosaic(self, shift: np.ndarray) -> np.ndarray:
        """Mosaic offset ``position[b] - position[a]`` implied by a crop-frame ``shift``."""
        return self.lin @ (np.asarray(shift, dtype=np.float64) - self.box_b[0] + self.box_a[0])

    def crop(self, image: np.ndarray, which: str) -> np.ndarray:
        """Cut this pair's crop (``which`` is "a" or "b") from a tile's spatial array."""
        box = self.box_a if which == "a" else self.box_b
        return image[tuple(slice(lo, hi) for lo, hi in zip(*box))]


@dataclass(frozen=True, slots=True)
class Measurement:
    """What the search found for one pair of crops.

    Attributes
    ----------
    shift : numpy.ndarray or None, shape (ndim,)
        Best crop-frame shift within the search radius, sub-pixel; None when none was found.
    ncc : float
        Pearson correlation over the overlap at ``shift`` (nan when none).
    reason : str
        Why no shift was found; empty otherwise.
    overlap : int
        Number of overlapping pixels at ``shift``.
    std_a, std_b : float
        Standard deviation of the two crops (to recognise empty background).
    outside_shift : numpy.ndarray or None
        The best candidate beyond the search radius, when it scored higher than ``shift``.
    outside_ncc : float
        Its score (nan when none).
    cov : numpy.ndarray or None, shape (ndim, ndim)
        Estimated covariance of ``shift``, crop frame, pixels squared.
    """

    shift: np.ndarray | None
    ncc: float
    reason: str
    overlap: int
    std_a: float
    std_b: float
    outside_shift: np.ndarray | None = None
    outside_ncc: float = float("nan")
    cov: np.ndarray | None = None


# ----------------------------------------------------------------------------------------- pairs


def find_pairs(layout: Layout, min_overlap_px: int) -> list[tuple[int, int]]:
    """Neighbouring tiles: nominal footprints overlap by ``min_overlap_px`` in every axis.

    Pairs that touch only at a corner or an edge of the box (more than one thin axis) are left
    out unless the overlap is substantial: every axis but the thinnest must overlap by at least
    ``NEIGHBOUR_FRACTION`` of the smaller tile.

    Returns
    -------
    list of (int, int)
        Index pairs ``(a, b)`` with ``a < b``, sorted.
    """
    shapes = np.array([t.shape for t in layout.tiles], dtype=np.float64)
    lo, hi = tile_bounds(layout.affines, shapes)
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    if len(layout.tiles) < 2:
        return []
    radius = 2 * float(np.linalg.norm(half, axis=1).max()) + 1
    candidates = np.array(sorted(cKDTree(centre).query_pairs(radius)), dtype=np.int64)
    if candidates.size == 0:
        return []
    a, b = candidates[:, 0], candidates[:, 1]
    overlap = np.minimum(hi[a], hi[b]) - np.maximum(lo[a], lo[b]) + 1
    extent = np.minimum(hi[a] - lo[a], hi[b] - lo[b]) + 1
    fraction = np.sort(overlap / extent, axis=1)
    keep = np.all(overlap >= min_overlap_px, axis=1)
    if fraction.shape[1] > 1:
        keep &= fraction[:, 1] >= NEIGHBOUR_FRACTION
    return [(int(i), int(j)) for i, j in candidates[keep]]


def make_pair(layout: Layout, a: int, b: int, radius: int) -> Pair:
    """Crop boxes for tiles ``a`` and ``b``: their nominal overlap enlarged by ``radius`` pixels."""
    ta, tb = layout.tiles[a], layout.tiles[b]
    lin = (ta.affine[:-1, :-1] + tb.affine[:-1, :-1]) / 2
    offset = np.linalg.solve(lin, tb.position - ta.position)
    shape_a, shape_b = np.asarray(ta.shape), np.asarray(tb.shape)
    d = np.rint(offset).astype(np.int64)
    ov_lo, ov_hi = np.maximum(0, d), np.minimum(shape_a, d + shape_b)
    box_a = np.stack([np.clip(ov_lo - radius, 0, shape_a), np.clip(ov_hi + radius, 0, shape_a)])
    box_b = np.stack(
        [np.clip(ov_lo - d - radius, 0, shape_b), np.clip(ov_hi - d + radius, 0, shape_b)]
    )
    return Pair(a, b, offset, lin, box_a, box_b)


# ------------------------------------------------------------------------------------ correlation


def overlap_slices(
    shape_a: tuple[int, ...], shape_b: tuple[int, ...], shift: np.ndarray, margin: int = 0
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Slices of crop ``a`` and crop ``b`` that overlap at integer ``shift``; None if empty.

    ``margin`` pixels are dropped where the overlap meets an edge of crop ``b``.
    """
    sl_a, sl_b = [], []
    for na, nb, s in zip(shape_a, shape_b, shift):
        s = int(s)
        lo, hi = max(0, s), min(na, s + nb)
        lo_b, hi_b = lo - s, hi - s
        if margin:
            cut_lo = max(0, margin - lo_b) if lo_b < margin else 0
            cut_hi = max(0, hi_b - (nb - margin)) if hi_b > nb - margin else 0
            lo, hi = lo + cut_lo, hi - cut_hi
        if hi <= lo:
            return None
        sl_a.append(slice(lo, hi))
        sl_b.append(slice(lo - s, hi - s))
    return tuple(sl_a), tuple(sl_b)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt(np.dot(a, a) * np.dot(b, b))
    return float(np.dot(a, b) / den) if den > 0 else float("nan")


def ncc_at(crop_a: np.ndarray, crop_b: np.ndarray, shift: np.ndarray, min_extent: int) -> float:
    """Pearson correlation over exactly the pixels that overlap at integer ``shift``.

    Returns nan where the overlap is thinner than ``min_extent`` in some axis (or flat).
    """
    sl = overlap_slices(crop_a.shape, crop_b.shape, shift)
    if sl is None:
        return float("nan")
    if any(s.stop - s.start < min(min_extent, n, m) for s, n, m in
           zip(sl[0], crop_a.shape, crop_b.shape)):
        return float("nan")
    return _pearson(crop_a[sl[0]], crop_b[sl[1]])


def _window(shape: tuple[int, ...]) -> np.ndarray:
    win = np.ones((), dtype=np.float32)
    for n in shape:
        w = tukey(n, TUKEY_ALPHA).astype(np.float32) if n > 2 else np.ones(n, np.float32)
        win = np.multiply.outer(win, w)
    return win


def _peaks(corr: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest local maxima of a periodic map, shape (k, ndim)."""
    local = corr == ndimage.maximum_filter(corr, size=3, mode="wrap")
    flat = np.flatnonzero(local)
    if flat.size > k:
        flat = flat[np.argpartition(corr.ravel()[flat], -k)[-k:]]
    flat = flat[np.argsort(corr.ravel()[flat])[::-1]]
    return np.stack(np.unravel_index(flat, corr.shape), axis=1)


def _correlation_peaks(crop_a: np.ndarray, crop_b: np.ndarray) -> tuple[np.ndarray, tuple]:
    """Peaks of the phase correlation and the plain cross-correlation of windowed crops."""
    size = tuple(sfft.next_fast_len(max(n, m), real=True)
                 for n, m in zip(crop_a.shape, crop_b.shape))
    axes = tuple(range(crop_a.ndim))
    fa = sfft.rfftn((crop_a - crop_a.mean()) * _window(crop_a.shape), size, axes=axes)
    fb = sfft.rfftn((crop_b - crop_b.mean()) * _window(crop_b.shape), size, axes=axes)
    cross = fa * np.conj(fb)
    plain = sfft.irfftn(cross, size, axes=axes)
    mag = np.abs(cross)
    cross /= mag + mag.max() * 1e-6 + np.finfo(np.float32).tiny
    phase = sfft.irfftn(cross, size, axes=axes)
    return np.concatenate([_peaks(phase, N_PEAKS), _peaks(plain, N_PEAKS)]), size


def _candidates(peaks: np.ndarray, size: tuple, nominal: np.ndarray) -> list[tuple[int, ...]]:
    """Every periodic reading of every peak, plus the nominal shift, without duplicates."""
    out = {tuple(int(v) for v in np.rint(nominal))}
    for p in peaks:
        for choice in itertools.product((0, 1), repeat=len(size)):
            out.add(tuple(int(v - c * n) for v, c, n in zip(p, choice, size)))
    return sorted(out)


# ----------------------------------------------------------------------------------------- search


class _Scorer:
    """Cached Pearson scores of integer shifts, with the search bounds."""

    def __init__(self, crop_a, crop_b, nominal, radius, min_extent) -> None:
        self.a, self.b = crop_a, crop_b
        self.nominal, self.radius, self.min_extent = nominal, radius, min_extent
        self.cache: dict[tuple[int, ...], float] = {}

    def inside(self, shift) -> bool:
        return bool(np.all(np.abs(np.asarray(shift) - self.nominal) <= self.radius + 1e-9))

    def __call__(self, shift: tuple[int, ...]) -> float:
        if shift not in self.cache:
            self.cache[shift] = ncc_at(self.a, self.b, np.asarray(shift), self.min_extent)
        return self.cache[shift]

    def climb(self, start: tuple[int, ...]) -> tuple[tuple[int, ...], float]:
        """Steepest ascent over the integer grid, staying inside the search radius."""
        best, value = start, self(start)
        steps = [s for s in itertools.product((-1, 0, 1), repeat=len(start)) if any(s)]
        for _ in range(4 * int(self.radius) + 8):
            moves = [tuple(b + d for b, d in zip(best, s)) for s in steps]
            scored = [(self(m), m) for m in moves if self.inside(m)]
            scored = [(v, m) for v, m in scored if np.isfinite(v)]
            if not scored:
                break
            top, where = max(scored)
            if not top > value:
                break
            best, value = where, top
        return best, value


def measure_crops(
    crop_a: np.ndarray,
    crop_b: np.ndarray,
    nominal: np.ndarray,
    radius: float,
    min_extent: int,
) -> Measurement:
    """Find the shift that best aligns two crops within ``radius`` of ``nominal``.

    Parameters
    ----------
    crop_a, crop_b : numpy.ndarray, shape (*spatial), any real dtype
    nominal : numpy.ndarray, shape (ndim,)
        Expected crop-frame shift.
    radius : float
        Largest accepted deviation from ``nominal`` per axis, pixels.
    min_extent : int
        Smallest overlap per axis a shift may leave.

    Returns
    -------
    Measurement
    """
    a = np.asarray(crop_a, dtype=np.float32)
    b = np.asarray(crop_b, dtype=np.float32)
    std_a, std_b = float(a.std()), float(b.std())
    if std_a == 0 or std_b == 0:
        return Measurement(None, float("nan"), "empty background (constant overlap)", 0,
                           std_a, std_b)
    peaks, size = _correlation_peaks(a, b)
    scorer = _Scorer(a, b, np.asarray(nominal, dtype=np.float64), radius, min_extent)
    scored = [(scorer(c), c) for c in _candidates(peaks, size, nominal)]
    scored = [(v, c) for v, c in scored if np.isfinite(v)]
    inside = sorted(((v, c) for v, c in scored if scorer.inside(c)), reverse=True)
    outside = max(((v, c) for v, c in scored if not scorer.inside(c)), default=None)
    if not inside:
        return Measurement(None, float("nan"), "overlap too small at every candidate shift",
                           0, std_a, std_b, *_outside(outside))
    climbed = [scorer.climb(c) for _, c in inside[:N_CLIMB]]
    best, value = max(climbed, key=lambda item: item[1])
    shift, ncc, cov = refine_subpixel(a, b, np.asarray(best), scorer)
    sl = overlap_slices(a.shape, b.shape, np.asarray(best))
    count = int(np.prod([s.stop - s.start for s in sl[0]])) if sl else 0
    extra = _outside(outside) if outside is not None and outside[0] > value else (None, np.nan)
    return Measurement(shift, ncc, "", count, std_a, std_b, *extra, cov=cov)


def _outside(item) -> tuple[np.ndarray | None, float]:
    if item is None:
        return None, float("nan")
    return np.asarray(item[1], dtype=np.float64), float(item[0])


# -------------------------------------------------------------------------------------- sub-pixel


@dataclass(frozen=True, slots=True)
class _Fit:
    shift: np.ndarray
    rss: float
    n: int
    n_params: int
    cov: np.ndarray
    ncc: float


def refine_subpixel(
    crop_a: np.ndarray, crop_b: np.ndarray, start: np.ndarray, scorer: _Scorer
) -> tuple[np.ndarray, float, np.ndarray]:
    """Sub-pixel shift near the integer ``start`` that best explains crop ``a`` by crop ``b``.

    Two Gauss-Newton fits with ``b`` resampled by cubic splines: ``a ~ b(x - shift)`` (same
    exposure) and ``a ~ gain * b(x - shift) + offset`` (Pearson-consistent). The first is kept
    unless the photometric parameters explain significantly more of the residual: on
    low-frequency content the gain and offset trade off against the shift, and fixing them is
    what makes the shift measurable. Falls back to a parabola through the integer scores.

    Returns
    -------
    shift : numpy.ndarray, shape (ndim,), float64
    ncc : float
        Pearson correlation at ``shift``.
    cov : numpy.ndarray, shape (ndim, ndim)
        Estimated covariance of ``shift`` (pixels squared).
    """
    start = np.asarray(start, dtype=np.float64)
    fits = [_gauss_newton(crop_a, crop_b, start, photometric=p) for p in (False, True)]
    fits = [f for f in fits if f is not None and np.all(np.abs(f.shift - start) <= MAX_TRAVEL)]
    if len(fits) == 2:
        plain, full = fits
        sigma2 = full.rss / max(full.n - full.n_params, 1)
        fits = [plain] if plain.rss - full.rss <= SELECT_KAPPA * sigma2 else [full]
    if fits:
        return fits[0].shift, fits[0].ncc, fits[0].cov
    value = scorer(tuple(int(v) for v in start))
    return _parabola(start, scorer), value, np.eye(start.size)


def _gauss_newton(a: np.ndarray, b: np.ndarray, shift: np.ndarray, photometric: bool):
    """Least-squares shift (and gain, offset when ``photometric``); None when it fails."""
    b64 = b.astype(np.float64)
    a64 = a.astype(np.float64)
    for _ in range(_REFINE_ITERS):
        whole = np.floor(shift)
        frac = shift - whole
        moved = ndimage.shift(b64, frac, order=3, mode="mirror") if np.any(frac) else b64
        sl = overlap_slices(a.shape, b.shape, whole, margin=_REFINE_MARGIN)
        if sl is None or min(s.stop - s.start for s in sl[1]) < 2:
            return None
        bv = moved[sl[1]].ravel()
        grads = [g[sl[1]].ravel() for g in np.gradient(moved)]  # tiles are 2D or 3D
        target = a64[sl[0]].ravel()
        if photometric:
            design = np.stack([bv, np.ones(bv.size), *grads], axis=1)
        else:
            design, target = np.stack(grads, axis=1), target - bv
        coef, *_ = np.linalg.lstsq(design, target, rcond=None)
        gain = coef[0] if photometric else 1.0
        if not np.all(np.isfinite(coef)) or abs(gain) < 1e-12:
            return None
        # b(x - s - d) ~ b - d . grad b: the gradient coefficient is -gain * d
        step = np.clip(-coef[-len(grads):] / gain, -1.0, 1.0)
        shift = shift + step
        if np.max(np.abs(step)) < 1e-3:
            break
    else:
        return None
    residual = target - design @ coef
    rss = float(residual @ residual)
    n_params = design.shape[1]
    sigma2 = rss / max(bv.size - n_params, 1)
    info = np.linalg.pinv(design.T @ design)[-len(grads):, -len(grads):]
    cov = sigma2 * info / gain**2
    return _Fit(shift, rss, bv.size, n_params, cov, _pearson(a64[sl[0]], moved[sl[1]]))


def _parabola(start: np.ndarray, scorer: _Scorer) -> np.ndarray:
    out = start.astype(np.float64)
    centre = scorer(tuple(int(v) for v in start))
    for axis in range(start.size):
        step = np.zeros(start.size, dtype=np.int64)
        step[axis] = 1
        lo = scorer(tuple(int(v) for v in start - step))
        hi = scorer(tuple(int(v) for v in start + step))
        den = lo - 2 * centre + hi
        if np.isfinite(den) and den < 0:
            out[axis] += float(np.clip(0.5 * (lo - hi) / den, -0.5, 0.5))
    return out
