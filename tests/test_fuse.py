"""Fusion against exact truth: integer, fractional, rotated, 3D, every blend, any chunking."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from tilefuse import fuse, layout_from_arrays
from tilefuse.fusion.blend import BLENDS
from tilefuse.testing import Scene, cut_tiles, grid_tileset

INTEGER_EXACT_BLENDS = ("linear", "mean", "max", "min", "first", "last")


@pytest.fixture(scope="module")
def integer_set():
    return grid_tileset(grid=(3, 4), tile_shape=(90, 110), overlap=0.2, position_error=6, seed=3)


@pytest.mark.parametrize("blend", INTEGER_EXACT_BLENDS)
def test_integer_positions_reproduce_the_image_exactly(integer_set, blend):
    out = fuse(integer_set.layout, chunk=64, blend=blend).compute()
    assert out.dtype == integer_set.truth.dtype
    assert 0.9 < integer_set.covered.mean() < 1  # stage error leaves some border uncovered
    np.testing.assert_array_equal(out, integer_set.truth)


def test_cut_tiles_from_a_known_image_all_blends():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 65535, (200, 260), dtype=np.uint16)
    positions = np.array([[0, 0], [0, 130], [85, 10], [90, 150]])
    tiles = cut_tiles(image, positions, (110, 110))
    layout = layout_from_arrays(tiles, positions=positions)
    for blend in INTEGER_EXACT_BLENDS:
        out = fuse(layout, chunk=(37, 53), blend=blend).compute()
        for p, tile in zip(positions, tiles, strict=True):
            sl = tuple(slice(a, a + n) for a, n in zip(p, tile.shape, strict=True))
            np.testing.assert_array_equal(out[sl], tile, err_msg=blend)


def test_fill_value_where_no_tile():
    tiles = [np.full((10, 10), 7, np.uint16), np.full((10, 10), 9, np.uint16)]
    out = fuse(layout_from_arrays(tiles, positions=[[0, 0], [20, 20]]), fill=3).compute()
    assert out.shape == (30, 30)
    assert out[0, 0] == 7 and out[25, 25] == 9 and out[0, 29] == 3 and out[15, 15] == 3


def test_linear_blend_feathers_between_different_tiles():
    a, b = np.full((50, 60), 100, np.uint16), np.full((50, 60), 200, np.uint16)
    out = fuse(layout_from_arrays([a, b], positions=[[0, 0], [0, 40]])).compute()
    row = out[25].astype(int)
    assert row[0] == 100 and row[-1] == 200
    ramp = row[40:60]
    assert np.all(np.diff(ramp) >= 0) and ramp[0] < 115 and ramp[-1] > 185
    assert 140 < row[49] < 160  # the middle of the overlap is the mean


def test_rounding_not_truncation():
    a, b = np.full((8, 8), 10, np.uint8), np.full((8, 8), 13, np.uint8)
    out = fuse(layout_from_arrays([a, b], positions=[[0, 0], [0, 0]]), blend="mean").compute()
    assert np.all(out == 12)  # 11.5 rounds to even 12; truncation would give 11
    c = np.full((8, 8), 14, np.uint8)
    out = fuse(layout_from_arrays([a, c], positions=[[0, 0], [0, 0]]), blend="mean").compute()
    assert np.all(out == 12)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_dtypes_are_preserved(dtype):
    ts = grid_tileset(grid=(2, 2), tile_shape=(40, 40), overlap=0.2, dtype=dtype, seed=1)
    out = fuse(ts.layout, chunk=32).compute()
    assert out.dtype == np.dtype(dtype)
    if dtype != "float32":
        np.testing.assert_array_equal(out, ts.truth)
    else:
        np.testing.assert_allclose(out, ts.truth, rtol=0, atol=1.2e-7)  # measured 6e-8


@pytest.mark.parametrize("position", [(3.25, 7.5), (0.5, 0.0), (10.0, 4.875), (2.9, 3.1)])
def test_fractional_translation_matches_scipy(position):
    rng = np.random.default_rng(1)
    tile = ndimage.gaussian_filter(rng.uniform(0, 60000, (40, 50)), 2).astype(np.uint16)
    out = fuse(layout_from_arrays([tile], positions=[position]), blend="first").compute()
    floor = np.floor(np.asarray(position) + 1e-6)
    frac = np.asarray(position) - floor
    ref = ndimage.shift(tile.astype(np.float64), frac, order=1, mode="constant", cval=np.nan)
    skip = (frac > 1e-6).astype(int)  # the output starts at the first covered pixel
    ref = ref[skip[0] : skip[0] + out.shape[0], skip[1] : skip[1] + out.shape[1]]
    assert ref.shape == out.shape
    valid = ~np.isnan(ref)
    # out is ref rounded: measured max |out - ref| = 0.5 + 3.6e-12 (float32 taps at ties)
    assert np.all(np.abs(out[valid].astype(float) - ref[valid]) <= 0.5 + 1e-6)
    assert valid.sum() == np.prod([n - (f > 0) for n, f in zip(tile.shape, frac, strict=True)])


def test_fractional_positions_error_is_interpolation_error_and_unbiased():
    ts = grid_tileset(grid=(3, 3), tile_shape=(100, 120), overlap=0.15, kind="smooth",
                      fractional=True, position_error=3, seed=1)
    out = fuse(ts.layout, chunk=64, fill=65535).compute().astype(float)
    truth = ts.truth.astype(float)
    covered = out != 65535  # the scene never exceeds 60000
    np.testing.assert_array_equal(covered, ts.covered)
    err = out[covered] - truth[covered]
    # linear interpolation error bound from the truth's local second differences
    fyy = np.pad(np.abs(np.diff(truth, 2, axis=0)), ((1, 1), (0, 0)))
    fxx = np.pad(np.abs(np.diff(truth, 2, axis=1)), ((0, 0), (1, 1)))
    bound = ndimage.maximum_filter((fyy + fxx) / 8, size=3) * 2 + 1
    assert np.all(np.abs(out - truth)[covered] <= bound[covered])  # measured: all
    assert abs(err.mean()) < 0.02  # no bias (truncation would give about -0.5); measured -0.0085
    assert np.abs(err).max() < 190 and np.sqrt(np.mean(err**2)) < 4.2  # measured 94, 2.10


def test_rotated_tiles_fuse_within_interpolation_error():
    ts = grid_tileset(grid=(3, 3), tile_shape=(120, 120), overlap=0.15, kind="smooth",
                      rotation_deg=1.0, fractional=True, seed=2)
    out = fuse(ts.layout, chunk=70, fill=65535).compute().astype(float)
    covered = out != 65535
    np.testing.assert_array_equal(covered, ts.covered)
    assert covered.mean() > 0.95
    err = out[covered] - ts.truth.astype(float)[covered]
    # against the analytic scene; test_affine_reference.py checks the resampling pixel for pixel
    assert abs(err.mean()) < 0.04  # measured 0.020
    assert np.abs(err).max() < 225 and np.sqrt(np.mean(err**2)) < 6.5  # measured 112, 3.26


def test_rotate_equals_explicit_affines():
    ts = grid_tileset(grid=(2, 2), tile_shape=(64, 64), overlap=0.2, seed=4)
    by_rotate = fuse(ts.layout.rotated(1.0), chunk=50).compute()
    explicit = layout_from_arrays(ts.tiles, affines=ts.layout.rotated(1.0).affines)
    np.testing.assert_array_equal(by_rotate, fuse(explicit, chunk=128).compute())


def test_zstack_integer_positions_exact():
    ts = grid_tileset(grid=(2, 3), tile_shape=(12, 48, 56), overlap=0.2, position_error=4,
                      seed=5)
    out = fuse(ts.layout, chunk=(5, 32, 32)).compute()
    assert out.shape == ts.truth.shape and out.ndim == 3
    np.testing.assert_array_equal(out, ts.truth)


def test_zstack_with_z_offsets_and_fractional_positions():
    scene = Scene((40.0, 90.0, 120.0), "smooth", seed=3)
    positions = np.array([[0.0, 0.0, 0.0], [6.0, 0.0, 50.5], [3.25, 40.0, 20.0]])
    shape = (20, 48, 64)
    from tilefuse.model.layout import translation_affine

    tiles = [np.rint(scene.sample(translation_affine(p), shape) * 60000).astype(np.uint16)
             for p in positions]
    layout = layout_from_arrays(tiles, positions=positions)
    out = fuse(layout, chunk=(8, 32, 32), fill=65535).compute().astype(float)
    truth = scene.render(out.shape) * 60000
    covered = out != 65535
    assert out.shape == (26, 88, 114)  # z: 6 + 19 = 25; x: floor(50.5 + 63) = 113
    assert np.abs(out[covered] - truth[covered]).max() < 0.01 * 60000  # measured 507
    assert abs((out[covered] - truth[covered]).mean()) < 1  # measured 0.76


def test_channels_are_fused_together():
    ts = grid_tileset(grid=(2, 2), tile_shape=(40, 40), overlap=0.2, seed=6)
    tiles = [np.stack([t, 60000 - t]) for t in ts.tiles]
    layout = layout_from_arrays(tiles, affines=ts.layout.affines, channels=["a", "b"])
    out = fuse(layout, chunk=32).compute()
    assert out.shape == (2, *ts.truth.shape)
    np.testing.assert_array_equal(out[0], ts.truth)
    np.testing.assert_array_equal(out[1], 60000 - ts.truth)


@st.composite
def _layouts(draw):
    n = draw(st.integers(1, 5))
    fractional = draw(st.booleans())
    angle = draw(st.sampled_from([0.0, 0.0, 1.0, -7.5]))
    pos = draw(st.lists(st.tuples(st.floats(0, 60), st.floats(0, 60)), min_size=n, max_size=n))
    pos = np.asarray(pos) if fractional else np.round(pos)
    return pos, angle


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_layouts(), st.sampled_from(BLENDS), st.integers(5, 70), st.integers(5, 70),
       st.sampled_from(["numpy", "auto"]))
def test_output_does_not_depend_on_chunk_size(layout_spec, blend, cy, cx, backend):
    positions, angle = layout_spec
    rng = np.random.default_rng(len(positions))
    tiles = [rng.integers(0, 4000, (30, 41), dtype=np.uint16) for _ in positions]
    layout = layout_from_arrays(tiles, positions=positions)
    if angle:
        layout = layout.rotated(angle)
    whole = fuse(layout, chunk=10_000, blend=blend, backend=backend).compute()
    chunked = fuse(layout, chunk=(cy, cx), blend=blend, backend=backend).compute()
    np.testing.assert_array_equal(whole, chunked)


def test_each_tile_is_decoded_once(tmp_path):
    from tilefuse.io.readers import read_layout
    from tilefuse.io.tile_cache import cache_stats, clear_cache
    from tilefuse.testing import write_tileset

    ts = grid_tileset(grid=(3, 3), tile_shape=(64, 64), overlap=0.2, seed=7)
    layout = read_layout(write_tileset(ts, tmp_path, stage=False))
    clear_cache()
    out = fuse(layout, chunk=20).compute(scheduler="sync")
    np.testing.assert_array_equal(out, ts.truth)
    assert cache_stats()["decodes"] == len(layout.tiles)


@pytest.mark.parametrize("x", [1e-6, 1 - 1e-7, 2.5e-6, -3e-7, 5.000001])
@pytest.mark.parametrize("blend", ["linear", "first"])
def test_positions_near_an_integer(x, blend):
    """Found by hypothesis: a position within 1e-6 of an integer must not break the slices."""
    rng = np.random.default_rng(2)
    tile = rng.integers(0, 4000, (30, 41), dtype=np.uint16)
    whole = fuse(layout_from_arrays([tile], positions=[[0.0, x]]), blend=blend).compute()
    chunked = fuse(layout_from_arrays([tile], positions=[[0.0, x]]), blend=blend,
                   chunk=(5, 5)).compute()
    np.testing.assert_array_equal(whole, chunked)
    if abs(x - round(x)) < 1e-6:  # snapped to the integer: the tile comes through unchanged
        np.testing.assert_array_equal(whole[:, -41:], tile)


@pytest.mark.parametrize("channels", [1, 3])
def test_fuse_in_memory_is_the_dask_mosaic(channels):
    """The dask-free fusion (previews) runs the same chunk jobs: the same pixels, chunk by
    chunk, for one channel and several, on rotated tiles and a partial last chunk."""
    from tilefuse.fusion.direct import fuse_in_memory
    from tilefuse.fusion.graph import plan_fusion

    ts = grid_tileset(grid=(2, 3), tile_shape=(40, 52), overlap=0.25, seed=4)
    pixels = [t.source.read()[0] for t in ts.layout.tiles]
    tiles = [np.stack([p // (k + 1) for k in range(channels)]) if channels > 1 else p
             for p in pixels]
    names = [f"c{k}" for k in range(channels)] if channels > 1 else None
    layout = layout_from_arrays(tiles, affines=ts.layout.rotated(0.8).affines, channels=names)
    plan = plan_fusion(layout, chunk=24, backend="numpy")
    assert plan.chunks.n_chunks > 6 and plan.chunks.shape[0] % 24  # several, a partial one
    expected = fuse(plan).compute()
    got = fuse_in_memory(plan, workers=2)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
