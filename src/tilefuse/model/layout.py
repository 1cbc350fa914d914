"""The layout model: tiles, where they go, and what the mosaic is made of.

A :class:`Layout` is plain frozen data. It holds no open files, so it pickles cheaply and can be
sent to any dask worker. Each :class:`Tile` knows its spatial shape, its affine (tile pixel index
-> mosaic pixel index, homogeneous, zyx order) and a *source* that says how to read its pixels.

Conventions
-----------
- Spatial axes are ``(y, x)`` or ``(z, y, x)``; files speak ``x, y(, z)`` and readers reverse them.
- Positions are the mosaic pixel index of the tile's first pixel (its top-left corner).
- Tile pixels are always read as ``(c, *spatial)``; single-channel layouts have ``c == 1``.

Time points are not part of a layout: a :class:`~tilefuse.model.timeseries.TimeSeries` holds
one layout per time point.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, overload, runtime_checkable

import numpy as np

from tilefuse.errors import InputError

__all__ = ["DEFAULT_SOURCE", "GIVEN_SOURCE", "Layout", "PixelSize", "Tile", "TileSource",
           "translation_affine"]

DEFAULT_SOURCE = "default"
"""``PixelSize.source`` when no file states a pixel size: 1 per axis (in ``Layout.unit``)."""
GIVEN_SOURCE = "given"
"""``PixelSize.source`` of a pixel size passed in as plain numbers (Python, ``--pixel-size``)."""


@runtime_checkable
class TileSource(Protocol):
    """Something that can produce a tile's pixels as a ``(c, *spatial)`` array.

    Implementations live in :mod:`tilefuse.io.tiles`; they must be picklable and hold no open
    handles. ``key`` identifies the pixels for caching. A z-stack source may also offer
    ``read_planes(start, stop)``: planes ``start:stop`` as ``(c, stop - start, y, x)``, or None
    where it cannot read them apart; fusion then reads only the planes a chunk needs
    (:func:`tilefuse.io.tile_cache.read_tile`).
    """

    @property
    def key(self) -> tuple: ...

    def read(self) -> np.ndarray: ...


def translation_affine(position: Sequence[float] | np.ndarray) -> np.ndarray:
    """Homogeneous affine that moves a tile's first pixel to ``position``.

    Parameters
    ----------
    position : sequence or array of float, length ndim
        Mosaic pixel index of the tile's first pixel, zyx order.

    Returns
    -------
    numpy.ndarray, shape (ndim + 1, ndim + 1), float64
    """
    pos = np.asarray(position, dtype=np.float64)
    affine = np.eye(pos.size + 1)
    affine[:-1, -1] = pos
    return affine


class PixelSize(tuple[float, ...]):
    """Physical size of one pixel per spatial axis (zyx), and where that size came from.

    A tuple of float, equal to the plain tuple of the same numbers, with one more attribute:
    :attr:`source`. Because the source travels *with* the numbers, a layout copied with a new
    plain tuple (``dataclasses.replace(layout, pixel_size=(0.5, 0.5))``) is ``"given"``, and one
    copied without touching its pixel size keeps the source it had.

    Parameters
    ----------
    values : iterable of float
        Sizes in zyx order.
    source : str
        ``"default"`` (no file states one), ``"given"`` (passed in as numbers), or what stated
        it: ``"OME-XML"``, ``"CZI metadata"``, ``"ImageJ metadata"``, ``"TIFF resolution tags"``
        (a layout file records the source it was saved with).

    Examples
    --------
    >>> size = PixelSize((0.5, 0.25), "OME-XML")
    >>> size == (0.5, 0.25), size.source, size.known
    (True, 'OME-XML', True)
    """

    _source: str

    def __new__(cls, values: Iterable[float], source: str = GIVEN_SOURCE) -> PixelSize:
        self = super().__new__(cls, (float(v) for v in values))
        self._source = str(source)
        return self

    @property
    def source(self) -> str:
        """Where the size came from (see the class docstring)."""
        return self._source

    @property
    def known(self) -> bool:
        """False when no file stated a pixel size and the default of 1 is used."""
        return self._source != DEFAULT_SOURCE

    def __reduce__(self) -> tuple:
        return (PixelSize, (tuple(self), self._source))

    def __repr__(self) -> str:
        return f"PixelSize({tuple(self)!r}, source={self._source!r})"


class _PixelSizeField:
    """``Layout.pixel_size``: set as None, plain numbers or a PixelSize; read as a PixelSize.

    A data descriptor, so that type checkers tell what ``Layout(...)`` and ``replace`` accept (the
    ``__set__`` type) from what the attribute holds once ``Layout.__post_init__`` has converted it
    (the ``__get__`` type). The value lives in the instance ``__dict__`` under the field's name.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> None: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> PixelSize: ...

    def __get__(self, obj: object | None, owner: type | None = None) -> PixelSize | None:
        if obj is None:
            return None  # class access: dataclasses reads the field's default (None) here
        size: PixelSize = vars(obj)[self._name]
        return size

    def __set__(self, obj: object, value: PixelSize | Sequence[float] | None) -> None:
        vars(obj)[self._name] = value


