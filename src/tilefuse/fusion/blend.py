"""Blending: feathering weights and the reducers that combine tiles in one output chunk.

Every reducer keeps O(chunk) state in its accumulator dtype (float32, or float64 for tiles or
outputs wider than 16 bits: :func:`tilefuse.fusion.kernel.accumulator_dtype`), whatever the
number of tiles, and is fed tiles in layout order (``first`` and ``last`` depend on it). Weights are
float32 either way; values are converted to the accumulator dtype before they are weighted.

- ``linear``: cosine feathering. A tile's weight at tile coordinate ``t`` along an axis of
  length ``n`` is ``0.5 - 0.5 cos(pi * min(d / width, 1))`` with ``d = min(t, n - 1 - t) + 0.5``
  the distance to the tile's edge; weights multiply across axes and are normalised per pixel.
  Where one tile covers a pixel its value comes through unchanged.
- ``mean``, ``max``, ``min``, ``first``, ``last``: as named, over the tiles covering a pixel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tilefuse.errors import InputError
from tilefuse.fusion.resample import Placement

__all__ = ["BLENDS", "Reducer", "cosine_ramp", "make_reducer"]

BLENDS = ("linear", "mean", "max", "min", "first", "last")


def cosine_ramp(t: np.ndarray, n: int, width: float) -> np.ndarray:
    """Feathering weight along one axis, in (0, 1].

    Parameters
    ----------
    t : numpy.ndarray, float64
        Tile coordinates (pixel centres at 0 .. n - 1), any shape.
    n : int
        Tile length along the axis.
    width : float
        Distance from the edge, in pixels, over which the weight rises to 1.
    """
    width = max(float(width), 0.5)
    d = np.minimum(t, (n - 1) - t)
    d += 0.5
    w = np.ones(d.shape, dtype=np.float32)
    band = d < width  # beyond the band the weight is exactly 1: no cosine to evaluate
    if band.any():
        w[band] = 0.5 - 0.5 * np.cos(np.pi * np.maximum(d[band], 0.0) / width)
    return w


class Reducer:
    """Combines tile placements into one chunk. Subclasses define ``add`` and ``result``.

    Parameters
    ----------
    n_channels : int
    chunk_shape : tuple of int
        Spatial shape of the chunk.
    accumulator : {float32, float64}
        Dtype of the state (values, weight sums).
    """

    def __init__(self, n_channels: int, chunk_shape: tuple[int, ...],
                 accumulator: np.dtype | type = np.float32) -> None:
        self.shape = (n_channels, *chunk_shape)
        self.dtype = np.dtype(accumulator)
        self.covered = np.zeros(chunk_shape, dtype=bool)

    def add(self, p: Placement, tile_shape: Sequence[int]) -> None:
        raise NotImplementedError

    def values(self) -> np.ndarray:
        """Blended values (c, *chunk) in the accumulator dtype; meaningful where covered."""
        raise NotImplementedError

    def _mark(self, p: Placement) -> None:
        if p.mask is None:
            self.covered[p.box] = True
        else:
            self.covered[p.box] |= p.mask


class _Weighted(Reducer):
    """Weighted sum / weight sum: ``linear`` (feathering weights) and ``mean`` (weight 1)."""

    def __init__(self, n_channels, chunk_shape, widths: Sequence[float] | None,
                 accumulator=np.float32) -> None:
        super().__init__(n_channels, chunk_shape, accumulator)
        self.widths = widths
        self.acc = np.zeros(self.shape, dtype=self.dtype)
        self.wsum = np.zeros(chunk_shape, dtype=self.dtype)

    def _weight(self, p: Placement, tile_shape) -> np.ndarray:
        if self.widths is None:
            w = np.ones(p.values.shape[1:], dtype=np.float32)
        elif p.mask is None:  # separable: 1D ramps, outer product
            w = np.ones((1,) * len(tile_shape), dtype=np.float32)
            for ax, (t, n, width) in enumerate(zip(p.coords, tile_shape, self.widths, strict=True)):
                shape = [1] * len(tile_shape)
                shape[ax] = -1
                w = w * cosine_ramp(t, n, width).reshape(shape)
        else:
            w = np.ones(p.mask.shape, dtype=np.float32)
            for t, n, width in zip(p.coords, tile_shape, self.widths, strict=True):
                w *= cosine_ramp(t, n, width)
        if p.mask is not None:
            w = np.where(p.mask, w, np.float32(0))
        return np.broadcast_to(w, p.values.shape[1:])

    def add(self, p: Placement, tile_shape) -> None:
        w = self._weight(p, tile_shape)
        acc = self.acc[(slice(None), *p.box)]
        if self.widths is None and p.mask is None:
            acc += p.values  # converted to the accumulator dtype by the ufunc, exactly
        elif p.values.dtype == self.dtype and p.values.flags.writeable:
            np.multiply(p.values, w, out=p.values)  # a temporary made for this chunk: reuse it
            acc += p.values
        else:  # a tile's own pixels (slice path): converted first, then weighted
            acc += np.multiply(p.values, w, dtype=self.dtype)
        self.wsum[p.box] += w
        self._mark(p)

    def values(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.divide(self.acc, self.wsum, out=self.acc)


class _Extreme(Reducer):
    """Running maximum or minimum over covering tiles."""

    def __init__(self, n_channels, chunk_shape, op, accumulator=np.float32) -> None:
        super().__init__(n_channels, chunk_shape, accumulator)
        self.op = op
        self.acc = np.zeros(self.shape, dtype=self.dtype)

    def add(self, p: Placement, tile_shape) -> None:
        acc = self.acc[(slice(None), *p.box)]
        fresh = ~self.covered[p.box]
        if p.mask is not None:
            new = np.where(fresh & p.mask, p.values, self.op(acc, p.values))
            acc[...] = np.where(p.mask, new, acc)
        else:
            acc[...] = np.where(fresh, p.values, self.op(acc, p.values))
        self._mark(p)

    def values(self) -> np.ndarray:
        return self.acc


class _Ordered(Reducer):
    """``first`` keeps the earliest covering tile, ``last`` the latest."""

    def __init__(self, n_channels, chunk_shape, keep_first: bool, accumulator=np.float32) -> None:
        super().__init__(n_channels, chunk_shape, accumulator)
        self.keep_first = keep_first
        self.acc = np.zeros(self.shape, dtype=self.dtype)

    def add(self, p: Placement, tile_shape) -> None:
        take = np.ones(p.values.shape[1:], dtype=bool) if p.mask is None else p.mask
        if self.keep_first:
            take = take & ~self.covered[p.box]
        acc = self.acc[(slice(None), *p.box)]
        np.copyto(acc, p.values, where=take[None], casting="unsafe")
        self._mark(p)

    def values(self) -> np.ndarray:
        return self.acc


def make_reducer(
    blend: str,
    n_channels: int,
    chunk_shape: tuple[int, ...],
    widths: Sequence[float],
    accumulator: np.dtype | type = np.float32,
) -> Reducer:
    """The reducer for a blend name (see :data:`BLENDS`).

    Parameters
    ----------
    blend : str
    n_channels : int
    chunk_shape : tuple of int
        Spatial shape of the chunk.
    widths : sequence of float
        Feathering width per spatial axis, used by ``linear``.
    accumulator : {float32, float64}
        Dtype of the reducer's state (:func:`tilefuse.fusion.kernel.accumulator_dtype`).
    """
    if blend == "linear":
        return _Weighted(n_channels, chunk_shape, widths, accumulator)
    if blend == "mean":
        return _Weighted(n_channels, chunk_shape, None, accumulator)
    if blend in ("max", "min"):
        op = np.maximum if blend == "max" else np.minimum
        return _Extreme(n_channels, chunk_shape, op, accumulator)
    if blend in ("first", "last"):
        return _Ordered(n_channels, chunk_shape, blend == "first", accumulator)
    raise InputError(f"unknown blend {blend!r}; expected one of {', '.join(BLENDS)}")
