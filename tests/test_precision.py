"""Tiles wider than 16 bits fuse exactly (float64 accumulators), or are refused by name.

Every tile here samples one linear function ``g`` of the mosaic position. Linear interpolation
and any weighted mean of a linear function's samples give back ``g`` itself, so the fused mosaic
must equal ``g`` at every covered pixel: exactly for integer dtypes (``g`` is integral on the
output grid and on every tile's sample points), to a few units in the last place for float64.
float32 accumulation misses both: 16,777,217 and 2^32 - 1 are not float32 numbers, 0.1 is off
by 1.5e-9 and 1e-300 underflows to 0.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tilefuse import fuse, layout_from_arrays
from tilefuse.errors import InputError
from tilefuse.fusion.blend import BLENDS
from tilefuse.fusion.graph import plan_fusion
from tilefuse.io.tiles import ArraySource
from tilefuse.model.layout import Layout, Tile, translation_affine

BACKENDS = [
    "numpy",
    pytest.param("numba", marks=pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                                   reason="numba not installed")),
]

# (dtype, g(z, y, x) on float64 mosaic coordinates, fill): slopes are multiples of 4 so that g
# is integral at positions with quarter-pixel fractions.
SCENES = {
    "uint32 near 2^32-1": ("uint32", lambda z, y, x: 4294967295 - 8 * z - 4 * y - 8 * x, 0),
    "uint32 near 2^24+1": ("uint32", lambda z, y, x: 16777217 + 8 * z + 4 * y + 8 * x, 0),
    "int32 near -2^31": ("int32", lambda z, y, x: -2147483647 + 8 * z + 4 * y + 8 * x, 0),
    "int32 near -2^24-1": ("int32", lambda z, y, x: -16777217 - 8 * z - 4 * y - 8 * x, 0),
    "float64 0.1": ("float64", lambda z, y, x: 0.1 + 1e-4 * z + 3e-5 * y - 2e-5 * x, np.nan),
    "float64 1e-300": ("float64",
                       lambda z, y, x: 1e-300 * (1 + 0.01 * z + 0.02 * y + 0.03 * x), np.nan),
}


def _rot90(offset: tuple[float, float]) -> np.ndarray:
    """Tile (r, c) -> mosaic (c + oy, oc - r): a 90-degree turn, the affine path."""
    return np.array([[0.0, 1.0, offset[0]], [-1.0, 0.0, offset[1]], [0.0, 0.0, 1.0]])


# Integer, fractional (quarter and half pixels) and rotated tiles, overlapping each other.
AFFINES_2D = [
    translation_affine([0, 0]),
    translation_affine([0.5, 30.25]),
    translation_affine([25, 2.75]),
    translation_affine([26.25, 31]),
    _rot90((10.5, 60)),
]


def _embed_3d(affine: np.ndarray, z: float) -> np.ndarray:
    out = np.eye(4)
    out[1:, 1:] = affine
    out[0, 3] = z
    return out


AFFINES_3D = [_embed_3d(AFFINES_2D[0], 0), _embed_3d(AFFINES_2D[1], 2.5),
              _embed_3d(AFFINES_2D[2], 1.25), _embed_3d(AFFINES_2D[4], 0.75)]


def _sample(g, affine: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A tile of ``shape``: ``g`` at the mosaic position of each of its pixels."""
    ndim = len(shape)
    index = np.indices(shape, dtype=np.float64).reshape(ndim, -1)
    mosaic = affine[:-1, :-1] @ index + affine[:-1, -1:]
    values = g(*([np.zeros(mosaic.shape[1])] * (3 - ndim)), *mosaic).reshape(shape)
    if np.dtype(dtype).kind in "iu":
        assert np.array_equal(values, np.round(values)), "g must be integral at the samples"
    return values.astype(dtype)


def _fuse_against_truth(scene: str, affines, shape, blend: str, backend: str):
    dtype, g, fill = SCENES[scene]
    tiles = [_sample(g, a, shape, np.dtype(dtype)) for a in affines]
    layout = layout_from_arrays(tiles, affines=np.stack(affines))
    plan = plan_fusion(layout, blend=blend, backend=backend, fill=fill,
                       chunk=(4, 17, 23)[-len(shape):])
    out = fuse(plan).compute()
    assert out.dtype == np.dtype(dtype)
    index = np.indices(out.shape, dtype=np.float64)
    index += plan.chunks.origin.reshape(-1, *([1] * out.ndim))
    truth = g(*([0.0] * (3 - out.ndim)), *index)
    covered = ~np.isnan(out) if np.isnan(fill) else out != fill
    assert covered.mean() > 0.6
    return out[covered], truth[covered]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("scene", [s for s in SCENES if not s.startswith("float")])
