"""``make demo``: make a synthetic acquisition with known truth, fuse it, and show the result.

Run as ``python -m tilefuse.demo [FOLDER]`` (default ``demo``).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np

from tilefuse.cli.main import main as cli_main
from tilefuse.ome_zarr.writer import read_ome_zarr_level
from tilefuse.testing import grid_tileset, write_tileset
from tilefuse.viz.overview import write_png_overview
from tilefuse.viz.preview import write_preview


def run(folder: Path) -> int:
    """Build the demo in ``folder``; returns an exit status."""
    if folder.exists():
        shutil.rmtree(folder)
    tiles = folder / "tiles"
    print(f"1/3 making a 4 x 5 grid of 256 x 256 uint16 tiles with known truth in {tiles}/")
    ts = grid_tileset(grid=(4, 5), tile_shape=(256, 256), overlap=0.12, position_error=8,
                      fractional=True, seed=2021)
    layout_file = write_tileset(ts, tiles, stage=False)
    mosaic = folder / "mosaic.ome.zarr"
    print(f"2/3 tilefuse fuse {layout_file} -o {mosaic} --chunk 256")
    started = time.perf_counter()
    status = cli_main(["fuse", str(layout_file), "-o", str(mosaic), "--chunk", "256",
                       "--pixel-size", "0.65"])
    if status:
        return status
    seconds = time.perf_counter() - started
    fused = read_ome_zarr_level(mosaic, 0).compute().astype(np.float64)
    err = np.abs(fused - ts.truth)[ts.covered]
    png = write_png_overview(mosaic, folder / "mosaic.png", max_size=1024)
    preview = write_preview(mosaic, folder / "preview.png", max_size=800)
    print(f"3/3 overview written to {png}, tile outlines in {preview}")
    print()
    print(f"  tiles:     {tiles}/ (TileConfiguration.txt + 20 TIFFs)")
    print(f"  mosaic:    {mosaic} ({' x '.join(map(str, fused.shape))} px, OME-Zarr 0.5, "
          f"open it in napari or Fiji)")
    print(f"  overview:  {png} (and {preview} with the tiles outlined)")
    print(f"  layout:    {folder / 'mosaic.TileConfiguration.txt'} (reusable in Fiji)")
    print(f"  vs truth:  mean |error| {err.mean():.2f}, max {err.max():.0f} of 60000 "
          f"(linear interpolation at fractional positions); {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1] if len(sys.argv) > 1 else "demo")))
