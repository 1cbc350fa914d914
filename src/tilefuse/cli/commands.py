"""The commands of ``tilefuse``: options in, one library call, what happened printed.

``fuse`` is :func:`tilefuse.pipeline.run_fusion`; the others read the input with
:func:`tilefuse.pipeline.read_input` and call one library function. What may be written is
checked by the library (:mod:`tilefuse.io.outputs`), never here.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tilefuse import _run
from tilefuse.cli._scenes import scene_requests
from tilefuse.cli.progress import ProgressBar
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


def _load_input(args: argparse.Namespace, scene: int | None = None) -> Layout | TimeSeries:
    """The layout, or the time series when the input names time points ({t}, a t column);
    of a CZI, scene `scene` when given, else --scene (``all`` only for fuse and info)."""
    options = _read_options(args)
    if scene is not None:
        options["scene"] = scene
    elif options["scene"] == "all":
        raise InputError(f"--scene all makes one output per scene with fuse (and info describes "
                         f"each); {args.command} takes one scene: --scene N")
    return read_input(args.layout, **options)


def _load(args: argparse.Namespace) -> Layout:
    """The layout to work on; of a time series, time point --timepoint (default 0)."""
    read = _load_input(args)
    return read.at_time(args.timepoint or 0) if isinstance(read, TimeSeries) else read


def _chunk_arg(args: argparse.Namespace) -> int | tuple[int, ...] | None:
    if args.chunk is None:
        return None
    return args.chunk[0] if len(args.chunk) == 1 else tuple(args.chunk)


def _shard_arg(args: argparse.Namespace) -> int | tuple[int, ...] | None:
    shard = getattr(args, "shard", None)
    return None if shard is None else shard[0] if len(shard) == 1 else tuple(shard)


# -------------------------------------------------------------------------------------- fuse


def _one_or_cycles(args: argparse.Namespace) -> tuple[str, ...]:
    """The inputs of ``fuse`` or ``register``: one, or several cycles (not with --scene all);
    --align-channel (and --channel-names) only with several."""
    inputs = tuple(args.layout)
    if len(inputs) > 1 and args.scene == "all":
        raise InputError("--scene all makes one output per scene; with several inputs "
                         "(cycles) give one scene: --scene N")
    given = [o for o, v in (("--align-channel", args.align_channel),
                            ("--align-scale", args.align_scale),
                            ("--channel-names", getattr(args, "channel_names", ()))) if v]
    if len(inputs) == 1 and given:
        raise InputError(f"{given[0]} is for several inputs (the cycles of a cyclic "
                         f"acquisition); {inputs[0]} is one")
    return inputs


def _cache_bytes(args: argparse.Namespace) -> int | None:
    """``--cache-mb`` in bytes; None when not given (the run sizes its cache)."""
    return None if args.cache_mb is None else args.cache_mb * 2**20


def fuse_request(args: argparse.Namespace) -> FuseRequest:
    """The run ``tilefuse fuse`` describes (several inputs: the cycles, the first as `layout`)."""
    first, *more = _one_or_cycles(args)
    return FuseRequest(
        layout=first, cycles=tuple(more), align_channel=tuple(args.align_channel),
        align_scale=args.align_scale,
        channel_names=tuple(args.channel_names), output=args.output, **_read_options(args),
        register=args.register,
        max_shift=args.max_shift, channel=args.channel,
        register_downsample=args.register_downsample,
        keep_stage_positions=args.keep_stage_positions, report=args.report,
        flatfield=args.flatfield, darkfield=args.darkfield,
        match_intensity=args.match_intensity, chunk=_chunk_arg(args), blend=args.blend,
        blend_width=args.blend_width, dtype=args.dtype, fill=args.fill, backend=args.backend,
        cache_bytes=_cache_bytes(args), memory_limit=args.memory_limit, ngff=args.ngff,
        levels=args.levels, overwrite=args.overwrite, resume=args.resume,
        scheduler=args.scheduler, workers=args.workers, format=args.format, bdv=args.bdv,
        shard=_shard_arg(args),
    )


def cmd_fuse(args: argparse.Namespace) -> int:
    from tilefuse.runner import open_runner

    for request in scene_requests(fuse_request(args)):  # --scene all: one run per scene
        started = time.perf_counter()
        with ProgressBar(enabled=not args.quiet) as bar:  # one bar: registration, every level
            result = run_fusion(
                request, message=None if args.quiet else bar.say, progress=bar,
                runner=functools.partial(open_runner, args.scheduler, workers=args.workers,
                                         progress=bar),
            )
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
    if result.cycles:
        what = f"{len(result.cycles)} cycles ({what} in cycle 1)"
    mpix = math.prod(shape) / 1e6
    note = ("" if layout.pixel_size_known else
            f"\npixel size {layout.pixel_size[-1]:g} {layout.unit} is a default: no file states "
            "one; pass --pixel-size to write the real one")
    return (f"fused {what} -> {result.output} ({_sizes(result.mosaic.axes, shape)} px, "
            f"{mpix:.1f} MPix) "
            f"in {seconds:.1f} s ({mpix / seconds:.1f} MPix/s); layout saved as "
            f"{result.sidecars[-1]}{_cycle_layouts(result)}{note}")


def _cycle_layouts(result: FuseResult) -> str:
    """Where the later cycles' layouts went, when there are cycles."""
    names = [p.name for p in result.sidecars if p.name.endswith(".layout.csv")][:-1]
    return f" (later cycles: {', '.join(names)})" if result.cycles and names else ""


