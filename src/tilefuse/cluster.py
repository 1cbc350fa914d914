"""Dask workers as batch jobs: SLURM, PBS, SGE or LSF through dask-jobqueue (CLI support).

``tilefuse fuse --scheduler slurm --workers 4`` submits four worker jobs, runs the dask
scheduler inside the ``tilefuse`` process, fuses, and cancels the jobs when the run ends: on
success, on an error, on Ctrl-C and on ``SIGTERM`` (what ``scancel`` of the job that runs
``tilefuse`` sends). There is no scheduler process to start or keep alive.

What each job asks for comes from dask's own configuration, ``jobqueue.<name>`` (the same
settings a ``SLURMCluster()`` in Python reads): ``~/.config/dask/jobqueue.yaml``, or
environment variables such as ``DASK_JOBQUEUE__SLURM__CORES=4``,
``DASK_JOBQUEUE__SLURM__MEMORY=16GB``, ``DASK_JOBQUEUE__SLURM__WALLTIME=02:00:00``,
``DASK_JOBQUEUE__SLURM__QUEUE=...``, ``DASK_JOBQUEUE__SLURM__ACCOUNT=...``,
``DASK_JOBQUEUE__SLURM__LOG_DIRECTORY=...``.

A worker job that dies (cancelled, pre-empted, out of walltime) loses its tasks to the other
workers, which run them again; a replacement job is submitted once the scheduler has given the
lost worker up (``distributed.deploy.lost-worker-timeout``, 15 s by default).
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import shutil
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import Executor
from typing import Any

from tilefuse.errors import InputError

__all__ = ["JOBQUEUES", "REPLACE_INTERVAL_S", "cluster_executor", "jobqueue_cluster",
           "quiet_distributed", "terminate_as_interrupt", "worker_resources"]

log = logging.getLogger(__name__)

JOBQUEUES: dict[str, str] = {"slurm": "SLURMCluster", "pbs": "PBSCluster",
                             "sge": "SGECluster", "lsf": "LSFCluster"}
"""``--scheduler`` name -> dask-jobqueue cluster class."""

REPLACE_INTERVAL_S = 1.0
"""How often the cluster is asked to resubmit worker jobs that were lost."""

_INSTALL = "pip install 'tilefuse[hpc]' (or: pip install dask-jobqueue)"


def _cluster_class(kind: str) -> Any:
    """The dask-jobqueue class for `kind`, or a one-line error saying what to install."""
    if kind not in JOBQUEUES:
        raise InputError(f"unknown job queue {kind!r}; expected one of {', '.join(JOBQUEUES)}")
    main = threading.current_thread() is threading.main_thread()
    saved = signal.getsignal(signal.SIGINT) if main else None
    try:
        import dask_jobqueue
    except ImportError:
        raise InputError(f"--scheduler {kind} needs dask-jobqueue: {_INSTALL}") from None
    finally:
        # importing dask_jobqueue (its runner module) makes Ctrl-C a silent sys.exit():
        # exit status 0 as if the run had finished; keep KeyboardInterrupt instead
        if main and saved is not None:
            signal.signal(signal.SIGINT, saved)
    return getattr(dask_jobqueue, JOBQUEUES[kind])


def _check_config(kind: str, cls: Any) -> None:
    """Refuse, in one line, a configuration that cannot submit a job."""
    import dask

    missing = [key for key in ("cores", "memory")
               if dask.config.get(f"jobqueue.{kind}.{key}", None) in (None, "")]
    if missing:
        env = " ".join(f"DASK_JOBQUEUE__{kind.upper()}__{key.upper()}=..." for key in missing)
        raise InputError(
            f"--scheduler {kind}: dask's jobqueue.{kind} configuration does not say the "
            f"{' and '.join(missing)} of a worker job; set {kind}: {{cores: 4, memory: 16GB}} "
            f"under jobqueue: in ~/.config/dask/jobqueue.yaml, or {env}")
    command = str(cls.job_cls.submit_command or "").split()
    if command and shutil.which(command[0]) is None:
        raise InputError(f"--scheduler {kind}: {command[0]} is not on PATH; run tilefuse where "
                         f"jobs can be submitted (a login node of the {kind.upper()} cluster)")


def worker_resources(kind: str) -> tuple[int, int] | None:
    """Memory (bytes) and threads of one dask worker process in a `kind` job, as dask-jobqueue
    will start it from dask's ``jobqueue.<kind>`` configuration (``memory`` and ``cores`` per
    job, split over ``processes``, by default about the square root of ``cores``).

    Returns
    -------
    (int, int) or None
        None when the configuration does not state ``cores`` and ``memory`` (the run is then
        refused by :func:`jobqueue_cluster`, with what to set).
    """
    import dask
    from dask.utils import parse_bytes
    from distributed.deploy.utils import nprocesses_nthreads

    cores = dask.config.get(f"jobqueue.{kind}.cores", None)
    memory = dask.config.get(f"jobqueue.{kind}.memory", None)
    if not cores or not memory:
        return None
    try:
        cores, memory = int(cores), parse_bytes(str(memory))
    except (TypeError, ValueError):
        return None  # refused, with the configuration's own words, when the cluster is made
    processes = dask.config.get(f"jobqueue.{kind}.processes", None)
    processes = int(processes) if processes else nprocesses_nthreads(cores)[0]
    return memory // processes, max(1, cores // processes)


@contextlib.contextmanager
def jobqueue_cluster(kind: str, *, jobs: int) -> Iterator[Any]:
    """A dask-jobqueue cluster of `jobs` worker jobs, cancelled when the block ends.

    Parameters
    ----------
    kind : str
        ``slurm``, ``pbs``, ``sge`` or ``lsf`` (see :data:`JOBQUEUES`).
    jobs : int
        Worker jobs to keep submitted; lost ones are resubmitted while the block runs.

    Yields
    ------
    dask_jobqueue.JobQueueCluster
        Configured from dask's ``jobqueue.<kind>`` settings only.

    Raises
    ------
    InputError
        dask-jobqueue is not installed, the configuration lacks cores or memory, or the
        submit command (``sbatch``...) is not on ``PATH``.
    """
    cls = _cluster_class(kind)
    _check_config(kind, cls)
    quiet_distributed()  # before the cluster's scheduler starts and logs
    try:
        cluster = cls(job_script_prologue=_prologue(kind))
    except (ValueError, TypeError) as exc:
        raise InputError(f"--scheduler {kind}: dask's jobqueue.{kind} configuration: "
                         f"{str(exc).splitlines()[0]}") from None
    stop = threading.Event()
    keeper = threading.Thread(target=_keep_jobs, args=(cluster, jobs, stop),
                              name="tilefuse-jobs", daemon=True)
    try:
        with terminate_as_interrupt():
            log.info("submitting %d %s worker job(s):\n%s", jobs, kind, cluster.job_script())
            cluster.scale(jobs=jobs)
            keeper.start()
            yield cluster
    finally:
        stop.set()
        if keeper.is_alive():
            keeper.join()
        _close(cluster)


@contextlib.contextmanager
def cluster_executor(scheduler: str, workers: int | None) -> Iterator[Executor | None]:
    """An executor on the workers `scheduler` names, for work that is not a dask graph
    (registration's pair measurements); None where the caller's own threads serve as well.

    Parameters
    ----------
    scheduler : str
        A job queue (:data:`JOBQUEUES`: `workers` jobs, default 1, cancelled when the block
        ends) or a scheduler address (``tcp://host:8786``). Anything else (``threads``,
        ``processes``, ``sync``, ``distributed``: this machine) yields None.
    workers : int, optional
        Worker jobs of a job queue.

    Yields
    ------
    concurrent.futures.Executor or None
        ``distributed.Client.get_executor()``.
    """
    if scheduler not in JOBQUEUES and "://" not in scheduler:
        yield None
        return
    from distributed import Client

    quiet_distributed()
    with contextlib.ExitStack() as stack:
        if scheduler in JOBQUEUES:
            client = Client(stack.enter_context(jobqueue_cluster(scheduler, jobs=workers or 1)))
        else:
            try:
                client = Client(scheduler, timeout="10s")
            except OSError as exc:
                raise InputError(f"cannot reach the dask scheduler at {scheduler}: {exc}") from None
        stack.callback(client.close)
        yield client.get_executor()


def quiet_distributed() -> None:
    """Keep distributed's INFO chatter off stderr unless the user asked for ``-v``.

    distributed configures its own logger at INFO when imported; its shutdown races log
    harmless ``CommClosedError`` tracebacks at that level, which a user would take for a crash.
    Warnings and errors (memory pressure, dead workers) still show.
    """
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        logging.getLogger("distributed").setLevel(logging.WARNING)


def _prologue(kind: str) -> list[str]:
    """The configured ``job-script-prologue``, then this process's
    ``distributed.nanny.pre-spawn-environ`` exported: the nanny in the job applies it to its
    worker, as a local one would (e.g. :func:`tilefuse.cli.allocator.retain_freed_memory`)."""
    import dask

    lines = [str(line) for line in dask.config.get(f"jobqueue.{kind}.job-script-prologue",
                                                   None) or []]
    environ = dask.config.get("distributed.nanny.pre-spawn-environ", None) or {}
    if environ:
        value = repr({str(k): str(v) for k, v in environ.items()})
        lines.append(f"export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON={shlex.quote(value)}")
    return lines


def _keep_jobs(cluster: Any, jobs: int, stop: threading.Event) -> None:
    """Ask for `jobs` jobs every :data:`REPLACE_INTERVAL_S`: the cluster then resubmits the
    jobs whose workers the scheduler gave up."""
    while not stop.wait(REPLACE_INTERVAL_S):
        try:
            cluster.scale(jobs=jobs)
        except Exception as exc:  # closing under us: the block is ending
            log.debug("rescaling the job queue cluster failed: %s", exc)
            return


def _close(cluster: Any) -> None:
    """Cancel every job and stop the scheduler, even when interrupted again meanwhile."""
    with terminate_as_interrupt(enabled=False):
        try:
            cluster.close()
        except Exception as exc:  # the jobs are cancelled first; report the rest
            log.warning("closing the job queue cluster: %s", exc)


@contextlib.contextmanager
def terminate_as_interrupt(*, enabled: bool = True) -> Iterator[None]:
    """While the block runs, ``SIGTERM`` raises KeyboardInterrupt (as Ctrl-C does); with
    ``enabled=False``, ``SIGINT`` and ``SIGTERM`` are held off instead (a clean-up that must
    finish). Only in the main thread; elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f" by signal {signal.Signals(signum).name}")

    def hold(signum: int, frame: Any) -> None:
        pending.append(signum)

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if enabled:
        signal.signal(signal.SIGTERM, interrupt)
    else:
        for s in saved:
            signal.signal(s, hold)
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        if pending:
            raise KeyboardInterrupt(f" by signal {signal.Signals(pending[0]).name}")
