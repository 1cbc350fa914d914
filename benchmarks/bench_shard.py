"""Sharded vs unsharded OME-Zarr output: files per level and fuse+write time.

    python benchmarks/bench_shard.py          # 8.4k x 8.4k uint16, chunk 512, shard 4096
    python benchmarks/bench_shard.py --mosaic 4096 --repeats 1

Tiles are made on the fly (``tilefuse.testing.pattern_layout``); the two variants run
interleaved in this process, ``--repeats`` times each, and the median time is reported. The two
outputs are checked to hold the same pixels at every level, then deleted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr


def files_per_level(out: Path) -> list[int]:
    group = zarr.open_group(out, mode="r")
    paths = [d["path"] for d in group.attrs["ome"]["multiscales"][0]["datasets"]]
    return [sum(len(names) for _, _, names in os.walk(out / p)) for p in paths]


def main() -> None:
    from tilefuse import fuse
    from tilefuse.ome_zarr.writer import write_ome_zarr
    from tilefuse.testing import pattern_layout

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mosaic", type=int, default=8192)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--shard", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = int(np.ceil((args.mosaic - args.tile) / round(args.tile * 0.9))) + 1
    layout = pattern_layout((n, n), args.tile)
    variants = {"unsharded": None, f"shard {args.shard}": args.shard}
    times: dict[str, list[float]] = {k: [] for k in variants}
    files: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_shard_") as tmp:
        for _ in range(args.repeats):
            for name, shard in variants.items():
                out = Path(tmp) / f"{name.replace(' ', '_')}.ome.zarr"
                shutil.rmtree(out, ignore_errors=True)
                started = time.perf_counter()
                write_ome_zarr(fuse(layout, chunk=args.chunk), out, shard=shard)
                times[name].append(time.perf_counter() - started)
                files[name] = files_per_level(out)
        outs = [Path(tmp) / f"{k.replace(' ', '_')}.ome.zarr" for k in variants]
        a, b = (zarr.open_group(o, mode="r") for o in outs)
        for k in range(len(files["unsharded"])):
            assert np.array_equal(a[str(k)][...], b[str(k)][...]), f"level {k} differs"
        shape = a["0"].shape
    print(f"mosaic {' x '.join(map(str, shape))} uint16 ({n} x {n} tiles of {args.tile}^2), "
          f"chunk {args.chunk}, {os.cpu_count()} cores, median of {args.repeats}")
    print(f"{'variant':<12} {'time s':>7}  runs                 files per level (total)")
    for name in variants:
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"{name:<12} {statistics.median(times[name]):7.2f}  {runs:<20} "
              f"{files[name]} ({sum(files[name])})")
    print("same pixels at every level: yes")


if __name__ == "__main__":
    main()
