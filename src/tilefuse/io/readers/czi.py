"""Zeiss CZI mosaics: tiles (``M``) with their planes (``Z``), channels (``C``), time points
(``T``), one scene (``S``) at a time.

Read with the ``czifile`` package; only the subblock directory and the metadata are read here,
pixels are decoded at fusion time by :class:`CziSource` (file path + subblock offsets). Each tile
is one mosaic index ``M`` of the chosen scene: a ``(y, x)`` tile, or ``(z, y, x)`` when the
scene has several planes (z step from ``Metadata/Scaling/Items/Distance[@Id="Z"]``); channels
are the tile's channels; several time points make a
:class:`~tilefuse.model.timeseries.TimeSeries` (positions shared: a tile is the same field of
view at every time point).

Positions come from each tile's subblock metadata ``StageXPosition``/``StageYPosition`` (µm),
divided by the pixel size from ``Metadata/Scaling/Items/Distance[@Id="X"|"Y"]/Value``
(metres). Tiles whose subblocks carry no stage position are placed by their subblock start
coordinates (pixels of ZEN's own mosaic), shifted to agree with the stage-placed tiles, and a
warning names them; without a scaling every tile is placed that way.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tilefuse.errors import InputError
from tilefuse.io.readers._czi_blocks import (
    Block,
    Grouped,
    channel_names,
    directory,
    group,
    open_czi,
    read_xml,
    scaling_um,
    scene_names,
    scenes_of,
    select_scene,
)
from tilefuse.io.readers.ometiff import stage_to_pixels
from tilefuse.model.layout import Layout, PixelSize, Tile, translation_affine
from tilefuse.model.timeseries import TimeSeries

__all__ = ["CZI_SOURCE", "CziSource", "czi_scenes", "read_czi"]

log = logging.getLogger(__name__)

CZI_SOURCE = "CZI metadata"
"""``PixelSize.source`` of a pixel size read from a CZI's ``Metadata/Scaling``."""


@dataclass(frozen=True, slots=True)
class CziSource:
    """One CZI tile at one time point: its full-resolution subblocks.

    Attributes
    ----------
    path : str
        The CZI file.
    subblocks : tuple of int
        File offsets of the tile's subblock segments, channel-major then plane order
        (``len(channels) * planes`` of them).
    series : int
        The tile's index among the scene's tiles (``M`` order), as a TileConfiguration with
        ``multiseries = true`` names it.
    depth : int
        Z planes per channel: 1 reads ``(c, y, x)``, more read ``(c, z, y, x)``.
    """

    path: str
    subblocks: tuple[int, ...]
    series: int = 0
    depth: int = 1

    @property
    def paths(self) -> tuple[str, ...]:
        """The file holding the tile (for writing layouts)."""
        return (self.path,)

    @property
    def key(self) -> tuple:
        return ("czi", self.path, self.subblocks)

    def read(self) -> np.ndarray:
        """Decode only this tile's subblocks, shape ``(c, y, x)`` or ``(c, z, y, x)``; opens and
        closes the file."""
        return self._decode(self.subblocks, self.depth)

    def read_planes(self, start: int, stop: int) -> np.ndarray | None:
        """Decode only planes ``start:stop`` of a z-stack (their subblocks), shape
        ``(c, stop - start, y, x)``; None for a 2D tile."""
        if self.depth == 1:
            return None
        chosen = tuple(offset for first in range(0, len(self.subblocks), self.depth)
                       for offset in self.subblocks[first + start:first + stop])
        return self._decode(chosen, stop - start)

    def _decode(self, subblocks: tuple[int, ...], depth: int) -> np.ndarray:
        """The subblocks at ``subblocks`` (channel-major, ``depth`` planes a channel)."""
        import czifile
        from tifffile import FileHandle

        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"CZI file not found: {self.path}")
        parts = []
        try:
            with FileHandle(self.path) as fh:
                for offset in subblocks:
                    segment = czifile.Segment(fh, offset).data()
                    if not isinstance(segment, czifile.SubBlockSegment):
                        raise InputError(f"{self.path}: no subblock at byte {offset}; "
                                         "the file changed since it was read, read it again")
                    parts.append(_to_cyx(segment.data(), segment.directory_entry.axes))
        except (InputError, FileNotFoundError):
            raise
        except Exception as exc:
            raise InputError(f"{self.path}: cannot decode CZI subblock ({exc})") from exc
        if self.depth == 1:
            return np.concatenate(parts, axis=0)
        stacks = [np.stack(parts[i : i + depth], axis=1)  # (samples, z, y, x)
                  for i in range(0, len(parts), depth)]
        return np.concatenate(stacks, axis=0)


