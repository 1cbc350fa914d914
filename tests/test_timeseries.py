"""Time series ({t}, a CSV t column) and one file per z plane ({z}), end to end, exact truth."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr_models import v04, v05

from conftest import run_cli
from tilefuse import fuse, plan_fusion
from tilefuse.errors import InputError
from tilefuse.io.readers import read_layout
from tilefuse.model.mosaic import Mosaic
from tilefuse.model.timeseries import TimeSeries
from tilefuse.ome_zarr.writer import read_ome_zarr_level, write_ome_zarr
from tilefuse.plan.geometry import union_box
from tilefuse.testing import Scene, grid_tileset

PATTERN = "tile_t{t}_r{row}_c{col}.tif"


def _write_grid(folder, tiles, cols: int, name: str) -> None:
    """Tiles of a row-major grid as ``name.format(r=row, c=col)``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        tifffile.imwrite(folder / name.format(r=r, c=c), tile)


def _ome(path) -> dict:
    attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    return attrs.get("ome", attrs)


def _assert_user_error(result, *needles) -> None:
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and "%|" not in ln]  # bars
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _csv(path, rows) -> None:
    """A CSV layout ``t,file,x,y`` from (t, file, position zyx) rows."""
    lines = ["t,file,x,y"] + [f"{t},{f},{float(p[1])!r},{float(p[0])!r}" for t, f, p in rows]
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------ {t}: exact truth


@pytest.fixture(scope="module")
def series_folder(tmp_path_factory):
    """3 time points of a 2x3 grid, each a different scene at integer positions."""
    folder = tmp_path_factory.mktemp("series")
    sets = [grid_tileset(grid=(2, 3), tile_shape=(40, 52), overlap=0.2, seed=t) for t in range(3)]
    for t, ts in enumerate(sets):
        _write_grid(folder / "tiles", ts.tiles, 3, f"tile_t{t}_r{{r}}_c{{c}}.tif")
    return folder, sets


