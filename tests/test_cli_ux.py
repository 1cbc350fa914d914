"""A microscopist's first hour (issue 20): one progress bar per command, ``-q`` prints only the
summary, a bad option is one line, every help page has examples that parse, ``register``
shows progress."""

from __future__ import annotations

import re
import shlex

import numpy as np
import pytest

from conftest import run_cli, run_main
from tilefuse.cli.main import _parser
from tilefuse.ome_zarr import _store
from tilefuse.ome_zarr.writer import read_ome_zarr_level
from tilefuse.testing import grid_tileset, write_tileset

_BAR = re.compile(r"^(?P<label>[^:\r\n]*): *(?P<pct>\d+)%\|[^|]*\| *(?P<done>\d+)/(?P<total>\d+)")


def _bars(stderr: str) -> list[tuple[str, int, int]]:
    """Every state of a tqdm bar printed (``\\r``-separated): (label, done, total)."""
    states = []
    for part in re.split(r"[\r\n]", stderr):
        m = _BAR.match(part.strip())
        if m:
            states.append((m["label"], int(m["done"]), int(m["total"])))
    return states


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    ts = grid_tileset(grid=(2, 2), tile_shape=(100, 100), overlap=0.1, seed=1)
    return write_tileset(ts, tmp_path_factory.mktemp("tiles"), stage=False), ts


def test_fuse_shows_one_bar_over_every_batch_and_level(small_set, tmp_path):
    """More than BATCH_CHUNKS chunks (two computes at level 0, then a pyramid level): one bar,
    one total, counting up once to 100%."""
    layout, ts = small_set
    out = tmp_path / "m.ome.zarr"
    result = run_main("fuse", layout, "-o", out, "--chunk", "2", "--levels", "2")
    assert result.returncode == 0, result.stderr
    level0, level1 = 95 * 95, 48 * 48  # the 190 x 190 mosaic in 2 px chunks, then halved
    assert level0 > _store.BATCH_CHUNKS
    states = _bars(result.stderr)
    assert states, result.stderr
    assert {total for _, _, total in states} == {level0 + level1}  # one bar: one total
    done = [d for _, d, _ in states]
    assert done == sorted(done) and done[-1] == level0 + level1  # never restarts, ends at 100%
    first_full = done.index(level0 + level1)
    assert all(d == done[-1] for d in done[first_full:])  # 100% once: the end
    labels = [label for label, _, _ in states]
    assert labels[0] == "fusing" and labels[-1] == "pyramid level 1"
    assert any(label == "fusing" and 0 < d < level0 for label, d, _ in states)  # it moved
    assert "fused 4 tiles" in result.stderr.splitlines()[-2]
    np.testing.assert_array_equal(read_ome_zarr_level(out, 0).compute(), ts.truth)


@pytest.mark.parametrize("scheduler", ["threads", "processes", "distributed"])
def test_quiet_prints_only_the_summary(small_set, tmp_path, scheduler):
    layout, _ = small_set
    out = tmp_path / "q.ome.zarr"
    result = run_cli("fuse", layout, "-o", out, "--chunk", "64", "-q", "--scheduler", scheduler,
                     "--workers", "2", "--pixel-size", "0.5")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # no bar, no log line, no dashboard: the summary
    assert re.match(rf"fused 4 tiles -> {re.escape(str(out))} \(x 190, y 190 px, ", lines[0])


@pytest.mark.parametrize(("argv", "names"), [
    (["fuse", "t.txt", "-o", "m.ome.zarr", "--chunk", "0"], ["--chunk", "positive integer"]),
    (["fuse", "t.txt"], ["--output", "required"]),
    (["fuse", "t.txt", "-o", "m.ome.zarr", "--blend", "feather"], ["--blend", "'linear'"]),
    (["fuse", "t.txt", "-o", "m.ome.zarr", "--overlap", "10"], ["--overlap", "fraction"]),
    (["fuse", "t.txt", "-o", "m.ome.zarr", "--bogus"], ["tilefuse fuse", "--bogus"]),
    (["register", "t.txt", "--chunk", "64"], ["tilefuse register", "--chunk"]),  # acts not
    (["info", "t.txt", "--workers", "many"], ["--workers", "integer", "'many'"]),
    ([], ["COMMAND"]),
])
def test_a_bad_option_is_one_line(argv, names):
    result = run_main(*argv)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # not argparse's usage block
    assert "usage:" not in result.stderr and "--help" in lines[0]
    for name in names:
        assert name in lines[0], lines[0]


@pytest.mark.parametrize("command", ["", "fuse", "register", "preview", "flatfield", "info"])
def test_every_help_page_has_examples_that_parse(command):
    result = run_main(*([command] if command else []), "--help")
    assert result.returncode == 0
    examples = result.stdout.split("examples:\n", 1)[1].splitlines()
    commands = [shlex.split(ln.split("    (")[0]) for ln in examples if ln.startswith("  tilefuse")]
    assert len(commands) >= 2 + (command != "")  # two or three each
    parser = _parser()
    for words in commands:
        if "COMMAND" not in words:
            parser.parse_args(words[1:])  # an example that does not parse raises SystemExit


def test_flatfield_shows_progress(small_set, tmp_path):
    """One bar over the sampled tiles and the overlaps read (4 tiles, 4 overlaps), to 100%."""
    layout, _ = small_set
    result = run_main("flatfield", layout, "-o", tmp_path / "flat.tif")
    assert result.returncode == 0, result.stderr
    states = _bars(result.stderr)
    assert {(label, total) for label, _, total in states} == {("estimating flat field", 8)}
    assert states[-1][1] == 8 and [d for _, d, _ in states] == sorted(d for _, d, _ in states)
    assert "written to" in result.stderr.splitlines()[-1]
    quiet = run_main("flatfield", layout, "-o", tmp_path / "q.tif", "-q")
    assert quiet.returncode == 0 and not _bars(quiet.stderr)


def test_register_shows_progress(tmp_path):
    ts = grid_tileset(grid=(2, 3), tile_shape=(96, 96), overlap=0.2, position_error=4, seed=3)
    layout = write_tileset(ts, tmp_path / "tiles", stage=True)
    result = run_main("register", layout, "-o", tmp_path / "r.txt")
    assert result.returncode == 0, result.stderr
    states = _bars(result.stderr)
    pairs = [(d, t) for label, d, t in states if label == "registering pairs"]
    assert pairs and pairs[-1][0] == pairs[-1][1] >= 7  # at least the 7 neighbour pairs
    assert [d for d, _ in pairs] == sorted(d for d, _ in pairs)
    assert len({t for _, t in pairs}) == 1
    assert ("solving", 1, 1) in states
    assert "registered layout written to" in result.stderr.splitlines()[-1]
    quiet = run_main("register", layout, "-o", tmp_path / "q.txt", "-q")
    assert quiet.returncode == 0 and not _bars(quiet.stderr)  # warnings may remain, not bars
    assert "links:" not in quiet.stderr and "written to" not in quiet.stderr