def test_wide_integers_are_exact(scene, blend, backend):
    got, truth = _fuse_against_truth(scene, AFFINES_2D, (30, 36), blend, backend)
    np.testing.assert_array_equal(got, truth.astype(got.dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("scene", [s for s in SCENES if s.startswith("float")])
def test_float64_keeps_its_precision(scene, blend, backend):
    got, truth = _fuse_against_truth(scene, AFFINES_2D, (30, 36), blend, backend)
    np.testing.assert_allclose(got, truth, rtol=1e-13, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("scene", ["uint32 near 2^32-1", "float64 0.1"])
def test_wide_zstacks(scene, blend, backend):
    got, truth = _fuse_against_truth(scene, AFFINES_3D, (6, 30, 36), blend, backend)
    if got.dtype.kind == "f":
        np.testing.assert_allclose(got, truth, rtol=1e-13, atol=0)
    else:
        np.testing.assert_array_equal(got, truth.astype(got.dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("blend", [b for b in BLENDS if b != "linear"])
@pytest.mark.parametrize("value", [0.1, 1e-300, -2.5e-310, 1.0000000000000002])
def test_float64_through_integer_positions_bit_for_bit(value, blend, backend):
    """One value in overlapping tiles at integer positions: copied, compared or averaged, never
    rounded."""
    tiles = [np.full((12, 14), value), np.full((12, 14), value)]
    out = fuse(layout_from_arrays(tiles, positions=[[0, 0], [3, 5]]), blend=blend,
               backend=backend, fill=np.nan, chunk=8).compute()
    assert out.dtype == np.float64
    assert np.array_equal(out[~np.isnan(out)], np.full((~np.isnan(out)).sum(), value))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fill_is_exact_in_wide_dtypes(backend):
    tiles = [np.full((4, 4), 4294967295, np.uint32)]
    layout = layout_from_arrays(tiles, positions=[[0, 0]])
    out = fuse(layout, box=([0, 0], [4, 8]), fill=16777217, backend=backend).compute()
    assert out[0, 0] == 4294967295 and out[0, 7] == 16777217


def test_wide_output_of_narrow_tiles():
    """The accumulator follows the output too: uint16 tiles into int64 are exact."""
    tiles = [np.full((6, 6), 65535, np.uint16), np.full((6, 6), 65533, np.uint16)]
    layout = layout_from_arrays(tiles, positions=[[0, 0], [0, 3.5]])
    outs = [fuse(layout, dtype="int64", backend=b, blend="mean").compute()
            for b in ("numpy", "numba") if b != "numba" or importlib.util.find_spec("numba")]
    for out in outs:
        assert out.dtype == np.int64
        assert set(np.unique(out)) == {65533, 65534, 65535}
        np.testing.assert_array_equal(out, outs[0])


@pytest.mark.parametrize("dtype", ["int64", "uint64", "complex64", "complex128"])
def test_tiles_that_cannot_be_exact_are_refused_by_name(dtype):
    layout = layout_from_arrays([np.zeros((4, 4), dtype)], positions=[[0, 0]])
    with pytest.raises(InputError, match=rf"tile dtype {dtype}.*supported"):
        fuse(layout)


def test_extended_precision_refused():
    if np.dtype(np.longdouble).itemsize <= 8:
        pytest.skip("longdouble is float64 here")
    layout = layout_from_arrays([np.zeros((4, 4), np.longdouble)], positions=[[0, 0]])
    with pytest.raises(InputError, match="supported"):
        fuse(layout)


def test_unsupported_output_dtype_refused_by_name():
    layout = layout_from_arrays([np.zeros((4, 4), np.uint16)], positions=[[0, 0]])
    with pytest.raises(InputError, match="output dtype complex64"):
        fuse(layout, dtype="complex64")


@pytest.mark.parametrize(("dtype", "fill"), [("uint16", 0.5), ("uint16", -1), ("uint16", 70000),
                                             ("uint16", np.nan), ("int32", 2**31),
                                             ("uint8", np.inf)])
def test_fill_that_the_output_cannot_hold_is_refused(dtype, fill):
    layout = layout_from_arrays([np.zeros((4, 4), dtype)], positions=[[0, 0]])
    with pytest.raises(InputError, match=rf"fill value {fill}.*{dtype}"):
        fuse(layout, fill=fill)


def test_a_tile_wider_than_its_layout_says_is_refused():
    """A layout that says uint16 but a tile that reads uint32: the chunk refuses, naming it."""
    data = np.full((1, 4, 4), 16777217, np.uint32)
    tile = Tile("t", (4, 4), translation_affine([0, 0]), ArraySource(data))
    layout = Layout((tile,), np.uint16)
    for backend in ("numpy", "numba"):
        if backend == "numba" and importlib.util.find_spec("numba") is None:
            continue
        with pytest.raises(InputError, match="uint32"):
            fuse(layout, backend=backend).compute()
