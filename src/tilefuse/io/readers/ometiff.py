"""OME-TIFF acquisitions whose OME-XML says where each tile was (stage positions).

Two shapes are read:

- one OME-TIFF holding many images (series), one per tile;
- several OME-TIFF files, one image (tile) each.

Each image needs ``Pixels PhysicalSizeX/Y`` (``Z`` for z-stacks) and a stage position: the
first ``Plane``'s ``PositionX/PositionY(/PositionZ)`` or else the image's ``StageLabel X/Y(/Z)``.
Units follow the ``...Unit`` attributes (m, cm, mm, µm, nm; µm when absent). Stage positions are
divided by the pixel size; the origin is arbitrary (the smallest position becomes 0).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from tilefuse.errors import InputError
from tilefuse.io.readers.build import Entry, layout_from_entries
from tilefuse.io.readers.omexml import OmeImage, length_to_um, parse_ome_images
from tilefuse.model.layout import Layout, PixelSize, translation_affine

__all__ = ["length_to_um", "ome_pixel_size_um", "parse_ome_images", "read_ome_tiff",
           "stage_to_pixels"]

log = logging.getLogger(__name__)

_NO_POSITIONS_HINT = (
    "place the tiles with --pattern and --overlap, or with a TileConfiguration"
)


def stage_to_pixels(
    stage_um: np.ndarray,
    pixel_um: Sequence[float] | np.ndarray,
    *,
    flip_x: bool = False,
    flip_y: bool = False,
    swap_xy: bool = False,
) -> np.ndarray:
    """Stage positions to mosaic pixel positions, smallest at 0.

    Flips negate the stage axes as read (``flip_x``: stage x grows to the left of the image);
    ``swap_xy`` then exchanges them (stage x runs along image rows). Only then are positions
    divided by the pixel size.

    Parameters
    ----------
    stage_um : array, shape (n_tiles, 2) or (n_tiles, 3)
        Stage ``x, y(, z)`` of each tile in µm.
    pixel_um : sequence or array of float, length 2 or 3
        Pixel size ``x, y(, z)`` in µm, matching ``stage_um``'s columns.

    Returns
    -------
    numpy.ndarray, shape (n_tiles, 2) or (n_tiles, 3), float64
        Positions in pixels, zyx order (reversed columns).
    """
    s = np.array(stage_um, dtype=np.float64)
    if flip_x:
        s[:, 0] *= -1
    if flip_y:
        s[:, 1] *= -1
    if swap_xy:
        s[:, [0, 1]] = s[:, [1, 0]]
    px = s / np.asarray(pixel_um, dtype=np.float64)
    px -= px.min(axis=0)
    return px[:, ::-1]


def _read_images(path: str) -> list[OmeImage]:
    """The OME images of one file, each matched to its tifffile series by order."""
    import tifffile

    if not os.path.isfile(path):
        raise FileNotFoundError(f"OME-TIFF file not found: {path}")
    try:
        with tifffile.TiffFile(path) as tif:
            xml, n_series = tif.ome_metadata, len(tif.series)
    except Exception as exc:  # tifffile raises many types for non-TIFF input
        raise InputError(f"{path}: cannot read as TIFF ({exc})") from exc
    if not xml:
        raise InputError(f"{path}: no OME-XML metadata, so no stage positions; "
                         + _NO_POSITIONS_HINT)
    images = parse_ome_images(xml, path)
    if not images:
        raise InputError(f"{path}: the OME-XML describes no images")
    if len(images) != n_series:
        raise InputError(
            f"{path}: the OME-XML describes {len(images)} images but the file holds "
            f"{n_series} series; rewrite it as one OME-TIFF per tile or use a TileConfiguration"
        )
    return images


def _require(path: str, img: OmeImage, ndim: int) -> None:
    """Refuse an image without the stage position or pixel size needed to place it."""
    where = f"{path} image {img.series} ({img.name})"
    if img.stage_um[0] is None or img.stage_um[1] is None:
        legacy = (" (its OME 2008 StagePosition element has no defined unit)"
                  if img.legacy_stage else "")
        raise InputError(
            f"{where}: no stage position (Plane PositionX/PositionY or StageLabel){legacy}; "
            + _NO_POSITIONS_HINT
        )
    needed = "XYZ"[: 3 if ndim == 3 and img.stage_um[2] is not None else 2]
    for axis, size in zip(needed, img.pixel_um[: len(needed)], strict=True):
        if size is None or size <= 0:
            raise InputError(
                f"{where}: no positive Pixels PhysicalSize{axis} to turn stage positions into "
                f"pixels; {_NO_POSITIONS_HINT}"
            )


def _pixel_sizes(found: list[tuple[str, OmeImage]], ndim: int) -> np.ndarray:
    """The shared pixel size x, y(, z) in µm; tiles must agree."""
    sizes = np.array([[s if s is not None else 1.0 for s in img.pixel_um[:ndim]]
                      for _, img in found])
    if not np.allclose(sizes, sizes[0], rtol=1e-6, atol=0):
        bad = int(np.argmax(np.any(~np.isclose(sizes, sizes[0], rtol=1e-6, atol=0), axis=1)))
        path, img = found[bad]
        raise InputError(
            f"{path} image {img.series}: pixel size {sizes[bad].tolist()} µm differs from "
            f"{sizes[0].tolist()} µm of the first tile; tiles must share one pixel size"
        )
    return sizes[0]


def _names(paths: list[str]) -> tuple[list[str], str]:
    """Tile names relative to the files' common folder, and that folder (or the one file)."""
    if len(paths) == 1:
        return [os.path.basename(paths[0])], paths[0]
    common = os.path.commonpath([os.path.abspath(os.path.dirname(p)) for p in paths])
    return [os.path.relpath(os.path.abspath(p), common) for p in paths], common


