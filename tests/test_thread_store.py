"""The OME-Zarr writer on local threads without dask (tilefuse.ome_zarr._blocks,
tilefuse.runner.LocalCompute): the same files as the dask path, resume, errors, progress; and
the pieces that keep dask and scipy out of a local fuse (Mosaic block pixels, close_pairs,
default_compute)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import zarr

import tilefuse
from tilefuse.fusion.jobs import FusedPixels
from tilefuse.io.readers import layout_from_arrays
from tilefuse.model.mosaic import BlockPixels, Mosaic
from tilefuse.ome_zarr.writer import default_compute, write_image
from tilefuse.plan.geometry import close_pairs
from tilefuse.runner import LocalCompute
from tilefuse.testing import grid_tileset


@pytest.fixture(scope="module")
def mosaic() -> Mosaic:
    """A 2-channel 3x3 mosaic with fractional positions, 32² chunks (7 x 7 chunks, the last
    ones partial)."""
    ts = grid_tileset(grid=(3, 3), tile_shape=(80, 96), overlap=0.2, fractional=True, seed=3)
    tiles = [np.stack([p, 60000 - p]) for p in (t.source.read()[0] for t in ts.layout.tiles)]
    layout = layout_from_arrays(tiles, affines=ts.layout.affines, channels=["a", "b"])
    fused = tilefuse.fuse(layout, chunk=32)
    assert fused.shape[0] == 2 and fused.shape[1] % 32 and fused.shape[2] % 32
    return fused


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_dask(monkeypatch) -> None:
    """Fail if the writer turns the block pixels into dask."""
    def refuse(self):
        raise AssertionError("the thread path built a dask array")

    monkeypatch.setattr(FusedPixels, "to_dask", refuse)


def test_threads_write_the_files_dask_writes(tmp_path, mosaic, monkeypatch):
    """Every file (chunks of every level, metadata) is byte for byte what the dask path writes,
    and the thread path never builds a dask array."""
    assert isinstance(mosaic.pixels, BlockPixels)
    reference = tmp_path / "dask" / "m.ome.zarr"
    write_image(mosaic, reference, levels=3, compute=dask.compute)  # no run_tasks: dask
    with monkeypatch.context() as m:
        _no_dask(m)
        threads = tmp_path / "threads" / "m.ome.zarr"
        write_image(mosaic, threads, levels=3, compute=LocalCompute("threads", 2, None))
    ours, theirs = _files(threads), _files(reference)
    assert sorted(ours) == sorted(theirs) and len(ours) > 60
    assert all(ours[k] == theirs[k] for k in ours)
    np.testing.assert_array_equal(zarr.open_group(threads, mode="r")["0"][:],
                                  np.asarray(mosaic.data))


def test_resume_on_threads_completes_the_same_image(tmp_path, mosaic, monkeypatch):
    """A write that fails at one chunk leaves an unfinished image; resuming on threads keeps
    the chunks written, makes the rest and the per-channel display range from the stored level
    (read back on threads), and ends byte-identical to an uninterrupted write."""
    reference = tmp_path / "ref" / "m.ome.zarr"
    manifest = {"run": "test"}
    write_image(mosaic, reference, levels=1, manifest=manifest,
                compute=LocalCompute("threads", 2, None))
    block = FusedPixels.block

    def failing(self, index):
        if tuple(index[-2:]) == (3, 4):
            raise OSError(28, "No space left on device")
        return block(self, index)

    out = tmp_path / "cut" / "m.ome.zarr"
    with monkeypatch.context() as m:
        m.setattr(FusedPixels, "block", failing)
        with pytest.raises(OSError, match="No space"):
            write_image(mosaic, out, levels=1, manifest=manifest,
                        compute=LocalCompute("threads", 2, None))
    assert not tilefuse.ome_zarr.writer.is_finished_image(out)
    assert not (out / "0" / "c" / "0" / "3" / "4").exists()
    from tilefuse.ome_zarr.chunkstore import ChunkFiles

    kept = {tuple(int(i) for i in p.relative_to(out / "0" / "c").parts)
            for p in (out / "0" / "c").rglob("*") if p.is_file()}
    reads: list[tuple[int, ...]] = []
    read = ChunkFiles.read
    with monkeypatch.context() as m:
        _no_dask(m)
        m.setattr(ChunkFiles, "read", lambda self, b: reads.append(tuple(b)) or read(self, b))
        write_image(mosaic, out, levels=1, manifest=manifest, resume=True,
                    compute=LocalCompute("threads", 2, None))
    assert _files(out) == _files(reference)
    # a kept chunk is decoded once, when it is checked (its min/max taken then); a new one is
    # not read back: the task that stores it gives its min/max
    assert sorted(reads) == sorted(set(reads)) and set(reads) == kept
    assert 0 < len(kept) < 7 * 8  # both channels a chunk: 7 x 8 chunks, some kept


def test_progress_counts_every_chunk_of_every_level(tmp_path, mosaic):
    reports: list[tuple[int, int, str]] = []
    write_image(mosaic, tmp_path / "p.ome.zarr", levels=3,
                compute=LocalCompute("threads", 2, lambda *r: reports.append(r)))
    last = {label: (done, total) for done, total, label in reports}
    assert mosaic.shape[1:] == (208, 250)  # chunks: 7 x 8, then 4 x 4, then 2 x 2
    assert last == {"fusing": (56, 76), "pyramid level 1": (72, 76),
                    "pyramid level 2": (76, 76)}
    done = [r[0] for r in reports]
    assert done == sorted(done)


def test_default_compute_is_threads_unless_dask_is_told_otherwise():
    assert isinstance(default_compute(), LocalCompute)
    with dask.config.set(scheduler="sync"):
        assert default_compute() is dask.compute


def test_mosaic_of_block_pixels_reads_as_dask(mosaic):
    """``mosaic.data`` is a dask array of the same pixels, made once; metadata comes from the
    block pixels without it; dataclasses.replace keeps working."""
    fresh = Mosaic(mosaic.pixels, mosaic.axes)
    assert fresh.shape == mosaic.pixels.shape and fresh.dtype == mosaic.pixels.dtype
    assert fresh.nbytes == np.prod(fresh.shape) * fresh.dtype.itemsize
    data = fresh.data
    assert isinstance(data, da.Array) and fresh.data is data
    assert data.chunksize == fresh.pixels.chunk_shape
    np.testing.assert_array_equal(fresh.pixels.block((0, 1, 2)), data.blocks[0, 1, 2].compute())
    renamed = dataclasses.replace(fresh, channel_names=("nuclei", "actin"))
    assert renamed.channel_names == ("nuclei", "actin") and renamed.pixels is None


@pytest.mark.parametrize("n, ndim", [(0, 2), (1, 2), (40, 2), (300, 3), (2100, 2)])
def test_close_pairs_are_the_kd_tree_pairs(n, ndim):
    from scipy.spatial import cKDTree

    points = np.random.default_rng(n).uniform(0, 100, (n, ndim))
    points[:4] = np.round(points[:4])  # some exact distances
    for radius in (5.0, 10.0):
        expected = np.array(sorted(cKDTree(points).query_pairs(radius)), dtype=np.int64)
        np.testing.assert_array_equal(close_pairs(points, radius), expected.reshape(-1, 2))


def test_close_pairs_on_a_grid_keeps_pairs_at_exactly_the_radius():
    grid = np.array([(y, x) for y in range(0, 50, 10) for x in range(0, 50, 10)], float)
    pairs = close_pairs(grid, 10.0)
    assert len(pairs) == 2 * 5 * 4  # the 4-neighbours, each at distance exactly 10


def test_run_tasks_keeps_order_and_stops_at_the_first_error():
    import threading
    import time

    from tilefuse.errors import InputError

    compute = LocalCompute("threads", 2, None)
    assert compute.run_tasks is not None
    assert compute.run_tasks([lambda i=i: (time.sleep(0.002 * (5 - i)), i)[1]
                              for i in range(5)]) == [0, 1, 2, 3, 4]
    started: list[int] = []
    lock = threading.Lock()

    def task(i: int):
        def run() -> int:
            with lock:
                started.append(i)
            if i == 1:
                raise OSError(28, "No space left on device")
            time.sleep(0.01)
            return i
        return run

    with pytest.raises(OSError, match="No space"):
        compute.run_tasks([task(i) for i in range(200)])
    assert len(started) < 200  # the tasks not yet started when it failed never ran
    assert LocalCompute("processes", 2, None).run_tasks is None  # closures do not pickle
    with pytest.raises(InputError, match="unknown local scheduler"):
        LocalCompute("thread", 2, None)


def test_compute_of_fused_pixels_needs_no_dask(mosaic, tmp_path):
    """``fuse(...).compute()`` (and ``np.asarray``) make the blocks on threads: the pixels of
    the dask path, in a process that never imports dask; with keywords it goes through dask."""
    import subprocess
    import sys

    expected = mosaic.data.compute(scheduler="sync")
    assert mosaic.compute().dtype == expected.dtype
    np.testing.assert_array_equal(mosaic.compute(), expected)
    np.testing.assert_array_equal(np.asarray(mosaic), expected)
    np.testing.assert_array_equal(mosaic.compute(scheduler="sync"), expected)
    np.save(tmp_path / "expected.npy", expected)
    code = ("import sys, numpy as np, tilefuse\n"
            "from tilefuse.io.readers import layout_from_arrays\n"
            "from tilefuse.testing import grid_tileset\n"
            "ts = grid_tileset(grid=(3, 3), tile_shape=(80, 96), overlap=0.2, fractional=True,"
            " seed=3)\n"
            "tiles = [np.stack([p, 60000 - p]) for p in (t.source.read()[0] for t in "
            "ts.layout.tiles)]\n"
            "layout = layout_from_arrays(tiles, affines=ts.layout.affines, channels=['a', 'b'])\n"
            "got = tilefuse.fuse(layout, chunk=32).compute()\n"
            f"ok = np.array_equal(got, np.load({str(tmp_path / 'expected.npy')!r}))\n"
            "print(ok, 'dask' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["True", "False"], out.stderr


def test_compute_follows_a_scheduler_the_user_chose(mosaic, monkeypatch):
    """A dask scheduler set in dask's configuration is the user's choice: compute() then
    goes through dask (as for any dask array), not tilefuse's threads."""
    from tilefuse.model import mosaic as mosaic_module

    calls = []
    real = mosaic_module.read_all
    monkeypatch.setattr(mosaic_module, "read_all", lambda p: calls.append(p) or real(p))
    expected = mosaic.compute()
    assert len(calls) == 1
    with dask.config.set(scheduler="sync"):
        np.testing.assert_array_equal(mosaic.compute(), expected)
    assert len(calls) == 1


