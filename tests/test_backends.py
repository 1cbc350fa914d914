"""The compiled (numba) chunk kernel against the numpy one: same mosaic, any layout."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tilefuse import fuse, layout_from_arrays, plan_fusion
from tilefuse.errors import InputError
from tilefuse.fusion.blend import BLENDS
from tilefuse.fusion.kernel import NUMBA_MIN_PIXELS, resolve_backend
from tilefuse.testing import grid_tileset

pytest.importorskip("numba")


def _both(layout, **options):
    a = fuse(layout, backend="numpy", **options).compute()
    b = fuse(layout, backend="numba", **options).compute()
    return a, b


# Values spanning each dtype (float64 accumulation for the wide ones); 60000 by default.
_RANGES = {"uint8": (0, 250), "uint32": (0, 2**32 - 1), "int32": (-2**31, 2**31 - 1),
           "float64": (-1e6, 1e6)}


@st.composite
def _tile_sets(draw):
    """2D or 3D tiles, 1-2 channels, integer / fractional / mixed positions, 8 to 64 bits."""
    ndim = draw(st.sampled_from([2, 2, 3]))
    n = draw(st.integers(1, 4))
    channels = draw(st.sampled_from([1, 2]))
    dtype = draw(st.sampled_from(["uint8", "uint16", "float32", "uint32", "int32", "float64"]))
    shape = tuple(draw(st.integers(3, 14)) for _ in range(ndim))
    coord = st.one_of(st.integers(-5, 25).map(float), st.floats(-5, 25, allow_nan=False))
    pos = np.array([[draw(coord) for _ in range(ndim)] for _ in range(n)])
    rng = np.random.default_rng(n * 7 + ndim)
    low, top = _RANGES.get(dtype, (0, 60000))
    tiles = [rng.uniform(low, top, (channels, *shape)).astype(dtype) for _ in range(n)]
    if channels == 1:
        tiles = [t[0] for t in tiles]
    names = None if channels == 1 else ["a", "b"]
    return layout_from_arrays(tiles, positions=pos, channels=names)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_tile_sets(), st.sampled_from(BLENDS), st.integers(4, 30), st.sampled_from([0, 7]))
def test_translations_bit_identical(layout, blend, chunk, fill):
    a, b = _both(layout, blend=blend, chunk=chunk, fill=fill)
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_tile_sets(), st.sampled_from(BLENDS), st.sampled_from([0.7, -2.5, -12.0, 33.0]))
def test_affines_equal_to_rounding(layout, blend, angle):
    if layout.ndim == 3:
        affines = layout.affines.copy()
        affines[:, 0, 0] = 1.1  # z scaled: a general 3D affine
        layout = layout.with_affines(affines)
    else:
        layout = layout.rotated(angle)
    a, b = _both(layout, blend=blend, chunk=9)
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    scale = max(1.0, float(np.abs(a.astype(np.float64)).max()))
    wide = a.dtype.itemsize > 2 and a.dtype != np.float32  # float64 accumulation
    # Measured over 400 hypothesis examples and 2,500 random ones of this space (tiles of 3-14
    # px), kernels rounding the same float64 samples:
    if blend != "linear":
        if not wide and a.dtype.kind != "f":  # integers: the same samples, rounded alike
            np.testing.assert_array_equal(a, b)
        elif not wide:  # float32 out: the float64 samples of a 3D affine (8 taps, summed in
            # another order) may round to the neighbouring float32: found once by hypothesis
            # (1 pixel of 702, mean blend, 26227.689 vs 26227.691), else equal
            assert diff.max() <= np.finfo(np.float32).eps * scale
        elif a.dtype.kind == "f":  # float64 samples summed in another order: measured 1.9 eps
            assert diff.max() <= 4 * np.finfo(np.float64).eps * scale
        else:  # ... which may cross a rounding tie of a 32-bit integer
            assert diff.max() <= 1
    elif not wide:  # README: 8 and 16 bits differ by at most 1 (measured 1)
        assert diff.max() <= 1
    else:  # float64 samples, float32 feathering weights (each within one float32 step,
        # relative) in another order: measured 8.8e-8 of the largest value over 1,500 examples
        # (9.4e-7 when the compiled table interpolated the cosine itself)
        assert diff.max() <= 2e-7 * scale


@pytest.mark.parametrize(("dtype", "kind", "expected"), [("uint16", "cells", 33),
                                                       ("uint16", "smooth", 37),
                                                       ("uint8", "cells", 0)])
def test_rotated_mosaic_differs_in_about_1_pixel_in_10000(dtype, kind, expected):
    """README: rotations equal to rounding, about 1 pixel in 10,000 differs by 1 (16 bits).

    A 3x3 grid of 256² tiles rotated by 1°, 483,720 pixels: with ``linear`` 33 (cells) and 37
    (smooth) uint16 pixels differ by 1 (6.8e-5 and 7.6e-5), none in uint8; every other blend is
    bit-identical (the same float64 samples rounded to float32)."""
    ts = grid_tileset(grid=(3, 3), tile_shape=(256, 256), overlap=0.15, kind=kind, dtype=dtype,
                      rotation_deg=1.0, fractional=True, seed=2)
    fused = {backend: np.asarray(fuse(ts.layout, blend="linear", chunk=200, backend=backend))
             for backend in ("numpy", "numba")}
    diff = np.abs(fused["numpy"].astype(int) - fused["numba"].astype(int))
    assert diff.max() <= 1
    assert (diff > 0).sum() <= 2 * expected, (diff > 0).sum()  # at most 2.5e-4 of the pixels
    if dtype == "uint16":
        for blend in ("max", "first"):
            a, b = (np.asarray(fuse(ts.layout, blend=blend, chunk=200, backend=backend))
                    for backend in ("numpy", "numba"))
            np.testing.assert_array_equal(a, b, err_msg=blend)


def test_linear_blend_near_tile_edges_differs_by_at_most_1():
    """Two random uint16 tiles rotated 33°, feathered over 60 px. At pixel (21, 71) both are
    within 1.5 px of an edge (weights 7.2e-5 and 8.3e-5, values 63061.5 and 15236.9): the exact
    blend is 37412.09, numpy gives 37412, numba 37414."""
    rng = np.random.default_rng(55)
    tiles = [rng.integers(0, 65535, (60, 70), endpoint=True).astype(np.uint16) for _ in range(2)]
    layout = layout_from_arrays(tiles, positions=np.array([[0.0, 0.0], [16.789, 15.592]]))
    a, b = (np.asarray(fuse(layout.rotated(33.0), blend="linear", blend_width=60.0,
                            backend=backend)).astype(int) for backend in ("numpy", "numba"))
    assert np.abs(a - b).max() <= 1


def test_real_sized_tiles_identical():
    """A 3x3 grid of 200² tiles at fractional positions, chunks cutting through overlaps."""
    rng = np.random.default_rng(3)
    tiles = [rng.integers(0, 65535, (200, 200), dtype=np.uint16) for _ in range(9)]
    pos = np.array([[r * 180.37, c * 179.61] for r in range(3) for c in range(3)])
    layout = layout_from_arrays(tiles, positions=pos)
    for blend in BLENDS:
        a, b = _both(layout, blend=blend, chunk=(128, 96))
        np.testing.assert_array_equal(a, b, err_msg=blend)


@pytest.mark.parametrize(("dtype", "low", "top"), [("uint32", 2**32 - 70000, 2**32 - 1),
                                                   ("int32", -2**31, -2**31 + 70000),
                                                   ("float64", 0.1, 0.1 + 1e-9)])
def test_real_sized_wide_tiles_identical(dtype, low, top):
    """The same with values float32 cannot hold: both kernels accumulate in float64."""
    rng = np.random.default_rng(4)
    tiles = [rng.uniform(low, top, (150, 150)).astype(dtype) for _ in range(9)]
    pos = np.array([[r * 130.37, c * 129.61] for r in range(3) for c in range(3)])
    layout = layout_from_arrays(tiles, positions=pos)
    for blend in BLENDS:
        a, b = _both(layout, blend=blend, chunk=(128, 96))
        assert a.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(a, b, err_msg=blend)


def test_wide_integer_output_same_in_both_kernels():
    tiles = [np.full((6, 6), 7, np.uint16), np.full((6, 6), 8, np.uint16)]
    layout = layout_from_arrays(tiles, positions=[[0, 0], [0, 3.5]])
    a, b = _both(layout, dtype="int32")
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int32
    assert set(np.unique(a)) == {7, 8}


def test_resolve_backend(monkeypatch):
    assert resolve_backend("numpy") == "numpy"
    assert resolve_backend("auto") == "numba"
    # a small job of translations only: the compiled kernel would not repay its ~0.5 s start
    assert resolve_backend("auto", pixels=NUMBA_MIN_PIXELS - 1, affine=False) == "numpy"
    assert resolve_backend("auto", pixels=NUMBA_MIN_PIXELS, affine=False) == "numba"
    assert resolve_backend("auto", pixels=100, affine=True) == "numba"
    assert resolve_backend("numba", pixels=100, affine=False) == "numba"
    with pytest.raises(InputError, match="unknown backend 'cuda'"):
        resolve_backend("cuda")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "numba" else real(name, *a))
    assert resolve_backend("auto") == "numpy"
    with pytest.raises(InputError, match=r'pip install "tilefuse\[fast\]"'):
        resolve_backend("numba")


def test_auto_backend_by_job_size_and_path():
    """``auto`` plans small translation jobs with numpy and rotated ones with numba; the run
    manifest records what the plan runs."""
    from tilefuse._run import run_manifest

    ts = grid_tileset(grid=(2, 2), tile_shape=(32, 32), overlap=0.25, seed=0)
    small = plan_fusion(ts.layout, chunk=32)
    assert small.backend == "numpy"
    assert plan_fusion(ts.layout.rotated(1.0), chunk=32).backend == "numba"
    assert plan_fusion(ts.layout, chunk=32, backend="numba").backend == "numba"
    manifest = run_manifest(ts.layout, small, backend="auto", ngff="0.5", levels=None,
                            flatfield=None, darkfield=None, match_intensity=False, sidecars=[],
                            reports=[])
    assert manifest["backend"] == "numpy"


def test_numba_backend_runs_the_compiled_kernel(monkeypatch):
    import tilefuse.fusion._numba.kernel as fastkernel

    calls = []
    real = fastkernel.fuse_chunk_compiled
    monkeypatch.setattr(fastkernel, "fuse_chunk_compiled",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    layout = layout_from_arrays([np.ones((5, 5), np.uint16)], positions=[[0.5, 0]])
    fuse(layout, backend="numpy", chunk=4).compute()
    assert not calls
    mosaic = fuse(layout, backend="numba", chunk=4)
    mosaic.compute()
    assert len(calls) == mosaic.data.npartitions == 2


def test_cli_backend_option_same_mosaic(tmp_path):
    from conftest import run_cli
    from tilefuse.ome_zarr.writer import read_ome_zarr_level
    from tilefuse.testing import grid_tileset, write_tileset

    ts = grid_tileset(grid=(2, 2), tile_shape=(48, 64), overlap=0.2, fractional=True, seed=3)
    layout = write_tileset(ts, tmp_path / "tiles", stage=False)
    outputs = []
    for backend in ("numpy", "numba"):
        out = tmp_path / f"{backend}.ome.zarr"
        proc = run_cli("fuse", layout, "-o", out, "--backend", backend, "--rotate", "0.7", "-q")
        assert proc.returncode == 0, proc.stderr
        outputs.append(read_ome_zarr_level(out).compute())
    diff = np.abs(outputs[0].astype(int) - outputs[1].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 2.5e-4  # measured 1 pixel of 9,890
    info = run_cli("info", layout, "--rotate", "0.7")
    assert "numba kernel" in info.stdout
    info = run_cli("info", layout)  # translations of a small job: not worth compiling
    assert "numpy kernel" in info.stdout
    bad = run_cli("fuse", layout, "-o", tmp_path / "x.ome.zarr", "--backend", "cuda")
    assert bad.returncode == 2 and "invalid choice: 'cuda'" in bad.stderr