def _as_paths(path_or_paths) -> list[str]:
    if isinstance(path_or_paths, str | os.PathLike):
        return [str(path_or_paths)]
    paths = [str(p) for p in path_or_paths]
    if not paths:
        raise InputError("no OME-TIFF files given; pass one file or a list of files")
    return paths


def read_ome_tiff(
    path_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    flip_x: bool = False,
    flip_y: bool = False,
    swap_xy: bool = False,
) -> Layout:
    """Read tiles placed by the stage positions in OME-TIFF metadata.

    Parameters
    ----------
    path_or_paths : path or sequence of paths
        One multi-image OME-TIFF (one series per tile), or one single-image OME-TIFF per tile.
    flip_x, flip_y : bool
        Stage x (y) grows to the left (upwards) of the image: negate it.
    swap_xy : bool
        Stage x runs along image rows (applied after the flips).

    Returns
    -------
    Layout
        One tile per OME image, ``FileSource((path,), series)``, reading ``(c, *shape)``;
        ``pixel_size`` (zyx, µm) and channel names from the OME-XML; ``metadata`` records the
        stage positions in µm as read.

    Raises
    ------
    InputError
        No OME-XML, a missing stage position or physical pixel size, unknown units, tiles of
        different pixel sizes, or inconsistent tiles.
    FileNotFoundError
        A file does not exist.
    """
    paths = _as_paths(path_or_paths)
    found = [(p, img) for p in paths for img in _read_images(p)]
    ndim = 3 if any(img.size_z > 1 for _, img in found) else 2
    for p, img in found:
        _require(p, img, ndim)
    stage = np.array([[v if v is not None else 0.0 for v in img.stage_um[:ndim]]
                      for _, img in found])
    pixel = _pixel_sizes(found, ndim)
    positions = stage_to_pixels(stage, pixel, flip_x=flip_x, flip_y=flip_y, swap_xy=swap_xy)
    names, origin = _names([p for p, _ in found])
    entries = [
        Entry(name, (p,), translation_affine(pos), img.series, f"{p} image {img.series}")
        for name, (p, img), pos in zip(names, found, positions, strict=True)
    ]
    source = "OME-XML" if ndim == 2 or all(img.pixel_um[2] for _, img in found) else (
        "OME-XML; PhysicalSizeZ not stated, 1 µm")
    layout = layout_from_entries(entries, ndim=ndim, origin=origin,
                                 pixel_size=PixelSize(pixel[::-1], source), unit="micrometer")
    channels = found[0][1].channels
    named = tuple(c for c in channels if c)
    if len(named) == len(channels) == len(layout.channels):  # every channel has a name
        layout = replace(layout, channels=named)
    metadata = {
        "reader": "ome-tiff", "stage_positions_um": stage.tolist(),
        "pixel_size_um": pixel[::-1].tolist(), "flip_x": flip_x, "flip_y": flip_y,
        "swap_xy": swap_xy,
    }
    return replace(layout, metadata=metadata)


def ome_pixel_size_um(path: str | os.PathLike, ndim: int) -> tuple[float, ...] | None:
    """Pixel size (zyx, µm) of an OME-TIFF's first image, or None when it does not say.

    Parameters
    ----------
    path : path
    ndim : int
        2 for ``(y, x)``, 3 for ``(z, y, x)``.
    """
    try:
        images = _read_images(str(Path(path)))
    except (InputError, FileNotFoundError):
        return None
    size = images[0].pixel_um[:ndim]
    stated = tuple(s for s in size if s is not None and s > 0)
    if len(stated) != len(size):
        return None
    return stated[::-1]
