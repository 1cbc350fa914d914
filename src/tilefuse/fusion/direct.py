"""A small fusion computed at once in this process's threads, without dask.

For what fits in memory and is wanted now (a preview, a registration crop): the same chunk jobs
the dask graph runs (:func:`tilefuse.fusion.graph.chunk_job`), so the same pixels, without
importing dask (half a second of a command's start) or building a graph.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tilefuse.fusion.jobs import FusionPlan, chunk_job

__all__ = ["fuse_in_memory"]


def fuse_in_memory(plan: FusionPlan, *, workers: int | None = None) -> np.ndarray:
    """Every chunk of `plan`, fused in threads into one numpy array.

    Parameters
    ----------
    plan : FusionPlan
        From :func:`tilefuse.plan_fusion`; its output must fit in memory.
    workers : int, optional
        Threads (default: one per core); the kernels release the GIL.

    Returns
    -------
    numpy.ndarray, shape ``([c,] *spatial)``, the plan's dtype
        What ``fuse(plan).compute()`` returns: the channel axis only for several channels.
    """
    chunks = plan.chunks
    lead = () if plan.n_channels == 1 else (plan.n_channels,)
    out = np.empty((*lead, *chunks.shape), dtype=plan.dtype)
    blocks = list(np.ndindex(*chunks.grid))

    def run(block: tuple[int, ...]) -> None:
        start = np.asarray(block) * np.asarray(chunks.chunk_shape)
        data = chunk_job(plan, block).run()
        region = tuple(slice(int(s), int(s) + n)
                       for s, n in zip(start, data.shape[-len(block):], strict=True))
        out[(slice(None),) * len(lead) + region] = data

    with ThreadPoolExecutor(max_workers=min(len(blocks), workers or os.cpu_count() or 1)) as pool:
        for _ in pool.map(run, blocks):  # re-raises a failed chunk's error here
            pass
    return out
