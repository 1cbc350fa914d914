"""CZI mosaics with z-stacks, time points, channels and several scenes (issue 16).

The CZIs are written at test time by ``pylibCZIrw`` (Zeiss's libCZI wrapper, LGPL, a test-only
dependency) from synthetic tile sets with exact truth (:func:`tilefuse.testing.grid_tileset`):
one set per (time point, channel), the same grid, so each fused ``(t, c)`` volume must equal its
set's truth bit for bit. pylibCZIrw writes no stage positions, so these files also exercise
placement by subblock start coordinates. The real two-tile CZI (tests/data/zeiss_czi_2tiles)
checks tiles with and without stage positions in one file.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import run_main
from tilefuse.errors import InputError
from tilefuse.io.readers import read_layout
from tilefuse.io.readers.czi import CziSource, czi_scenes, read_czi
from tilefuse.model.timeseries import TimeSeries
from tilefuse.ome_zarr.writer import read_ome_zarr_level
from tilefuse.testing import grid_tileset

pyczi = pytest.importorskip("pylibCZIrw.czi")

DATA = Path(__file__).parent / "data"
REAL = DATA / "zeiss_czi_2tiles/mosaic_test.czi"
ORIGIN = (300, 120)  # x, y of the first tile in the CZI's pixel coordinates (not 0: made relative)
GRID, TILE, OVERLAP = (2, 2), (3, 30, 36), 0.25
PIXEL_M = {"scale_x": 0.5e-6, "scale_y": 0.5e-6, "scale_z": 2e-6}  # pylibCZIrw writes metres


def _write_czi(path: Path, scenes: list[list[list]], channel_names=None, **scale) -> None:
    """``scenes[s][t][c]`` is a TileSet; every tile of it written plane by plane (Z) with its
    position (tile M in layout order)."""
    with pyczi.create_czi(str(path), exist_ok=True) as czi:
        for s, times in enumerate(scenes):
            for t, channels in enumerate(times):
                for c, ts in enumerate(channels):
                    for tile, pos in zip(ts.tiles, ts.layout.positions, strict=True):
                        planes = tile if tile.ndim == 3 else tile[None]
                        x, y = int(pos[-1]) + ORIGIN[0] + 1000 * s, int(pos[-2]) + ORIGIN[1]
                        for z, plane in enumerate(planes):
                            czi.write(plane, location=(x, y), plane={"T": t, "C": c, "Z": z},
                                      scene=s)
        czi.write_metadata("synthetic", channel_names=channel_names or {}, **scale)


@pytest.fixture(scope="module")
def tzc(tmp_path_factory):
    """A 2x2 mosaic of 3-plane tiles, 2 time points x 2 channels, each its own truth."""
    folder = tmp_path_factory.mktemp("czi_tzc")
    sets = [[grid_tileset(grid=GRID, tile_shape=TILE, overlap=OVERLAP, seed=10 * t + c)
             for c in range(2)] for t in range(2)]
    path = folder / "tzc.czi"
    _write_czi(path, [sets], {0: "DAPI", 1: "GFP"}, **PIXEL_M)
    return path, sets


def test_czi_reads_z_t_c_into_the_common_axes(tzc, caplog):
    path, sets = tzc
    with caplog.at_level(logging.WARNING, logger="tilefuse.io.readers.czi"):
        series = read_czi(path)
    assert "tiles M=0, M=1, M=2, M=3 placed by their subblock start" in caplog.text
    assert isinstance(series, TimeSeries) and series.shared and series.names == ("0", "1")
    assert series.channels == ("DAPI", "GFP") and series.dtype == np.uint16
    assert series.pixel_size == (2.0, 0.5, 0.5) and series.pixel_size_source == "CZI metadata"
    for t in range(2):
        layout = series.at_time(t)
        assert [tile.shape for tile in layout.tiles] == [TILE] * 4
        np.testing.assert_array_equal(layout.positions, sets[t][0].layout.positions)
        for i, tile in enumerate(layout.tiles):
            source = pickle.loads(pickle.dumps(tile.source))  # lazy: path + offsets
            assert isinstance(source, CziSource) and source.depth == 3
            np.testing.assert_array_equal(source.read(),
                                          np.stack([sets[t][c].tiles[i] for c in range(2)]))
            np.testing.assert_array_equal(source.read_planes(1, 3), source.read()[:, 1:3])


@pytest.mark.parametrize("chunk", [("1", "24", "24"), ("2", "32", "32")])
def test_czi_stacks_fused_by_planes_pixel_exact(tzc, tmp_path, chunk):
    """Chunks shallower than the stacks read only their planes' subblocks."""
    path, sets = tzc
    out = tmp_path / "m.ome.zarr"
    result = run_main("fuse", path, "-o", out, "--chunk", *chunk, "-q")
    assert result.returncode == 0, result.stderr
    truth = np.stack([np.stack([sets[t][c].truth for c in range(2)]) for t in range(2)])
    np.testing.assert_array_equal(read_ome_zarr_level(out).compute(), truth)


