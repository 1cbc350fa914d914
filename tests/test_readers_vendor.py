"""Acquisition readers: file name patterns, OME-TIFF stage positions, Zeiss CZI mosaics."""

from __future__ import annotations

import logging
import os
import pickle
import threading

import numpy as np
import pytest
import tifffile

from conftest import DATA, read_positions
from tilefuse import InputError, fuse, read_layout
from tilefuse.io.readers import read_czi, read_ome_tiff, read_pattern
from tilefuse.io.tile_cache import read_tile

MIST = DATA / "mist_phase_5x5"
LEICA = DATA / "leica_confocal_2tiles/experiment--test/slide--S00/chamber--U00--V00"
LEICA_PATTERN = (
    "field--X{col}--Y{row}/image--L00--S00--U00--V00--J20--E00--O00--X{col}--Y{row}"
    "--T00--Z00--C{channel}.ome.tif"
)
CZI = DATA / "zeiss_czi_2tiles/mosaic_test.czi"


# --- patterns ---------------------------------------------------------------------------------


def test_pattern_mist_column_major():
    layout = read_pattern(MIST / "tiles", "ImageName_t01_p{index}.tif", grid="5x5",
                          order="column-major", overlap=0.06)
    assert len(layout.tiles) == 25
    step = (round(183 * 0.94), round(245 * 0.94))
    assert step == (172, 230)
    by_name = {t.name: t for t in layout.tiles}
    for row in read_positions(MIST / "positions.csv"):
        r, c = int(row["row"]), int(row["col"])
        tile = by_name[row["file"]]
        assert tile.shape == (183, 245)
        np.testing.assert_array_equal(tile.position, [r * step[0], c * step[1]])
    assert layout.metadata["reader"] == "pattern"
    assert layout.metadata["grid_positions"][:6] == [[0, 0], [1, 0], [2, 0], [3, 0], [4, 0],
                                                     [0, 1]]


# Hand-written: acquisition index k (from 0) -> (row, col) on a 2 x 3 grid.
ORDER_RC = {
    "row-major": [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)],
    "column-major": [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)],
    "snake-rows": [(0, 0), (0, 1), (0, 2), (1, 2), (1, 1), (1, 0)],
    "snake-cols": [(0, 0), (1, 0), (1, 1), (0, 1), (0, 2), (1, 2)],
}


def _index_tiles(folder, indices, shape=(10, 20), name="tile_{}.tif"):
    for i in indices:
        tifffile.imwrite(folder / name.format(i), np.full(shape, i, np.uint16))
    return folder


@pytest.mark.parametrize("order", sorted(ORDER_RC))
def test_pattern_orders_exact(tmp_path, order):
    _index_tiles(tmp_path, range(1, 7))
    layout = read_pattern(tmp_path, "tile_{index}.tif", grid="2x3", order=order, overlap=0.2)
    step = (8, 16)  # round(10 * 0.8), round(20 * 0.8)
    assert [t.name for t in layout.tiles] == [f"tile_{i}.tif" for i in range(1, 7)]
    for k, tile in enumerate(layout.tiles):
        r, c = ORDER_RC[order][k]
        np.testing.assert_array_equal(tile.position, [r * step[0], c * step[1]])
        assert read_tile(tile.source)[0, 0, 0] == k + 1


def test_pattern_first_index_and_row_col(tmp_path):
    _index_tiles(tmp_path, range(0, 6), shape=(4, 5), name="t{:03d}.tif")
    layout = read_pattern(tmp_path, "t{index}.tif", grid="2x3", order="snake-rows",
                          overlap=0, first_index=0)
    np.testing.assert_array_equal(layout.positions[3], [4, 10])  # k=3 -> row 1, col 2
    # {row}/{col} counted from the smallest found (here 1-based names), zero-padded numbers
    for r in (1, 2):
        for c in (1, 2, 3):
            tifffile.imwrite(tmp_path / f"r{r:02d}_c{c}.tif", np.zeros((4, 5), np.uint8))
    layout = read_pattern(tmp_path, "r{row}_c{col}.tif", overlap=0.2)
    assert len(layout.tiles) == 6
    np.testing.assert_array_equal(layout.positions[-1], [1 * 3, 2 * 4])  # round(3.2), round(4)


def _first_page(path: str) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        return tif.pages[0].asarray()


