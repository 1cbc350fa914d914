"""Pairwise registration: which tiles overlap, and the shift that best aligns each pair.

Every shift here lives in a *crop frame*: crop ``a`` and crop ``b`` are arrays cut from two tiles,
and a shift ``s`` (one value per axis) says that pixel ``k`` of crop ``b`` shows the same point as
pixel ``k + s`` of crop ``a``.

:func:`measure_crops` scores every whole-pixel shift of a pair's crops by the Pearson
correlation over exactly the pixels that overlap there (:mod:`~tilefuse.registration.search`),
prefers the least-squares (same-exposure) optimum where both tiles share an exposure, flags a best
shift on the edge of the search with a better one just beyond, and refines the shift to sub-pixel
precision with a covariance (:mod:`~tilefuse.registration.subpixel`), widened by the spread of
the whole-pixel shifts that fit about as well (ridges, repeats).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from tilefuse.model.layout import Layout
from tilefuse.plan.geometry import close_pairs, tile_bounds
from tilefuse.registration import search
from tilefuse.registration.search import (
    gradient_energy,
    limit_region,
    ncc_map,
    overlap_slices,
    score_maps,
)
from tilefuse.registration.subpixel import REFINE_MAX_PIXELS, noise_sigma, refine_subpixel

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
OUTSIDE_REACH = 1.5


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
        return image[tuple(slice(lo, hi) for lo, hi in zip(*box, strict=True))]


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


def find_pairs(layout: Layout, min_overlap_px: int, reach: float = 0.0) -> list[tuple[int, int]]:
    """Neighbouring tiles: nominal footprints overlap by ``min_overlap_px`` in every axis.

    Pairs that touch only at a corner or an edge of the box (more than one thin axis) are left
    out unless the overlap is substantial: every axis but the thinnest must overlap by at least
    ``NEIGHBOUR_FRACTION`` of the smaller tile.

    ``reach`` (pixels, the search radius) widens the candidates to pairs that *could* overlap by
    ``min_overlap_px`` once either tile moves by up to ``reach``: an overlap that the current
    positions make thin (a layout registered before, a stage error) is still measured.

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
    radius = 2 * float(np.linalg.norm(half, axis=1).max()) + 1 + 2 * float(reach)
    candidates = close_pairs(centre, radius)
    if candidates.size == 0:
        return []
    a, b = candidates[:, 0], candidates[:, 1]
    overlap = np.minimum(hi[a], hi[b]) - np.maximum(lo[a], lo[b]) + 1
    extent = np.minimum(hi[a] - lo[a], hi[b] - lo[b]) + 1
    fraction = np.sort(overlap / extent, axis=1)
    keep = np.all(overlap + reach >= min_overlap_px, axis=1)
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


# ------------------------------------------------------------------------------------- measuring