@dataclass(frozen=True, slots=True, eq=False)
class Tile:
    """One tile of an acquisition.

    Attributes
    ----------
    name : str
        What the user calls it (file name as written in the layout, or "tile 3").
    shape : tuple of int
        Spatial shape, ``(y, x)`` or ``(z, y, x)``.
    affine : numpy.ndarray, shape (ndim + 1, ndim + 1), float64
        Tile pixel index -> mosaic pixel index.
    source : TileSource
        How to read the pixels, as ``(c, *shape)``.
    """

    name: str
    shape: tuple[int, ...]
    affine: np.ndarray
    source: TileSource

    def __post_init__(self) -> None:
        affine = np.asarray(self.affine, dtype=np.float64)
        ndim = len(self.shape)
        if affine.shape != (ndim + 1, ndim + 1):
            raise InputError(
                f"tile {self.name}: affine has shape {affine.shape}, expected "
                f"{(ndim + 1, ndim + 1)} for a {ndim}D tile"
            )
        if not np.all(np.isfinite(affine)):
            raise InputError(f"tile {self.name}: position or affine is not finite: {affine[:-1]}")
        if any(int(n) < 1 for n in self.shape):
            raise InputError(f"tile {self.name}: empty tile shape {self.shape}")
        affine.setflags(write=False)
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))

    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.shape)

    @property
    def position(self) -> np.ndarray:
        """Mosaic pixel index of the tile's first pixel, zyx order, shape (ndim,)."""
        return self.affine[:-1, -1].copy()

    @property
    def is_translation(self) -> bool:
        """True when the affine is a pure translation."""
        return bool(np.array_equal(self.affine[:-1, :-1], np.eye(self.ndim)))

    def with_affine(self, affine: np.ndarray) -> Tile:
        """A copy of this tile placed by ``affine``."""
        return replace(self, affine=affine)


