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
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tilefuse.errors import InputError
from tilefuse.io.readers.build import Entry, layout_from_entries
from tilefuse.io.readers.text import finite_number
from tilefuse.model.layout import Layout, PixelSize, translation_affine

__all__ = ["length_to_um", "ome_pixel_size_um", "parse_ome_images", "read_ome_tiff",
           "stage_to_pixels"]

log = logging.getLogger(__name__)

_UM_PER_UNIT = {
    "m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0,
    "micrometer": 1.0, "nm": 1e-3, "pm": 1e-6, "Å": 1e-4, "reference frame": 1.0,
}
_NO_POSITIONS_HINT = (
    "place the tiles with --pattern and --overlap, or with a TileConfiguration"
)


def length_to_um(value: float, unit: str, where: str) -> float:
    """Convert a length to micrometres; ``unit`` is an OME unit symbol (m, mm, µm, um, nm...)."""
    factor = _UM_PER_UNIT.get(unit.strip())
    if factor is None:
        raise InputError(f"{where}: unknown length unit {unit!r}; expected m, mm, µm or nm")
    return value * factor


def stage_to_pixels(
    stage_um: np.ndarray,
    pixel_um: Sequence[float],
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
    pixel_um : sequence of float, length 2 or 3
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


@dataclass(frozen=True, slots=True)
class _OmeImage:
    """What one OME ``Image`` says about a tile (lengths in µm, ``None`` when absent)."""

    name: str
    series: int
    size_z: int
    pixel_um: tuple[float | None, float | None, float | None]  # x, y, z
    stage_um: tuple[float | None, float | None, float | None]  # x, y, z
    legacy_stage: bool
    channels: tuple[str | None, ...]


def _length(elem: ET.Element | None, attr: str, where: str, unit_attr: str | None = None):
    """An OME length attribute in µm, or None when absent."""
    if elem is None or elem.get(attr) is None:
        return None
    value = finite_number(elem.get(attr), where, attr)
    unit = elem.get(unit_attr or f"{attr}Unit", "µm")
    if unit.strip() == "reference frame":
        log.warning("%s: %s is in 'reference frame' units; assuming micrometres", where, attr)
    return length_to_um(value, unit, where)


def _first_plane(pixels: ET.Element) -> ET.Element | None:
    planes = pixels.findall("{*}Plane")
    key = lambda p: tuple(int(p.get(a, "0")) for a in ("TheT", "TheZ", "TheC"))  # noqa: E731
    return min(planes, key=key) if planes else None


def _stage(image: ET.Element, plane: ET.Element | None, where: str) -> tuple:
    """Stage x, y, z in µm from the first Plane, else from StageLabel."""
    xyz = tuple(_length(plane, f"Position{a}", where) for a in "XYZ")
    if xyz[0] is not None and xyz[1] is not None:
        return xyz
    label = image.find("{*}StageLabel")
    return tuple(_length(label, a, where, f"{a}Unit") for a in "XYZ")


def _parse_image(image: ET.Element, series: int, where: str) -> _OmeImage:
    pixels = image.find("{*}Pixels")
    if pixels is None:
        raise InputError(f"{where}: OME Image without Pixels")
    plane = _first_plane(pixels)
    size = tuple(_length(pixels, f"PhysicalSize{a}", where) for a in "XYZ")
    legacy = plane is not None and plane.find("{*}StagePosition") is not None
    channels = tuple(c.get("Name") for c in pixels.findall("{*}Channel"))
    return _OmeImage(image.get("Name") or f"image {series}", series,
                     int(pixels.get("SizeZ", "1")), size, _stage(image, plane, where), legacy,
                     channels)


def parse_ome_images(xml: str, path: str) -> list[_OmeImage]:
    """What each OME ``Image`` of an OME-XML document says about its tile, in document order.

    Raises
    ------
    InputError
        Malformed XML, an Image without Pixels, a length in an unknown unit.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise InputError(f"{path}: malformed OME-XML ({exc})") from None
    images = root.findall("{*}Image")
    return [_parse_image(im, i, f"{path} image {i}") for i, im in enumerate(images)]


def _read_images(path: str) -> list[_OmeImage]:
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


def _require(path: str, img: _OmeImage, ndim: int) -> None:
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
    for axis, size in zip(needed, img.pixel_um):
        if size is None or size <= 0:
            raise InputError(
                f"{where}: no positive Pixels PhysicalSize{axis} to turn stage positions into "
                f"pixels; {_NO_POSITIONS_HINT}"
            )


def _pixel_sizes(found: list[tuple[str, _OmeImage]], ndim: int) -> np.ndarray:
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
        for name, (p, img), pos in zip(names, found, positions)
    ]
    source = "OME-XML" if ndim == 2 or all(img.pixel_um[2] for _, img in found) else (
        "OME-XML; PhysicalSizeZ not stated, 1 µm")
    layout = layout_from_entries(entries, ndim=ndim, origin=origin,
                                 pixel_size=PixelSize(pixel[::-1], source), unit="micrometer")
    channels = found[0][1].channels
    if len(channels) == len(layout.channels) and all(channels):
        layout = replace(layout, channels=channels)
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
    if any(s is None or s <= 0 for s in size):
        return None
    return tuple(size[::-1])
