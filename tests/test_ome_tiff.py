"""The pyramidal OME-TIFF output: every level read back by tifffile (each the 2x2 mean of the
one above, identical to the OME-Zarr pyramid), the OME-XML valid for ome-types with the right
sizes, unit, channels and axes, level 0 read by a second reader (bioio-ome-tiff), the same
pixels as the OME-Zarr output of the same run, bounded memory, and the data-safety rules:
only a tilefuse OME-TIFF is replaced, and an interrupted write leaves nothing that looks done."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile

from conftest import run_main
from tilefuse import Mosaic, write_ome_tiff, write_ome_zarr
from tilefuse.errors import InputError
from tilefuse.io.outputs import TIFF_MANIFEST_NAMESPACE, read_tiff_manifest
from tilefuse.ome_zarr.writer import read_ome_zarr_level
from tilefuse.testing import grid_tileset, write_tileset

ROOT = Path(__file__).resolve().parents[1]


def _mean_2x(a: np.ndarray) -> np.ndarray:
    """Reference 2x2 mean in the last two axes (odd edge pixels averaged with themselves),
    rounded half to even: written here independently of tilefuse's pyramid code."""
    h, w = a.shape[-2:]
    pad = [(0, 0)] * (a.ndim - 2) + [(0, h % 2), (0, w % 2)]
    f = np.pad(a.astype(np.float64), pad, mode="edge")
    mean = (f[..., ::2, ::2] + f[..., 1::2, ::2] + f[..., ::2, 1::2] + f[..., 1::2, 1::2]) / 4
    return np.rint(mean).astype(a.dtype) if a.dtype.kind in "iu" else mean.astype(a.dtype)


