"""Peak memory and speed of the pyramidal OME-TIFF writer, against the mosaic's size.

    python benchmarks/bench_ome_tiff.py --side 40                # ~ 18500² uint16, 650 MiB
    /usr/bin/time -v python benchmarks/bench_ome_tiff.py --side 40   # + "Maximum resident set size"
    python benchmarks/bench_ome_tiff.py --side 20 --zarr         # also OME-Zarr, for comparison

A ``side`` x ``side`` (or ``--rows`` x ``side``) grid of 512² tiles
(``tilefuse.testing.pattern_layout``: analytic pixels, nothing on disk, 10% overlap) is fused
with a 32 MiB tile cache (``--cache-mb``), 512² chunks and two threads, and written with
:func:`tilefuse.write_ome_tiff` (512² deflate tiles, full SubIFD pyramid) into ``--work``
(default a temporary folder, deleted). One JSON line: the mosaic's bytes, the RSS before the
write (``base``, after imports and the kernel warm-up) and its high-water mark (``peak``, both
from /proc/self/status), seconds, the file's size and its levels.
tests/test_ome_tiff.py runs it on a 6 x 6 and a 24 x 6 grid with an 8 MiB cache.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path


def _status(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def measure(out: Path, side: int, *, rows: int | None = None, threads: int = 2,
            cache_mb: int = 32, zarr: bool = False) -> dict:
    """Fuse a `rows` (default `side`) x `side` pattern grid into the OME-TIFF `out`; the
    numbers."""
    import dask
    import tifffile

    from tilefuse import fuse, write_ome_tiff, write_ome_zarr
    from tilefuse.cli.allocator import retain_freed_memory
    from tilefuse.fusion.kernel import resolve_backend
    from tilefuse.testing import pattern_layout

    retain_freed_memory()  # as the CLI does
    if resolve_backend() == "numba":  # the compiled kernel loads once: an import, not data
        from tilefuse.fusion._numba.kernel import warm_up

        warm_up()
    mosaic = fuse(pattern_layout((rows or side, side), tile=512), chunk=512,
                  cache_bytes=cache_mb * 2**20)
    base = _status("VmRSS")
    started = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=threads):
        write_ome_tiff(mosaic, out)
    seconds = time.perf_counter() - started
    peak = _status("VmHWM")
    with tifffile.TiffFile(out) as tif:
        levels = [list(level.shape) for level in tif.series[0].levels]
    result = {"side": side, "mosaic_bytes": mosaic.nbytes, "shape": list(mosaic.shape),
              "base": base, "peak": peak, "growth": peak - base, "seconds": round(seconds, 2),
              "file_bytes": out.stat().st_size, "levels": levels}
    if zarr:
        started = time.perf_counter()
        with dask.config.set(scheduler="threads", num_workers=threads):
            write_ome_zarr(mosaic, out.with_suffix(".zarr"))
        result["zarr_seconds"] = round(time.perf_counter() - started, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=40, help="tiles per side (512² each)")
    parser.add_argument("--rows", type=int, default=None, help="tile rows (default: --side)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-mb", type=int, default=32, help="decoded-tile cache")
    parser.add_argument("--work", type=Path, default=None, help="folder for the output")
    parser.add_argument("--zarr", action="store_true", help="also time write_ome_zarr")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as folder:
        result = measure(Path(folder) / "bench.ome.tif", args.side, rows=args.rows,
                         threads=args.threads, cache_mb=args.cache_mb, zarr=args.zarr)
    mib = {k: round(result[k] / 2**20, 1) for k in ("mosaic_bytes", "base", "peak", "growth",
                                                     "file_bytes")}
    print(json.dumps({**result, "MiB": mib, "pixels": math.prod(result["shape"])}))


if __name__ == "__main__":
    main()