def _sizes(axes: tuple[str, ...] | list[str], shape: tuple[int, ...]) -> str:
    """Sizes as a person reads them, x first: ``x 1170, y 944`` (and ``z``, ``c``, ``t``)."""
    named = dict(zip(reversed(axes), reversed(shape), strict=False))  # aligned at x
    if len(shape) > len(axes):  # a time series: t before the mosaic's axes
        named.setdefault("t", shape[0])
    return ", ".join(f"{a} {named[a]}" for a in ("x", "y", "z", "c", "t") if a in named)


# ---------------------------------------------------------------------------------- register


def _layout_output(args: argparse.Namespace, layout: Layout | TimeSeries) -> Path:
    """Where `register` writes: -o, else NAME.registered.txt as Fiji names it (a time series:
    .csv)."""
    given = Path(args.layout)
    default = ".registered.xml" if given.suffix.lower() == ".xml" else ".registered.txt"
    out = Path(args.output) if args.output else given.with_name(given.stem + default)
    if not isinstance(layout, TimeSeries) or out.suffix.lower() == ".xml":
        return out
    if not args.output:
        return out.with_suffix(".csv")
    if out.suffix.lower() != ".csv":
        raise InputError(f"-o {out}: a time series is saved as a CSV layout with a t column; "
                         "give -o NAME.csv")
    return out


def cmd_register(args: argparse.Namespace) -> int:
    from tilefuse.io.outputs import check_file_output

    inputs_given = _one_or_cycles(args)
    args.layout = inputs_given[0]
    if len(inputs_given) > 1:
        return _register_cycles(args, inputs_given)
    layout = _load_input(args)
    inputs = _run.run_inputs(args.layout, layout)
    out = check_file_output(_layout_output(args, layout), overwrite=args.overwrite,
                            inputs=inputs, what="registered layout",
                            suffixes=(".txt", ".csv", ".xml"))
    _run.check_report(args.report, layout, inputs, overwrite=args.overwrite)
    from tilefuse.cluster import cluster_executor  # pairs on a job queue's or cluster's workers

    with cluster_executor(args.scheduler, args.workers) as executor, \
            ProgressBar(enabled=not args.quiet) as bar:  # pairs measured, then the solve
        registered, _ = register_input(
            layout, timepoint=args.timepoint, max_shift=args.max_shift, channel=args.channel,
            workers=args.workers, downsample=args.register_downsample,
            keep_stage_positions=args.keep_stage_positions, report=args.report,
            message=None if args.quiet else bar.say, executor=executor, progress=bar)
    save_layout(registered, out)
    if not args.quiet:
        _say(f"registered layout written to {out}")
    return 0


