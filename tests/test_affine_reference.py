"""The general-affine path (rotation, scale, shear) against ``scipy.ndimage.map_coordinates``,
pixel for pixel.

What the kernel documents (:mod:`tilefuse.fusion.resample`) and this file recomputes by hand:

- the output grid spans the mosaic pixels between the ceiling of the smallest and the floor of
  the largest mapped corner of any tile's box of pixel centres (within 1e-6);
- output pixel ``o`` (global mosaic index) has tile coordinates ``t = inv @ o``, summed in the
  order ``((inv[r, -1] + inv[r, 0] o_0) + inv[r, 1] o_1) (+ inv[r, 2] o_2)``, and is covered by
  the tile when ``-1e-6 <= t <= n - 1 + 1e-6`` on every axis;
- its value there is ``map_coordinates(tile, t, order=1, mode="nearest")`` (float64, taps
  clamped to the tile: ``nearest`` matters only within the 1e-6 margin), stored as float32;
- ``first``, ``last``, ``max``, ``min`` pick one of those float32 values and ``mean`` sums them in
  float32 in layout order, then divides; the result is rounded half to even.

For these blends both kernels give exactly that mosaic. ``linear`` is compared with the float64
blend of the same values (cosine weights of :mod:`tilefuse.fusion.blend`), which it rounds
correctly up to the measured float32 error.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from scipy import ndimage

from test_blends import combine, cosine_weight
from tilefuse import fuse, layout_from_arrays

EPS = 1e-6
FILL = 3
WIDTH = 5.0
BACKENDS = [
    "numpy",
    pytest.param("numba", marks=pytest.mark.skipif(
        importlib.util.find_spec("numba") is None, reason="numba not installed")),
]


def rotation_about_centre(shape, degrees: float, position, scale=(1.0, 1.0), shear=0.0):
    """Tile index -> mosaic index (y, x): scale and shear, rotate about the tile's centre, then
    place the centre at ``position + centre``."""
    theta = np.deg2rad(degrees)
    c, s = np.cos(theta), np.sin(theta)
    centre = (np.asarray(shape, float) - 1) / 2
    linear = np.array([[c, -s], [s, c]]) @ np.array([[scale[0], shear], [0.0, scale[1]]])
    affine = np.eye(3)
    affine[:2, :2] = linear
    affine[:2, 2] = np.asarray(position, float) + centre - linear @ centre
    return affine


def tile_coordinates(affine: np.ndarray, grid: list[np.ndarray]) -> list[np.ndarray]:
    """``inv @ o`` for every output pixel, in the kernel's order of summation."""
    inv = np.linalg.inv(affine)
    ndim = len(grid)
    coords = []
    for r in range(ndim):
        t = np.full(grid[0].shape, inv[r, -1])
        for j in range(ndim):
            t = t + inv[r, j] * grid[j]
        coords.append(t)
    return coords


