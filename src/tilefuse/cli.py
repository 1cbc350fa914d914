"""The ``tilefuse`` command: argument parsing, logging, progress; one library call per command.

A user's mistake (missing file, malformed layout, existing output) is one line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tilefuse import __version__
from tilefuse.allocator import retain_freed_memory
from tilefuse.blend import BLENDS
from tilefuse.errors import InputError
from tilefuse.kernel import BACKENDS, resolve_backend
from tilefuse.layout import Layout
from tilefuse.timeseries import TimeSeries

__all__ = ["main"]

log = logging.getLogger("tilefuse")

USER_ERRORS = (InputError, FileNotFoundError, FileExistsError, PermissionError,
               NotADirectoryError, IsADirectoryError)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_layout_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("layout", help="TileConfiguration.txt, CSV layout, .czi, OME-TIFF with stage "
                                  "positions, or a folder of tiles with --pattern")
    g = p.add_argument_group("folders of tiles")
    g.add_argument("--pattern", default=None,
                   help="file names with {row} {col} {index} {channel} {z} {t}, e.g. "
                        "'img_p{index}.tif'")
    g.add_argument("--grid", default=None, metavar="ROWSxCOLS", help="grid for {index}, e.g. 5x5")
    g.add_argument("--order", default=None,
                   choices=("row-major", "column-major", "snake-rows", "snake-cols"),
                   help="how {index} runs over the grid (default row-major)")
    g.add_argument("--overlap", type=float, default=None,
                   help="fraction of a tile shared with a neighbour (default 0.1)")
    g.add_argument("--first-index", type=int, default=None,
                   help="index of the first tile (default: the smallest found)")
    g.add_argument("--z-step", type=float, default=None, metavar="PX",
                   help="spacing of z planes in lateral pixels (default: from OME-TIFF, else 1)")
    p.add_argument("--timepoint", type=int, default=None, metavar="N",
                   help="time point of a time series (from 0) to register on, preview or "
                        "describe (default 0)")
    g = p.add_argument_group("stage positions (CZI, OME-TIFF)")
    g.add_argument("--flip-x", action="store_true", help="stage x runs against the camera's")
    g.add_argument("--flip-y", action="store_true", help="stage y runs against the camera's")
    g.add_argument("--swap-xy", action="store_true", help="stage x is the camera's y")
    g.add_argument("--scene", type=int, default=None, help="CZI scene to read")
    p.add_argument("--rotate", type=float, metavar="DEG", default=None,
                   help="rotate every tile about its centre (camera rotated against the stage)")
    p.add_argument("--pixel-size", type=float, nargs="+", metavar="S", default=None,
                   help="physical pixel size: one value, or one per axis (z y x), default 1")
    p.add_argument("--unit", default="micrometer", help="unit of --pixel-size (default micrometer)")
    p.add_argument("--chunk", type=_positive_int, nargs="+", default=None, metavar="N",
                   help="output chunk size: one value or one per axis (default 1024)")


def _add_registration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-shift", type=float, default=None, metavar="PX",
                   help="largest correction of a stage position, in pixels (default: derived)")
    p.add_argument("--channel", type=int, default=0, help="channel to register on (default 0)")
    p.add_argument("--register-downsample", type=_positive_int, default=1, metavar="N",
                   help="compare overlaps binned NxN in y and x: for large tiles, ~N² times "
                        "faster, errors ~N times larger (default 1: full resolution)")
    p.add_argument("--report", default=None, metavar="REPORT.json",
                   help="write the registration report (every link and tile) as JSON")


def _add_intensity_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("intensity")
    g.add_argument("--flatfield", default=None, metavar="estimate|FLAT.tif",
                   help="divide every tile by a flat field: estimated from the tiles, or saved "
                        "by 'tilefuse flatfield'")
    g.add_argument("--darkfield", default=None, metavar="estimate|DARK.tif",
                   help="subtract a dark field first (estimate it, or a TIFF of the tile shape)")
    g.add_argument("--match-intensity", action="store_true",
                   help="per-tile gains from the overlaps so neighbours agree")


def _add_scheduler_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", default="threads", metavar="NAME",
                   help="threads (default), processes, distributed (a local cluster) or the "
                        "address of a running dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--workers", "--threads", dest="workers", type=_positive_int, default=None,
                   help="threads, processes or local-cluster workers (default: one per core)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tilefuse", description="Fuse overlapping microscope tiles into an OME-Zarr mosaic.")
    parser.add_argument("--version", action="version", version=f"tilefuse {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fuse = sub.add_parser("fuse", help="fuse a layout into a multiscale OME-Zarr mosaic")
    _add_layout_options(fuse)
    fuse.add_argument("-o", "--output", required=True, help="output folder, e.g. mosaic.ome.zarr")
    fuse.add_argument("--register", action="store_true",
                      help="refine the positions from the image content before fusing")
    _add_registration_options(fuse)
    fuse.add_argument("--blend", choices=BLENDS, default="linear",
                      help="how overlaps combine (default linear: cosine feathering)")
    fuse.add_argument("--blend-width", type=float, default=None, metavar="PX",
                      help="feathering width in pixels (default: the median overlap)")
    fuse.add_argument("--fill", type=float, default=0, help="value where no tile is (default 0)")
    fuse.add_argument("--dtype", default=None, help="output dtype (default: the tiles')")
    fuse.add_argument("--ngff", choices=("0.4", "0.5"), default="0.5",
                      help="OME-Zarr version: 0.5 (zarr v3, default) or 0.4 (zarr v2)")
    fuse.add_argument("--levels", type=_positive_int, default=None,
                      help="pyramid levels incl. full resolution (default: until one chunk)")
    _add_intensity_options(fuse)
    _add_scheduler_options(fuse)
    fuse.add_argument("--resume", action="store_true",
                      help="continue an interrupted run of the same command into OUTPUT")
    fuse.add_argument("--cache-mb", type=_positive_int, default=512,
                      help="decoded-tile cache per process in MiB (default 512)")
    fuse.add_argument("--backend", choices=BACKENDS, default="auto",
                      help="chunk kernel: numba (compiled, needs tilefuse[fast]) or numpy; "
                           "auto (default) takes numba when installed; same mosaic either way")
    fuse.add_argument("--memory-limit", default="0.5", metavar="BYTES",
                      help="memory budget: picks the chunk size when --chunk is not given, "
                           "warns when it is (e.g. 8GB; default 0.5 = half of RAM)")
    fuse.add_argument("--overwrite", action="store_true", help="replace an existing output")
    fuse.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")

    reg = sub.add_parser("register", help="refine tile positions from the image content")
    _add_layout_options(reg)
    reg.add_argument("-o", "--output", default=None, metavar="LAYOUT",
                     help="registered TileConfiguration (default: NAME.registered.txt beside "
                          "the input, as Fiji names it)")
    _add_registration_options(reg)
    reg.add_argument("--workers", "--threads", dest="workers", type=_positive_int, default=None,
                     help="threads for pairwise registration (default: all cores)")
    reg.add_argument("-q", "--quiet", action="store_true", help="no summary")

    prev = sub.add_parser("preview", help="a picture of the mosaic with tile outlines and links")
    _add_layout_options(prev)
    prev.add_argument("-o", "--output", required=True, help="PNG file to write")
    prev.add_argument("--report", default=None, metavar="REPORT.json",
                      help="registration report: colour links by NCC, mark stage placements")
    prev.add_argument("--max-size", type=_positive_int, default=1024,
                      help="longest side of the picture in pixels (default 1024)")

    flat = sub.add_parser("flatfield", help="estimate a flat field from the tiles and save it")
    _add_layout_options(flat)
    flat.add_argument("-o", "--output", required=True, help="TIFF to write (flat, then dark)")
    flat.add_argument("--darkfield", action="store_true", help="also estimate a dark field")
    flat.add_argument("--sample", type=_positive_int, default=64,
                      help="tiles sampled for the estimate (default 64)")

    info = sub.add_parser("info", help="describe a layout: tiles, mosaic size, overlaps, memory")
    _add_layout_options(info)
    info.add_argument("--workers", "--threads", dest="workers", type=_positive_int, default=None)
    info.add_argument("--cache-mb", type=_positive_int, default=512)
    return parser


def _load(args: argparse.Namespace) -> Layout:
    """The layout to work on; of a time series, time point --timepoint (default 0)."""
    acquisition = _load_acquisition(args)
    if isinstance(acquisition, TimeSeries):
        return acquisition.at_time(args.timepoint or 0)
    return acquisition


def _load_acquisition(args: argparse.Namespace) -> Layout | TimeSeries:
    """The layout, or the time series when the input names time points ({t}, a t column)."""
    from tilefuse.readers import read_acquisition

    read = read_acquisition(
        args.layout, pattern=args.pattern, grid=args.grid, order=args.order,
        overlap=args.overlap, first_index=args.first_index, z_step=args.z_step,
        flip_x=args.flip_x, flip_y=args.flip_y, swap_xy=args.swap_xy, scene=args.scene,
    )
    if not isinstance(read, TimeSeries):
        if args.timepoint not in (None, 0):
            raise InputError(f"--timepoint {args.timepoint}: {args.layout} has no time points "
                             "(name them with {t} in --pattern, or a t column in a CSV layout)")
        return _adjust(read, args)
    read.at_time(args.timepoint or 0)  # refuses a time point that does not exist
    return read.map(lambda layout: _adjust(layout, args))


def _adjust(layout: Layout, args: argparse.Namespace) -> Layout:
    """--pixel-size (z scaled by --z-step when one value is given) and --rotate."""
    from dataclasses import replace

    if args.pixel_size is not None:
        size = list(args.pixel_size)
        if len(size) == 1:
            size = size * layout.ndim
            if layout.ndim == 3 and args.z_step is not None:
                size[0] *= args.z_step
        if len(size) != layout.ndim:
            raise InputError(f"--pixel-size takes 1 or {layout.ndim} values, got {len(size)}")
        layout = replace(layout, pixel_size=tuple(size), unit=args.unit)
    if args.rotate:
        layout = layout.rotated(args.rotate)
    return layout


def _chunk_arg(args) -> int | tuple[int, ...] | None:
    if args.chunk is None:
        return None
    return args.chunk[0] if len(args.chunk) == 1 else tuple(args.chunk)


def _budget_chunk(layout, args: argparse.Namespace):
    """--chunk, checked against --memory-limit; or the largest chunk the budget allows."""
    from tilefuse.info import choose_chunk, estimate_peak_bytes, parse_bytes

    budget = parse_bytes(args.memory_limit)
    threads = args.workers or os.cpu_count() or 1
    cache = args.cache_mb * 2**20
    n_ch, itemsize = len(layout.channels), layout.dtype.itemsize
    chunk = _chunk_arg(args)
    if chunk is None:
        side = choose_chunk(layout.ndim, n_ch, itemsize, threads, cache, budget, args.backend)
        log.info("chunk %d chosen for a %.1f GB memory budget", side, budget / 1e9)
        return side
    shape = chunk if isinstance(chunk, tuple) else (chunk,) * layout.ndim
    need = estimate_peak_bytes(int(np.prod(shape)), n_ch, itemsize, threads, cache, args.backend)
    if need > budget:
        log.warning("--chunk %s needs ~%.1f GB with %d workers, above the %.1f GB memory limit",
                    chunk, need / 1e9, threads, budget / 1e9)
    return chunk


def _sidecar(output: Path, suffix: str) -> Path:
    name = output.name
    for ext in (".ome.zarr", ".zarr"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return output.with_name(name + suffix)


def _register(layout, args):
    """Register ``layout``; print the summary, write the report if asked. Returns the layout."""
    if isinstance(layout, TimeSeries):
        return _register_series(layout, args)
    from tilefuse.registration import register

    registered, report = register(layout, max_shift=args.max_shift, channel=args.channel,
                                  workers=args.workers, downsample=args.register_downsample)
    if args.report:
        from tilefuse.preview import write_preview

        report.to_json(args.report)
        picture = write_preview(registered, Path(args.report).with_suffix(".png"), report=report)
        if not args.quiet:
            print(f"report written to {args.report} and {picture}", file=sys.stderr)
    if not args.quiet:
        for line in report.summary_lines():
            print(line, file=sys.stderr)
    return registered


def _register_series(series: TimeSeries, args) -> TimeSeries:
    """Register a time series on --timepoint (shared positions) or each time point alone;
    print what was applied where, write the report(s) if asked."""
    from tilefuse.registration import register_series

    timepoint = args.timepoint or 0
    registered, reports = register_series(series, timepoint=timepoint, max_shift=args.max_shift,
                                          channel=args.channel, workers=args.workers,
                                          downsample=args.register_downsample)
    for index, report in reports.items():
        name = series.names[index]
        _write_report(registered.at_time(index), report, args,
                      f".t{name}" if len(reports) > 1 else "")
        if not args.quiet:
            head = [f"time point {name}:"] if len(reports) > 1 else []
            print("\n".join(head + report.summary_lines()), file=sys.stderr)
    if not args.quiet and series.shared:
        print(f"registered on time point {series.names[timepoint]} (--timepoint {timepoint}); "
              f"each tile's correction applied to the same tile at all {len(series)} time "
              "points (positions shared)", file=sys.stderr)
    elif not args.quiet:
        print(f"positions differ between time points: each of the {len(series)} was registered "
              "on its own" + (" (--timepoint ignored)" if args.timepoint else ""),
              file=sys.stderr)
    return registered


def _write_report(layout: Layout, report, args, suffix: str) -> None:
    """The registration report as JSON and its picture, ``suffix`` added to --report's name."""
    if not args.report:
        return
    from tilefuse.preview import write_preview

    path = Path(args.report)
    path = path.with_name(path.stem + suffix + path.suffix)
    report.to_json(path)
    picture = write_preview(layout, path.with_suffix(".png"), report=report)
    if not args.quiet:
        print(f"report written to {path} and {picture}", file=sys.stderr)


