"""OME-Zarr tiles in: a folder (or a text list) of OME-Zarr images, each placed by its NGFF
``coordinateTransformations`` (``scale`` + ``translation``), NGFF 0.4 (zarr v2) and 0.5 (zarr v3).

Each image is one tile, read at level 0 (the first dataset of its first multiscale). Its level-0
``scale`` is its pixel size and its ``translation`` the physical position of its first pixel; the
mosaic grid is the first tile's pixel size, so a tile at ``translation / scale`` lands on that
pixel index. Reading stays lazy: a :class:`ZarrSource` names the array by path and opens it when
the tile is read (in any worker). An HCS plate (``plate`` metadata) reads the fields of its
wells as tiles.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tilefuse.errors import InputError
from tilefuse.model.layout import DEFAULT_SOURCE, Layout, PixelSize, Tile, translation_affine
from tilefuse.model.timeseries import TimeSeries
from tilefuse.model.units import check_unit

__all__ = ["NGFF_SOURCE", "NgffImage", "ZarrChannels", "ZarrSource", "is_ngff_image",
           "is_zarr_array", "layout_from_zarr_entries", "open_ngff_image", "read_omezarr_tiles",
           "zarr_source"]

log = logging.getLogger(__name__)

NGFF_SOURCE = "OME-Zarr metadata"
"""``PixelSize.source`` of a pixel size read from NGFF ``scale`` transformations."""
_SPATIAL = ("z", "y", "x")


@dataclass(frozen=True, slots=True)
class ZarrSource:
    """A tile stored as one zarr array (level 0 of an OME-Zarr image), read lazily.

    Attributes
    ----------
    path : str
        The zarr array's folder (``image.ome.zarr/0``).
    index : tuple of int or None
        Per array axis: the index kept (a time point, a channel) or None for an axis read whole.
    channel_axis : bool
        Whether one of the axes read whole is the channel axis (it comes first); else a channel
        axis of size 1 is added.
    series : int
        The time point kept (0 without a ``t`` axis): what a saved layout writes as the
        tile's series, so that :func:`zarr_source` reads the same pixels back.
    """

    path: str
    index: tuple[int | None, ...]
    channel_axis: bool = False
    series: int = 0

    @property
    def key(self) -> tuple:
        """What this tile is: its array and the indices kept (stable across runs)."""
        return ("zarr", self.path, self.index)

    @property
    def paths(self) -> tuple[str, ...]:
        """The array folder (inputs are never written; resume digests its metadata file)."""
        return (self.path,)

    def stamp(self) -> tuple:
        """Size and modification time of the array's metadata file (changes on a rewrite)."""
        for name in ("zarr.json", ".zarray"):
            try:
                st = os.stat(os.path.join(self.path, name))
            except OSError:
                continue
            return ((st.st_size, st.st_mtime_ns),)
        return (None,)

    def read(self) -> np.ndarray:
        """Decode the tile, shape ``(c, *spatial)``."""
        return self._read(tuple(slice(None) if i is None else i for i in self.index))

    def read_planes(self, start: int, stop: int) -> np.ndarray | None:
        """Decode planes ``start:stop`` of a z-stack, shape ``(c, stop - start, y, x)`` (only
        the zarr chunks holding them); None for a 2D tile."""
        whole = [k for k, i in enumerate(self.index) if i is None]
        if len(whole) != 3 + int(self.channel_axis):
            return None
        z = whole[int(self.channel_axis)]
        return self._read(tuple(slice(start, stop) if k == z else slice(None) if i is None
                                else i for k, i in enumerate(self.index)))

    def _read(self, selection: tuple) -> np.ndarray:
        import zarr

        try:
            array = zarr.open_array(self.path, mode="r")
        except FileNotFoundError:
            raise
        except Exception as exc:  # zarr raises many kinds; the user needs the path
            raise InputError(f"{self.path}: cannot open zarr array ({exc})") from exc
        data = np.asarray(array[selection])
        return data if self.channel_axis else data[None]


