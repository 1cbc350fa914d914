"""Where dask work runs, with a progress bar on every scheduler (CLI support).

:func:`open_runner` yields a ``compute(*collections)`` function for the OME-Zarr writer:

- ``threads`` (default), ``processes``, ``sync``: dask's local schedulers, progress from a dask
  callback;
- ``distributed``: a :class:`distributed.LocalCluster` started here (its dashboard link is
  reported), progress from distributed's own bar;
- ``tcp://HOST:PORT`` (or any scheduler address): connect to a running cluster, e.g. one started
  by dask-jobqueue on an HPC system.

Only chunk descriptions (paths, affines) travel to workers; tiles are read where they are fused.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
from collections.abc import Callable, Iterator

import dask

from tilefuse.cli.progress import DaskProgress
from tilefuse.errors import InputError

__all__ = ["LOCAL_SCHEDULERS", "open_runner"]

LOCAL_SCHEDULERS = ("threads", "processes", "sync")


def _labels(first: str) -> Iterator[str]:
    return itertools.chain([first], (f"pyramid {i}" for i in itertools.count(1)))


@contextlib.contextmanager
def _local(name: str, workers: int | None, progress: bool, first: str):
    labels = _labels(first)

    def compute(*collections, label: str | None = None):
        with DaskProgress(labels, enabled=progress, label=label):
            return dask.compute(*collections, scheduler=name, num_workers=workers)

    yield compute, None


def _quiet_distributed() -> None:
    """Keep distributed's INFO chatter off stderr unless the user asked for ``-v``.

    distributed configures its own logger at INFO when imported; its shutdown races log
    harmless ``CommClosedError`` tracebacks at that level, which a user would take for a crash.
    Warnings and errors (memory pressure, dead workers) still show.
    """
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        logging.getLogger("distributed").setLevel(logging.WARNING)


@contextlib.contextmanager
def _distributed(address: str | None, workers: int | None, progress: bool, first: str):
    try:
        from distributed import Client, LocalCluster
        from distributed import progress as show_progress
    except ImportError as exc:  # pragma: no cover - distributed is a dependency
        raise InputError("--scheduler distributed needs the 'distributed' package") from exc
    _quiet_distributed()
    cluster = None
    if address is None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0")
        client = Client(cluster)
    else:
        try:
            client = Client(address, timeout="10s")
        except OSError as exc:
            raise InputError(f"cannot reach the dask scheduler at {address}: {exc}") from None

    def compute(*collections, label: str | None = None):
        futures = client.compute(list(collections))
        if progress:
            with contextlib.redirect_stdout(sys.stderr):
                show_progress(futures)
                print(file=sys.stderr)
        return tuple(client.gather(futures))

    try:
        yield compute, client.dashboard_link
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


@contextlib.contextmanager
def open_runner(
    scheduler: str = "threads", *, workers: int | None = None, progress: bool = True,
    first_label: str = "fuse",
) -> Iterator[tuple[Callable[..., tuple], str | None]]:
    """Yield ``(compute, dashboard_link)`` for a scheduler name or address.

    Parameters
    ----------
    scheduler : str
        ``threads``, ``processes``, ``sync``, ``distributed`` or a scheduler address.
    workers : int, optional
        Threads, processes or cluster workers (default: one per core).
    progress : bool
        Show a bar per compute on stderr.
    """
    if scheduler in LOCAL_SCHEDULERS:
        ctx = _local(scheduler, workers, progress, first_label)
    elif scheduler == "distributed":
        ctx = _distributed(None, workers, progress, first_label)
    elif "://" in scheduler:
        ctx = _distributed(scheduler, workers, progress, first_label)
    else:
        raise InputError(
            f"unknown scheduler {scheduler!r}; expected threads, processes, distributed or an "
            "address like tcp://host:8786"
        )
    with ctx as runner:
        yield runner
