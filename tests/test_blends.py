"""Every blend where tiles DISAGREE, against a mosaic computed by hand with numpy.

Three tiles overlap pairwise and all three at once, each with its own range of values (a
``base`` of 3000, 1000, 2000 in layout order, plus a small linear ramp that tells their pixels
apart). The order of the bases makes every blend give a different answer somewhere: in the
tile 0 / tile 1 overlap ``first`` is the maximum and ``last`` the minimum, in the tile 1 / tile 2
overlap it is the other way round, and in the triple overlap ``last`` is neither. So swapping
``first`` and ``last``, or ``max`` and ``min``, or taking one for the other, fails these tests.

The expected mosaic follows the documented rules only: the output grid spans the pixel centres
inside some tile (:func:`tilefuse.plan.geometry.output_box`), a tile at position ``p`` with
``n`` pixels covers output index ``o`` when ``p <= o <= p + n - 1``, its value there is the
tile's content at tile coordinate ``o - p`` (linear interpolation of a linear ramp is the ramp
itself), and the blends are those of :mod:`tilefuse.fusion.blend`, computed in float64 and
rounded half to even.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tilefuse import fuse, layout_from_arrays
from tilefuse.fusion.blend import BLENDS

BASES = (3000, 1000, 2000)  # layout order: first != max and last != min somewhere
RAMP = (5.0, 3.0, 1.0)  # per axis (z, y, x): at most 5*3 + 3*11 + 15 = 63 < the gaps
WIDTH = 4.0  # feathering width, pixels (explicit: the default depends on the overlaps)
FILL = 7

BACKENDS = [
    "numpy",
    pytest.param("numba", marks=pytest.mark.skipif(
        importlib.util.find_spec("numba") is None, reason="numba not installed")),
]

# (positions, tile shape): three tiles, pairwise and triple overlaps, uncovered corners.
CASES = {
    "integer-2d": ([(0, 0), (4, 9), (7, 3)], (12, 16)),
    "fractional-2d": ([(0.0, 0.0), (4.25, 9.5), (6.75, 3.4)], (12, 16)),
    "integer-3d": ([(0, 0, 0), (1, 4, 9), (2, 7, 3)], (4, 12, 16)),
    "fractional-3d": ([(0.0, 0.0, 0.0), (1.5, 4.25, 9.5), (2.0, 6.75, 3.4)], (4, 12, 16)),
}


def ramp_tile(base: float, shape: tuple[int, ...], dtype=np.uint16) -> np.ndarray:
    """``base + sum(RAMP[axis] * index[axis])``: linear, so interpolation reproduces it."""
    index = np.indices(shape, dtype=np.float64)
    coef = RAMP[-len(shape):]
    return (base + sum(c * i for c, i in zip(coef, index, strict=True))).astype(dtype)


def cosine_weight(t: np.ndarray, n: int, width: float) -> np.ndarray:
    """The documented feathering weight along one axis, in float64."""
    d = np.minimum(t, (n - 1) - t) + 0.5
    return 0.5 - 0.5 * np.cos(np.pi * np.minimum(d / max(width, 0.5), 1.0))


def combine(values, masks, weights, blend: str) -> tuple[np.ndarray, np.ndarray]:
    """Blend per-tile values (float64, full mosaic each) by hand; returns (values, covered)."""
    values, masks = np.asarray(values, np.float64), np.asarray(masks, bool)
    covered = masks.any(axis=0)
    if blend == "first":
        out = np.zeros(covered.shape)
        for v, m in zip(values[::-1], masks[::-1], strict=True):  # the earliest wins
            out = np.where(m, v, out)
    elif blend == "last":
        out = np.zeros(covered.shape)
        for v, m in zip(values, masks, strict=True):  # the latest wins
            out = np.where(m, v, out)
    elif blend == "max":
        out = np.where(masks, values, -np.inf).max(axis=0)
    elif blend == "min":
        out = np.where(masks, values, np.inf).min(axis=0)
    elif blend == "mean":
        with np.errstate(invalid="ignore"):
            out = (values * masks).sum(axis=0) / masks.sum(axis=0)
    elif blend == "linear":
        w = np.asarray(weights, np.float64) * masks
        with np.errstate(invalid="ignore"):
            out = (values * w).sum(axis=0) / w.sum(axis=0)
    else:
        raise AssertionError(blend)
    return out, covered


def expected_mosaic(positions, shape, blend: str) -> tuple[np.ndarray, np.ndarray]:
    """The mosaic of ``ramp_tile(BASES[k])`` tiles at ``positions``, float64 before rounding.

    Returns
    -------
    values : numpy.ndarray
        Blended values, meaningful where covered.
    covered : numpy.ndarray of bool
    """
    pos = np.asarray(positions, np.float64)
    ends = pos + np.asarray(shape) - 1
    lo, hi = np.ceil(pos.min(axis=0)).astype(int), np.floor(ends.max(axis=0)).astype(int)
    axes = [np.arange(a, b + 1, dtype=np.float64) for a, b in zip(lo, hi, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij")
    values, masks, weights = [], [], []
    coef = np.asarray(RAMP[-len(shape):])
    for p, base in zip(pos, BASES, strict=True):
        t = [g - pk for g, pk in zip(grid, p, strict=True)]  # tile coordinates
        masks.append(np.logical_and.reduce([(tk >= 0) & (tk <= n - 1)
                                            for tk, n in zip(t, shape, strict=True)]))
        values.append(base + sum(c * tk for c, tk in zip(coef, t, strict=True)))
        weights.append(np.prod([cosine_weight(tk, n, WIDTH)
                                for tk, n in zip(t, shape, strict=True)], axis=0))
    return combine(values, masks, weights, blend)


def fused(positions, shape, blend: str, backend: str, chunk) -> np.ndarray:
    tiles = [ramp_tile(b, shape) for b in BASES]
    layout = layout_from_arrays(tiles, positions=np.asarray(positions, np.float64))
    return np.asarray(fuse(layout, blend=blend, blend_width=WIDTH, fill=FILL, chunk=chunk,
                           backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_blend_of_disagreeing_tiles_equals_the_hand_computed_mosaic(case, blend, backend):
    positions, shape = CASES[case]
    chunk = (3, 7, 9) if len(shape) == 3 else (7, 9)  # chunk edges cut through the overlaps
    out = fused(positions, shape, blend, backend, chunk)
    values, covered = expected_mosaic(positions, shape, blend)
    assert out.shape == covered.shape and out.dtype == np.uint16
    assert (~covered).sum() > 0 and covered.sum() > 0.5 * covered.size
    assert_rounds_to(out, values, covered, f"{case} {blend}")


def assert_rounds_to(out: np.ndarray, values: np.ndarray, covered: np.ndarray, msg: str,
                     tie: float = 1e-3) -> None:
    """``out`` is ``values`` rounded half to even where covered and FILL elsewhere, exactly;
    where a value lies within ``tie`` of a rounding tie (not on it: equal weights of values an
    odd number apart), float32 arithmetic may round it either way."""
    values = np.where(covered, values, 0.0)
    distance = np.abs(values - np.floor(values) - 0.5)  # from the nearest tie
    near = covered & (distance < tie) & (distance > 0)
    expect = np.where(covered, np.rint(values), FILL)
    np.testing.assert_array_equal(np.where(near, 0, out), np.where(near, 0, expect),
                                  err_msg=msg)
    assert np.all(np.abs(out[near] - values[near]) <= 0.5 + tie), msg


@pytest.mark.parametrize("case", ["integer-2d", "fractional-2d"])
def test_the_test_layout_separates_every_pair_of_blends(case):
    """No two blends give the same mosaic here: a blend mistaken for another cannot pass."""
    positions, shape = CASES[case]
    mosaics = {b: np.rint(np.nan_to_num(expected_mosaic(positions, shape, b)[0])) for b in BLENDS}
    for i, a in enumerate(BLENDS):
        for b in BLENDS[i + 1:]:
            assert (mosaics[a] != mosaics[b]).sum() >= 20, (a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_and_last_follow_layout_order_not_values(backend):
    """Reversing the layout order exchanges ``first`` and ``last`` pixel for pixel."""
    positions, shape = CASES["fractional-2d"]
    tiles = [ramp_tile(b, shape) for b in BASES]
    forward = layout_from_arrays(tiles, positions=np.asarray(positions))
    backward = layout_from_arrays(tiles[::-1], positions=np.asarray(positions[::-1]))

    def run(layout, blend):
        return np.asarray(fuse(layout, blend=blend, chunk=(5, 6), backend=backend))

    np.testing.assert_array_equal(run(forward, "first"), run(backward, "last"))
    np.testing.assert_array_equal(run(forward, "last"), run(backward, "first"))
    assert (run(forward, "first") != run(forward, "last")).sum() > 50
    # max and min do not care about the order
    for blend in ("max", "min", "mean"):
        np.testing.assert_array_equal(run(forward, blend), run(backward, blend), err_msg=blend)
