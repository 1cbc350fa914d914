"""The fused mosaic: lazy pixels and everything a writer needs to place them in space.

:func:`tilefuse.fuse` returns a :class:`Mosaic`; :func:`tilefuse.write_ome_zarr` takes it as it
is. The metadata travels with the data, so axes, pixel size, unit, channel names and the
mosaic's origin are never passed a second time (and cannot be passed wrongly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from tilefuse.errors import InputError
from tilefuse.model.units import check_unit

if TYPE_CHECKING:
    import dask.array as da

__all__ = ["AXIS_ORDER", "SPATIAL_AXES", "BlockPixels", "Mosaic", "check_axes", "dask_is_chosen",
           "read_all"]

AXIS_ORDER = "tczyx"
"""The axes a mosaic may have, in the order they come: absent axes are dropped."""
SPATIAL_AXES = ("z", "y", "x")


def check_axes(axes: Sequence[str], ndim: int) -> tuple[str, ...]:
    """Axis names, lower case: one per dimension, from ``t c z y x`` in that order, with y, x.

    Raises
    ------
    InputError
        Naming the axes and what is wrong with them.
    """
    names = tuple(str(a).lower() for a in axes)
    if len(names) != ndim:
        raise InputError(f"axes {names} name {len(names)} dims but the array has {ndim}")
    order = [AXIS_ORDER.find(a) for a in names]
    if -1 in order or order != sorted(set(order)):
        raise InputError(f"axes must be distinct names from 't c z y x' in that order, got {names}")
    if "y" not in names or "x" not in names:
        raise InputError(f"axes must include 'y' and 'x', got {names}")
    return names


@runtime_checkable
class BlockPixels(Protocol):
    """Pixels made one block at a time on request, without dask: what :func:`tilefuse.fuse`
    puts in a :class:`Mosaic` (:class:`tilefuse.fusion.graph.FusedPixels`).

    A writer that runs its own threads asks for the blocks it stores
    (:meth:`block`); everything else gets the same pixels as a dask array (:meth:`to_dask`),
    built the first time :attr:`Mosaic.data` is read (importing dask costs a command ~0.3 s).

    Attributes
    ----------
    shape : tuple of int
    dtype : numpy.dtype
    chunk_shape : tuple of int
        The block shape, one per axis (the last block along an axis may be smaller).
    """

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def chunk_shape(self) -> tuple[int, ...]: ...

    def block(self, index: tuple[int, ...]) -> np.ndarray:
        """The block at `index` (one block number per axis), shape ``chunk_shape`` or smaller
        at the far edges."""

    def to_dask(self) -> da.Array:
        """The same pixels as a dask array chunked as :attr:`chunk_shape`."""


def _floats(values: Sequence[float] | None, default: float, n: int, what: str,
            spatial: tuple[str, ...]) -> tuple[float, ...]:
    out = (default,) * n if values is None or len(values) == 0 else tuple(map(float, values))
    if len(out) != n:
        raise InputError(f"{what} has {len(out)} values but there are {n} spatial axes {spatial}")
    if not all(math.isfinite(v) for v in out):
        raise InputError(f"{what} {out} must be finite")
    return out


@dataclass(frozen=True, eq=False)
class Mosaic:
    """A fused image, lazy, with its axes, physical scale, channels and place in the layout.

    Parameters
    ----------
    data : dask.array.Array or BlockPixels, shape ([t,] [c,] [z,] y, x)
        The pixels; axes named by `axes`, absent axes dropped (a single channel has no ``c``
        axis). Any dtype the tiles had (or the one asked for); chunks as fused. Read back,
        :attr:`data` is always a dask array (a :class:`BlockPixels` is turned into one the
        first time it is read; writers running on threads take its blocks directly).
    axes : sequence of str
        One name per dimension of `data`, from ``t c z y x`` in that order, with ``y`` and
        ``x``; e.g. ``("c", "y", "x")``. Stored as a tuple of str.
    pixel_size : sequence of float, optional
        Physical size of one pixel per spatial axis present (z, y, x order), in `unit`;
        default (empty) 1 each. Stored as a tuple of float, shape (n_spatial,).
    unit : str
        Unit of `pixel_size`: an OME-NGFF space unit or an abbreviation (``"um"``), stored as
        the NGFF name (``"micrometer"``).
    channel_names : sequence of str, optional
        One per channel (one when there is no ``c`` axis); default (empty) ``"Channel 0"``,
        ``"Channel 1"``, ...
    channel_colors : sequence of str, optional
        One hex ``RRGGBB`` display colour per channel, or None for the writer's palette.
    origin : sequence of float, optional
        Position of the mosaic's first pixel in the layout's pixel frame (mosaic pixel index),
        one per spatial axis (z, y, x order); default (empty) 0 each. Writers store it, times
        the pixel size, as the image's translation.
    timepoints : sequence of str, optional
        The name of each time point along ``t`` (e.g. ``"003"`` from a ``{t}`` pattern), or
        None.

    Attributes
    ----------
    shape, dtype, ndim
        Those of `data`.

    Examples
    --------
    >>> import dask.array as da
    >>> m = Mosaic(da.zeros((2, 30, 40), dtype="uint16", chunks=16), ("c", "y", "x"),
    ...            pixel_size=(0.5, 0.5), unit="um", channel_names=("DAPI", "GFP"))
    >>> m.shape, m.unit, m.origin
    ((2, 30, 40), 'micrometer', (0.0, 0.0))
    >>> import numpy as np
    >>> np.asarray(m).shape, int(np.asarray(m).max())
    ((2, 30, 40), 0)
    """

    data: da.Array
    axes: tuple[str, ...]
    pixel_size: tuple[float, ...] = ()
    unit: str = "micrometer"
    channel_names: tuple[str, ...] = ()
    channel_colors: tuple[str, ...] | None = None
    origin: tuple[float, ...] = ()
    timepoints: tuple[str, ...] | None = None

    _pixels: BlockPixels | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        raw = self._raw
        if isinstance(raw, BlockPixels):
            object.__setattr__(self, "_pixels", raw)
        elif not _is_dask_array(raw):
            raise InputError(f"Mosaic data must be a dask array, got {type(raw).__name__} "
                             "(wrap a numpy array with dask.array.from_array)")
        axes = check_axes(self.axes, len(raw.shape))
        spatial = tuple(a for a in axes if a in SPATIAL_AXES)
        sizes = _floats(self.pixel_size, 1.0, len(spatial), "pixel_size", spatial)
        if not all(s > 0 for s in sizes):
            raise InputError(f"pixel sizes must be finite and > 0, got {sizes}")
        origin = _floats(self.origin, 0.0, len(spatial), "origin", spatial)
        n_channels = self.shape[axes.index("c")] if "c" in axes else 1
        names = (tuple(str(n) for n in self.channel_names) if self.channel_names
                 else tuple(f"Channel {i}" for i in range(n_channels)))
        colors = None if self.channel_colors is None else tuple(map(str, self.channel_colors))
        if len(names) != n_channels or (colors is not None and len(colors) != n_channels):
            raise InputError(f"got {len(names)} channel names and "
                             f"{n_channels if colors is None else len(colors)} colours for "
                             f"{n_channels} channel(s)")
        times = None if self.timepoints is None else tuple(str(t) for t in self.timepoints)
        if times is not None and ("t" not in axes or len(times) != self.shape[0]):
            raise InputError(f"{len(times)} time point names for axes {axes} of shape "
                             f"{self.shape}")
        for name, value in (("axes", axes), ("pixel_size", sizes), ("unit", check_unit(self.unit)),
                            ("channel_names", names), ("channel_colors", colors),
                            ("origin", origin), ("timepoints", times)):
            object.__setattr__(self, name, value)

    def __getattribute__(self, name: str) -> Any:
        # `data` stays a dataclass field (positional, keyword, dataclasses.replace all work);
        # block pixels given as `data` become a dask array the first time it is read.
        if name == "data":
            pixels = object.__getattribute__(self, "_pixels")
            data = object.__getattribute__(self, "__dict__")["data"]
            if pixels is not None and data is pixels:
                data = pixels.to_dask()
                object.__setattr__(self, "data", data)
            return data
        return object.__getattribute__(self, name)

    @property
    def pixels(self) -> BlockPixels | None:
        """The block pixels the mosaic was made of (what :func:`tilefuse.fuse` gives), or None
        for a mosaic of a dask array."""
        return self._pixels

    @property
    def _raw(self) -> Any:
        """`data` as given: block pixels are not turned into dask."""
        return self.__dict__["data"]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self._raw.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._raw.dtype)

    @property
    def ndim(self) -> int:
        return len(self._raw.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole image, uncompressed."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def spatial_axes(self) -> tuple[str, ...]:
        """The spatial axes present, ``("y", "x")`` or ``("z", "y", "x")``."""
        return tuple(a for a in self.axes if a in SPATIAL_AXES)

    def compute(self, **kwargs: Any) -> np.ndarray:
        """All pixels as a numpy array of :attr:`shape`.

        Block pixels (what :func:`tilefuse.fuse` makes) are made on this machine's threads,
        without dask, unless `kwargs` are given (they go to dask's compute, e.g.
        ``scheduler=...``, as for a mosaic of a dask array) or the user chose a dask scheduler
        (:func:`dask_is_chosen`).
        """
        if self._pixels is not None and not kwargs and not dask_is_chosen():
            return read_all(self._pixels)
        return np.asarray(self.data.compute(**kwargs))

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        pixels = self.compute()
        return pixels if dtype is None else pixels.astype(dtype, copy=False)

    def __repr__(self) -> str:
        scale = " x ".join(f"{s:g}" for s in self.pixel_size)
        return (f"Mosaic(shape={self.shape}, axes={''.join(self.axes)!r}, dtype={self.dtype}, "
                f"pixel_size={scale} {self.unit}, channels={list(self.channel_names)}, "
                f"origin={self.origin})")


def dask_is_chosen() -> bool:
    """Whether the user chose where dask runs: a running ``distributed`` client, or a
    scheduler set in dask's configuration. Then computations go through dask as
    ``dask.compute`` would run them; otherwise tilefuse runs its own tasks on threads."""
    import sys

    if "distributed" in sys.modules:  # a client can exist only if distributed was imported
        from distributed import get_client

        try:
            get_client()
        except ValueError:  # no client
            pass
        else:
            return True
    if "dask" in sys.modules:
        import dask

        return dask.config.get("scheduler", None) is not None
    return False


def read_all(pixels: BlockPixels, workers: int | None = None) -> np.ndarray:
    """Every block of `pixels`, made in threads (one per core by default) into one array.

    Returns
    -------
    numpy.ndarray, shape ``pixels.shape``, ``pixels.dtype``
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    shape, unit = pixels.shape, pixels.chunk_shape
    out = np.empty(shape, dtype=pixels.dtype)
    blocks = list(np.ndindex(*(-(-n // c) for n, c in zip(shape, unit, strict=True))))

    def run(block: tuple[int, ...]) -> None:
        data = pixels.block(block)
        out[tuple(slice(b * c, b * c + n)
                  for b, c, n in zip(block, unit, data.shape, strict=True))] = data

    threads = max(1, min(len(blocks), workers or os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(run, blocks):  # re-raises a failed block's error here
            pass
    return out


def _is_dask_array(value: object) -> bool:
    """Whether `value` is a dask array (without importing dask when it cannot be one)."""
    if type(value).__module__.split(".")[0] != "dask":
        return False
    import dask.array as da

    return isinstance(value, da.Array)
