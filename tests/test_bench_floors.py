"""The benchmark floors write what they claim, so a ratio to them means what it says.

``benchmarks/tsfloor.py`` (the 2D tensorstore floor) and ``benchmarks/bench_3d.py`` (its
on-the-fly z-stacks and the 3D floor): every tile pasted at its rounded position, the last one
winning in an overlap, read back with zarr-python (an independent reader), in the codecs and
chunks tilefuse writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorstore")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _benchmarks_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


def _paste(tiles, positions, dtype=np.uint16) -> np.ndarray:
    """Each tile at its rounded position (relative to the smallest), in order."""
    pos = np.round(np.asarray(positions)).astype(int)
    pos -= pos.min(axis=0)
    shape = (pos + np.array([t.shape for t in tiles])).max(axis=0)
    out = np.zeros(tuple(shape), dtype=dtype)
    for p, t in zip(pos, tiles, strict=True):
        out[tuple(slice(a, a + n) for a, n in zip(p, t.shape, strict=True))] = t
    return out


def _codecs(path: Path) -> tuple[list, list]:
    meta = json.loads((path / "zarr.json").read_text())
    codecs = [(c["name"], c.get("configuration", {})) for c in meta["codecs"]]
    return codecs, meta["chunk_grid"]["configuration"]["chunk_shape"]


def test_tensorstore_floor_pastes_every_tile_at_its_rounded_position(tmp_path):
    import zarr

    import tsfloor
    from tilefuse.testing import grid_tileset, write_tileset

    ts = grid_tileset(grid=(2, 3), tile_shape=(96, 80), overlap=0.2, position_error=3,
                      fractional=True, seed=3)
    layout_path = write_tileset(ts, tmp_path / "tiles", stage=False)
    names, positions = tsfloor.read_tile_configuration(str(layout_path))
    assert [Path(n).name for n in names] == [f"tile_{i:04d}.tif" for i in range(6)]
    np.testing.assert_allclose(positions, ts.layout.positions, atol=5e-4)  # written as %.3f

    out = tmp_path / "floor.zarr"
    shape = tsfloor.floor(str(layout_path), str(out))
    got = zarr.open_array(out, mode="r")[...]
    assert got.shape == tuple(shape)
    np.testing.assert_array_equal(got, _paste(ts.tiles, positions))
    codecs, chunks = _codecs(out)
    assert codecs == [("bytes", {"endian": "little"}), ("zstd", {"level": 0, "checksum": False})]
    assert chunks == [1024, 1024]


def test_3d_sources_agree_in_overlaps_and_the_3d_floor_pastes_them(tmp_path):
    import zarr

    import bench_3d
    from tilefuse.plan.chunking import chunk_shape

    layout = bench_3d.sheet_layout((2, 2), tile=96, planes=70)  # 70 planes: two z slabs
    assert layout.pixel_size == (bench_3d.Z_SCALE, 1.0, 1.0)
    a, b = layout.tiles[0].source, layout.tiles[1].source  # side by side along x
    (_, ay, ax), (_, by, bx) = a.origin, b.origin
    y0, y1, x0 = max(ay, by), min(ay, by) + 96, bx
    np.testing.assert_array_equal(a.box((0, y0 - ay, x0 - ax), (70, y1 - ay, 96)),
                                  b.box((0, y0 - by, 0), (70, y1 - by, ax + 96 - bx)))
    assert len({a.read()[0, k, 5, 5] for k in range(bench_3d.PERIOD)}) > 1  # planes differ

    out = tmp_path / "floor3d.zarr"
    shape = bench_3d.run_floor(layout, out)
    got = zarr.open_array(out, mode="r")[...]
    tiles = [t.source.read()[0] for t in layout.tiles]
    expected = _paste(tiles, [t.source.origin for t in layout.tiles])
    assert got.shape == tuple(shape) == expected.shape
    np.testing.assert_array_equal(got, expected)
    assert _codecs(out)[1] == list(chunk_shape(None, 3))
