"""The cycle steps of a run with several inputs (cyclic imaging: CyCIF, CODEX, IBEX).

``tilefuse fuse CYCLE1 CYCLE2 ... -o OUT`` and ``tilefuse register CYCLE1 CYCLE2 ...``: each
input is one cycle (anything tilefuse reads). Cycle 1 is registered as one input would be (when
asked); every later cycle is aligned to it (:func:`tilefuse.registration.cycles.align_cycle`),
its tiles becoming affines in cycle 1's mosaic frame. :func:`tilefuse.pipeline.run_fusion` calls
the steps below when :attr:`~tilefuse.pipeline.FuseRequest.cycles` is set:

- :func:`read_cycles`: read cycles 2.. like cycle 1, refuse what cannot share one image
  (:func:`tilefuse.fusion.cycles.check_cycles`), resolve ``--align-channel`` (a name or index,
  one or one per cycle) and check ``--channel-names``, before a pixel is read;
- :meth:`Cycles.check_sidecars`: the layout files of cycles 2.. beside the image,
  ``NAME.cycleK.layout.csv`` and ``NAME.cycleK.TileConfiguration.txt``;
- :meth:`Cycles.align`: the alignment (on the run's executor), each cycle's summary said, the
  report written (:func:`write_cycle_report`: one JSON, a picture beside it);
- :meth:`Cycles.fuse`: every cycle planned on cycle 1's output grid, channels concatenated
  (:func:`tilefuse.fusion.cycles.fuse_cycles`);
- :meth:`Cycles.record`: each cycle in the run manifest (its tiles, files, affines), so a
  resume with other inputs is refused; :meth:`Cycles.save`: the layout files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tilefuse import _run
from tilefuse.errors import InputError
from tilefuse.fusion.cycles import check_cycles, cycle_channel_names, fuse_cycles, plan_like
from tilefuse.fusion.graph import FusionPlan, SeriesPlan
from tilefuse.io.readers import write_csv_layout
from tilefuse.model.layout import Layout
from tilefuse.model.mosaic import Mosaic
from tilefuse.model.timeseries import TimeSeries

if TYPE_CHECKING:
    from tilefuse.registration.cycles import CycleAlignment
    from tilefuse.registration.report import RegistrationReport

__all__ = ["CYCLE_SUFFIXES", "Cycles", "cycle_suffix", "read_cycles", "write_cycle_report"]

CYCLE_SUFFIXES = (".layout.csv", ".TileConfiguration.txt")
"""The layout files of cycle ``K`` (2..) beside an image ``NAME.ome.zarr``:
``NAME.cycleK`` + each of these."""


def cycle_suffix(cycle: int, suffix: str = "") -> str:
    """``.cycleK`` + `suffix`: what names cycle `cycle`'s files (1-based)."""
    return f".cycle{cycle}{suffix}"