def test_pattern_leica_rows_cols_channels():
    layout = read_pattern(LEICA, LEICA_PATTERN, overlap=0.1)
    assert len(layout.tiles) == 2 and layout.channels == ("00", "01")
    np.testing.assert_array_equal(layout.positions, [[0, 0], [round(1024 * 0.9), 0]])
    np.testing.assert_allclose(layout.pixel_size, (0.2405001955, 0.2405001955))
    first = layout.tiles[0]
    c00, c01 = (_first_page(p) for p in first.source.paths)
    assert first.source.paths[1].endswith("--X00--Y00--T00--Z00--C01.ome.tif")
    out = fuse(layout).compute()
    assert out.shape == (2, 922 + 1024, 1024)
    np.testing.assert_array_equal(out[1, :922], c01[:922])  # first tile alone there
    np.testing.assert_array_equal(out[0, :922], c00[:922])
    out = fuse(layout, blend="first").compute()
    np.testing.assert_array_equal(out[1, :1024], c01)


def test_read_layout_folder_with_pattern_and_wildcards():
    layout = read_layout(LEICA, pattern="field--X{col}--Y{row}/image--*--X{col}--Y{row}--T00"
                         "--Z00--C{channel}.ome.tif", overlap=0.1)
    assert layout.channels == ("00", "01") and len(layout.tiles) == 2
    with pytest.raises(InputError, match="--pattern"):
        read_layout(LEICA)


def test_pattern_literal_brackets(data_dir):
    layout = read_pattern(data_dir / "sem_stitch2d_2x3/tiles", "stitch2d_ex[Grid@{col} {row}].jpg",
                          overlap=0)
    assert len(layout.tiles) == 6
    by_name = {t.name: t.position for t in layout.tiles}
    h, w = layout.tiles[0].shape
    np.testing.assert_array_equal(by_name["stitch2d_ex[Grid@1 2].jpg"], [2 * h, 1 * w])


def test_pattern_errors(tmp_path):
    _index_tiles(tmp_path, range(1, 8))
    with pytest.raises(InputError, match=r"no file in .* matches the pattern 'img_\{index\}"):
        read_pattern(tmp_path, "img_{index}.tif", grid="2x3")
    with pytest.raises(InputError, match=r"tile_\{index\}.tif.*grid"):
        read_pattern(tmp_path, "tile_{index}.tif")
    with pytest.raises(InputError, match=r"tile_7.tif: index 7 is outside the 2x3 grid"):
        read_pattern(tmp_path, "tile_{index}.tif", grid="2x3")
    with pytest.raises(InputError, match=r"no file in .* matches the pattern 'tile_\{index\}_z"):
        read_pattern(tmp_path, "tile_{index}_z{z}.tif", grid="2x3")
    with pytest.raises(InputError, match="ROWSxCOLS"):
        read_pattern(tmp_path, "tile_{index}.tif", grid="six")
    with pytest.raises(InputError, match="order"):
        read_pattern(tmp_path, "tile_{index}.tif", grid="2x3", order="zigzag")
    with pytest.raises(InputError, match=r"'../tile_\{index\}.tif' must be a file name inside"):
        read_pattern(tmp_path, "../tile_{index}.tif", grid="2x3")
    with pytest.raises(InputError, match="unknown field"):
        read_pattern(tmp_path, "tile_{idx}.tif", grid="2x3")
    tifffile.imwrite(tmp_path / "tile_01.tif", np.zeros((10, 20), np.uint16))
    with pytest.raises(InputError, match=r"tile_1.tif: grid row 0, column 0 is already taken"):
        read_pattern(tmp_path, "tile_{index}.tif", grid="3x3")


def test_pattern_missing_channel(tmp_path):
    for c in (0, 1):
        tifffile.imwrite(tmp_path / f"r0_c0_ch{c}.tif", np.zeros((4, 4), np.uint8))
    tifffile.imwrite(tmp_path / "r0_c1_ch0.tif", np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match=r"column 1 has no file for channel\(s\) '1'.*r0_c1_ch0"):
        read_pattern(tmp_path, "r{row}_c{col}_ch{channel}.tif")


def test_pattern_symlink_loop_does_not_hang(tmp_path):
    _index_tiles(tmp_path, range(1, 7))
    os.symlink(tmp_path, tmp_path / "loop")
    os.symlink("..", tmp_path / "loop2", target_is_directory=True)
    results: dict = {}

    def run():
        results["flat"] = read_pattern(tmp_path, "tile_{index}.tif", grid="2x3")
        results["deep"] = read_pattern(tmp_path, "**/tile_{index}.tif", grid="2x3")

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "reading a folder with a symlink loop hung"
    assert len(results["flat"].tiles) == 6 and len(results["deep"].tiles) == 6


# --- OME-TIFF ---------------------------------------------------------------------------------

ROWS_COLS = [(0, 0), (0, 1), (1, 0), (1, 1)]


