"""What one output chunk is made of, shared by both chunk kernels (numpy and numba): the tiles
touching it (:class:`ChunkTile`), the accumulator dtype that fuses them without rounding, the
checks of tile dtypes and fill values, and the final normalise/fill/round/cast step.

Values are accumulated in float32 when the tiles and the output have at most 16 bits (integers)
or are float32, which holds every such value exactly, and in float64 when either is wider
(int32, uint32, float64; int64 or uint64 output of narrower tiles), so nothing is rounded on the
way. What float64 cannot hold exactly (64-bit integer or complex tiles, extended precision) is
refused by name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tilefuse.errors import InputError

__all__ = ["ChunkTile", "accumulator_dtype", "check_fill", "exact_in_float32", "finalize",
           "read_checked", "write_zeros", "zeroed"]


_SUPPORTED = ("bool, uint8/16/32, int8/16/32 and float16/32/64 tiles; output also int64/uint64 "
              "(of narrower tiles)")


def exact_in_float32(dtype: np.dtype) -> bool:
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
    both = exact_in_float32(tile) and exact_in_float32(out)
    return np.dtype(np.float32 if both else np.float64)


def check_fill(fill: float, dtype: np.dtype | str) -> None:
    """Refuse a fill value the output dtype cannot hold exactly (it would be rounded or clipped).

    Raises
    ------
    InputError
        For an integer (or bool) output: a fill that is not a whole number in its range; for a
        float output: a finite fill beyond its range (NaN and infinities are fine).
    """
    dtype = np.dtype(dtype)
    value = float(fill)
    whole = bool(np.isfinite(value)) and value == np.floor(value)
    shown = str(int(value)) if whole and abs(value) < 1e16 else f"{value:g}"
    if dtype.kind == "f":
        if np.isfinite(value) and abs(value) > np.finfo(dtype).max:
            raise InputError(f"fill value {shown} is beyond the range of {dtype}")
        return
    if dtype.kind not in "biu":
        return
    info = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
    if not (whole and info[0] <= value <= info[1] and abs(value) <= 2**53):
        raise InputError(f"fill value {shown} does not fit the output dtype {dtype}: expected "
                         f"a whole number from {info[0]} to {info[1]}")


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
        Returns the tile's pixels, shape ``(c, *shape)``, or, for a translated z-stack, only
        planes ``first_plane`` onwards (``(c, m, y, x)``, every plane the chunk needs).
    first_plane : int
        The tile plane that ``read()``'s first plane is (0: the whole tile).
    """

    affine: np.ndarray
    shape: tuple[int, ...]
    path: str
    read: Callable[[], np.ndarray]
    first_plane: int = 0


def zeroed(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """``numpy.zeros(shape, dtype)``, with the zeros written rather than left to the OS.

    ``numpy.zeros`` of memory fresh from the OS writes nothing: each page is first mapped to the
    kernel's shared zero page, so a chunk's ``acc += values`` faults every page twice, a read
    fault and then a copy-on-write fault, and the second flushes the TLB of every CPU running
    the process. In a fusion on two threads that was 12% of all CPU samples (``perf``: 6x6
    tiles of 1024², ``do_wp_page`` -> ``flush_tlb_mm_range`` under ``FLOAT_add``). Writing
    the zeros faults each page once, and costs one pass where the memory is reused
    (:func:`write_zeros`).
    """
    out = np.empty(shape, dtype=dtype)
    write_zeros(out)
    return out


def write_zeros(out: np.ndarray) -> None:
    """Set a C-contiguous array to zero (+0.0, False) through its bytes, at ``memset`` speed:
    ``fill(0)`` stores the value item by item, 73 against 47 µs for a 1024² float32 chunk and
    9.4 against 3.5 ms for a 64 x 1024² one."""
    out.reshape(-1).view(np.uint8).fill(0)


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
        ``values`` itself for a float output of their dtype.
    """
    dtype = np.dtype(dtype)
    if not covered.all():
        if values.dtype.kind != "f":
            values = values.astype(accumulator_dtype(values.dtype, dtype))
        _fill(values, ~covered, fill)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        out = np.rint(values, out=values if values.dtype.kind == "f" else None)
        np.clip(out, info.min, info.max, out=out)
        out = out.astype(dtype)
    elif dtype == np.bool_:
        out = values > 0.5
    else:  # values are ours: a float output of their own dtype needs no copy
        out = values.astype(dtype, copy=False)
    return out


def _fill(values: np.ndarray, where: np.ndarray, fill: float) -> None:
    """``values[:, where] = fill``, without the index arrays boolean indexing builds (about ten
    times faster on a chunk of 1024²).

    Parameters
    ----------
    values : numpy.ndarray, shape (c, *chunk), float
        Overwritten where ``where`` is set, in every channel.
    where : numpy.ndarray of bool, shape (*chunk)
    fill : float
        Converted to ``values.dtype`` as an assignment to an element converts it.
    """
    value = np.empty((1,) * values.ndim, dtype=values.dtype)
    value[(0,) * values.ndim] = fill
    np.copyto(values, value, where=where[None])


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