def test_median_of_the_blend_widths_is_numpys_bit_for_bit():
    """The overlap widths' median (without ``np.median``'s ``numpy.ma`` import) is the same
    float as ``np.median``, for odd and even counts."""
    from tilefuse.plan.geometry import _median

    rng = np.random.default_rng(0)
    for n in range(1, 120):
        values = rng.normal(100, 5, n) * rng.random()
        assert _median(values) == float(np.median(values))
        assert _median(np.round(values)) == float(np.median(np.round(values)))


def test_computes_run_with_the_old_objects_frozen_then_give_them_back(tmp_path, mosaic):
    """Every compute of a write (dask collections and thread tasks, every level) runs with the
    objects that existed before it left out of the collector's passes (``gc.freeze``), and
    they are given back afterwards; a process that froze objects itself keeps its freeze."""
    import gc

    seen: list[int] = []
    threads = LocalCompute("threads", 2, None)

    class Recording:
        def __call__(self, *collections, **kwargs):
            seen.append(gc.get_freeze_count())
            return dask.compute(*collections)

        def run_tasks(self, tasks, **kwargs):
            seen.append(gc.get_freeze_count())
            return threads.run_tasks(tasks)

    assert gc.get_freeze_count() == 0
    write_image(mosaic, tmp_path / "a.ome.zarr", levels=3, compute=Recording())
    assert len(seen) >= 3 and min(seen) > 0  # level 0 on tasks, the pyramid as dask
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        write_image(mosaic, tmp_path / "b.ome.zarr", levels=2, compute=Recording())
        assert gc.get_freeze_count() == frozen  # the caller's freeze is not undone
    finally:
        gc.unfreeze()


def test_zeroed_is_numpy_zeros():
    from tilefuse.fusion.chunk import zeroed

    for shape, dtype in (((3, 5, 7), np.float32), ((4, 1), bool), ((2, 3), np.float64)):
        z = zeroed(shape, dtype)
        assert z.shape == shape and z.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(z, np.zeros(shape, dtype))
        assert z.flags.c_contiguous and z.flags.writeable
        assert not np.signbit(z).any()  # +0.0, as np.zeros gives
