"""Pixel sizes stated by TIFF tiles (resolution tags, ImageJ metadata), and saying so when none is.

Every expected size is exact: tifffile stores resolutions as rationals, and the sizes below are
the correctly rounded quotients of those rationals (e.g. 13/200000 cm = 0.65 µm).
"""

from __future__ import annotations

import pickle
from dataclasses import replace

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from conftest import run_cli
from tilefuse.io.readers import (
    layout_from_arrays,
    read_layout,
    read_pattern,
    write_csv_layout,
    write_tileconfig,
)
from tilefuse.io.readers.calibration import stated_pixel_size
from tilefuse.model.layout import Layout, PixelSize
from tilefuse.plan.info import describe

TILE = np.arange(12 * 16, dtype=np.uint16).reshape(12, 16)


def _two_tiles(folder, write) -> object:
    """Two tiles written by ``write(path, data)`` and their TileConfiguration."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        write(folder / f"t{i}.tif", TILE + i)
    (folder / "tc.txt").write_text("dim = 2\nt0.tif; ; (0, 0)\nt1.tif; ; (14, 0)\n")
    return folder / "tc.txt"


# --- what is a calibration -----------------------------------------------------------------

CALIBRATED = {
    # name: (imwrite keywords, pixel size yx in µm, source)
    "centimeter": (dict(resolution=(1 / 0.65e-4, 1 / 0.65e-4), resolutionunit="CENTIMETER"),
                   (0.65, 0.65), "TIFF resolution tags"),
    "centimeter, anisotropic": (dict(resolution=(20000, 40000), resolutionunit="CENTIMETER"),
                                (0.25, 0.5), "TIFF resolution tags"),
    "inch": (dict(resolution=(50800, 50800), resolutionunit="INCH"), (0.5, 0.5),
             "TIFF resolution tags"),
    "imagej um": (dict(imagej=True, resolution=(1 / 0.3, 1 / 0.3), metadata={"unit": "um"}),
                  (0.3, 0.3), "ImageJ metadata"),
    "imagej micron": (dict(imagej=True, resolution=(4, 2), metadata={"unit": "micron"}),
                      (0.5, 0.25), "ImageJ metadata"),
    "imagej nm": (dict(imagej=True, resolution=(0.01, 0.01), metadata={"unit": "nm"}),
                  (0.1, 0.1), "ImageJ metadata"),
    "imagej unit only": (dict(imagej=True, metadata={"unit": "um"}), (1.0, 1.0),
                         "ImageJ metadata"),  # ImageJ's own: 1 pixel per µm, stated
}


@pytest.mark.parametrize("case", sorted(CALIBRATED))
def test_calibrated_tiff_tiles(tmp_path, case):
    keywords, size, source = CALIBRATED[case]
    layout = read_layout(_two_tiles(tmp_path, lambda p, d: tifffile.imwrite(p, d, **keywords)))
    assert layout.pixel_size == size
    assert layout.pixel_size_source == source and layout.pixel_size_known
    assert layout.unit == "micrometer"


NOT_CALIBRATED = {
    "tifffile default (1 per inch-less pixel)": {},
    "no unit": dict(resolution=(1 / 0.5, 1 / 0.5), resolutionunit="NONE"),
    "1 pixel per inch": dict(resolution=(1, 1), resolutionunit="INCH"),
    "72 dpi": dict(resolution=(72, 72), resolutionunit="INCH"),
    "300 dpi (85 µm pixels)": dict(resolution=(300, 300), resolutionunit="INCH"),
    "1200 dpi (21 µm pixels)": dict(resolution=(1200, 1200), resolutionunit="INCH"),
    "72 per cm": dict(resolution=(72, 72), resolutionunit="CENTIMETER"),
    "imagej without unit": dict(imagej=True, resolution=(4, 4)),
    "imagej unit pixel": dict(imagej=True, resolution=(4, 4), metadata={"unit": "pixel"}),
}


@pytest.mark.parametrize("case", sorted(NOT_CALIBRATED))
def test_uncalibrated_tiff_tiles_get_a_default_that_says_so(tmp_path, case):
    keywords = NOT_CALIBRATED[case]
    layout = read_layout(_two_tiles(tmp_path, lambda p, d: tifffile.imwrite(p, d, **keywords)))
    assert layout.pixel_size == (1.0, 1.0)
    assert layout.pixel_size_source == "default" and not layout.pixel_size_known


def test_pil_tiffs_and_pngs_are_not_calibrated(tmp_path):
    from PIL import Image

    for name, options in (("pil.tif", {}), ("pil72.tif", {"dpi": (72, 72)})):
        Image.fromarray(TILE).save(tmp_path / name, **options)
        assert stated_pixel_size(tmp_path / name, 2) is None
    iio.imwrite(tmp_path / "t.png", TILE.astype(np.uint8))
    assert stated_pixel_size(tmp_path / "t.png", 2) is None


def test_imagej_z_spacing_of_stacks(tmp_path):
    stack = np.zeros((3, 12, 16), np.uint16)
    tifffile.imwrite(tmp_path / "z.tif", stack, imagej=True, resolution=(1 / 0.3, 1 / 0.3),
                     metadata={"unit": "um", "spacing": 2.0, "axes": "ZYX"})
    size = stated_pixel_size(tmp_path / "z.tif", 3)
    assert size == (2.0, 0.3, 0.3) and size.source == "ImageJ metadata"
    # no spacing stated: z is taken equal to y, and the source says so
    tifffile.imwrite(tmp_path / "r.tif", stack, resolution=(20000, 40000),
                     resolutionunit="CENTIMETER", photometric="minisblack")
    size = stated_pixel_size(tmp_path / "r.tif", 3)
    assert size == (0.25, 0.25, 0.5) and "z spacing not stated" in size.source


def test_ome_xml_comes_before_resolution_tags(tmp_path):
    tifffile.imwrite(tmp_path / "o.ome.tif", TILE, ome=True, resolution=(20000, 20000),
                     resolutionunit="CENTIMETER",
                     metadata={"axes": "YX", "PhysicalSizeX": 0.125, "PhysicalSizeY": 0.375})
    size = stated_pixel_size(tmp_path / "o.ome.tif", 2)
    assert size == (0.375, 0.125) and size.source == "OME-XML"


# --- patterns and z planes -----------------------------------------------------------------


def test_pattern_reads_imagej_calibration(tmp_path):
    for c in range(2):
        tifffile.imwrite(tmp_path / f"r0_c{c}.tif", TILE, imagej=True, resolution=(4, 2),
                         metadata={"unit": "micron"})
    layout = read_pattern(tmp_path, "r{row}_c{col}.tif", overlap=0.1)
    assert layout.pixel_size == (0.5, 0.25) and layout.pixel_size_source == "ImageJ metadata"


def test_pattern_z_planes_take_lateral_calibration_and_z_step(tmp_path):
    for z in range(2):
        tifffile.imwrite(tmp_path / f"p_r0_c0_z{z}.tif", TILE, imagej=True, resolution=(4, 4),
                         metadata={"unit": "um"})
        tifffile.imwrite(tmp_path / f"u_r0_c0_z{z}.tif", TILE)
    layout = read_pattern(tmp_path, "p_r{row}_c{col}_z{z}.tif", z_step=3.0)
    assert layout.pixel_size == (0.75, 0.25, 0.25)
    assert layout.pixel_size_source == "ImageJ metadata; z from --z-step"
    plain = read_pattern(tmp_path, "u_r{row}_c{col}_z{z}.tif", z_step=3.0)
    assert plain.pixel_size == (3.0, 1.0, 1.0) and not plain.pixel_size_known


# --- the source travels with the numbers ---------------------------------------------------


def test_pixel_size_source_survives_copies_and_pickles():
    arrays = [np.zeros((4, 5), np.uint8)] * 2
    default = layout_from_arrays(arrays, positions=[[0, 0], [0, 4]])
    assert default.pixel_size == (1.0, 1.0) and default.pixel_size_source == "default"
    moved = default.with_positions([[0, 0], [0, 5]])
    assert moved.pixel_size_source == "default"  # an unchanged pixel size keeps its source
    given = replace(default, pixel_size=(1.0, 1.0))  # what --pixel-size 1 does
    assert given.pixel_size_source == "given" and given.pixel_size_known
    stated = replace(default, pixel_size=PixelSize((0.5, 0.5), "OME-XML"))
    again = pickle.loads(pickle.dumps(stated))
    assert again.pixel_size == (0.5, 0.5) and again.pixel_size_source == "OME-XML"
    assert layout_from_arrays(arrays, positions=[[0, 0], [0, 4]],
                              pixel_size=(2, 2)).pixel_size_source == "given"
    assert isinstance(Layout(default.tiles, np.uint8).pixel_size, PixelSize)


@pytest.mark.parametrize("calibrated", [True, False])
def test_sidecars_keep_the_pixel_size_and_its_source(tmp_path, calibrated):
    keywords = CALIBRATED["imagej micron"][0] if calibrated else {}
    layout = read_layout(_two_tiles(tmp_path / "tiles",
                                    lambda p, d: tifffile.imwrite(p, d, **keywords)))
    for path in (write_csv_layout(layout, tmp_path / "l.csv"),
                 write_tileconfig(layout, tmp_path / "l.txt")):
        again = read_layout(path)
        assert again.pixel_size == layout.pixel_size
        assert again.pixel_size_source == layout.pixel_size_source
        assert again.pixel_size_known is calibrated


# --- what info says ------------------------------------------------------------------------


def test_info_says_where_the_pixel_size_came_from(tmp_path):
    plain = _two_tiles(tmp_path / "plain", tifffile.imwrite)
    lines = describe(read_layout(plain))
    assert ("pixel size:   1 x 1 micrometer (yx) (default: no file states one; pass "
            "--pixel-size)") in lines
    keywords = CALIBRATED["imagej micron"][0]
    cal = read_layout(_two_tiles(tmp_path / "cal", lambda p, d: tifffile.imwrite(p, d,
                                                                                  **keywords)))
    assert "pixel size:   0.5 x 0.25 micrometer (yx) (from ImageJ metadata)" in describe(cal)
    result = run_cli("info", plain)
    assert result.returncode == 0, result.stderr
    assert "(default: no file states one; pass --pixel-size)" in result.stdout
    result = run_cli("info", plain, "--pixel-size", "0.5")
    assert result.returncode == 0, result.stderr
    assert "pixel size:   0.5 x 0.5 micrometer (yx) (as given)" in result.stdout