def test_czi_with_z_t_c_fuses_pixel_exact_with_the_right_axes(tzc, tmp_path):
    path, sets = tzc
    out = tmp_path / "m.ome.zarr"
    result = run_main("fuse", path, "-o", out, "--chunk", "24", "-q")
    assert result.returncode == 0, result.stderr
    mosaic = read_ome_zarr_level(out).compute()
    truth = np.stack([np.stack([sets[t][c].truth for c in range(2)]) for t in range(2)])
    assert mosaic.shape == truth.shape == (2, 2, 3, 52, 63)
    np.testing.assert_array_equal(mosaic, truth)
    attrs = zarr.open_group(str(out), mode="r").attrs.asdict()
    meta = attrs.get("ome", attrs)["multiscales"][0]
    assert [(a["name"], a["type"]) for a in meta["axes"]] == [
        ("t", "time"), ("c", "channel"), ("z", "space"), ("y", "space"), ("x", "space")]
    assert meta["datasets"][0]["coordinateTransformations"][0]["scale"] == [
        1.0, 1.0, 2.0, 0.5, 0.5]
    assert [ch["label"] for ch in attrs.get("ome", attrs)["omero"]["channels"]] == ["DAPI", "GFP"]
    # the layout saved beside reads back to the same tiles (file, subblocks) and places
    saved = read_layout(tmp_path / "m.layout.csv")
    read = read_czi(path)
    assert isinstance(saved, TimeSeries) and isinstance(read, TimeSeries)
    assert saved.names == read.names and saved.pixel_size == (2.0, 0.5, 0.5)
    for t in range(2):
        assert [_facts(x.source) for x in saved.at_time(t).tiles] == [
            _facts(x.source) for x in read.at_time(t).tiles]
        np.testing.assert_array_equal(saved.at_time(t).affines, read.at_time(t).affines)


def _facts(source: CziSource) -> tuple:
    return (os.path.realpath(source.path), source.subblocks, source.series, source.depth)


@pytest.fixture(scope="module")
def three_scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("czi_scenes")
    sets = [grid_tileset(grid=(1, 2 + s % 2), tile_shape=(28, 34), overlap=0.2, seed=s)
            for s in range(3)]
    path = folder / "scenes.czi"
    _write_czi(path, [[[ts]] for ts in sets], scale_x=0.25e-6, scale_y=0.25e-6)
    return path, sets


def test_three_scene_czi_fused_with_scene_all(three_scenes, tmp_path):
    path, sets = three_scenes
    assert czi_scenes(path) == {0: "S0", 1: "S1", 2: "S2"}
    result = run_main("fuse", path, "--scene", "all", "-o", tmp_path / "m.ome.zarr", "--chunk",
                      "32")
    assert result.returncode == 0, result.stderr
    for s, ts in enumerate(sets):
        out = tmp_path / f"m.S{s}.ome.zarr"
        assert f"-> {out}" in result.stderr
        np.testing.assert_array_equal(read_ome_zarr_level(out).compute(), ts.truth)
        saved = read_layout(tmp_path / f"m.S{s}.layout.csv")  # the scene travels with it
        assert saved.metadata["scene"] == s and len(saved.tiles) == len(ts.tiles)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".zarr")) == [
        "m.S0.ome.zarr", "m.S1.ome.zarr", "m.S2.ome.zarr"]
    again = run_main("fuse", path, "--scene", "all", "-o", tmp_path / "m.ome.zarr")
    assert again.returncode == 2 and "m.S0.ome.zarr exists (scene 0" in again.stderr


