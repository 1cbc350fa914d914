"""The link threshold: how well crops that do not overlap correlate by chance.

Random template crops are matched against crops of other tiles far from them, with the same
search as real pairs; a high quantile of their best correlations, within fixed bounds, is the
correlation a link needs to be accepted (ASHLAR's random-pair threshold, Muhlich 2022).
"""

from __future__ import annotations

import logging

import numpy as np

from tilefuse.io.tile_cache import read_tile
from tilefuse.model.layout import Layout
from tilefuse.registration._jobs import null_score
from tilefuse.registration.pairwise import Pair

__all__ = ["NCC_CAP", "NCC_FLOOR", "link_threshold", "null_jobs", "null_scores", "tile_pixels"]

log = logging.getLogger(__name__)

NCC_FLOOR = 0.2
NCC_CAP = 0.6
NULL_QUANTILE = 0.95
NULL_SAMPLES = (24, 48)


def tile_pixels(layout: Layout, index: int, channel: int) -> np.ndarray:
    """One channel of a tile's pixels, shape ``tile.shape`` (spatial), the tile's dtype."""
    tile = layout.tiles[index]
    return np.asarray(read_tile(tile.source)[channel]).reshape(tile.shape)


def _box_bounds(layout: Layout, index: int, lo: np.ndarray, hi: np.ndarray):
    """Mosaic bounding box of the index box ``[lo, hi)`` of a tile."""
    affine = layout.tiles[index].affine
    corners = np.array(np.meshgrid(*zip(lo, hi - 1, strict=True), indexing="ij"))
    corners = corners.reshape(lo.size, -1)
    mapped = affine[:-1, :-1] @ corners + affine[:-1, -1:]
    return mapped.min(axis=1), mapped.max(axis=1)


def link_threshold(null: list[float]) -> float:
    """Correlation a link needs: a high quantile of the chance level, within [floor, cap]."""
    if not null:
        log.info("no room for random crop pairs; link threshold ncc %.2f", NCC_FLOOR)
        return NCC_FLOOR
    chance = float(np.quantile(null, NULL_QUANTILE))
    threshold = float(np.clip(chance, NCC_FLOOR, NCC_CAP))
    log.info("link threshold ncc %.3f (chance level %.3f from %d random crop pairs)",
             threshold, chance, len(null))
    if chance > NCC_CAP:
        log.warning("random non-overlapping crops correlate up to %.2f (low-texture content): "
                    "links are accepted from ncc %.2f and checked by the global solve only",
                    chance, NCC_CAP)
    return threshold


def _null_job(layout: Layout, pairs: list[Pair], radius: float, rng: np.random.Generator):
    """A random template pair and a crop elsewhere of the same shape, far from crop ``a``."""
    for _ in range(50):
        pair = pairs[int(rng.integers(len(pairs)))]
        other = int(rng.integers(len(layout.tiles)))
        size = pair.box_b[1] - pair.box_b[0]
        room = np.asarray(layout.tiles[other].shape) - size
        if np.any(room < 0):
            continue
        lo = np.array([int(rng.integers(0, r + 1)) for r in room])
        a_lo, a_hi = _box_bounds(layout, pair.a, pair.box_a[0], pair.box_a[1])
        c_lo, c_hi = _box_bounds(layout, other, lo, lo + size)
        if np.any((a_hi + radius < c_lo) | (c_hi + radius < a_lo)):
            return pair, other, lo
    return None


def null_scores(layout, jobs, channel, radius, measure, runner) -> list[float]:
    """Best correlations found between crops that do not overlap (the chance level).

    ``jobs`` come from :func:`null_jobs`; they run through ``runner``
    (:class:`~tilefuse.registration._jobs.Runner`), which counts them as registering work.
    """
    return runner.run(null_score, [(layout.tiles[pair.a], pair, layout.tiles[other], lo, channel,
                                    radius, measure) for pair, other, lo in jobs])


def null_jobs(layout: Layout, pairs: list[Pair], radius: float) -> list[tuple]:
    """The random ``(pair, other tile, crop corner)`` samples behind the threshold."""
    if not pairs:
        return []
    rng = np.random.default_rng(0)
    n = int(np.clip(2 * len(pairs), *NULL_SAMPLES))
    return [job for job in (_null_job(layout, pairs, radius, rng) for _ in range(n)) if job]
