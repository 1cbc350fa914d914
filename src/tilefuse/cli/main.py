"""The ``tilefuse`` command: argument parsing, logging, progress; one library call per command.

A user's mistake (missing file, malformed layout, existing output) is one line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tilefuse import __version__
from tilefuse.cli.allocator import retain_freed_memory
from tilefuse.cli.argtypes import (
    check_fill,
    dtype_name,
    finite_float,
    fraction,
    nonnegative_int,
    positive_float,
    space_unit,
)
from tilefuse.cli.argtypes import positive_int as _positive_int
from tilefuse.errors import InputError
from tilefuse.fusion.blend import BLENDS
from tilefuse.fusion.kernel import BACKENDS, resolve_backend
from tilefuse.model.layout import Layout
from tilefuse.model.timeseries import TimeSeries

__all__ = ["main"]

log = logging.getLogger("tilefuse")

USER_ERRORS = (InputError, FileNotFoundError, FileExistsError, PermissionError,
               NotADirectoryError, IsADirectoryError)


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
    g.add_argument("--overlap", type=fraction, default=None,
                   help="fraction of a tile shared with a neighbour (default 0.1)")
    g.add_argument("--first-index", type=nonnegative_int, default=None,
                   help="index of the first tile (default: the smallest found)")
    g.add_argument("--z-step", type=positive_float, default=None, metavar="PX",
                   help="spacing of z planes in lateral pixels (default: from OME-TIFF, else 1)")
    p.add_argument("--timepoint", type=nonnegative_int, default=None, metavar="N",
                   help="time point of a time series (from 0) to register on, preview or "
                        "describe (default 0)")
    g = p.add_argument_group("stage positions (CZI, OME-TIFF)")
    g.add_argument("--flip-x", action="store_true", help="stage x runs against the camera's")
    g.add_argument("--flip-y", action="store_true", help="stage y runs against the camera's")
    g.add_argument("--swap-xy", action="store_true", help="stage x is the camera's y")
    g.add_argument("--scene", type=nonnegative_int, default=None, help="CZI scene to read")
    p.add_argument("--rotate", type=finite_float, metavar="DEG", default=None,
                   help="rotate every tile about its centre (camera rotated against the stage)")
    p.add_argument("--pixel-size", type=positive_float, nargs="+", metavar="S", default=None,
                   help="physical pixel size: one value, or one per axis (z y x), default 1")
    p.add_argument("--unit", type=space_unit, default="micrometer",
                   help="unit of --pixel-size, an OME-NGFF name or um/nm/mm (default micrometer)")
    p.add_argument("--chunk", type=_positive_int, nargs="+", default=None, metavar="N",
                   help="output chunk size: one value or one per axis (default 1024)")


def _add_registration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-shift", type=positive_float, default=None, metavar="PX",
                   help="largest correction of a stage position, in pixels (default: derived)")
    p.add_argument("--channel", type=nonnegative_int, default=0,
                   help="channel to register on (default 0)")
    p.add_argument("--register-downsample", type=_positive_int, default=1, metavar="N",
                   help="search overlaps binned NxN in y and x, then refine each link at full "
                        "resolution within N+1 px: faster for large tiles, full-resolution "
                        "accuracy (default 1: no binning)")
    p.add_argument("--keep-stage-positions", action="store_true",
                   help="fuse at the stage positions when no link is accepted (default: "
                        "stop with an error, the tiles most likely do not match the layout)")
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
    fuse.add_argument("--blend-width", type=positive_float, default=None, metavar="PX",
                      help="feathering width in pixels (default: the median overlap)")
    fuse.add_argument("--fill", type=float, default=0,
                      help="value where no tile is, within the output dtype (default 0)")
    fuse.add_argument("--dtype", type=dtype_name, default=None,
                      help="output dtype: uint8, uint16, uint32, int8, int16, int32, float32 or "
                           "float64 (default: the tiles')")
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
                           "warns when it is (e.g. 8GB; default 0.5 = half of the job's "
                           "memory: RAM, cgroup or SLURM limit)")
    fuse.add_argument("--overwrite", action="store_true",
                      help="replace an output that tilefuse wrote before (never other files)")
    fuse.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")

    reg = sub.add_parser("register", help="refine tile positions from the image content")
    _add_layout_options(reg)
    reg.add_argument("-o", "--output", default=None, metavar="LAYOUT",
                     help="registered TileConfiguration (default: NAME.registered.txt beside "
                          "the input, as Fiji names it)")
    _add_registration_options(reg)
    reg.add_argument("--workers", "--threads", dest="workers", type=_positive_int, default=None,
                     help="threads for pairwise registration (default: all cores)")
    reg.add_argument("--overwrite", action="store_true",
                     help="replace an existing registered layout or report (never an input)")
    reg.add_argument("-q", "--quiet", action="store_true", help="no summary")

    prev = sub.add_parser("preview", help="a picture of the mosaic with tile outlines and links")
    _add_layout_options(prev)
    prev.add_argument("-o", "--output", required=True, help="PNG file to write")
    prev.add_argument("--report", default=None, metavar="REPORT.json",
                      help="registration report: colour links by NCC, mark stage placements")
    prev.add_argument("--max-size", type=_positive_int, default=1024,
                      help="longest side of the picture in pixels (default 1024)")
    prev.add_argument("--overwrite", action="store_true", help="replace an existing picture")

    flat = sub.add_parser("flatfield", help="estimate a flat field from the tiles and save it")
    _add_layout_options(flat)
    flat.add_argument("-o", "--output", required=True, help="TIFF to write (flat, then dark)")
    flat.add_argument("--darkfield", action="store_true", help="also estimate a dark field")
    flat.add_argument("--sample", type=_positive_int, default=64,
                      help="tiles sampled for the estimate (default 64)")
    flat.add_argument("--overwrite", action="store_true", help="replace an existing TIFF")

    info = sub.add_parser("info", help="describe a layout: tiles, mosaic size, overlaps, memory")
    _add_layout_options(info)
    info.add_argument("--workers", "--threads", dest="workers", type=_positive_int, default=None,
                      help="threads the memory estimate is for (default: one per core)")
    info.add_argument("--cache-mb", type=_positive_int, default=512,
                      help="decoded-tile cache per process in MiB the estimate is for "
                           "(default 512)")
    info.add_argument("--backend", choices=BACKENDS, default="auto",
                      help="chunk kernel the memory estimate is for (default auto)")
    return parser


def _load(args: argparse.Namespace) -> Layout:
    """The layout to work on; of a time series, time point --timepoint (default 0)."""
    acquisition = _load_acquisition(args)
    if isinstance(acquisition, TimeSeries):
        return acquisition.at_time(args.timepoint or 0)
    return acquisition


def _load_acquisition(args: argparse.Namespace) -> Layout | TimeSeries:
    """The layout, or the time series when the input names time points ({t}, a t column)."""
    from tilefuse.io.readers import read_acquisition

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


def _check_chunk(args: argparse.Namespace, layout: Layout | TimeSeries) -> None:
    """--chunk gives one size or one per spatial axis of the layout."""
    ndim = (layout.at_time(0) if isinstance(layout, TimeSeries) else layout).ndim
    if args.chunk is not None and len(args.chunk) not in (1, ndim):
        raise InputError(f"--chunk takes 1 or {ndim} values for this {ndim}D layout, "
                         f"got {len(args.chunk)}")


def _chunk_arg(args) -> int | tuple[int, ...] | None:
    if args.chunk is None:
        return None
    return args.chunk[0] if len(args.chunk) == 1 else tuple(args.chunk)


def _budget_chunk(layout, args: argparse.Namespace):
    """--chunk, checked against --memory-limit; or the largest chunk the budget allows.

    The budget is --memory-limit: a size, or a fraction of the memory this job may use (the
    smallest of RAM, its cgroup limits and its SLURM allocation). The estimate counts the
    libraries, the tiles the cache will actually hold and the chunk tasks that can run at once.
    """
    from tilefuse.plan.info import choose_chunk, chunk_peak, layout_memory, parse_bytes

    budget = parse_bytes(args.memory_limit)
    threads = args.workers or os.cpu_count() or 1
    cache = args.cache_mb * 2**20
    n_ch, itemsize = len(layout.channels), layout.dtype.itemsize
    options = layout_memory(layout)
    chunk = _chunk_arg(args)
    if chunk is None:
        side = choose_chunk(layout.ndim, n_ch, itemsize, threads, cache, budget, args.backend,
                            **options)
        log.info("chunk %d chosen for a %.1f GB memory budget", side, budget / 1e9)
        return side
    shape = chunk if isinstance(chunk, tuple) else (chunk,) * layout.ndim
    if layout.ndim == 3 and not isinstance(chunk, tuple):
        shape = (min(chunk, 64), *shape[1:])  # as plan_fusion caps z chunks
    need = chunk_peak(shape, n_ch, itemsize, threads, cache, args.backend, **options)
    if need.total > budget:
        log.warning("--chunk %s needs ~%.0f MiB (%s), above the %.0f MiB memory limit", chunk,
                    need.total / 2**20, need.parts(), budget / 2**20)
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
                                  workers=args.workers, downsample=args.register_downsample,
                                  allow_stage_positions=args.keep_stage_positions)
    if args.report:
        from tilefuse.viz.preview import write_preview

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
                                          downsample=args.register_downsample,
                                          allow_stage_positions=args.keep_stage_positions)
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
    from tilefuse.viz.preview import write_preview

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
    """Write ``layout`` to ``out``: a CSV layout when ``out`` ends in ``.csv`` or ``layout`` is a
    time series (a t column), else a TileConfiguration (Fiji reads its tile lines). Either reads
    back to the same tiles, channel files, affines, pixel size and unit."""
    from tilefuse.io.readers import write_csv_layout, write_tileconfig

    if isinstance(layout, TimeSeries) or out.suffix.lower() == ".csv":
        return write_csv_layout(layout, out)
    return write_tileconfig(layout, out)


def _tile_files(layout: Layout | TimeSeries) -> list[str]:
    """Every file the tiles are read from: all channel files, all z planes, all time points."""
    from tilefuse.ome_zarr.resume import tile_files

    layouts = layout.layouts if isinstance(layout, TimeSeries) else (layout,)
    return [path for one in layouts for tile in one.tiles for path in tile_files(tile)]


def _inputs(args: argparse.Namespace, layout: Layout | TimeSeries) -> set[Path]:
    """The resolved paths this run reads: never written, replaced or deleted."""
    from tilefuse.io.outputs import input_files

    return input_files(args.layout, _tile_files(layout))


def _check_report(args: argparse.Namespace, inputs: set[Path]) -> None:
    """--report NAME.json and its picture NAME.png: new files, or --overwrite; never inputs."""
    if not args.report:
        return
    from tilefuse.io.outputs import check_file_output

    overwrite = getattr(args, "overwrite", False)
    report = check_file_output(args.report, overwrite=overwrite, inputs=inputs,
                               what="--report", suffixes=(".json",))
    check_file_output(report.with_suffix(".png"), overwrite=overwrite, inputs=inputs,
                      what="--report picture")


def cmd_register(args: argparse.Namespace) -> int:
    from tilefuse.io.outputs import check_file_output

    layout = _load_acquisition(args)
    inputs = _inputs(args, layout)
    out = check_file_output(_layout_output(args, layout), overwrite=args.overwrite,
                            inputs=inputs, what="registered layout",
                            suffixes=(".txt", ".csv"))
    _check_report(args, inputs)
    registered = _register(layout, args)
    _save_layout(registered, out)
    if not args.quiet:
        print(f"registered layout written to {out}", file=sys.stderr)
    return 0


# File types a zarr folder must not be named as (the image would look like another format).
_FILE_SUFFIXES = (".tif", ".tiff", ".btf", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".h5",
                  ".hdf5", ".n5", ".czi", ".txt", ".csv", ".json", ".xml")


def _check_output_name(output: Path) -> None:
    """The fusion output's name says zarr (checked before anything is read)."""
    if output.suffix.lower() in _FILE_SUFFIXES:
        hint = (" (OME-TIFF output is not available yet)"
                if output.suffix.lower() in (".tif", ".tiff", ".btf") else "")
        raise InputError(f"-o {output}: the output is an OME-Zarr folder; name it "
                         f"NAME.ome.zarr{hint}")