def test_pattern_time_series_fuses_every_time_point_to_its_truth(series_folder):
    folder, sets = series_folder
    out = folder / "m.ome.zarr"
    result = run_cli("fuse", folder / "tiles", "--pattern", PATTERN, "--overlap", "0.2",
                     "--chunk", "32", "--pixel-size", "0.5", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "fused 3 time points of 6 tiles" in result.stderr
    mosaic = read_ome_zarr_level(out).compute()
    assert mosaic.shape == (3, *sets[0].truth.shape)
    for t, ts in enumerate(sets):
        np.testing.assert_array_equal(mosaic[t], ts.truth)  # covered: exact; elsewhere fill 0
    meta = _ome(out)["multiscales"][0]
    assert [(a["name"], a["type"]) for a in meta["axes"]] == [
        ("t", "time"), ("y", "space"), ("x", "space")]
    assert meta["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 0.5, 0.5]
    assert zarr.open_group(str(out), mode="r")["0"].chunks == (1, 32, 32)
    saved = read_layout(folder / "m.layout.csv")  # the layout written beside, read back
    assert isinstance(saved, TimeSeries) and saved.shared and saved.names == ("0", "1", "2")
    for t in range(3):
        read = read_layout(folder / "tiles", pattern=PATTERN, overlap=0.2).at_time(t)
        assert [x.source.key for x in saved.at_time(t).tiles] == [x.source.key for x in read.tiles]
        np.testing.assert_array_equal(saved.at_time(t).affines, read.affines)


def test_info_counts_time_points(series_folder):
    folder, _ = series_folder
    result = run_cli("info", folder / "tiles", "--pattern", PATTERN, "--overlap", "0.2",
                     "--timepoint", "2")
    assert result.returncode == 0, result.stderr
    assert "time points:  3 (0, 1, 2); positions shared" in result.stdout
    assert "time point 2 (--timepoint 2):" in result.stdout and "tile_t2_r0_c0.tif" in result.stdout


def test_fractional_shared_positions_equal_single_time_point_fusion(tmp_path):
    """A CSV t column at fractional positions (same at every t): each time point is bit for bit
    the single-time-point fusion of the same code."""
    ts = grid_tileset(grid=(2, 2), tile_shape=(40, 48), overlap=0.25, position_error=3,
                      fractional=True, seed=4)
    rows = []
    for t, gain in enumerate((1.0, 0.6, 0.3)):
        for i, (tile, pos) in enumerate(zip(ts.tiles, ts.layout.positions, strict=True)):
            tifffile.imwrite(tmp_path / f"f{t}_{i}.tif", np.rint(tile * gain).astype(np.uint16))
            rows.append((t, f"f{t}_{i}.tif", pos))
    _csv(tmp_path / "series.csv", rows)
    out = tmp_path / "m.ome.zarr"
    result = run_cli("fuse", tmp_path / "series.csv", "-o", out, "--chunk", "24", "-q")
    assert result.returncode == 0, result.stderr
    mosaic = read_ome_zarr_level(out).compute()
    assert read_layout(tmp_path / "series.csv").shared
    for t in range(3):
        alone = fuse(read_layout(tmp_path / "series.csv").at_time(t), chunk=24).compute()
        np.testing.assert_array_equal(mosaic[t], alone)


def test_per_time_point_positions_share_one_box(tmp_path):
    """Positions differ per time point (a drifting stage): one output box, the union; each time
    point equals its own fusion in that box, and its standalone fusion inside it."""
    sets = [grid_tileset(grid=(1, 2), tile_shape=(36, 44), overlap=0.3, position_error=4,
                         fractional=True, seed=s) for s in (1, 2)]
    drift = [np.array([0.0, 0.0]), np.array([5.5, -7.25])]
    rows = []
    for t, (ts, d) in enumerate(zip(sets, drift, strict=True)):
        for i, (tile, pos) in enumerate(zip(ts.tiles, ts.layout.positions, strict=True)):
            tifffile.imwrite(tmp_path / f"d{t}_{i}.tif", tile)
            rows.append((f"t{t}", f"d{t}_{i}.tif", pos + d))
    _csv(tmp_path / "drift.csv", rows)
    series = read_layout(tmp_path / "drift.csv")
    assert not series.shared and series.names == ("t0", "t1")
    out = tmp_path / "d.ome.zarr"
    result = run_cli("fuse", tmp_path / "drift.csv", "-o", out, "--chunk", "20", "-q")
    assert result.returncode == 0, result.stderr
    mosaic = read_ome_zarr_level(out).compute()
    origin, shape = union_box(series.layouts)
    assert mosaic.shape == (2, *shape)
    for t, layout in enumerate(series.layouts):
        boxed = fuse(plan_fusion(layout, chunk=20, box=(origin, shape))).compute()
        np.testing.assert_array_equal(mosaic[t], boxed)
        alone = fuse(layout, chunk=20).compute()
        own = plan_fusion(layout).chunks.origin - origin
        window = tuple(slice(o, o + n) for o, n in zip(own, alone.shape, strict=True))
        np.testing.assert_array_equal(mosaic[t][window], alone)
        rest = np.ones(shape, bool)
        rest[window] = False
        assert not mosaic[t][rest].any()  # fill outside the time point's own mosaic
    saved = read_layout(tmp_path / "d.layout.csv")
    assert not saved.shared and saved.names == series.names
    for a, b in zip(saved.layouts, series.layouts, strict=True):
        np.testing.assert_array_equal(a.affines, b.affines)


# ------------------------------------------------------------------------ {z}: plane files


def test_z_planes_fuse_to_the_3d_truth_and_equal_stacks(tmp_path):
    ts = grid_tileset(grid=(2, 2), tile_shape=(11, 30, 36), overlap=0.25, seed=6)
    for i, tile in enumerate(ts.tiles):
        r, c = divmod(i, 2)
        tifffile.imwrite(tmp_path / f"stack_r{r}_c{c}.tif", tile)
        for z, plane in enumerate(tile):  # unpadded plane numbers: z10 sorts after z9
            tifffile.imwrite(tmp_path / f"plane_r{r}_c{c}_z{z}.tif", plane)
    outs = {}
    for name, pattern in (("planes", "plane_r{row}_c{col}_z{z}.tif"),
                          ("stacks", "stack_r{row}_c{col}.tif")):
        outs[name] = tmp_path / f"{name}.ome.zarr"
        result = run_cli("fuse", tmp_path, "--pattern", pattern, "--overlap", "0.25", "--chunk",
                         "8", "24", "24", "--z-step", "2.5", "--pixel-size", "0.5", "-o",
                         outs[name], "-q")
        assert result.returncode == 0, result.stderr
    planes = read_ome_zarr_level(outs["planes"]).compute()
    np.testing.assert_array_equal(planes, ts.truth)
    np.testing.assert_array_equal(planes, read_ome_zarr_level(outs["stacks"]).compute())
    meta = _ome(outs["planes"])["multiscales"][0]
    assert [a["name"] for a in meta["axes"]] == ["z", "y", "x"]
    assert meta["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.25, 0.5, 0.5]
    layout = read_layout(tmp_path, pattern="plane_r{row}_c{col}_z{z}.tif", overlap=0.25)
    assert layout.tiles[0].name == "plane_r0_c0_z{z}.tif" and layout.tiles[0].shape == (11, 30, 36)
    assert layout.tiles[0].source.planes[10] == (str(tmp_path / "plane_r0_c0_z10.tif"),)
    for sidecar in ("planes.TileConfiguration.txt", "planes.layout.csv"):  # read back as planes
        again = read_layout(tmp_path / sidecar)
        assert [t.source.key for t in again.tiles] == [t.source.key for t in layout.tiles]
        np.testing.assert_allclose(again.positions, layout.positions)


def test_z_step_default_and_plane_errors(tmp_path):
    for c in range(2):
        for z in range(3 if c else 4):
            tifffile.imwrite(tmp_path / f"p_r0_c{c}_z{z}.tif", np.full((12, 16), z, np.uint16))
    _assert_user_error(run_cli("info", tmp_path, "--pattern", "p_r{row}_c{col}_z{z}.tif"),
                       "tile p_r0_c1_z{z}.tif has 3 z planes", "p_r0_c0_z{z}.tif has 4")
    tifffile.imwrite(tmp_path / "p_r0_c1_z3.tif", np.zeros((12, 15), np.uint16))  # odd shape
    layout = read_layout(tmp_path, pattern="p_r{row}_c{col}_z{z}.tif", overlap=0.5)
    assert layout.pixel_size == (1.0, 1.0, 1.0)
    result = run_cli("fuse", tmp_path, "--pattern", "p_r{row}_c{col}_z{z}.tif", "-o",
                     tmp_path / "o.ome.zarr", "-q")
    _assert_user_error(result, "p_r0_c1_z3.tif: plane 3 is 12 x 15 uint16",
                       "plane 0 (", "is 12 x 16 uint16")
    tifffile.imwrite(tmp_path / "flat_r0_c0.tif", np.zeros((12, 16), np.uint16))
    _assert_user_error(run_cli("info", tmp_path, "--pattern", "flat_r{row}_c{col}.tif",
                               "--z-step", "2"), "--z-step", "2D", "{z}")


# ------------------------------------------------------------------------ registration


def test_register_on_one_time_point_moves_every_time_point_to_truth(tmp_path):
    ts = grid_tileset(grid=(2, 3), tile_shape=(96, 96), overlap=0.25, position_error=6,
                      fractional=True, seed=7)
    for t in range(3):  # same fields of view, different content at every time point
        scene = ts.scene if t == 0 else Scene(ts.scene.extent, "cells", seed=100 + t)
        tiles = [np.rint(scene.sample(a, (96, 96)) * 60000).astype(np.uint16)
                 for a in ts.layout.affines]
        _write_grid(tmp_path / "tiles", tiles, 3, f"tile_t{t}_r{{r}}_c{{c}}.tif")
    out = tmp_path / "m.ome.zarr"
    result = run_cli("fuse", tmp_path / "tiles", "--pattern", PATTERN, "--overlap", "0.25",
                     "--register", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "registered on time point 0 (--timepoint 0); each tile's correction applied to the " \
           "same tile at all 3 time points (positions shared)" in result.stderr
    saved = read_layout(tmp_path / "m.layout.csv")
    truth = ts.layout.positions
    stage = read_layout(tmp_path / "tiles", pattern=PATTERN, overlap=0.25).at_time(1)
    d = stage.positions - truth
    assert np.linalg.norm(d - d.mean(axis=0), axis=1).max() > 3  # the stage error was real
    for t in range(3):
        d = saved.at_time(t).positions - truth
        assert np.linalg.norm(d - d.mean(axis=0), axis=1).max() < 0.1, (t, d)
    result = run_cli("register", tmp_path / "tiles", "--pattern", PATTERN, "--overlap", "0.25",
                     "--timepoint", "2", "-q")
    assert result.returncode == 0, result.stderr
    again = read_layout(tmp_path / "tiles.registered.csv")
    d = again.at_time(0).positions - truth
    assert np.linalg.norm(d - d.mean(axis=0), axis=1).max() < 0.1
    _assert_user_error(run_cli("register", tmp_path / "tiles", "--pattern", PATTERN, "-o",
                               tmp_path / "r.txt"), "r.txt", "CSV", "-o NAME.csv")


# ------------------------------------------------------------------------ errors


def _tiny(folder, t, shape=(16, 20), dtype=np.uint16, channels=("",), cols=2):
    for c in range(cols):
        for ch in channels:
            tifffile.imwrite(folder / f"a_t{t}_r0_c{c}{ch}.tif", np.ones(shape, dtype))


@pytest.mark.parametrize(("make", "pattern", "needles"), [
    (lambda f: (_tiny(f, 0, channels=("_chA", "_chB")), _tiny(f, 1, channels=("_chA",))),
     "a_t{t}_r{row}_c{col}_ch{channel}.tif",
     ["time point 1 has channel(s) 'A', time point 0 has 'A', 'B'", "same channels"]),
    (lambda f: (_tiny(f, 0), _tiny(f, 1, dtype=np.uint8)), "a_t{t}_r{row}_c{col}.tif",
     ["time point 1 has dtype uint8, time point 0 has uint16"]),
    (lambda f: (_tiny(f, 0), _tiny(f, 1),
                tifffile.imwrite(f / "a_t1_r0_c0.tif", np.ones((16, 18), np.uint16))),
     "a_t{t}_r{row}_c{col}.tif", ["a_t1_r0_c0.tif (time point 1) is 16 x 18", "is 16 x 20"]),
    (lambda f: (_tiny(f, 0), _tiny(f, 1, cols=1)), "a_t{t}_r{row}_c{col}.tif",
     ["grid row 0, column 1 has no file at time point 1", "a_t0_r0_c1.tif",
      "every time point needs every tile"]),
    (lambda f: [(f / f"s_t{t}_r0_c0.czi").write_bytes(b"ZISRAWFILE") for t in (0, 1)],
     "s_t{t}_r{row}_c{col}.czi", ["matches a .czi file", "{t} reads one image file",
                                  "CSV layout with a t column"]),
])
def test_time_series_errors(tmp_path, make, pattern, needles):
    make(tmp_path)
    _assert_user_error(run_cli("info", tmp_path, "--pattern", pattern), *needles)


def test_timepoint_and_csv_time_errors(tmp_path):
    _tiny(tmp_path, 0)
    _tiny(tmp_path, 1)
    tifffile.imwrite(tmp_path / "float.tif", np.ones((16, 20), np.float32))
    _assert_user_error(run_cli("fuse", tmp_path, "--pattern", "a_t{t}_r{row}_c{col}.tif",
                               "--timepoint", "5", "--register", "-o", tmp_path / "o"),
                       "time point 5 does not exist", "--timepoint 0 to 1")
    _csv(tmp_path / "mixed.csv", [(0, "a_t0_r0_c0.tif", (0, 0)), (1, "float.tif", (0, 3))])
    _assert_user_error(run_cli("info", tmp_path / "mixed.csv"),
                       "time point 1 has dtype float32, time point 0 has uint16")
    (tmp_path / "plain.csv").write_text("file,x,y\na_t0_r0_c0.tif,0,0\n")
    _assert_user_error(run_cli("info", tmp_path / "plain.csv", "--timepoint", "1"),
                       "--timepoint 1", "has no time points")
    _csv(tmp_path / "two.csv", [(0, "a_t0_r0_c0.tif", (0, 0)), (1, "a_t1_r0_c0.tif", (0, 3))])
    two = read_layout(tmp_path / "two.csv")  # a time series, read as one
    assert isinstance(two, TimeSeries) and two.names == ("0", "1")
    with pytest.raises(InputError, match="take a Layout or a TimeSeries, got list"):
        fuse(list(two.layouts))


def test_explicit_box_crops_and_extends_the_mosaic():
    ts = grid_tileset(grid=(1, 3), tile_shape=(20, 24), overlap=0.25, seed=2)
    full = fuse(ts.layout, chunk=8).compute()
    plan = plan_fusion(ts.layout, chunk=8, box=((2, 30), (10, 15)))
    assert set(plan.chunks.indices) == {1, 2}  # the first tile is outside the box
    np.testing.assert_array_equal(fuse(plan).compute(), full[2:12, 30:45])
    wider = fuse(ts.layout, chunk=8, box=((-3, -5), (30, 70))).compute()
    np.testing.assert_array_equal(wider[3:23, 5:5 + full.shape[1]], full)
    assert not wider[:3].any() and not wider[23:].any()


# ------------------------------------------------------------------------ OME-Zarr t axis


@pytest.mark.parametrize(("version", "model"), [("0.5", v05.Image), ("0.4", v04.Image)])
def test_t_axis_metadata_validates(tmp_path, version, model):
    data = np.arange(2 * 2 * 3 * 20 * 24, dtype=np.uint16).reshape(2, 2, 3, 20, 24)
    mosaic = Mosaic(da.from_array(data, chunks=(1, 1, 3, 16, 16)), ("t", "c", "z", "y", "x"),
                    pixel_size=(2.0, 0.5, 0.5))
    out = write_ome_zarr(mosaic, tmp_path / "t.ome.zarr", ngff_version=version)
    model.from_zarr(zarr.open_group(str(out), mode="r"))
    meta = _ome(out)["multiscales"][0]
    assert [a["type"] for a in meta["axes"]] == ["time", "channel", "space", "space", "space"]
    assert meta["datasets"][1]["coordinateTransformations"][0]["scale"] == [1, 1, 2, 1, 1]
    np.testing.assert_array_equal(read_ome_zarr_level(out).compute(), data)
