"""Flat-field accuracy and time: tilefuse's estimate against BaSiCPy, on one synthetic tile set.

    python benchmarks/bench_flatfield.py [--grid 8x8] [--tile 256] [--overlap 0.15] [--seed 0]

A grid of "cells" tiles (tilefuse.testing) is multiplied by a 30 % vignette (1 - 0.3 r^2/r_max^2,
70 % in the corners) and a per-tile gain, uniform in +-15 %, in two variants:

iid         gains drawn independently (their chance linear trend over the grid is kept)
trend-free  the same gains with their linear trend over the grid removed (a trend cannot be told
            apart from a tilt of the flat by any method that sees only the tiles)

Estimators:

tilefuse          ``estimate_flatfield`` (overlaps + content, polynomial of degree 2)
tilefuse-content  ``estimate_flatfield(overlaps=False)`` (content median only, no positions)
basicpy           BaSiCPy's ``BaSiC(get_darkfield=False).fit`` (only if importable in
                  benchmarks/.venv: ``benchmarks/.venv/bin/pip install basicpy``; never a tilefuse
                  dependency). It runs in its own process; its time excludes imports.

Error: RMS over the tile of (estimated flat / true flat - 1), both normalised to mean 1.
The table is printed and saved as JSON in benchmarks/results/flatfield.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import grid_parser

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BENCH_PYTHON = HERE / ".venv" / "bin" / "python"


def vignette(shape: tuple[int, int], strength: float = 0.3) -> np.ndarray:
    """1 at the centre, ``1 - strength`` in the corners, quadratic in the radius."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    r2 = (yy - (shape[0] - 1) / 2) ** 2 + (xx - (shape[1] - 1) / 2) ** 2
    return 1 - strength * r2 / r2.max()


def make_tiles(grid, tile: int, overlap: float, seed: int, trend: bool):
    """Vignetted, gain-scaled uint16 tiles; returns (layout, tiles, true flat)."""
    from tilefuse.io.readers.memory import layout_from_arrays
    from tilefuse.testing import grid_tileset

    ts = grid_tileset(grid=grid, tile_shape=(tile, tile), overlap=overlap, kind="cells", seed=seed)
    flat = vignette((tile, tile))
    log_g = np.log(np.random.default_rng(seed + 1).uniform(0.85, 1.15, len(ts.tiles)))
    if not trend:
        design = np.column_stack([np.ones(len(log_g)), ts.layout.positions])
        log_g -= design @ np.linalg.lstsq(design, log_g, rcond=None)[0]
    gains = np.exp(log_g)
    tiles = [np.rint(0.85 * t * flat * g).astype(np.uint16)
             for t, g in zip(ts.tiles, gains, strict=True)]
    return layout_from_arrays(tiles, affines=ts.layout.affines), tiles, flat


def flat_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    est = np.asarray(estimate, dtype=np.float64).reshape(truth.shape)
    return float(np.sqrt(np.mean((est / est.mean() / (truth / truth.mean()) - 1) ** 2)))


def run_tilefuse(layout, overlaps: bool) -> tuple[np.ndarray, float]:
    from tilefuse.intensity import estimate_flatfield

    started = time.perf_counter()
    flat, _ = estimate_flatfield(layout, overlaps=overlaps)
    return flat[0], time.perf_counter() - started


def basic_child(stack_path: Path, out_path: Path) -> None:
    """In the benchmark venv: fit BaSiC on the stack, save the flat, print the time as JSON."""
    import warnings

    warnings.filterwarnings("ignore")
    from basicpy import BaSiC

    stack = np.load(stack_path).astype(np.float32)
    started = time.perf_counter()
    model = BaSiC(get_darkfield=False)
    model.fit(stack)
    seconds = time.perf_counter() - started
    np.save(out_path, np.asarray(model.flatfield, dtype=np.float64))
    print(json.dumps({"seconds": seconds}))


def run_basicpy(tiles, work: Path) -> dict:
    """BaSiCPy in the benchmark venv, or why it could not run."""
    if not BENCH_PYTHON.exists():
        return {"error": "benchmarks/.venv missing (make bench creates it)"}
    probe = subprocess.run([str(BENCH_PYTHON), "-c", "import basicpy"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        return {"error": f"basicpy not importable in benchmarks/.venv ({last[:120]}); "
                         "try benchmarks/.venv/bin/pip install basicpy"}
    stack_path, out_path = work / "stack.npy", work / "basic_flat.npy"
    np.save(stack_path, np.stack(tiles))
    proc = subprocess.run([str(BENCH_PYTHON), __file__, "--basic-child", str(stack_path),
                           str(out_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    seconds = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
    return {"flat": np.load(out_path), "seconds": seconds}


def main() -> int:
    parser = grid_parser(__doc__, grid="8x8", tile=256, seed=0)
    parser.add_argument("--overlap", type=float, default=0.15)
    parser.add_argument("--basic-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.basic_child:
        basic_child(*args.basic_child)
        return 0
    grid = args.grid
    rows = []
    with tempfile.TemporaryDirectory(prefix="tilefuse-bench-flat-") as tmp:
        for trend in (True, False):
            layout, tiles, truth = make_tiles(grid, args.tile, args.overlap, args.seed, trend)
            gains = "iid" if trend else "trend-free"
            for name, overlaps in (("tilefuse", True), ("tilefuse-content", False)):
                flat, seconds = run_tilefuse(layout, overlaps)
                rows.append({"gains": gains, "method": name, "seconds": seconds,
                             "rms_error": flat_error(flat, truth)})
            basic = run_basicpy(tiles, Path(tmp))
            row = {"gains": gains, "method": "basicpy"}
            if "error" in basic:
                row["error"] = basic["error"]
            else:
                row.update(seconds=basic["seconds"], rms_error=flat_error(basic["flat"], truth))
            rows.append(row)
            print(f"  {gains}: done", file=sys.stderr)
    report(rows, grid, args)
    return 0


def report(rows: list, grid, args) -> None:
    print(f"\n{grid[0] * grid[1]} tiles of {args.tile}² uint16 'cells', {args.overlap:.0%} "
          f"overlap, 30 % vignette, gains +-15 %; {os.cpu_count()} cores\n")
    print(f"{'gains':<12}{'method':<18}{'flat RMS error':>15}{'seconds':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['gains']:<12}{r['method']:<18}  not run: {r['error']}")
            continue
        print(f"{r['gains']:<12}{r['method']:<18}{r['rms_error']:>14.2%}{r['seconds']:>10.2f}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "flatfield.json"
    path.write_text(json.dumps({"grid": grid, "tile": args.tile, "overlap": args.overlap,
                                "cores": os.cpu_count(), "results": rows}, indent=2))
    print(f"\nsaved {path}")


if __name__ == "__main__":
    sys.exit(main())
