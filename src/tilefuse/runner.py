"""Where dask work runs, with one progress bar on every scheduler (CLI support).

:func:`open_runner` yields a ``compute(*collections)`` function for the OME-Zarr writer:

- ``threads`` (default), ``processes``, ``sync``: dask's local schedulers, progress from dask
  callbacks (:func:`task_callbacks`);
- ``distributed``: a :class:`distributed.LocalCluster` started here (its dashboard link is
  reported), progress from the futures as they finish (:func:`follow_futures`, any Client);
- ``tcp://HOST:PORT`` (or any scheduler address): connect to a running cluster;
- ``slurm``, ``pbs``, ``sge``, ``lsf``: worker jobs submitted through dask-jobqueue
  (:mod:`tilefuse.cluster`), cancelled when the runner closes, progress as for ``distributed``.

Only chunk descriptions (paths, affines) travel to workers; tiles are read where they are fused.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING, Any

from tilefuse.cli.progress import ProgressBar
from tilefuse.cluster import JOBQUEUES, quiet_distributed
from tilefuse.errors import InputError

if TYPE_CHECKING:
    from tilefuse.ome_zarr._store import Batch

__all__ = ["LOCAL_SCHEDULERS", "ClientCompute", "LocalCompute", "follow_futures", "local_scheduler",
           "on_cluster", "open_runner", "share", "task_callbacks", "write_compute"]

ProgressFn = Callable[[int, int, str], None]
"""``progress(done, total, label)``, as in :mod:`tilefuse.pipeline`."""

LOCAL_SCHEDULERS = ("threads", "processes", "sync")


def local_scheduler(name: str) -> Callable[..., Any]:
    """dask's ``get`` function of a local scheduler (one of :data:`LOCAL_SCHEDULERS`).

    Passed to ``dask.compute(scheduler=...)`` as the function, not the name: given a name,
    dask first imports ``distributed`` to look for a running client (~0.3 s of every run).
    """
    where = {"threads": ("dask.threaded", "get"), "processes": ("dask.multiprocessing", "get"),
             "sync": ("dask.local", "get_sync")}
    if name not in where:
        raise InputError(f"unknown local scheduler {name!r}; expected one of "
                         f"{', '.join(LOCAL_SCHEDULERS)}")
    module, function = where[name]
    get: Callable[..., Any] = getattr(importlib.import_module(module), function)
    return get


def _reporter(progress: bool | ProgressFn | None) -> tuple[ProgressFn | None, ProgressBar | None]:
    """``(report, own_bar)``: a callback passed in, a bar of our own (``True``) or nothing."""
    if callable(progress):
        return progress, None
    if progress:
        bar = ProgressBar()
        return bar, bar
    return None, None


def _name(label: str | None) -> str:
    """A writer's compute label as a person reads it: "fuse" -> "fusing", "pyramid 2" ->
    "pyramid level 2"."""
    if not label or label == "fuse":
        return "fusing"
    return label.replace("pyramid ", "pyramid level ")


def share(batch: Batch | None, done: int, total: int, label: str | None,
          whole: bool = True) -> tuple[int, int, str]:
    """``(done, total, label)`` to report when `done` of `total` tasks of a compute are finished.

    With the writer's `batch`, in chunks: of the whole image (`whole`: one bar for every batch
    and level) or of this compute's level; without it, the compute's own tasks.
    """
    if batch is None:
        return done, total, _name(label)
    part = batch.count * done // total if total else batch.count
    if whole:
        return batch.start + part, batch.total, _name(batch.label)
    return batch.level_start + part, batch.level_total, _name(batch.label)


def task_callbacks(report: ProgressFn, batch: Batch | None, label: str | None,
                   whole: bool = True) -> list[tuple]:
    """dask callbacks (``(start, start_state, pretask, posttask, finish)``) that `report` the
    progress of one local compute: at most about 200 reports per compute."""
    counts = {"done": 0, "total": 0}

    def start_state(dsk: Any, state: dict) -> None:
        total = sum(len(state[s]) for s in ("ready", "waiting", "running"))
        counts["total"] = total + len(state["finished"])
        report(*share(batch, 0, counts["total"], label, whole))

    def posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        counts["done"] += 1
        done, total = counts["done"], counts["total"]
        if done == total or done % max(1, total // 200) == 0:
            report(*share(batch, done, total, label, whole))

    return [(None, start_state, None, posttask, None)]


class LocalCompute:
    """The writer's compute on this machine: dask collections on a local scheduler
    (``compute(*collections, label=None, batch=None)``) and, for ``threads`` and ``sync``,
    plain tasks on threads without dask (``run_tasks(tasks, label=None, batch=None)``: what
    the OME-Zarr writer stores block pixels with).

    Parameters
    ----------
    scheduler : str
        One of :data:`LOCAL_SCHEDULERS`.
    workers : int, optional
        Threads or processes (default: one per core).
    report : callable, optional
        ``report(done, total, label)`` as tasks finish (at most about 200 reports a compute).
    whole : bool
        Report chunks of the whole image (one bar for every level) rather than of each level.
    first_label : str, optional
        Label of computes that name none.
    """

    def __init__(self, scheduler: str, workers: int | None, report: ProgressFn | None, *,
                 whole: bool = True, first_label: str | None = None) -> None:
        if scheduler not in LOCAL_SCHEDULERS:
            raise InputError(f"unknown local scheduler {scheduler!r}; expected one of "
                             f"{', '.join(LOCAL_SCHEDULERS)}")
        self.scheduler = scheduler
        self.workers = workers
        self.report = report
        self.whole = whole
        self.first_label = first_label
        self.run_tasks = self._run_tasks if scheduler in ("threads", "sync") else None

    def __call__(self, *collections: Any, label: str | None = None,
                 batch: Batch | None = None) -> tuple:
        import dask

        callbacks = (task_callbacks(self.report, batch, label or self.first_label, self.whole)
                     if self.report else [])
        return dask.compute(*collections, scheduler=local_scheduler(self.scheduler),
                            num_workers=self.workers, callbacks=callbacks)

    def _run_tasks(self, tasks: Sequence[Callable[[], Any]], *, label: str | None = None,
                   batch: Batch | None = None) -> list[Any]:
        """Run `tasks` (in order, on at most `workers` threads); their results in order. The
        first error is raised once the running tasks finish; the others are not started."""
        label = label or self.first_label
        every = max(1, len(tasks) // 200)

        def tell(done: int) -> None:
            if self.report and (done == len(tasks) or done % every == 0):
                self.report(*share(batch, done, len(tasks), label, self.whole))

        tell(0)
        threads = min(len(tasks), self.workers or os.cpu_count() or 1)
        if self.scheduler == "sync" or threads <= 1:
            results = []
            for task in tasks:
                results.append(task())
                tell(len(results))
            return results
        out: list[Any] = [None] * len(tasks)
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tilefuse") as pool:
            futures = {pool.submit(task): i for i, task in enumerate(tasks)}
            try:
                for done, future in enumerate(as_completed(futures), 1):
                    out[futures[future]] = future.result()
                    tell(done)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return out


@contextlib.contextmanager
def _local(name: str, workers: int | None, progress: bool | ProgressFn | None, first: str):
    report, bar = _reporter(progress)
    with bar if bar is not None else contextlib.nullcontext():
        yield LocalCompute(name, workers, report, first_label=first), None


def follow_futures(futures: list, report: ProgressFn, batch: Batch | None,
                   label: str | None) -> None:
    """`report` progress as the futures of one compute on a distributed Client finish (one
    future per chunk for the writer's batches); errors are left to ``gather``."""
    from distributed import as_completed

    report(*share(batch, 0, len(futures), label))
    for done, _ in enumerate(as_completed(futures), 1):
        report(*share(batch, done, len(futures), label))


class ClientCompute:
    """The writer's compute on a dask cluster (``compute(*collections, label=None,
    batch=None)``), and :attr:`executor`: the same workers for work that is not a dask graph
    (registration's pair measurements), so that a run registering and fusing on a job queue
    starts its worker jobs once.

    Parameters
    ----------
    client : distributed.Client
    report : callable or None
        ``report(done, total, label)`` as futures finish.
    first : str
        Label of computes that name none.
    """

    def __init__(self, client: Any, report: ProgressFn | None, first: str) -> None:
        self.client = client
        self.report = report
        self.first = first

    def __call__(self, *collections: Any, label: str | None = None,
                 batch: Batch | None = None) -> tuple:
        futures = self.client.compute(list(collections))
        if self.report is not None:
            follow_futures(futures, self.report, batch, label or self.first)
        return tuple(self.client.gather(futures))

    @property
    def executor(self) -> Any:
        """A ``concurrent.futures`` executor on the cluster's workers."""
        return self.client.get_executor()


@contextlib.contextmanager
def _distributed(address: str | None, workers: int | None, progress: bool | ProgressFn | None,
                 first: str, cluster: Any = None):
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:  # pragma: no cover - distributed is a dependency
        raise InputError("--scheduler distributed needs the 'distributed' package") from exc
    quiet_distributed()
    owned = cluster is None  # a cluster passed in (a job queue's) is closed by its caller
    if cluster is not None:
        client = Client(cluster)
    elif address is None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0")
        client = Client(cluster)
    else:
        try:
            client = Client(address, timeout="10s")
        except OSError as exc:
            raise InputError(f"cannot reach the dask scheduler at {address}: {exc}") from None

    report, bar = _reporter(progress)
    compute = ClientCompute(client, report, first)
    try:
        with bar if bar is not None else contextlib.nullcontext():
            yield compute, client.dashboard_link
    finally:
        client.close()
        if cluster is not None and owned:
            cluster.close()


@contextlib.contextmanager
def _jobqueue(kind: str, workers: int | None, progress: bool | ProgressFn | None, first: str):
    """`workers` worker jobs (default 1) of a job queue, cancelled on any exit."""
    from tilefuse.cluster import jobqueue_cluster

    with jobqueue_cluster(kind, jobs=workers or 1) as cluster, \
            _distributed(None, workers, progress, first, cluster=cluster) as runner:
        yield runner


@contextlib.contextmanager
def open_runner(
    scheduler: str = "threads", *, workers: int | None = None,
    progress: bool | ProgressFn | None = True,
    first_label: str = "fuse",
) -> Iterator[tuple[Callable[..., tuple], str | None]]:
    """Yield ``(compute, dashboard_link)`` for a scheduler name or address.

    Parameters
    ----------
    scheduler : str
        ``threads``, ``processes``, ``sync``, ``distributed``, a job queue (``slurm``,
        ``pbs``, ``sge``, ``lsf``: see :mod:`tilefuse.cluster`) or a scheduler address.
    workers : int, optional
        Threads, processes or cluster workers (default: one per core); of a job queue, worker
        jobs (default 1).
    progress : bool or callable
        True: one bar on stderr for everything computed until the runner closes (every batch
        and pyramid level of a write); a ``progress(done, total, label)`` callback instead
        (e.g. the command's :class:`tilefuse.cli.progress.ProgressBar`); False: nothing.
    first_label : str
        Label of computes that name none.
    """
    if scheduler in LOCAL_SCHEDULERS:
        ctx = _local(scheduler, workers, progress, first_label)
    elif scheduler == "distributed":
        ctx = _distributed(None, workers, progress, first_label)
    elif "://" in scheduler:
        ctx = _distributed(scheduler, workers, progress, first_label)
    elif scheduler in JOBQUEUES:
        ctx = _jobqueue(scheduler, workers, progress, first_label)
    else:
        raise InputError(
            f"unknown scheduler {scheduler!r}; expected threads, processes, distributed, "
            f"{', '.join(JOBQUEUES)} or an address like tcp://host:8786"
        )
    with ctx as runner:
        yield runner


def on_cluster(scheduler: str) -> bool:
    """A run's work goes to a job queue's workers or a running cluster (a scheduler address):
    registration and fusion then share one runner, so its worker jobs start once."""
    return scheduler in JOBQUEUES or "://" in scheduler


@contextlib.contextmanager
def write_compute(scheduler: str, workers: int | None,
                  runner: Callable[[], contextlib.AbstractContextManager[tuple[Any, str | None]]]
                  | None, progress: ProgressFn) -> Iterator[tuple[Any, str | None]]:
    """The ``(compute, dashboard)`` a run writes its image with: `runner`'s when given (a
    caller's own), else, on a local scheduler, a :class:`LocalCompute` that reports chunks
    stored of each level (``"fusing"``, ``"pyramid level 1"``...) across its batches to
    `progress` only (no dask callbacks registered globally, so computations in other threads,
    a viewer's say, neither count here nor see these tasks), else :func:`open_runner`'s."""
    if runner is not None:
        context = runner()
    elif scheduler in LOCAL_SCHEDULERS:
        context = contextlib.nullcontext(
            (LocalCompute(scheduler, workers, progress, whole=False), None))
    else:
        context = open_runner(scheduler, workers=workers, progress=False)
    with context as opened:
        yield opened
