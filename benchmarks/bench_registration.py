"""Registration speed and accuracy against ASHLAR and m2stitch on the same tiles, same run.

    python benchmarks/bench_registration.py [--grid 10x10] [--tile 512] [--noise 0.02]

A synthetic acquisition with exact truth (``tilefuse.testing.grid_tileset``: cell-like content,
±15 px stage error, fractional true positions, Gaussian noise) is written as TIFF files named
``img_{row:03}_{col:03}.tif`` plus a TileConfiguration of the stage positions. Each tool runs in
its own process under ``/usr/bin/time -v`` and registers from the files:

tilefuse   ``register(read_layout(TileConfiguration.txt))``, defaults (max shift from the layout)
tilefuse-30  the same with ``max_shift=30``, the window ASHLAR is given
ashlar     ``FilePatternReader`` + ``EdgeAligner(max_shift=30)`` (ASHLAR 1.20, from PyPI)
ashlar-s1  the same with ``filter_sigma=1`` (ASHLAR's advice for noisy images)
m2stitch   ``stitch_images(images, rows, cols)`` on the raw uint16 tiles (m2stitch 0.7.2)
m2stitch-z the same on tiles standardised to zero mean, unit variance

ASHLAR and m2stitch live in benchmarks/.venv-reg (``make bench`` creates it), never in
tilefuse's dependencies. Error = distance of each tile from its true position after removing one
global translation; the table gives RMS and max over tiles, seconds (reading included) and peak
RSS. Results are saved as JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import grid_parser, print_table, run_timed

HERE = Path(__file__).resolve().parent
REG_PYTHON = HERE / ".venv-reg" / "bin" / "python"
NAME = re.compile(r"img_(\d+)_(\d+)\.tif$")


def make_tiles(folder: Path, grid, tile: int, noise: float, seed: int) -> np.ndarray:
    """Write the tiles and the stage TileConfiguration; returns true positions (rows, cols, 2)."""
    import tifffile

    from tilefuse.testing import grid_tileset

    ts = grid_tileset(grid=grid, tile_shape=(tile, tile), overlap=0.1, position_error=15,
                      fractional=True, noise=noise, kind="cells", seed=seed)
    lines = ["dim = 2"]
    truth = np.zeros((*grid, 2))
    for i, (data, stage, true) in enumerate(
            zip(ts.tiles, ts.stage.tiles, ts.layout.tiles, strict=True)):
        r, c = divmod(i, grid[1])
        name = f"img_{r:03d}_{c:03d}.tif"
        tifffile.imwrite(folder / name, data)
        y, x = stage.position
        lines.append(f"{name}; ; ({x:.3f}, {y:.3f})")
        truth[r, c] = true.position
    (folder / "TileConfiguration.txt").write_text("\n".join(lines) + "\n")
    return truth


# ----------------------------------------------------------------------- one tool per process


def run_tilefuse(folder: Path, max_shift: float | None = None) -> dict:
    from tilefuse import read_layout
    from tilefuse.cli.allocator import retain_freed_memory
    from tilefuse.registration import register

    retain_freed_memory()
    started = time.perf_counter()
    registered, report = register(read_layout(folder / "TileConfiguration.txt"),
                                  max_shift=max_shift)
    seconds = time.perf_counter() - started
    out = {}
    for tile in registered.tiles:
        r, c = map(int, NAME.search(tile.name).groups())
        out[f"{r},{c}"] = [float(v) for v in tile.position]
    return {"seconds": seconds, "positions": out,
            "note": "; ".join(report.summary_lines()[:2])}


def run_ashlar(folder: Path, filter_sigma: float = 0.0) -> dict:
    from ashlar import filepattern, reg

    started = time.perf_counter()
    reader = filepattern.FilePatternReader(str(folder), "img_{row:03}_{col:03}.tif", 0.1, 1.0)
    aligner = reg.EdgeAligner(reader, max_shift=30, filter_sigma=filter_sigma,
                              do_make_thumbnail=False)
    aligner.run()
    seconds = time.perf_counter() - started
    out = {}
    for i, pos in enumerate(aligner.positions):
        r, c = map(int, NAME.search(reader.filename(i, 0)).groups())
        out[f"{r},{c}"] = [float(pos[0]), float(pos[1])]
    return {"seconds": seconds, "positions": out}


def run_m2stitch(folder: Path, standardise: bool = False) -> dict:
    import m2stitch
    import tifffile

    files = sorted(folder.glob("img_*.tif"))
    started = time.perf_counter()
    images = np.stack([tifffile.imread(f) for f in files])
    if standardise:  # how m2stitch's own examples feed it: zero mean, unit variance per tile
        images = images.astype(np.float32)
        images -= images.mean(axis=(1, 2), keepdims=True)
        images /= images.std(axis=(1, 2), keepdims=True)
    rows, cols = zip(*(map(int, NAME.search(f.name).groups()) for f in files), strict=True)
    result, _ = m2stitch.stitch_images(images, list(rows), list(cols), row_col_transpose=False)
    seconds = time.perf_counter() - started
    out = {f"{r},{c}": [float(y), float(x)]
           for r, c, y, x in zip(rows, cols, result["y_pos"], result["x_pos"], strict=True)}
    return {"seconds": seconds, "positions": out}


TOOLS = {
    "tilefuse": run_tilefuse,
    "tilefuse-30": lambda folder: run_tilefuse(folder, max_shift=30),
    "ashlar": run_ashlar,
    "ashlar-s1": lambda folder: run_ashlar(folder, filter_sigma=1.0),
    "m2stitch": run_m2stitch,
    "m2stitch-z": lambda folder: run_m2stitch(folder, standardise=True),
}


def measure(tool: str, folder: Path) -> dict:
    ours = tool.startswith("tilefuse")
    python = sys.executable if ours else str(REG_PYTHON)
    if not ours and not REG_PYTHON.exists():
        return {"error": "benchmarks/.venv-reg missing (make bench creates it)"}
    return run_timed([python, __file__, "--child", tool, "--folder", str(folder)])


def errors(positions: dict, truth: np.ndarray) -> tuple[float, float]:
    keys = [(r, c) for r in range(truth.shape[0]) for c in range(truth.shape[1])]
    got = np.array([positions[f"{r},{c}"] for r, c in keys])
    want = np.array([truth[r, c] for r, c in keys])
    d = got - want
    dist = np.linalg.norm(d - d.mean(axis=0), axis=1)
    return float(np.sqrt(np.mean(dist**2))), float(dist.max())


def main() -> int:
    p = grid_parser(__doc__, grid="10x10", tile=512, seed=5)
    p.add_argument("--noise", type=float, default=0.02)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(TOOLS[args.child](args.folder)))
        return 0
    grid = args.grid
    work = Path(tempfile.mkdtemp(prefix="tilefuse-regbench-"))
    try:
        truth = make_tiles(work, grid, args.tile, args.noise, args.seed)
        rows = {tool: measure(tool, work) for tool in TOOLS}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{grid[0] * grid[1]} tiles of {args.tile}² uint16, cells, ±15 px stage error, "
          f"noise {args.noise:.0%}; error after removing one global translation\n")
    for r in rows.values():
        if "error" not in r:
            r["rms_px"], r["max_px"] = errors(r["positions"], truth)
    print_table(rows, [("seconds", "seconds", ".2f"), ("RMS px", "rms_px", ".3f"),
                       ("max px", "max_px", ".3f"), ("peak RSS MB", "peak_rss_mb", ".0f")])
    (HERE / "results").mkdir(exist_ok=True)
    path = HERE / "results" / "registration.json"
    path.write_text(json.dumps({"grid": grid, "tile": args.tile, "noise": args.noise,
                                "results": rows}, indent=2))
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
