"""3D fusion against a tensorstore floor: light-sheet-like z-stacks larger than half the RAM.

    python benchmarks/bench_3d.py            # 2x4 tiles of 256 x 2048² uint16: a 14 GiB mosaic
    python benchmarks/bench_3d.py --small    # 2x2 tiles of 64 x 512²: seconds, for development
    python benchmarks/bench_3d.py --grid 2x2 --tile 1536 --planes 128   # any other size

The tiles are made on the fly (:class:`SheetSource`: a textured function of the global voxel
index, so overlapping tiles agree and zstd does not make the output free), 10% lateral overlap
at fractional lateral positions (±3 px jitter), every tile from z = 0, pixel size z 4x the
lateral one. Two variants, each in its own process under ``/usr/bin/time -v`` (peak RSS),
timing its own work (imports excluded), interleaved for ``--repeats`` rounds:

floor     every voxel of every tile computed once, pasted at rounded positions (the last tile
          wins in an overlap) into a tensorstore zarr v3 array with tilefuse's 3D chunks
          (:func:`tilefuse.plan.chunking.chunk_shape`) and codecs (bytes + zstd level 0),
          region by region (one chunk deep and high, the mosaic wide; the tiles' parts of a
          region computed on one thread per core, one write in flight while the next region is
          made), so the floor itself stays out of core
tilefuse  ``tilefuse.fuse(layout, blend="linear")`` + ``write_ome_zarr(levels=1)``

The table gives seconds, peak RSS and tilefuse's median same-round ratio to the floor; it is
printed and saved as JSON in benchmarks/results/ (3d.json; 3d-small.json with ``--small``;
3d-custom.json for another size).
Outputs go to a temporary folder (``TMPDIR``; the full size needs ~15 GiB free there) and are
deleted after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import parse_grid, print_table, run_timed

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PERIOD = 8  # textures repeat every 8 planes: 16 MiB apart in a chunk, beyond zstd's window
Z_SCALE = 4.0  # pixel size z / lateral (light sheet: anisotropic z)
FULL = {"grid": (2, 4), "tile": 2048, "planes": 256}
SMALL = {"grid": (2, 2), "tile": 512, "planes": 64}


# ----------------------------------------------------------------------------- the tiles


_MADE = [0]  # voxels made by SheetSource.box in this process: what a reader would decode
_MADE_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class SheetSource:
    """A light-sheet-like z-stack made on the fly from its position; picklable, no files.

    Voxel ``(z, y, x)`` of the mosaic is smooth lateral waves, a z profile and an 8-bit hashed
    texture of ``(y, x)`` that changes from plane to plane (period :data:`PERIOD`): a function
    of the global index, so overlapping tiles agree exactly.

    Attributes
    ----------
    origin : tuple of int
        Mosaic index of the tile's first voxel (z, y, x).
    shape : tuple of int
        Tile shape (z, y, x).
    """

    origin: tuple[int, int, int]
    shape: tuple[int, int, int]

    @property
    def key(self) -> tuple:
        return ("sheet", self.origin, self.shape)

    def read(self) -> np.ndarray:
        """The whole tile, shape ``(1, z, y, x)``, uint16."""
        return self.box((0, 0, 0), self.shape)[None]

    def read_planes(self, start: int, stop: int) -> np.ndarray:
        """Planes ``start:stop``, shape ``(1, stop - start, y, x)``, as a z-stack file of one
        page per plane reads them."""
        return self.box((start, 0, 0), (stop, *self.shape[1:]))[None]

    def box(self, lo, hi) -> np.ndarray:
        """The tile's voxels ``lo <= index < hi`` (tile index, zyx), shape ``hi - lo``, uint16."""
        (gz0, gy0, gx0), (nz, ny, nx) = (np.add(self.origin, lo).tolist(),
                                         np.subtract(hi, lo).tolist())
        with _MADE_LOCK:
            _MADE[0] += nz * ny * nx
        gy = np.arange(gy0, gy0 + ny, dtype=np.uint32)
        gx = np.arange(gx0, gx0 + nx, dtype=np.uint32)
        with np.errstate(over="ignore"):
            hashed = (gy[:, None] * np.uint32(2654435761)) ^ (gx[None, :] * np.uint32(40503))
        waves = ((np.sin(gy / 97.0) * 6000 + 15000)[:, None]
                 + (np.cos(gx / 131.0) * 6000 + 15000)[None, :]).astype(np.uint16)
        textures = {}
        out = np.empty((nz, ny, nx), dtype=np.uint16)
        for k in range(nz):
            gz = gz0 + k
            phase = gz % PERIOD
            if phase not in textures:
                with np.errstate(over="ignore"):
                    t = hashed ^ np.uint32((phase * 0x9E3779B1) & 0xFFFFFFFF)
                    t *= np.uint32(0x85EBCA6B)
                t >>= np.uint32(24)
                textures[phase] = np.add(waves, t, dtype=np.uint16, casting="unsafe")
            np.add(textures[phase], np.uint16(3000 + 3000 * np.sin(gz / 23.0)), out=out[k])
        return out


