"""OME-NGFF metadata: axes, scale and translation of every level, channels (omero)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from tilefuse.errors import InputError
from tilefuse.model.mosaic import SPATIAL_AXES, check_axes

__all__ = ["channel_specs", "check_axes", "image_attrs", "spatial_origin", "spatial_sizes"]

log = logging.getLogger(__name__)


_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


_PALETTE = ("00FF00", "FF00FF", "00FFFF", "FFFF00", "FF0000", "0000FF", "FFFFFF")


_GREY = "FFFFFF"


_HEX = re.compile(r"^#?([0-9A-Fa-f]{6})$")


def spatial_sizes(axes: Sequence[str], pixel_size: Sequence[float] | None) -> dict[str, float]:
    """Map each spatial axis present to its physical pixel size."""
    spatial = [a for a in axes if a in SPATIAL_AXES]
    if pixel_size is None:
        pixel_size = [1.0] * len(spatial)
    sizes = [float(s) for s in pixel_size]
    if len(sizes) != len(spatial):
        raise InputError(
            f"pixel_size has {len(sizes)} values but there are {len(spatial)} spatial axes "
            f"{tuple(spatial)}"
        )
    if not all(math.isfinite(s) and s > 0 for s in sizes):
        raise InputError(f"pixel sizes must be finite and > 0, got {tuple(sizes)}")
    return dict(zip(spatial, sizes, strict=True))


def channel_specs(
    axes: Sequence[str],
    shape: Sequence[int],
    names: Sequence[str] | None,
    colors: Sequence[str] | None,
) -> list[tuple[str, str]]:
    """(label, RRGGBB colour) per channel; one grey channel when there is no c axis."""
    n = shape[axes.index("c")] if "c" in axes else 1
    if names is None:
        names = [f"Channel {i}" for i in range(n)]
    if colors is None:
        colors = [_GREY] if n == 1 else [_PALETTE[i % len(_PALETTE)] for i in range(n)]
    if len(names) != n or len(colors) != n:
        raise InputError(
            f"got {len(names)} channel names and {len(colors)} colours for {n} channel(s)"
        )
    hexes = []
    for color in colors:
        match = _HEX.match(str(color))
        if match is None:
            raise InputError(f"channel colour {color!r} is not a hex RRGGBB value")
        hexes.append(match.group(1).upper())
    return list(zip((str(s) for s in names), hexes, strict=True))


def spatial_origin(axes: Sequence[str], origin: Sequence[float] | None) -> dict[str, float]:
    """Map each spatial axis present to the pixel position of the mosaic's first pixel."""
    spatial = [a for a in axes if a in SPATIAL_AXES]
    values = [0.0] * len(spatial) if origin is None else [float(v) for v in origin]
    if len(values) != len(spatial) or not all(math.isfinite(v) for v in values):
        raise InputError(f"origin {tuple(values)} must give one finite value per spatial axis "
                         f"{tuple(spatial)}")
    return dict(zip(spatial, values, strict=True))


def image_attrs(
    axes: Sequence[str],
    sizes: dict[str, float],
    origin: dict[str, float],
    unit: str,
    n_levels: int,
    version: str,
    channels: list[tuple[str, str]],
    lo: np.ndarray | None,
    hi: np.ndarray | None,
    name: str,
) -> dict[str, Any]:
    """Group attributes: ``{"ome": {...}}`` for 0.5, top-level keys for 0.4."""
    multiscale: dict[str, Any] = {
        "name": name,
        "axes": [_axis_meta(a, unit) for a in axes],
        "datasets": [
            {"path": str(k),
             "coordinateTransformations": [_scale(axes, sizes, k),
                                           _translation(axes, sizes, origin, k)]}
            for k in range(n_levels)
        ],
        "type": "mean",
        "metadata": {"description": "2x2 mean in y and x of the previous level"},
    }
    omero = {"channels": _omero_channels(channels, lo, hi)}
    if version == "0.4":
        multiscale["version"] = "0.4"
        return {"multiscales": [multiscale], "omero": {"version": "0.4", **omero}}
    return {"ome": {"version": "0.5", "multiscales": [multiscale], "omero": omero}}


def _axis_meta(axis: str, unit: str) -> dict[str, str]:
    """NGFF axis entry; space axes carry `unit`."""
    meta = {"name": axis, "type": _AXIS_TYPES[axis]}
    if meta["type"] == "space":
        meta["unit"] = unit
    return meta


def _scale(axes: Sequence[str], sizes: dict[str, float], level: int) -> dict[str, Any]:
    """Scale transform of `level`: y and x double per level, other axes unchanged."""
    factor = {"y": 2.0**level, "x": 2.0**level}
    return {
        "type": "scale",
        "scale": [sizes.get(a, 1.0) * factor.get(a, 1.0) for a in axes],
    }


def _translation(axes: Sequence[str], sizes: dict[str, float], origin: dict[str, float],
                 level: int) -> dict[str, Any]:
    """Translation of `level`: the physical position of its first pixel's centre.

    A pixel of level k averages 2^k x 2^k pixels of level 0, so its centre sits
    (2^k - 1) / 2 level-0 pixels after theirs in y and x; every level starts at the mosaic's
    origin.
    """
    shift = {"y": (2.0**level - 1) / 2, "x": (2.0**level - 1) / 2}
    return {
        "type": "translation",
        "translation": [(origin.get(a, 0.0) + shift.get(a, 0.0)) * sizes.get(a, 1.0)
                        if a in sizes else 0.0 for a in axes],
    }


def _omero_channels(
    channels: list[tuple[str, str]], lo: np.ndarray | None, hi: np.ndarray | None
) -> list[dict[str, Any]]:
    """omero channel entries, display window = data range of the coarsest level."""
    out = []
    for i, (label, color) in enumerate(channels):
        vmin = float(lo[i]) if lo is not None and np.isfinite(lo[i]) else 0.0
        vmax = float(hi[i]) if hi is not None and np.isfinite(hi[i]) else 1.0
        out.append(
            {
                "label": label,
                "color": color,
                "active": True,
                "window": {"min": vmin, "max": vmax, "start": vmin, "end": vmax},
            }
        )
    return out
