"""One fusion run, from a layout to an OME-Zarr image with its layout saved beside it.

read -> register (optional) -> intensity correction (optional) -> plan -> write -> sidecars,
with the output checks of :mod:`tilefuse.io.outputs` first and the run manifest that makes an
interrupted run resumable. ``tilefuse fuse`` and the napari widget both describe a run as a
:class:`FuseRequest` and call :func:`run_fusion`; so do scripts that want exactly what the
command line does::

    from tilefuse.pipeline import FuseRequest, run_fusion

    result = run_fusion(FuseRequest("tiles/TileConfiguration.txt", "mosaic.ome.zarr",
                                    register=True, pixel_size=(0.65,)))
    result.output, result.sidecars, result.timings

The library never prints: what a person should read (registration summaries, where a report
went, a dashboard link) goes to the ``message`` callback, progress to ``progress``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tilefuse import _run
from tilefuse._layouts import (
    MessageFn,
    read_cycles,
    read_input,
    register_input,
    save_layout,
    save_sidecars,
    silent,
)
from tilefuse.bdv.write import bdv_sidecar, write_mosaic_xml
from tilefuse.errors import USER_ERRORS, InputError
from tilefuse.fusion.graph import FusionPlan, SeriesPlan, fuse, layout_backend, plan_fusion
from tilefuse.fusion.kernel import check_fill
from tilefuse.io.outputs import (
    check_image_output,
    check_tiff_output,
    is_finished,
    read_manifest,
    refuse_url,
)
from tilefuse.model.layout import Layout
from tilefuse.model.mosaic import Mosaic
from tilefuse.model.timeseries import TimeSeries
from tilefuse.ome_tiff import output_format
from tilefuse.runner import ProgressFn, on_cluster, write_compute

if TYPE_CHECKING:
    from tilefuse.registration import RegistrationReport

__all__ = ["FuseRequest", "FuseResult", "read_input", "register_input", "run_fusion",
           "save_layout", "save_sidecars"]

log = logging.getLogger(__name__)

Compute = Callable[..., tuple]
"""Runs dask collections like ``dask.compute(*collections)``; may take ``label=``."""
Runner = Callable[[], AbstractContextManager[tuple[Compute, str | None]]]
"""Opens ``(compute, dashboard_link)`` for the write, e.g. :func:`tilefuse.runner.open_runner`."""

# What may stop a write half way: then the partial output is kept for a resume.
_WRITE_FAILURES: tuple[type[BaseException], ...] = (*USER_ERRORS, OSError, KeyboardInterrupt)


@dataclass(frozen=True)
class FuseRequest:
    """A fusion run: the options of ``tilefuse fuse``, one field each (same names, same defaults).

    Attributes
    ----------
    layout : str or path-like
        Layout file, acquisition (CZI, OME-TIFF) or folder of tiles (with `pattern`).
    output : str or path-like
        The OME-Zarr folder to write, ``NAME.ome.zarr``, or a pyramidal OME-TIFF file,
        ``NAME.ome.tif``; the layout is saved beside it as ``NAME.layout.csv`` and
        ``NAME.TileConfiguration.txt``.
    pattern, grid, order, overlap, first_index, z_step, flip_x, flip_y, swap_xy, scene
        How to read it: see :func:`tilefuse.read_layout`. ``scene="all"`` (every scene of a
        CZI) is for the command line, which makes one run per scene (``--scene all``).
    timepoint : int, optional
        Of a time series, the time point registration measures (default 0).
    rotate : float, optional
        Rotate every tile by this many degrees about its centre.
    pixel_size : sequence of float, optional
        One value, or one per spatial axis (z, y, x); with one value and `z_step`, z is
        `z_step` times larger. Default: from the files, else 1.
    unit : str
        Unit of `pixel_size`.
    register, max_shift, channel, register_downsample, keep_stage_positions
        Refine positions first (:func:`tilefuse.register`; `register_downsample` is its
        ``downsample``, `keep_stage_positions` its ``allow_stage_positions``).
    report : str or path-like, optional
        Write the registration report as JSON (and its picture beside it as PNG).
    flatfield, darkfield : str, optional
        ``"estimate"`` or a file: see :func:`tilefuse.intensity.prepare_corrections`.
    match_intensity : bool
        Per-tile gains from the overlaps.
    chunk : int or tuple of int, optional
        Output chunk (one size or one per spatial axis); default: the largest that
        `memory_limit` allows (or, on a resume, the interrupted run's).
    blend, blend_width, dtype, fill, backend
        As in :func:`tilefuse.plan_fusion`.
    cache_bytes : int, optional
        Decoded-tile cache per process; default: :data:`DEFAULT_CACHE_BYTES`, more for large
        tiles when the memory budget allows (:func:`tilefuse._run.tile_cache_bytes`).
    memory_limit : str or int
        Memory budget: bytes (``"8GB"``) or a fraction of this job's memory (``"0.5"``).
    ngff, levels : str, int
        OME-NGFF version and pyramid levels (:func:`tilefuse.write_ome_zarr`).
    overwrite, resume : bool
        Replace an output tilefuse wrote; continue an interrupted run into `output`.
    scheduler, workers
        Where dask runs: ``threads``, ``processes``, ``sync``, ``distributed`` or a scheduler
        address; threads or workers (default: one per core; also registration's threads).
    format : {"ome-zarr", "ome-tiff"}, optional
        Output format; default by the name of `output` (``.ome.tif``/``.ome.tiff``: a
        pyramidal OME-TIFF, :func:`tilefuse.write_ome_tiff`; written in one go, no resume).
    bdv : bool
        Also write ``NAME.xml`` for BigDataViewer (:func:`tilefuse.bdv.write_bdv_xml`).
    shard : int or tuple of int, optional
        Sharded zarr v3 output (NGFF 0.5): shard size in pixels, one or one per spatial axis,
        a multiple of the chunk; each shard is one file and one task (``shard`` of
        :func:`tilefuse.write_ome_zarr`).
    cycles, align_channel, align_scale, channel_names
        Cyclic imaging: further inputs, cycles 2.. (`layout` is cycle 1), aligned to cycle 1
        on a shared channel (turned, shifted, and scaled too with `align_scale`) and fused with
        all their channels; see :mod:`tilefuse.registration.cycle_run`.
    """

    layout: str | os.PathLike
    output: str | os.PathLike
    pattern: str | None = None
    grid: str | None = None
    order: str | None = None
    overlap: float | None = None
    first_index: int | None = None
    z_step: float | None = None
    flip_x: bool = False
    flip_y: bool = False
    swap_xy: bool = False
    scene: int | str | None = None
    timepoint: int | None = None
    rotate: float | None = None
    pixel_size: tuple[float, ...] | None = None
    unit: str = "micrometer"
    register: bool = False
    max_shift: float | None = None
    channel: int = 0
    register_downsample: int = 1
    keep_stage_positions: bool = False
    report: str | os.PathLike | None = None
    flatfield: str | None = None
    darkfield: str | None = None
    match_intensity: bool = False
    chunk: int | tuple[int, ...] | None = None
    blend: str = "linear"
    blend_width: float | None = None
    dtype: str | None = None
    fill: float = 0
    backend: str = "auto"
    cache_bytes: int | None = None
    memory_limit: str | int = "0.5"
    ngff: str = "0.5"
    levels: int | None = None
    overwrite: bool = False
    resume: bool = False
    scheduler: str = "threads"
    workers: int | None = None
    format: str | None = None
    bdv: bool = False
    shard: int | tuple[int, ...] | None = None
    cycles: tuple[str | os.PathLike, ...] = ()
    align_channel: tuple[int | str, ...] = ()
    align_scale: bool = False
    channel_names: tuple[str, ...] = ()

    def read_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`read_input` this request sets."""
        return {"pattern": self.pattern, "grid": self.grid, "order": self.order,
                "overlap": self.overlap, "first_index": self.first_index, "z_step": self.z_step,
                "flip_x": self.flip_x, "flip_y": self.flip_y, "swap_xy": self.swap_xy,
                "scene": self.scene, "timepoint": self.timepoint, "rotate": self.rotate,
                "pixel_size": self.pixel_size, "unit": self.unit}


@dataclass(frozen=True)
class FuseResult:
    """What a run did.

    Attributes
    ----------
    output : pathlib.Path
        The OME-Zarr image.
    layout : Layout or TimeSeries
        What was fused, registered when asked (before intensity correction): what the
        sidecars hold.
    plan : FusionPlan or SeriesPlan
    mosaic : Mosaic
        The written image as fused (axes, pixel size, channel names, origin).
    sidecars : tuple of pathlib.Path
        ``NAME.layout.csv`` and, but for a time series, ``NAME.TileConfiguration.txt``; empty
        when `complete`.
    reports : dict of int to RegistrationReport
        By time point index (0 for a layout); empty without registration.
    timings : dict of str to float
        Seconds per step: ``read``, ``register``, ``correct``, ``plan``, ``write``,
        ``sidecars``, and ``total``.
    complete : bool
        A resume found the image already finished: nothing was written.
    cycles : tuple of CycleAlignment
        With several inputs, each cycle's alignment (:mod:`tilefuse.registration.cycles`).
    """

    output: Path
    layout: Layout | TimeSeries
    plan: FusionPlan | SeriesPlan
    mosaic: Mosaic
    sidecars: tuple[Path, ...] = ()
    reports: dict[int, RegistrationReport] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    complete: bool = False
    cycles: tuple = ()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run_fusion(
    request: FuseRequest,
    *,
    progress: ProgressFn | None = None,
    message: MessageFn | None = None,
    runner: Runner | None = None,
) -> FuseResult:
    """Run a fusion: check, read, register, correct, plan, write, save the layout beside.

    Everything that can be refused is refused before a pixel is read: the output's name and
    place (:func:`tilefuse.io.outputs.check_image_output`: never an input, never a folder
    tilefuse did not make), the sidecars and report files, the chunk and the fill value.

    Parameters
    ----------
    request : FuseRequest
    progress : callable, optional
        ``progress(done, total, label)``: a stage (``"reading layout"``, ``"registering"``,
        ``"correcting intensity"``, ``"planning"``, ``"saving layout"``) with ``total == 0``;
        with `register`, pairs measured (``"registering pairs"``) then the solve
        (``"solving"``); then chunks stored of each level, across its batches (``"fusing"``,
        ``"pyramid level 1"``, ...). Called from this thread, for the threads, processes and
        sync schedulers (a `runner` reports its own).
    message : callable, optional
        Receives each line a person should read: registration summaries, where reports went,
        the dask dashboard's address.
    runner : callable, optional
        Opens the ``(compute, dashboard)`` the image is written with (the command line passes
        :func:`tilefuse.runner.open_runner` with its progress bars); default: `request`'s
        scheduler, reporting to `progress`.

    Returns
    -------
    FuseResult

    Raises
    ------
    InputError, FileNotFoundError, FileExistsError, PermissionError
        A wrong input or output, named; when an interrupted write left a resumable output,
        the message says so (``--resume`` continues it).
    KeyboardInterrupt
        Likewise, with that note as its argument.
    """
    stage = progress or _no_progress
    say = message or silent
    timings: dict[str, float] = {}
    clock = _Clock(timings)
    refuse_url(request.output, "-o")  # before Path() folds "s3://b" into "s3:/b"
    output = Path(request.output)
    tiff = output_format(output, request.format) == "ome-tiff"
    if tiff:  # refuse --resume, a foreign file, a folder before reading anything
        check_tiff_output(output, overwrite=request.overwrite, resume=request.resume)
    else:
        _run.check_output_name(output)
    stage(0, 0, "reading layout")
    layout = read_input(request.layout, **request.read_options())
    _warm_up_kernel(request.backend, layout)
    _run.check_chunk(request.chunk, layout)
    _run.check_shard(request.shard, layout, ngff=request.ngff, tiff=tiff)
    cycles = read_cycles(request, layout)  # several inputs: every cycle read and checked
    inputs = _run.run_inputs(request.layout, layout) if cycles is None else cycles.inputs()
    check_output = check_tiff_output if tiff else check_image_output
    check_output(output, overwrite=request.overwrite, resume=request.resume, inputs=inputs)
    sidecars = _run.check_sidecars(output, inputs)
    sidecars += cycles.check_sidecars(output, inputs) if cycles else []
    bdv_xml = bdv_sidecar(output, inputs, tiff=tiff) if request.bdv else None
    sidecars += [bdv_xml.name] if bdv_xml else []  # the manifest says NAME.xml is ours
    previous = read_manifest(output) if request.resume else None
    ours = (previous or {}).get("reports", [])
    report_names = _run.check_report(request.report, layout, inputs,
                                     overwrite=request.overwrite, ours=ours)
    if request.resume and not request.report:  # a resume that writes no report keeps the
        report_names = ours                      # names of the ones the run wrote
    check_fill(request.fill, request.dtype or layout.dtype)
    chunk = _run.resume_chunk(output, request.chunk, resume=request.resume)
    complete = request.resume and is_finished(output)
    clock.lap("read")
    with contextlib.ExitStack() as stack:
        opened: tuple[Compute, str | None] | None = None  # a runner opened for the whole run
        reports: dict[int, RegistrationReport] = {}
        if request.register or cycles:
            stage(0, 0, "registering")
            if on_cluster(request.scheduler):  # the cluster's workers, started once for the run
                opened = stack.enter_context(
                    write_compute(request.scheduler, request.workers, runner, stage))
            executor = getattr(opened[0], "executor", None) if opened else None
            if request.register:
                layout, reports = register_input(
                    layout, timepoint=request.timepoint, max_shift=request.max_shift,
                    channel=request.channel, workers=request.workers,
                    downsample=request.register_downsample,
                    keep_stage_positions=request.keep_stage_positions,
                    report=None if cycles else request.report, message=say, executor=executor,
                    progress=progress)
            if cycles:  # every later cycle aligned to cycle 1 (the report holds both)
                cycles.align(layout, reports.get(0), request.report, request.workers, executor,
                             progress, say, allow_scale=request.align_scale)
        clock.lap("register")
        fused_layout = _corrected(layout, request, stage)
        clock.lap("correct")
        stage(0, 0, "planning")
        cache = request.cache_bytes
        if cache is None:
            cache = _run.tile_cache_bytes(fused_layout, chunk, memory_limit=request.memory_limit,
                                          scheduler=request.scheduler, workers=request.workers)
        plan = plan_fusion(
            fused_layout,
            chunk=_run.budget_chunk(fused_layout, chunk, memory_limit=request.memory_limit,
                                    workers=request.workers, cache_bytes=cache,
                                    backend=request.backend, scheduler=request.scheduler,
                                    dask=tiff),
            blend=request.blend, blend_width=request.blend_width, dtype=request.dtype,
            fill=request.fill, cache_bytes=cache, backend=request.backend)
        mosaic = fuse(plan) if cycles is None else cycles.fuse(
            plan, lambda one: _corrected(one, request, stage), backend=request.backend)
        clock.lap("plan")
        manifest = _run.run_manifest(
            layout, plan, backend=request.backend, ngff=request.ngff, levels=request.levels,
            flatfield=request.flatfield, darkfield=request.darkfield,
            match_intensity=request.match_intensity, sidecars=sidecars, reports=report_names,
            shard=request.shard)
        if tiff:
            manifest["format"] = "ome-tiff"
        manifest.update(cycles.record() if cycles else {})
        _write(request, output, mosaic, plan, json.loads(json.dumps(manifest)), runner, stage, say,
               tiff=tiff, opened=opened)
        clock.lap("write")
    written: tuple[Path, ...] = ()
    if not complete:
        stage(0, 0, "saving layout")
        written = (*(cycles.save(output) if cycles else ()), *save_sidecars(layout, output))
        if bdv_xml is not None:
            written = (write_mosaic_xml(mosaic, output, bdv_xml), *written)
    clock.lap("sidecars")
    timings["total"] = sum(timings.values())
    return FuseResult(output, layout, plan, mosaic, written, reports, timings, complete,
                      cycles.alignments if cycles else ())


def _write(request: FuseRequest, output: Path, mosaic: Mosaic, plan: FusionPlan | SeriesPlan,
           manifest: dict, runner: Runner | None, progress: ProgressFn, say: MessageFn, *,
           tiff: bool = False, opened: tuple[Compute, str | None] | None = None) -> None:
    """Fuse and write the image (on `opened`, a runner the run has open already, or one of its
    own); a failure that leaves a resumable output says so."""
    from tilefuse.ome_zarr.resume import refresh_changed_tiles

    try:
        saved = read_manifest(output) if request.resume else None
        if saved is not None:
            refresh_changed_tiles(output, saved, manifest,
                                  plan.plans if isinstance(plan, SeriesPlan) else plan)
        with (contextlib.nullcontext(opened) if opened is not None
              else write_compute(request.scheduler, request.workers, runner, progress)
              ) as (compute, dashboard):
            if dashboard:
                say(f"dask dashboard: {dashboard}")
            if tiff:  # an OME-TIFF: one go, from a temporary file (nothing left to resume)
                from tilefuse.ome_tiff.writer import write_tiff_image

                write_tiff_image(mosaic, output, levels=request.levels,
                                 overwrite=request.overwrite, compute=compute,
                                 manifest=manifest, progress=progress)
                return
            from tilefuse.ome_zarr.writer import write_image

            write_image(mosaic, output, ngff_version=request.ngff, levels=request.levels,
                        overwrite=request.overwrite, compute=compute, manifest=manifest,
                        resume=request.resume, shard=request.shard)
    except _WRITE_FAILURES as exc:
        if tiff or read_manifest(output) is None or is_finished(output):
            raise
        note = f" (partial output kept in {output}; the same command with --resume continues it)"
        if isinstance(exc, KeyboardInterrupt):
            raise KeyboardInterrupt(note) from None
        if isinstance(exc, USER_ERRORS):
            raise type(exc)(f"{exc}{note}") from exc
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise InputError(f"cannot write {output}: {reason}{note}") from exc


def _corrected(layout: Layout | TimeSeries, request: FuseRequest,
               stage: ProgressFn) -> Layout | TimeSeries:
    """The layout whose tiles read flat-field corrected and intensity matched, if asked."""
    if not (request.flatfield or request.darkfield or request.match_intensity):
        return layout  # and no import of the intensity package (0.2 s of scipy.sparse)
    from tilefuse.intensity import prepare_corrections

    stage(0, 0, "correcting intensity")

    def correct(one: Layout) -> Layout:
        return prepare_corrections(one, flatfield=request.flatfield, darkfield=request.darkfield,
                                   match=request.match_intensity)

    return layout.map(correct) if isinstance(layout, TimeSeries) else correct(layout)


def _warm_up_kernel(backend: str, layout: Layout | TimeSeries) -> None:
    """Load the compiled kernel, if the plan will take it, in the background while the run
    checks its outputs, registers and plans (~0.5 s saved)."""
    one = layout.at_time(0) if isinstance(layout, TimeSeries) else layout
    if layout_backend(one, backend) != "numba":
        return
    from tilefuse.fusion._numba.kernel import warm_up

    threading.Thread(target=warm_up, name="tilefuse-warm-up", daemon=True).start()


class _Clock:
    """Seconds per step into `timings`."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = now - self.last
        self.last = now


def _no_progress(done: int, total: int, label: str) -> None:
    """Progress sink that ignores everything."""
