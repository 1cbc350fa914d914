"""One call from user options to a corrected layout: flat field, dark field, intensity matching."""

from __future__ import annotations

import os

import numpy as np

from tilefuse.errors import InputError
from tilefuse.intensity.apply import TileCorrection, corrected_layout, tile_corrections
from tilefuse.intensity.flatfield import estimate_flatfield
from tilefuse.intensity.flatfield_file import load_flatfield
from tilefuse.intensity.matching import match_intensity
from tilefuse.model.layout import Layout

__all__ = ["prepare_corrections"]

ESTIMATE = "estimate"


def _load_darkfield(path: str | os.PathLike, layout: Layout) -> np.ndarray:
    """A dark-field TIFF of the tile shape, as (c, y, x) float32."""
    import tifffile

    if not os.path.isfile(path):
        raise FileNotFoundError(f"dark field not found: {path}")
    try:
        field = tifffile.imread(path).astype(np.float32)
    except Exception as exc:
        raise InputError(f"{path}: cannot read a dark-field image ({exc})") from None
    field = field.reshape((-1, *field.shape[-2:]))[: len(layout.channels)]
    if field.shape[-2:] != layout.tiles[0].shape[-2:]:
        raise InputError(f"{path}: dark field of shape {field.shape[-2:]}, tiles are "
                         f"{layout.tiles[0].shape[-2:]}")
    return field


def prepare_corrections(
    layout: Layout,
    *,
    flatfield: str | os.PathLike | None = None,
    darkfield: str | os.PathLike | None = None,
    match: bool = False,
) -> Layout:
    """The layout whose tiles read flat-field corrected and intensity matched.

    Parameters
    ----------
    flatfield : "estimate", a path, or None
        Estimate the flat field from the tiles, or load one saved by
        :func:`~tilefuse.intensity.save_flatfield` (its dark field too, if it holds one).
    darkfield : "estimate", a path, or None
        Estimate a dark field with the flat field, or load a TIFF of the tile shape.
    match : bool
        Solve per-tile gains from the overlaps (after the flat/dark correction).

    Returns
    -------
    Layout
        ``layout`` itself when nothing is asked; otherwise its tiles wrapped in
        :class:`~tilefuse.intensity.CorrectedSource`, corrected once per worker.
    """
    flat = dark = None
    if darkfield == ESTIMATE and flatfield != ESTIMATE:
        raise InputError("--darkfield estimate goes with --flatfield estimate")
    if flatfield == ESTIMATE:
        flat, dark = estimate_flatfield(layout, darkfield=darkfield == ESTIMATE)
    elif flatfield is not None:
        flat, dark = load_flatfield(flatfield, layout)
    if darkfield is not None and darkfield != ESTIMATE:
        dark = _load_darkfield(darkfield, layout)
    gains = None
    if match:
        gains, _ = match_intensity(layout, corrections=TileCorrection(flat=flat, dark=dark))
    if flat is None and dark is None and gains is None:
        return layout
    corrections = tile_corrections(len(layout.tiles), flat=flat, dark=dark, gains=gains)
    return corrected_layout(layout, corrections)
