"""Progress bars for dask computations (CLI only; the library never prints)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

from dask.callbacks import Callback
from tqdm import tqdm

__all__ = ["DaskProgress"]


class DaskProgress(Callback):
    """One tqdm bar per dask compute, labelled from ``labels`` in order.

    Parameters
    ----------
    labels : iterator of str
        A label for each successive compute (e.g. "fuse", "pyramid 1", ...).
    enabled : bool
        False makes this a no-op (``--quiet``).
    label : str, optional
        This compute's label, instead of the next of ``labels`` (a level written in batches).
    """

    def __init__(self, labels: Iterator[str], *, enabled: bool = True,
                 label: str | None = None) -> None:
        super().__init__()
        self.labels = labels
        self.label = label
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.started = time.perf_counter()

    def _start_state(self, dsk, state) -> None:
        if not self.enabled:
            return
        total = sum(len(state[k]) for k in ("ready", "waiting", "running")) + len(state["finished"])
        label = self.label or next(self.labels, "compute")
        self.bar = tqdm(total=total, desc=label, unit="task", file=sys.stderr, leave=True,
                        dynamic_ncols=True)

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def _finish(self, dsk, state, errored) -> None:
        if self.bar is not None:
            if errored:  # the error message, not a stalled bar, is the last thing shown
                self.bar.leave = False
            self.bar.close()
            self.bar = None