def _check_sidecars(output: Path, args: argparse.Namespace, inputs: set[Path]) -> list[str]:
    """The layout files written beside the output: never an input; an existing one only when
    the output being replaced or resumed wrote it. Returns their names (for the manifest)."""
    from tilefuse.io.outputs import read_manifest

    paths = [_sidecar(output, ".layout.csv"), _sidecar(output, ".TileConfiguration.txt")]
    previous = read_manifest(output) if output.is_dir() else None
    ours = set((previous or {}).get("sidecars", ()))
    for path in paths:
        if Path(os.path.realpath(path)) in inputs:
            raise InputError(f"-o {output} would save its layout as {path}, which is this run's "
                             "input; choose another output name")
        if (path.exists() or path.is_symlink()) and path.name not in ours:
            raise FileExistsError(f"{path} exists and was not written by a run into {output}; "
                                  "move it away or choose another output name")
    return [p.name for p in paths]


def _tile_identity(tile) -> tuple:
    """A tile as the manifest knows it: name, resolved files, series and channels kept, shape
    (the same tiles named by a relative or an absolute path are the same run)."""
    from tilefuse.ome_zarr.resume import tile_files

    source = tile.source
    files = [os.path.realpath(p) for p in tile_files(tile)]
    return (tile.name, files or source.key, getattr(source, "series", None),
            getattr(source, "channels", None), tile.shape)


