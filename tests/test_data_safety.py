"""tilefuse deletes or replaces only what it created, and never writes into its inputs.

Each test tries to make ``fuse``, ``register``, ``flatfield`` or ``preview`` destroy something it
did not make (``--overwrite``, symbolic links, the current folder, output inside input, input
inside output) and checks that every byte is still there. The README's hostile-input table
(tests/test_hostile_inputs.py) adds the refusals one line each.
"""

from __future__ import annotations

import os
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from conftest import run_main, unfinish
from tilefuse.errors import InputError
from tilefuse.model.mosaic import Mosaic
from tilefuse.ome_zarr.writer import read_ome_zarr_level, write_ome_zarr
from tilefuse.testing import grid_tileset, write_tileset


@pytest.fixture
def tiles(tmp_path) -> Path:
    ts = grid_tileset(grid=(2, 2), tile_shape=(40, 48), overlap=0.2, position_error=2, seed=3)
    return write_tileset(ts, tmp_path / "tiles", stage=False)


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def _ok(result) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def _refused(result, needle: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert needle in result.stderr, result.stderr


def test_overwrite_replaces_its_own_output_and_sidecars(tiles, tmp_path):
    out = tmp_path / "m.ome.zarr"
    _ok(run_main("fuse", tiles, "-o", out, "-q"))
    first = read_ome_zarr_level(out).compute()
    _ok(run_main("fuse", tiles, "-o", out, "-q", "--overwrite", "--blend", "max"))
    again = zarr.open_group(out, mode="r").attrs.asdict()["tilefuse"]
    assert again["blend"] == "max"
    assert read_ome_zarr_level(out).shape == first.shape
    assert (tmp_path / "m.layout.csv").is_file()


def test_overwrite_keeps_a_user_file_put_into_an_output(tiles, tmp_path):
    out = tmp_path / "m.ome.zarr"
    _ok(run_main("fuse", tiles, "-o", out, "-q"))
    notes = out / "my-notes.txt"
    notes.write_text("do not lose me")
    before = _contents(out)
    _refused(run_main("fuse", tiles, "-o", out, "--overwrite"), "my-notes.txt")
    assert _contents(out) == before


def test_the_current_folder_and_the_tile_folder_survive_overwrite(tiles, tmp_path):
    before = _contents(tmp_path)
    _refused(run_main("fuse", tiles, "-o", ".", "--overwrite", cwd=tmp_path), "holds this run")
    _refused(run_main("fuse", "tiles/TileConfiguration.txt", "-o", ".", "--overwrite",
                      cwd=tmp_path), "holds this run's input")
    _refused(run_main("fuse", tiles.parent, "-o", tiles.parent, "--overwrite", "--pattern",
                      "tile_{index}.tif", "--grid", "2x2"), "inputs")
    assert _contents(tmp_path) == before


def test_a_symlink_to_a_tilefuse_output_is_not_followed(tiles, tmp_path):
    out = tmp_path / "m.ome.zarr"
    _ok(run_main("fuse", tiles, "-o", out, "-q"))
    link = tmp_path / "link.ome.zarr"
    link.symlink_to(out)
    before = _contents(out)
    _refused(run_main("fuse", tiles, "-o", link, "--overwrite"), "symbolic link")
    assert _contents(out) == before and link.is_symlink()


def test_input_inside_the_output_is_never_deleted(tiles, tmp_path):
    """Tiles kept inside an old output folder: --overwrite of that folder is refused."""
    out = tmp_path / "m.ome.zarr"
    _ok(run_main("fuse", tiles, "-o", out, "-q"))
    inner = out / "tiles"
    inner.mkdir()
    for path in tiles.parent.iterdir():
        (inner / path.name).write_bytes(path.read_bytes())
    before = _contents(out)
    _refused(run_main("fuse", inner / tiles.name, "-o", out, "--overwrite"), "holds this run")
    assert _contents(out) == before


def test_a_sidecar_that_is_the_input_layout_is_not_replaced(tiles, tmp_path):
    out = tmp_path / "m.ome.zarr"
    _ok(run_main("fuse", tiles, "-o", out, "-q"))
    layout = tmp_path / "m.layout.csv"
    before = layout.read_bytes()
    _refused(run_main("fuse", layout, "-o", out, "--overwrite", "--register"),
             "which is this run's input")
    assert layout.read_bytes() == before


def test_a_foreign_file_where_a_sidecar_goes_is_kept(tiles, tmp_path):
    mine = tmp_path / "m.layout.csv"
    mine.write_text("my own layout, not tilefuse's\n")
    _refused(run_main("fuse", tiles, "-o", tmp_path / "m.ome.zarr"), "was not written by")
    assert mine.read_text() == "my own layout, not tilefuse's\n"
    assert not (tmp_path / "m.ome.zarr").exists()


def test_register_keeps_fijis_result_and_its_input(tiles):
    fiji = tiles.with_name("TileConfiguration.registered.txt")
    fiji.write_text("Fiji's own\n")
    original = tiles.read_bytes()
    _refused(run_main("register", tiles), "exists; pass --overwrite")
    _refused(run_main("register", tiles, "-o", tiles, "--overwrite"), "inputs")
    assert fiji.read_text() == "Fiji's own\n" and tiles.read_bytes() == original
    _ok(run_main("register", tiles, "--overwrite", "-q"))
    assert fiji.read_text() != "Fiji's own\n" and tiles.read_bytes() == original


def test_preview_and_flatfield_never_replace_tiles_or_files(tiles, tmp_path):
    picture = tmp_path / "p.png"
    picture.write_bytes(b"mine")
    tile = tiles.parent / "tile_0000.tif"
    data = tile.read_bytes()
    _refused(run_main("preview", tiles, "-o", picture), "exists")
    _refused(run_main("preview", tiles, "-o", tile, "--overwrite"), "inputs")
    _refused(run_main("flatfield", tiles, "-o", tile, "--overwrite"), "inputs")
    assert picture.read_bytes() == b"mine" and tile.read_bytes() == data
    _ok(run_main("preview", tiles, "-o", picture, "--overwrite"))
    assert picture.read_bytes()[:4] == b"\x89PNG"


def test_a_file_output_that_is_a_symlink_is_neither_followed_nor_deleted(tiles, tmp_path):
    """preview, flatfield, register and --report refuse a link (as image outputs do): with
    --overwrite the link used to be deleted at check time, before the run could fail."""
    target = tmp_path / "mine.png"
    target.write_bytes(b"mine")
    for command, name in (("preview", "p.png"), ("flatfield", "f.tif"),
                          ("register", "r.txt")):
        link = tmp_path / name
        link.symlink_to(target)
        _refused(run_main(command, tiles, "-o", link, "--overwrite"), "symbolic link")
        assert link.is_symlink() and target.read_bytes() == b"mine"
    report = tmp_path / "report.json"
    report.symlink_to(target)
    _refused(run_main("register", tiles, "-o", tmp_path / "r2.txt", "--report", report),
             "symbolic link")
    assert report.is_symlink() and target.read_bytes() == b"mine"


def test_library_overwrite_refuses_foreign_folders(tmp_path):
    """The Python API (and napari through it) obeys the same rule as the CLI."""
    folder = tmp_path / "someone.zarr"
    folder.mkdir()
    (folder / "data.bin").write_bytes(b"x")
    image = Mosaic(da.zeros((8, 8), dtype=np.uint8), ("y", "x"))
    with pytest.raises(InputError, match="did not make"):
        write_ome_zarr(image, folder, overwrite=True)
    assert (folder / "data.bin").read_bytes() == b"x"
    foreign = tmp_path / "foreign.zarr"  # a zarr that someone else wrote
    zarr.open_group(foreign, mode="w").create_array("0", shape=(4,), dtype="u1")
    with pytest.raises(InputError, match="did not make"):
        write_ome_zarr(image, foreign, overwrite=True)
    assert (foreign / "0" / "zarr.json").is_file()
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    write_ome_zarr(image, empty)  # an empty folder is fine, even without overwrite


def test_creating_the_group_deletes_nothing_even_if_a_check_were_skipped(tmp_path,
                                                                         monkeypatch):
    """Only remove_image deletes: the zarr group is created without emptying the folder, so a
    file that reached the output after the checks (or past a broken check) survives."""
    import tilefuse.ome_zarr.writer as writer

    image = Mosaic(da.zeros((8, 8), dtype=np.uint8), ("y", "x"))
    out = write_ome_zarr(image, tmp_path / "a.zarr")
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(writer, "check_image_output", lambda path, **_: Path(path))
    monkeypatch.setattr(writer, "remove_image", lambda out: None)
    with pytest.raises(Exception):  # noqa: B017 - any failure is fine, deleting is not
        write_ome_zarr(image, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_every_output_is_marked_as_tilefuses(tmp_path):
    out = write_ome_zarr(Mosaic(da.zeros((8, 8), dtype=np.uint8), ("y", "x")), tmp_path / "a.zarr")
    manifest = zarr.open_group(out, mode="r").attrs["tilefuse"]
    assert "tilefuse" in manifest
    assert sorted(os.listdir(out)) == ["0", "zarr.json"]  # nothing zarr readers warn about


def test_resume_refuses_nothing_but_redoes_chunks_of_a_changed_tile(tiles, tmp_path):
    """A tile changed between the interruption and --resume: its chunks are fused again."""
    import tifffile

    out = tmp_path / "m.ome.zarr"
    _ok(run_main("fuse", tiles, "-o", out, "-q", "--chunk", "16"))
    unfinish(out)  # as if killed before the metadata
    tile = tiles.parent / "tile_0003.tif"
    bright = np.full_like(tifffile.imread(tile), 60000)
    tifffile.imwrite(tile, bright)
    result = run_main("fuse", tiles, "-o", out, "--resume", "--chunk", "16")
    _ok(result)
    assert "changed since the run started" in result.stderr
    fused = read_ome_zarr_level(out).compute()
    _ok(run_main("fuse", tiles, "-o", tmp_path / "fresh.ome.zarr", "-q", "--chunk", "16"))
    np.testing.assert_array_equal(fused, read_ome_zarr_level(tmp_path / "fresh.ome.zarr"))


def test_resume_takes_the_chunk_of_the_interrupted_run(tiles, tmp_path):
    """The automatic chunk depends on the machine's memory: a resume on another node must not
    fail with 'chunk differ'."""
    out = tmp_path / "m.ome.zarr"
    _ok(run_main("fuse", tiles, "-o", out, "-q", "--chunk", "32"))
    unfinish(out)  # as if killed before the metadata
    _ok(run_main("fuse", tiles, "-o", out, "--resume", "-q", "--memory-limit", "0.01"))
    assert zarr.open_group(out, mode="r")["0"].chunks == (32, 32)


def test_info_into_a_closed_pipe_is_quiet(tiles, tmp_path):
    """`tilefuse info ... | head` after head has gone: no BrokenPipeError traceback, exit 0.
    The pipe's read end is closed before tilefuse starts, so every run breaks the pipe."""
    import subprocess
    import sys

    err = tmp_path / "err.txt"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        with open(err, "w") as stderr:
            done = subprocess.run([sys.executable, "-m", "tilefuse", "info", str(tiles)],
                                  stdout=write_end, stderr=stderr, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in err.read_text() and "BrokenPipe" not in err.read_text()
    assert done.returncode == 0, err.read_text()


def test_a_broken_pipe_elsewhere_is_an_error_not_success(tiles, monkeypatch):
    """A BrokenPipeError from a dead worker, with stdout fine, is not a reader closing the pipe:
    one line and exit 2, never exit 0."""
    from tilefuse.cli import commands

    def dead_worker(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setitem(commands.COMMANDS, "info", dead_worker)
    result = run_main("info", tiles)
    assert result.returncode == 2
    assert result.stderr.strip() == "tilefuse info: error: [Errno 32] Broken pipe"


def test_an_os_error_is_one_line(tiles, tmp_path):
    """A file name the file system cannot hold: one line and exit 2, not a traceback."""
    result = run_main("preview", tiles, "-o", tmp_path / ("x" * 300 + ".png"))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("tilefuse preview: error: ") and "File name too long" in line


def test_per_time_point_reports_never_replace_files(tmp_path):
    """A time series registered one time point at a time writes NAME.tT.json and .png: an
    existing one is refused like NAME.json would be, and kept."""
    import tifffile

    ts = grid_tileset(grid=(1, 2), tile_shape=(40, 48), overlap=0.25, seed=2)
    for i, tile in enumerate(ts.tiles):
        tifffile.imwrite(tmp_path / f"t{i}.tif", tile)
    (x0, x1) = (float(p[1]) for p in ts.layout.positions)
    rows = [f"{t},t{i}.tif,{x + t},0" for t in (0, 1) for i, x in enumerate((x0, x1))]
    layout = tmp_path / "series.csv"
    layout.write_text("t,file,x,y\n" + "\n".join(rows) + "\n")
    mine = tmp_path / "r.t1.png"
    mine.write_bytes(b"mine")
    _refused(run_main("register", layout, "-o", tmp_path / "reg.csv", "--report",
                      tmp_path / "r.json"), "r.t1.png exists; pass --overwrite")
    assert mine.read_bytes() == b"mine" and not (tmp_path / "reg.csv").exists()


def test_a_sidecar_that_is_a_symlink_is_not_written_through(tiles, tmp_path):
    out = tmp_path / "m.ome.zarr"
    _ok(run_main("fuse", tiles, "-o", out, "-q"))
    target = tmp_path / "precious.csv"
    target.write_text("not tilefuse's\n")
    sidecar = tmp_path / "m.layout.csv"
    sidecar.unlink()
    sidecar.symlink_to(target)
    _refused(run_main("fuse", tiles, "-o", out, "-q", "--overwrite"), "is a symbolic link")
    assert target.read_text() == "not tilefuse's\n" and sidecar.is_symlink()


def test_resume_with_a_report_keeps_going(tiles, tmp_path):
    """The report is written before any pixel: a resume of the same command may replace the
    report its interrupted run wrote (and nothing else)."""
    out, report = tmp_path / "m.ome.zarr", tmp_path / "reg.json"
    command = ["fuse", tiles, "-o", out, "-q", "--register", "--report", report]
    _ok(run_main(*command))
    unfinish(out)
    _ok(run_main(*command, "--resume"))
    assert report.is_file() and read_ome_zarr_level(out).shape


def test_resume_removes_the_partial_chunk_files_of_a_kill(tiles, tmp_path):
    """A kill mid-write leaves `.NAME.HEX.partial` temporaries: a resume removes them (and
    nothing else), and the image is complete."""
    out = tmp_path / "m.ome.zarr"
    _ok(run_main("fuse", tiles, "-o", out, "-q", "--chunk", "16"))
    unfinish(out)  # as if killed before the metadata
    leftover = out / "0" / "c" / "0" / ".1.0123456789abcdef0123456789abcdef.partial"
    leftover.write_bytes(b"half a chunk")
    _ok(run_main("fuse", tiles, "-o", out, "--resume", "-q", "--chunk", "16"))
    assert not leftover.exists()
    assert not list(out.rglob("*.partial"))
    _ok(run_main("fuse", tiles, "-o", tmp_path / "fresh.ome.zarr", "-q", "--chunk", "16"))
    np.testing.assert_array_equal(read_ome_zarr_level(out).compute(),
                                  read_ome_zarr_level(tmp_path / "fresh.ome.zarr").compute())


def test_resume_of_a_finished_image_after_a_tile_changed_deletes_nothing(tiles, tmp_path):
    """A tile rewritten after the image finished: --resume refuses (another run) and every
    chunk of the finished image is still there, unchanged."""
    import tifffile

    out = tmp_path / "m.ome.zarr"
    _ok(run_main("fuse", tiles, "-o", out, "-q", "--chunk", "16"))
    before = _contents(out)
    tile = tiles.parent / "tile_0003.tif"
    tifffile.imwrite(tile, np.full_like(tifffile.imread(tile), 60000))
    _refused(run_main("fuse", tiles, "-o", out, "--resume", "--chunk", "16"),
             "finished image of another run (tile_files differ)")
    assert _contents(out) == before