def _registered_name(layout_path: Path) -> Path:
    return layout_path.with_name(layout_path.stem + ".registered.txt")


def _layout_output(args, layout: Layout | TimeSeries) -> Path:
    """Where `register` writes: -o, else NAME.registered.txt (a time series: .csv)."""
    out = Path(args.output) if args.output else _registered_name(Path(args.layout))
    if not isinstance(layout, TimeSeries):
        return out
    if not args.output:
        return out.with_suffix(".csv")
    if out.suffix.lower() != ".csv":
        raise InputError(f"-o {out}: a time series is saved as a CSV layout with a t column; "
                         "give -o NAME.csv")
    return out


def _save_layout(layout: Layout | TimeSeries, out: Path) -> Path:
    """A TileConfiguration for one time point; a CSV with a t column for a time series."""
    from tilefuse.readers import write_csv_layout, write_tileconfig

    if isinstance(layout, TimeSeries):
        return write_csv_layout(layout, out)
    return write_tileconfig(layout, out)


def cmd_register(args: argparse.Namespace) -> int:
    layout = _load_acquisition(args)
    out = _layout_output(args, layout)
    registered = _register(layout, args)
    _save_layout(registered, out)
    if not args.quiet:
        print(f"registered layout written to {out}", file=sys.stderr)
    return 0