def measure_crops(
    crop_a: np.ndarray,
    crop_b: np.ndarray,
    nominal: np.ndarray,
    radius: float,
    min_extent: int,
    *,
    refine: bool = True,
    downsample: int = 1,
) -> Measurement:
    """Find the shift that best aligns two crops within ``radius`` of ``nominal``.

    Every whole-pixel shift within ``OUTSIDE_REACH`` times the radius is scored
    (:func:`~tilefuse.registration.search.score_maps`); the best one within the radius is
    refined (:func:`~tilefuse.registration.subpixel.refine_subpixel`),
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
    downsample : int
        Search on ``downsample`` x ``downsample`` binned y and x (z is kept), then, with
        ``refine``, search again at full resolution within ``downsample + 1`` pixels of that
        estimate (on at most ``REFINE_MAX_PIXELS`` of the overlap) and refine there: the
        shift and its covariance are full-resolution measurements; ``ncc``, ``overlap``,
        ``std_a``/``std_b`` and the beyond-the-radius candidate stay those of the binned
        search (the link threshold is learned at that resolution). The result is in
        full-resolution pixels either way.

    Returns
    -------
    Measurement
    """
    if downsample == 1:
        found = _search(crop_a, crop_b, nominal, radius, min_extent, refine)
    else:
        factors = np.ones(np.ndim(crop_a))
        factors[-2:] = downsample
        found = _scaled(_search(bin_lateral(crop_a, downsample),
                                bin_lateral(crop_b, downsample), np.asarray(nominal) / factors,
                                radius / downsample, max(1, -(-min_extent // downsample)),
                                False), factors)
        if refine and found.shift is not None:
            found = _full_resolution(crop_a, crop_b, found, downsample, min_extent)
    return replace(found, edge=found.edge.format(radius=radius, min_extent=min_extent))


def _search(crop_a, crop_b, nominal, radius: float, min_extent: int, refine: bool):
    """:func:`measure_crops` at the crops' resolution; ``edge`` is left a template."""
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
    within = search.within_radius(lo, hi, nominal, radius)
    thick = search.thick(lo, hi, a.shape, b.shape, min_extent)
    inside = within & thick
    noise2_b = noise_sigma(b) ** 2
    noise2 = noise_sigma(a) ** 2 + noise2_b
    best, same = search.choose(scores, msd, inside, noise2)
    best_out = search.argmax(scores, ~within & thick)
    out_shift, out_ncc = None, float("nan")
    if best_out is not None and (best is None or scores[best_out] > scores[best]):
        out_shift, out_ncc = lo + np.asarray(best_out), float(scores[best_out])
    if best is None:
        return Measurement(None, float("nan"), "overlap too small at every shift", 0,
                           std_a, std_b, out_shift, out_ncc)
    start = lo + np.asarray(best)
    sl = overlap_slices(a.shape, b.shape, start)
    assert sl is not None  # start is within [lo, hi]: the crops overlap there
    count = int(np.prod([s.stop - s.start for s in sl[0]]))
    edge = search.edge(best, msd if same else -scores, inside, within)
    if not refine:
        return Measurement(start.astype(np.float64), float(scores[best]), "", count, std_a,
                           std_b, out_shift, out_ncc, edge=edge)
    shift, cov = refine_subpixel(a, b, start, scores, lo, noise2, noise2_b)
    misfit = msd * count if same else (1 - scores**2) * float(a[sl[0]].var()) * count
    cov = cov + search.ambiguity(misfit, inside, best, noise2 * np.sqrt(2 * count))
    return Measurement(shift, float(scores[best]), "", count, std_a, std_b, out_shift, out_ncc,
                       cov, edge)


def _full_resolution(crop_a, crop_b, coarse: Measurement, downsample: int,
                     min_extent: int) -> Measurement:
    """A binned measurement searched again at full resolution, ``downsample + 1`` px about it.

    Both crops are cut to their overlap at the binned shift (at most ``REFINE_MAX_PIXELS`` of
    it, where crop ``b`` has the most gradient energy) grown by that window, so that every
    overlap within it is whole and the search and the sub-pixel refinement cost about the same
    whatever the tile size. When the
    full-resolution optimum is on the edge of that search (the binned shift was off by more
    than the window, or the overlap is thinner than ``min_extent``) or missing, so is the
    result: the link is then rejected, as it would be at full resolution, instead of kept at
    binned precision.
    """
    a, b = np.asarray(crop_a), np.asarray(crop_b)
    window = downsample + 1
    assert coarse.shift is not None  # called for a found link only
    start = np.rint(coarse.shift).astype(np.int64)
    regions = overlap_slices(a.shape, b.shape, start)
    if regions is None:
        return coarse
    sl_a, sl_b = limit_region(regions, REFINE_MAX_PIXELS.get(a.ndim, 2**15),
                              gradient_energy(b[regions[1]]))
    grown_a, grown_b = (tuple(slice(max(0, s.start - window), min(n, s.stop + window))
                              for s, n in zip(sl, shape, strict=True))
                        for sl, shape in ((sl_a, a.shape), (sl_b, b.shape)))
    offset = np.array([sb.start - sa.start for sa, sb in zip(grown_a, grown_b, strict=True)])
    fine = _search(a[grown_a], b[grown_b], coarse.shift + offset, window, min_extent, True)
    if fine.shift is None:
        return replace(coarse, shift=None, reason=f"{fine.reason} at full resolution")
    edge = fine.edge
    if "max_shift" in edge:  # the window, not the search radius
        edge = f"more than {window} px from the estimate at 1/{downsample} resolution"
    return replace(coarse, shift=fine.shift - offset, cov=fine.cov, edge=edge or coarse.edge)


def bin_lateral(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean of ``factor`` x ``factor`` blocks in the last two axes (y, x), float64.

    Pixels past the last whole block are dropped, so binned pixel ``k`` is the mean of pixels
    ``factor * k .. factor * k + factor - 1``: a shift ``s`` between two crops binned alike
    becomes exactly ``s / factor``.

    Parameters
    ----------
    image : numpy.ndarray, shape (..., y, x)

    Returns
    -------
    numpy.ndarray, shape (..., y // factor, x // factor)
    """
    *lead, ny, nx = image.shape
    hy, hx = ny // factor, nx // factor
    whole = np.asarray(image)[..., : hy * factor, : hx * factor].astype(np.float64)
    return whole.reshape(*lead, hy, factor, hx, factor).mean(axis=(-3, -1))


def _scaled(found: Measurement, factors: np.ndarray) -> Measurement:
    """A measurement made on binned crops, in full-resolution pixels."""

    def up(shift):
        return None if shift is None else np.asarray(shift) * factors

    cov = None if found.cov is None else found.cov * np.outer(factors, factors)
    return replace(found, shift=up(found.shift), outside_shift=up(found.outside_shift), cov=cov,
                   overlap=int(found.overlap * np.prod(factors)))
