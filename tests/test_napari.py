"""The napari plugin, headless: manifest, reader, and the fusion widget driven from code.

napari's and npe2's pytest plugins (``make_napari_viewer``) are disabled for the suite in
pyproject.toml (``-p no:napari -p no:npe2``): they would load into every test run. npe2 is
imported inside the tests, where ``pytestmark`` filters its import-time warnings. Layers are
added to napari's ``ViewerModel`` (no OpenGL needed); one test docks the widget in a real,
invisible ``napari.Viewer``.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("NAPARI_CONFIG", "")  # no settings file is read or written

from pathlib import Path

import napari
import numpy as np
import pytest

from tilefuse.io.readers import read_layout
from tilefuse.napari.reader import get_reader
from tilefuse.napari.widget import FuseWidget
from tilefuse.ome_zarr.writer import read_ome_zarr_level
from tilefuse.registration import register
from tilefuse.testing import grid_tileset, write_tileset

pytestmark = [
    # napari (0.9) asks Qt for the system colour theme when it creates its QApplication and
    # warns that PyQt5 (the Qt5 binding of the test extra) cannot tell; harmless here.
    pytest.mark.filterwarnings(
        "ignore:System theme detection requires a Qt6 backend:UserWarning:napari"
    ),
    # npe2 0.10 (napari's plugin engine) declares pydantic fields with extra keywords (min_ver)
    # and allow_mutation; pydantic 2 deprecates both, warned once when npe2 is first imported.
    pytest.mark.filterwarnings(
        "ignore:Using extra keyword arguments on `Field` is deprecated:DeprecationWarning:npe2"
    ),
    pytest.mark.filterwarnings("ignore:`allow_mutation` is deprecated:DeprecationWarning:npe2"),
    # napari 0.9's evented models still set pydantic's json_encoders; deprecated in pydantic 2,
    # warned when napari first builds those models.
    pytest.mark.filterwarnings("ignore:`json_encoders` is deprecated:DeprecationWarning"),
]

MANIFEST = Path(__file__).parents[1] / "src" / "tilefuse" / "napari.yaml"
WAIT_MS = 30_000


@pytest.fixture
def tileset_file(tmp_path: Path):
    """A 2 x 3 grid of 2D tiles with their true positions in a TileConfiguration.txt."""
    ts = grid_tileset(grid=(2, 3), tile_shape=(48, 64), overlap=0.2, seed=1)
    return ts, write_tileset(ts, tmp_path / "tiles", stage=False)


@pytest.fixture
def model():
    """napari's viewer model: layers as in a viewer, without the OpenGL canvas.

    A real ``napari.Viewer`` draws every added layer with OpenGL, which Qt's offscreen
    platform does not provide without an X server; the layer model is what is under test.
    """
    from napari.components import ViewerModel

    return ViewerModel()


@pytest.fixture
def widget(qtbot, model):
    """The fusion widget on a viewer model; worker threads are awaited after the test."""
    from napari.qt.threading import WorkerBase

    widget = FuseWidget(model)
    qtbot.addWidget(widget)
    yield model, widget
    WorkerBase.await_workers(msecs=WAIT_MS)


def run_widget(qtbot, widget: FuseWidget) -> None:
    """Click Run and wait until the worker's result has been handled in the UI thread."""
    with qtbot.waitSignal(widget.run_finished, timeout=WAIT_MS):
        widget.run_button.click()


# ------------------------------------------------------------------------------------ manifest


def test_manifest_validates_and_is_discovered():
    import npe2

    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == "tilefuse"
    manifest.validate_imports()
    installed = npe2.PluginManifest.from_distribution("tilefuse")
    assert installed.name == "tilefuse"
    assert [r.command for r in installed.contributions.readers] == ["tilefuse.get_reader"]
    assert [w.display_name for w in installed.contributions.widgets] == ["Fuse tiles"]


def test_napari_docks_the_widget_with_its_viewer(qtbot):
    viewer = napari.Viewer(show=False, title="tilefuse test")
    try:
        _, widget = viewer.window.add_plugin_dock_widget("tilefuse", "Fuse tiles")
        assert isinstance(widget, FuseWidget)
        assert widget.viewer.title == "tilefuse test"  # napari passes its viewer (a proxy)
    finally:
        viewer.close()


def test_import_tilefuse_does_not_import_napari():
    import subprocess
    import sys

    code = "import sys, tilefuse; print(any(m in sys.modules for m in ('napari', 'qtpy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -------------------------------------------------------------------------------------- reader