def _check_output(output: Path, args: argparse.Namespace) -> None:
    from tilefuse.ngff import MANIFEST

    if args.resume and args.overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    if args.resume and not output.exists():
        raise FileNotFoundError(f"{output} does not exist; nothing to resume")
    if output.exists() and not (args.overwrite or args.resume):
        hint = " (an unfinished run: --resume continues it)" if (output / MANIFEST).exists() else ""
        raise FileExistsError(f"{output} exists{hint}; pass --overwrite to replace it")


def run_manifest(layout, plan, args: argparse.Namespace) -> dict:
    """What a fusion run was asked to do: a resume must be asked exactly the same."""
    if isinstance(layout, TimeSeries):
        return _series_manifest(layout, plan, args)
    digest = hashlib.sha256()
    for tile in layout.tiles:
        digest.update(repr((tile.name, tile.source.key, tile.shape)).encode())
        digest.update(np.round(tile.affine, 9).tobytes())
    digest.update(repr((str(layout.dtype), layout.channels)).encode())
    return {
        "tilefuse": __version__,
        "layout_sha256": digest.hexdigest(),
        "tiles": len(layout.tiles),
        "blend": plan.blend,
        "blend_width": [round(w, 6) for w in plan.widths],
        "chunk": list(plan.chunks.chunk_shape),
        "dtype": str(plan.dtype),
        "fill": plan.fill,
        "ngff": args.ngff,
        "levels": args.levels,
        "pixel_size": list(layout.pixel_size),
        "unit": layout.unit,
        "flatfield": args.flatfield,
        "darkfield": args.darkfield,
        "match_intensity": args.match_intensity,
    }