def _levels(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and len(tif.series) == 1
        return [level.asarray() for level in tif.series[0].levels]


@pytest.fixture(scope="module")
def fused() -> Mosaic:
    """A 2-channel z-stack mosaic with odd y and x, chunked across planes and channels."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 60000, size=(2, 3, 101, 139), dtype=np.uint16)
    return Mosaic(da.from_array(pixels, chunks=(2, 2, 48, 64)), ("c", "z", "y", "x"),
                  pixel_size=(2.0, 0.325, 0.325), unit="um", channel_names=("DAPI", "GFP"),
                  channel_colors=("0000FF", "00FF00"), origin=(1, 10, -4))


def test_every_level_is_the_2x2_mean_of_the_one_above_as_in_ome_zarr(fused, tmp_path):
    out = write_ome_tiff(fused, tmp_path / "m.ome.tif", tile=32)
    levels = _levels(out)
    assert [lv.shape for lv in levels] == [(2, 3, 101, 139), (2, 3, 51, 70), (2, 3, 26, 35),
                                          (2, 3, 13, 18)]  # down to one 32² tile
    np.testing.assert_array_equal(levels[0], fused.compute())
    for above, level in itertools.pairwise(levels):
        np.testing.assert_array_equal(level, _mean_2x(above))
    zarr_out = write_ome_zarr(Mosaic(fused.data.rechunk((2, 3, 32, 32)), fused.axes),
                              tmp_path / "m.ome.zarr")
    for k, level in enumerate(levels):
        np.testing.assert_array_equal(level, np.asarray(read_ome_zarr_level(zarr_out, k)))
    with tifffile.TiffFile(out) as tif:  # SubIFD pyramid of 32² deflate tiles
        page = tif.pages.first
        assert len(page.subifds) == 3 and page.tilewidth == page.tilelength == 32
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE and not tif.is_bigtiff


def test_ome_xml_is_valid_with_sizes_unit_channels_and_the_run_manifest(fused, tmp_path):
    import ome_types

    out = write_ome_tiff(fused, tmp_path / "stack.ome.tiff", tile=64, compression="lzw")
    with tifffile.TiffFile(out) as tif:
        xml = tif.pages.first.description
        assert tif.series[0].axes == "CZYX" and tif.pages.first.compression == 5  # LZW
    ome = ome_types.from_xml(xml, validate=True)  # against the OME 2016-06 schema
    assert ome.creator.startswith("tilefuse ")
    pixels = ome.images[0].pixels
    assert ome.images[0].name == "stack"
    assert (pixels.size_x, pixels.size_y, pixels.size_z, pixels.size_c, pixels.size_t) == \
        (139, 101, 3, 2, 1)
    assert pixels.dimension_order.value == "XYZCT" and pixels.type.value == "uint16"
    assert (pixels.physical_size_x, pixels.physical_size_y, pixels.physical_size_z) == \
        (0.325, 0.325, 2.0)
    assert {pixels.physical_size_x_unit.value, pixels.physical_size_z_unit.value} == {"µm"}
    assert [c.name for c in pixels.channels] == ["DAPI", "GFP"]
    assert [c.color.as_rgb_tuple() for c in pixels.channels] == [(0, 0, 255), (0, 255, 0)]
    assert len(pixels.planes) == 6  # origin (z, y, x) = (1, 10, -4) pixels, in µm
    first, last = pixels.planes[0], pixels.planes[-1]
    assert (first.the_c, first.the_z, last.the_c, last.the_z) == (0, 0, 1, 2)
    assert (first.position_x, first.position_y, first.position_z) == \
        pytest.approx((-1.3, 3.25, 2.0))
    assert last.position_z == pytest.approx(6.0)
    note = ome.structured_annotations.comment_annotations[0]
    assert note.namespace == TIFF_MANIFEST_NAMESPACE
    assert json.loads(note.value)["tilefuse"] == read_tiff_manifest(out)["tilefuse"]


@pytest.mark.filterwarnings("ignore:As of version 0.4.0, the parser argument is ignored")
def test_a_second_reader_reads_level_0_with_all_five_axes(tmp_path, monkeypatch):
    from bioio_ome_tiff import Reader

    monkeypatch.setattr("tilefuse.ome_tiff.writer._BIGTIFF_BYTES", 0)  # as for a big mosaic

    pixels = np.arange(2 * 2 * 3 * 40 * 50, dtype=np.float32).reshape(2, 2, 3, 40, 50) / 7
    mosaic = Mosaic(da.from_array(pixels, chunks=(1, 2, 3, 16, 16)), ("t", "c", "z", "y", "x"),
                    pixel_size=(1.5, 0.2, 0.2), unit="nm", channel_names=("a", "b"),
                    timepoints=("000", "005"))
    out = write_ome_tiff(mosaic, tmp_path / "series.ome.tif", tile=16)
    reader = Reader(out)
    assert reader.dims.order == "TCZYX" and reader.dims.shape == pixels.shape
    assert tuple(reader.physical_pixel_sizes) == (1.5, 0.2, 0.2)
    assert list(reader.channel_names) == ["a", "b"]
    np.testing.assert_array_equal(reader.data, pixels)
    assert reader.dtype == np.float32
    with tifffile.TiffFile(out) as tif:
        assert tif.is_bigtiff and tif.series[0].axes == "TCZYX"


def test_a_time_series_input_becomes_the_t_axis(tmp_path):
    from tilefuse import fuse, read_layout

    rng = np.random.default_rng(0)
    rows = ["file,x,y,t"]
    for t in range(3):
        for i, x in enumerate((0, 50)):
            tifffile.imwrite(tmp_path / f"t{t}_{i}.tif",
                             rng.integers(0, 1000, (40, 64), dtype=np.uint16))
            rows.append(f"t{t}_{i}.tif,{x},0,{t}")
    layout = tmp_path / "layout.csv"
    layout.write_text("\n".join(rows) + "\n")
    result = run_main("fuse", layout, "-o", tmp_path / "s.ome.tif", "-q")
    assert result.returncode == 0, result.stderr
    with tifffile.TiffFile(tmp_path / "s.ome.tif") as tif:
        assert tif.series[0].axes == "TYX" and tif.series[0].shape == (3, 40, 114)
        np.testing.assert_array_equal(tif.series[0].asarray(),
                                      fuse(read_layout(layout)).compute())
    assert (tmp_path / "s.layout.csv").is_file()


def test_fuse_to_ome_tiff_gives_the_ome_zarr_pixels_and_sidecars(tmp_path):
    ts = grid_tileset(grid=(2, 3), tile_shape=(90, 110), overlap=0.2, position_error=1.5,
                      fractional=True, seed=5)
    layout = write_tileset(ts, tmp_path / "tiles", stage=False)
    common = ["fuse", layout, "--chunk", "64", "--pixel-size", "0.5", "-q"]
    tif = run_main(*common, "-o", tmp_path / "a.ome.tif")
    assert tif.returncode == 0, tif.stderr
    assert run_main(*common, "-o", tmp_path / "b.ome.zarr").returncode == 0
    np.testing.assert_array_equal(_levels(tmp_path / "a.ome.tif")[0],
                                  np.asarray(read_ome_zarr_level(tmp_path / "b.ome.zarr", 0)))
    assert (tmp_path / "a.layout.csv").is_file()
    assert (tmp_path / "a.TileConfiguration.txt").is_file()
    manifest = read_tiff_manifest(tmp_path / "a.ome.tif")
    assert manifest["format"] == "ome-tiff" and manifest["sidecars"] == [
        "a.layout.csv", "a.TileConfiguration.txt"]
    # its own output and sidecars are replaced with --overwrite, and only with it
    again = run_main(*common, "-o", tmp_path / "a.ome.tif")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert run_main(*common, "-o", tmp_path / "a.ome.tif", "--overwrite").returncode == 0
    resume = run_main(*common, "-o", tmp_path / "a.ome.tif", "--resume")
    assert resume.returncode == 2 and "--resume is not available" in resume.stderr
    assert len(resume.stderr.strip().splitlines()) == 1
    fmt = run_main(*common, "-o", tmp_path / "c.ome.zarr", "--format", "ome-tiff")
    assert fmt.returncode == 2 and "NAME.ome.tif" in fmt.stderr


@pytest.mark.parametrize("foreign", ["plain", "ome", "input"])
def test_overwrite_never_replaces_a_tiff_tilefuse_did_not_write(tmp_path, foreign):
    ts = grid_tileset(grid=(1, 2), tile_shape=(40, 48), overlap=0.2, seed=1)
    layout = write_tileset(ts, tmp_path / "tiles", stage=False)
    target = tmp_path / "x.ome.tif"
    if foreign == "input":  # a tile that tilefuse wrote itself, named as the output
        target = tmp_path / "tiles" / "tile_0000.ome.tif"
        write_ome_tiff(Mosaic(da.from_array(ts.tiles[0]), ("y", "x")), target, tile=16)
        (tmp_path / "tiles" / "tile_0000.tif").unlink()
        layout.write_text(layout.read_text().replace("tile_0000.tif", target.name))
    else:  # another program's (OME-)TIFF
        tifffile.imwrite(target, ts.tiles[0], ome=foreign == "ome", metadata={"axes": "YX"})
    before = target.read_bytes()
    result = run_main("fuse", layout, "-o", target, "--overwrite")
    assert result.returncode == 2
    assert ("did not write" if foreign != "input" else "input") in result.stderr
    assert target.read_bytes() == before
    if foreign == "input":
        return
    with pytest.raises(InputError, match="did not write"):
        write_ome_tiff(Mosaic(da.zeros((8, 8), dtype=np.uint8), ("y", "x")), target,
                       overwrite=True)
    assert target.read_bytes() == before


def test_a_symlink_is_never_written_through(tmp_path):
    mosaic = Mosaic(da.ones((20, 20), dtype=np.uint8), ("y", "x"))
    real = write_ome_tiff(mosaic, tmp_path / "real.ome.tif", tile=16)
    before = real.read_bytes()
    (tmp_path / "link.ome.tif").symlink_to(real)
    with pytest.raises(InputError, match="symbolic link"):
        write_ome_tiff(mosaic, tmp_path / "link.ome.tif", overwrite=True)
    assert real.read_bytes() == before


@pytest.mark.parametrize("stage", ["fusing", "writing"])
def test_an_interrupted_write_leaves_no_finished_looking_file(tmp_path, monkeypatch, stage):
    from tilefuse.ome_tiff import _spool

    mosaic = Mosaic(da.from_array(np.arange(4800, dtype=np.uint16).reshape(60, 80),
                                  chunks=16), ("y", "x"))
    old = write_ome_tiff(mosaic, tmp_path / "m.ome.tif", tile=16)
    before = old.read_bytes()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if stage == "fusing":
        monkeypatch.setattr(_spool._StoreBlock, "__call__", interrupt)  # in a dask task
    else:
        tiles = _spool.level_tiles

        def some_tiles(*args, **kwargs):
            yield from list(tiles(*args, **kwargs))[:3]
            raise KeyboardInterrupt

        monkeypatch.setattr("tilefuse.ome_tiff.writer.level_tiles", some_tiles)
    with pytest.raises(KeyboardInterrupt):
        write_ome_tiff(Mosaic(mosaic.data + 1, ("y", "x")), old, overwrite=True, tile=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ome.tif"]  # no partial file
    assert old.read_bytes() == before  # the previous finished file, untouched
    with pytest.raises(KeyboardInterrupt):
        write_ome_tiff(mosaic, tmp_path / "new.ome.tif", tile=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ome.tif"]


def test_refusals_name_what_is_wrong(tmp_path):
    mosaic = Mosaic(da.zeros((8, 8), dtype=np.uint8), ("y", "x"))
    for kwargs, match in (({"tile": 24}, "multiple of 16"), ({"compression": "jpeg"}, "lzw"),
                          ({"levels": 9}, "pyramid levels")):
        with pytest.raises(InputError, match=match):
            write_ome_tiff(mosaic, tmp_path / "m.ome.tif", **kwargs)
    with pytest.raises(InputError, match="dtype bool"):
        write_ome_tiff(Mosaic(da.zeros((8, 8), dtype=bool), ("y", "x")), tmp_path / "m.ome.tif")
    assert not any(tmp_path.iterdir())


def _bench(rows: int, tmp_path: Path) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ome_tiff.py"),
                           "--side", "6", "--rows", str(rows), "--cache-mb", "8",
                           "--work", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_peak_memory_does_not_grow_with_the_mosaic(tmp_path):
    small, big = _bench(6, tmp_path), _bench(24, tmp_path)  # 2817² and 11115 x 2817 uint16
    assert big["levels"][0] == big["shape"] and len(big["levels"]) == 6
    grown = big["mosaic_bytes"] - small["mosaic_bytes"]
    assert grown > 40 * 2**20 and small["mosaic_bytes"] > 8 * 2**20  # > the 8 MiB tile cache
    extra = big["growth"] - small["growth"]
    print(f"peak RSS growth {small['growth'] / 2**20:.1f} -> {big['growth'] / 2**20:.1f} MiB "
          f"for a mosaic of {small['mosaic_bytes'] / 2**20:.0f} -> "
          f"{big['mosaic_bytes'] / 2**20:.0f} MiB")
    assert extra < 8 * 2**20  # measured 1-5 MiB for 45 MiB more mosaic: bands, not the image


def test_a_killed_runs_work_folder_is_removed_by_the_next_run(tmp_path):
    """SIGKILL leaves no chance to clean up: the spool folder (``OUT.*.partial``, as large as
    the image) stays. The next write of that output removes it, and only it: a folder a live
    process owns and one without tilefuse's owner file are left alone."""
    import signal

    out = tmp_path / "m.ome.tif"
    code = ("import sys, time\nfrom pathlib import Path\n"
            "from tilefuse.ome_tiff.writer import _work_folder\n"
            f"w = _work_folder(Path({str(out)!r}))\n(w / 'level0.raw').write_bytes(bytes(4096))\n"
            "print(w, flush=True)\ntime.sleep(60)\n")
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          text=True) as child:
        assert child.stdout is not None
        killed = Path(child.stdout.readline().strip())
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (killed / "level0.raw").is_file()
    live = tmp_path / "m.ome.tif.live.partial"
    live.mkdir()
    (live / "tilefuse-owner.json").write_text(json.dumps(
        {"host": __import__("socket").gethostname(), "pid": __import__("os").getpid()}))
    foreign = tmp_path / "m.ome.tif.theirs.partial"
    foreign.mkdir()
    ts = grid_tileset(grid=(2, 2), tile_shape=(32, 32), overlap=0.25, seed=0)
    write_ome_tiff(Mosaic(da.from_array(ts.truth, chunks=32), ("y", "x")), out, tile=16)
    assert not killed.exists() and live.is_dir() and foreign.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m.ome.tif", "m.ome.tif.live.partial", "m.ome.tif.theirs.partial"]
