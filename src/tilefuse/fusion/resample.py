"""Pure kernels that move one tile onto one output chunk.

Each tile takes the cheapest exact path:

- integer translation: a slice, no arithmetic;
- fractional translation: separable two-tap linear interpolation along each fractional axis,
  computed on the tile ∩ chunk box only;
- any other affine: linear interpolation (``scipy.ndimage.map_coordinates``, order 1) at
  coordinates computed from *global* mosaic indices, on the tile ∩ chunk box only.

Interpolated values are computed in the accumulator dtype (float32, or float64 for tiles or
outputs wider than 16 bits; see :func:`tilefuse.fusion.kernel.accumulator_dtype`).

An output pixel is covered by a tile when its position in tile coordinates lies inside the tile's
pixel centres, ``0 <= t <= n - 1`` on every axis. The value of a pixel never depends on where the
chunk boundaries fall, so fusing with any chunk size gives the same mosaic bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from tilefuse.plan.geometry import EPS

__all__ = ["Placement", "affine_footprint", "check_window", "classify", "place_tile",
           "row_buffers", "snap", "source_span", "translation_span"]

ROW_BUFSIZE = 1024
"""Ufunc buffer size (elements) for elementwise work on boxes inside larger arrays.

With numpy's default (8192 elements), an elementwise operation on a strided box (a tile's box
in a chunk, a tile's pixels shifted by one) runs 3-5x slower than on a contiguous array:
numpy 2.4, ``a += 1`` on 925 x 922 of a 1024² float32 array took 0.23 ms, 0.05 ms contiguous,
0.08 ms with 1024-element buffers. Elementwise results do not depend on the buffer size.
"""


@contextlib.contextmanager
def row_buffers() -> Iterator[None]:
    """Run the block with ufunc buffers of :data:`ROW_BUFSIZE` elements (then restore them).

    ``numpy.setbufsize`` is per thread (numpy 1) or per context (numpy 2): other threads are
    unaffected.
    """
    old = np.setbufsize(ROW_BUFSIZE)
    try:
        yield
    finally:
        np.setbufsize(old)



@dataclass(frozen=True, slots=True)
class Placement:
    """One tile's contribution to one output chunk.

    Attributes
    ----------
    box : tuple of slice
        Region of the chunk the tile reaches, one slice per spatial axis.
    values : numpy.ndarray, shape (c, *box_shape)
        Resampled pixels; the tile's dtype on the slice path (unless written ``in_place``),
        the accumulator dtype otherwise.
    coords : tuple of numpy.ndarray
        Tile coordinate of each pixel of ``box``: per-axis 1D vectors for translations,
        full ``box_shape`` arrays for general affines. Used for blend weights.
    mask : numpy.ndarray of bool or None
        Pixels of ``box`` covered by the tile; None when all are (translations).
    in_place : bool
        ``values`` is the array ``place_tile``'s ``into`` gave (the reducer's own memory).
    """

    box: tuple[slice, ...]
    values: np.ndarray
    coords: tuple[np.ndarray, ...]
    mask: np.ndarray | None
    in_place: bool = False


def classify(affine: np.ndarray) -> str:
    """The resampling path for a tile: ``"slice"``, ``"shift"`` or ``"affine"``."""
    ndim = affine.shape[0] - 1
    if not np.allclose(affine[:-1, :-1], np.eye(ndim), rtol=0, atol=1e-12):
        return "affine"
    pos = affine[:-1, -1]
    return "slice" if np.array_equal(snap(pos), np.round(pos)) else "shift"


def snap(pos: np.ndarray) -> np.ndarray:
    """Positions within ``EPS`` of an integer become that integer; the rest are untouched.

    Every later step uses exact arithmetic on the snapped values, so the integer/fractional
    decision and the covered range can never disagree.
    """
    nearest = np.round(pos)
    return np.where(np.abs(pos - nearest) < EPS, nearest, pos)


def translation_span(pos: float, n: int, c0: int, cn: int) -> tuple[int, int] | None:
    """Global output index range [lo, hi) covered by a tile along one axis, within a chunk.

    ``pos`` is snapped: output index ``o`` is covered when ``pos <= o <= pos + n - 1``.
    """
    lo = max(int(np.ceil(pos)), c0)
    hi = min(int(np.floor(pos + n - 1)) + 1, c0 + cn)
    return (lo, hi) if hi > lo else None


def source_span(pos: float, n: int, c0: int, cn: int, exact: bool) -> tuple[int, int] | None:
    """Tile index range [a, b) a translated tile's pixels are read from for a chunk, along one
    axis: the covered range (:func:`translation_span`) moved to tile indices, with the lower
    tap of a fractional position. None when the tile misses the chunk.

    Parameters
    ----------
    pos : float
        Snapped position (:func:`snap`) of the tile along the axis.
    n : int
        Tile length.
    c0, cn : int
        The chunk's first index and length.
    exact : bool
        The tile takes the slice path (integer position).
    """
    span = translation_span(pos, n, c0, cn)
    if span is None:
        return None
    lo, hi = span
    i = int(np.round(pos)) if exact else int(np.floor(pos))
    lower = 1 if not exact and pos != i else 0
    return lo - i - lower, hi - i


Into = Callable[[tuple[slice, ...]], np.ndarray | None]
"""``into(box)``: an array of shape ``(c, *box_shape)`` in the accumulator dtype for a
translated tile's values to be written into, or None (see :func:`place_tile`)."""


