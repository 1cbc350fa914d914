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
from tilefuse.fusion.chunk import write_zeros, zeroed
from tilefuse.fusion.resample import Placement, row_buffers

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
        self.covered = zeroed(chunk_shape, bool)

    def add(self, p: Placement, tile_shape: Sequence[int]) -> None:
        raise NotImplementedError

    def into(self, box: tuple[slice, ...]) -> np.ndarray | None:
        """Where a translated tile may write its values for ``box`` itself (``place_tile``'s
        ``into``), then added with ``in_place``; None: not here (the default)."""
        return None

    def values(self) -> np.ndarray:
        """Blended values (c, *chunk) in the accumulator dtype; meaningful where covered."""
        raise NotImplementedError

    def _mark(self, p: Placement) -> None:
        if p.mask is None:
            self.covered[p.box] = True
        else:
            self.covered[p.box] |= p.mask


class _Weighted(Reducer):
    """Weighted sum / weight sum: ``linear`` (feathering weights) and ``mean`` (weight 1).

    A translated tile's weight is an outer product of 1D ramps that are exactly 1 on a middle
    range of each axis: there (the interior, most of a tile) ``acc += v`` and ``wsum += 1`` give
    the bits ``acc += v * 1`` and ``wsum += 1`` would, without a weight array; only the frame
    around it is weighted (see :meth:`_add_separable`).

    The chunk's first tile, when translated, may be interpolated straight into ``acc``
    (:meth:`into`; the kernel offers it for integer tiles): its weighted values and weights
    are then written, not added to zeros, and only the rest of the chunk is zeroed. ``0 + x``
    is ``x`` for every float ``x`` but ``-0.0``, which integer tiles never give, so the sums
    keep their bits, with one pass over most of the chunk fewer and no temporary.
    """

    def __init__(self, n_channels, chunk_shape, widths: Sequence[float] | None,
                 accumulator=np.float32) -> None:
        super().__init__(n_channels, chunk_shape, accumulator)
        self.widths = widths
        self.acc = np.empty(self.shape, dtype=self.dtype)
        self.wsum = np.empty(chunk_shape, dtype=self.dtype)
        self._blank = True  # nothing added yet: acc and wsum not zeroed

    def into(self, box: tuple[slice, ...]) -> np.ndarray | None:
        """``acc``'s ``box`` for the chunk's first tile, the rest of the chunk zeroed; None
        once a tile was added."""
        if not self._blank:
            return None
        self._blank = False
        interior = tuple((b.start, b.stop) for b in box)
        for region in _frame(interior, self.wsum.shape):
            self.acc[(slice(None), *region)].fill(0)
            self.wsum[region].fill(0)
        return self.acc[(slice(None), *box)]

    def _zero(self) -> None:
        """Zero the state before the first tile that is not written in place."""
        if self._blank:
            self._blank = False
            write_zeros(self.acc)
            write_zeros(self.wsum)

    def _weight(self, p: Placement, mask: np.ndarray, tile_shape) -> np.ndarray:
        """The weights of an affine placement, shape (*box_shape), float32; 0 off ``mask``."""
        w = np.ones(mask.shape, dtype=np.float32)
        if self.widths is not None:
            for t, n, width in zip(p.coords, tile_shape, self.widths, strict=True):
                w *= cosine_ramp(t, n, width)
        return np.where(mask, w, np.float32(0))

    def add(self, p: Placement, tile_shape) -> None:
        if not p.in_place:
            self._zero()
        if p.mask is None:
            with row_buffers():
                self._add_separable(p, tile_shape)
        else:
            w = self._weight(p, p.mask, tile_shape)
            acc = self.acc[(slice(None), *p.box)]
            acc += self._weighted(p.values, w)
            wsum = self.wsum[p.box]
            wsum += w
        self._mark(p)

    def _add_separable(self, p: Placement, tile_shape) -> None:
        """Add a translated tile, whose weight is an outer product of 1D ramps.

        The box splits into frame slabs, where a ramp of an axis before the last is below 1
        (weighted by the full products), and a core, where those ramps are exactly 1: there the
        weight is the last axis's ramp alone (``(1 * 1) * r`` is ``r``, bit for bit), and where
        that is 1 too, values and weights are added as they are. The last axis is never split,
        so every operation runs on whole rows.
        """
        box_shape = p.values.shape[1:]
        if self.widths is None:
            ramps = [np.ones(m, dtype=np.float32) for m in box_shape]
        else:
            ramps = [cosine_ramp(t, n, width)
                     for t, n, width in zip(p.coords, tile_shape, self.widths, strict=True)]
        ones = (*(_ones_range(r) for r in ramps[:-1]), (0, box_shape[-1]))
        for region in _frame(ones, box_shape):
            w = np.ones((1,) * len(box_shape), dtype=np.float32)
            for ax, (r, part) in enumerate(zip(ramps, region, strict=True)):
                shape = [1] * len(box_shape)
                shape[ax] = -1
                w = w * r[part].reshape(shape)  # (r0 * r1) * r2: the full box's products
            self._accumulate(p, region, w)
        if all(b > a for a, b in ones):
            core = tuple(slice(a, b) for a, b in ones)
            last = ramps[-1]
            self._accumulate(p, core, None if bool((last == 1).all()) else last)

    def _accumulate(self, p: Placement, region: tuple[slice, ...],
                    w: np.ndarray | None) -> None:
        """``acc += v * w`` and ``wsum += w`` on ``region`` of the placement's box.

        Parameters
        ----------
        p : Placement
        region : tuple of slice
            Part of ``p.box``, relative to it.
        w : numpy.ndarray of float32, broadcastable to the region's shape, or None
            Weights; None: all exactly 1 (``acc += v``, ``wsum += 1``, the same bits).
        """
        at = tuple(slice(b.start + r.start, b.start + r.stop)
                   for b, r in zip(p.box, region, strict=True))
        acc = self.acc[(slice(None), *at)]
        wsum = self.wsum[at]
        if p.in_place:  # the values are in acc already, on zeros: v * w and w themselves
            if w is not None:
                np.multiply(acc, w, out=acc)
            wsum[...] = 1 if w is None else w
            return
        values = p.values[(slice(None), *region)]
        acc += values if w is None else self._weighted(values, w)  # converted exactly by the ufunc
        wsum += 1 if w is None else w

    def _weighted(self, values: np.ndarray, w: np.ndarray) -> np.ndarray:
        """``values * w`` in the accumulator dtype, (c, *box) times (*box) or broadcastable."""
        if values.dtype == self.dtype and values.flags.writeable:
            return np.multiply(values, w, out=values)  # a temporary made for this chunk: reuse it
        return np.multiply(values, w, dtype=self.dtype)  # a tile's own pixels: converted first

    def values(self) -> np.ndarray:
        self._zero()  # no tile reached the chunk
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.divide(self.acc, self.wsum, out=self.acc)


