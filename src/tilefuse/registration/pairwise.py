"""Pairwise registration: which tiles overlap, and the shift that best aligns each pair.

Every shift here lives in a *crop frame*: crop ``a`` and crop ``b`` are arrays cut from two tiles,
and a shift ``s`` (one value per axis) says that pixel ``k`` of crop ``b`` shows the same point as
pixel ``k + s`` of crop ``a``.

The search scores *every* whole-pixel shift by the Pearson correlation over exactly the pixels
that overlap at that shift (and by the mean squared difference): the cross products come from one
zero-padded FFT cross-correlation, the sums and sums of squares of each overlap from integral
images, so the score map costs about as much as a phase correlation and no candidate peak can be
missed or misread. Where both tiles share an exposure, the least-squares (same-exposure) optimum
is preferred: on low-frequency content the correlation maximum drifts along flat ridges because
gain and offset trade off against the shift. A best shift on the edge of the search with a better
one just beyond is flagged. The shift is then refined to sub-pixel precision by minimising a
least-squares misfit with crop ``b`` resampled by cubic splines (through the Gram matrix of the
spline taps, so each evaluation is cheap), down to the scale the content supports above the noise.
Each measurement carries a covariance: local (noise-corrected Fisher information) plus the spread
of the whole-pixel shifts that fit about as well (ridges, repeats).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import ndimage
from scipy.spatial import cKDTree

from tilefuse.geometry import tile_bounds
from tilefuse.layout import Layout

__all__ = [
    "Measurement",
    "Pair",
    "find_pairs",
    "make_pair",
    "measure_crops",
    "ncc_map",
    "noise_sigma",
    "score_maps",
    "overlap_slices",
    "refine_subpixel",
]

NEIGHBOUR_FRACTION = 0.5
SELECT_TOL = 0.1
SAME_EXPOSURE_NOISE = 1.5
OUTSIDE_REACH = 1.5
MAX_TRAVEL = 2.5
_REFINE_MARGIN = 3
_TAPS = np.arange(-2, 3)
_BLAS_SERIAL = 2**18
_GRADIENT_SIGMA = 1.5
_REFINE_MAX_PIXELS = {2: 2**17, 3: 2**15}
_STENCIL_START = 1.0
_STENCIL_MIN = 0.125
_STENCIL_ITERS = 16


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
    edge : str
        Set when ``shift`` is not a peak but sits on the edge of the search (a better score lies
        just beyond ``max_shift`` or ``min_overlap_px``): which edge.
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
    edge: str = ""


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
        lo, hi = max(0, s, s + margin), min(na, s + nb, s + nb - margin)
        if hi <= lo:
            return None
        sl_a.append(slice(lo, hi))
        sl_b.append(slice(lo - s, hi - s))
    return tuple(sl_a), tuple(sl_b)


def _integral(image: np.ndarray) -> np.ndarray:
    """Summed-area table with a leading zero along every axis."""
    out = np.pad(image, [(1, 0)] * image.ndim)
    for axis in range(image.ndim):
        np.cumsum(out, axis=axis, out=out)
    return out


def _box_sums(table: np.ndarray, lo: list[np.ndarray], hi: list[np.ndarray]) -> np.ndarray:
    """Sums over the boxes ``[lo, hi)``, one 1D array of bounds per axis (outer product)."""
    total = 0.0
    for corner in itertools.product((0, 1), repeat=len(lo)):
        index = np.ix_(*[top if c else bottom for c, bottom, top in zip(corner, lo, hi)])
        sign = (-1) ** (len(lo) - sum(corner))
        total = total + sign * table[index]
    return total


def ncc_map(
    crop_a: np.ndarray, crop_b: np.ndarray, lo: np.ndarray, hi: np.ndarray, min_extent: int
) -> np.ndarray:
    """Pearson correlation over the overlap for every integer shift in ``[lo, hi]``.

    Parameters
    ----------
    crop_a, crop_b : numpy.ndarray, shape (*spatial)
    lo, hi : numpy.ndarray, shape (ndim,), int
        Inclusive range of crop-frame shifts.
    min_extent : int
        Shifts leaving a thinner overlap in some axis score nan.

    Returns
    -------
    numpy.ndarray, shape ``hi - lo + 1``, float64
        ``out[s - lo]`` is the correlation at shift ``s`` (nan where undefined).
    """
    return score_maps(crop_a, crop_b, lo, hi, min_extent)[0]


def score_maps(
    crop_a: np.ndarray, crop_b: np.ndarray, lo: np.ndarray, hi: np.ndarray, min_extent: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation and mean squared difference over the overlap, for every shift.

    The cross products come from one zero-padded FFT cross-correlation, the sums and sums of
    squares of each overlap from summed-area tables. See :func:`ncc_map` for the parameters.

    Returns
    -------
    ncc, msd : numpy.ndarray, shape ``hi - lo + 1``, float64
        nan where the overlap is thinner than ``min_extent`` or flat.
    """
    a = np.asarray(crop_a, dtype=np.float64)
    b = np.asarray(crop_b, dtype=np.float64)
    ca, cb = a.mean(), b.mean()
    a, b = a - ca, b - cb
    shifts = [np.arange(l_, h_ + 1) for l_, h_ in zip(lo, hi)]
    size = [sfft.next_fast_len(int(max(na - s[0], s[-1] + nb)), real=True)
            for na, nb, s in zip(a.shape, b.shape, shifts)]
    axes = tuple(range(a.ndim))
    cross = sfft.irfftn(sfft.rfftn(a, size, axes=axes) * np.conj(sfft.rfftn(b, size, axes=axes)),
                        size, axes=axes)
    sab = cross[np.ix_(*[s % n for s, n in zip(shifts, size)])]
    a_lo = [np.clip(s, 0, na) for s, na in zip(shifts, a.shape)]
    a_hi = [np.clip(s + nb, 0, na) for s, na, nb in zip(shifts, a.shape, b.shape)]
    b_lo = [lo_ - s for lo_, s in zip(a_lo, shifts)]
    b_hi = [hi_ - s for hi_, s in zip(a_hi, shifts)]
    extent = [h_ - l_ for l_, h_ in zip(a_lo, a_hi)]
    count = np.ones(())
    for e in extent:
        count = np.multiply.outer(count, e.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        sa = _box_sums(_integral(a), a_lo, a_hi)
        sb = _box_sums(_integral(b), b_lo, b_hi)
        saa = _box_sums(_integral(a * a), a_lo, a_hi)
        sbb = _box_sums(_integral(b * b), b_lo, b_hi)
        var_a, var_b = saa - sa * sa / count, sbb - sb * sb / count
        den = np.sqrt(var_a * var_b)
        ncc = (sab - sa * sb / count) / den
        d = ca - cb  # a - b = (a' - b') + d
        msd = (saa + sbb - 2 * sab + 2 * d * (sa - sb)) / count + d * d
    scale = np.sqrt(np.sum(a * a) * np.sum(b * b))
    bad = ~(den > 1e-9 * scale)
    for axis, e in enumerate(extent):
        thin = e < min(min_extent, a.shape[axis], b.shape[axis])
        bad[(slice(None),) * axis + (thin,)] = True
    ncc[bad] = np.nan
    msd[bad] = np.nan
    return ncc, msd


# ----------------------------------------------------------------------------------------- search


def measure_crops(
    crop_a: np.ndarray,
    crop_b: np.ndarray,
    nominal: np.ndarray,
    radius: float,
    min_extent: int,
    *,
    refine: bool = True,
) -> Measurement:
    """Find the shift that best aligns two crops within ``radius`` of ``nominal``.

    Every whole-pixel shift within ``OUTSIDE_REACH`` times the radius is scored
    (:func:`score_maps`); the best one within the radius is refined (:func:`refine_subpixel`),
    and the best one beyond it is kept for the report.

    Parameters
    ----------
    crop_a, crop_b : numpy.ndarray, shape (*spatial), any real dtype
    nominal : numpy.ndarray, shape (ndim,)
        Expected crop-frame shift.
    radius : float
        Largest accepted deviation from ``nominal`` per axis, pixels.
    min_extent : int
        Smallest overlap per axis a shift may leave.
    refine : bool
        Refine to sub-pixel precision; otherwise stop at the best whole-pixel shift.

    Returns
    -------
    Measurement
    """
    a = np.asarray(crop_a, dtype=np.float64)
    b = np.asarray(crop_b, dtype=np.float64)
    std_a, std_b = float(a.std()), float(b.std())
    if std_a == 0 or std_b == 0:
        return Measurement(None, float("nan"), "empty background (constant overlap)", 0,
                           std_a, std_b)
    nominal = np.asarray(nominal, dtype=np.float64)
    reach = OUTSIDE_REACH * radius
    lo = np.maximum(np.floor(nominal - reach), -np.asarray(b.shape) + 1).astype(int)
    hi = np.minimum(np.ceil(nominal + reach), np.asarray(a.shape) - 1).astype(int)
    if np.any(hi < lo):
        return Measurement(None, float("nan"), "overlap too small at every shift", 0,
                           std_a, std_b)
    scores, msd = score_maps(a, b, lo, hi, min(2, min_extent))
    offsets = np.stack(np.meshgrid(*[np.arange(l_, h_ + 1) for l_, h_ in zip(lo, hi)],
                                   indexing="ij"), axis=-1) - nominal
    within = np.all(np.abs(offsets) <= radius + 1e-9, axis=-1)
    thick = _thick(lo, hi, a.shape, b.shape, min_extent)
    inside = within & thick
    noise2_b = noise_sigma(b) ** 2
    noise2 = noise_sigma(a) ** 2 + noise2_b
    best, same = _choose(scores, msd, inside, noise2)
    best_out = _argmax(scores, ~within & thick)
    out_shift, out_ncc = None, float("nan")
    if best_out is not None and (best is None or scores[best_out] > scores[best]):
        out_shift, out_ncc = lo + np.asarray(best_out), float(scores[best_out])
    if best is None:
        return Measurement(None, float("nan"), "overlap too small at every shift", 0,
                           std_a, std_b, out_shift, out_ncc)
    start = lo + np.asarray(best)
    sl = overlap_slices(a.shape, b.shape, start)
    count = int(np.prod([s.stop - s.start for s in sl[0]]))
    edge = _edge(best, msd if same else -scores, inside, within)
    edge = edge.format(radius=radius, min_extent=min_extent) if edge else ""
    if not refine:
        return Measurement(start.astype(np.float64), float(scores[best]), "", count, std_a,
                           std_b, out_shift, out_ncc, edge=edge)
    shift, cov = refine_subpixel(a, b, start, scores, lo, noise2, noise2_b)
    misfit = msd * count if same else (1 - scores**2) * float(a[sl[0]].var()) * count
    cov = cov + _ambiguity(misfit, inside, best, noise2 * np.sqrt(2 * count))
    return Measurement(shift, float(scores[best]), "", count, std_a, std_b, out_shift, out_ncc,
                       cov, edge)


def _thick(lo, hi, shape_a, shape_b, min_extent: int) -> np.ndarray:
    """Shifts in ``[lo, hi]`` whose overlap is at least ``min_extent`` thick in every axis."""
    ok = np.ones((), dtype=bool)
    for l_, h_, na, nb in zip(lo, hi, shape_a, shape_b):
        s = np.arange(l_, h_ + 1)
        extent = np.minimum(na, s + nb) - np.maximum(0, s)
        ok = np.logical_and.outer(ok, extent >= min(min_extent, na, nb))
    return ok


def _edge(best: tuple[int, ...], misfit: np.ndarray, inside: np.ndarray,
          within: np.ndarray) -> str:
    """Which edge of the search ``best`` sits on with a better ``misfit`` beyond ("" if none).

    A best shift on the edge of the allowed shifts is no peak when the next shift outside
    fits better: the real match is likely beyond the search.
    """
    for axis, index in enumerate(best):
        for step in (-1, 1):
            k = index + step
            if not 0 <= k < inside.shape[axis]:
                continue
            neighbour = (*best[:axis], k, *best[axis + 1 :])
            if inside[neighbour] or not misfit[neighbour] < misfit[best]:
                continue
            if not within[neighbour]:
                return "{radius:.1f} px from the stage offset (max_shift)"
            return "overlap thinner than {min_extent} px (half of min_overlap_px)"
    return ""


def _choose(scores, msd, inside, noise2) -> tuple[tuple[int, ...] | None, bool]:
    """Best whole-pixel shift inside the radius, and whether it is the same-exposure one."""
    best = _argmax(scores, inside)
    if best is None:
        return None, False
    closest = _argmax(-msd, inside)
    if _prefer_same_exposure(scores[closest], scores[best], msd[closest], noise2):
        return closest, True
    return best, False


def _ambiguity(misfit: np.ndarray, inside: np.ndarray, best: tuple[int, ...],
               roughness: float) -> np.ndarray:
    """Covariance of the shifts beyond one pixel from ``best`` that fit about as well.

    The misfit map (sum of squares over the overlap, per whole-pixel shift) is compared with
    ``roughness``, how much noise alone makes it vary between shifts (the noise variance times
    the square root of twice the pixel count): ``exp(-(misfit - min) / (2 * roughness))``
    weighs the shifts. On a flat ridge or a repeating pattern the far shifts keep weight and the
    link's uncertainty grows along them; on distinct content they weigh nothing.
    """
    ndim = misfit.ndim
    if roughness <= 0:
        return np.zeros((ndim, ndim))
    ok = inside & np.isfinite(misfit)
    excess = (misfit - misfit[best]) / (2 * roughness)
    weight = np.where(ok, np.exp(-np.clip(excess, 0, 700)), 0.0)
    total = weight.sum()
    index = np.indices(misfit.shape)
    delta = np.stack([index[k] - best[k] for k in range(ndim)], axis=-1).astype(np.float64)
    far = np.abs(delta).max(axis=-1) > 1
    w = (np.where(far, weight, 0.0) / total).ravel()
    flat = delta.reshape(-1, ndim)
    return (flat * w[:, None]).T @ flat


def _prefer_same_exposure(ncc_same: float, ncc_best: float, msd_same: float,
                          noise2: float) -> bool:
    """Whether to trust the same-exposure (least-squares) estimate over the best correlation.

    Where both tiles share an exposure, least squares on raw intensities is the sharper
    estimate: gain and offset cannot trade off against the shift, which on low-frequency
    content moves the correlation maximum far along a flat ridge. It is kept when its mean
    squared difference is down at the noise level (the pixels agree as they are), or when its
    Pearson correlation is nearly as high as the best one.
    """
    if noise2 > 0 and msd_same <= SAME_EXPOSURE_NOISE * noise2:
        return True
    return bool(ncc_same >= ncc_best - SELECT_TOL * (1 - ncc_best))


def _argmax(scores: np.ndarray, mask: np.ndarray) -> tuple[int, ...] | None:
    masked = np.where(mask & np.isfinite(scores), scores, -np.inf)
    flat = int(np.argmax(masked))
    if not np.isfinite(masked.flat[flat]):
        return None
    return tuple(int(v) for v in np.unravel_index(flat, scores.shape))


# -------------------------------------------------------------------------------------- sub-pixel


def noise_sigma(image: np.ndarray) -> float:
    """Robust estimate of the standard deviation of white noise in ``image``.

    The image is filtered by a second difference along every axis (Immerkaer's kernel in 2D),
    which removes smooth content; the median absolute value of the result is scaled to a
    Gaussian standard deviation.
    """
    out = np.asarray(image, dtype=np.float64)
    if min(out.shape) < 3:
        return 0.0
    for axis in range(out.ndim):
        out = ndimage.correlate1d(out, [1.0, -2.0, 1.0], axis=axis, mode="reflect")
    inner = out[tuple(slice(1, -1) for _ in range(out.ndim))]
    return float(np.median(np.abs(inner)) / 0.6745 / np.sqrt(6.0**out.ndim))


@functools.lru_cache(maxsize=4096)
def _noise_gain_1d(frac: float) -> float:
    """Sum of squared weights of the cubic-spline interpolator at a fractional shift."""
    impulse = np.zeros(33)
    impulse[16] = 1.0
    return float(np.sum(ndimage.shift(impulse, frac, order=3, mode="mirror") ** 2))


def _bspline3(x: np.ndarray) -> np.ndarray:
    """Cubic B-spline kernel."""
    x = np.abs(x)
    return np.where(x < 1, 2 / 3 - x**2 + x**3 / 2, np.where(x < 2, (2 - x) ** 3 / 6, 0.0))


class _Objective:
    """Least-squares misfit of crop ``a`` and the shifted crop ``b`` over a fixed region.

    ``b(k - f)`` is a weighted sum of spline coefficients at ``5**ndim`` taps around a whole-pixel
    base, so the misfit at any ``f`` is a quadratic form in the tap weights; its Gram matrix is
    computed once per base and every evaluation is then tiny.

    Interpolation averages noise, more at half-pixel shifts than at whole ones, which would pull
    the minimum towards half pixels where the content is weak; the expected loss of noise
    variance (from a noise estimate of ``b``) is added back.
    """

    def __init__(self, a: np.ndarray, b: np.ndarray, start: np.ndarray, regions,
                 noise2_b: float) -> None:
        self.region_a, self.start = regions[0], start.astype(np.int64)
        centre = float(a[self.region_a].mean())
        self.av = (a[self.region_a] - centre).ravel()
        self.saa = float(self.av @ self.av)
        self.mean_a = float(self.av.mean())
        pad = _TAPS.max() + int(np.ceil(MAX_TRAVEL))
        coeffs = ndimage.spline_filter(b - centre, order=3, mode="mirror")
        self.coeffs = np.pad(coeffs, pad, mode="reflect")
        self.pad = pad
        self.noise2 = noise2_b
        self.grams: dict[tuple[int, ...], tuple] = {}
        self._gradient_cols: np.ndarray | None = None
        self.taps = np.array(list(itertools.product(_TAPS, repeat=b.ndim)))

    def information(self, b: np.ndarray, regions, photometric: bool) -> np.ndarray:
        """Fisher information of the shift per unit noise variance, shape (ndim, ndim).

        ``G.T @ G`` over the region for Gaussian-derivative gradients ``G`` of ``b`` (with
        gain and offset projected out when ``photometric``), minus what the noise of ``b``
        adds to it, so that weak content reads as weak however noisy it is.
        """
        region_b = regions[1]
        if self._gradient_cols is None:
            reach = int(np.ceil(4 * _GRADIENT_SIGMA))
            grown = tuple(slice(max(0, r.start - reach), min(n, r.stop + reach))
                          for r, n in zip(region_b, b.shape))
            inner = tuple(slice(r.start - g.start, r.stop - g.start)
                          for r, g in zip(region_b, grown))
            self._gradient_cols = np.stack([g[inner].ravel() for g in _gradients(b[grown])],
                                           axis=1)
        cols = self._gradient_cols
        if photometric:
            basis = np.stack([b[region_b].ravel(), np.ones(cols.shape[0])], axis=1)
            coef, *_ = np.linalg.lstsq(basis, cols, rcond=None)
            cols = cols - basis @ coef
        noise = cols.shape[0] * self.noise2 * _gradient_noise_gain(b.ndim)
        info = cols.T @ cols - noise * np.eye(cols.shape[1])
        values, vectors = np.linalg.eigh((info + info.T) / 2)
        floor = max(float(values.max()), 1.0) * 1e-9
        return (vectors * np.maximum(values, floor)) @ vectors.T

    def _gram(self, base: tuple[int, ...]):
        if base not in self.grams:
            cols = []
            for tap in self.taps:
                offset = self.start + np.asarray(base) - tap - self.pad
                sl = tuple(slice(r.start - o, r.stop - o) for r, o in zip(self.region_a, offset))
                cols.append(self.coeffs[sl].ravel())
            taps = np.stack(cols, axis=1)
            self.grams[base] = (_gram_matrix(taps), taps.T @ self.av, taps.sum(axis=0))
        return self.grams[base]

    def __call__(self, points: np.ndarray, photometric: bool) -> tuple[np.ndarray, np.ndarray]:
        """Misfit and Pearson correlation at fractional offsets from the start.

        Parameters
        ----------
        points : array, shape (m, ndim)

        Returns
        -------
        misfit, ncc : numpy.ndarray, shape (m,)
        """
        points = np.atleast_2d(np.asarray(points, dtype=np.float64))
        common = np.rint(points.mean(axis=0))  # one Gram matrix for the whole stencil if it can
        if np.all(np.abs(points - common) <= 1):
            bases = np.broadcast_to(common.astype(np.int64), points.shape)
        else:
            bases = np.rint(points).astype(np.int64)
        misfit, ncc = np.empty(len(points)), np.empty(len(points))
        for base in np.unique(bases, axis=0):
            rows = np.flatnonzero(np.all(bases == base, axis=1))
            misfit[rows], ncc[rows] = self._evaluate(points[rows], base, photometric)
        return misfit, ncc

    def _evaluate(self, points, base, photometric):
        gram, cross, colsum = self._gram(tuple(int(v) for v in base))
        weights = np.ones((len(points), 1))
        for axis in range(points.shape[1]):
            per_axis = _bspline3(points[:, axis, None] - base[axis] + _TAPS)
            weights = (weights[:, :, None] * per_axis[:, None, :]).reshape(len(points), -1)
        n = self.av.size
        gain = np.ones(len(points))
        for axis in range(points.shape[1]):
            gain *= [_noise_gain_1d(round(float(f), 6)) for f in points[:, axis]]
        lost = n * self.noise2 * np.maximum(0.0, 1.0 - gain)
        sbb_raw = np.einsum("ij,jk,ik->i", weights, gram, weights)
        sab_raw, sb = weights @ cross, weights @ colsum
        sbb = sbb_raw - sb * sb / n + lost
        sab = sab_raw - self.mean_a * sb
        saa_c = self.saa - n * self.mean_a**2
        with np.errstate(divide="ignore", invalid="ignore"):
            ncc = np.where(saa_c * sbb > 0, sab / np.sqrt(saa_c * sbb), 0.0)
        if photometric:
            return saa_c * (1 - ncc**2), ncc
        return self.saa - 2 * sab_raw + sbb_raw + lost, ncc


def _gradients(image: np.ndarray) -> list[np.ndarray]:
    """Gaussian-derivative gradient of ``image`` along every axis."""
    out = []
    for axis in range(image.ndim):
        order = [0] * image.ndim
        order[axis] = 1
        out.append(ndimage.gaussian_filter(image, _GRADIENT_SIGMA, order=order, mode="nearest"))
    return out


@functools.lru_cache(maxsize=4)
def _gradient_noise_gain(ndim: int) -> float:
    """Variance of one :func:`_gradients` component for unit white noise."""
    impulse = np.zeros((33,) * ndim)
    impulse[(16,) * ndim] = 1.0
    return float(np.sum(_gradients(impulse)[0] ** 2))


def _gram_matrix(cols: np.ndarray) -> np.ndarray:
    """``cols.T @ cols`` in row blocks small enough for BLAS to stay on one thread.

    Pairs are measured in parallel threads already; a threaded BLAS call per pair only adds
    contention (and long stalls on a busy machine).
    """
    k = cols.shape[1]
    rows = max(8, _BLAS_SERIAL // (k * k))
    if rows >= cols.shape[0]:
        return cols.T @ cols
    out = np.zeros((k, k))
    for i in range(0, cols.shape[0], rows):
        block = cols[i : i + rows]
        out += block.T @ block
    return out


def _quadratic_step(points: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum and Hessian of the quadratic fitted to ``values`` at ``points`` (m, ndim)."""
    ndim = points.shape[1]
    pairs = [(k, l_) for k in range(ndim) for l_ in range(k, ndim)]
    design = np.column_stack([np.ones(len(points)), points] +
                             [points[:, k] * points[:, l_] for k, l_ in pairs])
    coef, *_ = np.linalg.lstsq(design, values, rcond=None)
    grad = coef[1 : ndim + 1]
    hess = np.zeros((ndim, ndim))
    for c, (k, l_) in zip(coef[ndim + 1 :], pairs):
        hess[k, l_] += c
        hess[l_, k] += c
    return np.linalg.solve(hess, -grad), hess


def _stencil(ndim: int) -> np.ndarray:
    """The ``3**ndim`` offsets of a unit grid about 0, shape (m, ndim)."""
    return np.array(list(itertools.product((-1.0, 0.0, 1.0), repeat=ndim)))


def _minimise(misfit, ndim: int, h_min: np.ndarray) -> np.ndarray | None:
    """Offset minimising ``misfit`` (batched: points (m, ndim) -> values (m,)) near 0.

    Newton steps on quadratics fitted to a ``3**ndim`` grid of spacing ``h`` per axis, starting
    at one pixel; ``h`` halves once the steps are shorter than it, but not below ``h_min`` along
    each axis (the scale below which the misfit's wiggles from noise exceed its rise from the
    content) nor below ``_STENCIL_MIN``.
    """
    stencil = _stencil(ndim)
    floor = np.clip(h_min, _STENCIL_MIN, _STENCIL_START)
    centre, h = np.zeros(ndim), _STENCIL_START
    for _ in range(_STENCIL_ITERS):
        spacing = np.maximum(h, floor)
        values = misfit(centre + stencil * spacing)
        scale = max(float(np.abs(values).max()), 1e-300)
        try:
            step, hess = _quadratic_step(stencil, values / scale)
            convex = bool(np.all(np.linalg.eigvalsh(hess) > 0))
        except np.linalg.LinAlgError:
            convex = False
        if convex:
            length = float(np.abs(step).max())
            if length > 2:
                step *= 2 / length
            step = step * spacing
            if misfit((centre + step)[None])[0] > values.min():  # the model overshot
                step = stencil[int(np.argmin(values))] * spacing
        else:
            step, length = stencil[int(np.argmin(values))] * spacing, 0.0
        centre = centre + step
        if np.any(np.abs(centre) > MAX_TRAVEL):
            return None
        if length > 0.5:
            continue
        if h / 2 < _STENCIL_MIN or np.all(h / 2 < floor):
            break
        h /= 2
    return centre


def refine_subpixel(
    crop_a: np.ndarray, crop_b: np.ndarray, start: np.ndarray, scores: np.ndarray,
    lo: np.ndarray, noise2: float = 0.0, noise2_b: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel shift near the integer ``start`` that best explains crop ``a`` by crop ``b``.

    Two misfits over the overlap at ``start``: same exposure (``a ~ b(x - shift)``) and free
    gain and offset (``1 - ncc**2``, Pearson-consistent), each minimised down to the scale the
    content supports above the noise. On low-frequency content gain and offset trade off
    against the shift, so the first is far more precise when the exposures agree; it is kept
    when its misfit is down at the noise level or its Pearson correlation is nearly the
    second's. Falls back to a parabola through the whole-pixel scores.

    Parameters
    ----------
    crop_a, crop_b : numpy.ndarray, float64
    start : numpy.ndarray, shape (ndim,), int
    scores, lo : the :func:`ncc_map` around ``start`` and its first shift.
    noise2 : float
        Sum of the noise variances of the two crops (see :func:`noise_sigma`).
    noise2_b : float, optional
        Noise variance of crop ``b``; estimated when not given.

    Returns
    -------
    shift : numpy.ndarray, shape (ndim,), float64
    cov : numpy.ndarray, shape (ndim, ndim)
        Estimated covariance of ``shift`` (pixels squared).
    """
    if noise2_b is None:
        noise2_b = noise_sigma(crop_b) ** 2
    regions = overlap_slices(crop_a.shape, crop_b.shape, start, margin=_REFINE_MARGIN)
    if regions is not None:
        regions = _limit_region(regions, _REFINE_MAX_PIXELS.get(start.size, 2**15))
    if regions is None or any(s.stop - s.start < 3 for s in regions[0]):
        return _parabola(start, scores, lo), np.eye(start.size)
    objective = _Objective(crop_a, crop_b, start, regions, noise2_b)
    plain = _fit(objective, crop_b, regions, start, noise2, photometric=False)
    if plain is not None and plain[3] <= SAME_EXPOSURE_NOISE * noise2:
        return plain[0], plain[2]  # the pixels agree as they are: nothing to choose
    full = _fit(objective, crop_b, regions, start, noise2, photometric=True)
    if plain is not None and full is not None:
        same = _prefer_same_exposure(plain[1], full[1], plain[3], noise2)
        return (plain if same else full)[0], (plain if same else full)[2]
    if plain is not None or full is not None:
        fit = plain if plain is not None else full
        return fit[0], fit[2]
    return _parabola(start, scores, lo), np.eye(start.size)


def _fit(objective: _Objective, crop_b, regions, start, noise2: float, photometric: bool):
    """(shift, ncc, covariance, misfit per pixel) of one misfit's minimum; None if none."""
    n = objective.av.size
    info = objective.information(crop_b, regions, photometric)
    roughness = max(noise2, 1e-300) * np.sqrt(n)
    marginal = 1 / np.diag(np.linalg.inv(info))  # information left per axis
    h_min = 2 * np.sqrt(roughness / marginal)
    found = _minimise(lambda f: objective(f, photometric)[0], start.size, h_min)
    if found is None:
        return None
    misfit, ncc = (float(v[0]) for v in objective(found[None], photometric))
    dof = max(n - start.size - (2 if photometric else 0), 1)
    cov = max(misfit, 0.0) / dof * np.linalg.inv(info)
    return start + found, ncc, cov, misfit / n


def _limit_region(regions, max_pixels: int):
    """Shrink the overlap region about its centre, longest axes first, to ``max_pixels``."""
    sl_a, sl_b = list(regions[0]), list(regions[1])
    while np.prod([s.stop - s.start for s in sl_a]) > max_pixels:
        axis = int(np.argmax([s.stop - s.start for s in sl_a]))
        n = sl_a[axis].stop - sl_a[axis].start
        keep = max(2, int(n * 0.75))
        cut = (n - keep) // 2
        for sl in (sl_a, sl_b):
            sl[axis] = slice(sl[axis].start + cut, sl[axis].start + cut + keep)
    return tuple(sl_a), tuple(sl_b)


def _parabola(start: np.ndarray, scores: np.ndarray, lo: np.ndarray) -> np.ndarray:
    out = start.astype(np.float64)
    index = start - lo
    for axis in range(start.size):
        if not 0 < index[axis] < scores.shape[axis] - 1:
            continue
        step = np.eye(start.size, dtype=np.int64)[axis]
        left, mid, right = (scores[tuple(index + k * step)] for k in (-1, 0, 1))
        den = left - 2 * mid + right
        if np.isfinite(den) and den < 0:
            out[axis] += float(np.clip(0.5 * (left - right) / den, -0.5, 0.5))
    return out