def _ome_meta(stage_xy, size=(0.5, 0.25), unit="µm", name="DAPI"):
    return {
        "axes": "YX", "PhysicalSizeX": size[0], "PhysicalSizeY": size[1],
        "Channel": {"Name": [name]},
        "Plane": {"PositionX": [stage_xy[0]], "PositionY": [stage_xy[1]],
                  "PositionXUnit": [unit], "PositionYUnit": [unit]},
    }


def _stage(r, c, scale=1.0):
    """Stage position in µm * scale: 4 µm per column, 3 µm per row, arbitrary origin."""
    return ((100 + 4.0 * c) * scale, (-50 + 3.0 * r) * scale)


@pytest.fixture
def ome_multi(tmp_path):
    path = tmp_path / "multi.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        for i, (r, c) in enumerate(ROWS_COLS):
            tw.write(np.full((12, 16), i + 1, np.uint16), metadata=_ome_meta(_stage(r, c)))
    return path


# x px = 4 µm / 0.5 = 8 per column; y px = 3 µm / 0.25 = 12 per row
@pytest.mark.parametrize(("options", "expected"), [
    ({}, [[r * 12, c * 8] for r, c in ROWS_COLS]),
    ({"flip_x": True}, [[r * 12, (1 - c) * 8] for r, c in ROWS_COLS]),
    ({"flip_y": True}, [[(1 - r) * 12, c * 8] for r, c in ROWS_COLS]),
    # swapped: image x = stage y / 0.5 (6 px per row), image y = stage x / 0.25 (16 per col)
    ({"swap_xy": True}, [[c * 16, r * 6] for r, c in ROWS_COLS]),
])
def test_ome_tiff_multi_series_positions(ome_multi, options, expected):
    layout = read_ome_tiff(ome_multi, **options)
    np.testing.assert_array_equal(layout.positions, expected)
    assert layout.pixel_size == (0.25, 0.5) and layout.channels == ("DAPI",)
    assert [t.source.series for t in layout.tiles] == [0, 1, 2, 3]
    assert layout.metadata["reader"] == "ome-tiff"
    np.testing.assert_allclose(layout.metadata["stage_positions_um"],
                               [_stage(r, c) for r, c in ROWS_COLS])
    assert [read_tile(t.source)[0, 0, 0] for t in layout.tiles] == [1, 2, 3, 4]


def test_ome_tiff_via_read_layout(ome_multi):
    layout = read_layout(ome_multi, flip_y=True)
    np.testing.assert_array_equal(layout.positions[0], [12, 0])
    out = fuse(layout).compute()
    assert out.shape == (24, 24) and out[0, 0] == 3 and out[-1, -1] == 2


def test_ome_tiff_one_file_per_tile_and_units(tmp_path):
    paths = []
    for i, (r, c) in enumerate(ROWS_COLS):
        (tmp_path / f"f{i}").mkdir()
        path = tmp_path / f"f{i}" / f"tile{i}.ome.tif"
        meta = _ome_meta(_stage(r, c, scale=1e-3), unit="mm", name="GFP")
        tifffile.imwrite(path, np.full((12, 16), i, np.uint8), ome=True, metadata=meta)
        paths.append(path)
    layout = read_ome_tiff(paths)
    np.testing.assert_allclose(layout.positions, [[r * 12, c * 8] for r, c in ROWS_COLS],
                               atol=1e-9)
    assert [t.name for t in layout.tiles] == [f"f{i}/tile{i}.ome.tif" for i in range(4)]
    assert layout.channels == ("GFP",)
    assert all(t.source.paths == (str(p),) for t, p in zip(layout.tiles, paths, strict=True))


def test_ome_tiff_z_stacks(tmp_path):
    path = tmp_path / "z.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        for i in range(2):
            meta = {"axes": "ZYX", "PhysicalSizeX": 1.0, "PhysicalSizeY": 1.0,
                    "PhysicalSizeZ": 2.0,
                    "Plane": {"PositionX": [10.0 * i] * 3, "PositionY": [0.0] * 3,
                              "PositionZ": [4.0 * i + 2 * z for z in range(3)]}}
            tw.write(np.full((3, 8, 12), i, np.uint16), metadata=meta)
    layout = read_ome_tiff(path)
    assert layout.ndim == 3 and layout.pixel_size == (2.0, 1.0, 1.0)
    np.testing.assert_array_equal(layout.positions, [[0, 0, 0], [2, 0, 10]])