@dataclass(frozen=True, slots=True)
class ZarrChannels:
    """A tile whose channels are separate zarr arrays (one OME-Zarr image per channel, as
    BigStitcher-Spark and AIND datasets store them), read lazily and stacked.

    Attributes
    ----------
    sources : tuple of ZarrSource
        One per channel, in channel order; each reads as ``(1, *spatial)``.
    """

    sources: tuple[ZarrSource, ...]

    @property
    def key(self) -> tuple:
        """What this tile is: its channels' keys."""
        return ("zarr channels", tuple(s.key for s in self.sources))

    @property
    def paths(self) -> tuple[str, ...]:
        """Every channel's array folder."""
        return tuple(s.path for s in self.sources)

    @property
    def series(self) -> int:
        """The time point kept (see :attr:`ZarrSource.series`)."""
        return self.sources[0].series

    def stamp(self) -> tuple:
        """Every channel's stamp (:meth:`ZarrSource.stamp`)."""
        return tuple(s.stamp() for s in self.sources)

    def read(self) -> np.ndarray:
        """Decode and stack the channels, shape ``(c, *spatial)``.

        Raises
        ------
        InputError
            A channel differs in shape or dtype from the first (named).
        """
        return self._stack([s.read() for s in self.sources])

    def read_planes(self, start: int, stop: int) -> np.ndarray | None:
        """Decode and stack planes ``start:stop`` of every channel; None for 2D tiles."""
        parts = [s.read_planes(start, stop) for s in self.sources]
        if any(p is None for p in parts):
            return None
        return self._stack([p for p in parts if p is not None])

    def _stack(self, parts: list[np.ndarray]) -> np.ndarray:
        for source, part in zip(self.sources[1:], parts[1:], strict=True):
            if part.shape[1:] != parts[0].shape[1:] or part.dtype != parts[0].dtype:
                raise InputError(f"{source.path}: {part.shape[1:]} {part.dtype}, but the "
                                 f"tile's first channel {self.sources[0].path} is "
                                 f"{parts[0].shape[1:]} {parts[0].dtype}")
        return np.concatenate(parts, axis=0)


@dataclass(frozen=True, slots=True)
class NgffImage:
    """Level 0 of an OME-Zarr image, as its metadata states it.

    Attributes
    ----------
    path : str
        The image group's folder.
    array_path : str
        Level 0's array folder.
    axes : tuple of str
        Axis names in array order (``t c z y x`` or a subset).
    shape : tuple of int
        Level 0's shape, in array order.
    dtype : numpy.dtype
    scale, translation : tuple of float
        Level 0's transformations per axis (the multiscale's own, if any, applied after).
    unit : str or None
        The space axes' unit (NGFF name), if stated.
    channels : tuple of str
        Channel labels from ``omero`` metadata, if any.
    """

    path: str
    array_path: str
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: tuple[float, ...]
    translation: tuple[float, ...]
    unit: str | None
    channels: tuple[str, ...] = ()

    def spatial(self, values: tuple[float, ...]) -> tuple[float, ...]:
        """The entries of `values` (one per axis) for the spatial axes, zyx order."""
        return tuple(v for a, v in zip(self.axes, values, strict=True) if a in _SPATIAL)

    def source(self, time: int = 0, channel: int | None = None, *,
               plane: bool = False) -> ZarrSource:
        """A source reading time point `time` and `channel` (None: all channels); with `plane`,
        a z axis of one plane is dropped (a 2D tile)."""
        index: list[int | None] = []
        for axis, n in zip(self.axes, self.shape, strict=True):
            if axis == "z" and plane and n == 1:
                index.append(0)
                continue
            if axis == "t":
                if time >= n:
                    raise InputError(f"{self.path}: time point {time} requested, it has {n}")
                index.append(time)
            elif axis == "c" and channel is not None:
                if channel >= n:
                    raise InputError(f"{self.path}: channel {channel} requested, it has {n}")
                index.append(channel)
            elif axis in _SPATIAL or axis == "c":
                index.append(None)
            else:
                index.append(0)
        keeps_c = "c" in self.axes and channel is None
        return ZarrSource(self.array_path, tuple(index), keeps_c, time if "t" in self.axes else 0)


def is_zarr_array(path: str | os.PathLike) -> bool:
    """Whether `path` is a zarr array folder (v3 ``zarr.json`` of an array, or v2 ``.zarray``)."""
    folder = Path(path)
    if (folder / ".zarray").is_file():
        return True
    try:
        return json.loads((folder / "zarr.json").read_text()).get("node_type") == "array"
    except (OSError, ValueError):
        return False


def zarr_source(path: str, series: int, ndim: int, n_channels: int) -> ZarrSource:
    """The source a saved layout names: the zarr array `path` at time point `series`. Level 0
    of an OME-Zarr image is read by the image's axes (all channels); a bare array has its last
    `ndim` axes spatial, the axis before them of size `n_channels` the channels (when there is
    one), time point `series` on the first other axis longer than 1, every other axis one long.

    Raises
    ------
    InputError
        The array's leading axes cannot be told apart that way (named).
    """
    import zarr

    parent = Path(path).parent
    if is_ngff_image(parent):  # level 0 of an OME-Zarr image: its axes say which is which
        image = open_ngff_image(parent)
        if Path(image.array_path) == Path(path):
            return image.source(series, None, plane=ndim == 2)
    shape = tuple(zarr.open_array(path, mode="r").shape)
    lead = list(shape[: len(shape) - ndim])
    channel = max((i for i, n in enumerate(lead) if n == n_channels and n > 1), default=None)
    if channel is None and n_channels > 1:
        raise InputError(f"{path}: shape {shape} has no axis of {n_channels} channels")
    index: list[int | None] = [None] * len(shape)
    time_used = False
    for i, n in enumerate(lead):
        if i == channel:
            continue
        if n > 1 and not time_used:
            index[i], time_used = series, True
        elif n == 1:
            index[i] = 0
        else:
            raise InputError(f"{path}: shape {shape}: cannot tell which of its leading axes "
                             f"is time; give the tiles as OME-Zarr images instead")
    if series and not time_used:
        raise InputError(f"{path}: series {series} requested, the array {shape} has no time axis")
    return ZarrSource(path, tuple(index), channel is not None, series)


