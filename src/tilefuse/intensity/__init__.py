"""Intensity correction: flat-field (vignetting), dark field, and per-tile gain/offset matching.

The estimates run once per acquisition, before fusion; the fusion kernel then applies a small
:class:`TileCorrection` to each tile right after reading it (:func:`correct_tile`).

Examples
--------
>>> from tilefuse.testing import grid_tileset
>>> ts = grid_tileset(grid=(2, 2), tile_shape=(64, 64), overlap=0.2, seed=0)
>>> flat, dark = estimate_flatfield(ts.layout)
>>> gains, offsets = match_intensity(ts.layout, corrections=TileCorrection(flat=flat))
>>> flat.shape, gains.shape, offsets is None
((1, 64, 64), (4, 1), True)
"""

from __future__ import annotations

from tilefuse.intensity.apply import (
    CorrectedSource,
    TileCorrection,
    correct_tile,
    corrected_layout,
    tile_corrections,
)
from tilefuse.intensity.flatfield import estimate_flatfield
from tilefuse.intensity.flatfield_file import load_flatfield, save_flatfield
from tilefuse.intensity.matching import match_intensity
from tilefuse.intensity.prepare import prepare_corrections

__all__ = [
    "CorrectedSource",
    "TileCorrection",
    "corrected_layout",
    "correct_tile",
    "estimate_flatfield",
    "load_flatfield",
    "match_intensity",
    "prepare_corrections",
    "save_flatfield",
    "tile_corrections",
]