def test_ome_tiff_errors(tmp_path):
    path = tmp_path / "nopos.ome.tif"
    tifffile.imwrite(path, np.zeros((4, 4), np.uint8), ome=True,
                     metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    with pytest.raises(InputError, match=r"nopos.ome.tif image 0.*no stage position.*--pattern"):
        read_ome_tiff(path)
    path = tmp_path / "nosize.ome.tif"
    tifffile.imwrite(path, np.zeros((4, 4), np.uint8), ome=True,
                     metadata={"axes": "YX", "Plane": {"PositionX": [0.0], "PositionY": [0.0]}})
    with pytest.raises(InputError, match=r"nosize.ome.tif.*PhysicalSizeX"):
        read_layout(path)
    path = tmp_path / "badunit.ome.tif"
    tifffile.imwrite(path, np.zeros((4, 4), np.uint8), ome=True,
                     metadata=_ome_meta((0.0, 0.0), unit="furlong"))
    with pytest.raises(InputError, match=r"badunit.ome.tif.*unknown length unit 'furlong'"):
        read_ome_tiff(path)
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match=r"plain.tif: no OME-XML.*--pattern"):
        read_ome_tiff(tmp_path / "plain.tif")
    with pytest.raises(FileNotFoundError, match=r"missing\.ome\.tif"):
        read_ome_tiff(tmp_path / "missing.ome.tif")


# --- CZI --------------------------------------------------------------------------------------


def test_czi_two_tiles_stage_positions():
    layout = read_czi(CZI)
    assert len(layout.tiles) == 2 and layout.dtype == np.uint16
    assert [t.shape for t in layout.tiles] == [(624, 924), (624, 924)]
    np.testing.assert_allclose(layout.pixel_size, (1.0833, 1.0833), rtol=1e-4)
    assert layout.metadata["positions_from"] == "stage"
    rel = layout.positions - layout.positions[0]
    rows = read_positions(CZI.parent / "positions.csv")
    expected = [[float(r["stage_y_px"]), float(r["stage_x_px"])] for r in rows]
    np.testing.assert_allclose(rel, expected, atol=0.01)
    means = []
    for tile in layout.tiles:
        source = pickle.loads(pickle.dumps(tile.source))
        data = source.read()
        assert data.shape == (1, 624, 924) and data.dtype == np.uint16
        means.append(float(data.mean()))
    np.testing.assert_allclose(means, [4947, 8266], rtol=0.01)


def test_czi_via_read_layout_flip_and_scene():
    layout = read_layout(CZI, flip_x=True)
    np.testing.assert_allclose(layout.positions, [[0, 831.6], [0, 0]], atol=0.01)
    with pytest.raises(InputError, match=r"mosaic_test.czi: has no scene 3"):
        read_czi(CZI, scene=3)


def test_czi_falls_back_to_subblock_starts(monkeypatch, caplog):
    import czifile

    def broken(self, raw=False):
        raise ValueError("no metadata")

    monkeypatch.setattr(czifile.SubBlockSegment, "metadata", broken)
    with caplog.at_level(logging.WARNING, logger="tilefuse.io.readers.czi"):
        layout = read_czi(CZI)
    assert "stage positions unavailable" in caplog.text
    assert layout.metadata["positions_from"] == "subblock start"
    rows = read_positions(CZI.parent / "positions.csv")
    np.testing.assert_array_equal(
        layout.positions, [[float(r["zen_y_px"]), float(r["zen_x_px"])] for r in rows])


# --- dispatch ---------------------------------------------------------------------------------


def test_read_layout_refuses_unknown_types_and_options(tmp_path):
    (tmp_path / "scan.nd2").write_bytes(b"\x00\x01binary")
    with pytest.raises(InputError, match=r"scan.nd2: .*TileConfiguration.*\.czi.*--pattern"):
        read_layout(tmp_path / "scan.nd2")
    (tmp_path / "blob.dat").write_bytes(b"\x00\x01binary")
    with pytest.raises(InputError, match=r"blob.dat: binary file .*\.ome\.tif"):
        read_layout(tmp_path / "blob.dat")
    tifffile.imwrite(tmp_path / "t.tif", np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match=r"t.tif: a TIFF without OME-XML .*--pattern"):
        read_layout(tmp_path / "t.tif")
    (tmp_path / "l.csv").write_text("file,x,y\nt.tif,0,0\n")
    with pytest.raises(InputError, match=r"l.csv: --flip-x \(option 'flip_x'\) does not apply"):
        read_layout(tmp_path / "l.csv", flip_x=True)
    with pytest.raises(InputError, match=r"unknown layout option 'colour'"):
        read_layout(tmp_path / "l.csv", colour=1)
    with pytest.raises(InputError, match=r"l.csv: a pattern needs a folder"):
        read_layout(tmp_path / "l.csv", pattern="t{index}.tif")
    assert len(read_layout(tmp_path / "l.csv", flip_x=False, grid=None).tiles) == 1
