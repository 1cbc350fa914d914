"""Layout readers: TileConfiguration and CSV, leniency, round trips, and the real sets."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from conftest import DATA, read_positions
from tilefuse import InputError, read_layout
from tilefuse.io.readers import write_csv_layout, write_tileconfig


@pytest.fixture
def tiles(tmp_path):
    for i in range(3):
        tifffile.imwrite(tmp_path / f"t{i}.tif", np.full((10, 12), i, np.uint16))
    return tmp_path


def test_tileconfig_lenient_spacing_comments_bom_crlf(tiles):
    text = "\ufeff# header\r\ndim=2\r\n\r\nt0.tif;;(0,0)\r\n t1.tif ; ; ( 10.5 , -2 ) # note\r\n"
    (tiles / "tc.txt").write_bytes(text.encode("utf-8"))
    layout = read_layout(tiles / "tc.txt")
    np.testing.assert_allclose(layout.positions, [[0, 0], [-2, 10.5]])  # zyx
    assert [t.shape for t in layout.tiles] == [(10, 12), (10, 12)]


def test_tileconfig_multiseries(tmp_path):
    with tifffile.TiffWriter(tmp_path / "multi.ome.tif", ome=True) as tw:
        for i in range(2):
            tw.write(np.full((8, 9), i + 5, np.uint16), metadata={"axes": "YX"})
    (tmp_path / "tc.txt").write_text(
        "dim = 2\nmultiseries = true\nmulti.ome.tif; 0; (0, 0)\nmulti.ome.tif; 1; (9, 0)\n")
    layout = read_layout(tmp_path / "tc.txt")
    from tilefuse import fuse

    out = fuse(layout).compute()
    assert out.shape == (8, 18) and out[0, 0] == 5 and out[0, 17] == 6


def test_tileconfig_3d(tmp_path):
    for i in range(2):
        tifffile.imwrite(tmp_path / f"z{i}.tif", np.full((4, 10, 10), i + 1, np.uint16),
                         photometric="minisblack")
    (tmp_path / "tc.txt").write_text("dim = 3\nz0.tif; ; (0, 0, 0)\nz1.tif; ; (8, 0, 2)\n")
    layout = read_layout(tmp_path / "tc.txt")
    assert layout.ndim == 3
    np.testing.assert_allclose(layout.positions[1], [2, 0, 8])


def test_csv_positions_and_affines(tiles):
    (tiles / "l.csv").write_text("File,X,Y\nt0.tif,0,0\nt1.tif,11,0.5\n")
    layout = read_layout(tiles / "l.csv")
    np.testing.assert_allclose(layout.positions, [[0, 0], [0.5, 11]])
    # x' = 0.5 x + 3, y' = 2 y + 4  (row-major x, y affine)
    (tiles / "a.csv").write_text('file,affine\nt0.tif,"0.5 0 3 0 2 4"\nt1.tif,1;0;20;0;1;0\n')
    layout = read_layout(tiles / "a.csv")
    np.testing.assert_allclose(layout.tiles[0].affine, [[2, 0, 4], [0, 0.5, 3], [0, 0, 1]])


def test_csv_errors_name_line(tiles):
    (tiles / "bad.csv").write_text("file,x,y\nt0.tif,0,0\nt1.tif,abc,0\n")
    with pytest.raises(InputError, match=r"bad.csv:3.*'x'"):
        read_layout(tiles / "bad.csv")
    (tiles / "hdr.csv").write_text("name,x\nt0.tif,0\n")
    with pytest.raises(InputError, match="header"):
        read_layout(tiles / "hdr.csv")
    (tiles / "aff.csv").write_text("file,affine\nt0.tif,1 2 3\n")
    with pytest.raises(InputError, match=r"6 \(2D\) or 12"):
        read_layout(tiles / "aff.csv")


def test_csv_blank_lines_keep_every_tile_and_line_numbers(tiles):
    """A whitespace-only line once shifted the row numbering and dropped the last tile."""
    (tiles / "gap.csv").write_text("file,x,y\nt0.tif,0,0\n   \nt1.tif,8,0\nt2.tif,16,0\n")
    layout = read_layout(tiles / "gap.csv")
    assert [t.name for t in layout.tiles] == ["t0.tif", "t1.tif", "t2.tif"]
    np.testing.assert_array_equal(layout.positions[:, 1], [0, 8, 16])
    (tiles / "gap_bad.csv").write_text("file,x,y\nt0.tif,0,0\n   \nt1.tif,8,0\nt2.tif,x,0\n")
    with pytest.raises(InputError, match=r"gap_bad.csv:5.*'x'"):
        read_layout(tiles / "gap_bad.csv")


def test_non_ascii_paths(tmp_path):
    folder = tmp_path / "échantillon µm"
    folder.mkdir()
    tifffile.imwrite(folder / "tuile_é.tif", np.ones((5, 5), np.uint8))
    (folder / "tc.txt").write_text("dim = 2\ntuile_é.tif; ; (0, 0)\n", encoding="utf-8")
    assert read_layout(folder / "tc.txt").tiles[0].shape == (5, 5)


def test_round_trip_tileconfig_and_csv(tiles, tmp_path):
    (tiles / "tc.txt").write_text("dim = 2\nt0.tif; ; (0, 0)\nt1.tif; ; (10.25, 3)\n")
    layout = read_layout(tiles / "tc.txt").rotated(2.0)
    out = tmp_path / "sub"
    out.mkdir()
    again = read_layout(write_csv_layout(layout, out / "l.csv"))
    np.testing.assert_array_equal(again.affines, layout.affines)  # README: exact affines
    flat = read_layout(write_tileconfig(read_layout(tiles / "tc.txt"), out / "tc.txt"))
    np.testing.assert_array_equal(flat.positions, [[0, 0], [3, 10.25]])


def test_real_lscm_nominal_layout_reads_rgb_as_grey():
    layout = read_layout(DATA / "lscm_speckle_3x4" / "TileConfiguration.txt")
    rows = {r["file"]: r for r in read_positions(DATA / "lscm_speckle_3x4" / "positions.csv")}
    assert len(layout.tiles) == 12 and layout.dtype == np.uint8
    for tile in layout.tiles:
        r = rows[tile.name]
        np.testing.assert_allclose(tile.position, [float(r["nominal_y"]), float(r["nominal_x"])])


@pytest.mark.parametrize(("text", "needle"), [
    ("# tilefuse.channels = 5\n", "tilefuse.channels must be"),
    ("# tilefuse.pixel_size_xyz = [1e400, 1]\n", "tilefuse.pixel_size_xyz must be"),
    ("# tilefuse.pixel_size_xyz = [" + "9" * 400 + ", 1]\n", "tilefuse.pixel_size_xyz must be"),
])
def test_malformed_tilefuse_lines_are_one_clear_error(tiles, text, needle):
    """Values of the wrong type in `# tilefuse.` lines once raised TypeError (a traceback)."""
    (tiles / "h.csv").write_text(text + "file,x,y\nt0.tif,0,0\n")
    with pytest.raises(InputError, match=needle):
        read_layout(tiles / "h.csv")


def test_a_superscript_series_number_is_refused_clearly(tiles):
    """'²' passes str.isdigit() but not int(): once a ValueError traceback."""
    (tiles / "s.csv").write_text("file,series,x,y\nt0.tif,\u00b2,0,0\n")
    with pytest.raises(InputError, match=r"s\.csv"):
        read_layout(tiles / "s.csv")
    (tiles / "s.txt").write_text("dim = 2\nt0.tif; \u00b2; (0, 0)\n")
    with pytest.raises(InputError, match=r"s\.txt"):
        read_layout(tiles / "s.txt")


@pytest.mark.parametrize("delay, threaded", [(0.0, False), (0.025, True)])
def test_tile_headers_go_to_threads_only_when_storage_is_slow(monkeypatch, delay, threaded):
    """Headers are read one after the other while each takes well under
    ``SLOW_PROBE_S`` (threads only add GIL hand-offs then), and on threads once they are slow
    (a network file system); either way every header comes back, in order."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import tilefuse.io.readers.build as build
    from tilefuse.io.tiles import TileHeader

    pools: list[int] = []

    def probe(path, series):
        time.sleep(delay)
        return TileHeader((int(path), 1), np.dtype(np.uint16), 1, False)

    def pool(max_workers):
        pools.append(max_workers)
        return ThreadPoolExecutor(max_workers)

    monkeypatch.setattr(build, "probe_tile", probe)
    monkeypatch.setattr(build, "ThreadPoolExecutor", pool)
    monkeypatch.setattr(build, "SLOW_PROBE_S", 0.02)  # far from both delays: no flaky timing
    jobs = [(str(k), 0) for k in range(40)]
    headers = build._probe_headers(jobs)
    assert [h.shape[0] for h in headers] == list(range(40))
    assert pools == ([build.PROBE_THREADS] if threaded else [])
