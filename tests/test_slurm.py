"""``--scheduler slurm`` on a real one-node SLURM cluster (``scripts/start_slurm.sh``).

The session fixture starts SLURM (installing slurm-wlm and munge with apt-get when missing) and
skips these tests, saying why, where it cannot: not root, no apt-get, daemons that will not
start. Worker jobs get their settings from dask's ``jobqueue.slurm`` configuration, set here
through ``DASK_JOBQUEUE__SLURM__*`` variables, as a user would; each test's jobs carry a name of
their own, so the checks on ``squeue`` see only them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import run_main
from tilefuse.ome_zarr.writer import read_ome_zarr_level
from tilefuse.testing import grid_tileset, write_tileset

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "scripts" / "start_slurm.sh"
CHUNK = "32"


@pytest.fixture(scope="session")
def slurm():
    """SLURM up for the session; daemons this fixture started are stopped at the end."""
    if sys.platform != "linux":
        pytest.skip("SLURM tests need Linux (scripts/start_slurm.sh)")
    was_up = subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0 if \
        _have("sinfo") else False
    try:
        started = subprocess.run(["bash", str(START)], capture_output=True, text=True,
                                 timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("scripts/start_slurm.sh did not finish in 10 minutes")
    if started.returncode != 0:
        reason = (started.stderr.strip().splitlines() or ["no message"])[-1]
        pytest.skip(f"cannot start SLURM here: {reason}")
    yield
    if not was_up:
        subprocess.run(["bash", str(START), "--stop"], capture_output=True, timeout=60)


def _have(command: str) -> bool:
    from shutil import which

    return which(command) is not None


@pytest.fixture
def jobs(slurm, tmp_path, monkeypatch):
    """The name this test's worker jobs carry; every one is cancelled at the end."""
    name = f"tf-{uuid.uuid4().hex[:8]}"
    env = {"CORES": "1", "MEMORY": "1500MiB", "PROCESSES": "1", "WALLTIME": "00:10:00",
           "NAME": name, "LOG_DIRECTORY": str(tmp_path / "logs"), "DEATH_TIMEOUT": "15"}
    for key, value in env.items():
        monkeypatch.setenv(f"DASK_JOBQUEUE__SLURM__{key}", value)
    # a lost worker job is given up (and resubmitted) after 1 s instead of 15 s
    monkeypatch.setenv("DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT", "1s")
    yield name
    subprocess.run(["scancel", "--name", name], capture_output=True, timeout=30)