def _series_manifest(series: TimeSeries, plans: tuple, args: argparse.Namespace) -> dict:
    """:func:`run_manifest` of a time series: every time point's layout in one hash."""
    manifest = run_manifest(series.at_time(0), plans[0], args)
    digest = hashlib.sha256()
    for layout, plan in zip(series.layouts, plans):
        digest.update(run_manifest(layout, plan, args)["layout_sha256"].encode())
    manifest.update(layout_sha256=digest.hexdigest(), tiles=series.n_tiles,
                    timepoints=list(series.names))
    return manifest


def _per_time(function, layout: Layout | TimeSeries, **options) -> Layout | TimeSeries:
    """``function(layout, **options)``, on every time point of a time series."""
    if isinstance(layout, TimeSeries):
        return layout.map(lambda one: function(one, **options))
    return function(layout, **options)


def _fused(plan):
    """The lazy mosaic of a plan, or the stacked time series of a tuple of plans."""
    from tilefuse.fuse import fuse, fuse_series

    return fuse_series(plan) if isinstance(plan, tuple) else fuse(plan)


def _save_fused_layout(layout: Layout | TimeSeries, output: Path) -> Path:
    """The fused layout beside the output: NAME.TileConfiguration.txt and NAME.layout.csv
    (exact affines); a time series as NAME.layout.csv with a t column. Returns the one named."""
    from tilefuse.readers import write_csv_layout

    csv_path = write_csv_layout(layout, _sidecar(output, ".layout.csv"))
    if isinstance(layout, TimeSeries):
        return csv_path
    return _save_layout(layout, _sidecar(output, ".TileConfiguration.txt"))


