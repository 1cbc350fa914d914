"""Tile sources and header probing.

A source describes *how* to read one tile (a path and a series, or an in-memory array); it holds
no open file, so it can travel to any worker. Tiles are read through the per-process cache of
:mod:`tilefuse.io.tile_cache` (:func:`~tilefuse.io.tile_cache.read_tile`). A z-stack source
may read planes apart (``read_planes(start, stop)``): TIFF z-stacks of one page per plane,
plane files and arrays here, CZI and OME-Zarr tiles in their readers; a chunk of a 3D mosaic
then decodes only the planes it needs.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tilefuse.errors import InputError

__all__ = [
    "TIFF_SUFFIXES",
    "ArraySource",
    "FileSource",
    "PlaneStackSource",
    "TileHeader",
    "probe_tile",
]

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
"""File name endings read as TIFF (lower case): tiles, OME-TIFF layouts, calibration."""
MAX_TILE_BYTES = 4 * 2**30  # one decoded tile; beyond this a header is lying or a tile is a mosaic
_SPATIAL = "ZYX"
_CHANNEL = "CS"


@dataclass(frozen=True, slots=True)
class TileHeader:
    """What a tile file holds, learned without decoding its pixels.

    Attributes
    ----------
    shape : tuple of int
        Spatial shape, ``(y, x)`` or ``(z, y, x)``.
    dtype : numpy.dtype
    n_channels : int
        Channels stored in the file (3 for RGB).
    rgb : bool
        True when the channels are interleaved colour samples (RGB/RGBA).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    n_channels: int
    rgb: bool


def _is_tiff(path: str) -> bool:
    return path.lower().endswith(TIFF_SUFFIXES)


def _axes_to_layout(axes: str, shape: tuple[int, ...], path: str) -> tuple[list, list, list]:
    """Split tifffile axes into spatial, channel and squeezable axes, or refuse."""
    spatial, channel, squeeze = [], [], []
    stack = [a for a, n in zip(axes, shape, strict=True) if a in "QI" and n > 1]
    if "Z" not in axes and len(stack) == 1:  # a plain multi-page TIFF is a z-stack
        axes = axes.replace(stack[0], "Z")
    for i, (ax, n) in enumerate(zip(axes, shape, strict=True)):
        if ax in _SPATIAL:
            spatial.append(i)
        elif ax in _CHANNEL:
            channel.append(i)
        elif n == 1:
            squeeze.append(i)
        else:
            raise InputError(
                f"{path}: axis {ax!r} of size {n} (axes {axes}, shape {shape}) is not a tile axis; "
                "expected a 2D image, a z-stack or channels"
            )
    if len(channel) > 1:
        raise InputError(f"{path}: more than one channel axis in {axes} {shape}")
    return spatial, channel, squeeze


