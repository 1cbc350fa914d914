"""A small fusion computed at once in this process's threads, without dask.

For what fits in memory and is wanted now (a preview, a registration crop): the same chunk jobs
the dask graph runs (:func:`tilefuse.fusion.jobs.chunk_job`, through
:func:`tilefuse.model.mosaic.read_all`), so the same pixels, without importing dask (half a
second of a command's start) or building a graph. ``fuse(plan).compute()`` takes the same path.
"""

from __future__ import annotations

import numpy as np

from tilefuse.fusion.jobs import FusedPixels, FusionPlan
from tilefuse.model.mosaic import read_all

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
    return read_all(FusedPixels(plan), workers)
