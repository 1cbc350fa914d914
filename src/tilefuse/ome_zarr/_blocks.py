"""Storing a level from block pixels on this machine's threads, without dask.

A level whose source is a :class:`~tilefuse.model.mosaic.BlockPixels` (level 0 of
:func:`tilefuse.fuse`, or the 2x mean of the level below read from its chunk files,
:class:`~tilefuse.ome_zarr._pyramid.DownsampledPixels`) is stored by one task per chunk:
make the block, encode it (:class:`~tilefuse.ome_zarr.chunkstore.ChunkFiles`) and hand its file
to a :class:`~tilefuse.ome_zarr.chunkstore.FileWriter`, which writes and syncs it on a thread of
its own while the task's thread goes on to the next chunk. The tasks run on the caller's
``run_tasks`` (:class:`tilefuse.runner.LocalCompute`, which reports progress): the same work the
dask graph of :mod:`tilefuse.ome_zarr._store` does and the same files, without importing dask
(~0.3 s of every command) or building a graph. A level is stored once its every file is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tilefuse.model.mosaic import BlockPixels
from tilefuse.ome_zarr._shards import ShardFiles
from tilefuse.ome_zarr.chunkstore import ChunkFiles, FileWriter

__all__ = ["BATCH_CHUNKS", "RunTasks", "StoredPixels", "block_stats", "merge_stats",
           "stats_of_blocks", "store_blocks", "write_block"]


BATCH_CHUNKS = 8192  # chunks per compute (or batch of tasks) when storing a level


class RunTasks(Protocol):
    """Runs zero-argument tasks on local threads; their results in order (a level's
    ``run_tasks`` of a :class:`~tilefuse.ome_zarr._store.Tally`: ``chunks`` counts them)."""

    def __call__(self, tasks: Sequence[Callable[[], Any]], *, chunks: int) -> list[Any]: ...


@dataclass(frozen=True)
class StoredPixels:
    """A stored level read back chunk by chunk (its statistics after a resume)."""

    files: ChunkFiles

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.files.shape)

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return tuple(self.files.chunks)

    def block(self, index: tuple[int, ...]) -> np.ndarray:
        return self.files.read(index)


def store_blocks(
    pixels: BlockPixels,
    writer: ChunkFiles,
    blocks: Sequence[tuple[int, ...]],
    reduce_axes: tuple[int, ...] | None,
    run_tasks: RunTasks,
    channel_axis: int | None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Store `blocks` of `pixels` (one chunk file each), in batches of at most
    :data:`~tilefuse.ome_zarr._store.BATCH_CHUNKS` tasks; their per-channel finite min/max
    when `reduce_axes` is given (else ``(None, None)``). Returns once every file is stored."""
    results: list[Any] = []
    with FileWriter() as files:
        def task(block: tuple[int, ...]) -> Callable[[], Any]:
            def run() -> Any:
                data = pixels.block(block)
                files.submit(*writer.encode(block, data))
                return None if reduce_axes is None else block_stats(data, reduce_axes)

            return run

        for first in range(0, len(blocks), BATCH_CHUNKS):
            batch = blocks[first : first + BATCH_CHUNKS]
            results += run_tasks([task(b) for b in batch], chunks=len(batch))
    if reduce_axes is None or not results:
        return None, None
    return merge_stats(results, blocks, pixels.shape, pixels.chunk_shape, channel_axis)


def stats_of_blocks(pixels: StoredPixels, reduce_axes: tuple[int, ...], run_tasks: RunTasks,
                    *, blocks: Sequence[tuple[int, ...]]) -> list[tuple[Any, Any]]:
    """Per-channel finite ``(min, max)`` of `blocks` of a stored level, read on threads (one
    result per block, for :func:`merge_stats`)."""
    def task(block: tuple[int, ...]) -> Callable[[], Any]:
        return lambda: block_stats(pixels.block(block), reduce_axes)

    return run_tasks([task(b) for b in blocks], chunks=0)


def merge_stats(results: Sequence[tuple[np.ndarray, np.ndarray]],
                blocks: Sequence[tuple[int, ...]], shape: Sequence[int],
                chunk_shape: Sequence[int], channel_axis: int | None,
                ) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel min/max of a level from its blocks' ``(min, max)``.

    Returns
    -------
    lo, hi : numpy.ndarray, shape (n_channels,)
        ±inf for a channel no block reached.
    """
    n = shape[channel_axis] if channel_axis is not None else 1
    lo, hi = np.full(n, np.inf), np.full(n, -np.inf)
    step = chunk_shape[channel_axis] if channel_axis is not None else 0
    for b, (block_lo, block_hi) in zip(blocks, results, strict=True):
        first = b[channel_axis] * step if channel_axis is not None else 0
        sl = slice(first, first + np.size(block_lo))
        lo[sl] = np.minimum(lo[sl], block_lo)
        hi[sl] = np.maximum(hi[sl], block_hi)
    return lo, hi


def write_block(writer: ChunkFiles | ShardFiles, block, data: np.ndarray, reduce_axes):
    """Store one chunk; its per-channel finite (min, max) when `reduce_axes` is given."""
    writer.write(block, data)
    if reduce_axes is None:
        return None
    return block_stats(data, reduce_axes)


def block_stats(data: np.ndarray, reduce_axes: tuple[int, ...]) -> tuple[Any, Any]:
    """Per-channel finite (min, max) of one block over `reduce_axes` (NaN and inf ignored)."""
    if data.dtype.kind in "biu":
        return data.min(axis=reduce_axes), data.max(axis=reduce_axes)
    values = data.astype(np.float64)
    finite = np.isfinite(values)
    return (np.where(finite, values, np.inf).min(axis=reduce_axes),
            np.where(finite, values, -np.inf).max(axis=reduce_axes))