def test_info_lists_and_describes_the_scenes(three_scenes):
    path, _ = three_scenes
    result = run_main("info", path)
    assert result.returncode == 0, result.stderr
    assert "scenes:       3: 0 (S0), 1 (S1), 2 (S2)" in result.stdout
    for s, n in enumerate((2, 3, 2)):
        assert f"scene {s} (S{s}):\nlayout:       {path} (read as czi)\ntiles:        {n} of " \
            "28 x 34" in result.stdout
    assert result.stdout.count("pixel size:   0.25 x 0.25 micrometer (yx) (from CZI metadata)") == 3
    one = run_main("info", path, "--scene", "1")
    assert one.returncode == 0 and "tiles:        3 of 28 x 34" in one.stdout
    assert "scene 0 (S0):" not in one.stdout


def test_scene_choices_are_refused_with_a_reason(three_scenes, tmp_path):
    path, _ = three_scenes
    result = run_main("fuse", path, "-o", tmp_path / "m.ome.zarr")
    assert result.returncode == 2 and "choose one with scene=N (--scene N), or fuse each with " \
        "--scene all" in result.stderr
    result = run_main("register", path, "--scene", "all")
    assert result.returncode == 2 and "register takes one scene: --scene N" in result.stderr
    result = run_main("fuse", REAL.parent / "positions.csv", "--scene", "all", "-o",
                      tmp_path / "x.ome.zarr")
    assert result.returncode == 2 and "is not a CZI file" in result.stderr
    with pytest.raises(InputError, match="has no scene 5; its scenes are"):
        read_czi(path, scene=5)


def test_tiles_missing_a_plane_are_refused(tmp_path):
    ts = grid_tileset(grid=(1, 2), tile_shape=(2, 20, 24), overlap=0.2)
    path = tmp_path / "gap.czi"
    with pyczi.create_czi(str(path), exist_ok=True) as czi:
        for i, (tile, pos) in enumerate(zip(ts.tiles, ts.layout.positions, strict=True)):
            for z in range(2 - i):  # tile M=1 has plane 0 only
                czi.write(tile[z], location=(int(pos[-1]), 0), plane={"Z": z})
    with pytest.raises(InputError, match=r"gap.czi: tile M=1 at T=0 lacks C=0 Z=1"):
        read_czi(path)


def test_tiles_without_stage_positions_are_placed_by_their_subblock_start(monkeypatch, caplog):
    """The real file, its second tile's stage position hidden: tile 0 stays where the stage
    puts it, tile 1 goes to its subblock start (positions.csv zen_*_px) moved by tile 0's
    stage-minus-start offset, and the warning names it."""
    from tilefuse.io.readers import czi

    stage = read_czi(REAL)
    real = czi._stage_um
    monkeypatch.setattr(czi, "_stage_um", lambda path, offsets: [*real(path, offsets)[:1], None])
    with caplog.at_level(logging.WARNING, logger="tilefuse.io.readers.czi"):
        mixed = read_czi(REAL)
    assert "mosaic_test.czi: tiles M=1 have no stage position" in caplog.text
    assert mixed.metadata["positions_from"] == "stage and subblock start"
    assert mixed.metadata["placed_by_subblock_start"] == ["M=1"]
    np.testing.assert_array_equal(mixed.positions, [[0, 0], [0, 832]])  # zen px
    np.testing.assert_allclose(stage.positions, [[0, 0], [0, 831.6]], atol=0.01)


def test_scene_outputs_are_named_after_zen_scene_names():
    import xml.etree.ElementTree as ET

    from tilefuse.cli._scenes import scene_output
    from tilefuse.io.readers._czi_blocks import scene_names

    root = ET.fromstring(
        "<ImageDocument><Metadata><Information><Image><Dimensions><S><Scenes>"
        '<Scene Index="0" Name="Well A1"/><Scene Index="1" Name="Well A1"/>'
        '<Scene Index="2" Name="../.."/></Scenes></S></Dimensions></Image></Information>'
        "</Metadata></ImageDocument>")
    assert scene_names(root, [0, 1, 2, 3]) == {0: "Well_A1", 1: "Well_A1_S1", 2: "S2", 3: "S3"}
    assert scene_output(Path("out/m.ome.zarr"), "Well_A1") == Path("out/m.Well_A1.ome.zarr")
    assert scene_output(Path("m.OME.zarr"), "S2") == Path("m.S2.OME.zarr")
    assert scene_output(Path("m.ome.tif"), "S0") == Path("m.S0.ome.tif")
