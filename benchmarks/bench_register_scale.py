"""Registration at scale: 1,600 and 10,000 tiles made on the fly, timed and bounded in memory.

    python benchmarks/bench_register_scale.py                    # 1,600 and 10,000 tiles of 256²
    python benchmarks/bench_register_scale.py --tiles 1600 --tile 512 --workers 2

Tiles come from ``tilefuse.testing.texture_layout`` (a random texture read on demand, no
files: 10,000 tiles of 256² would be 1.3 GB of uint16, of 512² 5 GB); their stage positions are
the true ones plus a uniform error of up to ``--error`` px. Each size runs in a child process
under ``/usr/bin/time -v``: the table gives the tiles, candidate pairs, total time, time per pair
(wall time of the measurements over the pairs and chance-level samples measured), the solve's
time, the peak RSS and the largest position error after registration (pixels, against the
truth). The child draws a progress bar on stderr from ``register(progress=...)``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from common import print_table, run_timed

RESULTS = Path(__file__).resolve().parent / "results"


def _bar(done: int, total: int, label: str) -> None:
    """A one-line progress bar on stderr (what the CLI shows)."""
    if total:
        filled = int(30 * done / total)
        sys.stderr.write(f"\r{label}: [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}")
    else:
        sys.stderr.write(f"\r{label} ...{' ' * 40}")
    if total == 0 or done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def child(n_tiles: int, tile: int, workers: int, error: float, cache_mb: int,
          progress: bool) -> None:
    from tilefuse.io.tile_cache import set_cache_limit
    from tilefuse.registration import register
    from tilefuse.testing import texture_layout

    set_cache_limit(cache_mb * 2**20)
    side = round(float(np.sqrt(n_tiles)))
    truth, stage = texture_layout((side, side), tile, 0.1, stage_error=error, seed=0)
    started = time.perf_counter()
    registered, report = register(stage, workers=workers, progress=_bar if progress else None)
    seconds = time.perf_counter() - started
    diff = registered.positions - truth.positions
    err = np.linalg.norm(diff - diff.mean(axis=0), axis=1)
    measured = int(report.timings["pairs_measured"])
    print(json.dumps({
        "tiles": len(stage.tiles),
        "pairs": len(report.links),
        "accepted": report.summary["links_accepted"],
        "seconds": seconds,
        "pairs_seconds": report.timings["pairs"],
        "per_pair_ms": 1000 * report.timings["pairs"] / max(measured, 1),
        "solve_seconds": report.timings["solve"],
        "max_error_px": float(err.max()),
        "by_image": report.summary["tiles_by_image"],
    }))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiles", type=int, nargs="+", default=[1600, 10000])
    p.add_argument("--tile", type=int, default=256, help="tile side, pixels")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--error", type=float, default=5.0, help="max stage error, px per axis")
    p.add_argument("--cache-mb", type=int, default=256)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.tile, args.workers, args.error, args.cache_mb,
              not args.no_progress)
        return 0
    rows = {}
    for n in args.tiles:
        cmd = [sys.executable, __file__, "--child", str(n), "--tile", str(args.tile),
               "--workers", str(args.workers), "--error", str(args.error),
               "--cache-mb", str(args.cache_mb), "--no-progress"]
        rows[f"{n} tiles"] = run_timed(cmd)
    print_table(rows, [("tiles", "tiles", "d"), ("pairs", "pairs", "d"),
                       ("accepted", "accepted", "d"), ("seconds", "seconds", ".1f"),
                       ("ms/pair", "per_pair_ms", ".2f"), ("solve s", "solve_seconds", ".2f"),
                       ("peak RSS MB", "peak_rss_mb", ".0f"), ("max err px", "max_error_px",
                                                               ".3f")], width=14)
    RESULTS.mkdir(exist_ok=True)
    sizes = "_".join(str(n) for n in args.tiles)
    out = RESULTS / f"register_scale_{args.tile}px_{sizes}.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