def _ones_range(ramp: np.ndarray) -> tuple[int, int]:
    """The range ``[a, b)`` where ``ramp`` (1D) is exactly 1, when contiguous; else empty."""
    ones = np.flatnonzero(ramp == 1)
    if ones.size == 0 or ones[-1] + 1 - ones[0] != ones.size:
        return (0, 0)
    return int(ones[0]), int(ones[-1]) + 1


def _frame(interior: tuple[tuple[int, int], ...], box_shape: tuple[int, ...]
           ) -> list[tuple[slice, ...]]:
    """Disjoint regions that, with the ``interior`` box, tile a box of ``box_shape``.

    Along axis ``k``: the slabs before and after ``interior[k]``, spanning ``interior[j]`` on
    the axes ``j < k`` and the whole box on the axes after. Empty slabs are left out.
    """
    regions = []
    for k, ((a, b), m) in enumerate(zip(interior, box_shape, strict=True)):
        inner = tuple(slice(lo, hi) for lo, hi in interior[:k])
        outer = tuple(slice(0, n) for n in box_shape[k + 1:])
        parts = [(0, m)] if a >= b else [(0, a), (b, m)]
        regions += [(*inner, slice(lo, hi), *outer) for lo, hi in parts if hi > lo]
        if a >= b:
            break  # the slab took the whole remaining box: the interior is empty
    return regions


class _Extreme(Reducer):
    """Running maximum or minimum over covering tiles."""

    def __init__(self, n_channels, chunk_shape, op, accumulator=np.float32) -> None:
        super().__init__(n_channels, chunk_shape, accumulator)
        self.op = op
        self.acc = zeroed(self.shape, self.dtype)

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
        self.acc = zeroed(self.shape, self.dtype)

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
