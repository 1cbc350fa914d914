"""Peak memory is bounded by chunk size x threads + cache, not by the mosaic's size; the
estimate of it is honest (within 2x of the measured peak), and the budget is the job's memory
limit (cgroup v1/v2 along the process's own cgroup, SLURM), not the machine's RAM."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import run_main

CHILD = textwrap.dedent(
    """
    import json, sys
    import dask
    import numpy as np
    from tilefuse import fuse
    from tilefuse.cli.allocator import retain_freed_memory
    from tilefuse.ome_zarr.writer import read_ome_zarr_level, write_ome_zarr
    from tilefuse.testing import PatternSource, pattern_layout

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    retain_freed_memory()  # as the CLI does: freed blocks are reused, never added
    from tilefuse.fusion.kernel import resolve_backend
    if resolve_backend() == "numba":  # numba + LLVM (~140 MiB) load once: an import, not data
        from tilefuse.fusion._numba.kernel import warm_up
        warm_up()
    side = int(sys.argv[2])
    layout = pattern_layout((side, side), tile=512)
    arr = fuse(layout, chunk=512, cache_bytes=32 * 2**20)
    base = status("VmRSS")
    with dask.config.set(scheduler="threads", num_workers=2):
        write_ome_zarr(arr, sys.argv[1], levels=2)
    peak = status("VmHWM")
    stored = read_ome_zarr_level(sys.argv[1], 0)
    window = np.asarray(stored[5000:5100, 3000:3100])
    expect = PatternSource((5000, 3000), (100, 100)).read()[0]
    print(json.dumps({"base": base, "peak": peak, "mosaic": int(arr.nbytes),
                      "exact": bool(np.array_equal(window, expect))}))
    """
)


def _fuse_in_child(out, side: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(out), str(side)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["exact"]
    result["growth"] = result["peak"] - result["base"]
    return result


def test_peak_memory_does_not_grow_with_the_mosaic(tmp_path):
    from tilefuse.plan.info import estimate_peak_bytes

    small = _fuse_in_child(tmp_path / "small.ome.zarr", 12)
    big = _fuse_in_child(tmp_path / "big.ome.zarr", 28)
    print(f"peak RSS growth: {small['growth'] / 2**20:.0f} MiB for a "
          f"{small['mosaic'] / 2**20:.0f} MiB mosaic, {big['growth'] / 2**20:.0f} MiB for "
          f"{big['mosaic'] / 2**20:.0f} MiB")
    assert big["mosaic"] > 5 * small["mosaic"] and big["mosaic"] > 300 * 2**20
    # 5x the pixels, (nearly) the same memory: a few chunks per thread and the tile cache
    assert big["growth"] < 1.25 * small["growth"] + 24 * 2**20
    budget = estimate_peak_bytes(512 * 512, 1, 2, threads=2, cache_bytes=32 * 2**20)
    assert big["growth"] < budget
    assert big["growth"] < big["mosaic"] / 2


# ---------------------------------------------------------------------- the memory limit

GIB = 2**30
SLURM_VARS = ("SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU", "SLURM_CPUS_ON_NODE",
              "SLURM_CPUS_PER_TASK")


@pytest.fixture
def fake_machine(tmp_path, monkeypatch):
    """A 64 GiB machine (as ``distributed`` reads it) with a fake cgroup tree under tmp_path,
    outside SLURM. Returns ``write(proc_cgroup_text, {relative path: content})``."""
    import tilefuse.plan.memory as memory

    monkeypatch.setattr(memory, "_system_memory", lambda: 64 * GIB)
    monkeypatch.setattr(memory, "CGROUP_ROOT", tmp_path / "cgroup")
    monkeypatch.setattr(memory, "PROC_CGROUP", tmp_path / "proc_self_cgroup")
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)

    def write(proc: str, files: dict[str, str]) -> None:
        (tmp_path / "proc_self_cgroup").write_text(proc)
        for rel, text in files.items():
            path = tmp_path / "cgroup" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    return write


def test_cgroup_v2_limit_is_read_along_the_process_own_cgroup(fake_machine):
    from tilefuse.plan.info import parse_bytes, total_memory
    from tilefuse.plan.memory import memory_limits

    job = "system.slice/slurmstepd.scope/job_7"
    fake_machine("0::/system.slice/slurmstepd.scope/job_7/step_0\n", {
        f"{job}/memory.max": "4294967296\n", f"{job}/memory.high": "max\n",
        f"{job}/step_0/memory.max": "max\n", "system.slice/memory.max": "max\n",
    })
    assert total_memory() == 4 * GIB  # the job's limit, three levels below the root
    assert any(k.endswith("job_7/memory.max") for k in memory_limits())
    assert parse_bytes("0.5") == 2 * GIB  # a fraction is of the job's memory, not the RAM
    fake_machine("0::/system.slice/slurmstepd.scope/job_7/step_0\n",
                 {f"{job}/step_0/memory.high": "3221225472\n"})
    assert total_memory() == 3 * GIB  # the smallest along the path


def test_cgroup_v1_limit_and_a_container_that_sees_only_its_own_cgroup(fake_machine):
    from tilefuse.plan.info import total_memory

    fake_machine("5:cpu,cpuacct:/slurm/uid_1/job_9\n4:memory:/slurm/uid_1/job_9\n", {
        "memory/memory.limit_in_bytes": "9223372036854771712\n",  # v1 for "unlimited"
        "memory/slurm/uid_1/job_9/memory.limit_in_bytes": "2147483648\n",
    })
    assert total_memory() == 2 * GIB
    # a container's /proc/self/cgroup names a path its cgroup mount does not have: the
    # mount's root is then the container's own cgroup
    fake_machine("4:memory:/process_api/7f8f\n",
                 {"memory/memory.limit_in_bytes": "1073741824\n",
                  "memory/slurm/uid_1/job_9/memory.limit_in_bytes": "max\n"})
    assert total_memory() == 1 * GIB


def test_no_cgroup_files_leaves_the_machine_memory(fake_machine):
    from tilefuse.plan.info import total_memory

    fake_machine("0::/\n", {"memory.max": "max\n"})
    assert total_memory() == 64 * GIB


def test_slurm_allocation_is_the_limit(fake_machine, monkeypatch):
    from tilefuse.plan.info import total_memory

    fake_machine("0::/\n", {})
    monkeypatch.setenv("SLURM_MEM_PER_CPU", "1024")  # MiB, as SLURM writes it
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert total_memory() == 4 * GIB
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "3")  # the job's CPUs on this node come first
    assert total_memory() == 3 * GIB
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "2048")
    assert total_memory() == 2 * GIB
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "1G")
    assert total_memory() == 1 * GIB
    for name in SLURM_VARS:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "0")  # --mem=0: all of the node
    assert total_memory() == 64 * GIB


def test_slurm_limit_reaches_the_real_reader(monkeypatch):
    """No fakes: whatever the machine, a 1 GiB SLURM allocation is what the budget sees."""
    from tilefuse.plan.info import parse_bytes, total_memory

    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "1024")
    assert total_memory() == 1 * GIB
    assert parse_bytes("0.5") == GIB // 2


def test_parse_bytes_takes_sizes_and_refuses_nonsense():
    from tilefuse.plan.info import parse_bytes

    for text in ("0", "-5MB", "MB", "", "lots", "5 parsecs"):
        with pytest.raises(ValueError, match="memory limit"):
            parse_bytes(text)
    assert parse_bytes("100MB") == 10**8 and parse_bytes("100 mb") == 10**8
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("1.5GiB") == 3 * GIB // 2
    assert parse_bytes("2e9") == 2 * 10**9
    assert parse_bytes("0.25", total=4 * GIB) == GIB


# ------------------------------------------------------------- the estimate and the budget


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    """4 x 4 uint16 tiles of 384², fractional positions: ~1.4k² mosaic, 4 chunks, a pyramid."""
    from tilefuse.testing import grid_tileset, write_tileset

    ts = grid_tileset(grid=(4, 4), tile_shape=(384, 384), overlap=0.1, position_error=3,
                      fractional=True, seed=5)
    return write_tileset(ts, tmp_path_factory.mktemp("small_set"), stage=False)


_PEAK_OF_CHILD = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:]).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, rc)\n"
)


def _fuse_peak(layout: Path, out: Path, *options: str) -> tuple[int, subprocess.CompletedProcess]:
    """Run ``tilefuse [-v] fuse LAYOUT -o OUT OPTIONS`` as the only child of a fresh process
    (``-v`` among ``options`` goes first); its peak RSS in bytes."""
    verbose = ["-v"] if "-v" in options else []
    options = tuple(o for o in options if o != "-v")
    cmd = [sys.executable, "-m", "tilefuse", *verbose, "fuse", str(layout), "-o", str(out),
           *options]
    proc = subprocess.run([sys.executable, "-c", _PEAK_OF_CHILD, *cmd], capture_output=True,
                          text=True, timeout=300)
    peak, rc = (int(v) for v in proc.stdout.split()[-2:])
    assert "Traceback" not in proc.stderr, proc.stderr
    return peak, subprocess.CompletedProcess(cmd, rc, proc.stdout, proc.stderr)


def _mib(text: str) -> int:
    value, unit = re.search(r"~([\d.]+) (KiB|MiB|GiB)", text).groups()
    return int(float(value) * {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit])


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_info_estimate_is_within_2x_of_the_measured_peak(small_set, tmp_path):
    from tilefuse.io.readers import read_layout
    from tilefuse.plan.info import describe

    for backend in ("default", "numpy"):  # default: numba where installed
        if backend == "default":  # what `tilefuse info` prints
            lines = run_main("info", small_set).stdout.splitlines()
        else:
            lines = describe(read_layout(small_set), threads=os.cpu_count() or 1, backend=backend)
        estimate = _mib(next(ln for ln in lines if ln.startswith("peak memory")))
        peak, result = _fuse_peak(small_set, tmp_path / f"{backend}.ome.zarr", "-q",
                                  *(["--backend", backend] if backend != "default" else []))
        assert result.returncode == 0, result.stderr
        ratio = estimate / peak
        print(f"{backend}: estimate {estimate / 2**20:.0f} MiB, measured {peak / 2**20:.0f} MiB")
        assert 0.5 <= ratio <= 2, (backend, estimate, peak)


def test_small_budget_picks_the_smallest_chunk_that_fits_or_names_the_need(small_set):
    from tilefuse.io.readers import read_layout
    from tilefuse.plan.info import choose_chunk, chunk_peak, layout_memory

    options = layout_memory(read_layout(small_set))
    args = (1, 2, 2, 8 * 2**20, "numpy")  # 1 channel, uint16, 2 threads, 8 MiB cache
    need = {side: chunk_peak((side, side), *args, **options).total for side in (64, 128, 1024)}
    assert need[64] < need[128] < need[1024] < 200 * 2**20  # honest: not ~900 MiB
    assert choose_chunk(2, *args[:-1], need[128] - 1, "numpy", **options) == 64
    assert choose_chunk(2, *args[:-1], need[128], "numpy", **options) == 128
    with pytest.raises(ValueError, match=r"needs with the smallest chunks \(64\): ~.*libraries"):
        choose_chunk(2, *args[:-1], need[64] - 1, "numpy", **options)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_memory_limit_too_small_is_refused_with_the_need_and_the_need_is_enough(small_set,
                                                                               tmp_path):
    common = ("--backend", "numpy", "--cache-mb", "8", "--workers", "2")
    refused = run_main("fuse", small_set, "-o", tmp_path / "a.ome.zarr", "--memory-limit",
                      "50MB", *common)
    assert refused.returncode == 2
    message = refused.stderr.strip()
    assert len(message.splitlines()) == 1 and "libraries" in message and "tile cache" in message
    need = _mib(message)
    assert not (tmp_path / "a.ome.zarr").exists()
    # what the message asks for is enough, and honest: the run then peaks within 2x of it
    peak, result = _fuse_peak(small_set, tmp_path / "b.ome.zarr", "-v", "-q", "--memory-limit",
                              f"{need // 2**20 + 1}MiB", *common)
    assert result.returncode == 0, result.stderr
    assert re.search(r"chunk (64|128|256|512) chosen", result.stderr)
    assert need / 2 <= peak <= 2 * need


def test_fuse_and_info_see_the_slurm_allocation(small_set, tmp_path, monkeypatch):
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "80")  # MiB; the default budget is half of it
    info = run_main("info", small_set)
    assert "80.0 MiB available to this process (SLURM_MEM_PER_NODE)" in info.stdout
    result = run_main("fuse", small_set, "-o", tmp_path / "m.ome.zarr", "--backend", "numpy")
    assert result.returncode == 2 and "memory limit 40.0 MiB" in result.stderr


def test_chunk_above_the_budget_warns_with_the_parts(small_set, tmp_path):
    result = run_main("fuse", small_set, "-o", tmp_path / "m.ome.zarr", "--chunk", "4096",
                      "--memory-limit", "90MB", "--backend", "numpy", "--cache-mb", "8", "-q")
    assert result.returncode == 0, result.stderr
    assert "--chunk 4096 needs ~" in result.stderr and "libraries" in result.stderr
    assert "above the 86 MiB memory limit" in result.stderr


def test_job_queue_budget_is_the_worker_jobs_not_this_machines(monkeypatch):
    """With --scheduler slurm the chunks are fused in the worker jobs: the budget is a fraction
    of a worker process's share of the configured job memory, for its threads (issue 18)."""
    import dask

    from tilefuse import _run
    from tilefuse.plan import memory
    from tilefuse.testing import pattern_layout

    layout = pattern_layout((10, 10), tile=1024)  # planned only: no pixel is made
    options = {"chunk": None, "cache_bytes": 64 * 2**20, "backend": "numpy"}
    monkeypatch.setattr(memory, "total_memory", lambda **_: 64 * 2**30)  # a big login node
    local = _run.budget_chunk(layout, memory_limit="0.5", workers=2, **options)
    job = {"jobqueue.slurm.cores": 4, "jobqueue.slurm.memory": "1GiB",
           "jobqueue.slurm.processes": 2}  # two worker processes of 512 MiB and 2 threads
    with dask.config.set(job):
        on_slurm = _run.budget_chunk(layout, memory_limit="0.5", workers=8, scheduler="slurm",
                                     **options)
        absolute = _run.budget_chunk(layout, memory_limit="400MiB", workers=8,
                                     scheduler="slurm", **options)
    # the same as asking for a quarter GiB, 2 threads, on this machine in a process with dask
    assert on_slurm == _run.budget_chunk(layout, memory_limit=str(2**28), workers=2, dask=True,
                                         **options)
    assert (on_slurm, local) == (512, 1024)
    # a size is per worker process too, for its 2 threads, not the 8 jobs
    assert absolute == _run.budget_chunk(layout, memory_limit="400MiB", workers=2, dask=True,
                                         **options)
    assert absolute > _run.budget_chunk(layout, memory_limit="400MiB", workers=8, dask=True,
                                        **options)


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc only")
def test_allocator_settings_reach_glibc_without_a_library_search(monkeypatch):
    """glibc's mallopt is found among the process's own symbols (no ``ctypes.util``, whose
    import and ``ldconfig`` cost every command ~17 ms) and takes all three settings."""
    import ctypes.util

    from tilefuse.cli.allocator import retain_freed_memory

    def no_search(name):
        raise AssertionError("searched for the C library")

    monkeypatch.setattr(ctypes.util, "find_library", no_search)
    assert retain_freed_memory(workers=False) is True