def probe_tile(path: str, series: int = 0) -> TileHeader:
    """Read a tile file's header: shape, dtype and channels, without decoding pixels.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    InputError
        The file is not a readable image, or its axes are not a tile's.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tile file not found: {path}")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file (0 bytes), expected an image")
    try:
        if _is_tiff(path):
            return _probe_tiff(path, series)
        return _probe_other(path)
    except InputError:
        raise
    except Exception as exc:  # decoders raise anything; the user needs the file name
        raise InputError(f"{path}: cannot read image header ({exc})") from exc


def _probe_tiff(path: str, series: int) -> TileHeader:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if series >= len(tif.series):
            raise InputError(f"{path}: has {len(tif.series)} series, series {series} requested")
        s = tif.series[series]
        axes, shape, dtype = s.axes, tuple(s.shape), np.dtype(s.dtype)
        _check_plausible(path, shape, dtype, s.pages[0] if s.pages else None)
    spatial, channel, _ = _axes_to_layout(axes, shape, path)
    sp_shape = tuple(shape[i] for i in spatial)
    if len(sp_shape) == 3 and sp_shape[0] == 1:
        sp_shape = sp_shape[1:]
    n_ch = shape[channel[0]] if channel else 1
    rgb = bool(channel) and axes[channel[0]] == "S"
    return TileHeader(sp_shape, dtype, n_ch, rgb)


def _check_plausible(path: str, shape: tuple, dtype: np.dtype, page) -> None:
    """Refuse a header whose pixels cannot be there, before anything is allocated."""
    nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if nbytes > MAX_TILE_BYTES:
        raise InputError(
            f"{path}: header claims {' x '.join(map(str, shape))} {dtype} "
            f"({nbytes / 2**30:.1f} GiB) for one tile; tiles up to "
            f"{MAX_TILE_BYTES // 2**30} GiB are read"
        )
    if page is None:
        return
    end = max((o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=True)),
              default=0)
    size = os.path.getsize(path)
    uncompressed = getattr(page, "compression", 1) == 1
    if end > size or (uncompressed and sum(page.databytecounts) < page.size * dtype.itemsize):
        raise InputError(
            f"{path}: truncated: its pixel data should reach byte {end} "
            f"({page.size * dtype.itemsize} bytes of pixels), the file has {size} bytes"
        )


def _probe_other(path: str) -> TileHeader:
    import imageio.v3 as iio

    props = iio.improps(path)
    shape = tuple(props.shape)
    if len(shape) == 3 and shape[-1] in (3, 4):
        return TileHeader(shape[:2], np.dtype(props.dtype), shape[-1], True)
    if len(shape) != 2:
        raise InputError(f"{path}: image of shape {shape}; expected (y, x) or (y, x, rgb)")
    return TileHeader(shape, np.dtype(props.dtype), 1, False)


def _decode(path: str, series: int, planes: tuple[int, int] | None = None
            ) -> np.ndarray | None:
    """Decode a tile file to ``(c, *spatial)``; with ``planes`` (``start, stop``), only those
    planes of a z-stack, ``(c, stop - start, y, x)``, or None where the file cannot be read
    in part (not a TIFF, or its planes are not one page each)."""
    if not _is_tiff(path):
        if planes is not None:
            return None
        import imageio.v3 as iio

        data = np.asarray(iio.imread(path))
        return np.moveaxis(data, -1, 0) if data.ndim == 3 else data[None]
    import tifffile

    with tifffile.TiffFile(path) as tif:
        s = tif.series[series]
        axes = s.axes
        if planes is None:
            data = s.asarray()
            spatial, channel, squeeze = _axes_to_layout(axes, data.shape, path)
        else:
            spatial, channel, squeeze = _axes_to_layout(axes, tuple(s.shape), path)
            if len(spatial) != 3:
                return None
            part = _read_pages(tif, series, s, spatial[0], planes)
            if part is None:
                return None
            data = part
    order = channel + spatial + squeeze
    data = np.transpose(data, order)
    data = data.reshape(data.shape[: len(channel) + len(spatial)])
    if not channel:
        data = data[None]
    if planes is None and data.ndim == 4 and data.shape[1] == 1:  # one plane: a 2D tile
        data = data[:, 0]
    return data


def _read_pages(tif, series: int, s, z_axis: int, planes: tuple[int, int]) -> np.ndarray | None:
    """Planes ``start:stop`` along axis ``z_axis`` of TIFF series ``s``, in the series' axes,
    read page by page; None unless every index of the axes before ``Y`` is one page."""
    shape, axes = tuple(s.shape), s.axes
    if "Y" not in axes:
        return None
    first = axes.index("Y")
    lead = shape[:first]
    if z_axis >= first or math.prod(lead) != len(s.pages):
        return None
    ranges = [range(n) for n in lead]
    ranges[z_axis] = range(*planes)
    keys = [int(np.ravel_multi_index(index, lead)) for index in itertools.product(*ranges)]
    data = np.asarray(tif.asarray(key=keys, series=series))
    return data.reshape(*(len(r) for r in ranges), *shape[first:])


@dataclass(frozen=True, slots=True)
class FileSource:
    """A tile stored in one or more image files.

    Attributes
    ----------
    paths : tuple of str
        One file holding all channels, or one file per channel (in channel order).
    series : int
        TIFF series (multi-series OME-TIFF); 0 otherwise.
    channels : tuple of int or None
        Which stored channels to keep, in output order; None keeps them all.
    same_channels : bool
        The file stores RGB with R = G = B and only the first is kept; reading checks that the
        dropped channels really are equal and refuses otherwise.
    """

    paths: tuple[str, ...]
    series: int = 0
    channels: tuple[int, ...] | None = None
    same_channels: bool = False

    @property
    def key(self) -> tuple:
        """What this tile is: its files, series and channels (stable across runs)."""
        return ("file", self.paths, self.series, self.channels)

    def stamp(self) -> tuple:
        """Size and modification time (ns) of each file now: changes when a file is rewritten."""
        return _file_stamps(self.paths)

    def read(self) -> np.ndarray:
        """Decode the tile, shape ``(c, *spatial)``."""
        parts = [self._read_one(p) for p in self.paths]
        return self._channels([p for p in parts if p is not None])

    def read_planes(self, start: int, stop: int) -> np.ndarray | None:
        """Decode planes ``start:stop`` of a z-stack, shape ``(c, stop - start, y, x)``; None
        when its files cannot be read in part (then :meth:`read` reads it whole)."""
        parts = [self._read_one(p, (start, stop)) for p in self.paths]
        if any(p is None for p in parts):
            return None
        return self._channels([p for p in parts if p is not None])

    def _channels(self, parts: list[np.ndarray]) -> np.ndarray:
        data = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        if self.same_channels and not all(np.array_equal(data[0], ch) for ch in data[1:]):
            raise InputError(
                f"{self.paths[0]}: colour channels differ, but the first tile of the layout "
                "was grey stored as RGB; fuse colour tiles as channels (all tiles colour)"
            )
        if self.channels is not None:
            data = data[list(self.channels)]
        return data

    def _read_one(self, path: str, planes: tuple[int, int] | None = None) -> np.ndarray | None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tile file not found: {path}")
        try:
            return _decode(path, self.series, planes)
        except (InputError, FileNotFoundError):
            raise
        except Exception as exc:
            raise InputError(f"{path}: cannot decode image ({exc})") from exc


@dataclass(frozen=True, slots=True)
class PlaneStackSource:
    """A z-stack stored one file per plane (``{z}`` in a pattern), read as one 3D tile.

    Attributes
    ----------
    planes : tuple of tuple of str
        ``planes[k]`` holds the file(s) of plane ``k`` in z order: one file, or one per channel.
    channels : tuple of int or None
        Which stored channels to keep, as in :class:`FileSource`.
    same_channels : bool
        Grey stored as RGB, as in :class:`FileSource`.
    templates : tuple of str
        The plane files' path with ``{z}`` where the plane number goes (one per channel file);
        what a layout file writes for this tile, read back by globbing the planes.
    """

    planes: tuple[tuple[str, ...], ...]
    channels: tuple[int, ...] | None = None
    same_channels: bool = False
    templates: tuple[str, ...] = ()

    @property
    def key(self) -> tuple:
        """What this tile is: its plane files and channels (stable across runs)."""
        return ("planes", self.planes, self.channels)

    def stamp(self) -> tuple:
        """Size and modification time (ns) of every plane file now."""
        return _file_stamps([p for plane in self.planes for p in plane])

    @property
    def paths(self) -> tuple[str, ...]:
        """What a layout file names for this tile: the ``{z}`` templates, else plane 0's files."""
        return self.templates or self.planes[0]

    def read(self) -> np.ndarray:
        """Decode and stack the planes, shape ``(c, z, y, x)``.

        Raises
        ------
        InputError
            A plane file holds a z-stack, or differs in shape or dtype from plane 0 (named).
        """
        return self.read_planes(0, len(self.planes))

    def read_planes(self, start: int, stop: int) -> np.ndarray:
        """Decode and stack planes ``start:stop``, shape ``(c, stop - start, y, x)``; every
        plane is checked against plane 0's shape and dtype (:meth:`_plane_zero`: decoded once
        per process when it is not among them, not once per window)."""
        first = self._plane(0) if start == 0 else None
        shape, dtype = (first.shape, first.dtype) if first is not None else self._plane_zero()
        out = np.empty((shape[0], stop - start, *shape[1:]), dtype=dtype)
        for k in range(start, stop):
            plane = first if k == 0 and first is not None else self._plane(k)
            if plane.shape != shape or plane.dtype != dtype:
                raise InputError(
                    f"{self.planes[k][0]}: plane {k} is {_describe(plane)}, but plane 0 "
                    f"({self.planes[0][0]}) is {_describe_as(shape, dtype)}; every plane of a "
                    "tile needs the same shape and dtype"
                )
            out[:, k - start] = plane
        return out

    def _plane_zero(self) -> tuple[tuple[int, ...], np.dtype]:
        """Plane 0's shape ``(c, y, x)`` and dtype, remembered per process while its files are
        unchanged (a window of planes 1000..1064 then decodes 64 planes, not 65; a window of
        one plane one, not two)."""
        key = (self.planes[0], self.channels, self.same_channels,
               _file_stamps(list(self.planes[0])))
        found = _PLANE_ZERO.get(key)
        if found is None:
            plane = self._plane(0)
            found = _PLANE_ZERO[key] = (plane.shape, plane.dtype)
        return found

    def _plane(self, k: int) -> np.ndarray:
        data = FileSource(self.planes[k], 0, self.channels, self.same_channels).read()
        if data.ndim != 3:
            raise InputError(
                f"{self.planes[k][0]}: holds a z-stack {data.shape[1:]}; with {{z}} each file "
                "must hold one plane (drop {z} from the pattern to read stacks)"
            )
        return data


