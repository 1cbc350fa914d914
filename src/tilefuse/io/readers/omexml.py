"""OME-XML: the images of an OME-TIFF file, their pixel sizes and stage positions, with
lengths converted to micrometres. No tile or layout logic: readers build on it."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from tilefuse.errors import InputError
from tilefuse.io.readers.text import finite_number

__all__ = ["OmeImage", "length_to_um", "parse_ome_images"]

log = logging.getLogger(__name__)


_UM_PER_UNIT = {
    "m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0,
    "micrometer": 1.0, "nm": 1e-3, "pm": 1e-6, "Å": 1e-4, "reference frame": 1.0,
}


def length_to_um(value: float, unit: str, where: str) -> float:
    """Convert a length to micrometres; ``unit`` is an OME unit symbol (m, mm, µm, um, nm...)."""
    factor = _UM_PER_UNIT.get(unit.strip())
    if factor is None:
        raise InputError(f"{where}: unknown length unit {unit!r}; expected m, mm, µm or nm")
    return value * factor


@dataclass(frozen=True, slots=True)
class OmeImage:
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
    text = None if elem is None else elem.get(attr)
    if elem is None or text is None:
        return None
    value = finite_number(text, where, attr)
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


def parse_image(image: ET.Element, series: int, where: str) -> OmeImage:
    """What one OME ``Image`` says about its tile (sizes in µm, stage position).

    Raises
    ------
    InputError
        No Pixels, or a count (SizeZ, TheZ...) that is not a whole number.
    """
    try:
        return _parse_image(image, series, where)
    except ValueError as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{where}: malformed OME-XML count ({exc})") from None


def _parse_image(image: ET.Element, series: int, where: str) -> OmeImage:
    pixels = image.find("{*}Pixels")
    if pixels is None:
        raise InputError(f"{where}: OME Image without Pixels")
    plane = _first_plane(pixels)
    size = tuple(_length(pixels, f"PhysicalSize{a}", where) for a in "XYZ")
    legacy = plane is not None and plane.find("{*}StagePosition") is not None
    channels = tuple(c.get("Name") for c in pixels.findall("{*}Channel"))
    return OmeImage(image.get("Name") or f"image {series}", series,
                     int(pixels.get("SizeZ", "1")), size, _stage(image, plane, where), legacy,
                     channels)


def parse_ome_images(xml: str, path: str) -> list[OmeImage]:
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
    return [parse_image(im, i, f"{path} image {i}") for i, im in enumerate(images)]
