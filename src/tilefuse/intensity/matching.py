"""Per-tile gain (and offset) matching from the pixels the tiles share.

For every pair of overlapping tiles the interior of their overlap is cut from both tiles (at the
layout's positions rounded to whole pixels), optionally flat/dark corrected, and summarised by
robust statistics. A sparse weighted least-squares solve over all pairs then finds one gain per
tile and channel (in the log domain) so that neighbours agree, with the mean log gain of every
connected group of tiles held at 0 so the overall brightness is kept. Optionally a per-tile
offset is solved too (quantile matching, linear least squares). Pairs that disagree with the
solution are down-weighted (iteratively reweighted least squares, Tukey's biweight). The normal
equations stay as sparse as the tile graph, so thousands of tiles solve in a second or two.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import spsolve

from tilefuse.errors import InputError
from tilefuse.intensity.apply import TileCorrection
from tilefuse.io.tile_cache import read_tile
from tilefuse.model.layout import Layout
from tilefuse.plan.geometry import neighbour_overlaps

__all__ = [
    "OverlapRegion",
    "match_intensity",
    "overlap_regions",
    "pair_statistics",
    "region_pixels",
]

log = logging.getLogger(__name__)

MARGIN = 4  # pixels left out along each side of an overlap (seams, interpolation edges)
TRIM = 0.05  # fraction discarded at each end before averaging
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)  # matched pairwise when solving for offsets too
MIN_PIXELS = 16  # overlaps with fewer usable pixels are ignored
IRLS_ITERATIONS = 4
TUKEY_C = 4.685
GAIN_RIDGE = 1e-4  # square root of the pull of each gain towards 1 (offset mode)
MIN_WEIGHT = 1e-3  # relative weight floor of a rejected pair (keeps the tile graph connected)


@dataclass(frozen=True, slots=True)
class OverlapRegion:
    """The interior of the overlap of tiles ``i`` and ``j``, as slices into each tile.

    Attributes
    ----------
    i, j : int
        Tile indices, ``i < j``.
    slices_i, slices_j : tuple of slice
        Spatial slices (one per axis) selecting the same mosaic pixels in each tile.
    """

    i: int
    j: int
    slices_i: tuple[slice, ...]
    slices_j: tuple[slice, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.slices_i)


def overlap_regions(layout: Layout, margin: int = MARGIN) -> list[OverlapRegion]:
    """The interior of every neighbouring pair's overlap, at whole-pixel positions.

    Only the translation part of each affine is used (positions rounded to integers): exact for
    translated tiles, an approximation for slightly rotated or scaled ones. Each overlap is
    shrunk by ``margin`` pixels along each side (less when the overlap is thin, keeping at least
    half of it).

    Returns
    -------
    list of OverlapRegion
        Pairs in :func:`tilefuse.plan.geometry.neighbour_overlaps` order; empty overlaps left out.
    """
    pairs = neighbour_overlaps(layout).pairs
    pos = np.rint(layout.positions).astype(np.int64)
    shapes = np.array([t.shape for t in layout.tiles], dtype=np.int64)
    regions = []
    for i, j in pairs:
        lo = np.maximum(pos[i], pos[j])
        hi = np.minimum(pos[i] + shapes[i], pos[j] + shapes[j])
        shrink = np.minimum(margin, (hi - lo) // 4)
        lo, hi = lo + shrink, hi - shrink
        if np.any(hi <= lo):
            continue
        regions.append(OverlapRegion(
            int(i), int(j),
            tuple(slice(int(a), int(b)) for a, b in zip(lo - pos[i], hi - pos[i], strict=True)),
            tuple(slice(int(a), int(b)) for a, b in zip(lo - pos[j], hi - pos[j], strict=True)),
        ))
    return regions


def _correction_of(corrections, index: int) -> TileCorrection | None:
    if corrections is None or isinstance(corrections, TileCorrection):
        return corrections
    return corrections[index]


def _crop(field: np.ndarray, slices: tuple[slice, ...]) -> np.ndarray:
    """Cut a (c, *spatial) field to ``slices``, honouring axes of size 1 (broadcast)."""
    sl = tuple(slice(None) if n == 1 else s for n, s in zip(field.shape[1:], slices, strict=True))
    return field[(slice(None), *sl)]


def region_pixels(
    layout: Layout, index: int, slices: tuple[slice, ...], corr: TileCorrection | None
) -> tuple[np.ndarray, np.ndarray]:
    """One tile's pixels in an overlap, flat/dark corrected, and which of them are saturated.

    Returns
    -------
    values : numpy.ndarray, shape (c, *region), float32
    saturated : numpy.ndarray of bool, shape (*region)
        Pixels at the dtype's maximum in any channel (integer tiles only).
    """
    raw = read_tile(layout.tiles[index].source)[(slice(None), *slices)]
    if np.dtype(raw.dtype).kind in "ui":
        saturated = np.any(raw >= np.iinfo(raw.dtype).max, axis=0)
    else:
        saturated = np.zeros(raw.shape[1:], dtype=bool)
    values = raw.astype(np.float32)
    if corr is not None and corr.dark is not None:
        values -= _crop(corr.dark, slices)
    if corr is not None and corr.flat is not None:
        values /= _crop(corr.flat, slices)
    return values, saturated


def _trimmed_mean(values: np.ndarray) -> np.ndarray:
    """Per-channel mean between the TRIM and 1 - TRIM quantiles, (c, n) -> (c,)."""
    lo, hi = np.quantile(values, [TRIM, 1 - TRIM], axis=1, keepdims=True)
    inside = (values >= lo) & (values <= hi)
    return np.sum(values * inside, axis=1) / np.maximum(inside.sum(axis=1), 1)


def pair_statistics(
    layout: Layout,
    regions: Sequence[OverlapRegion],
    corrections: TileCorrection | Sequence[TileCorrection] | None = None,
    quantiles: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Robust intensity statistics of both tiles over each overlap.

    Saturated pixels (in either tile) are left out. Without ``quantiles`` the statistic is the
    5 %-trimmed mean; with them, those quantiles of each tile's pixels.

    Returns
    -------
    stat_i, stat_j : numpy.ndarray, shape (n_regions, c, k), float64
        ``k`` is 1 (trimmed mean) or ``len(quantiles)``.
    n_pixels : numpy.ndarray, shape (n_regions,), int
        Usable pixels per overlap (0 where the overlap was useless).
    """
    n_ch, k = len(layout.channels), 1 if quantiles is None else len(quantiles)
    stat_i = np.full((len(regions), n_ch, k), np.nan)
    stat_j = np.full((len(regions), n_ch, k), np.nan)
    n_pixels = np.zeros(len(regions), dtype=np.int64)
    for r, reg in enumerate(regions):
        a, sat_a = region_pixels(layout, reg.i, reg.slices_i, _correction_of(corrections, reg.i))
        b, sat_b = region_pixels(layout, reg.j, reg.slices_j, _correction_of(corrections, reg.j))
        keep = ~(sat_a | sat_b)
        n_pixels[r] = int(keep.sum())
        if n_pixels[r] < MIN_PIXELS:
            n_pixels[r] = 0
            continue
        a, b = a[:, keep].astype(np.float64), b[:, keep].astype(np.float64)
        if quantiles is None:
            stat_i[r, :, 0], stat_j[r, :, 0] = _trimmed_mean(a), _trimmed_mean(b)
        else:
            stat_i[r] = np.quantile(a, quantiles, axis=1).T
            stat_j[r] = np.quantile(b, quantiles, axis=1).T
    return stat_i, stat_j, n_pixels