def _attrs(folder: Path) -> dict:
    """A zarr group's attributes: v3 ``zarr.json`` (``ome`` key unwrapped) or v2 ``.zattrs``."""
    v3 = folder / "zarr.json"
    if v3.is_file():
        attrs = json.loads(v3.read_text()).get("attributes", {})
        return {**attrs, **attrs.get("ome", {})}
    v2 = folder / ".zattrs"
    return json.loads(v2.read_text()) if v2.is_file() else {}


def is_ngff_image(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a zarr group with OME multiscales (or plate) metadata."""
    try:
        attrs = _attrs(Path(folder))
    except (OSError, ValueError):
        return False
    return "multiscales" in attrs or "plate" in attrs


def _transform(items: list, kind: str, n: int, default: float) -> tuple[float, ...]:
    for item in items or ():
        if item.get("type") == kind:
            values = item.get(kind)
            if values is None or len(values) != n:
                raise InputError(f"{kind} {values} does not give one value per axis ({n})")
            return tuple(float(v) for v in values)
    return (default,) * n


def open_ngff_image(folder: str | os.PathLike) -> NgffImage:
    """Read an OME-Zarr image's level-0 metadata (no pixels).

    Raises
    ------
    FileNotFoundError
        `folder` does not exist.
    InputError
        No multiscales metadata, or transformations that do not fit its axes.
    """
    import zarr

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"OME-Zarr image not found: {folder}")
    try:
        attrs = _attrs(folder)
        multiscale = attrs["multiscales"][0]
        names = tuple(a["name"] if isinstance(a, dict) else str(a) for a in multiscale["axes"])
        dataset = multiscale["datasets"][0]
        array_path = folder / dataset["path"]
        array = zarr.open_array(str(array_path), mode="r")
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise InputError(f"{folder}: not an OME-Zarr image (no usable multiscales metadata: "
                         f"{exc!r})") from exc
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{folder}: level 0 array missing ({exc})") from exc
    n = len(names)
    if array.ndim != n:
        raise InputError(f"{array_path}: {array.ndim}D array, but the axes are {names}")
    try:
        scale = _transform(dataset.get("coordinateTransformations"), "scale", n, 1.0)
        shift = _transform(dataset.get("coordinateTransformations"), "translation", n, 0.0)
        outer = multiscale.get("coordinateTransformations")
        outer_scale = _transform(outer, "scale", n, 1.0)
        outer_shift = _transform(outer, "translation", n, 0.0)
    except InputError as exc:
        raise InputError(f"{folder}: {exc}") from None
    scale = tuple(a * b for a, b in zip(scale, outer_scale, strict=True))
    shift = tuple(t * b + c for t, b, c in zip(shift, outer_scale, outer_shift, strict=True))
    units = {str(a["unit"]) for a in multiscale["axes"]
             if isinstance(a, dict) and a.get("name") in _SPATIAL and a.get("unit")}
    unit = check_unit(units.pop()) if len(units) == 1 else None
    labels = tuple(str(c.get("label", i)) for i, c in
                   enumerate(attrs.get("omero", {}).get("channels", [])))
    return NgffImage(str(folder), str(array_path), names, tuple(array.shape),
                     np.dtype(array.dtype), scale, shift, unit, labels)


def _images_of(folder: Path) -> list[Path]:
    """The images an input names: itself (an OME-Zarr image), an HCS plate's fields, the
    OME-Zarr images directly inside a folder, or (a text file) those it lists one per line."""
    attrs = _attrs(folder) if folder.is_dir() else {}
    if "multiscales" in attrs:  # one image: one tile
        return [folder]
    if "plate" in attrs:
        fields = []
        for well in attrs["plate"].get("wells", []):
            well_dir = folder / well["path"]
            for image in _attrs(well_dir).get("well", {}).get("images", []):
                fields.append(well_dir / image["path"])
        return fields
    if folder.is_file():
        lines = [line.strip() for line in folder.read_text().splitlines()]
        return [(folder.parent / line) for line in lines if line and not line.startswith("#")]
    return sorted(p for p in folder.iterdir() if p.is_dir() and is_ngff_image(p))


def read_omezarr_tiles(path: str | os.PathLike) -> Layout | TimeSeries:
    """Tiles from OME-Zarr images placed by their NGFF transformations.

    Parameters
    ----------
    path : str or path-like
        A folder of OME-Zarr images (each ``*.zarr`` with multiscales metadata), an HCS plate,
        one OME-Zarr image, or a text file listing image folders one per line (relative to
        the file).

    Returns
    -------
    Layout or TimeSeries
        A layout of one tile per image (zyx affines: level-0 ``scale`` relative to the first
        image's, ``translation / scale``), pixel size from the first image's ``scale``; a
        time series when the images have a ``t`` axis longer than 1.

    Raises
    ------
    InputError
        No images, images that disagree in axes, dtype or channels, or a missing spatial axis.
    """
    path = Path(path)
    images = [open_ngff_image(p) for p in _images_of(path)]
    if not images:
        raise InputError(f"{path}: no OME-Zarr images (folders with multiscales metadata) found")
    first = images[0]
    spatial = tuple(a for a in first.axes if a in _SPATIAL)
    if spatial[-2:] != ("y", "x"):
        raise InputError(f"{first.path}: axes {first.axes} lack y and x")
    for image in images[1:]:
        for what, a, b in (("axes", image.axes, first.axes), ("dtype", image.dtype, first.dtype)):
            if a != b:
                raise InputError(f"{image.path}: {what} {a}, but {first.path} has {b}; every "
                                 f"tile needs the same {what}")
        if dict(zip(image.axes, image.shape, strict=True)).get("c") != dict(
                zip(first.axes, first.shape, strict=True)).get("c"):
            raise InputError(f"{image.path}: channel count differs from {first.path}'s")
    size0 = np.asarray(first.spatial(first.scale))
    dims = dict(zip(first.axes, first.shape, strict=True))
    n_times = dims.get("t", 1)
    layouts = []
    for t in range(n_times):
        tiles = []
        for image in images:
            scale = np.asarray(image.spatial(image.scale)) / size0
            affine = translation_affine(np.asarray(image.spatial(image.translation)) / size0)
            affine[:-1, :-1] = np.diag(scale)
            shape = image.spatial(tuple(float(n) for n in image.shape))
            name = os.path.relpath(image.path, path if path.is_dir() else path.parent)
            tiles.append(Tile(name, tuple(int(n) for n in shape), affine,
                              image.source(t)))
        n_ch = dims.get("c", 1)
        names = first.channels if len(first.channels) == n_ch else tuple(map(str, range(n_ch)))
        unit = first.unit or "micrometer"
        source = NGFF_SOURCE if first.unit or np.any(size0 != 1) else DEFAULT_SOURCE
        layouts.append(Layout(tuple(tiles), first.dtype, names,
                              PixelSize(size0, source), unit, origin=str(path)))
    if n_times == 1:
        return layouts[0]
    return TimeSeries(tuple(layouts), tuple(map(str, range(n_times))), shared=True)


def layout_from_zarr_entries(entries: Sequence[Any], *, ndim: int, origin: str,
                             channel_names: Sequence[str] | None = None,
                             pixel_size: Sequence[float] | None = None,
                             unit: str = "micrometer") -> Layout:
    """A saved layout whose tiles are zarr arrays (OME-Zarr tiles fused before) as a Layout.

    Parameters
    ----------
    entries : sequence of :class:`~tilefuse.io.readers.build.Entry`
        Each names one array per channel file and its series (time point).
    ndim, origin, channel_names, pixel_size, unit
        As in :func:`~tilefuse.io.readers.build.layout_from_entries`.
    """
    import zarr

    n_channels = len(channel_names) if channel_names else 1
    tiles, dtypes, counts = [], set(), set()
    for e in entries:
        per_file = max(1, n_channels // len(e.paths))
        sources = [zarr_source(p, e.series, ndim, per_file) for p in e.paths]
        array = zarr.open_array(e.paths[0], mode="r")
        dtypes.add(np.dtype(array.dtype))
        counts.add(sum(array.shape[s.index.index(None)] if s.channel_axis else 1
                       for s in sources))
        name = e.label or (e.name if e.series == 0 else f"{e.name}#{e.series}")
        source = sources[0] if len(sources) == 1 else ZarrChannels(tuple(sources))
        tiles.append(Tile(name, tuple(array.shape[-ndim:]), e.affine, source))
    if len(dtypes) != 1:
        raise InputError(f"{origin}: zarr tiles mix dtypes {sorted(map(str, dtypes))}")
    if len(counts) != 1:
        raise InputError(f"{origin}: zarr tiles hold different channel counts {sorted(counts)}")
    count = counts.pop()
    names = tuple(channel_names) if channel_names else tuple(str(c) for c in range(count))
    return Layout(tuple(tiles), dtypes.pop(), names, pixel_size, unit, origin=origin)
