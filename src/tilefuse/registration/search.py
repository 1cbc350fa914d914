"""Whole-pixel search: the correlation and misfit of two crops at every integer shift.

Shifts live in the crop frame of :mod:`~tilefuse.registration.pairwise`: pixel ``k`` of crop
``b`` shows the same point as pixel ``k + s`` of crop ``a``. :func:`score_maps` scores every
shift by the Pearson correlation over exactly the pixels that overlap there (and by the mean
squared difference): the cross products come from one zero-padded FFT cross-correlation, the sums
and sums of squares of each overlap from separable running sums, so the score map costs about as
much as a phase correlation and no candidate peak can be missed or misread. The helpers below
pick the best shift from the maps, flag a best shift on the edge of the search, and measure how
far shifts that fit about as well spread (ridges, repeats). :func:`overlap_slices` and
:func:`limit_region` cut the overlap at a shift, down to a pixel budget where it tells most.
"""

from __future__ import annotations

import numpy as np
from scipy import fft as sfft

__all__ = ["gradient_energy", "limit_region", "ncc_map", "overlap_slices", "score_maps"]

SELECT_TOL = 0.1
SAME_EXPOSURE_NOISE = 1.5


def overlap_slices(
    shape_a: tuple[int, ...], shape_b: tuple[int, ...], shift: np.ndarray, margin: int = 0
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Slices of crop ``a`` and crop ``b`` that overlap at integer ``shift``; None if empty.

    ``margin`` pixels are dropped where the overlap meets an edge of crop ``b``.
    """
    sl_a, sl_b = [], []
    for na, nb, s in zip(shape_a, shape_b, shift, strict=True):
        s = int(s)
        lo, hi = max(0, s, s + margin), min(na, s + nb, s + nb - margin)
        if hi <= lo:
            return None
        sl_a.append(slice(lo, hi))
        sl_b.append(slice(lo - s, hi - s))
    return tuple(sl_a), tuple(sl_b)


def limit_region(regions, max_pixels: int, weight: np.ndarray | None = None):
    """Shrink the overlap region, longest axes first, to ``max_pixels``.

    Parameters
    ----------
    regions : (tuple of slice, tuple of slice)
        The overlap's slices of crop ``a`` and of crop ``b`` (same shape).
    max_pixels : int
    weight : numpy.ndarray, optional
        Shape of the region: how much each pixel tells (e.g. gradient energy). Without it the
        region shrinks about its centre; with it each cut keeps the window of most weight, so
        that a sparse overlap keeps its content.

    Returns
    -------
    (tuple of slice, tuple of slice)
    """
    sl_a, sl_b = list(regions[0]), list(regions[1])
    origin = [s.start for s in sl_a]
    while np.prod([s.stop - s.start for s in sl_a]) > max_pixels:
        axis = int(np.argmax([s.stop - s.start for s in sl_a]))
        n = sl_a[axis].stop - sl_a[axis].start
        keep = max(2, int(n * 0.75))
        cut = (n - keep) // 2
        if weight is not None:
            inner = tuple(slice(s.start - o, s.stop - o) for s, o in zip(sl_a, origin,
                                                                           strict=True))
            others = tuple(k for k in range(weight.ndim) if k != axis)
            profile = np.concatenate([[0.0], np.cumsum(weight[inner].sum(axis=others))])
            cut = int(np.argmax(profile[keep:] - profile[: n - keep + 1]))
        for sl in (sl_a, sl_b):
            sl[axis] = slice(sl[axis].start + cut, sl[axis].start + cut + keep)
    return tuple(sl_a), tuple(sl_b)


def gradient_energy(image: np.ndarray) -> np.ndarray:
    """Squared forward differences summed over the axes, same shape as ``image`` (float64)."""
    image = np.asarray(image, dtype=np.float64)
    out = np.zeros(image.shape)
    for axis in range(image.ndim):
        diff = np.diff(image, axis=axis)
        out[(slice(None),) * axis + (slice(0, diff.shape[axis]),)] += diff * diff
    return out


def _box_sums(image: np.ndarray, lo: list[np.ndarray], hi: list[np.ndarray]) -> np.ndarray:
    """Sums of ``image`` over the boxes ``[lo, hi)``, one 1D array of bounds per axis.

    Parameters
    ----------
    image : numpy.ndarray, shape (*spatial)
    lo, hi : list of numpy.ndarray, shape (k_axis,), int
        Box bounds per axis; the boxes are their outer product.

    Returns
    -------
    numpy.ndarray, shape (*k)
        ``out[j0, j1, ...]`` is the sum of ``image`` over
        ``[lo[0][j0], hi[0][j0]) x [lo[1][j1], hi[1][j1]) x ...``.

    Notes
    -----
    The boxes are separable, so one running sum per axis, each on the array already reduced
    along the previous axes, replaces a full summed-area table and its ``2**ndim`` gathers.
    """
    out = image
    for axis, (bottom, top) in enumerate(zip(lo, hi, strict=True)):
        moved = np.moveaxis(out, axis, -1)  # running sums are fastest into a contiguous axis
        table = np.zeros((*moved.shape[:-1], moved.shape[-1] + 1))
        np.cumsum(moved, axis=-1, out=table[..., 1:])
        out = np.moveaxis(table[..., top] - table[..., bottom], -1, axis)
    return out


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

    The cross products come from one zero-padded FFT cross-correlation (at a fast FFT size),
    the sums and sums of squares of each overlap from :func:`_box_sums`. See :func:`ncc_map` for
    the parameters.

    Returns
    -------
    ncc, msd : numpy.ndarray, shape ``hi - lo + 1``, float64
        nan where the overlap is thinner than ``min_extent`` or flat.
    """
    a = np.asarray(crop_a, dtype=np.float64)
    b = np.asarray(crop_b, dtype=np.float64)
    ca, cb = a.mean(), b.mean()
    a, b = a - ca, b - cb
    shifts = [np.arange(l_, h_ + 1) for l_, h_ in zip(lo, hi, strict=True)]
    sab = _cross_products(a, b, shifts)
    a_lo = [np.clip(s, 0, na) for s, na in zip(shifts, a.shape, strict=True)]
    a_hi = [np.clip(s + nb, 0, na) for s, na, nb in zip(shifts, a.shape, b.shape, strict=True)]
    b_lo = [lo_ - s for lo_, s in zip(a_lo, shifts, strict=True)]
    b_hi = [hi_ - s for hi_, s in zip(a_hi, shifts, strict=True)]
    extent = [h_ - l_ for l_, h_ in zip(a_lo, a_hi, strict=True)]
    count = np.ones(())
    for e in extent:
        count = np.multiply.outer(count, e.astype(np.float64))
    sa, saa = _box_sums(a, a_lo, a_hi), _box_sums(a * a, a_lo, a_hi)
    sb, sbb = _box_sums(b, b_lo, b_hi), _box_sums(b * b, b_lo, b_hi)
    with np.errstate(divide="ignore", invalid="ignore"):
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


def _cross_products(a: np.ndarray, b: np.ndarray, shifts: list[np.ndarray]) -> np.ndarray:
    """``sum_k a[k + s] * b[k]`` over the overlap, for the outer product of ``shifts``.

    Parameters
    ----------
    a, b : numpy.ndarray, shape (*spatial), float64
    shifts : list of numpy.ndarray, shape (k_axis,), int

    Returns
    -------
    numpy.ndarray, shape (*k), float64
    """
    size = [sfft.next_fast_len(int(max(na - s[0], s[-1] + nb)), real=True)
            for na, nb, s in zip(a.shape, b.shape, shifts, strict=True)]
    axes = tuple(range(a.ndim))
    spectrum = sfft.rfftn(a, size, axes=axes)
    spectrum *= np.conj(sfft.rfftn(b, size, axes=axes))
    cross = sfft.irfftn(spectrum, size, axes=axes, overwrite_x=True)
    return cross[np.ix_(*[s % n for s, n in zip(shifts, size, strict=True)])]


# ------------------------------------------------------------------------------------- choosing


def within_radius(lo: np.ndarray, hi: np.ndarray, nominal: np.ndarray,
                  radius: float) -> np.ndarray:
    """Shifts in ``[lo, hi]`` no farther than ``radius`` from ``nominal`` in any axis.

    Returns
    -------
    numpy.ndarray, shape ``hi - lo + 1``, bool
    """
    ok = np.ones((), dtype=bool)
    for l_, h_, n in zip(lo, hi, nominal, strict=True):
        ok = np.logical_and.outer(ok, np.abs(np.arange(l_, h_ + 1) - n) <= radius + 1e-9)
    return ok


def thick(lo, hi, shape_a, shape_b, min_extent: int) -> np.ndarray:
    """Shifts in ``[lo, hi]`` whose overlap is at least ``min_extent`` thick in every axis."""
    ok = np.ones((), dtype=bool)
    for l_, h_, na, nb in zip(lo, hi, shape_a, shape_b, strict=True):
        s = np.arange(l_, h_ + 1)
        extent = np.minimum(na, s + nb) - np.maximum(0, s)
        ok = np.logical_and.outer(ok, extent >= min(min_extent, na, nb))
    return ok


def edge(best: tuple[int, ...], misfit: np.ndarray, inside: np.ndarray,
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


def choose(scores, msd, inside, noise2) -> tuple[tuple[int, ...] | None, bool]:
    """Best whole-pixel shift inside the radius, and whether it is the same-exposure one."""
    best = argmax(scores, inside)
    if best is None:
        return None, False
    closest = argmax(-msd, inside)
    if prefer_same_exposure(scores[closest], scores[best], msd[closest], noise2):
        return closest, True
    return best, False


def ambiguity(misfit: np.ndarray, inside: np.ndarray, best: tuple[int, ...],
              roughness: float) -> np.ndarray:
    """Covariance of the shifts beyond one pixel from ``best`` that fit about as well.

    The misfit map (sum of squares over the overlap, per whole-pixel shift) is compared with
    ``roughness``, how much noise alone makes it vary between shifts (the noise variance times
    the square root of twice the pixel count): ``exp(-(misfit - min) / (2 * roughness))``
    weighs the shifts. On a flat ridge or a repeating pattern the far shifts keep weight and the
    link's uncertainty grows along them; on distinct content they weigh nothing.

    Returns
    -------
    numpy.ndarray, shape (ndim, ndim)
    """
    ndim = misfit.ndim
    if roughness <= 0:
        return np.zeros((ndim, ndim))
    ok = inside & np.isfinite(misfit)
    excess = (misfit - misfit[best]) / (2 * roughness)
    weight = np.where(ok, np.exp(-np.clip(excess, 0, 700)), 0.0)
    total = weight.sum()
    weight[tuple(slice(max(0, k - 1), k + 2) for k in best)] = 0.0  # keep the far shifts
    weight /= total
    delta = [(np.arange(n) - k).reshape((-1,) + (1,) * (ndim - 1 - axis))
             for axis, (n, k) in enumerate(zip(misfit.shape, best, strict=True))]
    out = np.empty((ndim, ndim))
    for k in range(ndim):
        for l_ in range(k, ndim):
            out[k, l_] = out[l_, k] = float(np.sum(weight * delta[k] * delta[l_]))
    return out


def prefer_same_exposure(ncc_same: float, ncc_best: float, msd_same: float,
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


def argmax(scores: np.ndarray, mask: np.ndarray) -> tuple[int, ...] | None:
    """Index of the largest finite score where ``mask`` holds; None if there is none."""
    masked = np.where(mask & np.isfinite(scores), scores, -np.inf)
    flat = int(np.argmax(masked))
    if not np.isfinite(masked.flat[flat]):
        return None
    return tuple(int(v) for v in np.unravel_index(flat, scores.shape))
