"""Fusion throughput and peak memory, side by side, on one generated tile set.

    python benchmarks/bench_fusion.py [--grid 8x8] [--tile 1024] [--repeats 3]

Each variant runs in its own process under ``/usr/bin/time -v`` (peak RSS) and times its own work,
imports excluded (read tiles -> write the full-resolution mosaic as zarr, zstd, 1024² chunks).
Variants:

floor         read every tile once, paste at rounded positions, write with the same codec/chunks
linear        tilefuse, fractional translations, linear (cosine) blend
rotate1       tilefuse, the same tiles rotated 1 degree (affine path)
max           tilefuse, max blend
naive         the proof of concept's method: per chunk, decode each touching tile whole and
              ``affine_transform`` it over the whole chunk, maximum blend
mvs           multiview-stitcher's ``fuse(...)`` computed in memory (only if importable in
              benchmarks/.venv, which ``make bench`` installs; never a tilefuse dependency)

The table (median of ``--repeats`` runs) is printed and saved as JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import print_table, run_timed

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MVS_PYTHON = HERE / ".venv" / "bin" / "python"
CHUNK = 1024


# ----------------------------------------------------------------------------- the tile set


def make_tiles(folder: Path, grid: tuple[int, int], tile: int, overlap: float = 0.1,
               compression: str | None = None) -> Path:
    """A smooth random scene cut into ``grid`` tiles at fractional positions (±3 px jitter),
    written as TIFF (uncompressed, or with ``compression`` such as ``"zlib"``)."""
    import tifffile
    from scipy import ndimage

    rng = np.random.default_rng(0)
    step = tile * (1 - overlap)
    pos = np.array([[r * step, c * step] for r in range(grid[0]) for c in range(grid[1])])
    pos += rng.uniform(-3, 3, pos.shape)
    pos -= pos.min(axis=0)
    shape = np.ceil(pos.max(axis=0)).astype(int) + tile + 2
    small = ndimage.gaussian_filter(rng.uniform(0, 1, tuple(shape // 8 + 1)), 2)
    scene = ndimage.zoom(small, 8, order=1)[: shape[0], : shape[1]]
    scene = (scene - scene.min()) / np.ptp(scene) * 40000 + rng.normal(0, 300, scene.shape)
    lines = ["dim = 2"]
    for i, (y, x) in enumerate(pos):
        iy, ix = int(np.floor(y)), int(np.floor(x))
        fy, fx = y - iy, x - ix  # sample the scene at the tile's true sub-pixel position
        crop = scene[iy : iy + tile + 1, ix : ix + tile + 1]
        cy = crop[:-1] * (1 - fy) + crop[1:] * fy
        data = cy[:, :-1] * (1 - fx) + cy[:, 1:] * fx
        tifffile.imwrite(folder / f"tile_{i:03d}.tif", np.clip(np.rint(data), 0, 65535)
                         .astype(np.uint16), compression=compression)
        lines.append(f"tile_{i:03d}.tif; ; ({x:.3f}, {y:.3f})")
    (folder / "TileConfiguration.txt").write_text("\n".join(lines) + "\n")
    return folder / "TileConfiguration.txt"


# ----------------------------------------------------------------------------- the variants


def _zarr_out(path: Path, shape, dtype):
    import zarr

    return zarr.create_array(str(path), shape=shape, chunks=(CHUNK, CHUNK), dtype=dtype,
                             overwrite=True)


def run_floor(layout_path: Path, out: Path) -> tuple:
    from concurrent.futures import ThreadPoolExecutor

    import tifffile

    from tilefuse.geometry import output_box
    from tilefuse.readers import read_layout

    layout = read_layout(layout_path)
    origin, shape = output_box(layout)
    mosaic = np.zeros(shape, dtype=layout.dtype)
    paths = [t.source.paths[0] for t in layout.tiles]
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for tile, data in zip(layout.tiles, pool.map(tifffile.imread, paths)):
            p = np.round(tile.position).astype(int) - origin
            sl = tuple(slice(max(a, 0), a + n) for a, n in zip(p, data.shape))
            region = mosaic[sl]
            region[...] = data[: region.shape[0], : region.shape[1]]
    _zarr_out(out, shape, layout.dtype)[...] = mosaic
    return shape


def run_tilefuse(layout_path: Path, out: Path, blend: str, rotate: float = 0.0) -> tuple:
    from tilefuse import fuse, read_layout
    from tilefuse.ngff import write_ome_zarr

    layout = read_layout(layout_path)
    if rotate:
        layout = layout.rotated(rotate)
    mosaic = fuse(layout, chunk=CHUNK, blend=blend)
    write_ome_zarr(mosaic, out, axes=("y", "x"), levels=1, overwrite=True)
    return mosaic.shape


def run_naive(layout_path: Path, out: Path) -> tuple:
    import dask.array as da
    import tifffile
    from scipy import ndimage

    from tilefuse.geometry import output_box, tile_bounds
    from tilefuse.readers import read_layout

    layout = read_layout(layout_path)
    origin, shape = output_box(layout)
    lo, hi = tile_bounds(layout.affines, np.array([t.shape for t in layout.tiles], float))

    def block(block_info=None):
        info = block_info[None]
        (y0, y1), (x0, x1) = info["array-location"]
        start = np.array([y0, x0]) + origin
        out_block = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
        for t, a, b in zip(layout.tiles, lo, hi):
            if np.any(b < start) or np.any(a > start + out_block.shape):
                continue
            data = tifffile.imread(t.source.paths[0]).astype(np.float32)  # whole tile, each time
            inv = np.linalg.inv(t.affine)
            offset = inv[:2, :2] @ start + inv[:2, 2]
            moved = ndimage.affine_transform(data, inv[:2, :2], offset, out_block.shape, order=1)
            np.maximum(out_block, moved, out=out_block)
        return np.rint(out_block).astype(layout.dtype)

    arr = da.map_blocks(block, chunks=da.core.normalize_chunks(CHUNK, shape), dtype=layout.dtype)
    da.to_zarr(arr, _zarr_out(out, shape, layout.dtype))
    return shape


def run_mvs(layout_path: Path, out: Path) -> tuple:
    import tifffile
    from multiview_stitcher import fusion, msi_utils
    from multiview_stitcher import spatial_image_utils as si_utils

    from tilefuse.readers import read_layout

    layout = read_layout(layout_path)
    sims = []
    for t in layout.tiles:
        data = tifffile.imread(t.source.paths[0])
        y, x = t.position
        sim = si_utils.get_sim_from_array(data, dims=["y", "x"], scale={"y": 1.0, "x": 1.0},
                                          translation={"y": y, "x": x}, transform_key="stage")
        sims.append(msi_utils.get_sim_from_msim(msi_utils.get_msim_from_sim(sim, scale_factors=[])))
    fused = fusion.fuse(sims, transform_key="stage", output_chunksize=CHUNK)
    result = np.asarray(fused.data.compute())
    _zarr_out(out, result.shape[-2:], result.dtype)[...] = result.reshape(result.shape[-2:])
    return result.shape[-2:]


VARIANTS = {
    "floor": run_floor,
    "linear": lambda lp, o: run_tilefuse(lp, o, "linear"),
    "rotate1": lambda lp, o: run_tilefuse(lp, o, "linear", 1.0),
    "max": lambda lp, o: run_tilefuse(lp, o, "max"),
    "naive": run_naive,
    "mvs": run_mvs,
}


def _import_everything(variant: str) -> None:
    """Import the libraries a variant uses, so the timing covers the work, not the imports."""
    import dask.array  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import tifffile  # noqa: F401
    import zarr  # noqa: F401

    import tilefuse.ngff
    import tilefuse.readers  # noqa: F401

    if variant == "mvs":
        import multiview_stitcher.fusion  # noqa: F401


def child(variant: str, layout_path: Path, out: Path) -> None:
    """Run one variant in this process and print its timing (imports excluded) as JSON.

    Every variant, peers included, runs with the same allocator settings as the CLI.
    """
    from tilefuse.allocator import retain_freed_memory

    retain_freed_memory()
    _import_everything(variant)
    started = time.perf_counter()
    shape = VARIANTS[variant](layout_path, out)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "shape": [int(s) for s in shape]}))


# ----------------------------------------------------------------------------- the driver


def measure(variant: str, layout_path: Path, work: Path, python: str) -> dict:
    out = work / f"out-{variant}.zarr"
    result = run_timed([python, __file__, "--child", variant, "--layout", str(layout_path),
                        "--out", str(out)])
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", default="8x8")
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile-compression", default=None,
                        help="TIFF compression of the generated tiles, e.g. zlib (default none)")
    parser.add_argument("--variants", default="floor,linear,rotate1,max,naive,mvs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--layout", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.layout, args.out)
        return 0
    grid = tuple(int(v) for v in args.grid.split("x"))
    work = Path(tempfile.mkdtemp(prefix="tilefuse-bench-"))
    try:
        layout_path = make_tiles(work, grid, args.tile, compression=args.tile_compression)
        rows = {}
        for variant in args.variants.split(","):
            python = sys.executable
            if variant == "mvs":
                if not MVS_PYTHON.exists():
                    rows[variant] = {"error": "benchmarks/.venv missing (make bench installs it)"}
                    continue
                python = str(MVS_PYTHON)
            repeats = 1 if variant in ("naive", "mvs") else args.repeats
            runs = [measure(variant, layout_path, work, python) for _ in range(repeats)]
            good = [r for r in runs if "error" not in r]
            if not good:
                rows[variant] = runs[0]
                continue
            rows[variant] = {
                "seconds": statistics.median(r["seconds"] for r in good),
                "all_seconds": [round(r["seconds"], 3) for r in good],
                "peak_rss_mb": max(r["peak_rss_mb"] for r in good),
                "shape": good[0]["shape"],
            }
            print(f"  {variant}: {rows[variant]['all_seconds']} s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, grid, args)
    return 0


def report(rows: dict, grid, args) -> None:
    floor = rows.get("floor", {}).get("seconds")
    print(f"\n{grid[0] * grid[1]} tiles of {args.tile}² uint16 TIFF "
          f"({args.tile_compression or 'uncompressed'}), 10% overlap, fractional positions; "
          f"{os.cpu_count()} cores; median of {args.repeats} (naive, mvs: 1 run)\n")
    for r in rows.values():
        if "error" not in r:
            r["mpix_per_s"] = np.prod(r["shape"]) / 1e6 / r["seconds"]
            r["ratio_to_floor"] = r["seconds"] / floor if floor else None
    print_table(rows, [("seconds", "seconds", ".2f"), ("MPix/s", "mpix_per_s", ".1f"),
                       ("peak RSS MB", "peak_rss_mb", ".0f"), ("x floor", "ratio_to_floor", ".2f")])
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"fusion-{args.tile_compression or 'raw'}.json"
    path.write_text(json.dumps({"grid": grid, "tile": args.tile, "cores": os.cpu_count(),
                                "tile_compression": args.tile_compression, "results": rows},
                               indent=2))
    print(f"\nsaved {path}")


if __name__ == "__main__":
    sys.exit(main())
