"""Flat-field (and optional dark-field) estimation from the tiles themselves, no reference images.

The flat field ``F`` is modelled as ``exp(P(y, x))`` with ``P`` a low-order 2D polynomial over the
tile (default degree 2: smooth vignetting), estimated from two sources:

1. **Overlaps** (the main source, needs overlapping tiles at registered positions). Where tiles
   ``i`` and ``j`` see the same mosaic point, ``log I_i - log I_j = t_i - t_j + P(p_i) - P(p_j)``
   with ``t`` the tiles' log gains and ``p_i``, ``p_j`` the point's coordinates in each tile.
   Overlaps are cut into small blocks (block means, dark blocks and saturated pixels left out)
   and ``P`` and ``t`` are solved jointly by robust (Tukey-reweighted) least squares. This does
   not depend on the content at all, as long as there is some.
2. **Content** (the fallback for what the overlaps cannot tell): a random sample of tiles,
   z-averaged and binned to at most :data:`WORK_SIZE` pixels, each divided by its own trimmed
   mean, then the per-pixel median over tiles, fitted by the same polynomial. This is the classic
   retrospective estimate; it needs many tiles of varied content and is much noisier.

What cannot be known: a linear tilt of ``P`` and a linear ramp of the tile gains across the
mosaic explain the overlaps equally well. The solve picks the tilt that leaves the tile gains
with no linear trend over the mosaic (a ridge on ``t``); when the true gains do drift across the
acquisition (e.g. bleaching along the scan), that drift ends up as a tilt of the flat, and the
corrected mosaic keeps a gentle global ramp instead of seams. The error shrinks with the number
of tiles in the overlap patch (about ``gain spread / sqrt(tiles)`` across the mosaic).

``smooth_sigma`` optionally multiplies in the Gaussian-smoothed content residual (median over
polynomial), for shading that no low-order polynomial follows. It is off by default: on the
synthetic tests (16 to 144 tiles) it made the estimate worse, since the content median is noisy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from scipy import ndimage, sparse

from tilefuse.errors import InputError
from tilefuse.intensity.apply import TileCorrection
from tilefuse.intensity.matching import overlap_regions, region_pixels
from tilefuse.io.tile_cache import read_tile
from tilefuse.model.layout import Layout

__all__ = ["WORK_SIZE", "estimate_flatfield"]

log = logging.getLogger(__name__)

WORK_SIZE = 256  # longest side of the binned tiles the field is estimated on
TRIM = 0.05  # fraction discarded at each end for a tile's robust mean
DARK_PERCENTILE = 2.0
MIN_DARK_TILES = 8  # sampled tiles needed before a per-pixel low percentile means anything
MIN_FLAT = 1e-3  # floor of the normalised flat field (never divide by ~0)
BLOCK_FLOOR = 0.1  # overlap blocks darker than this fraction of the mean block are skipped


def _common_shape(layout: Layout) -> tuple[int, ...]:
    """The tile shape shared by every tile, or InputError."""
    shapes = sorted({t.shape for t in layout.tiles})
    if len(shapes) != 1:
        where = f" in {layout.origin}" if layout.origin else ""
        listed = ", ".join(map(str, shapes[:4])) + (", ..." if len(shapes) > 4 else "")
        raise InputError(
            f"a flat field needs tiles of one shape; the tiles{where} have "
            f"{len(shapes)} shapes: {listed}"
        )
    return shapes[0]


def _yx(shape: tuple[int, ...]) -> tuple[int, int]:
    """The last two (y, x) sizes of a 2D or 3D shape."""
    return shape[-2], shape[-1]


def _bin_factor(shape_yx: tuple[int, int]) -> int:
    return max(1, -(-max(shape_yx) // WORK_SIZE))


def _binned(image: np.ndarray, factor: int) -> np.ndarray:
    """Block means of ``factor`` x ``factor`` pixels, (c, y, x) -> (c, y // f, x // f), float64."""
    if factor == 1:
        return image.astype(np.float64)
    c, ny, nx = image.shape
    ny, nx = ny // factor * factor, nx // factor * factor
    blocks = image[:, :ny, :nx].reshape(c, ny // factor, factor, nx // factor, factor)
    return blocks.mean(axis=(2, 4), dtype=np.float64)


def _pick_tiles(layout: Layout, sample: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the tiles whose content is sampled, sorted."""
    n = len(layout.tiles)
    return np.sort(rng.choice(n, size=min(int(sample), n), replace=False))


def _sample_stack(layout: Layout, picks: np.ndarray, tick: Callable[[], None]) -> np.ndarray:
    """Tiles `picks`, z-averaged and binned, shape (n_sampled, c, by, bx), float64."""
    factor = _bin_factor(_yx(layout.tiles[0].shape))
    stack = []
    for i in picks:
        data = read_tile(layout.tiles[i].source)
        if data.ndim == 4:  # (c, z, y, x): vignetting is the same in every plane
            data = data.mean(axis=1, dtype=np.float64)
        stack.append(_binned(data, factor))
        tick()
    log.debug("flat field from %d of %d tiles, binned by %d", len(picks), len(layout.tiles),
              factor)
    return np.stack(stack)


def _trimmed_mean(values: np.ndarray, axis: tuple[int, ...]) -> np.ndarray:
    """Mean between the TRIM and 1 - TRIM quantiles along ``axis``."""
    lo, hi = np.quantile(values, [TRIM, 1 - TRIM], axis=axis, keepdims=True)
    inside = (values >= lo) & (values <= hi)
    return np.sum(values * inside, axis=axis) / np.maximum(np.sum(inside, axis=axis), 1)


def _estimate_dark(stack: np.ndarray, sigma: float) -> np.ndarray:
    """Dark field: smoothed per-pixel low percentile over the sampled tiles, (c, by, bx).

    This assumes that every pixel of the camera sees empty, unlabelled background in at least a
    few percent of the sampled tiles, and that this background emits nothing; a uniform
    autofluorescent background is then (wrongly but harmlessly for fusion) counted as dark.
    """
    low = np.percentile(stack, DARK_PERCENTILE, axis=0)
    return np.stack([ndimage.gaussian_filter(ch, sigma, mode="nearest") for ch in low])


def _poly_terms(y: np.ndarray, x: np.ndarray, degree: int) -> np.ndarray:
    """2D monomials y**a * x**b, 0 < a + b <= degree, shape (n_terms, *y.shape).

    The constant is left out (the flat is normalised afterwards); the first two terms are the
    linear ones, y and x.
    """
    return np.stack([y**a * x ** (d - a) for d in range(1, degree + 1) for a in range(d, -1, -1)])


def _unit(pix: np.ndarray, n_full: int) -> np.ndarray:
    """Tile pixel coordinates mapped to [-1, 1] over an axis of ``n_full`` pixels."""
    centre = (n_full - 1) / 2
    return (np.asarray(pix, dtype=np.float64) - centre) / max(centre, 1.0)


def _bin_grid(shape: tuple[int, int], factor: int, full: tuple[int, int]):
    """[-1, 1] coordinates of the bin centres of a binned tile, two arrays of ``shape``."""
    axes = [_unit(np.arange(n) * factor + (factor - 1) / 2, nf)
            for n, nf in zip(shape, full, strict=True)]
    return np.meshgrid(*axes, indexing="ij")


def _robust_lstsq(design, values: np.ndarray, weights: np.ndarray,
                  ridge: np.ndarray | None = None, prior: np.ndarray | None = None,
                  iterations: int = 4) -> np.ndarray:
    """Tukey-reweighted least squares, optionally pulled towards ``prior`` by ``ridge``.

    ``design`` is a dense array or a scipy.sparse matrix with few columns (the normal equations
    are solved dense).
    """
    n = design.shape[1]
    ridge = np.zeros(n) if ridge is None else ridge
    prior = np.zeros(n) if prior is None else prior
    if not np.any(weights > 0):
        return prior.copy()
    w = weights.copy()
    coef = prior.copy()
    for _ in range(iterations + 1):
        weighted = sparse.diags(w) @ design if sparse.issparse(design) else design * w[:, None]
        normal = design.T @ weighted
        normal = normal.toarray() if sparse.issparse(normal) else normal
        rhs = weighted.T @ values + ridge * prior
        coef = np.linalg.solve(normal + np.diag(ridge) + 1e-12 * np.eye(n), rhs)
        resid = values - design @ coef
        scale = 1.4826 * np.median(np.abs(resid[weights > 0])) * 4.685
        if not scale > 0:
            break
        w = weights * np.clip(1 - (resid / scale) ** 2, 0, None) ** 2
    return coef


def _fit_content(median: np.ndarray, degree: int, factor: int, full: tuple[int, int]):
    """Robust polynomial fit of log(median), one channel; coefficients without the constant."""
    y, x = _bin_grid(median.shape, factor, full)
    terms = _poly_terms(y, x, degree).reshape(-1, median.size).T
    design = np.column_stack([np.ones(median.size), terms])
    values = median.ravel()
    usable = values > 0.05 * np.mean(values)
    logv = np.log(np.where(usable, values, 1.0))
    return _robust_lstsq(design, logv, usable.astype(np.float64))[1:]


def _evaluate(coef: np.ndarray, degree: int, full: tuple[int, int]) -> np.ndarray:
    """exp(polynomial) on the full tile grid, shape ``full``, float64."""
    y, x = np.meshgrid(_unit(np.arange(full[0]), full[0]), _unit(np.arange(full[1]), full[1]),
                       indexing="ij")
    return np.exp(np.tensordot(coef, _poly_terms(y, x, degree), axes=1))


def _block_means(values: np.ndarray, saturated: np.ndarray, block: int):
    """(c, [z,] y, x) region -> per-block means (c, by, bx) and block saturation (by, bx)."""
    if values.ndim == 4:
        values, saturated = values.mean(axis=1), np.asarray(saturated.any(axis=0))
    c, ny, nx = values.shape
    by, bx = ny // block, nx // block
    v = values[:, : by * block, : bx * block].reshape(c, by, block, bx, block)
    s = saturated[: by * block, : bx * block].reshape(by, block, bx, block)
    return v.mean(axis=(2, 4), dtype=np.float64), s.any(axis=(1, 3))


def _block_centres(slices: tuple[slice, ...], counts: tuple[int, ...], block: int,
                   full: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """[-1, 1] tile coordinates of the block centres of an overlap region, (by, bx) each."""
    axes = [_unit(s.start + np.arange(n) * block + (block - 1) / 2, nf)
            for s, n, nf in zip(slices[-2:], counts, full, strict=True)]
    y, x = np.meshgrid(*axes, indexing="ij")
    return y, x


def _overlap_equations(
    layout: Layout, regions, dark: np.ndarray | None, degree: int, full: tuple[int, int],
    tick: Callable[[], None],
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray] | tuple[None, None, None]]:
    """Per channel, over overlap blocks: ``log I_i - log I_j = t_i - t_j + dlogF``.

    Returns, per channel, ``(dterms, pairs, rhs)``: the difference of the polynomial terms at
    the block's two tile coordinates (n_rows, n_terms), the tile indices (n_rows, 2) and the log
    ratio (n_rows,); ``(None, None, None)`` when no block was usable.
    """
    block = max(2, max(full) // 64)
    corr = None if dark is None else TileCorrection(dark=dark)
    out: list[tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]] = [
        ([], [], []) for _ in layout.channels]
    for reg in regions:
        vi, si = _block_means(*region_pixels(layout, reg.i, reg.slices_i, corr), block)
        vj, sj = _block_means(*region_pixels(layout, reg.j, reg.slices_j, corr), block)
        tick()
        if vi.shape[1] * vi.shape[2] < 4:
            continue
        diff = (_poly_terms(*_block_centres(reg.slices_i, vi.shape[1:], block, full), degree)
                - _poly_terms(*_block_centres(reg.slices_j, vj.shape[1:], block, full), degree))
        diff = diff.reshape(len(diff), -1).T
        for ch in range(len(layout.channels)):
            a, b = vi[ch].ravel(), vj[ch].ravel()
            floor = BLOCK_FLOOR * max(np.mean(a), np.mean(b), 0.0)
            keep = ~(si | sj).ravel() & (a > floor) & (b > floor) & (floor > 0)
            if keep.sum() < 4:
                continue
            out[ch][0].append(diff[keep])
            out[ch][1].append(np.tile([reg.i, reg.j], (int(keep.sum()), 1)))
            out[ch][2].append(np.log(a[keep]) - np.log(b[keep]))
    return [(np.concatenate(d), np.concatenate(p), np.concatenate(r)) if d else (None, None, None)
            for d, p, r in out]


def _refine(prior: np.ndarray, dterms: np.ndarray | None, pairs: np.ndarray | None,
            rhs: np.ndarray | None, prior_weight: float) -> np.ndarray:
    """Polynomial coefficients of log(flat) from the overlap equations, jointly with the log
    gains of the tiles involved.

    A tilt of the flat and a ramp of the tile gains across the grid fit the overlaps equally
    well; the tiny ridge on the log gains picks the tilt that leaves the gains without a linear
    trend over the mosaic. Directions the overlaps do not measure at all (a tilt along an axis
    with no neighbours) follow the content fit ``prior``; the higher terms are pulled towards it
    by ``prior_weight`` x the mean data curvature.
    """
    if dterms is None or pairs is None or rhs is None:  # all None: no usable overlap block
        return prior
    tiles, local = np.unique(pairs, return_inverse=True)
    local = local.reshape(pairs.shape)
    rows = np.arange(len(rhs))
    gains = sparse.csr_matrix(  # rhs - (t_i - t_j) = dterms @ c
        (np.r_[-np.ones(len(rows)), np.ones(len(rows))], (np.r_[rows, rows], local.T.ravel())),
        shape=(len(rhs), len(tiles)),
    )
    design = sparse.hstack([sparse.csr_matrix(dterms), gains]).tocsr()
    n_terms = dterms.shape[1]
    curvature = np.trace(dterms.T @ dterms) / n_terms
    ridge = np.r_[np.full(2, 1e-9), np.full(n_terms - 2, prior_weight), np.full(len(tiles), 1e-6)]
    target = np.r_[prior, np.zeros(len(tiles))]
    coef = _robust_lstsq(design, rhs, np.ones(len(rhs)), ridge * curvature, target)
    return coef[:n_terms]


def _smooth_residual(median: np.ndarray, coef: np.ndarray, degree: int, sigma: float,
                     factor: int, full: tuple[int, int]) -> np.ndarray:
    """Gaussian-smoothed ratio of the content median to the polynomial, at full resolution."""
    y, x = _bin_grid(median.shape, factor, full)
    model = np.exp(np.tensordot(coef, _poly_terms(y, x, degree), axes=1))
    ratio = median / model
    ratio /= np.median(ratio)
    ratio = ndimage.gaussian_filter(ratio, sigma / factor, mode="nearest")
    return _upsample(ratio, factor, full)


def _upsample(image: np.ndarray, factor: int, full: tuple[int, int]) -> np.ndarray:
    """Linear interpolation of a binned image back to the full-resolution grid."""
    if factor == 1 and image.shape == tuple(full):
        return image
    coords = [(np.arange(n) - (factor - 1) / 2) / factor for n in full]
    grid = np.meshgrid(*coords, indexing="ij")
    return ndimage.map_coordinates(image, grid, order=1, mode="nearest")


def _sample_regions(layout: Layout, sample: int, rng: np.random.Generator):
    """The overlaps among a compact patch of about ``sample`` neighbouring tiles.

    A patch (breadth-first from a random tile), not scattered pairs: the tilt of the flat is
    told apart from a gain ramp only across a connected group of tiles (see :func:`_refine`).
    """
    regions = overlap_regions(layout)
    if len(layout.tiles) <= sample or not regions:
        return regions
    neighbours: dict[int, list[int]] = {}
    for reg in regions:
        neighbours.setdefault(reg.i, []).append(reg.j)
        neighbours.setdefault(reg.j, []).append(reg.i)
    start = int(rng.choice(sorted(neighbours)))
    chosen, queue = {start}, [start]
    while queue and len(chosen) < sample:
        for nb in neighbours[queue.pop(0)]:
            if nb not in chosen and len(chosen) < sample:
                chosen.add(nb)
                queue.append(nb)
    return [reg for reg in regions if reg.i in chosen and reg.j in chosen]


def estimate_flatfield(
    layout: Layout,
    *,
    sample: int = 64,
    darkfield: bool = False,
    smooth_sigma: float | None = None,
    degree: int = 2,
    overlaps: bool = True,
    prior_weight: float = 1e-6,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Estimate the flat field (and optionally the dark field) shared by a layout's tiles.

    See the module docstring for the method and for what it cannot know (a tilt of the flat
    versus a ramp of the tile gains).

    Parameters
    ----------
    layout : Layout
        Every tile must have the same shape; positions should be registered (overlaps are
        compared at positions rounded to whole pixels, translation part of the affines only).
    sample : int
        Number of tiles read for the content median (random, without replacement), and size of
        the patch of neighbouring tiles whose overlaps are read (breadth-first from a random
        tile); all tiles if fewer. More tiles make the tilt of the flat more accurate.
    darkfield : bool
        Also estimate a dark field: the smoothed per-pixel 2nd percentile over the sampled tiles,
        subtracted before the flat field is estimated. A robust estimate, not BaSiC's low-rank
        decomposition: it assumes each camera pixel sees black background in a few percent of
        the tiles; a uniform background glow is counted as dark.
    smooth_sigma : float, optional
        Gaussian sigma in tile pixels; when given and > 0, the content residual left by the
        polynomial is smoothed and multiplied in (for shading no polynomial follows; needs many
        tiles). Default None: polynomial only.
    degree : int
        Total degree of the polynomial of log(flat), 2 to 8. Degree 2 is the best conditioned;
        higher degrees are less well told apart from the tile gains by the overlaps.
    overlaps : bool
        Use the overlap equations (default). False gives the content-only estimate.
    prior_weight : float
        Pull of the content fit on the overlap fit, relative to the mean data curvature; it
        matters only for what the overlaps barely measure.
    seed : int
        Seed of the sampling.
    progress : callable, optional
        ``progress(done, total, "estimating flat field")`` after each sampled tile and each
        overlap read.

    Returns
    -------
    flat : numpy.ndarray, shape (c, y, x) or (c, 1, y, x) for z-stacks, float32
        Mean 1 per channel; the z axis of size 1 broadcasts over every plane.
    dark : numpy.ndarray, same shape as ``flat``, float32, or None
        In the tiles' intensity units; None unless ``darkfield``.

    Raises
    ------
    InputError
        The tiles do not all have the same shape, or an option is out of range.
    """
    shape = _common_shape(layout)
    if int(sample) < 1:
        raise InputError(f"sample must be a positive number of tiles, got {sample}")
    if smooth_sigma is not None and not smooth_sigma >= 0:
        raise InputError(f"smooth_sigma must be >= 0 pixels, got {smooth_sigma}")
    if not 2 <= int(degree) <= 8:
        raise InputError(f"degree must be between 2 and 8, got {degree}")
    full = _yx(shape)
    factor = _bin_factor(full)
    rng = np.random.default_rng(seed)
    picks = _pick_tiles(layout, sample, rng)
    regions = _sample_regions(layout, sample, rng) if overlaps else []  # rng order as before
    done, total = 0, len(picks) + len(regions)

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, "estimating flat field")

    stack = _sample_stack(layout, picks, tick)
    sigma = 0.0 if smooth_sigma is None else float(smooth_sigma)
    dark = None
    if darkfield:
        if len(stack) < MIN_DARK_TILES:
            raise InputError(f"a dark field needs at least {MIN_DARK_TILES} tiles to compare; "
                             f"got {len(stack)} (raise sample, or estimate without darkfield)")
        stack, dark = _remove_dark(stack, factor, shape)
    median = _content_median(stack)
    prior = [_fit_content(ch, degree, factor, full) for ch in median]
    if overlaps:
        eqs = _overlap_equations(layout, regions, dark, degree, full, tick)
        coefs = [_refine(p, dterms, pairs, rhs, prior_weight)
                 for p, (dterms, pairs, rhs) in zip(prior, eqs, strict=True)]
    else:
        coefs = prior
    flat = np.stack([_evaluate(cf, degree, full) for cf in coefs])
    if sigma > 0:
        flat *= np.stack([_smooth_residual(m, cf, degree, sigma, factor, full)
                          for m, cf in zip(median, coefs, strict=True)])
    flat /= flat.mean(axis=(1, 2), keepdims=True)
    flat = np.maximum(flat, MIN_FLAT).astype(np.float32)
    return (flat[:, None] if len(shape) == 3 else flat), dark


def _remove_dark(stack: np.ndarray, factor: int, shape: tuple[int, ...]):
    """Estimate the dark field and subtract it from the binned stack.

    Returns
    -------
    stack : numpy.ndarray, the binned tiles minus the dark field
    dark : numpy.ndarray, shape (c, y, x) or (c, 1, y, x), float32, at full resolution
    """
    full = _yx(shape)
    dark_bin = _estimate_dark(stack, max(full) / 16 / factor)
    dark = np.stack([_upsample(ch, factor, full) for ch in dark_bin]).astype(np.float32)
    return stack - dark_bin, (dark[:, None] if len(shape) == 3 else dark)


def _content_median(stack: np.ndarray) -> np.ndarray:
    """Per-pixel median of the sampled tiles, each divided by its own trimmed mean, (c, by, bx).
    """
    norm = _trimmed_mean(stack, axis=(2, 3))
    keep = np.all(norm > 0, axis=1)
    if not np.any(keep):
        raise InputError("cannot estimate a flat field: every sampled tile is empty (mean <= 0)")
    return np.median(stack[keep] / norm[keep][:, :, None, None], axis=0)
