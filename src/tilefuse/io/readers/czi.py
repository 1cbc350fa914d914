"""Zeiss CZI mosaics: one tile per mosaic index ``M``, placed by the stage.

Read with the ``czifile`` package. Each tile is one subblock per channel (``C``) at full
resolution (pyramid subblocks are ignored). Positions come from each tile's subblock metadata
``StageXPosition``/``StageYPosition`` (µm), divided by the pixel size from the file's
``Metadata/Scaling/Items/Distance[@Id="X"|"Y"]/Value`` (metres). When a tile's stage position
or the scaling cannot be read, all tiles fall back to the subblock start coordinates (pixels of
ZEN's own mosaic) and the fallback is logged.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tilefuse.errors import InputError
from tilefuse.io.readers.ometiff import stage_to_pixels
from tilefuse.model.layout import Layout, PixelSize, Tile, translation_affine

__all__ = ["CziSource", "read_czi"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CziSource:
    """One CZI tile: one full-resolution subblock per channel.

    Attributes
    ----------
    path : str
        The CZI file.
    subblocks : tuple of int
        File offsets of the tile's subblock segments, one per channel, in channel order.
    series : int
        The tile's index among the file's tiles (``M`` order), as a TileConfiguration with
        ``multiseries = true`` names it.
    """

    path: str
    subblocks: tuple[int, ...]
    series: int = 0

    @property
    def paths(self) -> tuple[str, ...]:
        """The file holding the tile (for writing layouts)."""
        return (self.path,)

    @property
    def key(self) -> tuple:
        return ("czi", self.path, self.subblocks)

    def read(self) -> np.ndarray:
        """Decode only this tile's subblocks, shape ``(c, y, x)``; opens and closes the file."""
        import czifile
        from tifffile import FileHandle

        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"CZI file not found: {self.path}")
        parts = []
        try:
            with FileHandle(self.path) as fh:
                for offset in self.subblocks:
                    segment = czifile.Segment(fh, offset).data()
                    if not isinstance(segment, czifile.SubBlockSegment):
                        raise InputError(f"{self.path}: no subblock at byte {offset}; "
                                         "the file changed since it was read, read it again")
                    parts.append(_to_cyx(segment.data(), segment.directory_entry.axes))
        except (InputError, FileNotFoundError):
            raise
        except Exception as exc:
            raise InputError(f"{self.path}: cannot decode CZI subblock ({exc})") from exc
        return np.concatenate(parts, axis=0)


def _to_cyx(data: np.ndarray, axes: str) -> np.ndarray:
    """A subblock array (czifile axes, ``0`` = samples) as ``(samples, y, x)``."""
    yx = [axes.index("Y"), axes.index("X"), axes.index("0")]
    data = np.moveaxis(data, yx, [-3, -2, -1])
    data = data.reshape(data.shape[-3:])
    return np.moveaxis(data, -1, 0)


@dataclass(frozen=True, slots=True)
class _Block:
    """A full-resolution subblock: its directory entry's facts, without the file handle."""

    offset: int
    dims: dict
    shape: tuple[int, int]
    samples: int
    dtype: np.dtype


def _blocks(czi) -> list[_Block]:
    out = []
    for entry in czi.subblock_directory:
        if entry.pyramid_type != 0 or tuple(entry.shape) != tuple(entry.stored_shape):
            continue  # a lower-resolution copy
        dims = {d.dimension: d for d in entry.dimension_entries}
        shape = (dims["Y"].size, dims["X"].size)
        samples = entry.shape[entry.axes.index("0")] if "0" in entry.axes else 1
        out.append(_Block(entry.file_position, {k: d.start for k, d in dims.items()},
                          shape, samples, np.dtype(entry.dtype)))
    return out


def _scene(blocks: list[_Block], scene: int | None, path: str) -> list[_Block]:
    scenes = sorted({b.dims.get("S", 0) for b in blocks})
    if scene is None:
        if len(scenes) > 1:
            raise InputError(f"{path}: holds scenes {scenes}; choose one with scene=N (--scene)")
        return blocks
    if scene not in scenes:
        raise InputError(f"{path}: has no scene {scene}; its scenes are {scenes}")
    return [b for b in blocks if b.dims.get("S", 0) == scene]


def _group(blocks: list[_Block], path: str) -> tuple[list[int], dict[int, dict[int, _Block]]]:
    """Subblocks per mosaic index and channel, refusing planes (Z, T...) we cannot place."""
    tiles: dict[int, dict[int, _Block]] = {}
    for b in blocks:
        extra = {k: v for k, v in b.dims.items() if k not in "XYCMS" and v != 0}
        if extra:
            raise InputError(
                f"{path}: subblocks along {', '.join(sorted(extra))} (z-stacks, time points, "
                "phases...) are not supported yet; export one plane or the tiles as OME-TIFF"
            )
        m, c = b.dims.get("M", 0), b.dims.get("C", 0)
        if c in tiles.setdefault(m, {}):
            raise InputError(f"{path}: two subblocks for tile M={m}, channel C={c}")
        tiles[m][c] = b
    channels = sorted({c for t in tiles.values() for c in t})
    for m, t in sorted(tiles.items()):
        if sorted(t) != channels:
            raise InputError(f"{path}: tile M={m} has channels {sorted(t)}, expected {channels}")
    return channels, tiles


def _xml(czi, path: str) -> ET.Element | None:
    try:
        return ET.fromstring(czi.metadata())
    except Exception as exc:  # czifile and XML raise anything on odd files
        log.warning("%s: cannot read the CZI metadata (%s)", path, exc)
        return None


