"""The picture of a cycle alignment: every later cycle's tiles over cycle 1's mosaic.

One panel per later cycle (up to four in a row), each cycle 1's mosaic at low resolution with
that cycle's tile outlines where the alignment put them (cycle 1's mosaic frame), coloured by
the tile's correction on top of the cycle's global model (its residual: green 0 px, yellow
:data:`RESIDUAL_SCALE` / 2, red :data:`RESIDUAL_SCALE` px or more); tiles placed by the global
model alone (outliers, empty tiles) orange, dashed, with "M". Each panel's title gives the
cycle's rotation and offset; a legend strip below says what the colours mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from tilefuse.model.layout import Layout
from tilefuse.viz.preview import STAGE, dashed_line, fuse_small, ncc_colour, tile_corners

if TYPE_CHECKING:
    from PIL.Image import Image

    from tilefuse.registration.cycles import CycleAlignment

__all__ = ["RESIDUAL_SCALE", "cycle_picture", "residual_colour"]

RESIDUAL_SCALE = 4.0
"""Correction (px) drawn red; smaller ones from green (0 px) through yellow."""
_PER_ROW = 4


def residual_colour(residual: float | None) -> tuple[int, int, int]:
    """Green (0 px) -> yellow -> red (:data:`RESIDUAL_SCALE` px or more)."""
    if residual is None or not math.isfinite(residual):
        return ncc_colour(0.0)
    return ncc_colour(1.0 - min(residual / RESIDUAL_SCALE, 1.0))


def cycle_picture(reference: Layout, alignments: Sequence[CycleAlignment], *,
                  max_size: int = 1024) -> Image:
    """The picture (a PIL image, RGB) of cycles 2.. aligned to cycle 1.

    Parameters
    ----------
    reference : Layout
        Cycle 1 as fused (registered if it was): the background of every panel.
    alignments : sequence of CycleAlignment
        Cycles 2.., in cycle order.
    max_size : int
        Width of a row of panels in pixels (each panel at least 256).
    """
    from PIL import Image, ImageDraw, ImageFont

    from tilefuse.plan.geometry import output_box
    from tilefuse.viz.overview import contrast_stretch

    layouts = (reference, *(a.layout for a in alignments))
    corners = [tile_corners(t.affine, t.shape) for one in layouts for t in one.tiles]
    lo, hi = np.min([c.min(axis=0) for c in corners], axis=0), np.max(
        [c.max(axis=0) for c in corners], axis=0)
    panel_size = max(256, max_size // max(1, min(len(alignments), _PER_ROW)))
    image, fused_scale = fuse_small(reference, panel_size)
    scale = min(fused_scale, panel_size / float(np.max(hi - lo)))
    size = (math.ceil((hi[1] - lo[1]) * scale) + 1, math.ceil((hi[0] - lo[0]) * scale) + 1)
    background = Image.fromarray(contrast_stretch(image))
    ratio = scale / fused_scale
    background = background.resize((max(1, round(background.size[0] * ratio)),
                                    max(1, round(background.size[1] * ratio))),
                                   Image.Resampling.LANCZOS).convert("RGB")
    origin, _ = output_box(reference)
    at = np.round((np.asarray(origin, dtype=float) - 0.5 - lo) * scale).astype(int)
    font_size = max(10, min(panel_size // 30, 16))
    font = ImageFont.load_default(size=font_size)
    title = font_size + font_size // 2
    panels = []
    for one in alignments or ():
        panel = Image.new("RGB", (size[0], size[1] + title), (32, 32, 32))
        panel.paste(background, (int(at[1]), int(at[0]) + title))
        draw = ImageDraw.Draw(panel)
        _draw_cycle(draw, one, lo, scale, title, font)
        draw.text((4, 2), f"cycle {one.cycle}: {one.rotation_deg:+.2f} deg, offset "
                  f"y {one.offset[0]:+.1f} x {one.offset[1]:+.1f} px", fill=(255, 255, 255),
                  font=font)
        panels.append(panel)
    if not panels:
        panels = [background]
    return _legend(_grid(panels), font)


def _draw_cycle(draw, alignment: CycleAlignment, lo: np.ndarray, scale: float, top: int,
                font) -> None:
    """Outlines of one cycle's tiles, coloured by residual; model-placed tiles marked."""
    records = {r.index: r for r in alignment.tiles}
    width = max(1, round(draw.im.size[0] / 400))
    for i, tile in enumerate(alignment.layout.tiles):
        yx = (tile_corners(tile.affine, tile.shape) - lo) * scale
        points = [(float(x), float(y) + top) for y, x in yx]
        record = records.get(i)
        if record is not None and record.placed_by_model:
            for a, b in zip(points, points[1:] + points[:1], strict=True):
                dashed_line(draw, a, b, STAGE, width + 1)
            cx, cy = np.mean(points, axis=0)
            draw.text((cx, cy), "M", fill=STAGE, font=font, anchor="mm", stroke_width=2,
                      stroke_fill=(0, 0, 0))
            continue
        residual = (None if record is None
                    else float(np.linalg.norm(record.correction)))
        draw.polygon(points, outline=residual_colour(residual), width=width)


def _grid(panels: list) -> Image:
    """Panels in rows of up to four."""
    from PIL import Image

    w, h = max(p.size[0] for p in panels), max(p.size[1] for p in panels)
    cols = min(len(panels), _PER_ROW)
    rows = -(-len(panels) // cols)
    out = Image.new("RGB", (cols * w + (cols - 1) * 4, rows * h + (rows - 1) * 4), (0, 0, 0))
    for k, panel in enumerate(panels):
        out.paste(panel, ((k % cols) * (w + 4), (k // cols) * (h + 4)))
    return out


def _legend(picture, font) -> Image:
    """`picture` with a strip below: the residual ramp and the model-placed mark."""
    from PIL import Image, ImageDraw

    size = int(font.size)
    pad, key = size // 2, 3 * size
    texts = (f"tile correction 0 ... {RESIDUAL_SCALE:g} px (residual to the cycle's model)",
             "placed by the cycle's global model (M)")
    measure = ImageDraw.Draw(picture)
    width = max(picture.size[0],
                int(3 * pad + key + max(measure.textlength(t, font=font) for t in texts)))
    out = Image.new("RGB", (width, picture.size[1] + 2 * size + 3 * pad), (32, 32, 32))
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    rows = [picture.size[1] + pad + k * (size + pad) for k in range(2)]
    for k in range(key):
        draw.line([(pad + k, rows[0] + 2), (pad + k, rows[0] + size - 2)],
                  fill=residual_colour(RESIDUAL_SCALE * k / (key - 1)))
    dashed_line(draw, (pad, rows[1] + size / 2), (pad + key, rows[1] + size / 2), STAGE, 2,
            dash=size / 3)
    for row, text in zip(rows, texts, strict=True):
        draw.text((2 * pad + key, row), text, fill=(255, 255, 255), font=font)
    return out
