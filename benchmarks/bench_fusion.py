"""Fusion throughput and peak memory, side by side, on one generated tile set.

    python benchmarks/bench_fusion.py [--grid 8x8] [--tile 1024] [--repeats 3]

Each variant runs in its own process under ``/usr/bin/time -v`` (peak RSS) and times its own work,
imports excluded (read tiles -> write the full-resolution mosaic as zarr, zstd, 1024² chunks).
Variants:

floor         read every tile once, paste at rounded positions, write with the same codec/chunks
linear        tilefuse, fractional translations, linear (cosine) blend
rotate1       tilefuse, the same tiles rotated 1 degree (affine path)
max           tilefuse, max blend
linear-numpy, rotate1-numpy
              the same with the numpy kernel (the default install, without tilefuse[fast])
naive         the proof of concept's method: per chunk, decode each touching tile whole and
              ``affine_transform`` it (scipy's default cubic spline, as the seed did) over the
              whole chunk, maximum blend
naive-linear  the same method with linear interpolation (order 1): a stricter baseline
mvs           multiview-stitcher's ``fuse(...)`` computed in memory (only if importable in
              benchmarks/.venv, which ``make bench`` installs; never a tilefuse dependency)
mvs-zarr      multiview-stitcher's ``fuse(..., output_zarr_url=...)``: its own chunked writer

Variants run interleaved, one of each per round, for ``--repeats`` rounds (naive and mvs in the
first round only); the table gives each variant's median seconds and the median of its
same-round ratios to the floor, is printed and saved as JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import grid_parser, print_table, run_timed

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

    from tilefuse.io.readers import read_layout
    from tilefuse.plan.geometry import output_box

    layout = read_layout(layout_path)
    origin, shape = output_box(layout)
    mosaic = np.zeros(shape, dtype=layout.dtype)
    paths = [t.source.paths[0] for t in layout.tiles]
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for tile, data in zip(layout.tiles, pool.map(tifffile.imread, paths), strict=True):
            p = np.round(tile.position).astype(int) - origin
            sl = tuple(slice(max(a, 0), a + n) for a, n in zip(p, data.shape, strict=True))
            region = mosaic[sl]
            region[...] = data[: region.shape[0], : region.shape[1]]
    _zarr_out(out, shape, layout.dtype)[...] = mosaic
    return shape


def run_tilefuse(layout_path: Path, out: Path, blend: str, rotate: float = 0.0,
                 backend: str = "auto") -> tuple:
    from tilefuse import fuse, read_layout
    from tilefuse.ome_zarr.writer import write_ome_zarr

    layout = read_layout(layout_path)
    if rotate:
        layout = layout.rotated(rotate)
    mosaic = fuse(layout, chunk=CHUNK, blend=blend, backend=backend)
    write_ome_zarr(mosaic, out, levels=1, overwrite=True)
    return mosaic.shape


def run_naive(layout_path: Path, out: Path, order: int = 3) -> tuple:
    """The proof of concept's method. ``order=3`` is what it ran (scipy's default: a cubic
    spline prefilter of the whole tile for every chunk it touches); ``order=1`` is a kinder,
    linear version of the same method."""
    import dask.array as da
    import tifffile
    from scipy import ndimage

    from tilefuse.io.readers import read_layout
    from tilefuse.plan.geometry import output_box, tile_bounds

    layout = read_layout(layout_path)
    origin, shape = output_box(layout)
    lo, hi = tile_bounds(layout.affines, np.array([t.shape for t in layout.tiles], float))

    def block(block_info=None):
        info = block_info[None]
        (y0, y1), (x0, x1) = info["array-location"]
        start = np.array([y0, x0]) + origin
        out_block = np.zeros((y1 - y0, x1 - x0), dtype=layout.dtype)
        for t, a, b in zip(layout.tiles, lo, hi, strict=True):
            if np.any(b < start) or np.any(a > start + out_block.shape):
                continue
            data = tifffile.imread(t.source.paths[0])  # whole tile, for every chunk
            to_chunk = t.affine.copy()
            to_chunk[:2, 2] -= start
            moved = ndimage.affine_transform(data, np.linalg.inv(to_chunk),
                                             output_shape=out_block.shape, order=order)
            out_block = np.max(np.stack([out_block, moved.astype(layout.dtype)]), axis=0)
        return out_block

    arr = da.map_blocks(block, chunks=da.core.normalize_chunks(CHUNK, shape), dtype=layout.dtype)
    da.to_zarr(arr, _zarr_out(out, shape, layout.dtype))
    return shape


def run_mvs(layout_path: Path, out: Path, to_zarr: bool = False) -> tuple:
    import tifffile
    from multiview_stitcher import fusion, msi_utils
    from multiview_stitcher import spatial_image_utils as si_utils

    from tilefuse.io.readers import read_layout

    layout = read_layout(layout_path)
    sims = []
    for t in layout.tiles:
        data = tifffile.imread(t.source.paths[0])
        y, x = t.position
        sim = si_utils.get_sim_from_array(data, dims=["y", "x"], scale={"y": 1.0, "x": 1.0},
                                          translation={"y": y, "x": x}, transform_key="stage")
        sims.append(msi_utils.get_sim_from_msim(msi_utils.get_msim_from_sim(sim, scale_factors=[])))
    if to_zarr:  # its own batched writer, straight to the store
        fused = fusion.fuse(sims, transform_key="stage", output_chunksize=CHUNK,
                            output_zarr_url=str(out))
        return fused.data.shape[-2:]
    fused = fusion.fuse(sims, transform_key="stage", output_chunksize=CHUNK)
    result = np.asarray(fused.data.compute())
    _zarr_out(out, result.shape[-2:], result.dtype)[...] = result.reshape(result.shape[-2:])
    return result.shape[-2:]


VARIANTS = {
    "floor": run_floor,
    "linear": lambda lp, o: run_tilefuse(lp, o, "linear"),
    "rotate1": lambda lp, o: run_tilefuse(lp, o, "linear", 1.0),
    "max": lambda lp, o: run_tilefuse(lp, o, "max"),
    "linear-numpy": lambda lp, o: run_tilefuse(lp, o, "linear", backend="numpy"),
    "rotate1-numpy": lambda lp, o: run_tilefuse(lp, o, "linear", 1.0, backend="numpy"),
    "naive": run_naive,
    "naive-linear": lambda lp, o: run_naive(lp, o, order=1),
    "mvs": run_mvs,
    "mvs-zarr": lambda lp, o: run_mvs(lp, o, to_zarr=True),
}


def _import_everything(variant: str) -> None:
    """Import the libraries a variant uses, so the timing covers the work, not the imports."""
    import dask.array  # noqa: F401
    import scipy.ndimage
    import scipy.spatial  # noqa: F401
    import tifffile  # noqa: F401
    import zarr  # noqa: F401


    with contextlib.suppress(ImportError):  # dask imports it at the first compute if installed
        import distributed  # noqa: F401

    if variant.startswith("mvs"):
        import multiview_stitcher.fusion  # noqa: F401
    elif variant in ("linear", "rotate1", "max"):
        from tilefuse.fusion.kernel import resolve_backend

        if resolve_backend() == "numba":  # numba's lazy imports and disk cache: a start-up cost
            from tilefuse.fusion._numba.kernel import warm_up

            warm_up()


def child(variant: str, layout_path: Path, out: Path) -> None:
    """Run one variant in this process and print its timing (imports excluded) as JSON.

    Every variant, peers included, runs with the same allocator settings as the CLI.
    """
    from tilefuse.cli.allocator import retain_freed_memory

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
    parser = grid_parser(__doc__, grid="8x8", tile=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile-compression", default=None,
                        help="TIFF compression of the generated tiles, e.g. zlib (default none)")
    parser.add_argument("--variants", default="floor,linear,rotate1,max,linear-numpy,"
                        "rotate1-numpy,naive,naive-linear,mvs,mvs-zarr")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--layout", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.layout, args.out)
        return 0
    grid = args.grid
    work = Path(tempfile.mkdtemp(prefix="tilefuse-bench-"))
    try:
        layout_path = make_tiles(work, grid, args.tile, compression=args.tile_compression)
        rows = run_rounds(args.variants.split(","), layout_path, work, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, grid, args)
    return 0


def _python_for(variant: str) -> str | None:
    if not variant.startswith("mvs"):
        return sys.executable
    return str(MVS_PYTHON) if MVS_PYTHON.exists() else None


def run_rounds(variants: list[str], layout_path: Path, work: Path, repeats: int) -> dict:
    """Run every variant once per round, ``repeats`` rounds (naive and mvs: the first only).

    Interleaving keeps the floor and each variant under the same machine conditions: this
    machine drifts by +-20% over minutes, so each variant's ratio to the floor is the median of
    its per-round ratios, not a ratio of medians taken minutes apart.
    """
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for round_ in range(repeats):
        for variant in variants:
            if round_ and variant.startswith(("naive", "mvs")):
                continue
            python = _python_for(variant)
            runs[variant].append(
                measure(variant, layout_path, work, python) if python else
                {"error": "benchmarks/.venv missing (make bench installs it)"})
    rows = {}
    floors = [r.get("seconds") for r in runs.get("floor", [])]
    for variant, results in runs.items():
        good = [r for r in results if "error" not in r]
        if not good:
            rows[variant] = results[0]
            continue
        # naive and mvs run in the first round only, and without a floor variant there are no
        # floors: pair the rounds both have.
        paired = [r["seconds"] / f for r, f in zip(results, floors, strict=False)
                  if "error" not in r and f]
        rows[variant] = {
            "seconds": statistics.median(r["seconds"] for r in good),
            "all_seconds": [round(r["seconds"], 3) for r in good],
            "paired_ratios": [round(x, 3) for x in paired],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in good),
            "shape": good[0]["shape"],
        }
        print(f"  {variant}: {rows[variant]['all_seconds']} s", file=sys.stderr)
    return rows


def _speedups(rows: dict) -> None:
    """How many times faster tilefuse (linear blend) is than each baseline, and the targets."""
    ours = rows.get("linear", {}).get("seconds")
    if not ours:
        return
    print("\ntilefuse linear is faster than:")
    targets = {"naive": 20, "naive-linear": 20, "mvs": 10, "mvs-zarr": 10}
    for name, target in targets.items():
        if rows.get(name, {}).get("seconds"):
            ratio = rows[name]["seconds"] / ours
            rows[name]["linear_speedup"] = ratio
            print(f"  {name:<13} {ratio:6.1f}x   (target >= {target}x)")


def report(rows: dict, grid, args) -> None:
    floor = rows.get("floor", {}).get("seconds")
    print(f"\n{grid[0] * grid[1]} tiles of {args.tile}² uint16 TIFF "
          f"({args.tile_compression or 'uncompressed'}), 10% overlap, fractional positions; "
          f"{os.cpu_count()} cores; median of {args.repeats} interleaved rounds (naive, mvs: "
          "1 run); x floor: median of the same-round ratios\n")
    for r in rows.values():
        if "error" not in r:
            r["mpix_per_s"] = np.prod(r["shape"]) / 1e6 / r["seconds"]
            # the median of same-round ratios where there are several, else vs the median floor
            several = len(r["paired_ratios"]) > 1
            r["ratio_to_floor"] = (statistics.median(r["paired_ratios"]) if several else
                                   r["seconds"] / floor if floor else None)
    print_table(rows, [("seconds", "seconds", ".2f"), ("MPix/s", "mpix_per_s", ".1f"),
                       ("peak RSS MB", "peak_rss_mb", ".0f"), ("x floor", "ratio_to_floor", ".2f")])
    _speedups(rows)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"fusion-{args.tile_compression or 'raw'}.json"
    path.write_text(json.dumps({"grid": grid, "tile": args.tile, "cores": os.cpu_count(),
                                "tile_compression": args.tile_compression, "results": rows},
                               indent=2))
    print(f"\nsaved {path}")


if __name__ == "__main__":
    sys.exit(main())