def _components(n_tiles: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component label of every tile under ``pairs`` (n_pairs, 2)."""
    graph = sparse.coo_matrix(
        (np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n_tiles, n_tiles)
    )
    return connected_components(graph, directed=False)[1]


def _tukey(residual: np.ndarray) -> np.ndarray:
    """Tukey biweight of residuals scaled by their MAD (all ones when the MAD is 0)."""
    scale = 1.4826 * np.median(np.abs(residual))
    if not np.isfinite(scale) or scale <= 1e-12:
        return np.ones_like(residual)
    u = residual / (TUKEY_C * scale)
    return np.clip(1 - u * u, 0, None) ** 2


def _weighted_solve(
    design: sparse.csr_matrix, rhs: np.ndarray, weights: np.ndarray, prior: sparse.csr_matrix,
    prior_rhs: np.ndarray,
) -> np.ndarray:
    """Minimise ``|W^1/2 (A x - b)|^2 + |E x - e|^2`` through the sparse normal equations."""
    aw = sparse.diags(weights) @ design
    normal = (design.T @ aw + prior.T @ prior).tocsc()
    return np.atleast_1d(spsolve(normal, aw.T @ rhs + prior.T @ prior_rhs))


def _irls(design, rhs, base_weights, prior, prior_rhs, group: np.ndarray) -> np.ndarray:
    """Iteratively reweighted least squares; the rows of one pair (``group``) share a weight.

    ``prior`` rows (constraints, ridge) are never reweighted. Each row of ``prior`` must touch
    few unknowns, so the normal equations stay sparse.
    """
    weights = base_weights.copy()
    x = _weighted_solve(design, rhs, weights, prior, prior_rhs)
    for _ in range(IRLS_ITERATIONS):
        resid = design @ x - rhs
        per_pair = np.sqrt(np.bincount(group, resid**2) / np.maximum(np.bincount(group), 1))
        robust = _tukey(per_pair)
        if np.count_nonzero(robust) < max(1, len(robust) // 2):
            break  # refuse to throw away most of the data
        robust = np.maximum(robust, MIN_WEIGHT)  # an outlier still ties its tiles together
        weights = base_weights * robust[group]
        x = _weighted_solve(design, rhs, weights, prior, prior_rhs)
    return x


def _pins(n_tiles: int, pairs: np.ndarray, n_cols: int, weight: float):
    """One row per connected component with ``weight`` on the component's first tile's
    column: pins the component's free level (sparse, unlike a row over the whole component).

    Returns
    -------
    rows : scipy.sparse.csr_matrix, shape (n_components, n_cols)
    label : numpy.ndarray, shape (n_tiles,)
        Component of every tile.
    """
    label = _components(n_tiles, pairs)
    first = np.unique(label, return_index=True)[1]
    rows = sparse.csr_matrix(
        (np.full(len(first), weight), (np.arange(len(first)), first)), shape=(len(first), n_cols)
    )
    return rows, label


def _centre(values: np.ndarray, label: np.ndarray, how) -> np.ndarray:
    """``how(values[sel])`` of every tile's component, shape (n_tiles,)."""
    out = np.empty_like(values)
    for comp in np.unique(label):
        sel = label == comp
        out[sel] = how(values[sel])
    return out


def _solve_log_gains(
    n_tiles: int, pairs: np.ndarray, mean_i: np.ndarray, mean_j: np.ndarray, w: np.ndarray
) -> np.ndarray:
    """Log gains, shape (n_tiles,): ``x_i - x_j = log(m_j / m_i)``, mean 0 per component."""
    rows = np.arange(len(pairs))
    design = sparse.csr_matrix(
        (np.r_[np.ones(len(pairs)), -np.ones(len(pairs))],
         (np.r_[rows, rows], np.r_[pairs[:, 0], pairs[:, 1]])),
        shape=(len(pairs), n_tiles),
    )
    pins, label = _pins(n_tiles, pairs, n_tiles, 1.0)
    x = _irls(design, np.log(mean_j / mean_i), w, pins, np.zeros(pins.shape[0]), rows)
    return x - _centre(x, label, np.mean)


def _solve_gain_offset(
    n_tiles: int, pairs: np.ndarray, q_i: np.ndarray, q_j: np.ndarray, w: np.ndarray,
    reg: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Gains and offsets, (n_tiles,) each: ``q_i g_i + o_i = q_j g_j + o_j`` per quantile.

    Offsets are solved in units of the median statistic and kept small by a ridge of weight
    ``reg`` per tile (gains feel a far weaker pull to 1, so flat or empty overlaps leave no
    singular system); the first tile of each component is pinned to gain 1 during the solve,
    then every component is rescaled so its gains average 1.
    """
    n_pairs, k = q_i.shape
    scale = float(np.median(np.abs(np.r_[q_i.ravel(), q_j.ravel()]))) or 1.0
    a, b = q_i / scale, q_j / scale
    rows = np.arange(n_pairs * k)
    pi, pj = np.repeat(pairs[:, 0], k), np.repeat(pairs[:, 1], k)
    data = np.r_[a.ravel(), -b.ravel(), np.ones(rows.size), -np.ones(rows.size)]
    cols = np.r_[pi, pj, n_tiles + pi, n_tiles + pj]
    design = sparse.csr_matrix((data, (np.tile(rows, 4), cols)), shape=(rows.size, 2 * n_tiles))
    big = np.sqrt(float(np.sum(w)) * k + 1.0) * 10
    pins, label = _pins(n_tiles, pairs, 2 * n_tiles, big)
    ridge = sparse.diags(np.r_[np.full(n_tiles, GAIN_RIDGE), np.full(n_tiles, np.sqrt(reg))])
    prior = sparse.vstack([pins, ridge]).tocsr()
    prior_rhs = np.r_[np.full(pins.shape[0], big), np.full(n_tiles, GAIN_RIDGE),
                      np.zeros(n_tiles)]
    x = _irls(design, np.zeros(rows.size), np.repeat(w, k), prior, prior_rhs,
              np.repeat(np.arange(n_pairs), k))
    norm = _centre(x[:n_tiles], label, np.mean)
    gains, offsets = x[:n_tiles] / norm, x[n_tiles:] * scale / norm
    return gains, offsets - _centre(offsets, label, np.mean)


def _pair_weights(n_pixels: np.ndarray, level: np.ndarray) -> np.ndarray:
    """Weight of a pair, mean 1: the square root of its pixel count, reduced for overlaps much
    darker than the typical one (their ratio is mostly noise and black level).

    Parameters
    ----------
    n_pixels : numpy.ndarray, shape (n_pairs,)
    level : numpy.ndarray, shape (n_pairs,)
        The darker tile's statistic over the overlap.
    """
    typical = float(np.median(level))
    dim = np.clip(level / typical, 0.0, 1.0) if typical > 0 else np.ones_like(level)
    w = np.sqrt(n_pixels.astype(np.float64)) * np.maximum(dim, 1e-3)
    return w / w.mean()


def match_intensity(
    layout: Layout,
    *,
    corrections: TileCorrection | Sequence[TileCorrection] | None = None,
    offset: bool = False,
    margin: int = MARGIN,
    offset_reg: float = 1e-2,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-tile, per-channel gains (and offsets) that make overlapping tiles agree.

    Tiles are compared where they overlap, at the layout's positions rounded to whole pixels;
    for general affines only the translation part is used (fine for small rotations, wrong for
    large ones). Register the layout first: misplaced tiles compare different content.

    Parameters
    ----------
    layout : Layout
    corrections : TileCorrection or sequence of TileCorrection, optional
        Flat and dark fields applied to the tiles before they are compared (one correction for
        all tiles, or one per tile); their ``gain`` and ``offset`` are ignored.
    offset : bool
        Also solve a per-tile additive offset: quantiles (10, 25, 50, 75, 90 %) of the two tiles
        are matched, ``q_i g_i + o_i = q_j g_j + o_j``, in linear least squares with a ridge
        keeping offsets small, gains averaging 1 and offsets averaging 0 per connected group.
        Without it, 5 %-trimmed means are matched on log gains.
    margin : int
        Pixels left out along each side of an overlap.
    offset_reg : float
        Ridge weight on the offsets (in units of the median intensity), per tile.

    Returns
    -------
    gains : numpy.ndarray, shape (n_tiles, c), float32
        Multiply a tile's (flat-corrected) pixels by its gain. Tiles with no usable overlap get 1.
    offsets : numpy.ndarray, shape (n_tiles, c), float32, or None
        Added after the gain; None unless ``offset``.
    """
    if margin < 0:
        raise InputError(f"margin must be >= 0 pixels, got {margin}")
    n_tiles, n_ch = len(layout.tiles), len(layout.channels)
    if corrections is not None and not isinstance(corrections, TileCorrection) and (
        len(corrections) != n_tiles
    ):
        raise InputError(f"got {len(corrections)} corrections for {n_tiles} tiles")
    regions = overlap_regions(layout, margin)
    stats = pair_statistics(layout, regions, corrections, QUANTILES if offset else None)
    pairs = np.array([(r.i, r.j) for r in regions], dtype=np.int64).reshape(-1, 2)
    gains = np.ones((n_tiles, n_ch))
    offsets = np.zeros((n_tiles, n_ch))
    for ch in range(n_ch):
        gains[:, ch], offsets[:, ch] = _solve_channel(n_tiles, pairs, stats, ch, offset,
                                                      offset_reg)
    log.debug("intensity matching: %d of %d overlaps usable", int(np.sum(stats[2] > 0)),
              len(regions))
    return gains.astype(np.float32), offsets.astype(np.float32) if offset else None


def _solve_channel(n_tiles: int, pairs: np.ndarray, stats, ch: int, offset: bool,
                   offset_reg: float) -> tuple[np.ndarray, np.ndarray]:
    """Gains and offsets of one channel, (n_tiles,) each (offsets 0 without ``offset``)."""
    stat_i, stat_j, n_pix = stats[0][:, ch], stats[1][:, ch], stats[2]
    ok = (n_pix > 0) & np.all(np.isfinite(stat_i) & np.isfinite(stat_j), axis=1)
    if not offset:
        ok &= (stat_i[:, 0] > 0) & (stat_j[:, 0] > 0)
    gains, offsets = np.ones(n_tiles), np.zeros(n_tiles)
    if not np.any(ok):
        return gains, offsets
    level = np.minimum(np.abs(stat_i[ok]).mean(axis=1), np.abs(stat_j[ok]).mean(axis=1))
    w = _pair_weights(n_pix[ok], level)
    if offset:
        gains, offsets = _solve_gain_offset(n_tiles, pairs[ok], stat_i[ok], stat_j[ok], w,
                                            offset_reg)
    else:
        gains = np.exp(_solve_log_gains(n_tiles, pairs[ok], stat_i[ok, 0], stat_j[ok, 0], w))
    bad = ~(np.isfinite(gains) & (gains > 0) & np.isfinite(offsets))
    if np.any(bad):
        log.warning("intensity matching, channel %d: no sensible gain for %d tiles; they keep "
                    "gain 1 (their overlaps are flat or empty)", ch, int(bad.sum()))
        gains[bad], offsets[bad] = 1.0, 0.0
    return gains, offsets