@dataclass(frozen=True, eq=False)
class Layout:
    """A set of tiles to fuse into one mosaic.

    Attributes
    ----------
    tiles : tuple of Tile
        In layout order; blends ``first`` and ``last`` follow it.
    dtype : numpy.dtype
        Pixel type shared by all tiles.
    channels : tuple of str
        Channel names; every tile reads as ``(len(channels), *shape)``.
    pixel_size : PixelSize
        Physical size of one mosaic pixel per spatial axis, zyx order; a :class:`PixelSize`
        (a tuple of float that knows its source). Given as None: 1 per axis, source
        ``"default"``; given as plain numbers: source ``"given"``.
    unit : str
        Unit of ``pixel_size`` (an OME-NGFF unit name).
    origin : str or None
        The file or folder the layout was read from, for messages and relative paths.
    """

    tiles: tuple[Tile, ...]
    dtype: np.dtype
    channels: tuple[str, ...] = ("0",)
    pixel_size: _PixelSizeField = _PixelSizeField()
    unit: str = "micrometer"
    origin: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f" in {self.origin}" if self.origin else ""
        if len(self.tiles) == 0:
            raise InputError(f"the layout{where} has no tiles")
        ndims = {t.ndim for t in self.tiles}
        if len(ndims) != 1:
            raise InputError(f"tiles{where} mix dimensionalities {sorted(ndims)}; expected one")
        ndim = ndims.pop()
        if ndim not in (2, 3):
            raise InputError(f"tiles{where} are {ndim}D; expected 2D (y, x) or 3D (z, y, x)")
        object.__setattr__(self, "tiles", tuple(self.tiles))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "channels", tuple(str(c) for c in self.channels))
        # As given, before the conversion below (see _PixelSizeField).
        given: PixelSize | Sequence[float] | None = vars(self)["pixel_size"]
        size: tuple[float, ...]
        if given is None:
            size = PixelSize((1.0,) * ndim, DEFAULT_SOURCE)
        else:
            source = getattr(given, "source", GIVEN_SOURCE)
            try:
                size = PixelSize(given, source)
            except (TypeError, ValueError):
                size = ()
        if len(size) != ndim or not all(np.isfinite(s) and s > 0 for s in size):
            raise InputError(f"pixel size {given} must be {ndim} positive numbers")
        object.__setattr__(self, "pixel_size", size)

    @property
    def ndim(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return self.tiles[0].ndim

    @property
    def pixel_size_source(self) -> str:
        """Where the pixel size came from: ``"default"``, ``"given"``, ``"OME-XML"``..."""
        return self.pixel_size.source

    @property
    def pixel_size_known(self) -> bool:
        """False when no file stated a pixel size and 1 per axis is a default."""
        return self.pixel_size.known

    @property
    def affines(self) -> np.ndarray:
        """All tile affines, shape (n_tiles, ndim + 1, ndim + 1)."""
        return np.stack([t.affine for t in self.tiles])

    @property
    def positions(self) -> np.ndarray:
        """All tile positions (first pixel, zyx), shape (n_tiles, ndim)."""
        return self.affines[:, :-1, -1]

    def with_affines(self, affines: np.ndarray) -> Layout:
        """A copy of the layout with each tile moved to its new affine.

        Parameters
        ----------
        affines : array, shape (n_tiles, ndim + 1, ndim + 1)
        """
        affines = np.asarray(affines, dtype=np.float64)
        if affines.shape[0] != len(self.tiles):
            raise ValueError(f"got {affines.shape[0]} affines for {len(self.tiles)} tiles")
        return replace(self, tiles=tuple(t.with_affine(a)
                                         for t, a in zip(self.tiles, affines, strict=True)))

    def with_positions(self, positions: np.ndarray) -> Layout:
        """A copy with each tile's translation replaced, shape (n_tiles, ndim), zyx."""
        affines = self.affines.copy()
        affines[:, :-1, -1] = np.asarray(positions, dtype=np.float64)
        return self.with_affines(affines)

    def rotated(self, degrees: float) -> Layout:
        """Rotate every tile about its own centre by ``degrees`` in the y-x plane.

        This models a camera mounted at an angle to the stage: the stage positions stay where they
        are and each tile's content turns about the tile's centre. Positive angles turn the image
        counter-clockwise as displayed (y down).
        """
        theta = np.deg2rad(degrees)
        c, s = np.cos(theta), np.sin(theta)
        rot = np.eye(self.ndim + 1)
        rot[-3:-1, -3:-1] = [[c, -s], [s, c]]  # acts on (y, x)
        affines = []
        for tile in self.tiles:
            centre = (np.asarray(tile.shape, dtype=np.float64) - 1) / 2
            to_centre, back = translation_affine(-centre), translation_affine(centre)
            affines.append(tile.affine @ back @ rot @ to_centre)
        return self.with_affines(np.stack(affines))