def test_reader_places_each_tile_at_its_position(tileset_file):
    ts, path = tileset_file
    reader = get_reader(str(path))
    assert reader is not None
    layers = reader(str(path))
    assert len(layers) == len(ts.tiles)
    names = [tile.name for tile in read_layout(path).tiles]
    assert names == [f"tile_{i:04d}.tif" for i in range(len(ts.tiles))]
    for (data, meta, kind), tile, pixels, name in zip(layers, ts.layout.tiles, ts.tiles, names,
                                                      strict=True):
        assert kind == "image"
        assert meta["name"] == name
        np.testing.assert_array_equal(data, pixels)
        np.testing.assert_allclose(meta["affine"][:-1, -1], tile.position)
        assert meta["blending"] in ("additive", "translucent_no_depth")


def test_reader_through_npe2_and_napari(model, tileset_file):
    import npe2

    ts, path = tileset_file
    assert len(npe2.read([str(path)], stack=False, plugin_name="tilefuse")) == len(ts.tiles)
    layers = model.open(str(path), plugin="tilefuse")
    assert len(layers) == len(ts.tiles)
    for layer, tile, pixels in zip(layers, ts.layout.tiles, ts.tiles, strict=True):
        np.testing.assert_array_equal(layer.data, pixels)
        # napari maps data pixel (0, 0) to the tile's mosaic position, data order (y, x)
        np.testing.assert_allclose(layer.data_to_world((0, 0)), tile.position)
        inside = np.array([10, 20])
        np.testing.assert_allclose(layer.data_to_world(inside), tile.position + inside)


def test_reader_3d_tiles(tmp_path):
    ts = grid_tileset(grid=(1, 2), tile_shape=(5, 32, 40), overlap=0.25, seed=3)
    path = write_tileset(ts, tmp_path, stage=False)
    layers = get_reader(str(path))(str(path))
    assert len(layers) == 2
    for (data, meta, _), tile, pixels in zip(layers, ts.layout.tiles, ts.tiles, strict=True):
        assert meta["affine"].shape == (4, 4)
        np.testing.assert_allclose(meta["affine"][:-1, -1], tile.position)
        np.testing.assert_array_equal(data, pixels)


def test_reader_declines_what_it_cannot_read(tmp_path, tileset_file):
    _, path = tileset_file
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list\nmilk\n")
    table = tmp_path / "table.csv"
    table.write_text("a,b\n1,2\n")
    fake = tmp_path / "scan.czi"
    fake.write_bytes(b"\x00not a czi")
    for candidate in (notes, table, fake, tmp_path / "missing.txt", tmp_path):
        assert get_reader(str(candidate)) is None, candidate
    assert get_reader([str(path), str(path)]) is None
    assert get_reader([str(path)]) is not None


# -------------------------------------------------------------------------------------- widget


def test_widget_fuses_and_shows_multiscale_mosaic(qtbot, widget, tileset_file, tmp_path):
    viewer, w = widget
    _, path = tileset_file
    out = tmp_path / "mosaic.ome.zarr"
    seen = []
    w.progress_changed.connect(lambda done, total, label: seen.append((done, total, label)))
    w.layout_path.setText(str(path))
    w.output_path.setText(str(out))
    w.blend.setCurrentText("linear")
    w.chunk.setValue(32)  # several chunks and pyramid levels for a small mosaic
    run_widget(qtbot, w)

    assert w.status.text() == f"wrote {out}", w.status.text()
    assert len(viewer.layers) == 1
    layer = viewer.layers[0]
    assert layer.name == "mosaic"
    assert layer.multiscale and len(layer.data) > 1
    np.testing.assert_array_equal(np.asarray(layer.data[0]), read_ome_zarr_level(out, 0))
    np.testing.assert_allclose(layer.translate, [0, 0])
    assert w.summary.text() == ""
    labels = {label for _, _, label in seen}
    assert {"reading layout", "fusing", "pyramid level 1"} <= labels
    done, total, _ = next(s for s in reversed(seen) if s[2] == "fusing")
    assert done == total > 0
    assert w.progress.value() == w.progress.maximum()
    assert w.run_button.isEnabled()


