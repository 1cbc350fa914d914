"""The OME-XML of a tilefuse OME-TIFF: axes, pixel sizes and unit, channels, plane positions,
and the marks that make the file tilefuse's (``Creator`` and the run manifest annotation)."""

from __future__ import annotations

import json

import numpy as np
import tifffile

from tilefuse import __version__
from tilefuse.errors import InputError
from tilefuse.io.outputs import TIFF_MANIFEST_NAMESPACE
from tilefuse.model.mosaic import SPATIAL_AXES, Mosaic
from tilefuse.ome_zarr._metadata import channel_specs

__all__ = ["OME_DTYPES", "ome_unit", "ome_xml"]

# OME-NGFF (UDUNITS-2) space unit -> OME UnitsLength symbol.
_OME_UNITS = {
    "angstrom": "Å", "attometer": "am", "centimeter": "cm", "decimeter": "dm",
    "exameter": "Em", "femtometer": "fm", "foot": "ft", "gigameter": "Gm", "hectometer": "hm",
    "inch": "in", "kilometer": "km", "megameter": "Mm", "meter": "m", "micrometer": "µm",
    "mile": "mi", "millimeter": "mm", "nanometer": "nm", "parsec": "pc", "petameter": "Pm",
    "picometer": "pm", "terameter": "Tm", "yard": "yd", "yoctometer": "ym",
    "yottameter": "Ym", "zeptometer": "zm", "zettameter": "Zm",
}

OME_DTYPES = ("uint8", "uint16", "uint32", "int8", "int16", "int32", "float32", "float64")
"""Pixel types an OME-TIFF holds (OME ``PixelType`` but bit and complex)."""


def ome_unit(unit: str) -> str:
    """The OME ``UnitsLength`` symbol of an OME-NGFF space unit (``"micrometer"`` -> ``"µm"``)."""
    try:
        return _OME_UNITS[unit]
    except KeyError:
        raise InputError(f"unit {unit!r} has no OME-XML symbol") from None


def _color(hex_rgb: str) -> int:
    """OME ``Color``: RGBA packed in a signed 32-bit int, from ``RRGGBB`` (opaque)."""
    value = (int(hex_rgb, 16) << 8) | 0xFF
    return value - (1 << 32) if value >= 1 << 31 else value


def ome_xml(mosaic: Mosaic, name: str, manifest: dict) -> str:
    """The OME-XML of `mosaic` stored as planes of (y, x) in the C order of its leading axes.

    Parameters
    ----------
    mosaic : Mosaic
        Axes, shape ``([t,] [c,] [z,] y, x)``, dtype, pixel size and unit, channel names and
        colours, origin (the first plane's ``PositionX/Y/Z``, in `unit`).
    name : str
        The OME ``Image`` name.
    manifest : dict
        The run manifest (JSON-able, with key ``tilefuse``), stored as a ``CommentAnnotation``.

    Returns
    -------
    str
        OME-XML (2016-06 schema) with ``Creator="tilefuse VERSION"``, one ``Image`` whose
        ``Pixels`` have ``DimensionOrder="XYZCT"`` and one ``TiffData`` covering every plane.
    """
    axes, shape = mosaic.axes, mosaic.shape
    unit = ome_unit(mosaic.unit)
    sizes = dict(zip(mosaic.spatial_axes, mosaic.pixel_size, strict=True))
    origin = dict(zip(mosaic.spatial_axes, mosaic.origin, strict=True))
    channels = channel_specs(axes, shape, mosaic.channel_names, mosaic.channel_colors)
    lead = shape[:-2]
    n_planes = int(np.prod(lead, dtype=np.int64))
    plane: dict[str, list] = {}
    for axis in SPATIAL_AXES:
        if axis not in sizes:
            continue
        start = origin[axis] * sizes[axis]
        if axis == "z":
            zs = np.unravel_index(np.arange(n_planes), lead)[axes.index("z")] if lead else [0]
            values = [float(start + k * sizes["z"]) for k in zs]
        else:
            values = [float(start)] * n_planes
        plane[f"Position{axis.upper()}"] = values
        plane[f"Position{axis.upper()}Unit"] = [unit] * n_planes
    pixels: dict = {f"PhysicalSize{a.upper()}": float(s) for a, s in sizes.items()}
    pixels.update({f"PhysicalSize{a.upper()}Unit": unit for a in sizes})
    xml = tifffile.OmeXml(Creator=f"tilefuse {__version__}")
    stored = (n_planes, 1, 1, shape[-2], shape[-1], 1)
    xml.addimage(
        mosaic.dtype, shape, stored, axes="".join(axes).upper(), Name=name,
        Channel={"Name": [c[0] for c in channels], "Color": [_color(c[1]) for c in channels]},
        Plane=plane, CommentAnnotation={"Namespace": TIFF_MANIFEST_NAMESPACE,
                                        "Value": json.dumps(manifest, sort_keys=True)},
        **pixels)
    return xml.tostring(declaration=True)

