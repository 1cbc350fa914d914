"""The global rigid estimate of a cycle against cycle 1, from small binned overviews.

Each cycle's alignment channel is binned by ``factor`` tile by tile (one job per tile) and
pasted through the tile's affine into an overview of at most about ``OVERVIEW_MAX`` pixels on its
long side, the mean where tiles overlap: these two overviews are the only whole-mosaic arrays.
Parts of the cycle's overview, matched anywhere in the reference's, give a translation;
patches of the cycle's overview are then matched in the reference's around it (whole overview
pixels: the per-tile step refines), and a rigid model (rotation, translation and, when
allowed, a scale) is fitted to the patch matches robustly: a consensus over pairs of matches
first, then least squares over the agreeing ones.

Overview pixel ``u`` stands for the full-resolution point ``origin + (factor - 1) / 2 +
factor * u``: the centre of the block of ``factor`` x ``factor`` pixels that binning averages.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from tilefuse.model.layout import Layout, Tile, translation_affine
from tilefuse.plan.geometry import tile_bounds
from tilefuse.registration._jobs import Runner, pixels
from tilefuse.registration.pairwise import bin_lateral, measure_crops

__all__ = ["GlobalEstimate", "estimate_global", "fit_rigid", "rigid_parts"]

OVERVIEW_MAX = 1024
"""Longest side of an overview, pixels (the binning factor is chosen to fit it)."""
PATCH = 128
"""Largest side of the overview patches matched for the rigid fit, overview pixels."""
CENTRE_MAX = 384
"""Largest side of the parts of a cycle's overview matched for the translation."""
MAX_PATCHES = 150
"""About the most patches matched (they overlap by half, or less on large overviews)."""
MIN_PATCH_SCORE = 0.3
"""Smallest correlation of a patch match that counts as a measurement."""
MIN_AGREEING = 4
"""Fewest agreeing patch matches for a credible global estimate."""
MIN_AGREEING_FRACTION = 0.5
"""Smallest fraction of the patch matches that must agree on the rigid model."""
MAX_ROTATION_DEG = 2.0
"""Largest rotation of a cycle against cycle 1 (the patch search window allows for it)."""
MAX_SCALE_CHANGE = 0.05
"""Largest relative scale change of a cycle against cycle 1 (``allow_scale``)."""
_PART_PLACES = ((0.5, 0.5), *((fy, fx) for fy in (0.0, 0.5, 1.0) for fx in (0.0, 0.5, 1.0)
                                if (fy, fx) != (0.5, 0.5)))  # where the parts sit (fractions)
_GOOD_PART = 0.6  # a part matching this well ends the search
_WINDOW_COVERED = 0.9  # fraction of a patch's search window that cycle 1 must cover
_MAX_PAIRS = 400  # pairs of matches tried for the consensus
_AGREE_PX = 4.0  # full-resolution px a match may sit off the model (stage errors) at factor 1


@dataclass(frozen=True)
class GlobalEstimate:
    """The rigid model of one cycle and how well the patches support it.

    Attributes
    ----------
    matrix : numpy.ndarray, shape (3, 3)
        Cycle stage frame -> cycle-1 mosaic, full-resolution pixels.
    rms : float
        RMS distance of the agreeing patch matches from the model, full-resolution pixels.
    agreeing, measured, patches : int
        Patch matches that agree with the model, that cleared the score, that were tried.
    factor : int
        Binning factor of the overviews.
    score : float
        Correlation of the best match of a part of the cycle's overview.
    """

    matrix: np.ndarray
    rms: float
    agreeing: int
    measured: int
    patches: int
    factor: int
    score: float


def binned_channel(tile: Tile, channel: int, factor: int) -> np.ndarray:
    """One channel of a tile binned ``factor`` x ``factor`` (a picklable job), float64."""
    image = pixels(tile, channel).astype(np.float64)
    return image if factor == 1 else bin_lateral(image, factor)


@dataclass(frozen=True)
class _Overview:
    image: np.ndarray  # (h, w) float64, mean of the tiles; uncovered pixels hold the mean
    covered: np.ndarray  # (h, w) bool
    to_full: np.ndarray  # (3, 3) overview pixel -> full-resolution frame


