"""Registration cost per pair, by tile size, on one and on all cores.

    python benchmarks/bench_pairs.py [--tiles 512,1024] [--downsample 1,2] [--grid 4x4]
                                     [--repeats 3]

For each tile size and lateral binning (``register(downsample=...)``: a search on binned
overlaps, then each link refined at full resolution), a synthetic grid (cell-like content,
±15 px stage error, 2% noise, 10% overlap) is registered in memory with ``workers=1`` and with
one worker per core. Reported: the number of neighbour pairs, milliseconds per pair (whole
``register`` call divided by the pairs, the random null pairs and the solve included), the
parallel speed-up, the RMS and largest position error against the truth, and the RMS residual
the report claims (honest when it is about the size of the true error, not far below it). The
median of ``--repeats`` runs; saved as JSON in benchmarks/results/.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from common import grid_parser, print_table

HERE = Path(__file__).resolve().parent


def measure(tile: int, downsample: int, grid: tuple[int, int], repeats: int) -> dict:
    from tilefuse.registration import register
    from tilefuse.testing import grid_tileset

    ts = grid_tileset(grid=grid, tile_shape=(tile, tile), overlap=0.1, position_error=15,
                      fractional=True, noise=0.02, kind="cells", seed=7)
    row: dict = {}
    for label, workers in (("1 core", 1), ("all cores", os.cpu_count() or 1)):
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            registered, report = register(ts.stage, workers=workers, max_shift=30,
                                          downsample=downsample)
            seconds.append(time.perf_counter() - started)
        pairs = len(report.links)
        row[f"ms_per_pair_{label}"] = statistics.median(seconds) / pairs * 1000
        row["pairs"] = pairs
    d = registered.positions - ts.layout.positions
    err = np.linalg.norm(d - d.mean(axis=0), axis=1)
    row["rms_px"] = float(np.sqrt(np.mean(err**2)))
    row["max_px"] = float(err.max())
    row["residual_rms_px"] = report.summary["residual_rms"]
    row["speedup"] = row["ms_per_pair_1 core"] / row["ms_per_pair_all cores"]
    return row


def main() -> int:
    from tilefuse.cli.allocator import retain_freed_memory

    p = grid_parser(__doc__, grid="4x4")
    p.add_argument("--tiles", default="512,1024")
    p.add_argument("--downsample", default="1,2", help="lateral binning factors to compare")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    retain_freed_memory()
    grid = args.grid
    rows = {f"{t}²" + (f" /{d}" if d > 1 else ""): measure(t, d, grid, args.repeats)
            for t in map(int, args.tiles.split(",")) for d in map(int, args.downsample.split(","))}
    print(f"\n{grid[0]}x{grid[1]} grid, cells, ±15 px stage error, 2% noise, max_shift 30; "
          f"{os.cpu_count()} cores; median of {args.repeats}\n")
    print_table(rows, [("pairs", "pairs", "d"), ("ms/pair 1c", "ms_per_pair_1 core", ".1f"),
                       ("ms/pair all", "ms_per_pair_all cores", ".1f"),
                       ("speed-up", "speedup", ".2f"), ("RMS px", "rms_px", ".3f"),
                       ("max px", "max_px", ".3f"), ("resid. RMS", "residual_rms_px", ".3f")])
    (HERE / "results").mkdir(exist_ok=True)
    path = HERE / "results" / "pairs.json"
    path.write_text(json.dumps({"grid": grid, "cores": os.cpu_count(), "results": rows},
                               indent=2))
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
