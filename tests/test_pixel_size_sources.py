"""Where every pixel size comes from (issue 16): an ImageJ-calibrated TIFF set fused with its
true pixel size, the order OME-XML, ImageJ, resolution tags, and what ``info`` says for each
source (OME-XML, ImageJ, resolution tags, CZI, layout file, --pixel-size, default).

Tiles are synthetic sets with exact truth (:func:`tilefuse.testing.grid_tileset`), written by
tifffile the way ImageJ/Fiji users save them (``imagej=True``, ``resolution``, ``unit`` and
``spacing``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from conftest import run_main
from tilefuse.io.readers import read_layout
from tilefuse.ome_zarr.writer import read_ome_zarr_level
from tilefuse.plan.info import describe
from tilefuse.testing import grid_tileset

PATTERN = "tile_r{row}_c{col}.tif"
UM = 0.325  # a 20x objective on a 6.5 µm camera
SPACING = 1.5


def _write_grid(folder: Path, tiles: list, cols: int, **keywords) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, tile in enumerate(tiles):
        tifffile.imwrite(folder / PATTERN.format(row=i // cols, col=i % cols), tile, **keywords)
    return folder


def _scale(out: Path) -> list[float]:
    attrs = zarr.open_group(str(out), mode="r").attrs.asdict()
    meta = attrs.get("ome", attrs)["multiscales"][0]
    return meta["datasets"][0]["coordinateTransformations"][0]["scale"]


IMAGEJ = dict(imagej=True, resolution=(1 / UM, 1 / UM),
              metadata={"axes": "ZYX", "unit": "um", "spacing": SPACING})


def test_imagej_calibrated_tiff_stacks_fuse_with_their_true_pixel_size(tmp_path):
    ts = grid_tileset(grid=(2, 2), tile_shape=(4, 40, 52), overlap=0.2, seed=3)
    folder = _write_grid(tmp_path / "tiles", ts.tiles, 2, **IMAGEJ)
    info = run_main("info", folder, "--pattern", PATTERN, "--overlap", "0.2")
    assert info.returncode == 0, info.stderr
    assert "(zyx) (from ImageJ metadata)" in info.stdout
    out = tmp_path / "m.ome.zarr"
    result = run_main("fuse", folder, "--pattern", PATTERN, "--overlap", "0.2", "--chunk", "32",
                      "-o", out)
    assert result.returncode == 0, result.stderr
    assert "is a default" not in result.stderr
    np.testing.assert_array_equal(read_ome_zarr_level(out).compute(), ts.truth)  # z, y, x
    assert _scale(out) == [SPACING, UM, UM]  # 1/0.325 is stored as 40/13: exact
    saved = read_layout(tmp_path / "m.layout.csv")
    assert saved.pixel_size_source == "ImageJ metadata"  # the source travels in the sidecar


def _ome(path: Path, data: np.ndarray) -> None:
    tifffile.imwrite(path, data, ome=True, metadata={"PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2})


def _imagej_mm(path: Path, data: np.ndarray) -> None:
    """ImageJ says 1/4000 mm = 0.25 µm; the same resolution tags read per cm would be 2.5 µm."""
    tifffile.imwrite(path, data, imagej=True, resolution=(4000, 4000),
                     resolutionunit="CENTIMETER", metadata={"unit": "mm"})


def _tags(path: Path, data: np.ndarray) -> None:
    tifffile.imwrite(path, data, resolution=(25000, 25000), resolutionunit="CENTIMETER")


SOURCES = {
    # name: (tile writer, layout options, the line info prints)
    "OME-XML": (_ome, {}, "0.2 x 0.2 micrometer (yx) (from OME-XML)"),
    "ImageJ before resolution tags": (_imagej_mm, {},
                                      "0.25 x 0.25 micrometer (yx) (from ImageJ metadata)"),
    "resolution tags": (_tags, {}, "0.4 x 0.4 micrometer (yx) (from TIFF resolution tags)"),
    "--pixel-size": (_tags, {"pixel_size": (0.7,)}, "0.7 x 0.7 micrometer (yx) (as given)"),
    "default": (tifffile.imwrite, {},
                "1 x 1 micrometer (yx) (default: no file states one; pass --pixel-size)"),
}


@pytest.mark.parametrize("name", list(SOURCES))
def test_info_says_where_the_pixel_size_came_from(tmp_path, name):
    write, options, line = SOURCES[name]
    ts = grid_tileset(grid=(1, 2), tile_shape=(24, 30), overlap=0.2, seed=1)
    for i, tile in enumerate(ts.tiles):
        write(tmp_path / PATTERN.format(row=0, col=i), tile)
    args = ["info", tmp_path, "--pattern", PATTERN, "--overlap", "0.2"]
    if "pixel_size" in options:
        args += ["--pixel-size", str(options["pixel_size"][0])]
    result = run_main(*args)
    assert result.returncode == 0, result.stderr
    assert f"pixel size:   {line}" in result.stdout


def test_layout_file_pixel_size_and_z_provenance(tmp_path):
    """A layout file that states a size without its source says so; z taken from --z-step or
    from y is said, not hidden behind the lateral source."""
    ts = grid_tileset(grid=(1, 2), tile_shape=(24, 30), overlap=0.2, seed=2)
    (tmp_path / "tc.txt").write_text(
        "# tilefuse.pixel_size_xyz = [0.3, 0.3]\ndim = 2\n"
        + "".join(f"{PATTERN.format(row=0, col=i)}; ; ({p[1]:g}, {p[0]:g})\n"
                  for i, p in enumerate(ts.layout.positions)))
    _write_grid(tmp_path, ts.tiles, 2)
    assert "pixel size:   0.3 x 0.3 micrometer (yx) (from layout file)" in describe(
        read_layout(tmp_path / "tc.txt"))
    for z in range(2):
        tifffile.imwrite(tmp_path / f"p_r0_c0_z{z}.tif", ts.tiles[0], imagej=True,
                         resolution=(4, 4), metadata={"unit": "um"})
    stepped = read_layout(tmp_path, pattern="p_r{row}_c{col}_z{z}.tif", z_step=3.0)
    assert stepped.pixel_size == (0.75, 0.25, 0.25)
    assert "(from ImageJ metadata; z from --z-step)" in describe(stepped)[2]
    plain = read_layout(tmp_path, pattern="p_r{row}_c{col}_z{z}.tif")
    assert plain.pixel_size == (0.25, 0.25, 0.25)
    assert plain.pixel_size_source == "ImageJ metadata; z spacing not stated, taken equal to y"