def sheet_layout(grid: tuple[int, int], tile: int, planes: int, overlap: float = 0.1):
    """``grid`` z-stacks of ``planes x tile²`` at fractional lateral positions (seeded).

    Returns
    -------
    tilefuse.Layout
        3D, uint16, pixel size ``(Z_SCALE, 1, 1)``; each tile's source starts at its rounded
        position.
    """
    from tilefuse.model.layout import Layout, Tile, translation_affine

    rng = np.random.default_rng(0)
    step = tile * (1 - overlap)
    tiles = []
    for r in range(grid[0]):
        for c in range(grid[1]):
            jitter = rng.uniform(-3, 3, 2) + 3  # fractional, every position >= 0
            pos = np.array([0.0, r * step + jitter[0], c * step + jitter[1]])
            shape = (planes, tile, tile)
            origin = tuple(int(v) for v in np.round(pos))
            tiles.append(Tile(f"r{r}c{c}", shape, translation_affine(pos),
                              SheetSource(origin, shape)))
    return Layout(tuple(tiles), np.dtype(np.uint16), pixel_size=(Z_SCALE, 1.0, 1.0),
                  origin="sheet")


# ----------------------------------------------------------------------------- the variants


def run_floor(layout, out: Path) -> tuple:
    """Compute every tile once, paste at rounded positions, write region by region."""
    import tensorstore as ts

    from tilefuse.plan.chunking import chunk_shape
    from tsfloor import zarr3_spec

    pos = np.array([t.source.origin for t in layout.tiles])
    pos -= pos.min(axis=0)
    sizes = np.array([t.shape for t in layout.tiles])
    shape = tuple(int(n) for n in (pos + sizes).max(axis=0))
    chunks = chunk_shape(None, 3)
    array = ts.open(zarr3_spec(str(out), shape, layout.dtype, chunks)).result()
    pending = None
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for z0 in range(0, shape[0], chunks[0]):
            for y0 in range(0, shape[1], chunks[1]):
                lo = np.array([z0, y0, 0])
                hi = np.minimum(lo + np.array([chunks[0], chunks[1], shape[2]]), shape)
                region = np.zeros(tuple(hi - lo), dtype=layout.dtype)
                parts = []  # (tile, box in tile index, box in region index)
                for tile, p, n in zip(layout.tiles, pos, sizes, strict=True):
                    a, b = np.maximum(lo, p), np.minimum(hi, p + n)
                    if np.all(a < b):
                        parts.append((tile, a - p, b - p, a - lo, b - lo))
                boxes = pool.map(lambda q: q[0].source.box(q[1], q[2]), parts)
                for (_, _, _, ra, rb), data in zip(parts, boxes, strict=True):
                    region[tuple(slice(i, j) for i, j in zip(ra, rb, strict=True))] = data
                if pending is not None:
                    pending.result()
                pending = array[z0 : hi[0], y0 : hi[1], :].write(region)
        if pending is not None:
            pending.result()
    return shape


def run_tilefuse(layout, out: Path, cache_mb: int | None) -> tuple:
    from tilefuse import fuse
    from tilefuse._run import tile_cache_bytes
    from tilefuse.ome_zarr.writer import write_ome_zarr

    # no --cache-mb: what `tilefuse fuse` takes (four chunk reads of these stacks, 2 GiB)
    cache = (tile_cache_bytes(layout, None, memory_limit="0.5") if cache_mb is None
             else cache_mb * 2**20)
    mosaic = fuse(layout, blend="linear", cache_bytes=cache)
    write_ome_zarr(mosaic, out, levels=1, overwrite=True)
    return mosaic.shape


def child(variant: str, size: dict, out: Path, cache_mb: int | None) -> None:
    """Run one variant in this process and print its timing (imports excluded) as JSON."""
    import dask.array  # noqa: F401
    import tensorstore  # noqa: F401
    import zarr  # noqa: F401

    from tilefuse.cli.allocator import retain_freed_memory
    from tilefuse.io.tile_cache import cache_stats

    if variant == "tilefuse":  # the CLI's allocator settings; the floor keeps glibc's
        retain_freed_memory()
        from tilefuse.fusion.kernel import resolve_backend

        if resolve_backend() == "numba":  # numba's lazy imports and disk cache: a start-up cost
            from tilefuse.fusion._numba.kernel import warm_up

            warm_up()
    layout = sheet_layout(size["grid"], size["tile"], size["planes"])
    started = time.perf_counter()
    if variant == "floor":
        shape, reads = run_floor(layout, out), len(layout.tiles)
    else:
        shape, reads = run_tilefuse(layout, out, cache_mb), cache_stats()["decodes"]
    seconds = time.perf_counter() - started
    voxels = sum(int(np.prod(t.shape)) for t in layout.tiles)
    print(json.dumps({"seconds": seconds, "shape": [int(s) for s in shape],
                      "tile_reads": reads, "reads_per_voxel": _MADE[0] / voxels}))