def _overview(layout: Layout, channel: int, factor: int, runner: Runner) -> _Overview:
    """Every binned tile through its affine into one overview, the mean where tiles overlap:
    the project's own fusion of the binned tiles (in threads, without dask)."""
    from tilefuse.fusion.direct import fuse_in_memory
    from tilefuse.fusion.graph import plan_fusion
    from tilefuse.io.readers.memory import layout_from_arrays

    lo, hi = tile_bounds(layout.affines, np.array([t.shape for t in layout.tiles], dtype=float))
    origin = np.floor(lo.min(axis=0))
    shape = tuple(int(v) for v in np.ceil((hi.max(axis=0) - origin) / factor) + 1)
    to_full = translation_affine(origin + (factor - 1) / 2) @ np.diag([factor, factor, 1.0])
    to_tile = translation_affine(np.full(2, (factor - 1) / 2)) @ np.diag([factor, factor, 1.0])
    smalls = runner.run(binned_channel, [(t, channel, factor) for t in layout.tiles])
    places = np.stack([np.linalg.inv(to_full) @ t.affine @ to_tile for t in layout.tiles])
    plan = plan_fusion(layout_from_arrays(list(smalls), affines=places), blend="mean",
                       dtype="float64", fill=np.nan, backend="numpy", box=((0, 0), shape),
                       chunk=1024)
    image = fuse_in_memory(plan)
    covered = np.isfinite(image)
    image[~covered] = image[covered].mean() if covered.any() else 0.0
    return _Overview(image, covered, to_full)


def fit_rigid(src: np.ndarray, dst: np.ndarray, allow_scale: bool = False) -> np.ndarray:
    """Least-squares ``dst ~ s R src + t`` (rotation, translation, optional scale), (y, x).

    Parameters
    ----------
    src, dst : numpy.ndarray, shape (n, 2)

    Returns
    -------
    numpy.ndarray, shape (3, 3)
        Homogeneous, acting on (y, x); ``s`` is 1 unless ``allow_scale``.
    """
    ms, md = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - ms, dst - md
    along = float(np.sum(d[:, 0] * s[:, 0] + d[:, 1] * s[:, 1]))
    across = float(np.sum(d[:, 1] * s[:, 0] - d[:, 0] * s[:, 1]))
    theta = math.atan2(across, along) if (along or across) else 0.0
    c, sn = math.cos(theta), math.sin(theta)
    norm = float(np.sum(s * s))
    scale = (c * along + sn * across) / norm if allow_scale and norm > 0 else 1.0
    out = np.eye(3)
    out[:2, :2] = scale * np.array([[c, -sn], [sn, c]])
    out[:2, 2] = md - out[:2, :2] @ ms
    return out


def rigid_parts(matrix: np.ndarray) -> tuple[float, float]:
    """Rotation (degrees, as :meth:`Layout.rotated` turns) and scale of a rigid (3, 3) matrix."""
    return (float(np.degrees(math.atan2(matrix[1, 0], matrix[0, 0]))),
            float(math.hypot(matrix[0, 0], matrix[1, 0])))