def _file_stamps(paths) -> tuple:
    """``(size, mtime_ns)`` per file, ``None`` for one that is missing (reading names it)."""
    stamps: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def _describe(data: np.ndarray) -> str:
    """``"64 x 80 uint16"`` for a ``(c, y, x)`` plane."""
    return _describe_as(data.shape, data.dtype)


def _describe_as(shape: tuple[int, ...], dtype: np.dtype) -> str:
    return " x ".join(map(str, shape[1:])) + f" {dtype}"


_PLANE_ZERO: dict[tuple, tuple[tuple[int, ...], np.dtype]] = {}
"""Plane 0's shape and dtype per plane-file z-stack (and the state of its files), for
:meth:`PlaneStackSource.read_planes`: a few bytes per tile."""


def _new_token() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True, eq=False)
class ArraySource:
    """A tile held in memory (numpy) or lazily (dask, or any array-like), shape ``(c, *spatial)``.

    Attributes
    ----------
    array : array-like, shape (c, *spatial)
        Never modified, its flags included.
    ident : int
        The tile's index in its layout (for messages).
    token : str
        Drawn when the source is made and kept when it is pickled to a worker: the cache key
        of these pixels. Two sources never share one, even when a freed array's ``id()`` is
        reused by a new one.
    """

    array: object
    ident: int = 0
    token: str = field(default_factory=_new_token)

    @property
    def key(self) -> tuple:
        return ("array", self.token, self.ident)

    def read(self) -> np.ndarray:
        return _materialise(self.array)

    def read_planes(self, start: int, stop: int) -> np.ndarray | None:
        """Planes ``start:stop`` of a ``(c, z, y, x)`` array (only those are computed, for a
        lazy one); None for an array of other dimensions."""
        if len(getattr(self.array, "shape", ())) != 4:
            return None
        return _materialise(self.array[:, start:stop])  # type: ignore[index]


def _materialise(data) -> np.ndarray:
    """A numpy array of an array-like (a dask array computed on this thread)."""
    if hasattr(data, "compute"):
        data = data.compute(scheduler="sync")
    return np.asarray(data)


def resolve(path: str, base: str | Path | None) -> str:
    """Resolve a tile path written in a layout file against that file's folder."""
    p = Path(path)
    if not p.is_absolute() and base is not None:
        p = Path(base) / p
    return str(p)
