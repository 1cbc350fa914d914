"""Pictures to judge a stitch by eye: the mosaic at screen size with tile outlines and numbers,
and, given a registration report, the links coloured by NCC and the fall-backs marked.

- From an OME-Zarr image: the pyramid level that fits, outlines from the layout saved beside it.
- From a layout: a fast low-resolution fusion (each tile block-averaged first), outlines exact.

Colours: tile outlines cyan, tiles placed by their stage position or the model orange (and
"S" after their label); accepted links from red (NCC 0) through yellow to green (NCC 1);
rejected links red, dashed, with a cross. With a report, a legend strip below says so. Tiles
are labelled by file name where it fits, else by index in the layout.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tilefuse.model.layout import Layout, translation_affine

__all__ = [
    "OUTLINE",
    "REJECTED",
    "STAGE",
    "dashed_line",
    "fuse_small",
    "ncc_colour",
    "preview_image",
    "tile_corners",
    "write_preview",
]

OUTLINE = (0, 255, 255)
STAGE = (255, 140, 0)
REJECTED = (255, 0, 0)


def ncc_colour(ncc: float | None) -> tuple[int, int, int]:
    """Red (NCC <= 0) -> yellow (0.5) -> green (1) for accepted links."""
    v = 0.0 if ncc is None or not math.isfinite(ncc) else min(max(ncc, 0.0), 1.0)
    return (255, int(510 * v), 0) if v < 0.5 else (int(510 * (1 - v)), 255, 0)


def _is_ome_zarr(path: Path) -> bool:
    return path.is_dir() and ((path / "zarr.json").exists() or (path / ".zattrs").exists())


def _sidecar_layout(zarr_path: Path) -> Layout | None:
    """The layout saved beside an image (of a time series, its first time point)."""
    from tilefuse.io.outputs import image_stem

    csv = zarr_path.with_name(image_stem(zarr_path) + ".layout.csv")
    return _one_layout(csv) if csv.exists() else None


def _one_layout(path: str | os.PathLike, **options: object) -> Layout:
    """The layout at `path`; of a time series, its first time point."""
    from tilefuse.io.readers import read_layout
    from tilefuse.model.timeseries import TimeSeries

    read = read_layout(path, **options)
    return read.at_time(0) if isinstance(read, TimeSeries) else read


def _downsample(tile: np.ndarray, f: int) -> np.ndarray:
    """Block mean by ``f`` of a (c, [z,] y, x) tile; z-stacks are max-projected first."""
    if tile.ndim == 4:
        tile = tile.max(axis=1)
    c, h, w = tile.shape
    h2, w2 = max(h // f, 1), max(w // f, 1)
    cut = tile[:, : h2 * f, : w2 * f].astype(np.float32)
    return cut.reshape(c, h2, min(f, h), w2, min(f, w)).mean(axis=(2, 4))


def _yx_affine(affine: np.ndarray) -> np.ndarray:
    """The (y, x) part of a 2D or 3D affine, shape (3, 3)."""
    return affine if affine.shape == (3, 3) else affine[np.ix_([1, 2, 3], [1, 2, 3])]


def _scaled_affine(affine: np.ndarray, f: int) -> np.ndarray:
    """Affine from a tile downsampled by ``f`` to the mosaic downsampled by ``f``."""
    scale = np.diag([float(f), float(f), 1.0])
    return np.linalg.inv(scale) @ affine @ scale @ translation_affine([(f - 1) / 2] * 2)


def fuse_small(layout: Layout, max_size: int) -> tuple[np.ndarray, float]:
    """Low-resolution fusion of a layout; returns the (y, x) image and its scale (< 1)."""
    from tilefuse.fusion.direct import fuse_in_memory
    from tilefuse.fusion.graph import plan_fusion
    from tilefuse.io.readers.memory import layout_from_arrays
    from tilefuse.io.tile_cache import read_tile
    from tilefuse.plan.geometry import output_box

    _, shape = output_box(layout)
    f = max(1, math.ceil(max(shape[-2:]) / max_size))
    tiles = [_downsample(read_tile(t.source), f) for t in layout.tiles]
    affines = np.stack([_scaled_affine(_yx_affine(t.affine), f) for t in layout.tiles])
    small = layout_from_arrays(tiles, affines=affines)
    # small by construction: in threads, without dask; the numpy kernel (numba's ~0.5 s load
    # would cost more than the few megapixels it fuses)
    image = fuse_in_memory(plan_fusion(small, chunk=4096, dtype="float32", backend="numpy"))
    return (image[0] if image.ndim == 3 else image), 1.0 / f


def tile_corners(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Tile corners (pixel edges) in mosaic (y, x), shape (4, 2), clockwise."""
    h, w = shape[-2:]
    pts = np.array([[-0.5, -0.5], [-0.5, w - 0.5], [h - 0.5, w - 0.5], [h - 0.5, -0.5]])
    a = _yx_affine(affine)
    return pts @ a[:2, :2].T + a[:2, 2]