def _fuse_summary(layout: Layout | TimeSeries, plan, output: Path, seconds: float,
                  saved: Path) -> str:
    """One line: what was fused into what, how fast, where the layout went."""
    if isinstance(layout, TimeSeries):
        what = f"{len(layout)} time points of {len(layout.at_time(0).tiles)} tiles"
        shape = (len(plan), *plan[0].chunks.shape)
    else:
        what, shape = f"{len(layout.tiles)} tiles", plan.chunks.shape
    mpix = np.prod(shape) / 1e6
    return (f"fused {what} -> {output} ({' x '.join(map(str, shape))}, {mpix:.1f} MPix) in "
            f"{seconds:.1f} s ({mpix / seconds:.1f} MPix/s); layout saved as {saved}")


def _warm_up_kernel(backend: str) -> None:
    """Load the compiled kernel in the background while the layout is read (~0.5 s saved)."""
    if resolve_backend(backend) != "numba":
        return
    from tilefuse.fastkernel import warm_up

    threading.Thread(target=warm_up, name="tilefuse-warm-up", daemon=True).start()


def cmd_fuse(args: argparse.Namespace) -> int:
    from tilefuse.fuse import fused_axes, plan_fusion, plan_series
    from tilefuse.intensity import prepare_corrections
    from tilefuse.ngff import MANIFEST, write_ome_zarr
    from tilefuse.runner import open_runner

    started = time.perf_counter()
    output = Path(args.output)
    _check_output(output, args)
    _warm_up_kernel(args.backend)
    layout = _load_acquisition(args)
    if args.register:
        layout = _register(layout, args)
    fused_layout = _per_time(prepare_corrections, layout, flatfield=args.flatfield,
                             darkfield=args.darkfield, match=args.match_intensity)
    planner = plan_series if isinstance(fused_layout, TimeSeries) else plan_fusion
    plan = planner(fused_layout, chunk=_budget_chunk(fused_layout, args), blend=args.blend,
                   blend_width=args.blend_width, dtype=args.dtype, fill=args.fill,
                   cache_bytes=args.cache_mb * 2**20, backend=args.backend)
    try:
        with open_runner(args.scheduler, workers=args.workers, progress=not args.quiet) as (
            compute, dashboard,
        ):
            if dashboard and not args.quiet:
                print(f"dask dashboard: {dashboard}", file=sys.stderr)
            write_ome_zarr(
                _fused(plan), output, axes=fused_axes(layout), pixel_size=layout.pixel_size,
                unit=layout.unit, ngff_version=args.ngff, levels=args.levels,
                channel_names=layout.channels, overwrite=args.overwrite, compute=compute,
                manifest=run_manifest(layout, plan, args), resume=args.resume,
            )
    except (*USER_ERRORS, OSError, KeyboardInterrupt) as exc:
        if not (output / MANIFEST).exists():
            raise
        note = f" (partial output kept in {output}; the same command with --resume continues it)"
        if isinstance(exc, KeyboardInterrupt):
            raise KeyboardInterrupt(note) from None
        if isinstance(exc, USER_ERRORS):
            raise type(exc)(f"{exc}{note}") from exc
        raise InputError(f"cannot write {output}: {exc.strerror or exc}{note}") from exc
    saved = _save_fused_layout(layout, output)
    if not args.quiet:
        seconds = time.perf_counter() - started
        print(_fuse_summary(layout, plan, output, seconds, saved), file=sys.stderr)
    return 0