def _scaling_um(root: ET.Element | None) -> tuple[float, float] | None:
    """Pixel size (x, y) in µm from ``Metadata/Scaling/Items/Distance``, or None."""
    if root is None:
        return None
    sizes = []
    for axis in "XY":
        text = root.findtext(f".//Metadata/Scaling/Items/Distance[@Id='{axis}']/Value")
        if text is None:
            return None
        try:
            value = float(text) * 1e6
        except (TypeError, ValueError):
            return None
        if not (np.isfinite(value) and value > 0):
            return None
        sizes.append(value)
    return sizes[0], sizes[1]


def _channel_names(root: ET.Element | None, channels: list[int], samples: int) -> list[str]:
    if samples == 3 and len(channels) == 1:
        return ["R", "G", "B"]
    if samples != 1:
        return [f"{c}.{s}" for c in channels for s in range(samples)]
    names = []
    if root is not None:
        found = root.findall(".//Metadata/Information/Image/Dimensions/Channels/Channel")
        names = [ch.get("Name") or "" for ch in found]
    if len(names) == len(channels) and all(names) and len(set(names)) == len(names):
        return names
    return [str(c) for c in channels]


def _stage_um(path: str, offsets: list[int]) -> np.ndarray | None:
    """StageXPosition/StageYPosition (µm) of each subblock, or None if any is unreadable."""
    import czifile
    from tifffile import FileHandle

    out = []
    try:
        with FileHandle(path) as fh:
            for offset in offsets:
                tags = czifile.Segment(fh, offset).data().metadata()["Tags"]
                out.append([float(tags["StageXPosition"]), float(tags["StageYPosition"])])
    except Exception as exc:  # missing tags, unparsable XML, old czifile
        log.warning("%s: stage positions unavailable (%s); using subblock start coordinates",
                    path, exc)
        return None
    stage = np.asarray(out)
    return stage if np.all(np.isfinite(stage)) else None


def _open(path: str):
    import czifile

    try:
        return czifile.CziFile(path)
    except Exception as exc:
        raise InputError(f"{path}: cannot read as CZI ({exc})") from exc


def read_czi(
    path: str | os.PathLike,
    *,
    flip_x: bool = False,
    flip_y: bool = False,
    swap_xy: bool = False,
    scene: int | None = None,
) -> Layout:
    """Read a Zeiss CZI mosaic: one tile per mosaic index ``M``, channels from ``C``.

    Parameters
    ----------
    path : path
        The ``.czi`` file.
    flip_x, flip_y, swap_xy : bool
        Applied to the stage axes before conversion to pixels (see
        :func:`~tilefuse.io.readers.ometiff.stage_to_pixels`); ignored by the start-coordinate
        fallback, which is already in image axes.
    scene : int, optional
        Which scene (``S``) to read; required when the file holds several.

    Returns
    -------
    Layout
        2D tiles ``(y, x)`` read by :class:`CziSource` as ``(c, y, x)``; ``pixel_size`` in µm;
        ``metadata`` with the reader, the position source, stage positions (µm), pixel size.

    Raises
    ------
    InputError
        Not a CZI, several scenes and no ``scene``, z-stacks/time series, tiles missing channels.
    FileNotFoundError
        The file does not exist.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CZI file not found: {path}")
    with _open(path) as czi:
        blocks, root = _blocks(czi), _xml(czi, path)
    if not blocks:
        raise InputError(f"{path}: no image subblocks found")
    channels, tiles = _group(_scene(blocks, scene, path), path)
    order = sorted(tiles)
    firsts = [tiles[m][channels[0]] for m in order]
    _check_same(firsts, path)
    positions, metadata = _positions(path, firsts, _scaling_um(root),
                                     {"flip_x": flip_x, "flip_y": flip_y, "swap_xy": swap_xy})
    tile_list = [
        Tile(f"{Path(path).name} M={m}", first.shape, translation_affine(pos),
             CziSource(path, tuple(tiles[m][c].offset for c in channels), series))
        for series, (m, first, pos) in enumerate(zip(order, firsts, positions, strict=True))
    ]
    pixel = metadata.get("pixel_size_um")
    return Layout(tuple(tile_list), firsts[0].dtype,
                  tuple(_channel_names(root, channels, firsts[0].samples)),
                  PixelSize(pixel, "CZI metadata") if pixel else None, "micrometer", origin=path,
                  metadata={"reader": "czi", "scene": scene, "mosaic_indices": order,
                            **metadata})


def _check_same(firsts: list[_Block], path: str) -> None:
    kinds = {(b.dtype, b.samples) for b in firsts}
    if len(kinds) > 1:
        raise InputError(f"{path}: tiles differ in pixel type {sorted(map(str, kinds))}")


def _positions(
    path: str, firsts: list[_Block], scaling: tuple[float, float] | None, flips: dict
) -> tuple[np.ndarray, dict]:
    """Tile positions (n, 2) in pixels, yx, and what they were made from."""
    stage = _stage_um(path, [b.offset for b in firsts])
    if stage is not None and scaling is not None:
        px = stage_to_pixels(stage, scaling, **flips)
        return px, {"positions_from": "stage", "stage_positions_um": stage.tolist(),
                    "pixel_size_um": [scaling[1], scaling[0]], **flips}
    if stage is not None:
        log.warning("%s: no pixel size (Metadata/Scaling) to convert stage positions; "
                    "using subblock start coordinates", path)
    starts = np.array([[b.dims.get("Y", 0), b.dims.get("X", 0)] for b in firsts], float)
    meta: dict[str, object] = {"positions_from": "subblock start"}
    if scaling is not None:
        meta["pixel_size_um"] = [scaling[1], scaling[0]]
    return starts - starts.min(axis=0), meta