def _to_canvas(yx: np.ndarray, origin: np.ndarray, scale: float) -> list[tuple[float, float]]:
    """Mosaic (y, x) -> picture (x, y) pixel coordinates."""
    p = (np.asarray(yx, dtype=float) - origin + 0.5) * scale - 0.5
    return [(float(x), float(y)) for y, x in np.atleast_2d(p)]


def _report_dict(report) -> dict | None:
    if report is None:
        return None
    if isinstance(report, str | os.PathLike):
        import json

        return json.loads(Path(report).read_text())
    return report if isinstance(report, dict) else report.to_dict()


def dashed_line(draw, a, b, colour, width: int, dash: float = 6.0) -> None:
    """A dashed line from canvas point ``a`` to ``b`` (x, y), dashes ``dash`` pixels long."""
    (x0, y0), (x1, y1) = a, b
    length = math.hypot(x1 - x0, y1 - y0)
    steps = max(int(length // dash), 1)
    for k in range(0, steps, 2):
        t0, t1 = k / steps, min((k + 1) / steps, 1.0)
        draw.line([(x0 + (x1 - x0) * t0, y0 + (y1 - y0) * t0),
                   (x0 + (x1 - x0) * t1, y0 + (y1 - y0) * t1)], fill=colour, width=width)


def _draw_links(draw, report: dict, centres: list, width: int) -> None:
    for link in report.get("links", []):
        i, j = link["tiles"]
        a, b = centres[i], centres[j]
        if link.get("accepted"):
            draw.line([a, b], fill=ncc_colour(link.get("ncc")), width=width)
        else:
            dashed_line(draw, a, b, REJECTED, max(1, width - 1))
            mx, my = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2
            r = 2 + width
            draw.line([(mx - r, my - r), (mx + r, my + r)], fill=REJECTED, width=width)
            draw.line([(mx - r, my + r), (mx + r, my - r)], fill=REJECTED, width=width)


def _draw_layout(image, layout: Layout, origin, scale: float, report: dict | None) -> None:
    from PIL import ImageDraw, ImageFont

    draw = ImageDraw.Draw(image)
    width = max(1, round(min(image.size) / 400))
    font = ImageFont.load_default(size=max(10, min(image.size) // 40))
    stage = {t["index"] for t in (report or {}).get("tiles", []) if t.get("placed_by") == "stage"}
    centres, corners_of = [], []
    for i, tile in enumerate(layout.tiles):
        corners = _to_canvas(tile_corners(tile.affine, tile.shape), origin, scale)
        draw.polygon(corners, outline=STAGE if i in stage else OUTLINE, width=width)
        centres.append(tuple(np.mean(corners, axis=0)))
        corners_of.append(corners)
    if report:
        _draw_links(draw, report, centres, width + 1)
    for i, (cx, cy) in enumerate(centres):
        label = _tile_label(draw, font, layout.tiles[i].name, i, _tile_width(corners_of[i]))
        draw.text((cx, cy), f"{label} S" if i in stage else label, fill=(255, 255, 255),
                  font=font, anchor="mm", stroke_width=2, stroke_fill=(0, 0, 0))


def _tile_width(corners: list[tuple[float, float]]) -> float:
    """Width in the picture of a tile's outline (x extent of its corners)."""
    xs = [x for x, _ in corners]
    return max(xs) - min(xs)


def _tile_label(draw, font, name: str, index: int, room: float) -> str:
    """The tile's file name (without folder and extension) where it fits in `room` pixels, else
    its index in the layout."""
    stem = Path(name).name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".png", ".czi"):
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem if stem and draw.textlength(stem, font=font) <= 0.9 * room else str(index)


def _legend_height(font_size: int) -> int:
    """Pixels the legend strip takes below the picture: three lines."""
    return 3 * font_size + 4 * (font_size // 2)


def _legend(picture, font_size: int):
    """`picture` with a legend strip below it: what link colours, dashes and orange mean (as
    wide as the picture, or as the legend's text when the picture is narrower)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=font_size)
    pad, white = font_size // 2, (255, 255, 255)
    key = 3 * font_size  # the width of each line's sample: ramp, dash, box
    texts = ("link NCC 0 ... 1 (accepted)", "rejected link", "placed by stage/model (S)")
    measure = ImageDraw.Draw(picture)
    width = max(picture.size[0],
                int(2 * pad + key + pad + max(measure.textlength(t, font=font) for t in texts)))
    out = Image.new("RGB", (width, picture.size[1] + _legend_height(font_size)), (32, 32, 32))
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    rows = [picture.size[1] + pad + k * (font_size + pad) for k in range(3)]
    for k in range(key):  # NCC 0 -> 1
        draw.line([(pad + k, rows[0] + 2), (pad + k, rows[0] + font_size - 2)],
                  fill=ncc_colour(k / (key - 1)))
    middle = rows[1] + font_size / 2
    dashed_line(draw, (pad, middle), (pad + key, middle), REJECTED, 2, dash=font_size / 3)
    draw.rectangle([pad, rows[2] + 1, pad + key, rows[2] + font_size - 1], outline=STAGE,
                   width=2)
    for row, text in zip(rows, texts, strict=True):
        draw.text((2 * pad + key, row), text, fill=white, font=font)
    return out


def preview_image(
    source: str | os.PathLike | Layout,
    *,
    max_size: int = 1024,
    report=None,
    layout_options: dict | None = None,
):
    """The preview picture (a PIL image, RGB).

    Parameters
    ----------
    source : path or Layout
        A fused OME-Zarr image, a layout file/folder (read with ``layout_options``; of a time
        series, its first time point), or a Layout.
    max_size : int
        Longest side of the picture in pixels (the legend included).
    report : RegistrationReport, dict or path to its JSON, optional
        Draw its links and mark tiles placed by stage position, with a legend below the
        picture. Its tile indices must be those of the layout drawn.
    """
    from PIL import Image

    from tilefuse.plan.geometry import output_box
    from tilefuse.viz.overview import contrast_stretch, screen_image

    layout: Layout | None  # None: an image without a layout file beside it
    if isinstance(source, Layout):
        layout = source
        image, scale = fuse_small(layout, max_size)
    elif _is_ome_zarr(Path(source)):
        layout = _sidecar_layout(Path(source))
        image, scale = screen_image(source, max_size)
    else:
        layout = _one_layout(source, **(layout_options or {}))
        image, scale = fuse_small(layout, max_size)
    drawn = _report_dict(report)
    font_size = max(10, min(max_size // 60, 18))
    room = max_size - (_legend_height(font_size) if drawn and layout is not None else 0)
    picture = Image.fromarray(contrast_stretch(image))
    if picture.size[0] > max_size or picture.size[1] > room:  # resize first, draw last:
        width = picture.size[0]                                # lines stay crisp
        picture.thumbnail((max_size, max(room, 1)), Image.Resampling.LANCZOS)
        scale *= picture.size[0] / width
    picture = picture.convert("RGB")
    if layout is not None:
        origin, _ = output_box(layout)
        _draw_layout(picture, layout, np.asarray(origin[-2:], dtype=float), scale, drawn)
        if drawn:
            picture = _legend(picture, font_size)
    return picture


def write_preview(source, png_path: str | os.PathLike, **options) -> Path:
    """Write :func:`preview_image` as a PNG; returns its path."""
    png_path = Path(png_path)
    preview_image(source, **options).save(png_path)
    return png_path
