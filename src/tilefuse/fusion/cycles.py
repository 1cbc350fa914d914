"""Several cycles of one slide fused into one image: every channel of every cycle, on one grid.

In cyclic imaging (CyCIF, CODEX, IBEX) the same slide is imaged in rounds, a few markers each.
Once every later cycle is placed in cycle 1's mosaic frame (:func:`tilefuse.registration.cycles.
align_cycle`), each cycle is planned on cycle 1's output grid and their channel axes are
concatenated, lazily: the image holds cycle 1's channels, then cycle 2's, and so on, named
``"DAPI (cycle 1)"``... unless names are given.

>>> from tilefuse.testing import cycle_tilesets
>>> cs = cycle_tilesets(n_cycles=2, grid=(2, 2), tile_shape=(64, 64), seed=0)
>>> mosaic = fuse_cycles(cs.layouts, chunk=64)  # at their stage positions, for the example
>>> mosaic.axes, mosaic.channel_names
(('c', 'y', 'x'), ('DAPI (cycle 1)', 'CD3 (cycle 1)', 'DAPI (cycle 2)', 'CD8 (cycle 2)'))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tilefuse.errors import InputError
from tilefuse.fusion.graph import FusionPlan, fuse, plan_fusion
from tilefuse.model.layout import Layout
from tilefuse.model.mosaic import Mosaic
from tilefuse.model.timeseries import TimeSeries
from tilefuse.plan.geometry import output_box

__all__ = ["PIXEL_SIZE_TOLERANCE", "check_cycles", "cycle_channel_names", "fuse_cycles",
           "plan_cycles", "plan_like"]

PIXEL_SIZE_TOLERANCE = 0.01
"""Largest relative difference of a cycle's pixel size from cycle 1's (1%)."""


def _name(names: Sequence[str] | None, k: int) -> str:
    """How messages call cycle ``k`` (0-based): its input when known."""
    return f"cycle {k + 1} ({names[k]})" if names else f"cycle {k + 1}"


def check_cycles(layouts: Sequence[Layout | TimeSeries],
                 names: Sequence[str] | None = None) -> None:
    """Refuse cycles that cannot share one image: a time series or 3D cycle, a dtype or pixel
    size (more than 1%) other than cycle 1's.

    Parameters
    ----------
    layouts : sequence of Layout
        One per cycle, cycle 1 first.
    names : sequence of str, optional
        What each cycle was read from, for the messages.

    Raises
    ------
    InputError
        Naming the cycle, its input and what differs.
    """
    if len(layouts) < 1:
        raise InputError("no cycles to fuse")
    for k, layout in enumerate(layouts):
        if isinstance(layout, TimeSeries):
            raise InputError(f"{_name(names, k)} is a time series; cycles are 2D acquisitions "
                             "of one time point each")
        if layout.ndim != 2:
            raise InputError(f"{_name(names, k)} is 3D (z-stacks); cycles are aligned and fused "
                             "in 2D only")
    first = layouts[0]
    assert isinstance(first, Layout)
    for k, layout in enumerate(layouts[1:], start=1):
        assert isinstance(layout, Layout)
        if layout.dtype != first.dtype:
            raise InputError(f"{_name(names, k)} has dtype {layout.dtype}, cycle 1 has "
                             f"{first.dtype}; cycles must share one dtype")
        size, ref = np.asarray(layout.pixel_size), np.asarray(first.pixel_size)
        if layout.unit != first.unit or np.any(np.abs(size / ref - 1) > PIXEL_SIZE_TOLERANCE):
            raise InputError(
                f"{_name(names, k)} has pixel size {_size(layout)}, cycle 1 has {_size(first)} "
                f"(more than {PIXEL_SIZE_TOLERANCE:.0%} apart); cycles must be imaged at one "
                "magnification (or give --pixel-size)")


def _size(layout: Layout) -> str:
    return f"{' x '.join(f'{s:g}' for s in layout.pixel_size)} {layout.unit}"


def cycle_channel_names(layouts: Sequence[Layout],
                        names: Sequence[str] | None = None) -> tuple[str, ...]:
    """The output's channel names: `names` (one per channel of every cycle, in cycle order), or
    ``"<channel> (cycle N)"``.

    Raises
    ------
    InputError
        `names` does not give exactly one name per output channel.
    """
    total = sum(len(layout.channels) for layout in layouts)
    if names:
        if len(names) != total:
            per = " + ".join(str(len(layout.channels)) for layout in layouts)
            raise InputError(f"--channel-names gives {len(names)} names for {total} output "
                             f"channels ({per} over {len(layouts)} cycles); give one per channel")
        return tuple(str(n) for n in names)
    return tuple(f"{channel} (cycle {k})" for k, layout in enumerate(layouts, start=1)
                 for channel in layout.channels)


def plan_cycles(layouts: Sequence[Layout], **plan_options: Any) -> tuple[FusionPlan, ...]:
    """One plan per cycle, all on cycle 1's output grid (``box`` of :func:`plan_fusion`).

    Parameters
    ----------
    layouts : sequence of Layout
        One per cycle, each in cycle 1's mosaic frame, cycle 1 first.
    **plan_options
        As in :func:`tilefuse.plan_fusion`, but ``box`` (default: cycle 1's output box) and
        ``blend_width`` (default: cycle 1's) are the same for every cycle; the kernel
        (``backend``, default ``auto``) is chosen per cycle, so a turned cycle takes the
        compiled affine kernel even where cycle 1's translations take numpy.

    Returns
    -------
    tuple of FusionPlan
        Equal output grids (origin, shape, chunk shape) and blend widths.
    """
    check_cycles(layouts)
    box = plan_options.pop("box", None)
    if box is None:
        origin, shape = output_box(layouts[0])
        box = (tuple(int(v) for v in origin), shape)
    first = plan_fusion(layouts[0], box=box, **plan_options)
    backend = plan_options.get("backend", "auto")
    return (first, *(plan_like(first, layout, backend=backend) for layout in layouts[1:]))


def plan_like(first: FusionPlan, layout: Layout, *, backend: str = "auto") -> FusionPlan:
    """`layout` planned as `first` (cycle 1's plan) is: its output grid and chunk, blend and
    blend widths, dtype, fill and tile cache; the kernel `backend` (as asked, not as `first`
    resolved it) is chosen for `layout` itself.
    """
    origin, shape = first.chunks.origin, first.chunks.shape
    return plan_fusion(layout, chunk=first.chunks.chunk_shape, blend=first.blend,
                       blend_width=first.widths, dtype=first.dtype, fill=first.fill,
                       cache_bytes=first.cache_bytes, backend=backend,
                       box=(tuple(int(v) for v in origin), shape))


def fuse_cycles(layouts: Sequence[Layout] | Sequence[FusionPlan], *,
                channel_names: Sequence[str] | None = None, **plan_options: Any) -> Mosaic:
    """The cycles fused into one lazy image holding every channel of every cycle.

    Parameters
    ----------
    layouts : sequence of Layout, or of FusionPlan
        One per cycle, cycle 1 first, each in cycle 1's mosaic frame (tiles of later cycles
        placed by :func:`tilefuse.registration.cycles.align_cycle`); or their plans made by
        :func:`plan_cycles` (which hold the options).
    channel_names : sequence of str, optional
        One per output channel; default ``"<channel> (cycle N)"``.
    **plan_options
        As in :func:`tilefuse.plan_fusion`, for layouts.

    Returns
    -------
    Mosaic
        ``data`` of shape ``(c, y, x)``, ``c`` the channels of every cycle in cycle order, on
        cycle 1's output grid (area no cycle covers is the fill value); cycle 1's pixel size,
        unit and origin. Nothing is read until it is computed or written.

    Raises
    ------
    InputError
        As :func:`check_cycles`, :func:`cycle_channel_names` and :func:`tilefuse.plan_fusion`.
    """
    import dask.array as da

    if all(isinstance(one, FusionPlan) for one in layouts):
        if plan_options:
            raise InputError(f"options {sorted(plan_options)} go to plan_cycles, not with plans")
        plans = tuple(one for one in layouts if isinstance(one, FusionPlan))
        grids = {(tuple(p.chunks.origin), p.chunks.shape, p.chunks.chunk_shape) for p in plans}
        if len(grids) != 1:
            raise InputError(f"cycles planned on different output grids {sorted(grids)}; plan "
                             "them together: plan_cycles(layouts)")
        check_cycles([p.layout for p in plans])
    else:
        plans = plan_cycles([one for one in layouts if isinstance(one, Layout)], **plan_options)
    if len(plans) != len(layouts):
        raise InputError("fuse_cycles takes Layouts or FusionPlans, not a mix")
    parts = []
    for plan in plans:
        data = fuse(plan).data
        parts.append(data[None] if plan.n_channels == 1 else data)
    first = plans[0]
    names = cycle_channel_names([p.layout for p in plans], channel_names)
    return Mosaic(da.concatenate(parts, axis=0), ("c", "y", "x"),
                  pixel_size=tuple(first.layout.pixel_size), unit=first.layout.unit,
                  channel_names=names, origin=tuple(float(v) for v in first.chunks.origin))