def run_manifest(layout, plan, args: argparse.Namespace) -> dict:
    """What a fusion run was asked to do: a resume must be asked exactly the same (tile files
    that changed since are fused again, see :mod:`tilefuse.ome_zarr.resume`)."""
    from tilefuse.ome_zarr.resume import TILE_FILES_KEY, tile_digests

    if isinstance(layout, TimeSeries):
        return _series_manifest(layout, plan, args)
    digest = hashlib.sha256()
    for tile in layout.tiles:
        digest.update(repr(_tile_identity(tile)).encode())
        digest.update(np.round(tile.affine, 9).tobytes())
    digest.update(repr((str(layout.dtype), layout.channels)).encode())
    return {
        "tilefuse": __version__,
        "layout_sha256": digest.hexdigest(),
        "tiles": len(layout.tiles),
        "blend": plan.blend,
        "blend_width": [round(w, 6) for w in plan.widths],
        "chunk": list(plan.chunks.chunk_shape),
        "backend": resolve_backend(args.backend),
        "dtype": str(plan.dtype),
        "fill": plan.fill,
        "ngff": args.ngff,
        "levels": args.levels,
        "pixel_size": list(layout.pixel_size),
        "unit": layout.unit,
        "flatfield": args.flatfield,
        "darkfield": args.darkfield,
        "match_intensity": args.match_intensity,
        "sidecars": list(getattr(args, "sidecars", [])),
        TILE_FILES_KEY: tile_digests([layout]),
    }


