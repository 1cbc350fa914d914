"""The pixel size a tile file states, if any: OME-XML, ImageJ metadata, TIFF resolution tags.

Read in this order, the first that states a lateral (x, y) size wins:

1. **OME-XML** ``Pixels PhysicalSizeX/Y(/Z)`` of the tile's series (any unit OME names);
2. **ImageJ** metadata with a length ``unit=`` (``micron``, ``um``, ``µm``, ``nm``, ``mm``...):
   x and y are ``XResolution``/``YResolution`` (pixels per unit), z is ``spacing=``;
3. **TIFF resolution tags** with ``ResolutionUnit`` inch or centimetre *and* a microscope's pixel
   size (:data:`PLAUSIBLE_UM`). Writers that know nothing of calibration leave 1 pixel per inch,
   no unit, or a screen/print density (72-1200 dpi = 353-21 µm pixels); none of those is read
   as a calibration.

Sizes are returned in micrometres. A 3D tile whose file states no z spacing gets z = y, and the
source says so. Files that are not TIFF (PNG, JPEG) state nothing here.
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction

from tilefuse.io.tiles import TIFF_SUFFIXES
from tilefuse.model.layout import PixelSize

__all__ = ["PLAUSIBLE_UM", "stated_pixel_size"]

log = logging.getLogger(__name__)

PLAUSIBLE_UM = (1e-5, 20.0)
"""Pixel sizes (µm) trusted from bare TIFF resolution tags: 0.01 nm to 20 µm."""

_RESOLUTION_UM = {2: 25400, 3: 10000}  # ResolutionUnit inch, centimetre -> µm per unit
_IMAGEJ_UM: dict[str, int | Fraction] = {
    "micron": 1, "microns": 1, "um": 1, "µm": 1, "μm": 1, "\\u00b5m": 1, "micrometer": 1,
    "micrometre": 1, "nm": Fraction(1, 1000), "nanometer": Fraction(1, 1000),
    "mm": 1000, "millimeter": 1000, "cm": 10000, "centimeter": 10000, "m": 1000000,
    "meter": 1000000, "inch": 25400, "in": 25400,
}

Sizes = tuple[float | None, float, float]  # z (None: not stated), y, x in µm


def stated_pixel_size(path: str | os.PathLike, ndim: int, series: int = 0) -> PixelSize | None:
    """The pixel size (zyx, µm) a tile file states, or None when it states none.

    Parameters
    ----------
    path : path
        A tile file; only TIFF files (OME, ImageJ or plain) can state a size.
    ndim : int
        2 for ``(y, x)``, 3 for ``(z, y, x)``.
    series : int
        The TIFF series (image) of the tile.

    Returns
    -------
    PixelSize or None
        ``ndim`` sizes in µm with their source (``"OME-XML"``, ``"ImageJ metadata"``, ``"TIFF
        resolution tags"``); None when the file is not a TIFF, cannot be read, or states no
        plausible calibration.
    """
    path = str(path)
    if not path.lower().endswith(TIFF_SUFFIXES) or not os.path.isfile(path):
        return None
    try:
        found = _probe(path, series)
    except Exception as exc:  # an unreadable header is reported by the tile probe, not here
        log.debug("%s: no calibration read (%s)", path, exc)
        return None
    if found is None:
        return None
    (z, y, x), source = found
    if ndim == 2:
        return PixelSize((y, x), source)
    if z is None:
        z, source = y, f"{source}; z spacing not stated, taken equal to y"
    return PixelSize((z, y, x), source)


def _probe(path: str, series: int) -> tuple[Sizes, str] | None:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if tif.is_ome and (sizes := _from_ome(tif.ome_metadata, path, series)):
            return sizes, "OME-XML"
        series_pages = tif.series[series].pages if series < len(tif.series) else None
        page = series_pages[0] if series_pages else tif.pages[0]
        if tif.is_imagej and (sizes := _from_imagej(tif.imagej_metadata or {}, page)):
            return sizes, "ImageJ metadata"
        if sizes := _from_resolution(page, path):
            return sizes, "TIFF resolution tags"
    return None


def _from_ome(xml: str | None, path: str, series: int) -> Sizes | None:
    from tilefuse.io.readers.omexml import parse_ome_images

    if not xml:
        return None
    images = parse_ome_images(xml, path)
    if series >= len(images):
        return None
    x, y, z = images[series].pixel_um
    if x is None or y is None or x <= 0 or y <= 0:
        return None
    return (z if z is not None and z > 0 else None), y, x


def _per_unit(page, tag: str) -> Fraction | None:
    """A resolution tag as pixels per unit, or None when absent or not positive."""
    value = page.tags.get(tag)
    if value is None:
        return None
    num, den = value.value
    return Fraction(num, den) if num > 0 and den > 0 else None


def _from_imagej(meta: dict, page) -> Sizes | None:
    unit = str(meta.get("unit", "")).strip().lower()
    um = _IMAGEJ_UM.get(unit)
    if um is None:  # no unit, "pixel", or one that is not a length
        return None
    x_res, y_res = _per_unit(page, "XResolution"), _per_unit(page, "YResolution")
    x = float(um / x_res) if x_res else float(um)
    y = float(um / y_res) if y_res else x
    try:
        spacing = float(meta["spacing"]) * float(um)
    except (KeyError, TypeError, ValueError):
        spacing = None
    z = spacing if spacing is not None and spacing > 0 else None
    return z, y, x


def _from_resolution(page, path: str) -> Sizes | None:
    unit_tag = page.tags.get("ResolutionUnit")
    um = _RESOLUTION_UM.get(int(unit_tag.value)) if unit_tag is not None else None
    x_res, y_res = _per_unit(page, "XResolution"), _per_unit(page, "YResolution")
    if um is None or x_res is None or y_res is None:
        return None
    x, y = float(um / x_res), float(um / y_res)
    low, high = PLAUSIBLE_UM
    if not (low <= x <= high and low <= y <= high):
        log.debug("%s: resolution tags say %g x %g µm pixels; not a microscope's, ignored",
                  path, x, y)
        return None
    return None, y, x
