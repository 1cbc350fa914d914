"""Time series: one tile set per time point, fused into one ``(t, [c,] [z,] y, x)`` image.

Design choice
-------------
Time sits *beside* the layout, not inside it: a :class:`TimeSeries` holds one ordinary
:class:`~tilefuse.model.layout.Layout` per time point. Everything that takes a layout (planning,
fusing, registering, previews, intensity correction) works on ``series.at_time(i)`` unchanged,
and nothing that walks ``layout.tiles`` can mix time points by mistake. Readers return a
``TimeSeries`` only when the input names time points (``{t}`` in a pattern, a ``t`` column in a
CSV layout); every other input stays a plain ``Layout``.

Tile identity across time: when positions are *shared* (``shared=True``; a pattern with ``{t}``
places every time point on the same grid, and a CSV whose time points list the same tiles at the
same positions in the same order), tile ``i`` is the same field of view at every time point, so a
correction found at one time point applies to tile ``i`` at all of them
(:meth:`TimeSeries.shifted_like`). Otherwise each time point has its own tiles and positions.

All time points share one output grid: the union of their mosaics' boxes
(:func:`tilefuse.plan.geometry.union_box`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from tilefuse.errors import InputError
from tilefuse.model.layout import Layout

__all__ = ["TimeSeries"]


def _shape_text(shape: Sequence[int]) -> str:
    return " x ".join(map(str, shape))


@dataclass(frozen=True, eq=False)
class TimeSeries:
    """Tile sets of the same acquisition at several time points.

    Attributes
    ----------
    layouts : tuple of Layout
        One per time point, in time order; same dimensionality, dtype, channels, pixel size.
    names : tuple of str
        Each time point's label as the input wrote it (``"003"`` from ``{t}``, a CSV ``t`` value).
    shared : bool
        Positions are shared: every layout lists the same fields of view in the same order,
        tile ``i`` with the same shape at every time point.

    Examples
    --------
    >>> from tilefuse.testing import grid_tileset
    >>> a, b = (grid_tileset(grid=(1, 2), tile_shape=(32, 32), seed=s).layout for s in (0, 1))
    >>> series = TimeSeries((a, b), ("0", "1"), shared=True)
    >>> len(series), series.at_time(1) is b
    (2, True)
    """

    layouts: tuple[Layout, ...]
    names: tuple[str, ...]
    shared: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "layouts", tuple(self.layouts))
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        if not self.layouts:
            raise InputError("a time series needs at least one time point")
        if len(self.names) != len(self.layouts) or len(set(self.names)) != len(self.names):
            raise InputError(f"time point names {self.names} must be distinct, one per layout")
        for name, layout in zip(self.names[1:], self.layouts[1:], strict=True):
            self._check_like_first(name, layout)
            if self.shared:
                self._check_same_tiles(name, layout)

    def _check_like_first(self, name: str, layout: Layout) -> None:
        """Refuse a time point whose pixels are not of the same kind as the first one's."""
        first, t0 = self.layouts[0], self.names[0]
        where = f"{first.origin}: " if first.origin else ""
        for what, a, b in (("dimensionality", f"{first.ndim}D", f"{layout.ndim}D"),
                           ("dtype", str(first.dtype), str(layout.dtype)),
                           ("channels", ", ".join(first.channels), ", ".join(layout.channels)),
                           ("pixel size", first.pixel_size, layout.pixel_size)):
            if a != b:
                raise InputError(
                    f"{where}time point {name} has {what} {b}, time point {t0} has {a}; every "
                    f"time point needs the same {what} (give each its own layout otherwise)"
                )
        if not self.shared and {t.shape for t in layout.tiles} != {
                t.shape for t in first.tiles}:
            raise InputError(
                f"{where}time point {name} has tiles of {sorted({t.shape for t in layout.tiles})},"
                f" time point {t0} of {sorted({t.shape for t in first.tiles})}; every time point "
                "needs the same tile shapes"
            )

    def _check_same_tiles(self, name: str, layout: Layout) -> None:
        """With shared positions, tile ``i`` must exist, with one shape, at every time point."""
        first, t0 = self.layouts[0], self.names[0]
        where = f"{first.origin}: " if first.origin else ""
        if len(layout.tiles) != len(first.tiles):
            raise InputError(
                f"{where}time point {name} has {len(layout.tiles)} tiles, time point {t0} has "
                f"{len(first.tiles)}; with shared positions every time point needs every tile"
            )
        for a, b in zip(first.tiles, layout.tiles, strict=True):
            if a.shape != b.shape:
                raise InputError(
                    f"{where}tile {b.name} (time point {name}) is {_shape_text(b.shape)}, but "
                    f"{a.name} (time point {t0}) is {_shape_text(a.shape)}; the same tile needs "
                    "the same shape at every time point"
                )

    def __len__(self) -> int:
        return len(self.layouts)

    @property
    def ndim(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return self.layouts[0].ndim

    @property
    def dtype(self) -> np.dtype:
        return self.layouts[0].dtype

    @property
    def channels(self) -> tuple[str, ...]:
        return self.layouts[0].channels

    @property
    def pixel_size(self) -> tuple[float, ...]:
        return self.layouts[0].pixel_size

    @property
    def pixel_size_source(self) -> str:
        """Where the pixel size came from (see :attr:`Layout.pixel_size_source`)."""
        return self.layouts[0].pixel_size_source

    @property
    def pixel_size_known(self) -> bool:
        """False when no file stated a pixel size and 1 per axis is a default."""
        return self.layouts[0].pixel_size_known

    @property
    def unit(self) -> str:
        return self.layouts[0].unit

    @property
    def origin(self) -> str | None:
        return self.layouts[0].origin

    @property
    def n_tiles(self) -> int:
        """Tiles over all time points."""
        return sum(len(layout.tiles) for layout in self.layouts)

    def at_time(self, index: int) -> Layout:
        """The layout of time point ``index`` (counted from 0, in time order)."""
        if not 0 <= int(index) < len(self.layouts):
            raise InputError(
                f"time point {index} does not exist: {self.origin or 'the series'} has "
                f"{len(self.layouts)} (--timepoint 0 to {len(self.layouts) - 1})"
            )
        return self.layouts[int(index)]

    def map(self, function: Callable[[Layout], Layout]) -> TimeSeries:
        """The series with ``function`` applied to every time point's layout."""
        return replace(self, layouts=tuple(function(layout) for layout in self.layouts))

    def shifted_like(self, before: Layout, after: Layout) -> TimeSeries:
        """Apply one time point's position corrections to the same tiles at every time point.

        Parameters
        ----------
        before, after : Layout
            A time point's layout before and after registration (same tiles, same order).

        Returns
        -------
        TimeSeries
            Each tile ``i`` of every time point moved by ``after``'s translation of tile ``i``
            minus ``before``'s; linear parts are kept.

        Raises
        ------
        InputError
            Positions are not shared, so tiles have no identity across time points.
        """
        if not self.shared:
            raise InputError("positions differ between time points: register each on its own")
        delta = after.positions - before.positions  # (n_tiles, ndim)

        def move(layout: Layout) -> Layout:
            return layout.with_positions(layout.positions + delta)

        return self.map(move)
