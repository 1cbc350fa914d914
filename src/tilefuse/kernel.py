"""The fusion of one output chunk: a pure function of the chunk box and the tiles touching it.

It knows nothing of files or dask: tiles come with a ``read`` callable, so the same kernel runs in
a thread, a process or on a cluster worker, and is easy to test against a reference.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tilefuse.blend import make_reducer
from tilefuse.errors import InputError
from tilefuse.resample import place_tile

__all__ = ["BACKENDS", "ChunkTile", "finalize", "fuse_chunk", "resolve_backend"]

BACKENDS = ("auto", "numpy", "numba")


def resolve_backend(backend: str = "auto") -> str:
    """The chunk kernel to run: ``"numba"`` (compiled, when numba is installed) or ``"numpy"``.

    ``"auto"`` picks numba when it can be imported. Both give the same mosaic: bit-identical for
    translations, equal to float rounding for general affines (see :mod:`tilefuse.fastkernel`).
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    has_numba = importlib.util.find_spec("numba") is not None
    if backend == "numba" and not has_numba:
        raise InputError('backend "numba" needs numba: pip install "tilefuse[fast]"')
    if backend == "auto":
        return "numba" if has_numba else "numpy"
    return backend


@dataclass(frozen=True, slots=True)
class ChunkTile:
    """What the kernel needs of one tile.

    Attributes
    ----------
    affine : numpy.ndarray, shape (ndim + 1, ndim + 1)
        Tile index -> mosaic index.
    shape : tuple of int
        Tile spatial shape.
    path : {"slice", "shift", "affine"}
        Resampling path (see :func:`tilefuse.resample.classify`).
    read : callable
        Returns the tile's pixels, shape ``(c, *shape)``.
    """

    affine: np.ndarray
    shape: tuple[int, ...]
    path: str
    read: Callable[[], np.ndarray]


def finalize(values: np.ndarray, covered: np.ndarray, dtype: np.dtype, fill: float) -> np.ndarray:
    """Round (never truncate) blended values to ``dtype`` and fill uncovered pixels.

    Parameters
    ----------
    values : numpy.ndarray, shape (c, *chunk)
    covered : numpy.ndarray of bool, shape (*chunk)
    """
    dtype = np.dtype(dtype)
    if not covered.all():
        values = values.astype(np.float32, copy=values.dtype.kind != "f")
        values[:, ~covered] = fill
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        out = np.rint(values, out=values if values.dtype.kind == "f" else None)
        np.clip(out, info.min, info.max, out=out)
        out = out.astype(dtype)
    elif dtype == np.bool_:
        out = values > 0.5
    else:
        out = values.astype(dtype)
    return out


def fuse_chunk(
    chunk_origin: np.ndarray,
    chunk_shape: tuple[int, ...],
    tiles: Sequence[ChunkTile],
    *,
    n_channels: int,
    dtype: np.dtype,
    blend: str = "linear",
    widths: Sequence[float] = (),
    fill: float = 0,
    backend: str = "numpy",
) -> np.ndarray:
    """Fuse the tiles touching one output chunk.

    Parameters
    ----------
    chunk_origin : numpy.ndarray, shape (ndim,)
        Mosaic pixel index of the chunk's first pixel.
    chunk_shape : tuple of int
        Spatial shape of the chunk.
    tiles : sequence of ChunkTile
        In layout order.
    n_channels : int
    dtype : numpy.dtype
        Output dtype.
    blend : str
        One of :data:`tilefuse.blend.BLENDS`.
    widths : sequence of float
        Feathering width per spatial axis (``linear`` only).
    fill : float
        Value of pixels no tile covers.
    backend : {"numpy", "numba"}
        ``numba`` runs :func:`tilefuse.fastkernel.fuse_chunk_compiled` (same result, faster).

    Returns
    -------
    numpy.ndarray, shape (n_channels, *chunk_shape), ``dtype``
    """
    if backend == "numba":
        from tilefuse.fastkernel import fuse_chunk_compiled

        return fuse_chunk_compiled(chunk_origin, chunk_shape, tiles, n_channels=n_channels,
                                   dtype=dtype, blend=blend, widths=widths, fill=fill)
    reducer = make_reducer(blend, n_channels, tuple(chunk_shape), widths)
    for tile in tiles:
        placement = place_tile(tile.read(), tile.affine, chunk_origin, chunk_shape, path=tile.path)
        if placement is not None:
            reducer.add(placement, tile.shape)
    return finalize(reducer.values(), reducer.covered, dtype, fill)
