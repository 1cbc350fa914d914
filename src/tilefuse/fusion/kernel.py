"""The fusion of one output chunk: a pure function of the chunk box and the tiles touching it.

It knows nothing of files or dask: tiles come with a ``read`` callable, so the same kernel runs in
a thread, a process or on a cluster worker, and is easy to test against a reference.

Values are accumulated in float32 when the tiles and the output have at most 16 bits (integers)
or are float32, which holds every such value exactly, and in float64 when either is wider
(int32, uint32, float64; int64 or uint64 output of narrower tiles), so nothing is rounded on the
way: see :func:`accumulator_dtype`, chosen once per run by the plan. What float64 cannot hold
exactly (64-bit integer or complex tiles, extended precision) is refused by name.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tilefuse.errors import InputError
from tilefuse.fusion.blend import make_reducer
from tilefuse.fusion.resample import place_tile

__all__ = [
    "BACKENDS",
    "ChunkTile",
    "accumulator_dtype",
    "check_fill",
    "finalize",
    "fuse_chunk",
    "resolve_backend",
]

BACKENDS = ("auto", "numpy", "numba")

_SUPPORTED = ("bool, uint8/16/32, int8/16/32 and float16/32/64 tiles; output also int64/uint64 "
              "(of narrower tiles)")


def _exact_in_float32(dtype: np.dtype) -> bool:
    return dtype.kind == "b" or dtype.itemsize <= 2 or dtype == np.float32


def accumulator_dtype(tile_dtype: np.dtype | str, out_dtype: np.dtype | str | None = None
                      ) -> np.dtype:
    """The float dtype that fuses ``tile_dtype`` tiles into ``out_dtype`` without rounding.

    float32 when every value of both is a float32 number (integers of at most 16 bits, float16,
    float32, bool), float64 otherwise.

    Parameters
    ----------
    tile_dtype : dtype
        The tiles' pixel type.
    out_dtype : dtype, optional
        The output's (default: the tiles').

    Returns
    -------
    numpy.dtype
        float32 or float64.

    Raises
    ------
    InputError
        A dtype whose values float64 cannot hold exactly, named: 64-bit integer tiles, complex,
        extended precision, or not a number type.
    """
    tile = np.dtype(tile_dtype)
    out = tile if out_dtype is None else np.dtype(out_dtype)
    for role, dt, widest_int in (("tile", tile, 4), ("output", out, 8)):
        if (dt.kind not in "biuf" or (dt.kind in "iu" and dt.itemsize > widest_int)
                or (dt.kind == "f" and dt.itemsize > 8)):
            raise InputError(
                f"{role} dtype {dt} cannot be fused exactly (float64 holds integers up to 2^53 "
                f"only, and no complex or extended-precision values); supported: {_SUPPORTED}"
            )
    both = _exact_in_float32(tile) and _exact_in_float32(out)
    return np.dtype(np.float32 if both else np.float64)


def check_fill(fill: float, dtype: np.dtype | str) -> None:
    """Refuse a fill value the output dtype cannot hold exactly (it would be rounded or clipped).

    Raises
    ------
    InputError
        For an integer (or bool) output: a fill that is not a whole number in its range.
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in "biu":
        return
    info = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
    value = float(fill)
    if not (np.isfinite(value) and value == np.floor(value) and info[0] <= value <= info[1]
            and abs(value) <= 2**53):
        raise InputError(f"fill {fill} cannot be stored in output dtype {dtype}; expected a "
                         f"whole number from {info[0]} to {info[1]}")


def resolve_backend(backend: str = "auto") -> str:
    """The chunk kernel to run: ``"numba"`` (compiled, when numba is installed) or ``"numpy"``.

    ``"auto"`` picks numba when it can be imported. Both give the same mosaic: bit-identical for
    translations, equal to float rounding for general affines (see
    :mod:`tilefuse.fusion._numba.kernel`).
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
        Resampling path (see :func:`tilefuse.fusion.resample.classify`).
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
        The accumulator (float32 or float64, see :func:`accumulator_dtype`); overwritten.
    covered : numpy.ndarray of bool, shape (*chunk)
    dtype : numpy.dtype
        Output dtype.
    fill : float
        Value of uncovered pixels.

    Returns
    -------
    numpy.ndarray, shape (c, *chunk), ``dtype``
    """
    dtype = np.dtype(dtype)
    if not covered.all():
        if values.dtype.kind != "f":
            values = values.astype(accumulator_dtype(values.dtype, dtype))
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
    accumulator: np.dtype | str | None = None,
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
        One of :data:`tilefuse.fusion.blend.BLENDS`.
    widths : sequence of float
        Feathering width per spatial axis (``linear`` only).
    fill : float
        Value of pixels no tile covers.
    backend : {"numpy", "numba"}
        ``numba`` runs :func:`tilefuse.fusion._numba.kernel.fuse_chunk_compiled` (same result,
        faster).
    accumulator : {float32, float64}, optional
        Dtype of the running sums (the plan's :func:`accumulator_dtype`); default: what the
        output dtype needs. A tile that needs a wider one is refused (:func:`read_checked`).

    Returns
    -------
    numpy.ndarray, shape (n_channels, *chunk_shape), ``dtype``
    """
    dtype = np.dtype(dtype)
    needed = np.dtype(np.float32 if _exact_in_float32(dtype) else np.float64)
    acc = needed if accumulator is None else np.dtype(accumulator)
    if acc.itemsize < needed.itemsize:
        raise InputError(f"a {acc} accumulator cannot hold output dtype {dtype} exactly; "
                         "plan with accumulator_dtype()")
    if backend == "numba":
        from tilefuse.fusion._numba.kernel import fuse_chunk_compiled

        return fuse_chunk_compiled(chunk_origin, chunk_shape, tiles, n_channels=n_channels,
                                   dtype=dtype, blend=blend, widths=widths, fill=fill,
                                   accumulator=acc)
    reducer = make_reducer(blend, n_channels, tuple(chunk_shape), widths, acc)
    for tile in tiles:
        placement = place_tile(read_checked(tile, acc), tile.affine, chunk_origin, chunk_shape,
                               path=tile.path, accumulator=acc)
        if placement is not None:
            reducer.add(placement, tile.shape)
    return finalize(reducer.values(), reducer.covered, dtype, fill)


def read_checked(tile: ChunkTile, accumulator: np.dtype) -> np.ndarray:
    """The tile's pixels, refused when ``accumulator`` cannot hold them exactly (a tile wider
    than the layout's dtype said, e.g. one uint32 file among uint16 tiles).

    Returns
    -------
    numpy.ndarray, shape (c, *tile.shape)
    """
    data = tile.read()
    if data.dtype != accumulator:
        need = _tile_accumulator(data.dtype)  # refuses an unsupported dtype by name
        if need.itemsize > accumulator.itemsize:
            raise InputError(f"a tile of dtype {data.dtype} in a run planned for narrower tiles "
                             f"({accumulator} accumulation, it needs {need}); every tile of a "
                             "layout needs the same dtype")
    return data


@functools.lru_cache(maxsize=64)
def _tile_accumulator(dtype: np.dtype) -> np.dtype:
    return accumulator_dtype(dtype)
