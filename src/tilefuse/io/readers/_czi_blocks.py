"""The subblock directory and XML metadata of a Zeiss CZI file, as plain facts.

No pixels are decoded here: :func:`directory` lists the full-resolution subblocks with their
dimension starts (``X Y Z T C M S``), :func:`group` arranges one scene's subblocks into tiles
(mosaic index ``M``) x time points (``T``) x channels (``C``) x planes (``Z``), and the XML
helpers read the scaling, channel names and scene names ZEN writes.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np

from tilefuse.errors import InputError

__all__ = ["Block", "Grouped", "channel_names", "directory", "group", "open_czi", "read_xml",
           "scaling_um", "scene_names", "select_scene"]

log = logging.getLogger(__name__)

_PLACED = "XYZTCMS"  # dimensions tilefuse places; any other (phase, rotation...) beyond 0 is not
_OTHER_DIMS = {"H": "phases", "R": "rotations", "I": "illuminations", "V": "views",
               "B": "blocks (acquisition)", "A": "angles"}


@dataclass(frozen=True, slots=True)
class Block:
    """A full-resolution subblock: its directory entry's facts, without the file handle."""

    offset: int
    dims: dict
    shape: tuple[int, int]
    samples: int
    dtype: np.dtype


@dataclass(frozen=True, slots=True)
class Grouped:
    """One scene's subblocks arranged as tiles x time points x channels x planes.

    Attributes
    ----------
    mosaic : list of int
        The tiles' mosaic indices ``M``, in order.
    times, channels, planes : list of int
        The ``T``, ``C`` and ``Z`` starts found, sorted.
    blocks : dict
        ``blocks[m][t][(c, z)]`` is the subblock of tile ``m`` at time ``t``, channel ``c``,
        plane ``z``; every tile has every combination.
    """

    mosaic: list[int]
    times: list[int]
    channels: list[int]
    planes: list[int]
    blocks: dict[int, dict[int, dict[tuple[int, int], Block]]]

    def first(self, m: int, t: int | None = None) -> Block:
        """The subblock of tile ``m`` at time ``t`` (default the first), first channel and plane."""
        return self.blocks[m][self.times[0] if t is None else t][
            (self.channels[0], self.planes[0])]

    def offsets(self, m: int, t: int) -> tuple[int, ...]:
        """File offsets of tile ``m`` at time ``t``, channel-major then plane order."""
        return tuple(self.blocks[m][t][(c, z)].offset for c in self.channels for z in self.planes)


def open_czi(path: str):
    """The file opened with czifile (a context manager), or InputError naming it."""
    import czifile

    try:
        return czifile.CziFile(path)
    except Exception as exc:
        raise InputError(f"{path}: cannot read as CZI ({exc})") from exc


def directory(czi, path: str) -> list[Block]:
    """The full-resolution subblocks of an open CZI (pyramid copies left out), each one plane."""
    out = []
    for entry in czi.subblock_directory:
        if entry.pyramid_type != 0 or tuple(entry.shape) != tuple(entry.stored_shape):
            continue  # a lower-resolution copy
        dims = {d.dimension: d for d in entry.dimension_entries}
        deep = sorted(k for k, d in dims.items() if k not in "XY" and d.size > 1)
        if deep:
            raise InputError(f"{path}: a subblock at byte {entry.file_position} spans "
                             f"{', '.join(f'{k}={dims[k].size}' for k in deep)}; tilefuse reads "
                             "subblocks of one plane each (as ZEN writes them)")
        shape = (dims["Y"].size, dims["X"].size)
        samples = entry.shape[entry.axes.index("0")] if "0" in entry.axes else 1
        out.append(Block(entry.file_position, {k: d.start for k, d in dims.items()},
                         shape, samples, np.dtype(entry.dtype)))
    return out


def scenes_of(blocks: list[Block]) -> list[int]:
    """The scene indices ``S`` the subblocks hold, sorted (``[0]`` for a file without S)."""
    return sorted({b.dims.get("S", 0) for b in blocks})


def select_scene(blocks: list[Block], scene: int | None, path: str) -> list[Block]:
    """The subblocks of ``scene``; all of them when the file holds one scene and none is asked."""
    scenes = scenes_of(blocks)
    if scene is None:
        if len(scenes) > 1:
            raise InputError(f"{path}: holds scenes {scenes}; choose one with scene=N "
                             "(--scene N), or fuse each with --scene all")
        return blocks
    if scene not in scenes:
        raise InputError(f"{path}: has no scene {scene}; its scenes are {scenes}")
    return [b for b in blocks if b.dims.get("S", 0) == scene]