def cmd_flatfield(args: argparse.Namespace) -> int:
    from tilefuse.intensity import estimate_flatfield, save_flatfield

    layout = _load(args)
    flat, dark = estimate_flatfield(layout, sample=args.sample, darkfield=args.darkfield)
    save_flatfield(args.output, flat, dark)
    print(f"flat field ({flat.shape}, min {flat.min():.3f}, max {flat.max():.3f}) written to "
          f"{args.output}; use it with 'tilefuse fuse ... --flatfield {args.output}'",
          file=sys.stderr)
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    from tilefuse.preview import preview_image

    source = Path(args.layout)
    is_image = source.is_dir() and any((source / n).exists() for n in ("zarr.json", ".zattrs"))
    picture = preview_image(source if is_image else _load(args), max_size=args.max_size,
                            report=args.report)
    picture.save(args.output)
    print(f"preview written to {args.output} ({picture.size[0]} x {picture.size[1]})",
          file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from tilefuse.info import describe, describe_series

    layout = _load_acquisition(args)
    threads = args.workers or os.cpu_count() or 1
    options = {"chunk": _chunk_arg(args), "threads": threads, "cache_bytes": args.cache_mb * 2**20}
    lines = (describe_series(layout, timepoint=args.timepoint or 0, **options)
             if isinstance(layout, TimeSeries) else describe(layout, **options))
    for line in lines:
        print(line)
    return 0


COMMANDS = {"fuse": cmd_fuse, "register": cmd_register, "preview": cmd_preview,
            "flatfield": cmd_flatfield, "info": cmd_info}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tilefuse`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    retain_freed_memory()  # this process is ours: reuse freed blocks (see tilefuse.allocator)
    if not args.verbose:  # decoders' own complaints become our one-line errors instead
        for name in ("tifffile", "imageio", "PIL"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        print(f"tilefuse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"tilefuse: interrupted{exc}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
