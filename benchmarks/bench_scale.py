"""Scale: fuse a mosaic far larger than RAM use to OME-Zarr on disk, and time planning.

    python benchmarks/bench_scale.py --mosaic 50000        # ~2,900 tiles of 1024², ~5 GB uint16
    python benchmarks/bench_scale.py --plan-only           # 10,000 tiles / 100,000 chunks

Tiles are made on the fly (``tilefuse.testing.PatternSource``), so the disk holds only the output.
The fusion runs in a child process under ``/usr/bin/time -v``; the table gives the mosaic's size,
the process's peak RSS, their ratio, the time and the throughput. The output is checked against
the pattern it was made from at random places, then deleted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import run_timed

RESULTS = Path(__file__).resolve().parent / "results"


def child(mosaic: int, tile: int, out: Path, cache_mb: int, chunk: int) -> None:
    from tilefuse import fuse
    from tilefuse.cli.allocator import retain_freed_memory
    from tilefuse.ome_zarr.writer import write_ome_zarr
    from tilefuse.testing import pattern_layout

    retain_freed_memory()  # as the CLI does
    n = int(np.ceil((mosaic - tile) / round(tile * 0.9))) + 1
    layout = pattern_layout((n, n), tile)
    started = time.perf_counter()
    arr = fuse(layout, chunk=chunk, cache_bytes=cache_mb * 2**20)
    write_ome_zarr(arr, out, overwrite=True)
    seconds = time.perf_counter() - started
    print(json.dumps({"tiles": len(layout.tiles), "shape": list(arr.shape), "seconds": seconds}))


def check(out: Path, shape) -> int:
    """Compare 20 random windows of the stored mosaic with the pattern; returns mismatches."""
    from tilefuse.ome_zarr.writer import read_ome_zarr_level
    from tilefuse.testing import PatternSource

    level0 = read_ome_zarr_level(out, 0)
    rng = np.random.default_rng(0)
    bad = 0
    for _ in range(20):
        y, x = (int(rng.integers(0, s - 64)) for s in shape)
        expect = PatternSource((y, x), (64, 64)).read()[0]
        bad += int(np.count_nonzero(level0[y : y + 64, x : x + 64].compute() != expect))
    return bad


def plan_only(n_tiles: int, chunk: int) -> dict:
    from tilefuse.plan.geometry import plan_chunks
    from tilefuse.testing import pattern_layout

    side = int(np.sqrt(n_tiles))
    layout = pattern_layout((side, side), 1024)
    started = time.perf_counter()
    plan = plan_chunks(layout, (chunk, chunk))
    seconds = time.perf_counter() - started
    return {"tiles": len(layout.tiles), "chunks": plan.n_chunks, "plan_seconds": seconds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mosaic", type=int, default=50000, help="mosaic side in pixels")
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--cache-mb", type=int, default=256)
    p.add_argument("--plan-only", action="store_true")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.mosaic, args.tile, args.child, args.cache_mb, args.chunk)
        return 0
    plan = plan_only(10_000, 300)
    print(f"planning: {plan['tiles']} tiles -> {plan['chunks']} chunks in "
          f"{plan['plan_seconds']:.2f} s")
    result = {"planning": plan}
    if not args.plan_only:
        work = Path(tempfile.mkdtemp(prefix="tilefuse-scale-"))
        out = work / "big.ome.zarr"
        run = run_timed([sys.executable, __file__, "--child", str(out), "--mosaic",
                         str(args.mosaic), "--tile", str(args.tile), "--chunk", str(args.chunk),
                         "--cache-mb", str(args.cache_mb)])
        if "error" in run:
            print(run["error"])
            return 1
        rss_mb = run["peak_rss_mb"]
        mosaic_mb = np.prod(run["shape"]) * 2 / 2**20
        disk_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
        run.update(peak_rss_mb=rss_mb, mosaic_mb=mosaic_mb, disk_mb=disk_mb,
                   mismatches=check(out, run["shape"]))
        shutil.rmtree(work, ignore_errors=True)
        mpix = np.prod(run["shape"]) / 1e6
        print(f"fused {run['tiles']} tiles -> {run['shape'][0]} x {run['shape'][1]} uint16 "
              f"({mosaic_mb:.0f} MiB raw, {disk_mb:.0f} MiB on disk with pyramid) in "
              f"{run['seconds']:.0f} s ({mpix / run['seconds']:.1f} MPix/s incl. pyramid); "
              f"peak RSS {rss_mb:.0f} MiB = mosaic / {mosaic_mb / rss_mb:.1f}; "
              f"{run['mismatches']} mismatching pixels in 20 checked windows")
        result["fusion"] = run
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