def test_widget_registers_and_moves_tile_layers(qtbot, widget, tmp_path):
    viewer, w = widget
    ts = grid_tileset(grid=(2, 2), tile_shape=(96, 96), overlap=0.25, position_error=5, seed=2)
    path = write_tileset(ts, tmp_path / "tiles", stage=True)
    tiles = viewer.open(str(path), plugin="tilefuse")
    expected, report = register(read_layout(path))
    w.layout_path.setText(str(path))
    w.output_path.setText(str(tmp_path / "registered.ome.zarr"))
    w.register_first.setChecked(True)
    run_widget(qtbot, w)

    assert w.status.text().startswith("wrote"), w.status.text()
    assert w.summary.text() == "\n".join(report.summary_lines())
    assert w.summary.text().startswith("links:")
    for layer, tile in zip(tiles, expected.tiles, strict=True):
        np.testing.assert_allclose(layer.affine.affine_matrix, tile.affine)
    moved = [layer.affine.translate for layer in tiles]
    stage = [tile.position for tile in read_layout(path).tiles]
    assert not np.allclose(moved, stage)
    assert viewer.layers[-1].multiscale


def test_widget_shows_user_errors_in_its_label(qtbot, widget, tileset_file, tmp_path):
    viewer, w = widget
    _, path = tileset_file
    w.layout_path.setText(str(tmp_path / "nothing.txt"))
    w.output_path.setText(str(tmp_path / "out.ome.zarr"))
    run_widget(qtbot, w)
    assert w.status.text().startswith("Error:")
    assert "nothing.txt" in w.status.text()

    (tmp_path / "taken.ome.zarr").mkdir()
    (tmp_path / "taken.ome.zarr" / "notes.txt").write_text("someone's")  # not empty: refused
    w.layout_path.setText(str(path))
    w.output_path.setText(str(tmp_path / "taken.ome.zarr"))
    run_widget(qtbot, w)
    assert "exists" in w.status.text()

    w.output_path.setText(str(tmp_path / "out.ome.zarr"))
    w.overlap.setText("ten percent")
    with qtbot.waitSignal(w.run_finished, timeout=WAIT_MS):
        w.run_button.click()
    assert "overlap must be a number" in w.status.text()
    assert len(viewer.layers) == 0
    assert not (tmp_path / "out.ome.zarr").exists()
    assert w.run_button.isEnabled()


