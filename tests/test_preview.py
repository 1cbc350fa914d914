"""Previews: the picture shows the mosaic, outlines where the tiles are, colours from the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from tilefuse.io.readers import read_layout
from tilefuse.plan.geometry import output_box
from tilefuse.testing import grid_tileset, write_tileset
from tilefuse.viz.preview import OUTLINE, REJECTED, STAGE, ncc_colour, preview_image


@pytest.fixture(scope="module")
def tileset_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prev")
    ts = grid_tileset(grid=(2, 3), tile_shape=(120, 150), overlap=0.15, position_error=5,
                      seed=3)
    return write_tileset(ts, folder, stage=False), ts


def _near(picture, x, y, colour, radius=2):
    """True when some pixel within ``radius`` of (x, y) has exactly ``colour``."""
    a = np.asarray(picture)
    y0, x0 = max(round(y) - radius, 0), max(round(x) - radius, 0)
    patch = a[y0 : round(y) + radius + 1, x0 : round(x) + radius + 1]
    return bool(np.any(np.all(patch == colour, axis=-1)))


def _corner_xy(layout, i):
    origin, _ = output_box(layout)
    y, x = layout.tiles[i].position - origin
    return x - 0.5, y - 0.5


def test_layout_preview_outlines_where_the_tiles_are(tileset_dir):
    path, _ = tileset_dir
    layout = read_layout(path)
    picture = preview_image(layout, max_size=2000)  # full resolution: no scaling
    _, shape = output_box(layout)
    assert picture.size == (shape[1], shape[0])
    for i in range(len(layout.tiles)):
        x, y = _corner_xy(layout, i)
        assert _near(picture, x + 20, y, OUTLINE), i  # on the top edge
        assert _near(picture, x, y + 20, OUTLINE), i  # on the left edge
    inner = np.asarray(picture)[60:80, 60:80]
    assert not np.all(inner == OUTLINE, axis=-1).any()  # tile interiors show the image
    assert inner.std() > 5


def test_report_colours_links_and_marks_stage_tiles(tileset_dir):
    path, _ = tileset_dir
    layout = read_layout(path)
    report = {
        "links": [
            {"tiles": [0, 1], "ncc": 0.95, "accepted": True},
            {"tiles": [1, 2], "ncc": 0.2, "accepted": False, "reason": "ncc below threshold"},
        ],
        "tiles": [{"index": i, "placed_by": "stage" if i == 5 else "image"} for i in range(6)],
    }
    picture = preview_image(layout, max_size=2000, report=report)

    def centre(i):
        x, y = _corner_xy(layout, i)
        h, w = layout.tiles[i].shape
        return x + w / 2, y + h / 2

    (x0, y0), (x1, y1), (x2, y2) = centre(0), centre(1), centre(2)
    quarter = (x0 + (x1 - x0) * 0.3, y0 + (y1 - y0) * 0.3)
    assert _near(picture, *quarter, ncc_colour(0.95))
    assert ncc_colour(0.95)[1] == 255 and ncc_colour(0.2)[0] == 255
    assert _near(picture, (x1 + x2) / 2 + 4, (y1 + y2) / 2 + 4, REJECTED)  # the cross
    sx, sy = _corner_xy(layout, 5)
    assert _near(picture, sx + 20, sy, STAGE)
    assert not _near(picture, sx + 20, sy, OUTLINE, radius=0)


def test_preview_cli_from_layout_and_from_fused_image(tileset_dir, tmp_path):
    path, _ = tileset_dir
    png = tmp_path / "p.png"
    result = run_cli("preview", path, "-o", png, "--max-size", "200")
    assert result.returncode == 0, result.stderr
    with Image.open(png) as picture:
        assert max(picture.size) <= 200
    out = tmp_path / "m.ome.zarr"
    assert run_cli("fuse", path, "-o", out, "--chunk", "64", "-q").returncode == 0
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"links": [], "tiles": []}))
    png2 = tmp_path / "z.png"
    result = run_cli("preview", out, "-o", png2, "--report", report, "--max-size", "300")
    assert result.returncode == 0, result.stderr
    with Image.open(png2) as opened:
        picture = opened.convert("RGB")
    assert max(picture.size) == 300
    assert np.all(np.asarray(picture) == OUTLINE, axis=-1).sum() > 300  # outlines drawn
