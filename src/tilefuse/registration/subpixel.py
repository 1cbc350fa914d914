"""Sub-pixel refinement: the fractional shift, and its covariance, near a whole-pixel optimum.

The shift is refined by minimising a least-squares misfit with crop ``b`` resampled by cubic
splines (through the Gram matrix of the spline taps, so each evaluation is cheap), down to the
scale the content supports above the noise. The covariance is local: noise-corrected Fisher
information of the overlap, scaled by the misfit left at the optimum.

Pairs are measured in parallel threads, so the large matrix products here go through
:func:`serial_gram`, in blocks small enough for BLAS to stay on one thread: a threaded BLAS
call per pair only adds contention (its spinning helper threads take the core the other pair
needs).
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
from scipy import ndimage

from tilefuse.registration.search import (
    SAME_EXPOSURE_NOISE,
    limit_region,
    overlap_slices,
    prefer_same_exposure,
)

__all__ = ["REFINE_MAX_PIXELS", "noise_sigma", "refine_subpixel", "serial_gram"]

MAX_TRAVEL = 2.5
_REFINE_MARGIN = 3
_TAPS = np.arange(-2, 3)
_BLAS_SERIAL = 2**18
_BLAS_ROWS = 1024
_GRADIENT_SIGMA = 1.5
REFINE_MAX_PIXELS = {2: 2**17, 3: 2**15}
_STENCIL_START = 1.0
_STENCIL_MIN = 0.125
_STENCIL_ITERS = 16
_SPLINE_POLE = np.sqrt(3.0) - 2.0
_SPLINE_LAG = np.abs(np.subtract.outer(np.arange(4), np.arange(4)))
_SPLINE_AUTOCORRELATION = (6 * _SPLINE_POLE / (1 - _SPLINE_POLE**2)) ** 2 * (
    _SPLINE_POLE**_SPLINE_LAG * (_SPLINE_LAG + (1 + _SPLINE_POLE**2) / (1 - _SPLINE_POLE**2)))

def noise_sigma(image: np.ndarray) -> float:
    """Robust estimate of the standard deviation of white noise in ``image``.

    The image is filtered by a second difference along every axis (Immerkaer's kernel in 2D),
    which removes smooth content; the median absolute value of the result is scaled to a
    Gaussian standard deviation.
    """
    out = np.asarray(image, dtype=np.float64)
    if min(out.shape) < 3:
        return 0.0
    for axis in range(out.ndim):  # second differences of the interior only
        lo, mid, hi = (tuple(slice(k, out.shape[axis] - 2 + k) if i == axis else slice(None)
                             for i in range(out.ndim)) for k in range(3))
        out = (out[lo] + out[hi]) - 2.0 * out[mid]
    return float(np.median(np.abs(out)) / 0.6745 / np.sqrt(6.0**out.ndim))


def _noise_gain_1d(frac: np.ndarray) -> np.ndarray:
    """Sum of squared weights of the cubic-spline interpolator at fractional shifts.

    The interpolator's impulse response is the cardinal cubic spline
    ``eta(x) = sum_j c_j * beta3(x - j)``, ``c_j = A * z**|j|`` (``z = sqrt(3) - 2``,
    ``A = -6 z / (1 - z**2)``). At a shift with B-spline weights ``w`` (4 taps) the gain
    ``sum_k eta(k - frac)**2`` is ``w @ R @ w``, ``R`` the autocorrelation of ``c``:
    ``R(d) = A**2 * z**|d| * (|d| + (1 + z**2) / (1 - z**2))``.

    Parameters
    ----------
    frac : numpy.ndarray, shape (m,)

    Returns
    -------
    numpy.ndarray, shape (m,)
    """
    f = np.asarray(frac, dtype=np.float64)
    u = (f - np.floor(f))[:, None]
    weights = _bspline3(np.arange(-1, 3) - u)  # (m, 4)
    return np.einsum("ij,jk,ik->i", weights, _SPLINE_AUTOCORRELATION, weights)


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
        self.saa = float(np.einsum("i,i", self.av, self.av))  # no BLAS: see serial_gram
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
                          for r, n in zip(region_b, b.shape, strict=True))
            inner = tuple(slice(r.start - g.start, r.stop - g.start)
                          for r, g in zip(region_b, grown, strict=True))
            self._gradient_cols = np.stack([g[inner].ravel() for g in _gradients(b[grown])],
                                           axis=1)
        cols = self._gradient_cols
        if photometric:  # project out gain and offset: Schur complement of [cols, b, 1]
            ndim = cols.shape[1]
            values = b[region_b].ravel()
            basis = [values - values.mean(), np.ones(cols.shape[0])]
            gram = serial_gram(np.column_stack([cols, *basis]))
            cross = gram[:ndim, ndim:]
            gram = gram[:ndim, :ndim] - cross @ np.linalg.solve(gram[ndim:, ndim:], cross.T)
        else:
            gram = serial_gram(cols)
        noise = cols.shape[0] * self.noise2 * _gradient_noise_gain(b.ndim)
        info = gram - noise * np.eye(gram.shape[0])
        values, vectors = np.linalg.eigh((info + info.T) / 2)
        floor = max(float(values.max()), 1.0) * 1e-9
        return (vectors * np.maximum(values, floor)) @ vectors.T

    def _gram(self, base: tuple[int, ...]):
        """Gram matrix of the spline taps at ``base``, their products with ``a``, their sums.

        Returns
        -------
        gram : numpy.ndarray, shape (t, t)
        cross, colsum : numpy.ndarray, shape (t,)
            ``t = 5**ndim`` taps.
        """
        if base not in self.grams:
            shape = tuple(r.stop - r.start for r in self.region_a)
            cols = np.empty((len(self.taps) + 1, *shape))  # one row per tap, then a itself
            for row, tap in zip(cols[:-1], self.taps, strict=True):
                offset = self.start + np.asarray(base) - tap - self.pad
                row[...] = self.coeffs[tuple(slice(r.start - o, r.stop - o)
                                             for r, o in zip(self.region_a, offset, strict=True))]
            cols[-1] = self.av.reshape(shape)
            flat = cols.reshape(len(cols), -1)
            gram = serial_gram(flat.T)
            self.grams[base] = (gram[:-1, :-1], gram[:-1, -1], flat[:-1].sum(axis=1))
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
            gain *= _noise_gain_1d(points[:, axis])
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


def serial_gram(cols: np.ndarray) -> np.ndarray:
    """``cols.T @ cols`` in row blocks small enough for BLAS to stay on one thread.

    Parameters
    ----------
    cols : numpy.ndarray, shape (n, k)

    Returns
    -------
    numpy.ndarray, shape (k, k)

    Notes
    -----
    Pairs are measured in parallel threads already; OpenBLAS threads a product with many rows
    even when its result is tiny, and its idle helper threads spin on the core the other pair
    needs (measured: 2 pairs at a time ran 1.5-2x slower than with one BLAS thread).
    """
    k = cols.shape[1]
    rows = max(8, min(_BLAS_ROWS, _BLAS_SERIAL // (k * k)))
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
    for c, (k, l_) in zip(coef[ndim + 1 :], pairs, strict=True):
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
        regions = limit_region(regions, REFINE_MAX_PIXELS.get(start.size, 2**15))
    if regions is None or any(s.stop - s.start < 3 for s in regions[0]):
        return _parabola(start, scores, lo), np.eye(start.size)
    objective = _Objective(crop_a, crop_b, start, regions, noise2_b)
    plain = _fit(objective, crop_b, regions, start, noise2, photometric=False)
    if plain is not None and plain[3] <= SAME_EXPOSURE_NOISE * noise2:
        return plain[0], plain[2]  # the pixels agree as they are: nothing to choose
    full = _fit(objective, crop_b, regions, start, noise2, photometric=True)
    if plain is not None and full is not None:
        same = prefer_same_exposure(plain[1], full[1], plain[3], noise2)
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