class Cycles:
    """The cycles of a run, cycle 1 first: inputs, layouts, alignment channels, alignments.

    Attributes
    ----------
    paths : tuple of str
        Each cycle's input as given.
    layouts : list of Layout
        Each cycle's layout: read (tiles at their stage positions), then, after :meth:`align`,
        in cycle 1's mosaic frame (cycle 1 as registered).
    channels : tuple of int
        The alignment channel of each cycle.
    channel_names : tuple of str
        The output's channel names (every channel of every cycle, in cycle order).
    alignments : tuple of CycleAlignment
        After :meth:`align`: one per cycle (cycle 1's the identity).
    plans : tuple of FusionPlan
        After :meth:`fuse`: one per cycle, on cycle 1's output grid.
    """

    def __init__(self, paths: Sequence[str], layouts: Sequence[Layout], channels: Sequence[int],
                 channel_names: Sequence[str]) -> None:
        self.paths = tuple(str(p) for p in paths)
        self.layouts = list(layouts)
        self.channels = tuple(channels)
        self.channel_names = tuple(channel_names)
        self.alignments: tuple[CycleAlignment, ...] = ()
        self.plans: tuple[FusionPlan, ...] = ()

    def __len__(self) -> int:
        return len(self.layouts)

    def inputs(self) -> set[Path]:
        """Every cycle's input file or folder and tile files: never written or replaced."""
        found: set[Path] = set()
        for path, layout in zip(self.paths, self.layouts, strict=True):
            found |= _run.run_inputs(path, layout)
        return found

    def check_sidecars(self, output: Path, inputs: set[Path]) -> list[str]:
        """The layout files of cycles 2.. beside `output` (:func:`tilefuse._run.check_sidecars`:
        never an input, never a file another run wrote). Returns their names."""
        suffixes = [cycle_suffix(k, s) for k in range(2, len(self) + 1) for s in CYCLE_SUFFIXES]
        return _run.check_sidecars(output, inputs, suffixes=suffixes)

    def align(self, reference: Layout | TimeSeries,
              registration: RegistrationReport | None = None,
              report: str | os.PathLike | None = None, workers: int | None = None,
              executor: Executor | None = None,
              progress: Callable[[int, int, str], None] | None = None,
              message: Callable[[str], None] | None = None, *,
              allow_scale: bool = False) -> None:
        """Align cycles 2.. to `reference` (cycle 1 as fused: registered if asked), turned and
        shifted (and scaled with `allow_scale`); say each cycle's summary; write the report
        (and its picture) when asked.

        Raises
        ------
        InputError
            A cycle that cannot be aligned credibly (named, with what to try).
        """
        from tilefuse.registration.cycles import align_cycles

        assert isinstance(reference, Layout)  # read_cycles refused a time series
        say = message or _silent
        found = align_cycles([reference, *self.layouts[1:]], channel=self.channels,
                             allow_scale=allow_scale, workers=workers, executor=executor,
                             progress=progress, names=self.paths, message=say)
        self.alignments = tuple(found)
        self.layouts = [reference, *(one.layout for one in found[1:])]
        if report:
            json_path, picture = write_cycle_report(report, self, registration=registration)
            say(f"report written to {json_path} and {picture}")

    def fuse(self, plan: FusionPlan | SeriesPlan, correct: Callable[[Layout], Any], *,
             backend: str = "auto") -> Mosaic:
        """Every cycle fused as `plan` fuses cycle 1 (same grid, chunk, blend and widths,
        dtype, fill), channels concatenated, as :func:`tilefuse.fuse_cycles` fuses them;
        `correct` makes a later cycle's intensity-corrected layout; `backend` is the kernel
        asked for, resolved per cycle (a turned cycle takes the compiled affine kernel even
        where cycle 1's translations take numpy)."""
        assert isinstance(plan, FusionPlan)  # read_cycles refused a time series
        more = tuple(plan_like(plan, correct(layout), backend=backend)
                     for layout in self.layouts[1:])
        self.plans = (plan, *more)
        return fuse_cycles(self.plans, channel_names=self.channel_names)

    def record(self) -> dict:
        """What a run manifest says of the cycles (cycle 1 is the manifest's own layout): per
        later cycle its tiles, files and affines (``layout_sha256``), its tile files' sizes
        and times and its alignment channel; and the output's channel names."""
        from tilefuse.ome_zarr.resume import TILE_FILES_KEY

        entries = []
        for k, (layout, plan) in enumerate(zip(self.layouts, self.plans, strict=True)):
            if k == 0:
                continue
            one = _run.run_manifest(layout, plan, backend=plan.backend, ngff="", levels=None,
                                    flatfield=None, darkfield=None, match_intensity=False,
                                    sidecars=())
            entries.append({"cycle": k + 1, "layout_sha256": one["layout_sha256"],
                            "tiles": one["tiles"], "channel": self.channels[k],
                            TILE_FILES_KEY: one[TILE_FILES_KEY]})
        return {"cycles": entries, "align_channel": self.channels[0],
                "channel_names": list(self.channel_names)}

    def save(self, output: Path) -> tuple[Path, ...]:
        """The layout files of cycles 2.. beside the image: ``NAME.cycleK.layout.csv`` and
        ``NAME.cycleK.TileConfiguration.txt``; each reads back to the aligned tiles (affines
        exact)."""
        from tilefuse.io.readers import write_tileconfig

        written = []
        for k, layout in enumerate(self.layouts[1:], start=2):
            csv_path, tileconfig = (_run.sidecar_path(output, cycle_suffix(k, s))
                                    for s in CYCLE_SUFFIXES)
            written += [write_csv_layout(layout, csv_path), write_tileconfig(layout, tileconfig)]
        return tuple(written)


