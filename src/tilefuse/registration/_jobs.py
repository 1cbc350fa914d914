"""Running pair measurements: picklable jobs, streamed through any executor, with progress.

Every job is a module-level function called with plain data (tiles, pairs, numbers), so it can
run in a local thread pool or on a cluster worker (``distributed.Client.get_executor()``); tiles
are read there through that process's tile cache. Jobs are submitted in a bounded window
(``WINDOW_PER_WORKER`` per worker) and collected in order, so that 20,000 pairs never hold more
than a window of crops, and ``progress(done, total, label)`` is called at most every
``PROGRESS_INTERVAL`` seconds (and once at the end).
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np

from tilefuse.io.tile_cache import read_tile
from tilefuse.model.layout import Tile
from tilefuse.registration.pairwise import Measurement, Pair

__all__ = ["PAIRS_LABEL", "SOLVE_LABEL", "Progress", "Runner", "measure_pair", "null_score",
           "pixels"]

Progress = Callable[[int, int, str], None]
"""``progress(done, total, label)``; ``total`` 0: busy without a count."""

PAIRS_LABEL = "registering pairs"
SOLVE_LABEL = "solving"
PROGRESS_INTERVAL = 0.25
WINDOW_PER_WORKER = 8
MIN_WINDOW = 32


def pixels(tile: Tile, channel: int) -> np.ndarray:
    """One channel of a tile's pixels, shape ``tile.shape``, through the tile cache."""
    return np.asarray(read_tile(tile.source)[channel]).reshape(tile.shape)


def measure_pair(tile_a: Tile, tile_b: Tile, pair: Pair, channel: int, radius: float,
                 measure: Callable[..., Measurement]) -> Measurement:
    """Measure one pair: crop both tiles to the pair's boxes and search (a picklable job)."""
    crop_a = pair.crop(pixels(tile_a, channel), "a")
    crop_b = pair.crop(pixels(tile_b, channel), "b")
    return measure(crop_a, crop_b, pair.nominal, radius)


def null_score(tile_a: Tile, pair: Pair, other: Tile, lo: np.ndarray, channel: int,
               radius: float, measure: Callable[..., Measurement]) -> float:
    """Best correlation of a pair's crop ``a`` against a crop of ``other`` far from it."""
    crop_a = pair.crop(pixels(tile_a, channel), "a")
    size = pair.box_b[1] - pair.box_b[0]
    crop_c = pixels(other, channel)[tuple(slice(s, s + k) for s, k in
                                          zip(lo, size, strict=True))]
    found = measure(crop_a, crop_c, pair.nominal, radius, refine=False)
    usable = found.shift is not None and not found.edge and np.isfinite(found.ncc)
    return float(found.ncc) if usable else 0.0


class Runner:
    """Streams jobs through an executor, in order, reporting progress.

    Parameters
    ----------
    executor : concurrent.futures.Executor
    workers : int
        How many jobs run at once (sizes the submission window).
    progress : callable, optional
        ``progress(done, total, label)``.
    """

    def __init__(self, executor: Executor, workers: int, progress: Progress | None) -> None:
        self.executor = executor
        self.window = max(MIN_WINDOW, WINDOW_PER_WORKER * max(1, workers))
        self.progress = progress
        self.done = 0
        self.total = 0
        self.label = PAIRS_LABEL
        self._last = 0.0

    def start(self, total: int, label: str = PAIRS_LABEL) -> None:
        """Announce ``total`` jobs to come under ``label``."""
        self.done, self.total, self.label = 0, int(total), label
        self._last = 0.0
        self.tick(force=True)

    def tick(self, force: bool = False) -> None:
        """Call ``progress`` if due (or ``force``)."""
        if self.progress is None:
            return
        now = time.monotonic()
        if force or now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            self.progress(self.done, self.total, self.label)

    def run(self, fn: Callable[..., Any], jobs: Iterable[tuple]) -> list:
        """``[fn(*job) for job in jobs]``, computed by the executor, a window at a time."""
        return list(self._stream(fn, jobs))

    def _stream(self, fn, jobs) -> Iterator:
        pending: collections.deque = collections.deque()
        for job in jobs:
            pending.append(self.executor.submit(fn, *job))
            if len(pending) >= self.window:
                yield self._collect(pending.popleft())
        while pending:
            yield self._collect(pending.popleft())
        self.tick(force=True)

    def _collect(self, future):
        result = future.result()
        self.done += 1
        self.tick()
        return result


@contextmanager
def executor_for(executor: Executor | None, workers: int | None) -> Iterator[tuple[Executor, int]]:
    """The given executor (left open), or a local thread pool of ``workers`` (closed after)."""
    count = int(workers or os.cpu_count() or 1)
    if executor is not None:
        yield executor, count
        return
    with ThreadPoolExecutor(count) as pool:
        yield pool, count
