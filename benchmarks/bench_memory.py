"""Is ``tilefuse info``'s peak-memory estimate honest? Estimate vs measured peak RSS.

    python benchmarks/bench_memory.py                      # three sets: ~10 MiB, ~200 MiB, ~2 GiB
    python benchmarks/bench_memory.py --sets small medium  # fewer
    python benchmarks/bench_memory.py --work /tmp/tf-mem --keep   # reuse the tiles next time

Each set is a grid of uint16 TIFF tiles (``tilefuse.testing.PatternSource`` pixels, 10% overlap,
fractional positions so every tile is interpolated) with a ``TileConfiguration.txt``:

=======  =================  ==================  ==============
set      tiles              mosaic              decoded tiles
=======  =================  ==================  ==============
small    5 x 5 of 512²      2356², 10.6 MiB     12.5 MiB
medium   11 x 11 of 1024²   10244², 200 MiB     242 MiB
large    36 x 36 of 1024²   33294², 2.06 GiB    2.5 GiB (> the 512 MiB cache)
=======  =================  ==================  ==============

For the default kernel (numba when installed) and ``--backend numpy``, ``tilefuse info`` gives
its estimate and ``tilefuse fuse LAYOUT -o out.ome.zarr`` (default settings otherwise: one
thread per core, 512 MiB tile cache, chunk from the memory budget, full pyramid) runs in a
child process under GNU time (``/usr/bin/time -v``, "Maximum resident set size"). When ``info``
has no ``--backend`` option, the numpy estimate comes from ``tilefuse.plan.info.describe(...,
backend="numpy")`` in a child process. The table gives both and their ratio (the target: within
2x either way); it is printed and saved as benchmarks/results/memory.json.

Needs GNU time at /usr/bin/time (Debian/Ubuntu: ``apt-get install -y time``); says so and stops
when it is missing. The large set needs ~2.7 GB of disk for its tiles and ~1 min per fusion on
2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TIME = Path("/usr/bin/time")
SETS = {"small": (5, 512), "medium": (11, 1024), "large": (36, 1024)}  # grid side, tile side
BACKENDS = ("default", "numpy")
_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
_WALL = re.compile(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)")
_PEAK = re.compile(r"peak memory:\s+~([\d.]+) (B|KiB|MiB|GiB|TiB)")
_MOSAIC = re.compile(r"mosaic:.*?([\d.]+) (B|KiB|MiB|GiB|TiB) uncompressed")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_ESTIMATE_CHILD = """
import os, sys
from tilefuse.plan.info import describe
from tilefuse.io.readers import read_layout
lines = describe(read_layout(sys.argv[1]), threads=os.cpu_count() or 1, backend=sys.argv[2])
print("\\n".join(lines))
"""


def make_set(folder: Path, grid: int, tile: int, overlap: float = 0.1) -> Path:
    """``grid`` x ``grid`` uint16 tiles of ``tile``² at fractional positions; the layout path."""
    import tifffile

    from tilefuse.testing import PatternSource

    layout = folder / "TileConfiguration.txt"
    if layout.exists():
        return layout
    folder.mkdir(parents=True, exist_ok=True)
    step = round(tile * (1 - overlap))
    rng = np.random.default_rng(0)
    lines = ["dim = 2"]
    for r in range(grid):
        for c in range(grid):
            origin = (r * step, c * step)
            name = f"tile_{r:03d}_{c:03d}.tif"
            tifffile.imwrite(folder / name, PatternSource(origin, (tile, tile)).read()[0])
            y, x = np.asarray(origin) + rng.uniform(-0.45, 0.45, 2)
            lines.append(f"{name}; ; ({x:.3f}, {y:.3f})")
    layout.write_text("\n".join(lines) + "\n")
    return layout


def _tilefuse() -> list[str]:
    """The ``tilefuse`` command of this interpreter's environment."""
    script = Path(sys.executable).with_name("tilefuse")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tilefuse"]


def estimate(layout: Path, backend: str, info_has_backend: bool) -> dict:
    """``tilefuse info``'s peak-memory estimate and the mosaic's size, in bytes."""
    if backend == "default":
        cmd = [*_tilefuse(), "info", str(layout)]
    elif info_has_backend:
        cmd = [*_tilefuse(), "info", str(layout), "--backend", backend]
    else:
        cmd = [sys.executable, "-c", _ESTIMATE_CHILD, str(layout), backend]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    found = {}
    for key, pattern in (("estimate", _PEAK), ("mosaic", _MOSAIC)):
        m = pattern.search(proc.stdout)
        if not m:
            raise RuntimeError(f"no {key} line in the output of {' '.join(cmd)}")
        found[key] = int(float(m.group(1)) * _UNITS[m.group(2)])
    return found


def fuse(layout: Path, out: Path, backend: str) -> dict:
    """Run ``tilefuse fuse`` under ``/usr/bin/time -v``: peak RSS (bytes) and wall seconds."""
    cmd = [*_tilefuse(), "fuse", str(layout), "-o", str(out), "-q"]
    if backend != "default":
        cmd += ["--backend", backend]
    proc = subprocess.run([str(TIME), "-v", *cmd], capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    for sidecar in out.parent.glob(out.name.removesuffix(".ome.zarr") + ".*"):
        sidecar.unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    rss, wall = _RSS.search(proc.stderr), _WALL.search(proc.stderr)
    hours, minutes, seconds = wall.groups()
    return {"peak": int(rss.group(1)) * 1024,
            "seconds": int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the tiles and outputs (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the tiles in --work for next time")
    args = p.parse_args()
    if not TIME.exists():
        print(f"bench_memory needs GNU time at {TIME} to measure peak RSS; install it "
              "(Debian/Ubuntu: apt-get install -y time) and run again", file=sys.stderr)
        return 1
    work = args.work or Path(tempfile.mkdtemp(prefix="tilefuse-memory-"))
    help_text = subprocess.run([*_tilefuse(), "info", "--help"], capture_output=True,
                               text=True).stdout
    info_has_backend = "--backend" in help_text
    rows = []
    try:
        for name in args.sets:
            grid, tile = SETS[name]
            layout = make_set(work / name, grid, tile)
            for backend in BACKENDS:
                row = {"set": name, "tiles": grid * grid, "backend": backend,
                       **estimate(layout, backend, info_has_backend)}
                row.update(fuse(layout, work / "out.ome.zarr", backend))
                row["ratio"] = row["estimate"] / row["peak"]
                rows.append(row)
                _print_row(row, first=len(rows) == 1)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"cpus": os.cpu_count(), "info_backend_option": info_has_backend}
    (RESULTS / "memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    worst = max(max(r["ratio"], 1 / r["ratio"]) for r in rows)
    print(f"worst ratio {worst:.2f}x (target: within 2x); {os.cpu_count()} cores"
          + ("" if info_has_backend else "; numpy estimates from tilefuse.plan.info.describe"))
    return 0 if worst <= 2 else 1


def _print_row(row: dict, *, first: bool) -> None:
    if first:
        print(f"{'set':<8}{'tiles':>6}{'mosaic':>11}  {'kernel':<8}{'estimate':>11}"
              f"{'measured':>11}{'ratio':>7}{'seconds':>9}")
    mib = 2**20
    print(f"{row['set']:<8}{row['tiles']:>6}{row['mosaic'] / mib:>7.0f} MiB  {row['backend']:<8}"
          f"{row['estimate'] / mib:>7.0f} MiB{row['peak'] / mib:>7.0f} MiB{row['ratio']:>7.2f}"
          f"{row['seconds']:>9.1f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
