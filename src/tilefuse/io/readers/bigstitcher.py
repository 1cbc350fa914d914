"""BigStitcher projects in and out: read a ``dataset.xml`` as a layout, write a registration back.

Reading maps SpimData onto tilefuse's model:

- view setups of one ``tile`` attribute are one tile; setups that differ only by ``channel`` are
  its channels (in channel-id order); time points become a
  :class:`~tilefuse.model.timeseries.TimeSeries`; one illumination and one angle are read (more
  are refused with one line: tilefuse does not fuse multi-view data);
- each view's composed registration (:mod:`tilefuse.bdv.spimdata`: x-pixel world units,
  calibration last) becomes the tile's affine on a mosaic grid whose pixel is the first setup's
  voxel (so z keeps its spacing); the pixel size is that voxel size;
- pixels come from the image loader: TIFF files (``spimreconstruction.filemap2``) or OME-Zarr
  (``bdv.multimg.zarr``, ``bdv.ome.zarr``), read lazily by path. N5 and HDF5 loaders are refused
  with one line (no well-kept Python reader is a dependency).

Writing back (:func:`write_registered_xml`) prepends one ``ViewTransform`` named
:data:`~tilefuse.bdv.REGISTRATION_NAME` per view that moves the view from where the file placed it
to where tilefuse registered it; everything else in the file is kept as it was.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from tilefuse.bdv.spimdata import (
    Setup,
    SpimDataXml,
    from_tilefuse,
    read_spimdata,
    to_tilefuse,
    world_scale,
)
from tilefuse.errors import InputError
from tilefuse.io.readers.omezarr import NgffImage, ZarrChannels, ZarrSource, open_ngff_image
from tilefuse.io.tiles import FileSource, probe_tile
from tilefuse.model.layout import DEFAULT_SOURCE, Layout, PixelSize, Tile, TileSource
from tilefuse.model.timeseries import TimeSeries
from tilefuse.model.units import check_unit

__all__ = ["BDV_SOURCE", "META_KEY", "read_bigstitcher", "write_registered_xml"]

log = logging.getLogger(__name__)

BDV_SOURCE = "BigStitcher XML"
"""``PixelSize.source`` of a pixel size read from a ``dataset.xml`` voxel size."""
META_KEY = "bigstitcher"
"""``Layout.metadata`` entry: the XML, time point, setups per tile and grid scale it came from."""
_FILEMAP = "spimreconstruction.filemap2"
_ZARR = ("bdv.multimg.zarr", "bdv.ome.zarr")


def _key(text: str) -> tuple:
    """Sort ids numerically when they are numbers."""
    return (0, int(text), "") if text.lstrip("-").isdigit() else (1, 0, text)


def _path(element, base: Path) -> Path:
    """A ``type="relative|absolute"`` path element resolved against `base`."""
    text = (element.text or "").strip() if element is not None else ""
    p = Path(text)
    return p if element.get("type") == "absolute" or p.is_absolute() else base / p


def _filemap(data: SpimDataXml) -> dict[tuple[str, str], tuple[str, int, int]]:
    """``(timepoint, setup)`` -> (file, series, channel in file) of a file-map loader."""
    assert data.loader is not None
    if (data.loader.findtext("ZGrouped") or "false").strip().lower() == "true":
        raise InputError(f"{data.path}: file-map loader with ZGrouped=true (one file per z "
                         "plane) is not read; resave the dataset as TIFF stacks or OME-Zarr")
    out = {}
    for m in data.loader.iter("FileMapping"):
        file = _path(m.find("file"), data.base)
        out[(m.get("timepoint", "0"), m.get("view_setup", ""))] = (
            str(file), int(m.get("series", 0)), int(m.get("channel", 0)))
    return out


def _zarr_images(data: SpimDataXml) -> dict[tuple[str, str], tuple[Path, tuple[int, ...]]]:
    """``(timepoint, setup)`` -> (OME-Zarr image, indices) of a zarr loader."""
    assert data.loader is not None
    container = data.loader.find("zarr")
    if data.loader_format == "bdv.ome.zarr":
        image = _path(data.loader.find("ome.zarr"), data.base)
        return {view: (image, ()) for view in data.views}
    if container is None:
        raise InputError(f"{data.path}: bdv.multimg.zarr loader without a <zarr> element")
    root = _path(container, data.base)
    out = {}
    for z in data.loader.iter("zgroup"):
        rel = z.get("path") or (z.findtext("path") or "").strip()
        tp = z.get("timepoint", z.get("tp", "0"))
        indices = tuple(int(v) for v in (z.get("indicies") or "").split())
        out[(tp, z.get("setup", ""))] = (root / rel, indices)
    return out


def _ordinal(ids: list[str], value: str) -> int:
    return sorted(set(ids), key=_key).index(value)


def _zarr_source(data: SpimDataXml, image: NgffImage, indices: tuple[int, ...], tp: str,
                 setup: Setup, *, all_channels: bool) -> ZarrSource:
    """Level 0 of `image`, at the view's time point and channel (or all channels) where it has
    t or c axes."""
    if any(indices):
        raise InputError(f"{data.path}: setup {setup.id}: zgroup indicies {indices} are not "
                         "read (only images whose extra axes are selected by time point and "
                         "channel)")
    dims = dict(zip(image.axes, image.shape, strict=True))
    times = [t for t, _ in data.views]
    channels = [s.attributes.get("channel", "0") for s in data.setups.values()]
    t = _ordinal(times, tp) if dims.get("t", 1) > 1 else 0
    c = _ordinal(channels, setup.attributes.get("channel", "0")) if dims.get("c", 1) > 1 else 0
    plane = all(s.size[2] == 1 for s in data.setups.values())  # the layout is 2D
    return image.source(t, None if all_channels or "c" not in dims else c, plane=plane)


def _check_views(data: SpimDataXml) -> None:
    """One illumination and one angle; every view has a setup."""
    for kind in ("illumination", "angle"):
        ids = sorted({s.attributes.get(kind, "0") for s in data.setups.values()}, key=_key)
        if len(ids) > 1:
            raise InputError(
                f"{data.path}: {len(ids)} {kind}s ({', '.join(ids)}); tilefuse fuses one "
                f"{kind} of a tiled acquisition (split the dataset per {kind} in BigStitcher)")
    for tp, setup in data.views:
        if setup not in data.setups:
            raise InputError(f"{data.path}: ViewRegistration timepoint {tp} setup {setup} "
                             "names no ViewSetup")


def _grid_scale(data: SpimDataXml, first: Setup) -> np.ndarray:
    """World units per mosaic pixel, ``xyz``: the first setup's voxel in world units (its voxel
    ratios times the median world length of an x step over all views)."""
    x_step = float(np.median([world_scale(m)[0] for m in data.views.values()]))
    voxel = np.asarray(first.voxel_size, dtype=np.float64)
    return voxel / voxel[0] * x_step


def read_bigstitcher(path: str | os.PathLike) -> Layout | TimeSeries:
    """Read a BigStitcher ``dataset.xml`` as tiles placed by their registrations.

    Parameters
    ----------
    path : str or path-like
        The XML; its images are TIFF files (file-map loader) or OME-Zarr.

    Returns
    -------
    Layout or TimeSeries
        One tile per ``tile`` attribute (channels from its setups), affines from the composed
        registrations, pixel size from the voxel size; a time series (positions shared when
        every time point places every tile alike) with more than one time point. 2D when
        every setup is one plane thick.

    Raises
    ------
    FileNotFoundError
        The XML or an image file is missing.
    InputError
        An image loader tilefuse does not read (named), several illuminations or angles,
        channels of a tile stored unlike each other, or image files that disagree with the XML.
    """
    data = read_spimdata(path)
    where = str(data.path)
    if not data.views:
        raise InputError(f"{where}: no ViewRegistrations: nothing to place")
    _check_views(data)
    fmt = data.loader_format
    if fmt != _FILEMAP and fmt not in _ZARR:
        raise InputError(
            f"{where}: image loader {fmt!r} is not read by tilefuse (it reads TIFF files, "
            f"{_FILEMAP}, and OME-Zarr, {' or '.join(_ZARR)}); resave the dataset as TIFF or "
            "OME-Zarr in BigStitcher")
    used = sorted({s for _, s in data.views}, key=_key)
    tiles: dict[str, list[Setup]] = {}
    for sid in used:
        setup = data.setups[sid]
        tiles.setdefault(setup.attributes.get("tile", sid), []).append(setup)
    for group in tiles.values():
        group.sort(key=lambda s: _key(s.attributes.get("channel", "0")))
    first = data.setups[used[0]]
    ndim = 2 if all(data.setups[s].size[2] == 1 for s in used) else 3
    scale = _grid_scale(data, first)
    channels = tuple(data.names.get(("channel", s.attributes.get("channel", "0")),
                                    s.attributes.get("channel", "0"))
                     for s in next(iter(tiles.values())))
    times = sorted({t for t, _ in data.views}, key=_key)
    files = _filemap(data) if fmt == _FILEMAP else {}
    zarrs = _zarr_images(data) if fmt in _ZARR else {}
    images: dict[Path, NgffImage] = {}
    layouts = []
    for tp in times:
        made = []
        for tile_id, group in tiles.items():
            views = [(tp, s.id) for s in group]
            missing = [s for v, s in zip(views, group, strict=True) if v not in data.views]
            if missing:
                if len(missing) == len(group):
                    continue  # a missing view: the tile is absent at this time point
                raise InputError(f"{where}: tile {tile_id} lacks channel setup(s) "
                                 f"{', '.join(s.id for s in missing)} at time point {tp}")
            affine = to_tilefuse(data.views[views[0]], scale)
            for view in views[1:]:
                if not np.allclose(to_tilefuse(data.views[view], scale), affine, atol=1e-6):
                    log.warning("%s: tile %s: channel setups are registered differently; the "
                                "first channel's registration places all of them", where,
                                tile_id)
                    break
            source, dtype = _source(data, tp, group, files, zarrs, images)
            shape = tuple(reversed(group[0].size))
            if ndim == 2:
                affine, shape = affine[1:, 1:], shape[1:]
            name = data.names.get(("tile", tile_id), "") or f"tile {tile_id}"
            name = name if len(times) == 1 else f"{name} t{tp}"
            made.append((Tile(name, shape, affine, source), dtype, [s.id for s in group]))
        if not made:
            continue
        dtypes = {str(d) for _, d, _ in made}
        if len(dtypes) > 1:
            raise InputError(f"{where}: tiles mix dtypes {sorted(dtypes)} at time point {tp}")
        layouts.append(_layout(data, tp, made, channels, first, ndim, scale))
    if len(layouts) == 1:
        return layouts[0]
    shared = all(len(a.tiles) == len(layouts[0].tiles) and np.allclose(a.affines,
                                                                        layouts[0].affines)
                 for a in layouts[1:])
    return TimeSeries(tuple(layouts), tuple(times), shared=shared)


def _layout(data: SpimDataXml, tp: str, made: list, channels: tuple[str, ...], first: Setup,
            ndim: int, scale: np.ndarray) -> Layout:
    try:
        unit = check_unit(first.unit)
        size = PixelSize(tuple(reversed(first.voxel_size))[-ndim:], BDV_SOURCE)
    except InputError:
        log.warning("%s: voxel unit %r is not a length; pixel size left at the default",
                    data.path, first.unit)
        unit, size = "micrometer", PixelSize((1.0,) * ndim, DEFAULT_SOURCE)
    meta = {"xml": str(data.path), "timepoint": tp, "setups": [ids for _, _, ids in made],
            "scale": [float(v) for v in scale]}
    return Layout(tuple(t for t, _, _ in made), made[0][1], channels, size, unit,
                  origin=str(data.path), metadata={META_KEY: meta})


def _source(data: SpimDataXml, tp: str, group: list[Setup], files: dict, zarrs: dict,
            images: dict) -> tuple[TileSource, np.dtype]:
    """How to read one tile (all its channels) at time point `tp`, and its dtype."""
    if files:
        mapped = []
        for s in group:
            if (tp, s.id) not in files:
                raise InputError(f"{data.path}: no FileMapping for setup {s.id} time point {tp}")
            mapped.append(files[(tp, s.id)])
        paths = tuple(dict.fromkeys(m[0] for m in mapped))
        if len({m[1] for m in mapped}) != 1:
            raise InputError(f"{data.path}: channels of setup {group[0].id} are in different "
                             "series of their files; tilefuse reads one series per tile")
        if len(paths) == 1:
            channels: tuple[int, ...] | None = tuple(m[2] for m in mapped)
        elif len(paths) == len(mapped) and all(m[2] == 0 for m in mapped):
            channels = None  # one file per channel
        else:
            raise InputError(f"{data.path}: channels of setup {group[0].id} are stored unlike "
                             "each other (some in one file, some apart); not read")
        header = probe_tile(paths[0], mapped[0][1])
        want = tuple(reversed(group[0].size))
        got = header.shape if len(header.shape) == 3 else (1, *header.shape)
        if got != want:
            raise InputError(f"{paths[0]}: image is {' x '.join(map(str, got))} (z y x), but "
                             f"{data.path} gives setup {group[0].id} size "
                             f"{' x '.join(map(str, want))}")
        return FileSource(paths, mapped[0][1], channels), header.dtype
    opened = []
    for s in group:
        path, indices = zarrs.get((tp, s.id), (None, ()))
        if path is None:
            raise InputError(f"{data.path}: no zgroup for setup {s.id} time point {tp}")
        if path not in images:
            images[path] = open_ngff_image(path)
        opened.append((images[path], indices))
    image, indices = opened[0]
    want = tuple(reversed(group[0].size))
    got = tuple(dict(zip(image.axes, image.shape, strict=True)).get(a, 1) for a in "zyx")
    if got != want:
        raise InputError(f"{image.path}: image is {' x '.join(map(str, got))} (z y x), but "
                         f"{data.path} gives setup {group[0].id} size "
                         f"{' x '.join(map(str, want))}")
    if len({img.path for img, _ in opened}) > 1:  # one image per channel (BigStitcher-Spark)
        if len({(img.dtype, img.spatial(img.shape)) for img, _ in opened}) > 1:
            raise InputError(f"{data.path}: the channel images of setup {group[0].id} differ "
                             "in shape or dtype")
        return ZarrChannels(tuple(_zarr_source(data, img, ind, tp, s, all_channels=False)
                                  for (img, ind), s in zip(opened, group, strict=True))
                            ), image.dtype
    n_channels = dict(zip(image.axes, image.shape, strict=True)).get("c", 1)
    if len(group) > 1 and n_channels != len(group):
        raise InputError(f"{image.path}: holds {n_channels} channel(s), {data.path} names "
                         f"{len(group)} for its tile")
    return (_zarr_source(data, image, indices, tp, group[0], all_channels=len(group) > 1),
            image.dtype)


def write_registered_xml(layout: Layout | TimeSeries, out: str | os.PathLike) -> Path:
    """Write the ``dataset.xml`` `layout` was read from to `out`, with one ``ViewTransform``
    prepended per view that moves it to the tile's affine in `layout` (BigStitcher's units).

    Raises
    ------
    InputError
        `layout` was not read from a BigStitcher XML, or `out` is that XML.
    """
    from tilefuse.bdv.write import REGISTRATION_NAME, prepend_transforms

    layouts = layout.layouts if isinstance(layout, TimeSeries) else (layout,)
    metas: list[dict[str, Any]] = [one.metadata.get(META_KEY) or {} for one in layouts]
    if not all(metas):
        raise InputError(f"-o {out}: a BigStitcher XML is written only for a layout read from "
                         "one; save the layout as .txt or .csv")
    source = Path(metas[0]["xml"])
    data = read_spimdata(source)
    transforms: dict[tuple[str, str], np.ndarray] = {}
    for one, meta in zip(layouts, metas, strict=True):
        scale = np.asarray(meta["scale"])
        for tile, setups in zip(one.tiles, meta["setups"], strict=True):
            old = data.views[(meta["timepoint"], setups[0])]
            wanted = np.asarray(tile.affine)
            if tile.ndim == 2:  # the z row and column stay as the file had them
                full = to_tilefuse(old, scale)
                full[1:, 1:] = wanted
                wanted = full
            move = from_tilefuse(wanted, scale) @ np.linalg.inv(old)
            for setup in setups:
                transforms[(meta["timepoint"], setup)] = move
    return prepend_transforms(source, out, transforms, REGISTRATION_NAME)

