"""The layout steps of a run, each usable alone: read the input (with a given pixel size and
rotation), register it (writing the reports), save it (beside an image, or where asked).

:mod:`tilefuse.pipeline` runs them (and exports them); the command line's ``register``,
``preview``, ``flatfield`` and ``info`` use them too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tilefuse import _run
from tilefuse.errors import InputError
from tilefuse.io.readers import read_layout, write_csv_layout, write_tileconfig
from tilefuse.model.layout import Layout
from tilefuse.model.timeseries import TimeSeries

if TYPE_CHECKING:
    from tilefuse.registration import RegistrationReport
    from tilefuse.registration.cycle_run import Cycles

__all__ = ["MessageFn", "read_cycles", "read_input", "register_input", "save_layout",
           "save_sidecars", "silent"]

MessageFn = Callable[[str], None]
"""Receives each line a person should read (the command line prints them)."""


def read_input(
    path: str | os.PathLike,
    *,
    timepoint: int | None = None,
    pixel_size: Sequence[float] | None = None,
    unit: str = "micrometer",
    rotate: float | None = None,
    z_step: float | None = None,
    **read_options: Any,
) -> Layout | TimeSeries:
    """:func:`tilefuse.read_layout`, then a given pixel size and rotation on every time point.

    Parameters
    ----------
    path, z_step, **read_options
        As in :func:`tilefuse.read_layout`.
    timepoint : int, optional
        A time point that must exist (registration and previews use it); refused for an
        input without time points unless 0.
    pixel_size, unit, rotate
        As in :class:`FuseRequest`.

    Returns
    -------
    Layout or TimeSeries
    """
    read = read_layout(path, z_step=z_step, **read_options)

    def adjust(layout: Layout) -> Layout:
        if pixel_size is not None:
            size = [float(s) for s in pixel_size]
            if len(size) == 1:
                size = size * layout.ndim
                if layout.ndim == 3 and z_step is not None:
                    size[0] *= z_step
            if len(size) != layout.ndim:
                raise InputError(f"--pixel-size takes 1 or {layout.ndim} values, got {len(size)}")
            layout = replace(layout, pixel_size=tuple(size), unit=unit)
        return layout.rotated(rotate) if rotate else layout

    if not isinstance(read, TimeSeries):
        if timepoint not in (None, 0):
            raise InputError(f"--timepoint {timepoint}: {path} has no time points (name them "
                             "with {t} in --pattern, or a t column in a CSV layout)")
        return adjust(read)
    read.at_time(timepoint or 0)  # refuses a time point that does not exist
    return read.map(adjust)


def read_cycles(request: Any, first: Layout | TimeSeries) -> Cycles | None:
    """With several inputs (a :class:`tilefuse.pipeline.FuseRequest` whose ``cycles`` are
    set; `first` its cycle 1 as read): every cycle read as :func:`read_input` reads, checked,
    with its alignment channel (:func:`tilefuse.registration.cycle_run.read_cycles`). None
    for one input."""
    if not request.cycles:
        return None
    from tilefuse.registration.cycle_run import read_cycles as read_all

    return read_all(request.layout, first, request.cycles, read=read_input,
                    align_channel=request.align_channel, channel_names=request.channel_names,
                    **request.read_options())


def register_input(
    layout: Layout | TimeSeries,
    *,
    timepoint: int | None = None,
    max_shift: float | None = None,
    channel: int = 0,
    workers: int | None = None,
    downsample: int = 1,
    keep_stage_positions: bool = False,
    report: str | os.PathLike | None = None,
    message: MessageFn | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    executor: Executor | None = None,
) -> tuple[Layout | TimeSeries, dict[int, RegistrationReport]]:
    """Register a layout, or a time series on `timepoint` (shared positions) or each time point
    alone; write the report(s) and their pictures when asked; say what was done.

    ``progress`` and ``executor`` go to :func:`tilefuse.registration.register` (progress
    ``(done, total, label)`` of the pair measurements and the solve; the executor that
    measures the pairs).

    Returns
    -------
    registered : Layout or TimeSeries
    reports : dict of int to RegistrationReport
        By time point index (0 for a layout).
    """
    from tilefuse.registration import register, register_series

    say = message or silent
    if not isinstance(layout, TimeSeries):
        registered, one = register(layout, max_shift=max_shift, channel=channel,
                                   workers=workers, downsample=downsample,
                                   allow_stage_positions=keep_stage_positions,
                                   progress=progress, executor=executor)
        _write_report(registered, one, report, "", say)
        for line in one.summary_lines():
            say(line)
        return registered, {0: one}
    series = layout
    index = timepoint or 0
    moved, reports = register_series(series, timepoint=index, max_shift=max_shift,
                                     channel=channel, workers=workers, downsample=downsample,
                                     allow_stage_positions=keep_stage_positions,
                                     progress=progress, executor=executor)
    for i, found in reports.items():
        name = series.names[i]
        _write_report(moved.at_time(i), found, report, f".t{name}" if len(reports) > 1 else "",
                      say)
        head = [f"time point {name}:"] if len(reports) > 1 else []
        say("\n".join(head + found.summary_lines()))
    if series.shared:
        say(f"registered on time point {series.names[index]} (--timepoint {index}); each "
            f"tile's correction applied to the same tile at all {len(series)} time points "
            "(positions shared)")
    else:
        say(f"positions differ between time points: each of the {len(series)} was registered "
            "on its own" + (" (--timepoint ignored)" if timepoint else ""))
    return moved, reports


def _write_report(layout: Layout, report: RegistrationReport, path: str | os.PathLike | None,
                  suffix: str, say: MessageFn) -> None:
    """The registration report as JSON and its picture, `suffix` added to `path`'s name."""
    if not path:
        return
    from tilefuse.viz.preview import write_preview

    out = _run.report_file(path, suffix)
    report.to_json(out)
    picture = write_preview(layout, out.with_suffix(".png"), report=report)
    say(f"report written to {out} and {picture}")


def save_layout(layout: Layout | TimeSeries, out: str | os.PathLike) -> Path:
    """Write `layout` to `out`: a CSV layout when `out` ends in ``.csv`` or `layout` is a time
    series (a t column), else a TileConfiguration (Fiji reads its tile lines). Either reads
    back to the same tiles, channel files, affines, pixel size and unit. A layout read from a
    BigStitcher ``dataset.xml`` saved as ``.xml``: that XML with each view's move to its new
    affine prepended as a ``ViewTransform`` (nothing else changed; never over the input)."""
    out = Path(out)
    if out.suffix.lower() == ".xml":
        from tilefuse.io.readers.bigstitcher import write_registered_xml

        return write_registered_xml(layout, out)
    if isinstance(layout, TimeSeries) or out.suffix.lower() == ".csv":
        return write_csv_layout(layout, out)
    return write_tileconfig(layout, out)


def save_sidecars(layout: Layout | TimeSeries, output: str | os.PathLike) -> tuple[Path, ...]:
    """The fused layout beside the image `output`: ``NAME.layout.csv`` and, but for a time
    series, ``NAME.TileConfiguration.txt`` (for Fiji). Both read back to the run's tiles,
    channel files, affines (exact), pixel size and unit."""
    csv_path, tileconfig = (_run.sidecar_path(Path(output), s) for s in _run.SIDECAR_SUFFIXES)
    written = (write_csv_layout(layout, csv_path),)
    if isinstance(layout, TimeSeries):
        return written
    return (*written, save_layout(layout, tileconfig))


def silent(line: str) -> None:
    """Message sink that ignores everything."""