def _register_cycles(args: argparse.Namespace, paths: tuple[str, ...]) -> int:
    """``tilefuse register CYCLE1 CYCLE2 ...``: cycle 1 registered, the others aligned to it;
    one layout per cycle (-o NAME.EXT: NAME.EXT, NAME.cycle2.EXT, ...; else each beside its
    input, NAME.registered.txt)."""
    from tilefuse.cluster import cluster_executor
    from tilefuse.io.outputs import check_file_output
    from tilefuse.registration.cycle_run import cycle_suffix, read_cycles

    first = _load_input(args)
    cycles = read_cycles(paths[0], first, paths[1:], read=read_input,
                         align_channel=args.align_channel, **_read_options(args))
    inputs = cycles.inputs()
    outs: list[Path] = []
    for k, path in enumerate(paths, start=1):
        out = _layout_output(argparse.Namespace(layout=path, output=args.output), first)
        if args.output and k > 1:
            out = out.with_name(out.stem + cycle_suffix(k, out.suffix))
        if out in outs:
            raise InputError(f"cycles {outs.index(out) + 1} and {k} would both be saved as "
                             f"{out}: give -o NAME.csv")
        outs.append(check_file_output(out, overwrite=args.overwrite, inputs=inputs,
                                      what=f"registered layout of cycle {k}",
                                      suffixes=(".txt", ".csv")))
    _run.check_report(args.report, first, inputs, overwrite=args.overwrite)
    with cluster_executor(args.scheduler, args.workers) as executor, \
            ProgressBar(enabled=not args.quiet) as bar:
        say = None if args.quiet else bar.say
        registered, reports = register_input(
            first, max_shift=args.max_shift, channel=args.channel, workers=args.workers,
            downsample=args.register_downsample,
            keep_stage_positions=args.keep_stage_positions, message=say, executor=executor,
            progress=bar)
        cycles.align(registered, registration=reports.get(0), report=args.report,
                     workers=args.workers, executor=executor, progress=bar, message=say,
                     allow_scale=args.align_scale)
    for layout, out in zip(cycles.layouts, outs, strict=True):
        save_layout(layout, out)
    if not args.quiet:
        _say("registered layouts written to " + ", ".join(map(str, outs)))
    return 0


# ------------------------------------------------------------------- flatfield, preview, info


def cmd_flatfield(args: argparse.Namespace) -> int:
    from tilefuse.intensity import estimate_flatfield, save_flatfield
    from tilefuse.io.outputs import check_file_output

    layout = _load(args)
    out = check_file_output(args.output, overwrite=args.overwrite,
                            inputs=_run.run_inputs(args.layout, layout), what="-o",
                            suffixes=_TIFF_OUTPUT)
    with ProgressBar(enabled=not args.quiet) as bar:  # tiles sampled, then overlaps read
        flat, dark = estimate_flatfield(layout, sample=args.sample, darkfield=args.darkfield,
                                        progress=bar)
    save_flatfield(out, flat, dark)
    size = _sizes(("z", "y", "x")[-flat.ndim:], tuple(flat.shape))
    _say(f"flat field ({size} px, min {flat.min():.3f}, max {flat.max():.3f}) written to "
         f"{out}; use it with 'tilefuse fuse ... --flatfield {out}'")
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    from tilefuse.io.outputs import check_file_output, input_files, is_finished
    from tilefuse.viz.preview import preview_image

    source = Path(args.layout)
    is_image = source.is_dir() and any((source / n).exists() for n in ("zarr.json", ".zattrs"))
    if is_image and not is_finished(source):
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
    _say(f"preview written to {out} (x {picture.size[0]}, y {picture.size[1]} px)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    scenes = _scenes(args)
    if len(scenes) > 1:
        print(f"scenes:       {len(scenes)}: "
              + ", ".join(f"{i} ({name})" for i, name in scenes.items()))
        if args.scene in (None, "all"):  # describe each
            for index, name in scenes.items():
                print(f"\nscene {index} ({name}):")
                _describe(args, _load_input(args, scene=index))
            return 0
    _describe(args, _load_input(args, scene=next(iter(scenes)) if args.scene == "all" else None))
    return 0


def _scenes(args: argparse.Namespace) -> dict[int, str]:
    """The scenes of a CZI input (index -> name); empty for other inputs."""
    from tilefuse.io.readers.czi import czi_scenes

    if not str(args.layout).lower().endswith(".czi") or Path(args.layout).is_dir():
        if args.scene == "all":
            raise InputError(f"--scene all: {args.layout} is not a CZI file; scenes are a CZI's")
        return {}
    return czi_scenes(args.layout)


def _describe(args: argparse.Namespace, layout: Layout | TimeSeries) -> None:
    """Print what `tilefuse info` says of one layout or time series."""
    from tilefuse.plan.info import describe, describe_series

    chunk = _chunk_arg(args)
    _run.check_chunk(chunk, layout)
    threads = args.workers or os.cpu_count() or 1
    cache = _cache_bytes(args)
    if cache is None:  # what fuse would take with its default memory limit
        cache = _run.tile_cache_bytes(layout, chunk, memory_limit="0.5", workers=args.workers)
    options = {"chunk": chunk, "threads": threads, "cache_bytes": cache,
               "backend": args.backend}
    lines = (describe_series(layout, timepoint=args.timepoint or 0, **options)
             if isinstance(layout, TimeSeries) else describe(layout, **options))
    for line in lines:
        print(line)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "fuse": cmd_fuse, "register": cmd_register, "preview": cmd_preview,
    "flatfield": cmd_flatfield, "info": cmd_info,
}