# ----------------------------------------------------------------------------- the driver


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true",
                        help="2x2 tiles of 64 x 512² (seconds) instead of 2x4 of 256 x 2048²")
    parser.add_argument("--grid", type=parse_grid, help="ROWSxCOLS instead of the preset's")
    parser.add_argument("--tile", type=int, help="tile side instead of the preset's")
    parser.add_argument("--planes", type=int, help="planes per tile instead of the preset's")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cache-mb", type=int, default=None,
                        help="tilefuse's tile cache (default: tilefuse's default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = dict(SMALL if args.small else FULL)
    size.update({k: getattr(args, k) for k in size if getattr(args, k) is not None})
    if args.child:
        child(args.child, size, args.out, args.cache_mb)
        return 0
    runs: dict[str, list[dict]] = {"floor": [], "tilefuse": []}
    work = Path(tempfile.mkdtemp(prefix="tilefuse-bench3d-"))
    try:
        for round_ in range(args.repeats):
            for variant in runs:
                out = work / f"{variant}.zarr"
                cmd = [sys.executable, __file__, "--child", variant, "--out", str(out)]
                cmd += ["--small"] if args.small else []
                cmd += ["--grid", "{}x{}".format(*size["grid"]), "--tile", str(size["tile"]),
                        "--planes", str(size["planes"])]
                cmd += ["--cache-mb", str(args.cache_mb)] if args.cache_mb is not None else []
                runs[variant].append(run_timed(cmd))
                shutil.rmtree(out, ignore_errors=True)
                result = runs[variant][-1]
                print(f"  round {round_ + 1}: {variant} "
                      f"{result.get('seconds', result.get('error'))}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(runs, size, args)
    return 0


def report(runs: dict, size: dict, args) -> None:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = {}
    for variant, results in runs.items():
        good = [r for r in results if "error" not in r]
        if not good:
            rows[variant] = results[0]
            continue
        paired = [r["seconds"] / f["seconds"] for r, f in zip(results, runs["floor"], strict=True)
                  if "error" not in r and "error" not in f]
        rows[variant] = {"seconds": statistics.median(r["seconds"] for r in good),
                         "all_seconds": [round(r["seconds"], 2) for r in good],
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in good),
                         "tile_reads": good[0]["tile_reads"],
                         "reads_per_voxel": good[0]["reads_per_voxel"],
                         "shape": good[0]["shape"], "paired_ratios": paired,
                         "x_floor": statistics.median(paired) if paired else None}
    shape = next((r["shape"] for r in rows.values() if "shape" in r), None)
    gib = float(np.prod(shape)) * 2 / 2**30 if shape else float("nan")
    print(f"\n{size['grid'][0]}x{size['grid'][1]} tiles of {size['planes']} x {size['tile']}² "
          f"uint16 made on the fly, 10% lateral overlap, pixel size z {Z_SCALE:g}x lateral; "
          f"mosaic {shape} = {gib:.1f} GiB, {gib / (ram / 2**30):.0%} of this machine's "
          f"{ram / 2**30:.0f} GiB RAM; {os.cpu_count()} cores; median of {args.repeats} "
          "interleaved round(s)\n")
    print_table(rows, [("seconds", "seconds", ".1f"), ("peak RSS MB", "peak_rss_mb", ".0f"),
                       ("tile reads", "tile_reads", "d"),
                       ("reads/voxel", "reads_per_voxel", ".2f"),
                       ("x floor", "x_floor", ".2f")])
    RESULTS.mkdir(exist_ok=True)
    preset = SMALL if args.small else FULL
    name = "3d-small" if args.small else "3d"
    path = RESULTS / (f"{name}.json" if size == preset else f"{name}-custom.json")
    path.write_text(json.dumps({**size, "cores": os.cpu_count(), "ram_gib": ram / 2**30,
                                "mosaic_gib": gib, "repeats": args.repeats,
                                "cache_mb": args.cache_mb, "results": rows}, indent=2))
    print(f"\nsaved {path}")


if __name__ == "__main__":
    sys.exit(main())
