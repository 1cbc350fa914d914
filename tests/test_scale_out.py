"""Scale out and survive faults: resume after SIGKILL, schedulers, a worker killed mid-run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import run_cli
from tilefuse import fuse, read_layout
from tilefuse.ome_zarr.writer import read_ome_zarr_level


@pytest.fixture(scope="module")
def reference(layout_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.ome.zarr"
    result = run_cli("fuse", layout_file, "-o", out, "--chunk", "48", "-q")
    assert result.returncode == 0, result.stderr
    return read_ome_zarr_level(out).compute()


def _chunk_files(out):
    folder = out / "0" / "c"
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def test_resume_after_sigkill_is_bit_identical(layout_file, reference, tmp_path):
    out = tmp_path / "killed.ome.zarr"
    cmd = [sys.executable, "-m", "tilefuse", "fuse", str(layout_file), "-o", str(out),
           "--chunk", "24", "--workers", "1", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = int(np.prod([-(-n // 24) for n in reference.shape]))
    deadline = time.monotonic() + 120
    while _chunk_files(out) < total // 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    written = _chunk_files(out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 0 < written < total, "the run must be killed part-way through level 0"
    with pytest.raises(ValueError, match="unfinished"):
        read_ome_zarr_level(out)  # the interrupted output never looks finished

    refused = run_cli("fuse", layout_file, "-o", out, "--chunk", "24", "--resume",
                      "--blend", "max", "-q")
    assert refused.returncode == 2 and "blend" in refused.stderr and "differ" in refused.stderr

    resumed = run_cli("fuse", layout_file, "-o", out, "--chunk", "24", "--resume", "-q")
    assert resumed.returncode == 0, resumed.stderr
    np.testing.assert_array_equal(read_ome_zarr_level(out).compute(), reference)


def test_resume_of_a_finished_output_does_nothing_and_of_a_missing_one_is_refused(
    layout_file, tmp_path
):
    out = tmp_path / "done.ome.zarr"
    assert run_cli("fuse", layout_file, "-o", out, "-q").returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = run_cli("fuse", layout_file, "-o", out, "--resume")
    assert again.returncode == 0 and "already complete: nothing to resume" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    other = run_cli("fuse", layout_file, "-o", out, "--resume", "--blend", "max")
    assert other.returncode == 2 and "finished image of another run" in other.stderr
    missing = run_cli("fuse", layout_file, "-o", tmp_path / "nope.ome.zarr", "--resume")
    assert missing.returncode == 2 and "nothing to resume" in missing.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--scheduler", "threads", "--workers", "1", "--chunk", "1000"],
        ["--scheduler", "threads", "--workers", "2", "--chunk", "33"],
        ["--scheduler", "processes", "--workers", "2", "--chunk", "100"],
        ["--scheduler", "sync", "--chunk", "64", "70"],
    ],
)
def test_same_output_on_every_scheduler_and_chunking(layout_file, reference, tmp_path, args):
    out = tmp_path / "s.ome.zarr"
    result = run_cli("fuse", layout_file, "-o", out, "-q", *args)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(read_ome_zarr_level(out).compute(), reference)


def test_local_cluster_same_output_and_progress(layout_file, reference, tmp_path):
    out = tmp_path / "d.ome.zarr"
    result = run_cli("fuse", layout_file, "-o", out, "--scheduler", "distributed",
                     "--workers", "2", "--chunk", "48")
    assert result.returncode == 0, result.stderr
    assert "dask dashboard:" in result.stderr and "fused 20 tiles" in result.stderr
    # distributed's INFO chatter (and the shutdown-race tracebacks it logs) stays off stderr
    assert "INFO distributed" not in result.stderr
    np.testing.assert_array_equal(read_ome_zarr_level(out).compute(), reference)


def test_unknown_scheduler_is_a_clear_error(layout_file, tmp_path):
    result = run_cli("fuse", layout_file, "-o", tmp_path / "x.ome.zarr", "--scheduler", "gpu")
    assert result.returncode == 2 and "unknown scheduler 'gpu'" in result.stderr


def test_worker_killed_mid_run_is_retried_with_identical_output(layout_file, reference):
    from distributed import Client, LocalCluster

    layout = read_layout(layout_file)
    arr = fuse(layout, chunk=16).data  # many small tasks: the run is still going at the kill
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        future = client.compute(arr)
        deadline = time.monotonic() + 60
        while not client.has_what() or not any(client.has_what().values()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pids = client.run(os.getpid)
        assert not future.done(), "the kill must happen mid-run"
        os.kill(next(iter(pids.values())), signal.SIGKILL)
        result = future.result(timeout=240)
    np.testing.assert_array_equal(result, reference)


def test_full_disk_fails_clearly_and_resumes(layout_file, reference, tmp_path, monkeypatch,
                                             capsys):
    """ENOSPC while chunks are written: one clear line, exit 2, an unfinished resumable output."""
    import errno

    from tilefuse.cli.main import main
    from tilefuse.ome_zarr import chunkstore

    out = tmp_path / "full.ome.zarr"
    real_write = chunkstore._write_atomic
    calls = {"n": 0}

    def write_until_full(path, payload):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, payload)

    monkeypatch.setattr(chunkstore, "_write_atomic", write_until_full)
    status = main(["fuse", str(layout_file), "-o", str(out), "--chunk", "48", "-q",
                   "--scheduler", "sync"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert "No space left on device" in err[0] and "--resume" in err[0]
    with pytest.raises(ValueError, match="unfinished"):
        read_ome_zarr_level(out)
    monkeypatch.setattr(chunkstore, "_write_atomic", real_write)  # space freed
    assert main(["fuse", str(layout_file), "-o", str(out), "--chunk", "48", "-q",
                 "--resume"]) == 0
    np.testing.assert_array_equal(read_ome_zarr_level(out).compute(), reference)


def test_graph_is_lazy_and_levels_are_stored_in_bounded_batches(tmp_path, monkeypatch, capsys):
    """fuse() makes chunk tasks only when asked; a level is stored BATCH_CHUNKS at a time."""
    from tilefuse import layout_from_arrays
    from tilefuse.ome_zarr import _store
    from tilefuse.ome_zarr import writer as ngff
    from tilefuse.runner import open_runner

    rng = np.random.default_rng(2)
    tiles = [rng.integers(0, 60000, (40, 40), dtype=np.uint16) for _ in range(4)]
    layout = layout_from_arrays(tiles, positions=[[0, 0], [0, 35.5], [36, 0], [35, 36.25]])
    mosaic = fuse(layout, chunk=10)
    assert mosaic.data.npartitions == 64
    assert not mosaic.data.dask.layers[mosaic.data.name].is_materialized()
    from tilefuse.fusion import jobs as jobs_module

    jobs = []
    real_job = jobs_module.chunk_job
    monkeypatch.setattr(jobs_module, "chunk_job", lambda p, b: jobs.append(b) or real_job(p, b))
    mosaic.data.blocks[2, 3].compute(scheduler="sync")
    assert jobs == [(2, 3)]  # one chunk asked for, one chunk fused

    expected = mosaic.compute()
    monkeypatch.setattr(_store, "BATCH_CHUNKS", 10)
    calls = []
    with open_runner("sync", progress=True) as (compute, _):
        def counting(*collections, label=None, batch=None):
            calls.append((label, len(collections)))
            return compute(*collections, label=label, batch=batch)

        ngff.write_image(mosaic, tmp_path / "m.ome.zarr", compute=counting)
    level0 = [c for c in calls if c[0] == "fuse"]
    assert [n for _, n in level0] == [10] * 6 + [4]  # 64 chunks, 10 per compute
    assert calls[len(level0)][0] == "pyramid 1"
    np.testing.assert_array_equal(ngff.read_ome_zarr_level(tmp_path / "m.ome.zarr"), expected)
    err = capsys.readouterr().err  # one bar for every batch and level (issue 20)
    totals = {int(t) for t in re.findall(r"\d+/(\d+) \[", err)}
    assert totals == {64 + 16 + 4 + 1} and "fusing" in err and "pyramid level" in err
    # started once, and full (tqdm redraws at most every 0.1 s: labels between may not show)
    assert len(re.findall(r"\| 0/85 \[", err)) == 1 and "85/85 [" in err