def _squeue(name: str) -> list[tuple[str, str]]:
    """``(job id, state)`` of the jobs called `name`."""
    out = subprocess.run(["squeue", "-h", "--name", name, "-o", "%i %T"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return [tuple(line.split()) for line in out.splitlines()]  # type: ignore[misc]


def _no_jobs_within(name: str, seconds: float) -> list:
    deadline = time.monotonic() + seconds
    while (left := _squeue(name)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _fuse_args(layout_file: Path, out: Path, *extra: str) -> list[str]:
    return ["fuse", str(layout_file), "-o", str(out), "--chunk", CHUNK, "--levels", "2", "-q",
            *extra]


@pytest.fixture(scope="module")
def reference(layout_file, tmp_path_factory):
    """Both pyramid levels of the local (threads) run."""
    out = tmp_path_factory.mktemp("ref") / "ref.ome.zarr"
    result = run_main(*_fuse_args(layout_file, out))
    assert result.returncode == 0, result.stderr
    return _levels(out)


def _levels(out: Path) -> list[np.ndarray]:
    levels, k = [], 0
    while (out / str(k)).exists():
        levels.append(read_ome_zarr_level(out, k).compute())
        k += 1
    return levels


def _assert_same(out: Path, reference: list[np.ndarray]) -> None:
    got = _levels(out)
    assert len(got) == len(reference) == 2
    for a, b in zip(got, reference, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def _chunk_files(out: Path) -> int:
    folder = out / "0" / "c"
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


TOTAL = -(-574 // int(CHUNK)) * -(-850 // int(CHUNK))  # level-0 chunks of the 574 x 850 mosaic


class Run:
    """``tilefuse ARGS --scheduler slurm --workers 2`` in a subprocess, watched through squeue:
    every job id of the test's name seen while it runs is kept in :attr:`ids`."""

    def __init__(self, args: list[str], name: str, log: Path) -> None:
        self.name, self.ids, self.log = name, [], log
        with log.open("w") as err:
            # SIGINT as a terminal's Ctrl-C delivers it: a suite started in the background by
            # a non-interactive shell ignores SIGINT, and a child inherits that (the run then
            # rightly ignores the test's signal)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tilefuse", *args, "--scheduler", "slurm", "--workers",
                 "2"], stdout=subprocess.DEVNULL, stderr=err,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def poll(self) -> list[tuple[str, str]]:
        jobs = _squeue(self.name)
        self.ids += [i for i, _ in jobs if i not in self.ids]
        return jobs

    def until(self, ready, timeout: float = 120) -> None:
        """Watch until ``ready()``; fail if the run ends or the time runs out first."""
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"the run ended first: {self.stderr()[-2000:]}"
            assert time.monotonic() < deadline, "timed out"
            self.poll()
            time.sleep(0.05)

    def running(self, out: Path, fraction: float):
        """A condition: both jobs run and `fraction` of level 0 is written."""
        return lambda: ([s for _, s in self.poll()].count("RUNNING") == 2
                        and _chunk_files(out) >= fraction * TOTAL)

    def wait(self, timeout: float = 240) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.1)
        return self.proc.wait(timeout=1)

    def stderr(self) -> str:
        return self.log.read_text()


# ------------------------------------------------------------------------------------ tests


def test_fuse_on_slurm_is_bit_identical_and_cancels_its_jobs(layout_file, reference, jobs,
                                                              tmp_path):
    out = tmp_path / "slurm.ome.zarr"
    run = Run(_fuse_args(layout_file, out)[:-1], jobs, tmp_path / "err.txt")  # not quiet
    assert run.wait() == 0, run.stderr()
    err = run.stderr()
    assert "Traceback" not in err and "INFO" not in err  # distributed's chatter needs -v
    assert "dask dashboard: http" in err and "fused 20 tiles" in err
    _assert_same(out, reference)
    assert len(run.ids) == 2  # two worker jobs were submitted...
    assert list((tmp_path / "logs").glob(f"{jobs}-*.out"))  # ...and the work ran in them
    assert _no_jobs_within(jobs, 5) == []  # none is left once the command has returned


def test_cancelled_worker_job_is_replaced_and_the_output_is_identical(
        layout_file, reference, jobs, tmp_path):
    out = tmp_path / "cancelled.ome.zarr"
    run = Run(_fuse_args(layout_file, out), jobs, tmp_path / "err.txt")
    run.until(run.running(out, 0.05))
    first = list(run.ids)
    subprocess.run(["scancel", first[0]], check=True, timeout=30)
    assert run.wait() == 0, run.stderr()
    assert "Traceback" not in run.stderr()
    _assert_same(out, reference)
    assert len(first) == 2 and len(run.ids) == 3, f"a replacement job is submitted: {run.ids}"
    assert _no_jobs_within(jobs, 5) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_cancels_every_job(layout_file, jobs, tmp_path, sig):
    out = tmp_path / "interrupted.ome.zarr"
    # 8² chunks (16 times as many) and the signal at the first chunk file, whichever job
    # wrote it: waiting for both jobs to run let the first one finish all 486 chunks of 32²
    # before the second started, and the signal came after the run had ended
    run = Run(_fuse_args(layout_file, out, "--chunk", "8"), jobs, tmp_path / "err.txt")
    run.until(lambda: _chunk_files(out) >= 1)
    run.proc.send_signal(sig)
    assert run.proc.wait(timeout=60) == 130, run.stderr()
    err = run.stderr()
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    assert _no_jobs_within(jobs, 5) == [], "jobs left in squeue after the interrupt"


def test_resume_after_the_whole_allocation_is_killed(layout_file, reference, jobs, tmp_path):
    out = tmp_path / "killed.ome.zarr"
    run = Run(_fuse_args(layout_file, out), jobs, tmp_path / "err.txt")
    run.until(run.running(out, 0.2))
    run.proc.kill()  # the job running tilefuse, and with it the scheduler, is gone...
    run.proc.wait()
    subprocess.run(["scancel", "--name", jobs], check=True, timeout=30)  # ...and its workers
    assert 0 < _chunk_files(out) < TOTAL
    with pytest.raises(ValueError, match="unfinished"):
        read_ome_zarr_level(out)
    resumed = Run([*_fuse_args(layout_file, out), "--resume"], jobs, tmp_path / "err2.txt")
    assert resumed.wait() == 0, resumed.stderr()
    _assert_same(out, reference)
    assert _no_jobs_within(jobs, 5) == []


def test_memory_budget_is_the_jobs_limit(slurm, tmp_path):
    """In a batch job the budget is the job's --mem, not the node's RAM."""
    script = tmp_path / "mem.sh"
    script.write_text(f"#!/bin/sh\n{sys.executable} -c 'from tilefuse.plan.memory import "
                      "total_memory; print(total_memory())'\n")
    result = subprocess.run(["sbatch", "--wait", "--mem=1500M", "-o", str(tmp_path / "m.out"),
                             str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int((tmp_path / "m.out").read_text().split()[-1]) == 1500 * 2**20


def test_register_on_slurm_gives_the_local_layout(jobs, tmp_path):
    ts = grid_tileset(grid=(3, 4), tile_shape=(128, 160), overlap=0.2, position_error=5,
                      seed=5)
    layout = write_tileset(ts, tmp_path / "tiles", stage=True)
    local = run_main("register", layout, "-o", tmp_path / "local.txt", "-q")
    assert local.returncode == 0, local.stderr
    remote = Run(["register", str(layout), "-o", str(tmp_path / "slurm.txt"), "-q"], jobs,
                 tmp_path / "err.txt")
    assert remote.wait() == 0, remote.stderr()
    assert (tmp_path / "slurm.txt").read_text() == (tmp_path / "local.txt").read_text()
    assert len(remote.ids) == 2 and list((tmp_path / "logs").glob(f"{jobs}-*.out"))
    assert _no_jobs_within(jobs, 5) == []


def test_fuse_with_register_on_slurm_starts_its_jobs_once(jobs, tmp_path):
    """Registration and fusion share the run's worker jobs: two jobs for --workers 2 (four,
    and a second wait for the queue, when each opened its own), the mosaic of a local run."""
    ts = grid_tileset(grid=(2, 3), tile_shape=(96, 128), overlap=0.2, position_error=4, seed=6)
    layout = write_tileset(ts, tmp_path / "tiles", stage=True)
    local = run_main("fuse", layout, "-o", tmp_path / "local.ome.zarr", "--register",
                     "--levels", "1", "-q")
    assert local.returncode == 0, local.stderr
    out = tmp_path / "slurm.ome.zarr"
    remote = Run(["fuse", str(layout), "-o", str(out), "--register", "--levels", "1", "-q"],
                 jobs, tmp_path / "err.txt")
    assert remote.wait() == 0, remote.stderr()
    assert len(remote.ids) == 2 and list((tmp_path / "logs").glob(f"{jobs}-*.out"))
    np.testing.assert_array_equal(read_ome_zarr_level(out).compute(),
                                  read_ome_zarr_level(tmp_path / "local.ome.zarr").compute())
    assert _no_jobs_within(jobs, 5) == []


_WORKER_ENV = """
import os
from distributed import Client
from tilefuse.cli.allocator import retain_freed_memory, worker_environ
from tilefuse.cluster import jobqueue_cluster

retain_freed_memory()  # as the CLI does
with jobqueue_cluster("slurm", jobs=1) as cluster, Client(cluster) as client:
    client.wait_for_workers(1, timeout=120)
    seen = client.run(lambda: {k: os.environ.get(k) for k in worker_environ()})
print(list(seen.values()) == [worker_environ()], seen)
"""


def _without_malloc_variables() -> dict[str, str]:
    """This process's environment less glibc's MALLOC_* variables: a nanny gives those
    precedence over its configuration, and distributed leaves its own MALLOC_TRIM_THRESHOLD_ in
    the environment of whatever started a LocalCluster (an earlier test in this process)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}


def test_worker_jobs_get_the_allocator_settings(jobs):
    """The glibc settings of tilefuse.cli.allocator reach the worker processes in the jobs."""
    result = subprocess.run([sys.executable, "-c", _WORKER_ENV], capture_output=True,
                            text=True, timeout=180, env=_without_malloc_variables())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("True"), result.stdout
    assert _no_jobs_within(jobs, 5) == []


def test_local_cluster_workers_get_the_allocator_settings(monkeypatch):
    import dask
    from distributed import Client, LocalCluster

    from tilefuse.cli.allocator import retain_freed_memory, worker_environ

    key = "distributed.nanny.pre-spawn-environ"
    for name in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(name)  # see _without_malloc_variables
    with dask.config.set({key: dask.config.get(key)}):  # restored after the test
        retain_freed_memory()
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            seen = client.run(lambda: {k: os.environ.get(k) for k in worker_environ()})
    assert list(seen.values()) == [worker_environ()]


# ------------------------------------------------------- clear errors, no SLURM needed


def test_without_dask_jobqueue_is_one_line_saying_what_to_install(layout_file, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # import fails
    result = run_main("fuse", layout_file, "-o", tmp_path / "x.ome.zarr", "--scheduler",
                      "slurm", "-q")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "needs dask-jobqueue" in result.stderr and "pip install" in result.stderr


def test_missing_jobqueue_configuration_is_a_clear_error(layout_file, tmp_path, monkeypatch):
    monkeypatch.delenv("DASK_JOBQUEUE__SLURM__CORES", raising=False)
    monkeypatch.setenv("DASK_JOBQUEUE__SLURM__MEMORY", "4GB")
    env = {**os.environ, "DASK_CONFIG": str(tmp_path / "no-config")}
    result = subprocess.run([sys.executable, "-m", "tilefuse", "fuse", str(layout_file), "-o",
                             str(tmp_path / "x.ome.zarr"), "--scheduler", "slurm", "-q"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "jobqueue.slurm" in result.stderr and "DASK_JOBQUEUE__SLURM__CORES" in result.stderr
    assert not (tmp_path / "x.ome.zarr").exists()


def test_other_job_queues_take_the_same_path(layout_file, tmp_path, monkeypatch):
    monkeypatch.setenv("DASK_JOBQUEUE__PBS__CORES", "1")
    monkeypatch.setenv("DASK_JOBQUEUE__PBS__MEMORY", "1GB")
    monkeypatch.setenv("PATH", str(tmp_path))  # no qsub here
    result = subprocess.run([sys.executable, "-m", "tilefuse", "fuse", str(layout_file), "-o",
                             str(tmp_path / "x.ome.zarr"), "--scheduler", "pbs", "-q"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "qsub is not on PATH" in result.stderr