def _series_manifest(series: TimeSeries, plans: tuple, args: argparse.Namespace) -> dict:
    """:func:`run_manifest` of a time series: every time point's layout in one hash."""
    manifest = run_manifest(series.at_time(0), plans[0], args)
    digest = hashlib.sha256()
    for layout, plan in zip(series.layouts, plans):
        digest.update(run_manifest(layout, plan, args)["layout_sha256"].encode())
    from tilefuse.ome_zarr.resume import TILE_FILES_KEY, tile_digests

    manifest.update(layout_sha256=digest.hexdigest(), tiles=series.n_tiles,
                    timepoints=list(series.names))
    manifest[TILE_FILES_KEY] = tile_digests(list(series.layouts))
    return manifest


def _per_time(function, layout: Layout | TimeSeries, **options) -> Layout | TimeSeries:
    """``function(layout, **options)``, on every time point of a time series."""
    if isinstance(layout, TimeSeries):
        return layout.map(lambda one: function(one, **options))
    return function(layout, **options)


def _fused(plan):
    """The lazy mosaic of a plan, or the stacked time series of a tuple of plans."""
    from tilefuse.fusion.graph import fuse, fuse_series

    return fuse_series(plan) if isinstance(plan, tuple) else fuse(plan)


def _save_fused_layout(layout: Layout | TimeSeries, output: Path) -> Path:
    """The fused layout beside the output: NAME.layout.csv and NAME.TileConfiguration.txt (for
    Fiji); a time series as NAME.layout.csv with a t column. Both read back to the run's tiles,
    channel files, affines (exact), pixel size and unit. Returns the one named."""
    from tilefuse.io.readers import write_csv_layout

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
    note = ("" if layout.pixel_size_known else
            f"\npixel size {layout.pixel_size[-1]:g} {layout.unit} is a default: no file states "
            "one; pass --pixel-size to write the real one")
    return (f"fused {what} -> {output} ({' x '.join(map(str, shape))}, {mpix:.1f} MPix) in "
            f"{seconds:.1f} s ({mpix / seconds:.1f} MPix/s); layout saved as {saved}{note}")


