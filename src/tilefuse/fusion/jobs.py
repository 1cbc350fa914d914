"""What one fusion plan makes: the plan (:class:`FusionPlan`), the job of each output chunk
(:class:`ChunkJob`), and its pixels one chunk at a time (:class:`FusedPixels`): to a writer's
threads directly, or to dask as a lazy array.

:func:`tilefuse.fuse` puts a :class:`FusedPixels` in the :class:`~tilefuse.Mosaic` it returns.
A writer running on this machine's threads asks for the chunks it stores
(:meth:`FusedPixels.block`) without importing dask (~0.3 s of a command) or building a graph;
reading ``mosaic.data`` gives the same chunks as a dask array (:meth:`FusedPixels.to_dask`),
one task per chunk, for distributed schedulers and for users' own dask code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from tilefuse.fusion.chunk import ChunkTile
from tilefuse.fusion.kernel import fuse_chunk
from tilefuse.fusion.resample import snap, source_span
from tilefuse.io.tile_cache import read_tile
from tilefuse.model.layout import Layout
from tilefuse.plan.geometry import ChunkPlan

if TYPE_CHECKING:
    import dask.array as da

__all__ = ["ChunkJob", "FusedPixels", "FusionPlan", "chunk_job", "reads_planes", "tile_planes",
           "window_planes"]

_FLOAT32 = np.dtype(np.float32)


@dataclass(frozen=True)
class FusionPlan:
    """Everything decided once per run, before any pixel is read.

    Attributes
    ----------
    layout : Layout
    chunks : ChunkPlan
    blend : str
    widths : tuple of float
        Feathering width per spatial axis.
    dtype : numpy.dtype
        Output dtype.
    fill : float
    paths : tuple of str
        Resampling path per tile ("slice", "shift" or "affine").
    cache_bytes : int
        Tile cache budget per worker process.
    backend : {"numpy", "numba"}
        Chunk kernel (see :func:`tilefuse.fusion.kernel.resolve_backend`).
    accumulator : numpy.dtype
        float32, or float64 when the tiles or the output are wider than 16 bits
        (:func:`tilefuse.fusion.kernel.accumulator_dtype`).
    """

    layout: Layout
    chunks: ChunkPlan
    blend: str
    widths: tuple[float, ...]
    dtype: np.dtype
    fill: float
    paths: tuple[str, ...]
    cache_bytes: int
    backend: str = "numpy"
    accumulator: np.dtype = _FLOAT32

    @property
    def n_channels(self) -> int:
        return len(self.layout.channels)


@dataclass(frozen=True)
class ChunkJob:
    """One output chunk's work: small, picklable, self-contained."""

    origin: np.ndarray
    shape: tuple[int, ...]
    tiles: tuple[tuple, ...]  # (affine, shape, path, source) per tile, layout order
    n_channels: int
    dtype: np.dtype
    blend: str
    widths: tuple[float, ...]
    fill: float
    cache_bytes: int
    squeeze_channel: bool
    backend: str = "numpy"
    accumulator: np.dtype = _FLOAT32

    def run(self) -> np.ndarray:
        """Fuse this chunk; shape ``(c, *shape)``, or ``shape`` for single-channel output."""
        tiles = [self._tile(aff, shp, path, src) for aff, shp, path, src in self.tiles]
        out = fuse_chunk(
            self.origin, self.shape, tiles, n_channels=self.n_channels, dtype=self.dtype,
            blend=self.blend, widths=self.widths, fill=self.fill, backend=self.backend,
            accumulator=self.accumulator,
        )
        return out[0] if self.squeeze_channel else out


    def _tile(self, affine: np.ndarray, shape: tuple[int, ...], path: str,
              source) -> ChunkTile:
        """A tile as the kernel reads it: a translated z-stack reads only the planes this
        chunk needs (:func:`tile_planes`), so a chunk of 64 planes does not decode 1,000."""
        planes = tile_planes(affine, shape, path, self.origin, self.shape)
        if planes is None:
            return ChunkTile(affine, shape, path, _reader(source, self.cache_bytes))
        return ChunkTile(affine, shape, path, _reader(source, self.cache_bytes, planes),
                         first_plane=planes[0])


