"""``make demo``: the whole job on a synthetic acquisition with known truth.

Tiles at rough stage positions (each off by up to 8 px from where it really is), registered
from the image content, fused into an OME-Zarr mosaic, with a before/after picture and a
summary that says what the numbers mean.

Run as ``python -m tilefuse.demo [FOLDER] [--picture PNG]`` (default ``demo``; the picture
defaults to ``FOLDER/before_after.png``; ``make demo`` also writes the one the README shows).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tilefuse.cli.main import main as cli_main
from tilefuse.io.readers import read_layout
from tilefuse.model.layout import Layout
from tilefuse.testing import grid_tileset, write_tileset

GRID = (4, 5)
TILE = (256, 256)
POSITION_ERROR = 8.0  # px: how far each stage position is from the tile's true place
PIXEL_SIZE = 0.65  # um


def _offsets(layout: Layout, truth: Layout) -> np.ndarray:
    """Distance of each tile from its true place, px, after the best common shift (a mosaic's
    absolute place is arbitrary: only where tiles sit relative to each other matters)."""
    d = layout.positions[:, -2:] - truth.positions[:, -2:]
    return np.hypot(*(d - d.mean(axis=0)).T)


def _zoom(layout: Layout, tile: int, size: int, factor: int) -> Image.Image:
    """The mosaic fused at `layout` (overlaps averaged), `size` px around tile `tile`'s first
    corner, enlarged `factor` times (nearest: pixels stay pixels)."""
    from PIL import Image

    from tilefuse import fuse
    from tilefuse.plan.geometry import output_box
    from tilefuse.viz.overview import contrast_stretch

    origin, _ = output_box(layout)
    y, x = np.rint(layout.positions[tile, -2:] - origin[-2:]).astype(int) - size // 2
    mosaic = fuse(layout, blend="mean")  # no feathering to hide a misplaced tile's doubles
    image = np.asarray(mosaic.data[max(y, 0):y + size, max(x, 0):x + size])
    crop = Image.fromarray(contrast_stretch(image)).convert("RGB")
    return crop.resize((crop.size[0] * factor, crop.size[1] * factor), Image.Resampling.NEAREST)


def before_after(stage: Layout, registered: Layout, report: Path, out: Path,
                 width: int = 1100) -> Path:
    """Side by side: the tiles fused at the stage positions, and after registration (links
    coloured by NCC, with the legend); below each, the corner where four tiles meet at 2x."""
    from PIL import Image, ImageDraw, ImageFont

    from tilefuse.viz.preview import preview_image

    half = width // 2 - 6
    before = preview_image(stage, max_size=half)
    after = preview_image(registered, max_size=half, report=report)
    corner = GRID[1] + 1  # the tile whose first corner four tiles share
    zooms = [_zoom(layout, corner, 140, 2) for layout in (stage, registered)]
    font = ImageFont.load_default(size=16)
    top, gap = 28, 12
    high = max(before.size[1], after.size[1])
    canvas = Image.new("RGB", (before.size[0] + gap + after.size[0],
                               top + high + 2 * top + zooms[0].size[1] + gap), (32, 32, 32))
    left = (0, before.size[0] + gap)
    canvas.paste(before, (left[0], top))
    canvas.paste(after, (left[1], top))
    draw = ImageDraw.Draw(canvas)
    white = (255, 255, 255)
    draw.text((left[0] + 6, 5), "before: tiles at the stage positions", fill=white, font=font)
    draw.text((left[1] + 6, 5), "after: registered (links coloured by NCC)", fill=white,
              font=font)
    below = top + high + top // 2
    for x, zoom, what in zip(left, zooms, ("before", "after"), strict=True):
        draw.text((x + 6, below), f"{what}: tiles 0, 1, {GRID[1]}, {corner} meet (2x, "
                  "overlaps averaged)", fill=white, font=font)
        canvas.paste(zoom, (x, below + top))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)
    return out


def run(folder: Path, picture: Path | None = None) -> int:
    """Build the demo in ``folder``; returns an exit status."""
    if folder.exists():
        shutil.rmtree(folder)
    tiles = folder / "tiles"
    n = GRID[0] * GRID[1]
    print(f"1/4 making {n} tiles ({GRID[1]} across, {GRID[0]} down; each x {TILE[1]}, "
          f"y {TILE[0]} px, uint16) in {tiles}/,\n    listed at rough stage positions: each "
          f"up to {POSITION_ERROR:g} px off in x and in y from where it really is")
    ts = grid_tileset(grid=GRID, tile_shape=TILE, overlap=0.12, position_error=POSITION_ERROR,
                      fractional=True, seed=2021)
    layout_file = write_tileset(ts, tiles, stage=True)
    mosaic, report = folder / "mosaic.ome.zarr", folder / "registration.json"
    command = ["fuse", str(layout_file), "-o", str(mosaic), "--register", "--report",
               str(report), "--pixel-size", str(PIXEL_SIZE)]
    print(f"2/4 tilefuse {' '.join(command)}")
    started = time.perf_counter()
    status = cli_main(command)
    if status:
        return status
    seconds = time.perf_counter() - started
    registered = read_layout(folder / "mosaic.layout.csv")
    assert isinstance(registered, Layout)
    picture = picture or folder / "before_after.png"
    print(f"3/4 before/after picture: {picture}")
    before_after(read_layout(layout_file), registered, report, picture)  # type: ignore[arg-type]
    print(f"4/4 preview of the mosaic: {folder / 'preview.png'}")
    status = cli_main(["preview", str(mosaic), "-o", str(folder / "preview.png"), "--report",
                       str(report)])
    if status:
        return status
    stage_off = _offsets(ts.stage, ts.layout)
    reg_off = _offsets(registered, ts.layout)
    print()
    print(f"  tiles:      {tiles}/ (TileConfiguration.txt at stage positions + {n} TIFFs)")
    print(f"  mosaic:     {mosaic} (OME-Zarr 0.5; README: opening it in napari, Fiji)")
    print(f"  layout:     {folder / 'mosaic.TileConfiguration.txt'} (registered; Fiji reads it)")
    print(f"  report:     {report} (every link's shift and NCC) and its picture "
          f"{report.with_suffix('.png')}")
    print(f"  positions:  stage ones are off by {stage_off.mean():.1f} px on average (worst "
          f"{stage_off.max():.1f}); after registration {reg_off.mean():.3f} px (worst "
          f"{reg_off.max():.3f}):")
    print("              how far a tile sits from its true place relative to the others; "
          "under 0.5 px is sub-pixel")
    print(f"  time:       {seconds:.1f} s to register and fuse {n} tiles")
    print("\nnext: .venv/bin/tilefuse --help (or 'source .venv/bin/activate', then tilefuse); "
          "README, 'Opening the result': napari, Fiji, QuPath")
    return 0


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tilefuse.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="demo", help="where to build the demo")
    parser.add_argument("--picture", default=None, help="the before/after PNG to write")
    args = parser.parse_args(argv)
    return run(Path(args.folder), Path(args.picture) if args.picture else None)


if __name__ == "__main__":
    sys.exit(_main())
