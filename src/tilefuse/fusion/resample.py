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

from dataclasses import dataclass

import numpy as np

from tilefuse.plan.geometry import EPS

__all__ = ["Placement", "affine_footprint", "classify", "place_tile", "snap", "translation_span"]



@dataclass(frozen=True, slots=True)
class Placement:
    """One tile's contribution to one output chunk.

    Attributes
    ----------
    box : tuple of slice
        Region of the chunk the tile reaches, one slice per spatial axis.
    values : numpy.ndarray, shape (c, *box_shape)
        Resampled pixels; the tile's dtype on the slice path, the accumulator dtype otherwise.
    coords : tuple of numpy.ndarray
        Tile coordinate of each pixel of ``box``: per-axis 1D vectors for translations,
        full ``box_shape`` arrays for general affines. Used for blend weights.
    mask : numpy.ndarray of bool or None
        Pixels of ``box`` covered by the tile; None when all are (translations).
    """

    box: tuple[slice, ...]
    values: np.ndarray
    coords: tuple[np.ndarray, ...]
    mask: np.ndarray | None


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


def _place_translation(data, pos, chunk_origin, chunk_shape, exact: bool,
                       accumulator: np.dtype) -> Placement | None:
    pos = snap(np.asarray(pos, dtype=np.float64))
    spans = []
    for p, n, c0, cn in zip(pos, data.shape[1:], chunk_origin, chunk_shape, strict=True):
        span = translation_span(float(p), n, int(c0), int(cn))
        if span is None:
            return None
        spans.append(span)
    box = tuple(slice(lo - c0, hi - c0) for (lo, hi), c0 in zip(spans, chunk_origin, strict=True))
    coords = tuple(np.arange(lo, hi, dtype=np.float64) - p
                   for (lo, hi), p in zip(spans, pos, strict=True))
    if exact:
        ip = np.round(pos).astype(np.int64)
        src = tuple(slice(lo - i, hi - i) for (lo, hi), i in zip(spans, ip, strict=True))
        return Placement(box, data[(slice(None), *src)], coords, None)
    values = _shift_linear(data, pos, spans, accumulator)
    return Placement(box, values, coords, None)


def _shift_linear(data: np.ndarray, pos: np.ndarray, spans: list,
                  accumulator: np.dtype) -> np.ndarray:
    """Separable linear interpolation of ``data`` (c, *n) onto integer indices ``spans``.

    Along an axis with position ``p = i + f`` (``0 < f < 1``), output index ``o`` samples tile
    coordinate ``t = o - p`` between pixels ``k - 1`` and ``k`` with ``k = o - i``, so its value
    is ``f * data[k - 1] + (1 - f) * data[k]``, computed in ``accumulator`` (float32 or
    float64), axis after axis.
    """
    kind = accumulator.type
    ip = np.floor(pos).astype(np.int64)  # pos is snapped: frac is 0 or in [EPS, 1 - EPS]
    frac = pos - ip
    src, integer_axes = [slice(None)], []
    for ax, ((lo, hi), i, f) in enumerate(zip(spans, ip, frac, strict=True)):
        if f == 0:
            src.append(slice(lo - i, hi - i))
            integer_axes.append(ax)
        else:
            src.append(slice(lo - i - 1, hi - i))
    out = data[tuple(src)]
    for ax, f in enumerate(frac):
        if ax in integer_axes:
            continue
        a = [slice(None)] * out.ndim
        b = [slice(None)] * out.ndim
        a[ax + 1], b[ax + 1] = slice(None, -1), slice(1, None)
        upper = np.multiply(out[tuple(b)], kind(1 - f), dtype=accumulator)
        lower = np.multiply(out[tuple(a)], kind(f), dtype=accumulator)
        lower += upper
        out = lower
    return out if out.dtype == accumulator else out.astype(accumulator)


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

    Returns
    -------
    Placement or None
        None when the tile does not reach the chunk.
    """
    path = path or classify(affine)
    accumulator = np.dtype(accumulator)
    if path == "affine":
        return _place_affine(data, affine, chunk_origin, chunk_shape, order, accumulator)
    pos = affine[:-1, -1]
    return _place_translation(data, pos, chunk_origin, chunk_shape, path == "slice",
                              accumulator)