def apply_rigid(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``matrix`` (3, 3) applied to (y, x) `points`, shape (n, 2) or (2,)."""
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def robust_rigid(src: np.ndarray, dst: np.ndarray, allow_scale: bool,
                 floor: float) -> tuple[np.ndarray, np.ndarray]:
    """A rigid fit that ignores gross outliers: consensus over pairs, then least squares.

    Parameters
    ----------
    src, dst : numpy.ndarray, shape (n, 2)
    floor : float
        Distance from the model within which a match agrees.

    Returns
    -------
    matrix : numpy.ndarray, shape (3, 3)
    agree : numpy.ndarray of bool, shape (n,)
    """
    n = len(src)
    best = np.ones(n, dtype=bool)
    if n > 2:
        best_count = -1
        pairs = list(itertools.combinations(range(n), 2))
        if len(pairs) > _MAX_PAIRS:  # a fixed sample: the same answer every run
            pick = np.random.default_rng(0).choice(len(pairs), _MAX_PAIRS, replace=False)
            pairs = [pairs[k] for k in pick]
        for i, j in pairs:
            if np.hypot(*(src[i] - src[j])) < 1e-9:
                continue
            model = fit_rigid(src[[i, j]], dst[[i, j]], allow_scale)
            agree = np.hypot(*(apply_rigid(model, src) - dst).T) <= floor
            if agree.sum() > best_count:
                best, best_count = agree, int(agree.sum())
    agree = best
    model = fit_rigid(src[agree], dst[agree], allow_scale) if agree.sum() >= 2 else np.eye(3)
    for _ in range(10):
        new = np.hypot(*(apply_rigid(model, src) - dst).T) <= floor
        if new.sum() < 2 or np.array_equal(new, agree):
            break
        agree = new
        model = fit_rigid(src[agree], dst[agree], allow_scale)
    return model, agree


def _patch_matches(ref: _Overview, cyc: _Overview, start: np.ndarray,
                   radius: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Match patches of the cycle's overview in the reference's, ``start`` (2,) the offset
    cycle overview px -> reference overview px. Returns the matched centres (overview px) in
    the cycle's and the reference's overview, and how many patches were tried."""
    side = int(min(PATCH, max(32, min(cyc.image.shape) // 6)))
    stride = max(side // 2, math.ceil(math.sqrt(cyc.image.size / MAX_PATCHES)))
    src, dst, tried = [], [], 0
    stds = []
    boxes = []
    for y in range(0, cyc.image.shape[0] - side + 1, stride):
        for x in range(0, cyc.image.shape[1] - side + 1, stride):
            if cyc.covered[y:y + side, x:x + side].all():
                boxes.append((y, x))
                stds.append(cyc.image[y:y + side, x:x + side].std())
    if not boxes:
        return np.zeros((0, 2)), np.zeros((0, 2)), 0
    floor = 0.25 * float(np.median(stds))
    for (y, x), std in zip(boxes, stds, strict=True):
        lo = np.rint(np.array([y, x]) + start).astype(int) - radius
        hi = lo + side + 2 * radius
        if std <= floor or np.any(lo < 0) or np.any(hi > ref.image.shape):
            continue
        if ref.covered[lo[0]:hi[0], lo[1]:hi[1]].mean() < _WINDOW_COVERED:
            continue
        tried += 1
        found = measure_crops(ref.image[lo[0]:hi[0], lo[1]:hi[1]],
                              cyc.image[y:y + side, x:x + side],
                              np.array([y, x]) + start - lo, radius, side // 2, refine=False)
        if found.shift is None or found.edge or not found.ncc >= MIN_PATCH_SCORE:
            continue
        centre = (side - 1) / 2
        src.append([y + centre, x + centre])
        dst.append(lo + found.shift + centre)
    return np.array(src).reshape(-1, 2), np.array(dst).reshape(-1, 2), tried


def estimate_global(reference: Layout, cycle: Layout, *, reference_channel: int,
                    channel: int, allow_scale: bool, runner: Runner,
                    label: str) -> GlobalEstimate | str:
    """The rigid model of ``cycle``'s stage frame in ``reference``'s mosaic frame.

    Returns
    -------
    GlobalEstimate, or str
        Why no credible model was found (no overlap, too few agreeing patches).
    """
    extent = max(np.ptp(layout.positions, axis=0).max() + max(max(t.shape) for t in layout.tiles)
                 for layout in (reference, cycle))
    factor = max(1, math.ceil(extent / OVERVIEW_MAX))
    runner.start(len(reference.tiles) + len(cycle.tiles), f"{label}: overviews")
    ref = _overview(reference, reference_channel, factor, runner)
    cyc = _overview(cycle, channel, factor, runner)
    # The translation first (overview px, cycle -> reference): parts of the cycle's overview
    # (small enough that a rotation barely blurs them; the centre first, then eight around it
    # until one matches well, in case one shows a bad tile) anywhere in the reference's.
    side = np.array([min(CENTRE_MAX, max(8, n // 3)) for n in cyc.image.shape])
    start: np.ndarray | None = None
    best = -np.inf
    for fy, fx in _PART_PLACES:
        if best >= _GOOD_PART:
            break
        top = np.rint((np.asarray(cyc.image.shape) - side) * [fy, fx]).astype(int)
        part = cyc.image[top[0]:top[0] + side[0], top[1]:top[1] + side[1]]
        nominal = (np.asarray(ref.image.shape) - side) * [fy, fx]  # the same place in both
        found = measure_crops(ref.image, part, nominal, float(max(ref.image.shape)),
                              int(min(side)), refine=False)
        if found.shift is not None and found.ncc > best:
            best, start = float(found.ncc), found.shift - top
    if start is None or not best >= MIN_PATCH_SCORE:
        score = "none" if start is None else f"{best:.2f}"
        return ("no part of its overview matches cycle 1's (best correlation "
                f"{score} < {MIN_PATCH_SCORE})")
    radius = int(math.ceil(max(cyc.image.shape) * math.tan(math.radians(MAX_ROTATION_DEG)) / 2)
                 + 4)
    src, dst, tried = _patch_matches(ref, cyc, start, radius)
    floor = max(_AGREE_PX, 1.5 * factor)
    src_full, dst_full = apply_rigid(cyc.to_full, src), apply_rigid(ref.to_full, dst)
    if len(src) < MIN_AGREEING:
        return (f"only {len(src)} of {tried} overview patches match cycle 1 (need "
                f"{MIN_AGREEING})")
    model, agree = robust_rigid(src_full, dst_full, allow_scale, floor)
    if agree.sum() < max(MIN_AGREEING, MIN_AGREEING_FRACTION * len(src)):
        return (f"only {int(agree.sum())} of {len(src)} matched overview patches agree on one "
                "rigid transform")
    rotation, scale = rigid_parts(model)
    if abs(rotation) > MAX_ROTATION_DEG or abs(scale - 1) > MAX_SCALE_CHANGE:
        return (f"the overview patches suggest a rotation of {rotation:.1f} deg and a scale of "
                f"{scale:.3f}, beyond the {MAX_ROTATION_DEG} deg and {MAX_SCALE_CHANGE:.0%} "
                "a re-mounted slide turns and scales")
    rms = float(np.sqrt(np.mean(np.sum((apply_rigid(model, src_full[agree]) - dst_full[agree]) ** 2,
                                       axis=1))))
    return GlobalEstimate(model, rms, int(agree.sum()), len(src), tried, factor,
                          best)
