"""Sharded output (``--shard``): zarr v3 shards of many chunks, one file and one task each; the
same pixels as unsharded at every level, valid NGFF 0.5, read by zarr and ome-zarr, resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr_models import v05

from conftest import run_cli, run_main
from tilefuse import Mosaic, write_ome_zarr
from tilefuse.errors import InputError
from tilefuse.ome_zarr.writer import read_ome_zarr_level, write_image
from tilefuse.plan.info import shard_advice

CHUNK, SHARD = 24, 96  # 4 x 4 chunks per shard


@pytest.fixture(scope="module")
def outputs(layout_file, tmp_path_factory):
    """The same fusion written unsharded and with ``--shard``."""
    folder = tmp_path_factory.mktemp("out")
    plain, sharded = folder / "plain.ome.zarr", folder / "sharded.ome.zarr"
    for out, extra in ((plain, []), (sharded, ["--shard", str(SHARD)])):
        result = run_cli("fuse", layout_file, "-o", out, "--chunk", str(CHUNK), "-q", *extra)
        assert result.returncode == 0, result.stderr
    return plain, sharded


def _files(out):
    return sum(len(names) for _, _, names in os.walk(out))


def _levels(out):
    group = zarr.open_group(out, mode="r")
    return [group[d["path"]] for d in group.attrs["ome"]["multiscales"][0]["datasets"]]


def test_sharded_output_has_8x_fewer_files_and_the_same_pixels_at_every_level(outputs):
    plain, sharded = outputs
    assert _files(plain) >= 8 * _files(sharded), (_files(plain), _files(sharded))
    ours, theirs = _levels(sharded), _levels(plain)
    assert len(ours) == len(theirs) >= 4
    for k, (got, want) in enumerate(zip(ours, theirs, strict=True)):
        assert got.shards is not None and want.shards is None
        assert got.chunks == want.chunks == (CHUNK, CHUNK)
        # the shard, capped at the level's size in whole chunks
        assert got.shards == tuple(min(SHARD, -(-n // CHUNK) * CHUNK) for n in got.shape), k
        np.testing.assert_array_equal(got[...], want[...])  # zarr-python reads the shards


def test_sharded_output_is_valid_ngff_05_and_opens_in_ome_zarr(outputs):
    plain, sharded = outputs
    v05.Image.from_zarr(zarr.open_group(sharded, mode="r"))  # raises if invalid
    nodes = list(Reader(parse_url(str(sharded)))())
    got = [np.asarray(level) for level in nodes[0].data]
    want = [read_ome_zarr_level(plain, k).compute() for k in range(len(_levels(plain)))]
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def _shard_files(out):
    folder = out / "0" / "c"
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_resume_after_sigkill_is_bit_identical_with_shards(layout_file, outputs, tmp_path):
    plain, _ = outputs
    out = tmp_path / "killed.ome.zarr"
    cmd = [sys.executable, "-m", "tilefuse", "fuse", str(layout_file), "-o", str(out),
           "--chunk", str(CHUNK), "--shard", str(SHARD), "--workers", "1", "-q"]
    total = int(np.prod([-(-n // SHARD) for n in _levels(plain)[0].shape]))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while (len(_shard_files(out)) < total // 4 and proc.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    shards = _shard_files(out)
    assert 0 < len(shards) < total, "the run must be killed part-way through level 0"
    with pytest.raises(ValueError, match="unfinished"):
        read_ome_zarr_level(out)  # the interrupted output never looks finished
    # what a crash can leave besides: zarr's temporary of a shard, a torn shard file
    leftover = shards[0].with_name(f"{shards[0].name}.{'ab' * 16}.partial")
    leftover.write_bytes(b"half a shard")
    torn = shards[-1]
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])

    refused = run_cli("fuse", layout_file, "-o", out, "--chunk", str(CHUNK), "--shard",
                      str(2 * SHARD), "--resume", "-q")
    assert refused.returncode == 2 and "shard" in refused.stderr
    assert "differ" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    resumed = run_cli("fuse", layout_file, "-o", out, "--chunk", str(CHUNK), "--shard",
                      str(SHARD), "--resume", "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert not leftover.exists() and not list(out.rglob("*.partial"))
    for got, want in zip(_levels(out), _levels(plain), strict=True):
        np.testing.assert_array_equal(got[...], want[...])


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--shard", "96", "--ngff", "0.4"], ["--shard", "zarr v3", "0.4"]),
        (["--shard", "100"], ["shard 100", "multiple of the chunk 24"]),
        (["--shard", "96", "96", "96"], ["--shard takes 1 or 2 values"]),
    ],
)
def test_shard_refusals_are_one_line(layout_file, tmp_path, args, words):
    out = tmp_path / "r.ome.zarr"
    result = run_main("fuse", layout_file, "-o", out, "--chunk", str(CHUNK), "-q", *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(w in result.stderr for w in words), result.stderr
    assert not out.exists()  # refused before anything is written


def test_library_shard_per_axis_channels_and_one_progress_count(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 2**16, (2, 300, 333), dtype=np.uint16)
    mosaic = Mosaic(da.from_array(data, chunks=(1, 32, 32)), axes=("c", "y", "x"),
                    pixel_size=(0.5, 0.5))
    with pytest.raises(InputError, match="zarr v3"):
        write_ome_zarr(mosaic, tmp_path / "v4.ome.zarr", ngff_version="0.4", shard=64)
    with pytest.raises(InputError, match="multiple of the chunk 32"):
        write_ome_zarr(mosaic, tmp_path / "bad.ome.zarr", shard=(64, 100))
    assert not (tmp_path / "v4.ome.zarr").exists() and not (tmp_path / "bad.ome.zarr").exists()

    batches = []

    def compute(*collections, batch=None):
        batches.append(batch)
        return da.compute(*collections, scheduler="sync")

    out = write_image(mosaic, tmp_path / "s.ome.zarr", shard=(64, 128), compute=compute)
    levels = _levels(out)
    assert [a.shards for a in levels] == [(1, 64, 128), (1, 64, 128), (1, 64, 96),
                                          (1, 64, 64), (1, 32, 32)]
    for k, level in enumerate(levels):
        np.testing.assert_array_equal(level[...], read_ome_zarr_level(out, k).compute())
    np.testing.assert_array_equal(levels[0][...], data)
    # one bar over every level, counted in shards (one file, one task each)
    total = sum(int(np.prod([-(-n // s) for n, s in zip(a.shape, a.shards, strict=True)]))
                for a in levels)
    assert {b.total for b in batches} == {total}
    assert batches[-1].start + batches[-1].count == total


def test_info_advises_a_shard_above_10000_chunk_files(layout_file):
    assert shard_advice((90, 110), (512, 512), 2) is None  # 9,900 files: no advice
    line = shard_advice((200, 200), (512, 512), 2)
    assert line is not None and "--shard 4096 writes 625" in line and "40000" in line
    line = shard_advice((20, 120, 120), (64, 256, 256), 2)  # 3D: y and x grow, z stays
    assert line is not None and "--shard 64 1024 1024 writes 18000" in line
    many = run_main("info", layout_file, "--chunk", "5")
    assert many.returncode == 0, many.stderr
    assert "sharding:" in many.stdout and "--shard 40 writes" in many.stdout, many.stdout
    few = run_main("info", layout_file, "--chunk", str(CHUNK))
    assert few.returncode == 0 and "sharding:" not in few.stdout


def test_a_changed_tile_removes_the_shards_holding_its_chunks(layout_file, outputs, tmp_path):
    """On a resume after tile files changed, the shard files a changed tile touches go (and
    are fused again); the others stay."""
    import shutil

    from tilefuse import plan_fusion, read_layout
    from tilefuse.ome_zarr.resume import _remove_chunks_of

    out = tmp_path / "copy.ome.zarr"
    shutil.copytree(outputs[1], out)
    plan = plan_fusion(read_layout(layout_file), chunk=CHUNK)
    level = zarr.open_group(out, mode="r+")["0"]
    per = SHARD // CHUNK
    touched = {tuple(b // per for b in block) for block in np.ndindex(*plan.chunks.grid)
               if 0 in plan.chunks.tiles_of(block)}
    before = {p.relative_to(out / "0") for p in _shard_files(out)}
    assert _remove_chunks_of(level, out / "0", plan, {0}) == len(touched) > 0
    after = {p.relative_to(out / "0") for p in _shard_files(out)}
    assert before - after == {Path("c", *map(str, key)) for key in touched}
