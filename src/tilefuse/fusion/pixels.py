"""A fusion plan's pixels, one output chunk at a time: to a writer's threads directly, or to
dask as a lazy array.

:func:`tilefuse.fuse` puts a :class:`FusedPixels` in the :class:`~tilefuse.Mosaic` it returns.
A writer running on this machine's threads asks for the chunks it stores
(:meth:`FusedPixels.block`) without importing dask (~0.3 s of a command) or building a graph;
reading ``mosaic.data`` gives the same chunks as a dask array (:meth:`FusedPixels.to_dask`),
one task per chunk, for distributed schedulers and for users' own dask code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import dask.array as da

    from tilefuse.fusion.graph import FusionPlan

__all__ = ["FusedPixels"]


@dataclass(frozen=True, eq=False)
class FusedPixels:
    """The pixels of one :class:`~tilefuse.fusion.graph.FusionPlan`, made on request.

    Attributes
    ----------
    plan : FusionPlan
    shape : tuple of int
        ``(*spatial)`` for one channel, ``(c, *spatial)`` for several.
    dtype : numpy.dtype
    chunk_shape : tuple of int
        The plan's chunk, with every channel in one block.
    """

    plan: FusionPlan = field(repr=False)
    shape: tuple[int, ...] = field(init=False)
    dtype: np.dtype = field(init=False)
    chunk_shape: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        plan = self.plan
        lead = () if plan.n_channels == 1 else (plan.n_channels,)
        set_ = object.__setattr__
        set_(self, "shape", (*lead, *(int(n) for n in plan.chunks.shape)))
        set_(self, "dtype", np.dtype(plan.dtype))
        set_(self, "chunk_shape", (*lead, *(int(c) for c in plan.chunks.chunk_shape)))

    def block(self, index: tuple[int, ...]) -> np.ndarray:
        """Fuse the output chunk at `index` (a block number per axis of :attr:`shape`).

        Returns
        -------
        numpy.ndarray, shape :attr:`chunk_shape` or smaller at the far edges, :attr:`dtype`
        """
        from tilefuse.fusion.graph import chunk_job

        return chunk_job(self.plan, index[-self.plan.layout.ndim:]).run()

    def to_dask(self) -> da.Array:
        """One dask task per output chunk, the plan one key of the graph (sent once to each
        worker; the chunk tasks are a blockwise layer, made only for the chunks a compute asks
        for)."""
        import dask
        import dask.array as da

        plan = self.plan
        token = _token(plan)
        lead = () if plan.n_channels == 1 else ((plan.n_channels,),)
        chunks = (*lead, *plan.chunks.chunks)
        shared = dask.delayed(plan, name="tilefuse-plan-" + token, pure=True)
        return da.map_blocks(_fuse_block, shared, name="tilefuse-" + token, chunks=chunks,
                             dtype=plan.dtype, meta=np.empty((0,) * len(chunks), dtype=plan.dtype))


def _fuse_block(plan: FusionPlan, block_id: tuple[int, ...] | None = None) -> np.ndarray:
    """The task of one output chunk: its job is looked up in the plan where it runs."""
    from tilefuse.fusion.graph import chunk_job

    assert block_id is not None  # dask passes it
    return chunk_job(plan, block_id[-plan.layout.ndim :]).run()


def _token(plan: FusionPlan) -> str:
    from dask.base import tokenize

    return tokenize(
        plan.layout.affines, [t.source.key for t in plan.layout.tiles], plan.chunks.chunk_shape,
        plan.chunks.origin, plan.chunks.shape, plan.blend, plan.widths, str(plan.dtype),
        plan.fill, plan.backend,
    )