def _place_translation(data, pos, chunk_origin, chunk_shape, exact: bool,
                       accumulator: np.dtype, tile_shape: tuple[int, ...],
                       first_plane: int, into: Into | None = None) -> Placement | None:
    pos = snap(np.asarray(pos, dtype=np.float64))
    spans = []
    for p, n, c0, cn in zip(pos, tile_shape, chunk_origin, chunk_shape, strict=True):
        span = translation_span(float(p), n, int(c0), int(cn))
        if span is None:
            return None
        spans.append(span)
    offset = [first_plane] + [0] * (len(spans) - 1)  # where data starts in the tile
    check_window(data, pos, tile_shape, chunk_origin, chunk_shape, exact, first_plane)
    box = tuple(slice(lo - c0, hi - c0) for (lo, hi), c0 in zip(spans, chunk_origin, strict=True))
    coords = tuple(np.arange(lo, hi, dtype=np.float64) - p
                   for (lo, hi), p in zip(spans, pos, strict=True))
    dest = None if into is None else into(box)
    if exact:
        ip = np.round(pos).astype(np.int64)
        src = tuple(slice(lo - i - o, hi - i - o)
                    for (lo, hi), i, o in zip(spans, ip, offset, strict=True))
        if dest is None:
            return Placement(box, data[(slice(None), *src)], coords, None)
        np.copyto(dest, data[(slice(None), *src)])  # converted exactly
        return Placement(box, dest, coords, None, in_place=True)
    values = _shift_linear(data, pos, spans, accumulator, offset, dest)
    return Placement(box, values, coords, None, in_place=dest is not None)


def check_window(data: np.ndarray, pos: np.ndarray, tile_shape: Sequence[int],
                 chunk_origin: Sequence[int], chunk_shape: Sequence[int], exact: bool,
                 first_plane: int) -> None:
    """Refuse tile pixels read from plane `first_plane` on (``data``, shape ``(c, m, ...)``)
    that lack some a chunk needs of a translated tile at `pos` (snapped): slicing would
    quietly take fewer. Both kernels call it before they resample.

    Raises
    ------
    ValueError
        Naming the axis, the pixels held and the pixels needed.
    """
    if first_plane == 0 and data.shape[1:] == tuple(tile_shape):
        return
    offset = [first_plane] + [0] * (len(tile_shape) - 1)
    for axis, (p, n, c0, cn, o, m) in enumerate(zip(pos, tile_shape, chunk_origin, chunk_shape,
                                                    offset, data.shape[1:], strict=True)):
        span = source_span(float(p), int(n), int(c0), int(cn), exact)
        if span is not None and (span[0] < o or span[1] > o + m):
            raise ValueError(f"tile pixels {o}:{o + m} along axis {axis} lack {span[0]}:"
                             f"{span[1]}, which this chunk needs")