def _to_cyx(data: np.ndarray, axes: str) -> np.ndarray:
    """A subblock array (czifile axes, ``0`` = samples) as ``(samples, y, x)``."""
    yx = [axes.index("Y"), axes.index("X"), axes.index("0")]
    data = np.moveaxis(data, yx, [-3, -2, -1])
    data = data.reshape(data.shape[-3:])
    return np.moveaxis(data, -1, 0)


def czi_scenes(path: str | os.PathLike) -> dict[int, str]:
    """The scenes of a CZI file: index ``S`` -> a distinct, file-name-safe name.

    The name is ZEN's scene name (characters other than letters, digits, ``._-`` replaced by
    ``_``) when the metadata gives one, else ``S<index>``. A file without scenes has ``{0: "S0"}``.

    Raises
    ------
    InputError
        Not a CZI, or no image subblocks.
    FileNotFoundError
        The file does not exist.
    """
    path = str(path)
    blocks, root = _contents(path)
    return scene_names(root, scenes_of(blocks))


def _contents(path: str) -> tuple[list[Block], ET.Element | None]:
    """The subblock directory and the metadata XML of the CZI at `path` (no pixels read)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CZI file not found: {path}")
    with open_czi(path) as czi:
        blocks, root = directory(czi, path), read_xml(czi, path)
    if not blocks:
        raise InputError(f"{path}: no image subblocks found")
    return blocks, root


def read_czi(
    path: str | os.PathLike,
    *,
    flip_x: bool = False,
    flip_y: bool = False,
    swap_xy: bool = False,
    scene: int | str | None = None,
) -> Layout | TimeSeries:
    """Read one scene of a Zeiss CZI mosaic: tiles from ``M``, planes ``Z``, channels ``C``.

    Parameters
    ----------
    path : path
        The ``.czi`` file.
    flip_x, flip_y, swap_xy : bool
        Applied to the stage axes before conversion to pixels (see
        :func:`~tilefuse.io.readers.ometiff.stage_to_pixels`); ignored by the start-coordinate
        fallback, which is already in image axes.
    scene : int, optional
        Which scene (``S``) to read; required when the file holds several (see
        :func:`czi_scenes`). ``"all"`` is refused here: every scene is its own layout (the
        command line's ``--scene all`` makes one run per scene).

    Returns
    -------
    Layout or TimeSeries
        Tiles ``(y, x)``, or ``(z, y, x)`` when the scene has several planes, read by
        :class:`CziSource` as ``(c, *shape)``; ``pixel_size`` in µm (zyx); ``metadata`` with
        the reader, scene, position source, stage positions (µm). A TimeSeries (one layout per
        ``T``, names the ``T`` indices, positions shared) when the scene has several time points.

    Raises
    ------
    InputError
        Not a CZI, several scenes and no ``scene``, dimensions other than ``XYZTCMS``, tiles
        missing planes, channels or time points.
    FileNotFoundError
        The file does not exist.
    """
    path = str(path)
    if scene is not None and not isinstance(scene, int):
        raise InputError(f"{path}: scene {scene!r}: read one scene (an index, see czi_scenes) at "
                         "a time; --scene all fuses each into its own output")
    blocks, root = _contents(path)
    grouped = group(select_scene(blocks, scene, path), path)
    firsts = [grouped.first(m) for m in grouped.mosaic]
    scaling = scaling_um(root)
    positions, metadata = _positions(path, firsts, scaling,
                                     {"flip_x": flip_x, "flip_y": flip_y, "swap_xy": swap_xy})
    stack = len(grouped.planes) > 1
    if stack:
        positions = np.column_stack([np.zeros(len(positions)), positions])
    pixel = _pixel_size(root, scaling, stack)
    metadata = {"reader": "czi", "scene": scene, "mosaic_indices": grouped.mosaic, **metadata}
    if scaling is not None:
        metadata["pixel_size_um"] = [scaling[1], scaling[0]]
    names = tuple(channel_names(root, grouped.channels, firsts[0].samples))

    def layout_at(t: int) -> Layout:
        tiles = []
        for series, (m, first, pos) in enumerate(
                zip(grouped.mosaic, firsts, positions, strict=True)):
            shape = (len(grouped.planes), *first.shape) if stack else first.shape
            source = CziSource(path, grouped.offsets(m, t), series, len(grouped.planes))
            tiles.append(Tile(_tile_name(path, m, t, grouped), shape, translation_affine(pos),
                              source))
        return Layout(tuple(tiles), firsts[0].dtype, names, pixel, "micrometer", origin=path,
                      metadata=dict(metadata, timepoint=t) if len(grouped.times) > 1
                      else metadata)

    if len(grouped.times) == 1:
        return layout_at(grouped.times[0])
    return TimeSeries(tuple(layout_at(t) for t in grouped.times),
                      tuple(str(t) for t in grouped.times), shared=True)


def _tile_name(path: str, m: int, t: int, grouped: Grouped) -> str:
    return f"{Path(path).name} M={m}" + (f" T={t}" if len(grouped.times) > 1 else "")


def _pixel_size(root, scaling: tuple[float, ...] | None, stack: bool) -> PixelSize | None:
    """Zyx pixel size in µm from the scaling, z from ``Distance Z`` (else z = y, said so)."""
    if scaling is None:
        return None
    x, y = scaling
    if not stack:
        return PixelSize((y, x), CZI_SOURCE)
    z = scaling_um(root, "Z")
    if z is None:
        return PixelSize((y, y, x), f"{CZI_SOURCE}; z spacing not stated, taken equal to y")
    return PixelSize((z[0], y, x), CZI_SOURCE)


def _stage_um(path: str, offsets: list[int]) -> list[tuple[float, float] | None]:
    """StageXPosition/StageYPosition (µm) of each subblock; None where one is unreadable."""
    import czifile
    from tifffile import FileHandle

    out: list[tuple[float, float] | None] = []
    with FileHandle(path) as fh:
        for offset in offsets:
            try:
                tags = czifile.Segment(fh, offset).data().metadata()["Tags"]
                xy = (float(tags["StageXPosition"]), float(tags["StageYPosition"]))
            except Exception:  # missing tags, unparsable XML, old czifile
                out.append(None)
                continue
            out.append(xy if np.all(np.isfinite(xy)) else None)
    return out


def _positions(
    path: str, firsts: list[Block], scaling: tuple[float, ...] | None, flips: dict
) -> tuple[np.ndarray, dict]:
    """Tile positions (n, 2) in pixels, yx, and what they were made from."""
    stage = _stage_um(path, [b.offset for b in firsts])
    starts = np.array([[b.dims.get("Y", 0), b.dims.get("X", 0)] for b in firsts], float)
    have = np.array([s is not None for s in stage])
    names = [f"M={b.dims.get('M', 0)}" for b in firsts]
    if not have.any() or scaling is None:
        why = ("no subblock states one" if not have.any() else
               "no pixel size (Metadata/Scaling) to convert them")
        log.warning("%s: stage positions unavailable (%s); tiles %s placed by their subblock "
                    "start coordinates", path, why, _listed(names))
        return starts - starts.min(axis=0), {"positions_from": "subblock start"}
    known = np.array([s for s in stage if s is not None])
    px = np.empty_like(starts)
    px[have] = stage_to_pixels(known, (scaling[0], scaling[1]), **flips)
    meta: dict[str, object] = {"positions_from": "stage", **flips}
    if not have.all():
        # subblock starts and stage pixels differ by one offset (ZEN's mosaic origin)
        offset = np.median(px[have] - starts[have], axis=0)
        px[~have] = starts[~have] + offset
        missing = [name for name, ok in zip(names, have, strict=True) if not ok]
        log.warning("%s: tiles %s have no stage position; placed by their subblock start "
                    "coordinates", path, _listed(missing))
        meta["positions_from"] = "stage and subblock start"
        meta["placed_by_subblock_start"] = missing
    meta["stage_positions_um"] = [list(s) if s is not None else None for s in stage]
    return px - px.min(axis=0), meta


def _listed(names: list[str], most: int = 12) -> str:
    """``a, b, c`` (the first `most`, then how many more)."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more