def _warm_up_kernel(backend: str) -> None:
    """Load the compiled kernel in the background while the layout is read (~0.5 s saved)."""
    if resolve_backend(backend) != "numba":
        return
    from tilefuse.fusion._numba.kernel import warm_up

    threading.Thread(target=warm_up, name="tilefuse-warm-up", daemon=True).start()


def _resume_chunk(output: Path, args: argparse.Namespace) -> None:
    """On --resume without --chunk, the chunk the interrupted run chose (the automatic choice
    depends on the machine's memory, which may differ on another node)."""
    from tilefuse.io.outputs import read_manifest

    saved = read_manifest(output) if args.resume and args.chunk is None else None
    if saved and saved.get("chunk"):
        args.chunk = [int(n) for n in saved["chunk"]]


def _dtype_of(layout: Layout | TimeSeries) -> np.dtype:
    return (layout.at_time(0) if isinstance(layout, TimeSeries) else layout).dtype


def _spatial_origin(plan) -> list[float]:
    """The mosaic's first pixel in layout pixels (z, y, x), of a plan or a series' plans."""
    first = plan[0] if isinstance(plan, tuple) else plan
    return [float(v) for v in first.chunks.origin]


def cmd_fuse(args: argparse.Namespace) -> int:
    from tilefuse.fusion.graph import fused_axes, plan_fusion, plan_series
    from tilefuse.intensity import prepare_corrections
    from tilefuse.io.outputs import check_image_output, read_manifest, refuse_url
    from tilefuse.ome_zarr.writer import is_finished_image

    started = time.perf_counter()
    refuse_url(args.output, "-o")  # before Path() folds "s3://b" into "s3:/b"
    output = Path(args.output)
    _check_output_name(output)
    _warm_up_kernel(args.backend)
    layout = _load_acquisition(args)
    _check_chunk(args, layout)
    inputs = _inputs(args, layout)
    check_image_output(output, overwrite=args.overwrite, resume=args.resume, inputs=inputs)
    args.sidecars = _check_sidecars(output, args, inputs)
    _check_report(args, inputs)
    check_fill(args.fill, args.dtype or _dtype_of(layout))
    _resume_chunk(output, args)
    complete = args.resume and is_finished_image(output)
    if args.register:
        layout = _register(layout, args)
    fused_layout = _per_time(prepare_corrections, layout, flatfield=args.flatfield,
                             darkfield=args.darkfield, match=args.match_intensity)
    planner = plan_series if isinstance(fused_layout, TimeSeries) else plan_fusion
    plan = planner(fused_layout, chunk=_budget_chunk(fused_layout, args), blend=args.blend,
                   blend_width=args.blend_width, dtype=args.dtype, fill=args.fill,
                   cache_bytes=args.cache_mb * 2**20, backend=args.backend)
    try:
        _write(plan, layout, output, args, axes=fused_axes(layout))
    except (*USER_ERRORS, OSError, KeyboardInterrupt) as exc:
        if read_manifest(output) is None or is_finished_image(output):
            raise
        note = f" (partial output kept in {output}; the same command with --resume continues it)"
        if isinstance(exc, KeyboardInterrupt):
            raise KeyboardInterrupt(note) from None
        if isinstance(exc, USER_ERRORS):
            raise type(exc)(f"{exc}{note}") from exc
        raise InputError(f"cannot write {output}: {exc.strerror or exc}{note}") from exc
    if complete:
        if not args.quiet:
            print(f"{output} is already complete: nothing to resume", file=sys.stderr)
        return 0
    saved = _save_fused_layout(layout, output)
    if not args.quiet:
        seconds = time.perf_counter() - started
        print(_fuse_summary(layout, plan, output, seconds, saved), file=sys.stderr)
    return 0