def _shift_linear(data: np.ndarray, pos: np.ndarray, spans: list,
                  accumulator: np.dtype, offset: Sequence[int],
                  out: np.ndarray | None = None) -> np.ndarray:
    """Separable linear interpolation of ``data`` (c, *n) onto integer indices ``spans``.

    Along an axis with position ``p = i + f`` (``0 < f < 1``), output index ``o`` samples tile
    coordinate ``t = o - p`` between pixels ``k - 1`` and ``k`` with ``k = o - i``, so its value
    is ``f * data[k - 1] + (1 - f) * data[k]``, computed in ``accumulator`` (float32 or
    float64), axis after axis. The pixels are converted to ``accumulator`` once, and the box
    is computed in bands of about :data:`BAND_PIXELS` through two reused scratch buffers; every
    pixel takes the same operations, in the same order, whatever the bands.

    ``offset`` is the tile index of ``data``'s first pixel along each axis (a window of the
    tile). ``out``, when given, receives the values (any strides).

    Returns
    -------
    numpy.ndarray, shape (c, *box_shape), ``accumulator``
        ``out``, or a new contiguous array the caller may reuse.
    """
    kind = accumulator.type
    whole = np.floor(pos).astype(np.int64)  # pos is snapped: frac is 0 or in [EPS, 1 - EPS]
    frac, ip = (pos - whole).tolist(), whole.tolist()
    taps = [int(f != 0) for f in frac]  # the extra source pixel along a fractional axis
    starts = [lo - i - t - o for (lo, _), i, t, o in zip(spans, ip, taps, offset, strict=True)]
    weights = [(ax, kind(f), kind(1 - f)) for ax, f in enumerate(frac, start=1) if f != 0]
    if out is None:
        out = np.empty((data.shape[0], *(hi - lo for lo, hi in spans)), dtype=accumulator)
    bands = _bands(out.shape[1:], max(1, BAND_PIXELS // data.shape[0]))
    largest = max(math.prod(b - a + t for (a, b), t in zip(band, taps, strict=True))
                  for band in bands)  # source pixels of a band
    scratch = tuple(np.empty(data.shape[0] * largest, dtype=accumulator) for _ in range(2))
    with row_buffers():
        for band in bands:
            src = data[(slice(None), *(slice(s + a, s + b + t) for (a, b), s, t
                                       in zip(band, starts, taps, strict=True)))]
            dest = out[(slice(None), *(slice(a, b) for a, b in band))]
            _lerp_axes(src, weights, dest, scratch)
    return out


BAND_PIXELS = 2**18
"""Output pixels (times channels) interpolated at a time by :func:`_shift_linear`.

Its temporaries are two buffers of a band (1 MiB each in float32), reused band after band,
rather than two of the whole box per tile: less memory to page in and to hold."""


def _bands(shape: tuple[int, ...], pixels: int) -> list[tuple[tuple[int, int], ...]]:
    """Sub-boxes ``((start, stop), ...)`` that tile ``shape`` in C order, about ``pixels`` each.

    A band is a run of indices along the first axis whose trailing axes hold at most ``pixels``,
    with those trailing axes whole and one index of each axis before it: its pixels are
    contiguous in the box.
    """
    if math.prod(shape) <= pixels:
        return [tuple((0, n) for n in shape)]
    trailing = [math.prod(shape[k + 1:]) for k in range(len(shape))]
    k = next(k for k, n in enumerate(trailing) if n <= pixels)
    rows = max(1, pixels // trailing[k])
    after = tuple((0, n) for n in shape[k + 1:])
    return [(*((i, i + 1) for i in outer), (a, min(a + rows, shape[k])), *after)
            for outer in np.ndindex(*shape[:k]) for a in range(0, shape[k], rows)]


def _lerp_axes(src: np.ndarray, weights: list, dest: np.ndarray,
               scratch: tuple[np.ndarray, ...]) -> None:
    """Interpolate ``src`` along each fractional axis in turn, the last one into ``dest``.

    Parameters
    ----------
    src : numpy.ndarray, shape (c, *m)
        Source pixels, one more than ``dest`` along each fractional axis; not modified.
    weights : list of (int, numpy.floating, numpy.floating)
        Per fractional axis, in order: the array axis, ``f`` and ``1 - f`` in the accumulator
        type.
    dest : numpy.ndarray, shape (c, *band)
        Where the values go.
    scratch : tuple of two flat numpy.ndarray
        Buffers of the accumulator dtype for the intermediate axes, each at least ``src.size``.
    """
    free = list(scratch)
    values, held = src, None  # held: the scratch buffer values lie in (then overwritten freely)
    if src.dtype != dest.dtype:  # converted once (exactly), not in each product
        held = free.pop()
        values = _view(held, list(src.shape))
        np.copyto(values, src)
    for step, (ax, f, g) in enumerate(weights):
        shape = list(values.shape)
        shape[ax] -= 1
        last = step == len(weights) - 1
        target = None if last else free.pop()
        lower = dest if target is None else _view(target, shape)
        _lerp_axis(values, ax, f, g, lower, None if held is not None else _view(free[-1], shape))
        if held is not None:
            free.append(held)
        values, held = lower, target


def _view(flat: np.ndarray, shape: list[int]) -> np.ndarray:
    """The front of a flat buffer as an array of ``shape``."""
    return flat[:math.prod(shape)].reshape(shape)


def _lerp_axis(values: np.ndarray, axis: int, f: np.floating, g: np.floating,
               out: np.ndarray, upper: np.ndarray | None) -> None:
    """``out = f * values[k - 1] + (1 - f) * values[k]`` along ``axis``, in the dtype of ``out``.

    Parameters
    ----------
    values : numpy.ndarray, shape (c, *m)
        Pixels; their upper taps are overwritten when ``upper`` is None.
    axis : int
        Array axis to interpolate along.
    f, g : numpy.floating
        ``f`` and ``1 - f``, in the accumulator type.
    out : numpy.ndarray, shape (c, *m) with one less along ``axis``
        Receives the result; shares no memory with ``values``.
    upper : numpy.ndarray or None
        A buffer shaped like ``out`` for ``(1 - f) * values[k]``; None: computed in place.
    """
    lower_taps = [slice(None)] * values.ndim
    upper_taps = [slice(None)] * values.ndim
    lower_taps[axis], upper_taps[axis] = slice(None, -1), slice(1, None)
    np.multiply(values[tuple(lower_taps)], f, out=out, dtype=out.dtype)
    if upper is None:  # the lower taps are read: overwrite the upper taps in place
        upper = values[tuple(upper_taps)]
        np.multiply(upper, g, out=upper)
    else:
        np.multiply(values[tuple(upper_taps)], g, out=upper, dtype=out.dtype)
    np.add(out, upper, out=out)


def affine_footprint(affine, shape, chunk_origin, chunk_shape) -> tuple | None:
    """Global output index range of a transformed tile's bounding box within a chunk."""
    ndim = len(shape)
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(ndim, -1)
    mapped = affine[:-1, :-1] @ corners + affine[:-1, -1:]
    lo = np.maximum(np.ceil(mapped.min(axis=1) - EPS).astype(np.int64), chunk_origin)
    hi = np.minimum(
        np.floor(mapped.max(axis=1) + EPS).astype(np.int64) + 1,
        np.asarray(chunk_origin) + np.asarray(chunk_shape),
    )
    return None if np.any(hi <= lo) else (lo, hi)


def _place_affine(data, affine, chunk_origin, chunk_shape, order: int,
                  accumulator: np.dtype) -> Placement | None:
    shape = data.shape[1:]
    span = affine_footprint(affine, shape, chunk_origin, chunk_shape)
    if span is None:
        return None
    lo, hi = span
    inv = np.linalg.inv(affine)
    ndim = len(shape)
    box_shape = tuple(int(b - a) for a, b in zip(lo, hi, strict=True))
    grid = np.empty((ndim, *box_shape), dtype=np.float64)
    for row in range(ndim):  # t[row] = inv[row, -1] + sum_j inv[row, j] * o_j, from global o
        grid[row] = inv[row, -1]
        for j, (a, b) in enumerate(zip(lo, hi, strict=True)):
            term = inv[row, j] * np.arange(a, b, dtype=np.float64)
            grid[row] += term.reshape([-1 if k == j else 1 for k in range(ndim)])
    mask = np.ones(box_shape, dtype=bool)
    for t, n in zip(grid, shape, strict=True):
        mask &= t >= -EPS
        mask &= t <= n - 1 + EPS
    if not mask.any():
        return None
    from scipy import ndimage  # here, not at import: ``tilefuse --help`` stays quick

    values = np.empty((data.shape[0], *box_shape), dtype=accumulator)
    for ch in range(data.shape[0]):
        ndimage.map_coordinates(data[ch], grid, output=values[ch], order=order, mode="nearest")
    coords = tuple(grid)
    box = tuple(slice(a - c0, b - c0) for a, b, c0 in zip(lo, hi, chunk_origin, strict=True))
    return Placement(box, values, coords, mask)


def place_tile(
    data: np.ndarray,
    affine: np.ndarray,
    chunk_origin: np.ndarray,
    chunk_shape: tuple[int, ...],
    *,
    path: str | None = None,
    order: int = 1,
    accumulator: np.dtype | type = np.float32,
    tile_shape: tuple[int, ...] | None = None,
    first_plane: int = 0,
    into: Into | None = None,
) -> Placement | None:
    """Resample one tile onto one output chunk.

    Parameters
    ----------
    data : numpy.ndarray, shape (c, *tile_shape)
        The tile's pixels.
    affine : numpy.ndarray, shape (ndim + 1, ndim + 1)
        Tile index -> mosaic index.
    chunk_origin : numpy.ndarray, shape (ndim,)
        Mosaic index of the chunk's first pixel.
    chunk_shape : tuple of int
        Chunk spatial shape.
    path : {"slice", "shift", "affine"}, optional
        Precomputed :func:`classify` result.
    order : int
        Interpolation order for the affine path (1 = linear).
    accumulator : {float32, float64}
        Dtype of interpolated values (:func:`tilefuse.fusion.kernel.accumulator_dtype`).
    tile_shape : tuple of int, optional
        The whole tile's spatial shape, when ``data`` holds only some of its planes (default:
        ``data``'s).
    first_plane : int
        The tile plane ``data``'s first plane is (translations only).
    into : callable, optional
        For a translated tile: ``into(box)`` may give the array its values are written into
        (the reducer's accumulator, for a chunk's first tile: see
        :meth:`tilefuse.fusion.blend.Reducer.into`); the placement then says ``in_place``.
        Affine tiles never call it.

    Returns
    -------
    Placement or None
        None when the tile does not reach the chunk.
    """
    path = path or classify(affine)
    accumulator = np.dtype(accumulator)
    shape = tuple(data.shape[1:]) if tile_shape is None else tuple(tile_shape)
    if path == "affine":
        if first_plane or shape != data.shape[1:]:
            raise ValueError("an affine tile is resampled from the whole tile")
        return _place_affine(data, affine, chunk_origin, chunk_shape, order, accumulator)
    pos = affine[:-1, -1]
    return _place_translation(data, pos, chunk_origin, chunk_shape, path == "slice",
                              accumulator, shape, first_plane, into)