def reference(tiles, affines, blend: str, fill=FILL):
    """The mosaic by hand: (rounded output, float64 values before rounding, covered)."""
    ndim = tiles[0].ndim
    corners_lo, corners_hi = [], []
    for tile, affine in zip(tiles, affines, strict=True):
        box = np.array(np.meshgrid(*[[0, n - 1] for n in tile.shape], indexing="ij"))
        mapped = affine[:-1, :-1] @ box.reshape(ndim, -1) + affine[:-1, -1:]
        corners_lo.append(mapped.min(axis=1))
        corners_hi.append(mapped.max(axis=1))
    lo = np.ceil(np.min(corners_lo, axis=0) - EPS).astype(int)
    hi = np.floor(np.max(corners_hi, axis=0) + EPS).astype(int)
    axes = [np.arange(a, b + 1, dtype=np.float64) for a, b in zip(lo, hi, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij")
    values, masks, weights = [], [], []
    for tile, affine in zip(tiles, affines, strict=True):
        t = tile_coordinates(affine, grid)
        masks.append(np.logical_and.reduce([(tk >= -EPS) & (tk <= n - 1 + EPS)
                                            for tk, n in zip(t, tile.shape, strict=True)]))
        v = ndimage.map_coordinates(tile.astype(np.float64), np.stack(t), order=1,
                                    mode="nearest")
        values.append(v.astype(np.float32))
        weights.append(np.prod([cosine_weight(tk, n, WIDTH)
                                for tk, n in zip(t, tile.shape, strict=True)], axis=0))
    if blend == "mean":  # float32 running sum in layout order, then one division
        acc = np.zeros(grid[0].shape, np.float32)
        count = np.zeros(grid[0].shape, np.float32)
        for v, m in zip(values, masks, strict=True):
            acc[m] += v[m]
            count[m] += np.float32(1)
        covered = count > 0
        blended = np.where(covered, acc / np.maximum(count, 1), 0).astype(np.float64)
    else:
        blended, covered = combine([v.astype(np.float64) for v in values], masks, weights,
                                   blend)
        blended = np.where(covered, blended, 0.0)
    out = np.where(covered, np.rint(blended), fill)
    return out, blended, covered


def random_tiles(shapes, seed: int, dtype=np.uint16):
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    return [rng.integers(0, top, shape, endpoint=True).astype(dtype) for shape in shapes]


SHAPES = [(30, 41), (25, 33), (30, 41)]
# (degrees, position, scale, shear) per tile; tiles overlap pairwise and all three at once
AFFINES_2D = {
    "small-rotations": [(1.0, (0.3, 0.7), (1, 1), 0), (-2.5, (10.6, 22.2), (1, 1), 0),
                        (0.7, (17.1, 5.4), (1, 1), 0)],
    "steep-rotations": [(33.0, (0.0, 0.0), (1, 1), 0), (-12.0, (9.5, 20.25), (1, 1), 0),
                        (90.0, (14.0, 6.0), (1, 1), 0)],
    "scale-and-shear": [(0.0, (0.0, 0.0), (2.0, 1.5), 0.0), (4.0, (12.3, 18.9), (0.9, 1.1), 0.05),
                        (-7.0, (20.0, 3.0), (1.0, 1.0), -0.2)],
}


def affines_of(spec):
    return [rotation_about_centre(shape, *s) for shape, s in zip(SHAPES, spec, strict=True)]


def fused(tiles, affines, blend, backend, chunk, fill=FILL):
    layout = layout_from_arrays(tiles, affines=np.stack(affines))
    return np.asarray(fuse(layout, blend=blend, blend_width=WIDTH, fill=fill, chunk=chunk,
                           backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("blend", ["first", "last", "max", "min", "mean"])
@pytest.mark.parametrize("case", list(AFFINES_2D))
def test_affine_tiles_equal_map_coordinates_pixel_for_pixel(case, blend, backend):
    tiles = random_tiles(SHAPES, seed=len(case))
    affines = affines_of(AFFINES_2D[case])
    out = fused(tiles, affines, blend, backend, chunk=(17, 23))
    expect, _, covered = reference(tiles, affines, blend)
    assert out.shape == expect.shape and out.dtype == np.uint16
    assert 0.3 < covered.mean() < 1  # rotated boxes leave uncovered corners
    np.testing.assert_array_equal(out, expect.astype(np.uint16), err_msg=f"{case} {blend}")


# max |out - exact| - 0.5 over these cases, measured 0.0030 with either kernel (float32
# weights and sums: uint16 values up to 65535 have a float32 step of 0.004)
LINEAR_EXCESS = 0.006


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(AFFINES_2D))
def test_affine_linear_blend_rounds_the_exact_blend(case, backend):
    tiles = random_tiles(SHAPES, seed=len(case))
    affines = affines_of(AFFINES_2D[case])
    out = fused(tiles, affines, "linear", backend, chunk=(17, 23)).astype(np.float64)
    expect, exact, covered = reference(tiles, affines, "linear")
    np.testing.assert_array_equal(out[~covered], FILL)
    excess = np.abs(out[covered] - exact[covered]).max() - 0.5
    assert excess <= LINEAR_EXCESS, excess
    # so the output differs from the correctly rounded blend only next to a tie (0 to 13
    # pixels of 2,500 to 4,200 here)
    wrong = out != expect
    assert np.all(np.abs(np.abs(exact[wrong] - np.floor(exact[wrong])) - 0.5) <= LINEAR_EXCESS)


def test_tile_edges_within_the_margin_are_covered_with_clamped_taps():
    """Pixel centres exactly on the tile's first and last row and column (a scale of 2), and
    a shear of 1e-9 that puts them up to 1e-7 outside: covered, taps clamped (``nearest``)."""
    tile = random_tiles([(9, 11)], seed=3)[0]
    exact = np.array([[2.0, 0, 4], [0, 2.0, 6], [0, 0, 1]])  # t = (o - p) / 2
    nudged = np.array([[1.0, 1e-9, 40], [-1e-9, 1.0, 3], [0, 0, 1]])
    for affine in (exact, nudged):
        out = fused([tile], [affine], "first", "numpy", chunk=(5, 7), fill=0)
        expect, _, covered = reference([tile], [affine], "first", fill=0)
        np.testing.assert_array_equal(out, expect.astype(np.uint16))
        assert covered.all()
    # the scaled tile's corners land on mosaic pixels and keep the tile's own values
    out = fused([tile], [exact], "first", "numpy", chunk=64)
    assert out.shape == (17, 21)
    np.testing.assert_array_equal(out[::2, ::2], tile)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("blend", ["first", "last", "max", "min", "mean"])
def test_3d_general_affine_equals_map_coordinates(blend, backend):
    """z-stacks under a z scale, a y-x rotation and a z-x shear."""
    shapes = [(5, 20, 24), (6, 18, 22)]
    tiles = random_tiles(shapes, seed=9)
    affines = []
    for k, (degrees, pos) in enumerate([(3.0, (0.0, 0.0, 0.0)), (-8.0, (2.5, 7.3, 11.6))]):
        a = np.eye(4)
        theta = np.deg2rad(degrees)
        a[1:3, 1:3] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
        a[0, 0] = 1.1 + 0.2 * k
        a[0, 2] = 0.05
        a[:3, 3] = pos
        affines.append(a)
    out = fused(tiles, affines, blend, backend, chunk=(4, 9, 11))
    expect, _, covered = reference(tiles, affines, blend)
    assert out.shape == expect.shape and 0.3 < covered.mean() < 1
    np.testing.assert_array_equal(out, expect.astype(np.uint16), err_msg=blend)
