"""The command line, end to end: real data, the saved layout, and every bad input."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from conftest import DATA, read_positions, run_cli
from tilefuse.io.readers import read_layout
from tilefuse.ome_zarr.writer import read_ome_zarr_level
from tilefuse.testing import grid_tileset, write_tileset


@pytest.fixture(scope="module")
def tile_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiles")
    ts = grid_tileset(grid=(2, 3), tile_shape=(64, 80), overlap=0.2, position_error=5, seed=11)
    return write_tileset(ts, folder, stage=False), ts


def _not_a_finished_image(path):
    """Nothing at ``path``, or an unfinished write that no OME-Zarr reader takes for an image."""
    if not path.exists():
        return True
    attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    return "multiscales" not in attrs and "multiscales" not in attrs.get("ome", {})


def _assert_user_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and "%|" not in ln]  # bars
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_fuse_writes_mosaic_and_layout(tile_folder, tmp_path):
    layout_path, ts = tile_folder
    out = tmp_path / "m.ome.zarr"
    result = run_cli("fuse", layout_path, "-o", out, "--chunk", "32", "--pixel-size", "0.5")
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(read_ome_zarr_level(out, 0).compute(), ts.truth)
    attrs = zarr.open_group(str(out), mode="r").attrs.asdict()["ome"]
    scale = attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == [0.5, 0.5]
    saved = read_layout(tmp_path / "m.TileConfiguration.txt")
    np.testing.assert_allclose(saved.positions, ts.layout.positions)
    again = read_layout(tmp_path / "m.layout.csv")
    np.testing.assert_array_equal(again.affines, ts.layout.affines)
    assert "fused 6 tiles" in result.stderr


def test_fuse_ngff04_and_rotate_and_blend(tile_folder, tmp_path):
    layout_path, _ = tile_folder
    out = tmp_path / "r.ome.zarr"
    result = run_cli("fuse", layout_path, "-o", out, "--ngff", "0.4", "--rotate", "1",
                     "--blend", "max", "--quiet")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()  # --quiet: the summary only, no bar (issue 20)
    assert lines[0].startswith("fused 6 tiles") and "%|" not in result.stderr
    assert all(ln.startswith(("fused", "pixel size")) for ln in lines), result.stderr
    assert (out / ".zattrs").exists()


def test_info_reports_layout(tile_folder):
    layout_path, _ = tile_folder
    result = run_cli("info", layout_path, "--chunk", "50")
    assert result.returncode == 0, result.stderr
    assert "6 of 64 x 80" in result.stdout and "uint16" in result.stdout
    assert "neighbour pairs" in result.stdout and "peak memory" in result.stdout


def test_mist_fused_at_exact_positions_reproduces_every_tile(tmp_path):
    rows = read_positions(DATA / "mist_phase_5x5" / "positions.csv")
    layout_csv = tmp_path / "mist.csv"
    tiles = DATA / "mist_phase_5x5" / "tiles"
    lines = ["file,x,y"] + [f"{tiles / r['file']},{r['gt_x']},{r['gt_y']}" for r in rows]
    layout_csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "mist.ome.zarr"
    result = run_cli("fuse", layout_csv, "-o", out, "--chunk", "200", "-q")
    assert result.returncode == 0, result.stderr
    mosaic = read_ome_zarr_level(out, 0).compute()
    gx = np.array([int(r["gt_x"]) for r in rows])
    gy = np.array([int(r["gt_y"]) for r in rows])
    for r, x, y in zip(rows, gx - gx.min(), gy - gy.min(), strict=True):
        tile = tifffile.imread(tiles / r["file"])
        np.testing.assert_array_equal(mosaic[y : y + tile.shape[0], x : x + tile.shape[1]], tile)


def test_rgb_grey_tiles_fuse_as_one_channel(tmp_path):
    rng = np.random.default_rng(0)
    grey = [rng.integers(0, 255, (40, 50), dtype=np.uint8) for _ in range(2)]
    for i, g in enumerate(grey):
        tifffile.imwrite(tmp_path / f"t{i}.tif", np.stack([g] * 3, axis=-1), photometric="rgb")
    (tmp_path / "tc.txt").write_text("dim = 2\nt0.tif; ; (0, 0)\nt1.tif; ; (45, 0)\n")
    layout = read_layout(tmp_path / "tc.txt")
    assert layout.channels == ("0",)
    result = run_cli("fuse", tmp_path / "tc.txt", "-o", tmp_path / "o.ome.zarr", "-q")
    assert result.returncode == 0, result.stderr
    mosaic = read_ome_zarr_level(tmp_path / "o.ome.zarr").compute()
    np.testing.assert_array_equal(mosaic[:, :45], grey[0][:, :45])
    np.testing.assert_array_equal(mosaic[:, 50:], grey[1][:, 5:])


def test_colour_rgb_tiles_fuse_as_three_channels(tmp_path):
    rng = np.random.default_rng(1)
    rgb = [rng.integers(0, 255, (30, 40, 3), dtype=np.uint8) for _ in range(2)]
    for i, img in enumerate(rgb):
        tifffile.imwrite(tmp_path / f"t{i}.tif", img, photometric="rgb")
    (tmp_path / "tc.txt").write_text("dim = 2\nt0.tif; ; (0, 0)\nt1.tif; ; (40, 0)\n")
    assert read_layout(tmp_path / "tc.txt").channels == ("R", "G", "B")
    result = run_cli("fuse", tmp_path / "tc.txt", "-o", tmp_path / "o.ome.zarr", "-q")
    assert result.returncode == 0, result.stderr
    mosaic = read_ome_zarr_level(tmp_path / "o.ome.zarr").compute()
    assert mosaic.shape == (3, 30, 80)
    np.testing.assert_array_equal(np.moveaxis(mosaic[:, :, 40:], 0, -1), rgb[1])


# ---------------------------------------------------------------- bad input: exit 2, one line


@pytest.fixture
def two_tiles(tmp_path):
    for i in range(2):
        tifffile.imwrite(tmp_path / f"a{i}.tif", np.full((20, 20), i + 1, np.uint16))
    return tmp_path


def _layout(folder, text, name="tc.txt"):
    path = folder / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("dim = 2\na0.tif; ; (0, 0)\nmissing.tif; ; (10, 0)\n", ["missing.tif", "not found"]),
        ("dim = 2\na0.tif; ; (0, 0)\na1.tif; (10, 0)\n", ["tc.txt:3", "file; series; (x, y)"]),
        ("dim = 2\na0.tif; ; (0, 0)\na1.tif; ; (nan, 0)\n", ["tc.txt:3", "not finite"]),
        ("dim = 2\na0.tif; ; (0, 0)\na1.tif; ; (inf, 0)\n", ["tc.txt:3", "not finite"]),
        ("dim = 2\n# nothing here\n", ["no tiles"]),
        ("", ["dim = 2"]),
        ("dim = 3\na0.tif; ; (0, 0)\n", ["tc.txt:2", "dim = 3 but 2 coordinates"]),
        ("dim = 2\na0.tif; ; (0, 0, 0)\n", ["tc.txt:2", "dim = 2 but 3 coordinates"]),
        ("dim = 2\na0.tif; ; (zero, 0)\n", ["tc.txt:2", "numbers"]),
        ("dim = 2\na0.tif; ; (0, 0)\na0.tif; ; (5, 0)\n", ["listed twice"]),
        ("dim = 2\na0.tif; ; (0, 0)\na1.tif; ; (1e12, 0)\n", ["would be", "pixels"]),
    ],
)
def test_malformed_layouts_are_one_clear_line(two_tiles, text, needles):
    result = run_cli("fuse", _layout(two_tiles, text), "-o", two_tiles / "o.ome.zarr")
    _assert_user_error(result, *needles)
    assert not (two_tiles / "o.ome.zarr").exists()


def test_mixed_dtypes_and_dimensionality(two_tiles):
    tifffile.imwrite(two_tiles / "f.tif", np.zeros((20, 20), np.float32))
    stack = np.zeros((4, 20, 20), np.uint16)
    tifffile.imwrite(two_tiles / "z.tif", stack, photometric="minisblack")
    bad = _layout(two_tiles, "dim = 2\na0.tif; ; (0, 0)\nf.tif; ; (10, 0)\n")
    _assert_user_error(run_cli("fuse", bad, "-o", two_tiles / "o"), "float32", "uint16")
    bad = _layout(two_tiles, "dim = 2\na0.tif; ; (0, 0)\nz.tif; ; (10, 0)\n")
    _assert_user_error(run_cli("fuse", bad, "-o", two_tiles / "o"), "z.tif", "3D")


def test_truncated_and_empty_images(two_tiles):
    data = (two_tiles / "a1.tif").read_bytes()
    (two_tiles / "cut.tif").write_bytes(data[: len(data) // 2])
    (two_tiles / "empty.tif").write_bytes(b"")
    for name in ("cut.tif", "empty.tif"):
        bad = _layout(two_tiles, f"dim = 2\na0.tif; ; (0, 0)\n{name}; ; (10, 0)\n")
        out = two_tiles / f"{name}.ome.zarr"
        result = run_cli("fuse", bad, "-o", out)
        _assert_user_error(result, name)
        assert _not_a_finished_image(out)


def test_tiff_header_claiming_an_enormous_shape(two_tiles):
    import struct

    tifffile.imwrite(two_tiles / "huge.tif", np.zeros((16, 16), np.uint16))
    with tifffile.TiffFile(two_tiles / "huge.tif") as tif:
        tags = [tif.pages[0].tags[name] for name in ("ImageWidth", "ImageLength")]
    data = bytearray((two_tiles / "huge.tif").read_bytes())
    for tag in tags:
        struct.pack_into("<H" if tag.dtype == 3 else "<I", data, tag.valueoffset, 60000)
    (two_tiles / "huge.tif").write_bytes(bytes(data))
    bad = _layout(two_tiles, "dim = 2\na0.tif; ; (0, 0)\nhuge.tif; ; (10, 0)\n")
    _assert_user_error(run_cli("fuse", bad, "-o", two_tiles / "o"), "huge.tif", "60000 x 60000")


def test_symlink_loop_in_a_pattern_folder(tmp_path):
    tifffile.imwrite(tmp_path / "t_1.tif", np.ones((8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "t_2.tif", np.ones((8, 8), np.uint8))
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)
    result = run_cli("info", tmp_path, "--pattern", "t_{index}.tif", "--grid", "1x2")
    assert result.returncode == 0, result.stderr
    assert "2 of 8 x 8" in result.stdout


def test_not_a_layout(two_tiles):
    png = two_tiles / "image.txt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(100))
    _assert_user_error(run_cli("fuse", png, "-o", two_tiles / "o"), "image.txt", "binary")
    _assert_user_error(run_cli("info", two_tiles / "nope.txt"), "nope.txt", "not found")


def test_existing_output_needs_overwrite(two_tiles):
    good = _layout(two_tiles, "dim = 2\na0.tif; ; (0, 0)\na1.tif; ; (15, 0)\n")
    out = two_tiles / "o.ome.zarr"
    assert run_cli("fuse", good, "-o", out, "-q").returncode == 0
    _assert_user_error(run_cli("fuse", good, "-o", out, "-q"), "exists", "--overwrite")
    assert run_cli("fuse", good, "-o", out, "-q", "--overwrite").returncode == 0


def test_unwritable_output(two_tiles):
    good = _layout(two_tiles, "dim = 2\na0.tif; ; (0, 0)\na1.tif; ; (15, 0)\n")
    (two_tiles / "plain_file").write_text("x")
    _assert_user_error(run_cli("fuse", good, "-o", two_tiles / "plain_file" / "o.ome.zarr"),
                       "plain_file")


def test_tile_failing_mid_run_keeps_a_resumable_unfinished_output(two_tiles):
    good = _layout(two_tiles, "dim = 2\na0.tif; ; (0, 0)\na1.tif; ; (15, 0)\n")
    pixels = np.random.default_rng(0).integers(0, 9, (20, 20), dtype=np.uint16)
    tifffile.imwrite(two_tiles / "a1.tif", pixels, compression="zlib")
    clean = two_tiles / "clean.ome.zarr"
    assert run_cli("fuse", good, "-o", clean, "-q").returncode == 0
    data = (two_tiles / "a1.tif").read_bytes()
    with tifffile.TiffFile(two_tiles / "a1.tif") as tif:
        start = tif.pages[0].dataoffsets[0]
    broken = bytearray(data)
    broken[start : start + 16] = b"\xff" * 16  # header and sizes fine, pixels undecodable
    (two_tiles / "a1.tif").write_bytes(bytes(broken))
    out = two_tiles / "o.ome.zarr"
    _assert_user_error(run_cli("fuse", good, "-o", out), "a1.tif", "--resume")
    assert _not_a_finished_image(out)
    _assert_user_error(run_cli("fuse", good, "-o", out), "unfinished tilefuse run", "--resume")
    (two_tiles / "a1.tif").write_bytes(data)  # fixed: the same command continues the run
    assert run_cli("fuse", good, "-o", out, "--resume", "-q").returncode == 0
    np.testing.assert_array_equal(read_ome_zarr_level(out).compute(),
                                  read_ome_zarr_level(clean).compute())


@pytest.mark.parametrize("ngff", ["0.5", "0.4"])
def test_fused_output_validates_and_opens_in_ome_zarr(tile_folder, tmp_path, ngff):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models import v04, v05

    layout_path, ts = tile_folder
    out = tmp_path / "v.ome.zarr"
    result = run_cli("fuse", layout_path, "-o", out, "--chunk", "40", "--ngff", ngff, "-q",
                     "--pixel-size", "0.25")
    assert result.returncode == 0, result.stderr
    group = zarr.open_group(str(out), mode="r")
    (v05.Image if ngff == "0.5" else v04.Image).from_zarr(group)  # raises if invalid
    image_node = next(iter(Reader(parse_url(str(out)))()))
    levels = [np.asarray(d) for d in image_node.data]
    np.testing.assert_array_equal(levels[0], ts.truth)
    h, w = ts.truth.shape
    expected = [(h, w)]
    while max(expected[-1]) > 40:
        expected.append(tuple(-(-n // 2) for n in expected[-1]))
    assert [lv.shape for lv in levels] == expected
    attrs = group.attrs.asdict()
    ms = (attrs["ome"] if ngff == "0.5" else attrs)["multiscales"][0]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[0.25 * 2**k, 0.25 * 2**k] for k in range(len(expected))]


def test_memory_limit_chooses_the_chunk_and_refuses_too_little(tile_folder, tmp_path):
    """The chunk choice and the warning themselves are tested in tests/test_memory.py."""
    from tilefuse.plan.info import parse_bytes

    assert parse_bytes("4GB") == 4 * 10**9 and parse_bytes("512MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="expected"):
        parse_bytes("lots")
    layout_path, _ = tile_folder
    result = run_cli("fuse", layout_path, "-o", tmp_path / "x.ome.zarr", "--memory-limit", "1MB")
    _assert_user_error(result, "is below what fusing needs")
    assert not (tmp_path / "x.ome.zarr").exists()


def test_a_default_pixel_size_is_announced(tile_folder, tmp_path):
    """No file states a pixel size: the summary says 1 micrometer is a default, not a fact."""
    from conftest import run_main

    layout_path, _ = tile_folder
    guessed = run_main("fuse", layout_path, "-o", tmp_path / "a.ome.zarr")
    assert guessed.returncode == 0
    assert "pixel size 1 micrometer is a default: no file states one" in guessed.stderr
    given = run_main("fuse", layout_path, "-o", tmp_path / "b.ome.zarr", "--pixel-size", "0.3")
    assert given.returncode == 0 and "is a default" not in given.stderr
