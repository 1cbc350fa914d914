"""Shared fixtures: paths to the real tile sets in tests/data and a CLI runner."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def layout_file(tmp_path_factory):
    """A 4 x 5 grid of 160 x 192 tiles at fractional, jittered positions (TileConfiguration):
    the set the scheduler, SLURM and sharding tests fuse and compare."""
    from tilefuse.testing import grid_tileset, write_tileset

    ts = grid_tileset(grid=(4, 5), tile_shape=(160, 192), overlap=0.15, position_error=4,
                      fractional=True, seed=21)
    return write_tileset(ts, tmp_path_factory.mktemp("tiles"), stage=False)


@pytest.fixture
def data_dir() -> Path:
    return DATA


def read_positions(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m tilefuse ARGS`` in a subprocess, capturing output.

    Every CLI test goes through here or :func:`run_main`: a traceback on stderr fails it,
    whatever the test itself checks (the CLI never shows one).
    """
    result = subprocess.run([sys.executable, "-m", "tilefuse", *map(str, args)],
                            capture_output=True, text=True, cwd=cwd, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def run_main(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``tilefuse ARGS`` in this process (fast: no interpreter start), like :func:`run_cli`.

    Returns a CompletedProcess with the exit status and what was printed. An exception that
    escapes :func:`tilefuse.cli.main.main` is a test failure: the CLI must never show a traceback.
    """
    import contextlib
    import io
    import logging
    import os

    from tilefuse.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers.clear()  # main's basicConfig then logs to this call's stderr
    old_cwd = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse: --help, or a malformed option
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        os.chdir(old_cwd)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert "Traceback" not in err.getvalue(), err.getvalue()
    return subprocess.CompletedProcess(["tilefuse", *map(str, args)], code, out.getvalue(),
                                       err.getvalue())


def unfinish(image: Path) -> None:
    """Drop an image's OME metadata (zarr v3), as a run killed before its last step leaves it."""
    import json

    meta = image / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"].pop("ome")
    meta.write_text(json.dumps(doc))


PIXEL = (0.5, 0.5)
"""The pixel size :func:`write_cycle` states, micrometre."""


def write_cycle(layout: Any, folder: Path, *, pixel_size=PIXEL, dtype=None,
                reverse: bool = False) -> Path:
    """One cycle as CYX TIFF tiles and a CSV layout (stage positions, channel names, pixel size);
    `reverse` stores the channels in the opposite order, `dtype` converts (>> 8 to uint8)."""
    import tifffile

    from tilefuse.io.readers import write_csv_layout
    from tilefuse.io.tile_cache import read_tile
    from tilefuse.io.tiles import FileSource
    from tilefuse.model.layout import Layout, Tile

    folder.mkdir(parents=True, exist_ok=True)
    tiles = []
    for i, tile in enumerate(layout.tiles):
        data = read_tile(tile.source)
        data = data[::-1] if reverse else data
        if dtype is not None:
            data = (data >> 8).astype(dtype)
        path = folder / f"tile_{i:03d}.tif"
        tifffile.imwrite(path, data, metadata={"axes": "CYX"})
        tiles.append(Tile(path.name, tile.shape, tile.affine, FileSource((str(path),))))
    channels = layout.channels[::-1] if reverse else layout.channels
    out = Layout(tuple(tiles), dtype or layout.dtype, channels, pixel_size=pixel_size)
    return write_csv_layout(out, folder / "layout.csv")