def reads_planes(tile, path: str) -> bool:
    """A chunk reads only its planes of this tile (:func:`tile_planes`): a translated z-stack
    whose source can read planes apart (``read_planes``; a TIFF of one z-stack in one page is
    found out on its first read, and then read whole)."""
    return len(tile.shape) == 3 and path != "affine" and hasattr(tile.source, "read_planes")


def window_planes(chunk_depth: int) -> int:
    """The most planes a chunk `chunk_depth` planes deep reads of a stack read by planes
    (:func:`tile_planes`): its own and one interpolation tap of a fractional z."""
    return int(chunk_depth) + 1


def tile_planes(affine: np.ndarray, shape: tuple[int, ...], path: str, origin: np.ndarray,
                chunk_shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The planes ``(start, stop)`` of a translated z-stack that fusing one chunk reads (the
    taps of its interpolation included), or None for the whole tile: a 2D or affine tile, or
    one whose every plane is needed.

    Parameters
    ----------
    affine : numpy.ndarray, shape (ndim + 1, ndim + 1)
    shape : tuple of int
        Tile shape (z, y, x).
    path : {"slice", "shift", "affine"}
    origin : numpy.ndarray, shape (ndim,)
        The chunk's first mosaic index.
    chunk_shape : tuple of int
    """
    if len(shape) != 3 or path == "affine":
        return None
    z = float(snap(np.asarray(affine[:-1, -1], dtype=np.float64))[0])
    span = source_span(z, int(shape[0]), int(origin[0]), int(chunk_shape[0]), path == "slice")
    return None if span is None or span == (0, int(shape[0])) else span


def _reader(source, cache_bytes: int, planes: tuple[int, int] | None = None):
    return lambda: read_tile(source, cache_bytes, planes)


def chunk_job(plan: FusionPlan, block: Sequence[int]) -> ChunkJob:
    """The job for output chunk ``block`` (a chunk index per spatial axis)."""
    origin, shape = plan.chunks.chunk_box(block)
    tiles = tuple(
        (t.affine, t.shape, plan.paths[i], t.source)
        for i in plan.chunks.tiles_of(block)
        for t in (plan.layout.tiles[i],)
    )
    return ChunkJob(
        origin, tuple(int(s) for s in shape), tiles, plan.n_channels, plan.dtype, plan.blend,
        plan.widths, plan.fill, plan.cache_bytes, squeeze_channel=plan.n_channels == 1,
        backend=plan.backend, accumulator=plan.accumulator,
    )




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

    @property
    def reads_planes(self) -> bool:
        """Every tile is a translated z-stack whose source reads planes apart: a chunk reads
        only its planes (:func:`tile_planes`), so chunks are best computed z-slab by z-slab
        (one slab's planes of every tile fit the cache), not column by column."""
        return all(reads_planes(tile, path)
                   for tile, path in zip(self.plan.layout.tiles, self.plan.paths, strict=True))

    def block(self, index: tuple[int, ...]) -> np.ndarray:
        """Fuse the output chunk at `index` (a block number per axis of :attr:`shape`).

        Returns
        -------
        numpy.ndarray, shape :attr:`chunk_shape` or smaller at the far edges, :attr:`dtype`
        """
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
    assert block_id is not None  # dask passes it
    return chunk_job(plan, block_id[-plan.layout.ndim :]).run()


def _token(plan: FusionPlan) -> str:
    from dask.base import tokenize

    return tokenize(
        plan.layout.affines, [t.source.key for t in plan.layout.tiles], plan.chunks.chunk_shape,
        plan.chunks.origin, plan.chunks.shape, plan.blend, plan.widths, str(plan.dtype),
        plan.fill, plan.backend,
    )
