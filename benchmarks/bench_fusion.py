"""Fusion throughput and peak memory, side by side, on one generated tile set.

    python benchmarks/bench_fusion.py [--grid 6x6] [--tile 1024] [--repeats 3] [--no-process]

Each variant runs in its own process under ``/usr/bin/time -v`` (peak RSS) and times its own work,
imports excluded (read tiles -> write the full-resolution mosaic as zarr, zstd, 1024² chunks).
Variants:

floor-zarr    read every tile once, paste at rounded positions, write with the same codec/chunks
              through zarr-python (``floor`` is an alias)
floor-ts      the same with tensorstore (benchmarks/tsfloor.py): zarr v3, bytes + zstd level 0,
              1024² chunks, tiles read with one thread per core
linear        tilefuse, fractional translations, linear (cosine) blend
rotate1       tilefuse, the same tiles rotated 1 degree (affine path)
max           tilefuse, max blend
linear-numpy, rotate1-numpy
              the same with the numpy kernel (the default install, without tilefuse[fast])
linear-numba  linear with the compiled kernel asked for (``backend="numba"``; ``auto`` takes
              numpy for a job this small): what a process that has loaded numba can have
naive         the proof of concept's method: per chunk, decode each touching tile whole and
              ``affine_transform`` it (scipy's default cubic spline, as the seed did) over the
              whole chunk, maximum blend
naive-linear  the same method with linear interpolation (order 1): a stricter baseline
mvs           multiview-stitcher's ``fuse(...)`` computed in memory (only if importable in
              benchmarks/.venv, which ``make bench`` installs; never a tilefuse dependency)
mvs-zarr      multiview-stitcher's ``fuse(..., output_zarr_url=...)``: its own chunked writer

Whole processes (unless ``--no-process``), timed by wall clock, start-up and imports included,
with peak RSS (``/usr/bin/time -v``): the tensorstore floor as a script that imports only
numpy, tifffile and tensorstore (``python benchmarks/tsfloor.py TileConfiguration.txt OUT``),
``tilefuse fuse TileConfiguration.txt -o OUT.ome.zarr --levels 1``, the same with
``--rotate 1``, and ``tilefuse --help``.

Variants run interleaved, one of each per round (the whole processes after them), for
``--repeats`` rounds (naive and mvs in the first round only). The tables give each variant's
median seconds and the median of its same-round ratios to each floor, next to the targets of
issue 15; they are printed and saved as JSON in benchmarks/results/.
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

from common import grid_parser, print_table, run_timed, run_wall

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MVS_PYTHON = HERE / ".venv" / "bin" / "python"
CHUNK = 1024
FLOORS = ("floor-zarr", "floor-ts")
ALIASES = {"floor": "floor-zarr"}
PROCESSES = ("floor-ts", "linear", "rotate1", "help")
"""Whole-process variants: the tensorstore floor script, ``tilefuse fuse`` (plain, rotated 1
degree) and ``tilefuse --help``."""
TARGETS = (  # issue 15: (label, table, variant, key, bound)
    ("linear, in-process, x floor-ts", "results", "linear", "x_floor-ts", 1.3),
    ("linear, whole process, x ts floor", "whole_process", "linear", "x_floor-ts", 1.5),
    ("rotate1, whole process, x ts floor", "whole_process", "rotate1", "x_floor-ts", 2.0),
    ("tilefuse --help, seconds", "whole_process", "help", "seconds", 0.4),
)


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


def run_floor_zarr(layout_path: Path, out: Path) -> tuple:
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


def run_floor_ts(layout_path: Path, out: Path) -> tuple:
    from tsfloor import floor

    return floor(str(layout_path), str(out))


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
    "floor-zarr": run_floor_zarr,
    "floor-ts": run_floor_ts,
    "linear": lambda lp, o: run_tilefuse(lp, o, "linear"),
    "rotate1": lambda lp, o: run_tilefuse(lp, o, "linear", 1.0),
    "max": lambda lp, o: run_tilefuse(lp, o, "max"),
    "linear-numpy": lambda lp, o: run_tilefuse(lp, o, "linear", backend="numpy"),
    "linear-numba": lambda lp, o: run_tilefuse(lp, o, "linear", backend="numba"),
    "rotate1-numpy": lambda lp, o: run_tilefuse(lp, o, "linear", 1.0, backend="numpy"),
    "naive": run_naive,
    "naive-linear": lambda lp, o: run_naive(lp, o, order=1),
    "mvs": run_mvs,
    "mvs-zarr": lambda lp, o: run_mvs(lp, o, to_zarr=True),
}


TILEFUSE_VARIANTS = ("linear", "rotate1", "max", "linear-numpy", "rotate1-numpy", "linear-numba")


def _import_everything(variant: str) -> None:
    """Import the libraries a variant uses, so the timing covers the work, not the imports
    (only those: a library imported for nothing would count in the variant's peak RSS)."""
    import tifffile  # noqa: F401

    if variant in ("floor-zarr", "naive", "naive-linear") or variant.startswith("mvs"):
        import dask.array  # noqa: F401
        import scipy.ndimage  # noqa: F401
        import zarr  # noqa: F401

        with contextlib.suppress(ImportError):  # dask imports it at the first compute
            import distributed  # noqa: F401
    if variant == "floor-ts":
        import tensorstore  # noqa: F401
    elif variant.startswith("mvs"):
        import multiview_stitcher.fusion  # noqa: F401
    elif variant in TILEFUSE_VARIANTS:
        # what tilefuse's run loads: the API (its lazy names), the reader, the planner and
        # kernels, the CLI's runner, the writer and its codecs
        import numcodecs.zstd  # noqa: F401

        import tilefuse
        import tilefuse.fusion.blend
        import tilefuse.fusion.chunk
        import tilefuse.fusion.jobs
        import tilefuse.fusion.kernel
        import tilefuse.fusion.resample
        import tilefuse.io.readers.tileconfig
        import tilefuse.ome_zarr.writer
        import tilefuse.runner

        tilefuse.fuse, tilefuse.read_layout  # noqa: B018  # the lazy API's imports


def _warm_kernel(variant: str, layout_path: Path) -> None:
    """Load the compiled kernel (numba's imports and disk cache: a start-up cost) when the
    variant's run will use it: what ``backend="auto"`` picks for this mosaic."""
    if variant == "linear-numba":
        from tilefuse.fusion._numba.kernel import warm_up

        warm_up()
        return
    if variant not in ("linear", "rotate1", "max"):
        return
    from tilefuse.fusion.kernel import resolve_backend
    from tilefuse.io.readers import read_layout
    from tilefuse.plan.geometry import output_box

    layout = read_layout(layout_path)
    pixels = int(np.prod(output_box(layout)[1])) * len(layout.channels)
    if resolve_backend(pixels=pixels, affine=variant == "rotate1") == "numba":
        from tilefuse.fusion._numba.kernel import warm_up

        warm_up()


def child(variant: str, layout_path: Path, out: Path) -> None:
    """Run one variant in this process and print its timing (imports excluded) as JSON.

    Each variant runs with the allocator settings of its own program: tilefuse's with the CLI's
    (:func:`tilefuse.cli.allocator.retain_freed_memory`), the floors and peers with glibc's
    defaults, as they run on their own. (Given tilefuse's settings, the tensorstore floor was
    slower: 0.52 against 0.43 s at 10x10 tiles, 0.19 against 0.18 s at 6x6, 4 rounds.)
    """
    from tilefuse.cli.allocator import retain_freed_memory

    if variant in TILEFUSE_VARIANTS:
        retain_freed_memory()
    _import_everything(variant)
    _warm_kernel(variant, layout_path)
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


def process_command(name: str, layout_path: Path, out: Path) -> list[str]:
    """The command line of a whole-process variant (see :data:`PROCESSES`)."""
    if name == "floor-ts":
        return [sys.executable, str(HERE / "tsfloor.py"), str(layout_path), str(out)]
    script = Path(sys.executable).parent / "tilefuse"  # the console script of this environment
    tilefuse = str(script) if script.exists() else shutil.which("tilefuse") or "tilefuse"
    if name == "help":
        return [tilefuse, "--help"]
    cmd = [tilefuse, "fuse", str(layout_path), "-o", str(out), "--levels", "1"]
    return [*cmd, "--rotate", "1"] if name == "rotate1" else cmd


def measure_process(name: str, layout_path: Path, work: Path) -> dict:
    folder = work / f"process-{name}"  # the output and its sidecars (layout.csv...), then gone
    folder.mkdir()
    try:
        return run_wall(process_command(name, layout_path, folder / "out.ome.zarr"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = grid_parser(__doc__, grid="6x6", tile=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile-compression", default=None,
                        help="TIFF compression of the generated tiles, e.g. zlib (default none)")
    parser.add_argument("--variants", default="floor-zarr,floor-ts,linear,rotate1,max,"
                        "linear-numpy,rotate1-numpy,linear-numba,naive,naive-linear,mvs,"
                        "mvs-zarr")
    parser.add_argument("--no-process", action="store_true",
                        help="skip the whole-process runs (floor script, tilefuse fuse, --help)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--layout", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(ALIASES.get(args.child, args.child), args.layout, args.out)
        return 0
    variants = list(dict.fromkeys(ALIASES.get(v, v) for v in args.variants.split(",") if v))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; expected some of {sorted(VARIANTS)}")
    processes = () if args.no_process else PROCESSES
    compile_bytecode()
    work = Path(tempfile.mkdtemp(prefix="tilefuse-bench-"))
    try:
        layout_path = make_tiles(work, args.grid, args.tile, compression=args.tile_compression)
        runs, process_runs = run_rounds(variants, processes, layout_path, work, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(runs, process_runs, args)
    return 0


def compile_bytecode() -> None:
    """Write the bytecode of tilefuse and of these scripts, as ``pip install`` does.

    Without it, a machine that sets ``PYTHONDONTWRITEBYTECODE`` (ours do) compiles tilefuse's
    ~60 modules from source in every process, ~0.05-0.07 s (measured with cProfile: 58 calls
    of ``compile``) that no installed tilefuse pays; the floors' scripts are compiled too.
    """
    import compileall

    import tilefuse

    for folder in (*tilefuse.__path__, str(Path(__file__).resolve().parent)):
        compileall.compile_dir(folder, quiet=1, maxlevels=0 if folder.endswith("benchmarks")
                               else None)


def _python_for(variant: str) -> str | None:
    if not variant.startswith("mvs"):
        return sys.executable
    return str(MVS_PYTHON) if MVS_PYTHON.exists() else None


def run_rounds(variants: list[str], processes: tuple[str, ...], layout_path: Path, work: Path,
               repeats: int) -> tuple[dict, dict]:
    """Run every variant once per round, then every whole process, ``repeats`` rounds (naive
    and mvs: the first round only).

    The tilefuse whole processes run once untimed first, so that a kernel compiled after an
    edit (numba's disk cache) is not timed; loading it from the cache is.

    Interleaving keeps the floors and each variant under the same machine conditions: this
    machine drifts by +-20% over minutes, so each variant's ratio to a floor is the median of
    its per-round ratios, not a ratio of medians taken minutes apart.

    Returns
    -------
    runs, process_runs : dict of name -> list
        Per round (index = round), the child's result, or None where it did not run.
    """
    runs: dict[str, list] = {v: [] for v in variants}
    process_runs: dict[str, list] = {p: [] for p in processes}
    for name in processes:  # untimed: numba compiles into its disk cache once, not in round 1
        if name in ("linear", "rotate1"):
            measure_process(name, layout_path, work)
    for round_ in range(repeats):
        for variant in variants:
            if round_ and variant.startswith(("naive", "mvs")):
                runs[variant].append(None)
                continue
            python = _python_for(variant)
            runs[variant].append(
                measure(variant, layout_path, work, python) if python else
                {"error": "benchmarks/.venv missing (make bench installs it)"})
        for name in processes:
            process_runs[name].append(measure_process(name, layout_path, work))
        done = {**runs, **{f"process {k}": v for k, v in process_runs.items()}}
        print(f"  round {round_ + 1}: " + ", ".join(
            f"{k} {r[-1]['seconds']:.2f} s" for k, r in done.items()
            if r[-1] and "seconds" in r[-1]), file=sys.stderr)
    return runs, process_runs


def _ok(result: dict | None) -> bool:
    return bool(result) and "error" not in result and bool(result.get("seconds"))


def summarise(results: list, floors: dict[str, list]) -> dict:
    """One variant's row: median seconds, peak RSS, and per floor the median same-round ratio.

    Parameters
    ----------
    results : list of dict or None
        The variant's result per round.
    floors : dict of floor name -> list of dict or None
        Each floor's result per round; ``x_<floor>`` pairs the rounds both ran.
    """
    good = [r for r in results if _ok(r)]
    if not good:
        tried = [r for r in results if r]
        return tried[0] if tried else {"error": "did not run"}
    row = {"seconds": statistics.median(r["seconds"] for r in good),
           "all_seconds": [round(r["seconds"], 3) for r in good],
           "peak_rss_mb": max(r["peak_rss_mb"] for r in good)}
    if "shape" in good[0]:
        row["shape"] = good[0]["shape"]
    for name, floor in floors.items():
        paired = [r["seconds"] / f["seconds"] for r, f in zip(results, floor, strict=True)
                  if _ok(r) and _ok(f)]
        row[f"ratios_{name}"] = [round(x, 3) for x in paired]
        row[f"x_{name}"] = statistics.median(paired) if paired else None
    return row


def _speedups(rows: dict) -> None:
    """How many times faster tilefuse (linear blend) is than each baseline, and the targets."""
    ours = rows.get("linear", {}).get("seconds")
    targets = {"naive": 20, "naive-linear": 20, "mvs": 10, "mvs-zarr": 10}
    if not ours or not any(rows.get(name, {}).get("seconds") for name in targets):
        return
    print("\ntilefuse linear is faster than:")
    for name, target in targets.items():
        if rows.get(name, {}).get("seconds"):
            ratio = rows[name]["seconds"] / ours
            rows[name]["linear_speedup"] = ratio
            print(f"  {name:<13} {ratio:6.1f}x   (target >= {target}x)")


def check_targets(tables: dict) -> list[dict]:
    """Issue 15's targets against what was measured (``met`` is None where not measured)."""
    out = []
    for label, table, variant, key, bound in TARGETS:
        value = tables[table].get(variant, {}).get(key)
        out.append({"target": label, "value": value, "bound": bound,
                    "met": None if value is None else bool(value <= bound)})
    return out


def report(runs: dict, process_runs: dict, args) -> None:
    grid = args.grid
    floors = {f: runs[f] for f in FLOORS if f in runs}
    rows = {variant: summarise(results, floors) for variant, results in runs.items()}
    print(f"\n{grid[0] * grid[1]} tiles of {args.tile}² uint16 TIFF "
          f"({args.tile_compression or 'uncompressed'}), 10% overlap, fractional positions; "
          f"{os.cpu_count()} cores; median of {args.repeats} interleaved rounds (naive, mvs: "
          "1 run); x floor: median of the same-round ratios\n")
    print("in-process (imports excluded):")
    for r in rows.values():
        if "error" not in r:
            r["mpix_per_s"] = np.prod(r["shape"]) / 1e6 / r["seconds"]
    columns = [("seconds", "seconds", ".2f"), ("MPix/s", "mpix_per_s", ".1f"),
               ("peak RSS MB", "peak_rss_mb", ".0f")]
    columns += [(f"x {f}", f"x_{f}", ".2f") for f in floors]
    print_table(rows, columns, width=14)
    _speedups(rows)
    process_rows = {}
    if process_runs:
        floor = {"floor-ts": process_runs["floor-ts"]}
        process_rows = {name: summarise(results, {} if name == "help" else floor)
                        for name, results in process_runs.items()}
        print("\nwhole process (wall clock incl. start-up, /usr/bin/time -v):")
        print_table(process_rows, [("seconds", "seconds", ".2f"),
                                   ("peak RSS MB", "peak_rss_mb", ".0f"),
                                   ("x ts floor", "x_floor-ts", ".2f")], width=14)
    targets = check_targets({"results": rows, "whole_process": process_rows})
    print("\nissue 15 targets:")
    for t in targets:
        verdict = {None: "not measured", True: "met", False: "MISSED"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        print(f"  {t['target']:<38} {value:>6}  (<= {t['bound']})  {verdict}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"fusion-{args.tile_compression or 'raw'}.json"
    path.write_text(json.dumps({"grid": grid, "tile": args.tile, "cores": os.cpu_count(),
                                "repeats": args.repeats,
                                "tile_compression": args.tile_compression, "results": rows,
                                "whole_process": process_rows, "targets": targets}, indent=2))
    print(f"\nsaved {path}")


if __name__ == "__main__":
    sys.exit(main())
