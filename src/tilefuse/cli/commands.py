"""The commands of ``tilefuse``: options in, one library call, what happened printed.

``fuse`` is :func:`tilefuse.pipeline.run_fusion`; the others read the input with
:func:`tilefuse.pipeline.read_input` and call one library function. What may be written is
checked by the library (:mod:`tilefuse.io.outputs`), never here.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tilefuse import _run
from tilefuse.errors import InputError
from tilefuse.model.layout import Layout
from tilefuse.model.timeseries import TimeSeries
from tilefuse.pipeline import (
    FuseRequest,
    FuseResult,
    read_input,
    register_input,
    run_fusion,
    save_layout,
)

__all__ = ["COMMANDS", "cmd_flatfield", "cmd_fuse", "cmd_info", "cmd_preview", "cmd_register"]

_TIFF_OUTPUT = (".tif", ".tiff")  # what tilefuse names the TIFFs it writes
_PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", *_TIFF_OUTPUT)


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def _read_options(args: argparse.Namespace) -> dict[str, Any]:
    """The reading options every command takes (see ``_add_layout_options``)."""
    return {"pattern": args.pattern, "grid": args.grid, "order": args.order,
            "overlap": args.overlap, "first_index": args.first_index, "z_step": args.z_step,
            "flip_x": args.flip_x, "flip_y": args.flip_y, "swap_xy": args.swap_xy,
            "scene": args.scene, "timepoint": args.timepoint, "rotate": args.rotate,
            "pixel_size": None if args.pixel_size is None else tuple(args.pixel_size),
            "unit": args.unit}


def _load_input(args: argparse.Namespace) -> Layout | TimeSeries:
    """The layout, or the time series when the input names time points ({t}, a t column)."""
    return read_input(args.layout, **_read_options(args))


def _load(args: argparse.Namespace) -> Layout:
    """The layout to work on; of a time series, time point --timepoint (default 0)."""
    read = _load_input(args)
    return read.at_time(args.timepoint or 0) if isinstance(read, TimeSeries) else read


def _chunk_arg(args: argparse.Namespace) -> int | tuple[int, ...] | None:
    if args.chunk is None:
        return None
    return args.chunk[0] if len(args.chunk) == 1 else tuple(args.chunk)


# -------------------------------------------------------------------------------------- fuse


def fuse_request(args: argparse.Namespace) -> FuseRequest:
    """The run ``tilefuse fuse`` describes."""
    return FuseRequest(
        layout=args.layout, output=args.output, **_read_options(args), register=args.register,
        max_shift=args.max_shift, channel=args.channel,
        register_downsample=args.register_downsample,
        keep_stage_positions=args.keep_stage_positions, report=args.report,
        flatfield=args.flatfield, darkfield=args.darkfield,
        match_intensity=args.match_intensity, chunk=_chunk_arg(args), blend=args.blend,
        blend_width=args.blend_width, dtype=args.dtype, fill=args.fill, backend=args.backend,
        cache_bytes=args.cache_mb * 2**20, memory_limit=args.memory_limit, ngff=args.ngff,
        levels=args.levels, overwrite=args.overwrite, resume=args.resume,
        scheduler=args.scheduler, workers=args.workers,
    )


def cmd_fuse(args: argparse.Namespace) -> int:
    from tilefuse.runner import open_runner

    started = time.perf_counter()
    result = run_fusion(
        fuse_request(args), message=None if args.quiet else _say,
        runner=lambda: open_runner(args.scheduler, workers=args.workers,
                                   progress=not args.quiet),
    )
    if args.quiet:
        return 0
    if result.complete:
        _say(f"{result.output} is already complete: nothing to resume")
    else:
        _say(_fuse_summary(result, time.perf_counter() - started))
    return 0


def _fuse_summary(result: FuseResult, seconds: float) -> str:
    """One line: what was fused into what, how fast, where the layout went."""
    layout, plan = result.layout, result.plan
    if isinstance(layout, TimeSeries):
        what = f"{len(layout)} time points of {len(layout.at_time(0).tiles)} tiles"
        shape: tuple[int, ...] = (len(layout), *plan.chunks.shape)
    else:
        what, shape = f"{len(layout.tiles)} tiles", tuple(plan.chunks.shape)
    mpix = math.prod(shape) / 1e6
    note = ("" if layout.pixel_size_known else
            f"\npixel size {layout.pixel_size[-1]:g} {layout.unit} is a default: no file states "
            "one; pass --pixel-size to write the real one")
    return (f"fused {what} -> {result.output} ({' x '.join(map(str, shape))}, {mpix:.1f} MPix) "
            f"in {seconds:.1f} s ({mpix / seconds:.1f} MPix/s); layout saved as "
            f"{result.sidecars[-1]}{note}")


# ---------------------------------------------------------------------------------- register


def _layout_output(args: argparse.Namespace, layout: Layout | TimeSeries) -> Path:
    """Where `register` writes: -o, else NAME.registered.txt as Fiji names it (a time series:
    .csv)."""
    given = Path(args.layout)
    out = Path(args.output) if args.output else given.with_name(given.stem + ".registered.txt")
    if not isinstance(layout, TimeSeries):
        return out
    if not args.output:
        return out.with_suffix(".csv")
    if out.suffix.lower() != ".csv":
        raise InputError(f"-o {out}: a time series is saved as a CSV layout with a t column; "
                         "give -o NAME.csv")
    return out


def cmd_register(args: argparse.Namespace) -> int:
    from tilefuse.io.outputs import check_file_output

    layout = _load_input(args)
    inputs = _run.run_inputs(args.layout, layout)
    out = check_file_output(_layout_output(args, layout), overwrite=args.overwrite,
                            inputs=inputs, what="registered layout", suffixes=(".txt", ".csv"))
    _run.check_report(args.report, layout, inputs, overwrite=args.overwrite)
    registered, _ = register_input(
        layout, timepoint=args.timepoint, max_shift=args.max_shift, channel=args.channel,
        workers=args.workers, downsample=args.register_downsample,
        keep_stage_positions=args.keep_stage_positions, report=args.report,
        message=None if args.quiet else _say)
    save_layout(registered, out)
    if not args.quiet:
        _say(f"registered layout written to {out}")
    return 0


# ------------------------------------------------------------------- flatfield, preview, info


def cmd_flatfield(args: argparse.Namespace) -> int:
    from tilefuse.intensity import estimate_flatfield, save_flatfield
    from tilefuse.io.outputs import check_file_output

    layout = _load(args)
    out = check_file_output(args.output, overwrite=args.overwrite,
                            inputs=_run.run_inputs(args.layout, layout), what="-o",
                            suffixes=_TIFF_OUTPUT)
    flat, dark = estimate_flatfield(layout, sample=args.sample, darkfield=args.darkfield)
    save_flatfield(out, flat, dark)
    _say(f"flat field ({flat.shape}, min {flat.min():.3f}, max {flat.max():.3f}) written to "
         f"{out}; use it with 'tilefuse fuse ... --flatfield {out}'")
    return 0


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
    inputs = (_run.run_inputs(source, layout) if layout is not None
              else input_files(source, ()))
    out = check_file_output(args.output, overwrite=args.overwrite, inputs=inputs, what="-o",
                            suffixes=_PICTURE_SUFFIXES)
    picture = preview_image(source if layout is None else layout, max_size=args.max_size,
                            report=args.report)
    picture.save(out)
    _say(f"preview written to {out} ({picture.size[0]} x {picture.size[1]})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from tilefuse.plan.info import describe, describe_series

    layout = _load_input(args)
    chunk = _chunk_arg(args)
    _run.check_chunk(chunk, layout)
    threads = args.workers or os.cpu_count() or 1
    options = {"chunk": chunk, "threads": threads, "cache_bytes": args.cache_mb * 2**20,
               "backend": args.backend}
    lines = (describe_series(layout, timepoint=args.timepoint or 0, **options)
             if isinstance(layout, TimeSeries) else describe(layout, **options))
    for line in lines:
        print(line)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "fuse": cmd_fuse, "register": cmd_register, "preview": cmd_preview,
    "flatfield": cmd_flatfield, "info": cmd_info,
}
