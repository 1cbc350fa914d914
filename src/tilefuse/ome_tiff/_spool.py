"""Pyramid levels spooled to raw files beside the output, so no level is ever held in memory.

A TIFF is written front to back: every plane of level 0, then every plane of level 1, ...
The fused chunks come in any order and span several planes (all channels, up to 64 z), so
level 0 is first fused into a raw C-order file (each dask task writes its chunk in place);
then each level is read back one band of tile rows at a time, cut into tiles for the TIFF,
and 2x2-averaged into the next level's raw file (:func:`~tilefuse.ome_zarr._pyramid.mean_2x_yx`,
exactly as the OME-Zarr pyramid: bands start at even rows, so pairs never straddle two bands).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph
from dask.typing import Graph

from tilefuse.ome_zarr._blocks import BATCH_CHUNKS
from tilefuse.ome_zarr._pyramid import mean_2x_yx
from tilefuse.ome_zarr._store import Tally

__all__ = ["RawLevel", "fuse_to_raw", "level_tiles", "remove_quietly"]

Compute = Callable[..., tuple]
BandDone = Callable[[], None]

_SLAB = 2048
"""Columns of a band averaged at once (even: 2x2 pairs never straddle two slabs)."""


@dataclass(frozen=True)
class RawLevel:
    """A level stored raw: C-order pixels of `shape` in `path` (planes of (y, x)).

    Attributes
    ----------
    path : pathlib.Path
    shape : tuple of int
        ``([t,] [c,] [z,] y, x)``.
    dtype : str
    """

    path: Path
    shape: tuple[int, ...]
    dtype: str

    @property
    def n_planes(self) -> int:
        return math.prod(self.shape[:-2])

    def rows(self, f: BinaryIO, plane: int, y0: int, y1: int) -> np.ndarray:
        """Rows ``y0:y1`` of plane `plane` (flat index of the leading axes), shape
        ``(y1 - y0, x)``, read from the open file `f` into new memory (not a mapping)."""
        height, width = self.shape[-2:]
        item = np.dtype(self.dtype).itemsize
        f.seek((plane * height + y0) * width * item)
        count = (y1 - y0) * width
        out = np.fromfile(f, dtype=self.dtype, count=count)
        if out.size != count:
            raise OSError(f"{self.path}: truncated spool file")
        return out.reshape(y1 - y0, width)


@dataclass(frozen=True)
class _StoreBlock:
    """The dask task that writes one fused chunk into the raw level-0 file, in place."""

    level: RawLevel
    where: tuple[slice, ...]

    def __call__(self, block: np.ndarray) -> None:
        target = np.memmap(self.level.path, dtype=self.level.dtype, mode="r+",
                           shape=self.level.shape)
        target[self.where] = block
        target.flush()
        del target  # unmap: the written pages leave this process (they stay in the page cache)


def fuse_to_raw(data: da.Array, path: Path, compute: Compute) -> RawLevel:
    """Fuse `data` (every chunk once, in parallel through `compute`) into a raw file.

    Parameters
    ----------
    data : dask.array.Array, shape ([t,] [c,] [z,] y, x)
    path : pathlib.Path
        Created (sparse, the full size) and filled.
    compute : callable
        ``compute(*collections)``, told ``label="fuse"`` and ``batch=`` when it takes them
        (as the OME-Zarr writer's level 0: :class:`~tilefuse.ome_zarr._store.Tally`); at most
        :data:`~tilefuse.ome_zarr._blocks.BATCH_CHUNKS` chunks per call.
    """
    level = RawLevel(path, tuple(int(n) for n in data.shape), str(data.dtype))
    with open(path, "wb") as f:
        f.truncate(int(data.nbytes))
    starts = [np.cumsum((0, *c)).tolist() for c in data.chunks]
    blocks = list(np.ndindex(*data.numblocks))
    run = Tally(compute, [len(blocks)]).level(0)
    for first in range(0, len(blocks), BATCH_CHUNKS):  # a bounded graph per compute
        batch = blocks[first : first + BATCH_CHUNKS]
        name = "tilefuse-spool-" + dask.base.tokenize(data.name, str(path), batch)
        dsk: Graph = {
            (name, i): (_StoreBlock(level, tuple(slice(s[k], s[k + 1])
                                                 for s, k in zip(starts, b, strict=True))),
                        (data.name, *b))
            for i, b in enumerate(batch)}
        graph = HighLevelGraph.from_collections(
            name, dsk, dependencies=[data])  # type: ignore[list-item]  # dask.Array is one
        run(*[Delayed((name, i), graph, layer=name) for i in range(len(batch))],
            chunks=len(batch))
    return level


def level_tiles(level: RawLevel, tile: int, down: Path | None,
                band_done: BandDone) -> Iterator[np.ndarray]:
    """The tiles of `level` in TIFF order (plane by plane, row by row), one band in memory.

    Parameters
    ----------
    level : RawLevel
    tile : int
        Tile height and width, even.
    down : pathlib.Path, optional
        Where to write the next level (2x2 mean, raw), band by band as this one is read.
    band_done : callable
        Called after each band of `tile` rows.

    Yields
    ------
    numpy.ndarray, shape (<= tile, <= tile)
        Views of the band; the last row and column of tiles may be smaller.
    """
    height, width = level.shape[-2:]
    with open(level.path, "rb") as src, (open(down, "wb") if down else nullcontext()) as dst:
        for plane in range(level.n_planes):
            for y0 in range(0, height, tile):
                band = level.rows(src, plane, y0, min(y0 + tile, height))
                if dst is not None:
                    dst.write(_mean_2x(band).tobytes())
                for x0 in range(0, width, tile):
                    yield band[:, x0 : x0 + tile]
                band_done()


def _mean_2x(band: np.ndarray, slab: int = _SLAB) -> np.ndarray:
    """:func:`mean_2x_yx` of a band of shape (h, w), ``slab`` columns at a time (even), so
    its float temporaries stay small; shape (ceil(h / 2), ceil(w / 2))."""
    height, width = band.shape
    out = np.empty((-(-height // 2), -(-width // 2)), dtype=band.dtype)
    for x0 in range(0, width, slab):
        out[:, x0 // 2 : (x0 + slab) // 2] = mean_2x_yx(band[:, x0 : x0 + slab], 0, 1)
    return out


def remove_quietly(path: Path) -> None:
    """Delete a file this writer made, if it is there."""
    with suppress(FileNotFoundError):
        os.unlink(path)
