"""Every saved layout reads back to the same run: round trips over every reader.

A layout is written as a CSV (``write_csv_layout``, what ``NAME.layout.csv`` beside a fused image
holds) and, for one time point, as a Fiji TileConfiguration (``write_tileconfig``, what
``NAME.TileConfiguration.txt`` and ``tilefuse register`` write), into another folder than the
tiles', then read back with :func:`tilefuse.io.readers.read_layout`. What was read must equal
what was written, exactly: tiles (names, shapes, every channel's file, series, CZI subblocks),
channel names, dtype, pixel size (z step included), unit, where the pixel size came from, time
points and affines (bit for bit), and the pixels the tiles decode to.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile

from conftest import DATA, run_cli
from tilefuse import InputError
from tilefuse.io.readers import (
    layout_from_arrays,
    read_czi,
    read_layout,
    read_ome_tiff,
    read_pattern,
    write_csv_layout,
    write_tileconfig,
)
from tilefuse.io.readers.czi import CziSource
from tilefuse.io.tiles import FileSource, PlaneStackSource
from tilefuse.model.layout import Layout
from tilefuse.model.timeseries import TimeSeries

LEICA = DATA / "leica_confocal_2tiles/experiment--test/slide--S00/chamber--U00--V00"
LEICA_PATTERN = (
    "field--X{col}--Y{row}/image--L00--S00--U00--V00--J20--E00--O00--X{col}--Y{row}"
    "--T00--Z00--C{channel}.ome.tif"
)
CZI = DATA / "zeiss_czi_2tiles/mosaic_test.czi"


# --- comparing what was written with what was read ----------------------------------------


def _real(path: str) -> str:
    return os.path.realpath(path)


def _source_facts(source) -> tuple:
    """Everything that decides which pixels a source reads, with paths made comparable."""
    if isinstance(source, FileSource):
        return ("file", tuple(map(_real, source.paths)), source.series, source.channels,
                source.same_channels)
    if isinstance(source, PlaneStackSource):
        return ("planes", tuple(tuple(map(_real, p)) for p in source.planes),
                tuple(map(_real, source.templates)), source.channels, source.same_channels)
    if isinstance(source, CziSource):
        return ("czi", _real(source.path), source.subblocks, source.series)
    raise AssertionError(f"unexpected source {source!r}")


def assert_same_layout(read: Layout, written: Layout) -> None:
    """``read`` is ``written``, field by field, exactly."""
    assert type(read) is Layout
    assert read.ndim == written.ndim
    assert read.dtype == written.dtype
    assert read.channels == written.channels
    assert read.pixel_size == written.pixel_size  # exact floats
    assert read.unit == written.unit
    assert read.pixel_size_source == written.pixel_size_source
    assert read.pixel_size_known == written.pixel_size_known
    assert len(read.tiles) == len(written.tiles)
    for a, b in zip(read.tiles, written.tiles, strict=True):
        assert a.name == b.name
        assert a.shape == b.shape
        assert _source_facts(a.source) == _source_facts(b.source)
        assert a.affine.dtype == np.float64
        np.testing.assert_array_equal(a.affine, b.affine)  # bit for bit
    for i in {0, len(written.tiles) - 1}:  # the pixels too
        np.testing.assert_array_equal(read.tiles[i].source.read(), written.tiles[i].source.read())


def assert_same(read, written) -> None:
    """A Layout or a TimeSeries read back equals the one written."""
    if isinstance(written, TimeSeries):
        assert isinstance(read, TimeSeries)
        assert read.names == written.names and read.shared == written.shared
        for a, b in zip(read.layouts, written.layouts, strict=True):
            assert_same_layout(a, b)
        return
    assert_same_layout(read, written)


def round_trip(layout, folder, formats=("csv", "tileconfig")) -> None:
    """Write ``layout`` in every format into ``folder`` (not the tiles' folder), read it back,
    and compare."""
    folder.mkdir(parents=True, exist_ok=True)
    if "csv" in formats:
        assert_same(read_layout(write_csv_layout(layout, folder / "l.layout.csv")), layout)
    if "tileconfig" in formats and not isinstance(layout, TimeSeries):
        path = write_tileconfig(layout, folder / "l.TileConfiguration.txt")
        assert_same(read_layout(path), layout)


# --- the real multi-channel and CZI sets (issue 13, item 1) --------------------------------


def test_leica_two_channels_round_trip(tmp_path):
    layout = read_pattern(LEICA, LEICA_PATTERN, overlap=0.1)
    assert layout.channels == ("00", "01") and len(layout.tiles[0].source.paths) == 2
    round_trip(layout, tmp_path / "out")
    round_trip(layout.rotated(0.7), tmp_path / "rotated")


@pytest.mark.parametrize("options", [{}, {"flip_x": True}, {"scene": 0}])
def test_czi_round_trip(tmp_path, options):
    layout = read_czi(CZI, **options)
    assert layout.pixel_size_source == "CZI metadata"
    round_trip(layout, tmp_path / "out")


def test_czi_tile_subset_and_order_round_trip(tmp_path):
    """A sidecar may list some of a CZI's tiles in any order: each row names its tile."""
    from dataclasses import replace

    full = read_czi(CZI)
    layout = replace(full, tiles=full.tiles[::-1]).with_positions([[5.5, 1.25], [0, 0]])
    round_trip(layout, tmp_path / "rev")
    round_trip(replace(full, tiles=full.tiles[1:]), tmp_path / "one")


# --- TileConfiguration and CSV inputs ------------------------------------------------------


@pytest.fixture
def flat_tiles(tmp_path):
    folder = tmp_path / "tiles"
    folder.mkdir()
    for i in range(3):
        tifffile.imwrite(folder / f"t{i}.tif", np.arange(120, dtype=np.uint16).reshape(10, 12) + i)
    return folder


def test_tileconfig_2d_round_trip(flat_tiles, tmp_path):
    (flat_tiles / "tc.txt").write_text(
        "dim = 2\nt0.tif; ; (0, 0)\nt1.tif; ; (10.123456789012345, 0.1)\n"
        "t2.tif; ; (-3.3333333333333335, 9.87654321)\n")
    layout = read_layout(flat_tiles / "tc.txt")
    assert layout.tiles[1].position[1] == 10.123456789012345
    round_trip(layout, tmp_path / "out")
    round_trip(layout.rotated(1.5), tmp_path / "rot")  # rotation survives a TileConfiguration too


def test_real_confocal_tileconfig_round_trip(tmp_path):
    layout = read_layout(DATA / "lscm_speckle_3x4" / "TileConfiguration.txt")
    assert layout.channels == ("0",) and len(layout.tiles) == 12
    round_trip(layout, tmp_path / "out")


def test_grey_stored_as_rgb_round_trip(tmp_path):
    folder = tmp_path / "tiles"
    folder.mkdir()
    for i in range(2):
        grey = np.arange(80, dtype=np.uint8).reshape(8, 10) + i
        tifffile.imwrite(folder / f"g{i}.tif", np.stack([grey] * 3, axis=-1), photometric="rgb")
    (folder / "tc.txt").write_text("dim = 2\ng0.tif; ; (0, 0)\ng1.tif; ; (9, 0)\n")
    layout = read_layout(folder / "tc.txt")
    assert layout.channels == ("0",) and layout.tiles[0].source.channels == (0,)
    round_trip(layout, tmp_path / "out")


def test_tileconfig_3d_round_trip(tmp_path):
    folder = tmp_path / "tiles"
    folder.mkdir()
    for i in range(2):
        tifffile.imwrite(folder / f"z{i}.tif", np.full((4, 10, 10), i + 1, np.uint16),
                         photometric="minisblack")
    (folder / "tc.txt").write_text("dim = 3\nz0.tif; ; (0, 0, 0)\nz1.tif; ; (8.5, 0, 2.25)\n")
    layout = read_layout(folder / "tc.txt")
    assert layout.ndim == 3
    round_trip(layout, tmp_path / "out")
    round_trip(layout.rotated(-2.0), tmp_path / "rot")


def test_tileconfig_multiseries_round_trip(tmp_path):
    folder = tmp_path / "tiles"
    folder.mkdir()
    with tifffile.TiffWriter(folder / "multi.ome.tif", ome=True) as tw:
        for i in range(3):
            tw.write(np.full((8, 9), i + 5, np.uint16), metadata={"axes": "YX"})
    (folder / "tc.txt").write_text("dim = 2\nmultiseries = true\nmulti.ome.tif; 0; (0, 0)\n"
                                   "multi.ome.tif; 2; (9, 0)\nmulti.ome.tif; 1; (18, 0.5)\n")
    layout = read_layout(folder / "tc.txt")
    assert [t.source.series for t in layout.tiles] == [0, 2, 1]
    round_trip(layout, tmp_path / "out")


def test_csv_positions_and_affines_round_trip(flat_tiles, tmp_path):
    (flat_tiles / "p.csv").write_text("file,x,y\nt0.tif,0,0\nt1.tif,11.1,0.5\nt2.tif,0,7\n")
    round_trip(read_layout(flat_tiles / "p.csv"), tmp_path / "p")
    (flat_tiles / "a.csv").write_text(
        'file,affine\nt0.tif,"0.5 0 3 0 2 4"\nt1.tif,0.9;-0.1;20;0.1;0.9;0.3\n'
        "t2.tif,1 0 0 0 1 0\n")
    round_trip(read_layout(flat_tiles / "a.csv"), tmp_path / "a")


def test_csv_time_series_round_trip(flat_tiles, tmp_path):
    # per time point positions (not shared), time names kept as written
    (flat_tiles / "t.csv").write_text(
        "t,file,x,y\n007,t0.tif,0,0\n007,t1.tif,10,0\n010,t1.tif,0.25,0\n010,t2.tif,10,0.5\n")
    series = read_layout(flat_tiles / "t.csv")
    assert isinstance(series, TimeSeries) and series.names == ("007", "010")
    assert not series.shared
    round_trip(series, tmp_path / "t")
    # shared positions
    (flat_tiles / "s.csv").write_text("t,file,x,y\n0,t0.tif,0,0\n0,t1.tif,10,0\n"
                                      "1,t2.tif,0,0\n1,t0.tif,10,0\n")
    shared = read_layout(flat_tiles / "s.csv")
    assert shared.shared
    round_trip(shared, tmp_path / "s")


def test_time_series_identical_positions_but_not_shared_stays_so(flat_tiles, tmp_path):
    (flat_tiles / "s.csv").write_text("t,file,x,y\n0,t0.tif,0,0\n1,t1.tif,0,0\n")
    shared = read_layout(flat_tiles / "s.csv")
    from dataclasses import replace

    round_trip(replace(shared, shared=False), tmp_path / "s")


# --- OME-TIFF ------------------------------------------------------------------------------


def _ome_meta(stage_xy, size=(0.5, 0.25), name="DAPI"):
    return {
        "axes": "YX", "PhysicalSizeX": size[0], "PhysicalSizeY": size[1],
        "Channel": {"Name": [name]},
        "Plane": {"PositionX": [stage_xy[0]], "PositionY": [stage_xy[1]],
                  "PositionXUnit": ["µm"], "PositionYUnit": ["µm"]},
    }


def test_ome_tiff_one_file_many_series_round_trip(tmp_path):
    path = tmp_path / "multi.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        for i, (r, c) in enumerate([(0, 0), (0, 1), (1, 0)]):
            tw.write(np.full((12, 16), i + 1, np.uint16),
                     metadata=_ome_meta((100 + 4.1 * c, -50 + 3.3 * r)))
    layout = read_ome_tiff(path, flip_y=True)
    assert layout.pixel_size == (0.25, 0.5) and layout.pixel_size_source == "OME-XML"
    round_trip(layout, tmp_path / "out")


def test_ome_tiff_one_file_per_tile_round_trip(tmp_path):
    paths = []
    for i in range(3):
        (tmp_path / f"f{i}").mkdir()
        paths.append(tmp_path / f"f{i}" / f"tile{i}.ome.tif")
        tifffile.imwrite(paths[-1], np.full((12, 16), i, np.uint8), ome=True,
                         metadata=_ome_meta((7.7 * i, 0.1 * i), name="GFP"))
    layout = read_ome_tiff(paths)
    assert layout.channels == ("GFP",)
    round_trip(layout, tmp_path / "out")


# --- pattern folders -----------------------------------------------------------------------


def _grid(folder, name, shape=(10, 14), n=(2, 2), **fields):
    folder.mkdir(parents=True, exist_ok=True)
    for r in range(n[0]):
        for c in range(n[1]):
            data = np.full(shape, 10 * r + c, np.uint16)
            tifffile.imwrite(folder / name.format(r=r, c=c, i=r * n[1] + c + 1, **fields), data)


def test_pattern_row_col_round_trip(tmp_path):
    _grid(tmp_path / "rc", "r{r}_c{c}.tif")
    round_trip(read_pattern(tmp_path / "rc", "r{row}_c{col}.tif", overlap=0.15), tmp_path / "o")


def test_pattern_index_round_trip(tmp_path):
    _grid(tmp_path / "ix", "img_{i:03d}.tif")
    layout = read_pattern(tmp_path / "ix", "img_{index}.tif", grid="2x2", order="snake-cols")
    round_trip(layout, tmp_path / "o")


def test_pattern_channel_files_round_trip(tmp_path):
    for ch in ("dapi", "gfp"):
        _grid(tmp_path / "ch", "r{r}_c{c}_" + ch + ".tif")
    layout = read_pattern(tmp_path / "ch", "r{row}_c{col}_{channel}.tif", overlap=0.1)
    assert layout.channels == ("dapi", "gfp")
    round_trip(layout, tmp_path / "o")


def test_pattern_z_planes_round_trip(tmp_path):
    for z in range(3):
        _grid(tmp_path / "z", "p_r{r}_c{c}_z" + str(z) + ".tif")
    layout = read_pattern(tmp_path / "z", "p_r{row}_c{col}_z{z}.tif", overlap=0.1, z_step=2.5)
    assert layout.ndim == 3 and layout.pixel_size == (2.5, 1.0, 1.0)
    round_trip(layout, tmp_path / "o")


def test_pattern_time_points_round_trip(tmp_path):
    for t in ("003", "010"):
        _grid(tmp_path / "t", "s_t" + t + "_r{r}_c{c}.tif")
    series = read_pattern(tmp_path / "t", "s_t{t}_r{row}_c{col}.tif", overlap=0.1)
    assert isinstance(series, TimeSeries) and series.names == ("003", "010") and series.shared
    round_trip(series, tmp_path / "o")


# --- in memory -----------------------------------------------------------------------------


def test_in_memory_layout_cannot_be_saved_as_files(tmp_path):
    layout = layout_from_arrays([np.zeros((4, 5), np.uint8)] * 2, positions=[[0, 0], [0, 4]])
    for write, name in ((write_csv_layout, "m.csv"), (write_tileconfig, "m.txt")):
        with pytest.raises(InputError, match=r"tile 0.*in memory.*save the tiles"):
            write(layout, tmp_path / name)
        assert not (tmp_path / name).exists()


def test_time_series_is_not_a_tileconfiguration(flat_tiles, tmp_path):
    (flat_tiles / "t.csv").write_text("t,file,x,y\n0,t0.tif,0,0\n1,t1.tif,0,0\n")
    with pytest.raises(InputError, match=r"time series.*CSV"):
        write_tileconfig(read_layout(flat_tiles / "t.csv"), tmp_path / "x.txt")


# --- what the CLI writes -------------------------------------------------------------------


def test_cli_sidecars_and_registered_layout_read_back(tmp_path):
    """``fuse`` writes NAME.layout.csv and NAME.TileConfiguration.txt, ``register`` its layout:
    each reads back as the Leica set's two channels at its pixel size."""
    truth = read_pattern(LEICA, LEICA_PATTERN, overlap=0.1)
    out = tmp_path / "leica.ome.zarr"
    result = run_cli("fuse", LEICA, "--pattern", LEICA_PATTERN, "--overlap", "0.1", "-o", out,
                     "--chunk", "1024", "-q")
    assert result.returncode == 0, result.stderr
    for sidecar in ("leica.layout.csv", "leica.TileConfiguration.txt"):
        assert_same(read_layout(tmp_path / sidecar), truth)
    reg = tmp_path / "reg.txt"
    result = run_cli("register", LEICA, "--pattern", LEICA_PATTERN, "--overlap", "0.1",
                     "-o", reg, "-q")
    assert result.returncode == 0, result.stderr
    again = read_layout(reg)
    assert again.channels == truth.channels and again.pixel_size == truth.pixel_size
    assert [_source_facts(t.source) for t in again.tiles] == [
        _source_facts(t.source) for t in truth.tiles]


def test_cli_czi_layout_csv_reads_back(tmp_path):
    out = tmp_path / "czi.ome.zarr"
    result = run_cli("fuse", CZI, "-o", out, "--chunk", "1024", "-q")
    assert result.returncode == 0, result.stderr
    truth = read_czi(CZI)
    for sidecar in ("czi.layout.csv", "czi.TileConfiguration.txt"):
        assert_same(read_layout(tmp_path / sidecar), truth)


@pytest.mark.parametrize("name", ["reg.txt", "reg.csv", "reg.CSV"])
def test_save_layout_writes_what_its_name_says(tmp_path, name):
    """``tilefuse register -o NAME``: a .csv name gets a CSV, anything else a TileConfiguration;
    both read back whole."""
    from tilefuse.pipeline import save_layout

    layout = read_pattern(LEICA, LEICA_PATTERN, overlap=0.1).rotated(0.3)
    assert_same(read_layout(save_layout(layout, tmp_path / name)), layout)


def test_save_fused_layout_writes_both_sidecars(tmp_path):
    from tilefuse.pipeline import save_sidecars

    layout = read_czi(CZI)
    saved = save_sidecars(layout, tmp_path / "m.ome.zarr")
    assert saved == (tmp_path / "m.layout.csv", tmp_path / "m.TileConfiguration.txt")
    for sidecar in ("m.layout.csv", "m.TileConfiguration.txt"):
        assert_same(read_layout(tmp_path / sidecar), layout)


def test_sidecar_that_no_longer_matches_its_tiles_is_refused(flat_tiles, tmp_path):
    layout = read_layout(_write_tc(flat_tiles))
    text = write_csv_layout(layout, tmp_path / "l.csv").read_text()
    bad = {
        "dtype": (text.replace('"uint16"', '"uint8"'), r"l.csv:\d+: .*written for uint8 tiles"),
        "channels": (text.replace('["0"]', '["a", "b"]'), r"l.csv:\d+: .*2 channel\(s\) \(a, b\)"),
        "json": (text.replace('"micrometer"', "micrometer"), r"l.csv:\d+: tilefuse.unit is not"),
        "type": (text.replace('"micrometer"', "3"), r"l.csv:\d+: tilefuse.unit must be"),
        "size": (text.replace("= [1.0, 1.0]", "= [1.0]"), r"pixel_size_xyz has 1 values.* 2D"),
    }
    for name, (changed, message) in bad.items():
        (tmp_path / "l.csv").write_text(changed)
        with pytest.raises(InputError, match=message):
            read_layout(tmp_path / "l.csv")
        assert changed != text, name


def _write_tc(folder):
    (folder / "tc.txt").write_text("dim = 2\nt0.tif; ; (0, 0)\nt1.tif; ; (10, 0)\n")
    return folder / "tc.txt"