def test_multichannel_tiles_become_one_layer_per_channel(model, tmp_path):
    import tifffile

    from tilefuse.napari.widget import add_mosaic, run_in_widget
    from tilefuse.pipeline import FuseRequest

    ts = grid_tileset(grid=(1, 2), tile_shape=(40, 48), overlap=0.25, seed=4)
    lines = ["dim = 2"]
    for i, (tile, data) in enumerate(zip(ts.layout.tiles, ts.tiles, strict=True)):
        both = np.stack([data, data // 2])
        tifffile.imwrite(tmp_path / f"t{i}.tif", both, imagej=True, metadata={"axes": "CYX"})
        lines.append(f"t{i}.tif; ; ({tile.position[1]}, {tile.position[0]})")
    path = tmp_path / "tiles.txt"
    path.write_text("\n".join(lines) + "\n")

    layers = get_reader(str(path))(str(path))
    assert [meta["name"] for _, meta, _ in layers] == [
        "t0.tif [0]", "t0.tif [1]", "t1.tif [0]", "t1.tif [1]"
    ]
    np.testing.assert_array_equal(layers[3][0], ts.tiles[1] // 2)
    assert layers[0][1]["colormap"] != layers[1][1]["colormap"]

    out = tmp_path / "two.ome.zarr"
    run = run_in_widget(FuseRequest(str(path), str(out), chunk=16))
    assert run.error is None
    add_mosaic(model, run)
    assert [layer.name for layer in model.layers] == ["two [0]", "two [1]"]
    level0 = read_ome_zarr_level(out, 0)
    for c, layer in enumerate(model.layers):
        assert layer.multiscale
        np.testing.assert_array_equal(np.asarray(layer.data[0]), level0[c])


# --------------------------------------------------------------------- lazy and honest reader


def test_opening_a_layout_decodes_no_tile(tileset_file):
    """Layers are lazy: the reader reads headers only; a tile is decoded when it is looked at."""
    import dask.array as da

    from tilefuse.io.tile_cache import cache_stats, clear_cache

    ts, path = tileset_file
    clear_cache()
    layers = get_reader(str(path))(str(path))
    assert cache_stats()["decodes"] == 0
    assert all(isinstance(data, da.Array) for data, _, _ in layers)
    np.testing.assert_array_equal(np.asarray(layers[4][0]), ts.tiles[4])
    assert cache_stats()["decodes"] == 1


def test_tiles_that_cannot_be_decoded_still_open(tileset_file, monkeypatch):
    """A source whose read() fails: opening succeeds (0 reads), only drawing a tile fails."""
    from tilefuse.io.tile_cache import clear_cache
    from tilefuse.io.tiles import FileSource

    _, path = tileset_file
    reads = []

    def broken(self):
        reads.append(self)
        raise OSError("unreadable pixels")

    clear_cache()
    monkeypatch.setattr(FileSource, "read", broken)
    layers = get_reader(str(path))(str(path))
    assert len(layers) == 6 and reads == []
    with pytest.raises(OSError, match="unreadable pixels"):
        np.asarray(layers[0][0])
    assert len(reads) == 1


def test_a_broken_layout_is_an_error_not_another_readers_file(tmp_path):
    """A file that is a layout but cannot be read: napari is told why (not 'no reader')."""
    from tilefuse.errors import InputError

    bad = tmp_path / "bad.txt"
    bad.write_text("dim = 2\nt0.tif; ; (0, zero)\n")
    reader = get_reader(str(bad))
    assert reader is not None
    with pytest.raises(InputError, match=r"bad\.txt:2: coordinates must be numbers"):
        reader(str(bad))
    lost = tmp_path / "lost.csv"
    lost.write_text("file,x,y\nnowhere.tif,0,0\n")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.tif"):
        get_reader(str(lost))(str(lost))
    plain = tmp_path / "plain.ome.tif"  # an OME-TIFF image without stage positions: not ours
    import tifffile

    tifffile.imwrite(plain, np.zeros((8, 8), np.uint8), ome=True)
    assert get_reader(str(plain)) is None


def test_a_time_series_opens_with_a_time_axis(tmp_path):
    import tifffile

    sets = [grid_tileset(grid=(1, 2), tile_shape=(30, 40), overlap=0.25, seed=s) for s in (5, 6)]
    rows = ["t,file,x,y"]
    for t, ts in enumerate(sets):
        for i, (tile, data) in enumerate(zip(ts.layout.tiles, ts.tiles, strict=True)):
            tifffile.imwrite(tmp_path / f"s{t}_{i}.tif", data)
            rows.append(f"{t},s{t}_{i}.tif,{tile.position[1]},{tile.position[0]}")
    (tmp_path / "series.csv").write_text("\n".join(rows) + "\n")
    layers = get_reader(str(tmp_path / "series.csv"))(str(tmp_path / "series.csv"))
    assert len(layers) == 2
    for i, (data, meta, _) in enumerate(layers):
        assert data.shape == (2, 30, 40) and meta["affine"].shape == (4, 4)
        np.testing.assert_allclose(meta["affine"][1:-1, -1], sets[0].layout.tiles[i].position)
        for t in range(2):
            np.testing.assert_array_equal(np.asarray(data[t]), sets[t].tiles[i])


# ------------------------------------------------------------------ the widget is the pipeline


def test_widget_fuses_a_time_series_with_its_layout_beside(qtbot, widget, tmp_path):
    """{t} in the pattern: one image with a t axis, every time point its truth, the layout
    saved beside it as NAME.layout.csv that reads back as the same series."""
    import tifffile

    from tilefuse.model.timeseries import TimeSeries

    viewer, w = widget
    sets = [grid_tileset(grid=(2, 2), tile_shape=(40, 52), overlap=0.2, seed=t) for t in (1, 2)]
    for t, ts in enumerate(sets):
        for i, tile in enumerate(ts.tiles):
            r, c = divmod(i, 2)
            tifffile.imwrite(tmp_path / f"tile_t{t}_r{r}_c{c}.tif", tile)
    out = tmp_path / "series.ome.zarr"
    w.layout_path.setText(str(tmp_path))
    w.pattern.setText("tile_t{t}_r{row}_c{col}.tif")
    w.overlap.setText("0.2")
    w.output_path.setText(str(out))
    w.chunk.setValue(32)
    run_widget(qtbot, w)

    assert w.status.text() == f"wrote {out}", w.status.text()
    level0 = read_ome_zarr_level(out, 0).compute()
    assert level0.shape == (2, *sets[0].truth.shape)
    for t, ts in enumerate(sets):
        np.testing.assert_array_equal(level0[t], ts.truth)
    (layer,) = viewer.layers
    assert layer.multiscale and layer.data[0].shape == level0.shape
    saved = read_layout(tmp_path / "series.layout.csv")
    assert isinstance(saved, TimeSeries) and saved.names == ("0", "1") and saved.shared
    assert not (tmp_path / "series.TileConfiguration.txt").exists()


def test_widget_corrects_intensity_resumes_and_keeps_its_sidecars(qtbot, widget, tileset_file,
                                                                  tmp_path):
    """The widget's run is the command line's: the manifest records the intensity options, the
    layout files are saved beside the image, and resuming a finished image writes nothing."""
    import zarr

    viewer, w = widget
    _, path = tileset_file
    out = tmp_path / "m.ome.zarr"
    w.layout_path.setText(str(path))
    w.output_path.setText(str(out))
    w.chunk.setValue(32)
    w.match_intensity.setChecked(True)
    w.flatfield.setCurrentText("estimate")
    run_widget(qtbot, w)
    assert w.status.text() == f"wrote {out}", w.status.text()
    manifest = zarr.open_group(str(out), mode="r").attrs["tilefuse"]
    assert manifest["match_intensity"] is True and manifest["flatfield"] == "estimate"
    assert manifest["sidecars"] == ["m.layout.csv", "m.TileConfiguration.txt"]
    for sidecar in manifest["sidecars"]:
        assert [t.name for t in read_layout(tmp_path / sidecar).tiles] == [
            t.name for t in read_layout(path).tiles]
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file())

    w.resume.setChecked(True)
    run_widget(qtbot, w)
    assert w.status.text() == f"already complete: {out}", w.status.text()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()) == before
    assert len(viewer.layers) == 2  # the mosaic shown after each run


def test_widget_chunk_is_auto_by_default_and_resumes_a_command_line_run(qtbot, widget,
                                                                       tileset_file, tmp_path):
    """The chunk box starts at "auto" (no chunk: the memory budget's, or the interrupted run's),
    so the widget resumes what `tilefuse fuse --chunk 24` left, instead of refusing a chunk
    that differs."""
    from conftest import run_main, unfinish

    _, w = widget
    ts, path = tileset_file
    out = tmp_path / "cli.ome.zarr"
    assert run_main("fuse", path, "-o", out, "--chunk", "24", "-q").returncode == 0
    unfinish(out)  # as a run killed before its last step leaves it
    w.layout_path.setText(str(path))
    w.output_path.setText(str(out))
    assert w.chunk.text() == "auto" and w.request().chunk is None
    w.resume.setChecked(True)
    run_widget(qtbot, w)
    assert w.status.text() == f"wrote {out}", w.status.text()
    np.testing.assert_array_equal(read_ome_zarr_level(out, 0).compute(), ts.truth)
    w.chunk.setValue(64)
    assert w.request().chunk == 64


def test_widget_fuses_cycles_into_one_layer_per_channel(qtbot, widget, tmp_path):
    """Later cycles and their shared channel in the widget: the run ``tilefuse fuse`` makes
    of the same cycles (``tilefuse.align_cycles`` + ``fuse_cycles``, bit for bit), shown as
    one layer per channel of every cycle; an align channel without cycles is refused."""
    import tilefuse
    from conftest import write_cycle
    from tilefuse.testing import cycle_tilesets

    viewer, w = widget
    cs = cycle_tilesets(n_cycles=2, grid=(2, 2), tile_shape=(128, 128), seed=4)
    paths = [write_cycle(one, tmp_path / f"cycle{k}") for k, one in enumerate(cs.layouts, 1)]
    out = tmp_path / "cycles.ome.zarr"
    w.layout_path.setText(str(paths[0]))
    w.output_path.setText(str(out))
    w.align_channel.setText("DAPI")
    run_widget(qtbot, w)
    assert "an align channel is for cyclic imaging" in w.status.text()

    w.cycles.setText(f" {paths[1]} ;")
    run_widget(qtbot, w)
    assert w.status.text() == f"wrote {out}", w.status.text()
    layouts = [read_layout(p) for p in paths]
    expected = tilefuse.fuse_cycles(
        [a.layout for a in tilefuse.align_cycles(layouts, channel="DAPI")]).compute()
    names = [f"cycles [{c} (cycle {k})]" for k, one in enumerate(layouts, 1)
             for c in one.channels]
    assert [layer.name for layer in viewer.layers] == names
    for k, layer in enumerate(viewer.layers):
        np.testing.assert_array_equal(np.asarray(layer.data[0]), expected[k])
    assert "cycle 2:" in w.summary.text()  # the alignment's summary
