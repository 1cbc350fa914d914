"""Every hostile input listed in the README, run as written: exit status, the one message, and
nothing created, changed or deleted on disk.

The table between the ``hostile-inputs`` markers in README.md is the list; each row runs in a
folder prepared by :func:`case_dir` (tiles, a finished and an unfinished output, a folder of
someone's notes, an existing picture...). A row whose exit status is 2 must leave every file of
that folder as it was.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from conftest import run_main, unfinish
from tilefuse.testing import grid_tileset, write_tileset

README = Path(__file__).parents[1] / "README.md"
_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*`tilefuse ([^`]+)`\s*\|\s*(\d+)\s*\|\s*`([^`]+)`\s*\|$")


def hostile_rows() -> list[tuple[int, str, int, str]]:
    """(number, arguments, exit status, message) of every README row."""
    text = README.read_text()
    if "<!-- hostile-inputs:start -->" not in text:
        return []
    block = text.split("<!-- hostile-inputs:start -->")[1].split("<!-- hostile-inputs:end -->")[0]
    rows = []
    for line in block.splitlines():
        match = _ROW.match(line.strip())
        if match:
            n, args, code, needle = match.groups()
            rows.append((int(n), args.replace("\\|", "|"), int(code), needle.replace("\\|", "|")))
    return rows


ROWS = hostile_rows()


def test_the_readme_lists_at_least_60_numbered_cases():
    assert len(ROWS) >= 60
    assert [n for n, *_ in ROWS] == list(range(1, len(ROWS) + 1))


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory) -> Path:
    """tiles/ (6 tiles and their TileConfiguration), done.ome.zarr (finished, with its
    sidecars), part.ome.zarr (unfinished), notes/ (someone's folder), link.ome.zarr (a link to
    it), existing.png, existing.json, existing.txt, bad.txt (a malformed layout) and Fiji's
    registered layout."""
    root = tmp_path_factory.mktemp("hostile")
    ts = grid_tileset(grid=(2, 3), tile_shape=(48, 64), overlap=0.2, position_error=3, seed=5)
    layout = write_tileset(ts, root / "tiles", stage=False)
    assert run_main("fuse", layout, "-o", root / "done.ome.zarr", "-q").returncode == 0
    assert run_main("fuse", layout, "-o", root / "part.ome.zarr", "-q").returncode == 0
    unfinish(root / "part.ome.zarr")
    (root / "part.layout.csv").unlink()
    (root / "part.TileConfiguration.txt").unlink()
    (root / "notes").mkdir()
    (root / "notes" / "notes.txt").write_text("a week of microscope time\n")
    (root / "link.ome.zarr").symlink_to(root / "notes")
    (root / "existing.png").write_bytes(b"not really a picture")
    (root / "existing.txt").write_text("someone's file\n")
    (root / "existing.json").write_text("{}\n")
    (root / "bad.txt").write_text("dim = 2\ntile_0000.tif; ; (0, zero)\n")
    (root / "tiles" / "TileConfiguration.registered.txt").write_text("Fiji's own result\n")
    return root


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every path below `root` with its size and modification time (links not followed)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st = path.lstat()
            found[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return found


@pytest.mark.parametrize(("number", "args", "code", "needle"), ROWS,
                         ids=[f"{n}" for n, *_ in ROWS])
def test_hostile_input(case_dir, number, args, code, needle):
    before = _snapshot(case_dir)
    result = run_main(*shlex.split(args), cwd=case_dir)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == code, f"#{number}: {result.stderr}"
    assert "Traceback" not in result.stderr
    assert lines, f"#{number}: nothing said"
    assert needle in lines[-1], f"#{number}: {lines[-1]!r} lacks {needle!r}"
    if code == 2:
        if not re.match(r"tilefuse( \w+)?: error: (argument|the following)", lines[-1]):
            assert len(lines) == 1, f"#{number}: more than one line:\n{result.stderr}"
        assert _snapshot(case_dir) == before, f"#{number} changed files on disk"
