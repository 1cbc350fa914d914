"""The 2x mean pyramid: level shapes, chunk regularity, one downsampled level read back from
the store (integers up to 16 bits averaged exactly in float32)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from tilefuse.errors import InputError
from tilefuse.ome_zarr._metadata import check_axes
from tilefuse.ome_zarr.chunkstore import ChunkFiles

if TYPE_CHECKING:
    import dask.array as da

    from tilefuse.ome_zarr.zarr_nodes import Level

log = logging.getLogger(__name__)


def max_levels(shape_yx: Sequence[int]) -> int:
    """The most pyramid levels an image of `shape_yx` can have: halving y and x until both
    are 1 pixel (more would repeat 1 x 1 levels, which viewers refuse)."""
    return 1 + max(math.ceil(math.log2(max(int(n), 1))) for n in shape_yx)


def pyramid_shapes(
    shape: Sequence[int],
    chunks_yx: Sequence[int],
    axes: Sequence[str],
    levels: int | None = None,
) -> list[tuple[int, ...]]:
    """Shapes of every pyramid level, full resolution first.

    Parameters
    ----------
    shape : sequence of int
        Level-0 shape, one entry per axis in `axes`.
    chunks_yx : (int, int)
        Chunk size along y and x.
    axes : sequence of str
        Axis names, e.g. ``("c", "z", "y", "x")``; must contain ``"y"`` and ``"x"``.
    levels : int, optional
        Number of levels including level 0. By default levels are added while y or x is larger
        than its chunk size, so the last level fits in one chunk in y and x.

    Returns
    -------
    list of tuple of int
        ``shapes[k]`` is level k; y and x of level ``k + 1`` are ``ceil(n / 2)`` of level k, the
        other axes are unchanged.
    """
    axes = check_axes(axes, len(shape))
    iy, ix = axes.index("y"), axes.index("x")
    cy, cx = (int(c) for c in chunks_yx)
    if cy < 1 or cx < 1:
        raise InputError(f"chunk sizes must be >= 1, got {tuple(chunks_yx)}")
    if levels is not None and levels < 1:
        raise InputError(f"levels must be >= 1, got {levels}")
    shapes = [tuple(int(n) for n in shape)]
    while _needs_level(shapes[-1], len(shapes), levels, (iy, ix), (cy, cx)):
        nxt = list(shapes[-1])
        nxt[iy], nxt[ix] = -(-nxt[iy] // 2), -(-nxt[ix] // 2)
        shapes.append(tuple(nxt))
    return shapes


def check_levels(levels: int | None, shape_yx: tuple[int, int]) -> None:
    """Refuse a level count below 1 or beyond 1 x 1 pixel."""
    if levels is None:
        return
    most = max_levels(shape_yx)
    if not 1 <= levels <= most:
        raise InputError(f"levels {levels}: a {shape_yx[1]} x {shape_yx[0]} (x, y) image has 1 to "
                         f"{most} pyramid levels (the last one 1 pixel)")


def _needs_level(
    shape: Sequence[int],
    n_levels: int,
    levels: int | None,
    yx_axes: tuple[int, int],
    chunks_yx: tuple[int, int],
) -> bool:
    """Whether to add a level: below `levels` if given, else while y or x spans several chunks."""
    if levels is not None:
        return n_levels < levels
    return any(shape[a] > c for a, c in zip(yx_axes, chunks_yx, strict=True))


def _is_regular(chunks: Sequence[int]) -> bool:
    """True when zarr can store these chunks: all equal but a smaller last one."""
    return all(c == chunks[0] for c in chunks[:-1]) and chunks[-1] <= chunks[0]


def regular_chunks(array: da.Array) -> da.Array:
    """Rechunk axes whose chunks zarr cannot hold to their largest chunk size."""
    if all(_is_regular(c) for c in array.chunks):
        return array
    target = tuple(c[0] if _is_regular(c) else max(c) for c in array.chunks)
    log.info("rechunking irregular chunks %s to %s", array.chunks, target)
    return array.rechunk(target)


def downsample_level(previous: Level, axes: Sequence[str]) -> da.Array | DownsampledPixels:
    """2x mean in y and x of a stored level, one output chunk per task.

    Parameters
    ----------
    previous : Level, shape (..., y, x)
        The stored level, chunk shape C.

    Returns
    -------
    DownsampledPixels or dask.array.Array, shape (..., ceil(y / 2), ceil(x / 2))
        Chunked as C, so it stores into a level with chunk shape C without locking. Each block
        is made from its 2x2 chunks read straight from their files (:class:`ChunkFiles`) where
        the store allows (block pixels, stored with or without dask); else a dask array read
        through zarr.
    """
    iy, ix = axes.index("y"), axes.index("x")
    files = ChunkFiles.for_level(previous, skip_empty=False)
    if files is not None:
        return DownsampledPixels(files, iy, ix)
    import dask.array as da

    read = list(previous.chunks)
    read[iy], read[ix] = 2 * read[iy], 2 * read[ix]
    read_chunks = da.core.normalize_chunks(tuple(read), previous.shape)
    out_chunks = tuple(
        tuple(-(-c // 2) for c in cs) if i in (iy, ix) else cs for i, cs in enumerate(read_chunks)
    )
    meta = np.empty((0,) * len(previous.shape), dtype=previous.dtype)
    src = da.from_zarr(previous.zarr_array(), chunks=read_chunks)
    return da.map_blocks(mean_2x_yx, src, chunks=out_chunks, dtype=src.dtype, meta=meta,
                         iy=iy, ix=ix)


@dataclass(frozen=True)
class DownsampledPixels:
    """The next pyramid level of a stored one: each block the 2x mean in y and x of (up to)
    2 x 2 chunks read from their files.

    Attributes
    ----------
    files : ChunkFiles
        The stored level, chunk shape C.
    iy, ix : int
        The y and x axes.
    shape : tuple of int
        ``(..., ceil(y / 2), ceil(x / 2))``.
    dtype : numpy.dtype
    chunk_shape : tuple of int
        C: the blocks store into a level of chunk shape C.
    """

    files: ChunkFiles
    iy: int
    ix: int
    shape: tuple[int, ...] = field(init=False)
    dtype: np.dtype = field(init=False)
    chunk_shape: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        shape = list(self.files.shape)
        for axis in (self.iy, self.ix):
            shape[axis] = -(-shape[axis] // 2)
        object.__setattr__(self, "shape", tuple(shape))
        object.__setattr__(self, "dtype", np.dtype(self.files.dtype))
        object.__setattr__(self, "chunk_shape", tuple(self.files.chunks))

    def block(self, index: tuple[int, ...]) -> np.ndarray:
        """The block at `index`, shape :attr:`chunk_shape` or smaller at the far edges."""
        first = [b * 2 if i in (self.iy, self.ix) else b for i, b in enumerate(index)]
        grid = [-(-n // c) for n, c in zip(self.files.shape, self.files.chunks, strict=True)]
        spans = [range(f, min(f + 2, g)) if i in (self.iy, self.ix) else range(f, f + 1)
                 for i, (f, g) in enumerate(zip(first, grid, strict=True))]
        pieces = np.empty([len(s) for s in spans], dtype=object)
        for at in np.ndindex(pieces.shape):
            pieces[at] = self.files.read(tuple(s[k] for s, k in zip(spans, at, strict=True)))
        return mean_2x_yx(np.block(pieces.tolist()), self.iy, self.ix)

    def to_dask(self) -> da.Array:
        """The same blocks as a dask array, one task per block."""
        import dask
        import dask.array as da

        name = "tilefuse-downsample-" + dask.base.tokenize(self.files.folder, self.files.shape)
        return da.map_blocks(self._dask_block, name=name, dtype=self.dtype,
                             chunks=da.core.normalize_chunks(self.chunk_shape, self.shape),
                             meta=np.empty((0,) * len(self.shape), dtype=self.dtype))

    def _dask_block(self, block_id: tuple[int, ...] | None = None) -> np.ndarray:
        assert block_id is not None  # map_blocks passes it to a function that takes it
        return self.block(block_id)



def mean_2x_yx(block: np.ndarray, iy: int, ix: int) -> np.ndarray:
    """2x mean of one block in y and x.

    Parameters
    ----------
    block : numpy.ndarray, shape (..., h, w)
        y at axis `iy`, x at axis `ix`.

    Returns
    -------
    numpy.ndarray, shape (..., ceil(h / 2), ceil(w / 2))
        Same dtype. An odd last row/column averages the pixels that exist. Integers are
        rounded half to even (``np.rint``), never truncated.

    Notes
    -----
    Pairs are averaged along y, then along x. Integers of up to 16 bits are averaged in float32,
    where every sum and half is exact, so the result equals the float64 one; wider types and
    floats use float64.
    """
    small_int = block.dtype.kind in "biu" and block.dtype.itemsize <= 2
    out = block
    for axis in (iy, ix):
        out = _pair_mean(out, axis, np.float32 if small_int else np.float64)
    if block.dtype.kind in "biu":
        out = np.rint(out, out=out)
    return out.astype(block.dtype)


def _pair_mean(a: np.ndarray, axis: int, work: type) -> np.ndarray:
    """Mean of neighbouring pairs along `axis` in dtype `work`; an odd last one is kept."""
    n = a.shape[axis]
    pick = [slice(None)] * a.ndim
    pick[axis] = slice(0, n - 1, 2)
    out: np.ndarray = a[tuple(pick)].astype(work)
    pick[axis] = slice(1, n, 2)
    out += a[tuple(pick)]
    out *= 0.5  # exact: a division by 2
    if n % 2:
        pick[axis] = slice(n - 1, n)
        out = np.concatenate([out, a[tuple(pick)].astype(work)], axis=axis)
    return out