def group(blocks: list[Block], path: str) -> Grouped:
    """Arrange one scene's subblocks, refusing what cannot be placed or is incomplete."""
    found: dict[int, dict[int, dict[tuple[int, int], Block]]] = {}
    for b in blocks:
        extra = {k: v for k, v in b.dims.items() if k not in _PLACED and v != 0}
        if extra:
            what = ", ".join(f"{k} ({_OTHER_DIMS.get(k, 'unknown')})" for k in sorted(extra))
            raise InputError(f"{path}: subblocks along {what} are not supported; tilefuse reads "
                             "tiles (M), planes (Z), time points (T), channels (C), scenes (S)")
        m, t = b.dims.get("M", 0), b.dims.get("T", 0)
        key = (b.dims.get("C", 0), b.dims.get("Z", 0))
        per_time = found.setdefault(m, {}).setdefault(t, {})
        if key in per_time:
            raise InputError(f"{path}: two subblocks for tile M={m}, T={t}, C={key[0]}, "
                             f"Z={key[1]}")
        per_time[key] = b
    times = sorted({t for tile in found.values() for t in tile})
    channels = sorted({c for tile in found.values() for p in tile.values() for c, _ in p})
    planes = sorted({z for tile in found.values() for p in tile.values() for _, z in p})
    want = {(c, z) for c in channels for z in planes}
    for m, tile in sorted(found.items()):
        for t in times:
            missing = sorted(want - set(tile.get(t, {})))
            if missing:
                shown = ", ".join(f"C={c} Z={z}" for c, z in missing[:4])
                more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
                raise InputError(f"{path}: tile M={m} at T={t} lacks {shown}{more}; every tile "
                                 f"needs channels {channels} x planes {planes} at every time")
    grouped = Grouped(sorted(found), times, channels, planes, found)
    shapes = {(b.shape, b.dtype, b.samples) for tile in found.values()
              for p in tile.values() for b in p.values()}
    _check_shapes(grouped, shapes, path)
    return grouped


def _check_shapes(grouped: Grouped, kinds: set, path: str) -> None:
    """One pixel type for all; one shape per tile across its planes, channels and times."""
    if len({(dtype, samples) for _, dtype, samples in kinds}) > 1:
        raise InputError(f"{path}: subblocks differ in pixel type "
                         f"{sorted({str(d) for _, d, _ in kinds})}")
    for m, tile in grouped.blocks.items():
        shapes = {b.shape for p in tile.values() for b in p.values()}
        if len(shapes) > 1:
            raise InputError(f"{path}: tile M={m} has planes of different sizes {sorted(shapes)}")


def read_xml(czi, path: str) -> ET.Element | None:
    """The file's metadata XML, or None (logged) when it cannot be read."""
    try:
        return ET.fromstring(czi.metadata())
    except Exception as exc:  # czifile and XML raise anything on odd files
        log.warning("%s: cannot read the CZI metadata (%s)", path, exc)
        return None


def scaling_um(root: ET.Element | None, axes: str = "XY") -> tuple[float, ...] | None:
    """Pixel size per axis of ``axes`` in µm from ``Metadata/Scaling/Items/Distance`` (metres),
    or None when one of them is missing or not a positive number."""
    if root is None:
        return None
    sizes = []
    for axis in axes:
        text = root.findtext(f".//Metadata/Scaling/Items/Distance[@Id='{axis}']/Value")
        try:
            value = float(text) * 1e6 if text is not None else float("nan")
        except (TypeError, ValueError):
            return None
        if not (np.isfinite(value) and value > 0):
            return None
        sizes.append(value)
    return tuple(sizes)


def channel_names(root: ET.Element | None, channels: list[int], samples: int) -> list[str]:
    """Names of the tiles' channels: the XML's when distinct, else the ``C`` indices."""
    if samples == 3 and len(channels) == 1:
        return ["R", "G", "B"]
    if samples != 1:
        return [f"{c}.{s}" for c in channels for s in range(samples)]
    names: list[str] = []
    if root is not None:
        found = root.findall(".//Metadata/Information/Image/Dimensions/Channels/Channel")
        names = [ch.get("Name") or "" for ch in found]
    if len(names) > max(channels, default=0):
        picked = [names[c] for c in channels]
        if all(picked) and len(set(picked)) == len(picked):
            return picked
    return [str(c) for c in channels]


def scene_names(root: ET.Element | None, scenes: list[int]) -> dict[int, str]:
    """A file-name-safe, distinct name per scene: ZEN's ``Scene Name`` when set, else ``S<i>``."""
    named: dict[int, str] = {}
    if root is not None:
        for el in root.findall(".//Metadata/Information/Image/Dimensions/S/Scenes/Scene"):
            try:
                index = int(el.get("Index", ""))
            except ValueError:
                continue
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", el.get("Name") or "").strip("._-")
            if name:
                named[index] = name
    out: dict[int, str] = {}
    for s in scenes:
        name = named.get(s, f"S{s}")
        out[s] = name if name not in out.values() else f"{name}_S{s}"
    return out