def read_cycles(first_path: str | os.PathLike, first: Layout | TimeSeries,
                more: Sequence[str | os.PathLike], *,
                read: Callable[..., Layout | TimeSeries],
                align_channel: Sequence[int | str] = (),
                channel_names: Sequence[str] = (), **read_options: Any) -> Cycles:
    """Read cycles 2.. (`more`) as cycle 1 was read; refuse what cannot be fused together.

    Parameters
    ----------
    first_path, first
        Cycle 1's input and its layout (read).
    more : sequence of path
        Cycles 2.., each anything :func:`tilefuse.read_layout` reads.
    read : callable
        ``read(path, **read_options)`` reads one (:func:`tilefuse.pipeline.read_input`).
    align_channel : sequence of int or str
        The channel every cycle shares (nuclei), by name or index: none (channel 0 of every
        cycle), one for all, or one per cycle.
    channel_names : sequence of str
        The output's channel names (one per channel of every cycle); default
        ``"<channel> (cycle N)"``.
    **read_options
        For `read`.

    Raises
    ------
    InputError
        A time series, 3D, dtype or pixel size mismatch (naming the cycle and its input); an
        unknown alignment channel; a wrong number of channel names or alignment channels.
    """
    if read_options.get("scene") == "all":
        raise InputError("--scene all makes one output per scene; with several inputs "
                         "(cycles) give one scene: --scene N")
    paths = [str(first_path), *(str(p) for p in more)]
    layouts = [first, *(read(p, **read_options) for p in more)]
    check_cycles(layouts, paths)
    flat = [one for one in layouts if isinstance(one, Layout)]
    from tilefuse.registration.cycles import alignment_channels

    channels = alignment_channels(flat, align_channel, paths=paths,
                                  option="--align-channel")
    return Cycles(paths, flat, channels, cycle_channel_names(flat, channel_names))


def write_cycle_report(path: str | os.PathLike, cycles: Cycles, *,
                       registration: RegistrationReport | None = None,
                       max_size: int = 1024) -> tuple[Path, Path]:
    """The cycle report as JSON, and its picture beside it (``.png``).

    The JSON holds ``registration`` (cycle 1's registration report, or null) and ``cycles``:
    one entry per cycle, cycle 1 first, its input and its
    :meth:`~tilefuse.registration.cycles.CycleAlignment.to_dict` (global rotation and offset,
    per-tile corrections, scores, tiles placed by the model and why). The picture draws every
    later cycle's tiles over cycle 1's mosaic (:func:`tilefuse.viz.cycles.cycle_picture`).

    Returns
    -------
    json_path, png_path : Path
    """
    from tilefuse.viz.cycles import cycle_picture

    out = Path(path)
    doc = {"registration": None if registration is None else registration.to_dict(),
           "cycles": [{"input": p, **one.to_dict()}
                      for p, one in zip(cycles.paths, cycles.alignments, strict=True)]}
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
    picture = out.with_suffix(".png")
    cycle_picture(cycles.layouts[0], cycles.alignments[1:], max_size=max_size).save(picture)
    return out, picture


def _silent(line: str) -> None:
    """Message sink that ignores everything."""

