"""Sharded levels (zarr v3 ``ShardingCodec``): the shard shape of every level, and the task
writer that stores one whole shard through zarr, which encodes it in one go.

A shard is the unit of work, of writing and of resuming: each task holds one shard, assembled
from the chunks fused for it, and writes its file; no two tasks write one shard. zarr's local
store writes a file through a temporary and a rename, so a killed run never leaves a shard
file that looks complete (its temporaries are removed by
:func:`tilefuse.ome_zarr.chunkstore.remove_partial_files`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tilefuse.errors import InputError
from tilefuse.model.mosaic import SPATIAL_AXES  # the axes a shard size applies to

if TYPE_CHECKING:
    import zarr


def shard_shapes(
    shard: int | Sequence[int],
    chunks: Sequence[int],
    axes: Sequence[str],
    shapes: Sequence[Sequence[int]],
) -> list[tuple[int, ...]]:
    """The shard shape of every level.

    Parameters
    ----------
    shard : int or sequence of int
        Shard size in pixels: one for every spatial axis, or one per spatial axis (z, y, x
        order as in `axes`); each a multiple of the chunk along that axis.
    chunks : sequence of int
        Chunk shape of every level, one entry per axis in `axes`.
    axes : sequence of str
        Axis names, e.g. ``("c", "y", "x")``.
    shapes : sequence of sequence of int
        Shape of every level, level 0 first.

    Returns
    -------
    list of tuple of int
        Per level, one entry per axis: the shard, capped at the level's size rounded up to
        whole chunks (so still a multiple of the chunk); non-spatial axes take the chunk.

    Raises
    ------
    InputError
        A wrong number of values, or a size that is not a positive multiple of the chunk.
    """
    spatial = [i for i, a in enumerate(axes) if a in SPATIAL_AXES]
    sizes = (shard,) if isinstance(shard, (int, np.integer)) else tuple(shard)
    if len(sizes) not in (1, len(spatial)):
        raise InputError(f"shard takes 1 or {len(spatial)} values for this "
                         f"{len(spatial)}D image, got {len(sizes)}: {list(sizes)}")
    per_axis = dict(zip(spatial, sizes * len(spatial) if len(sizes) == 1 else sizes,
                        strict=True))
    for i, n in per_axis.items():
        if int(n) < 1 or int(n) % chunks[i]:
            raise InputError(f"shard {int(n)} along {axes[i]} is not a multiple of the chunk "
                             f"{chunks[i]}; give a shard that is a whole number of chunks")
    out = []
    for shape in shapes:
        out.append(tuple(
            min(int(per_axis[i]), -(-n // c) * c) if i in per_axis else c
            for i, (n, c) in enumerate(zip(shape, chunks, strict=True))))
    return out


@dataclass(frozen=True)
class ShardFiles:
    """Writes whole shards of one sharded zarr array: the writer a store task calls.

    Attributes
    ----------
    array : zarr.Array
        The sharded level (picklable: tasks may run in other processes).
    folder : str
        The level's folder (names the task graph).
    """

    array: zarr.Array
    folder: str

    def write(self, block: tuple[int, ...], data: np.ndarray) -> None:
        """Store shard `block` (shard index per axis) holding `data`.

        Parameters
        ----------
        block : tuple of int
            Shard index per axis.
        data : numpy.ndarray
            The shard's values; smaller than the shard shape at the array's far edges.
        """
        shards = self.array.shards
        assert shards is not None
        region = tuple(slice(b * s, b * s + n)
                       for b, s, n in zip(block, shards, data.shape, strict=True))
        self.array[region] = data