def _write(plan, layout: Layout | TimeSeries, output: Path, args: argparse.Namespace, *,
           axes: tuple[str, ...]) -> None:
    """Fuse and write the OME-Zarr image on the chosen scheduler, with progress."""
    from tilefuse.io.outputs import read_manifest
    from tilefuse.ome_zarr.resume import refresh_changed_tiles
    from tilefuse.ome_zarr.writer import write_ome_zarr
    from tilefuse.runner import open_runner

    manifest = json.loads(json.dumps(run_manifest(layout, plan, args)))
    saved = read_manifest(output) if args.resume else None
    if saved is not None:
        refresh_changed_tiles(output, saved, manifest, plan)
    with open_runner(args.scheduler, workers=args.workers, progress=not args.quiet) as (
        compute, dashboard,
    ):
        if dashboard and not args.quiet:
            print(f"dask dashboard: {dashboard}", file=sys.stderr)
        write_ome_zarr(
            _fused(plan), output, axes=axes, pixel_size=layout.pixel_size,
            unit=layout.unit, ngff_version=args.ngff, levels=args.levels,
            channel_names=layout.channels, origin=_spatial_origin(plan),
            overwrite=args.overwrite, compute=compute, manifest=manifest, resume=args.resume,
        )


def cmd_flatfield(args: argparse.Namespace) -> int:
    from tilefuse.intensity import estimate_flatfield, save_flatfield
    from tilefuse.io.outputs import check_file_output

    layout = _load(args)
    out = check_file_output(args.output, overwrite=args.overwrite, inputs=_inputs(args, layout),
                            what="-o", suffixes=(".tif", ".tiff"))
    flat, dark = estimate_flatfield(layout, sample=args.sample, darkfield=args.darkfield)
    save_flatfield(out, flat, dark)
    print(f"flat field ({flat.shape}, min {flat.min():.3f}, max {flat.max():.3f}) written to "
          f"{out}; use it with 'tilefuse fuse ... --flatfield {out}'", file=sys.stderr)
    return 0


_PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def cmd_preview(args: argparse.Namespace) -> int:
    from tilefuse.io.outputs import check_file_output, input_files
    from tilefuse.ome_zarr.writer import is_finished_image
    from tilefuse.viz.preview import preview_image

    source = Path(args.layout)
    is_image = source.is_dir() and any((source / n).exists() for n in ("zarr.json", ".zattrs"))
    if is_image and not is_finished_image(source):
        raise InputError(f"{source} is an unfinished tilefuse output (no OME metadata yet): "
                         "finish it with the same 'tilefuse fuse' command and --resume")
    layout = None if is_image else _load(args)
    inputs = input_files(source, _tile_files(layout) if layout is not None else ())
    out = check_file_output(args.output, overwrite=args.overwrite, inputs=inputs, what="-o",
                            suffixes=_PICTURE_SUFFIXES)
    picture = preview_image(source if layout is None else layout, max_size=args.max_size,
                            report=args.report)
    picture.save(out)
    print(f"preview written to {out} ({picture.size[0]} x {picture.size[1]})", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from tilefuse.plan.info import describe, describe_series

    layout = _load_acquisition(args)
    _check_chunk(args, layout)
    threads = args.workers or os.cpu_count() or 1
    options = {"chunk": _chunk_arg(args), "threads": threads, "cache_bytes": args.cache_mb * 2**20,
               "backend": args.backend}
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
    retain_freed_memory()  # this process is ours: reuse freed blocks (see tilefuse.cli.allocator)
    if not args.verbose:  # decoders' own complaints become our one-line errors instead
        for name in ("tifffile", "imageio", "PIL"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        status = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError:  # `tilefuse info ... | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        return 0
    except USER_ERRORS as exc:
        print(f"tilefuse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"tilefuse: interrupted{exc}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
