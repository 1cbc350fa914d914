"""Turn parsed layout entries (file, series, affine) into a checked :class:`Layout`.

Every reader ends here: headers are probed in parallel (no pixels decoded), and the tiles must agree
on dtype, dimensionality and channels before anything is fused.
"""

from __future__ import annotations

import glob
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from tilefuse.errors import InputError
from tilefuse.io.readers.calibration import stated_pixel_size
from tilefuse.io.readers.omezarr import is_zarr_array, layout_from_zarr_entries
from tilefuse.io.tiles import FileSource, PlaneStackSource, TileHeader, probe_tile
from tilefuse.model.layout import Layout, PixelSize, Tile, TileSource

__all__ = ["Entry", "find_planes", "layout_from_entries"]

Z_FIELD = "{z}"


@dataclass(frozen=True, slots=True)
class Entry:
    """One parsed layout line.

    Attributes
    ----------
    name : str
        As written in the layout (for messages and for writing the layout back).
    paths : tuple of str
        Resolved file paths: one file, or one per channel.
    affine : numpy.ndarray, shape (ndim + 1, ndim + 1)
        Tile index -> mosaic index, zyx order.
    series : int
    where : str
        ``file:line`` of the entry, for messages.
    planes : tuple of tuple of str, optional
        A z-stack stored one file per plane: ``planes[k]`` are plane ``k``'s files (one, or one
        per channel); ``paths`` then holds the ``{z}`` templates the layout writes.
    label : str, optional
        The tile's name when the layout file states one (tilefuse writes them); else the
        name is ``name`` (with ``#series`` for series other than 0).
    """

    name: str
    paths: tuple[str, ...]
    affine: np.ndarray
    series: int = 0
    where: str = ""
    planes: tuple[tuple[str, ...], ...] | None = None
    label: str | None = None


def find_planes(template: str, where: str) -> list[str]:
    """The files a path with ``{z}`` names, in plane order (by the number in place of ``{z}``).

    Raises
    ------
    FileNotFoundError
        No file matches the template.
    """
    parts = template.split(Z_FIELD)
    regex = re.compile(r"(?P<z>\d+)".join(re.escape(p) for p in parts[:2])
                       + "".join(r"(?P=z)" + re.escape(p) for p in parts[2:]))
    found = []
    for path in glob.glob("*".join(glob.escape(p) for p in parts)):
        m = regex.fullmatch(path)
        if m and os.path.isfile(path):
            found.append((int(m.group("z")), path))
    if not found:
        raise FileNotFoundError(f"{where}: no plane file matches {template}")
    return [path for _, path in sorted(found)]


def _expand_planes(e: Entry) -> Entry:
    """An entry naming ``{z}`` templates (a layout file written for plane stacks), globbed."""
    if e.planes is not None or not any(Z_FIELD in p for p in e.paths):
        return e
    per_file = [find_planes(p, e.where) for p in e.paths]
    if len({len(files) for files in per_file}) != 1:
        counts = ", ".join(f"{len(f)} for {p}" for f, p in zip(per_file, e.paths, strict=True))
        raise InputError(f"{e.where}: channel files of tile {e.name} have different plane "
                         f"counts ({counts})")
    return replace(e, planes=tuple(zip(*per_file, strict=True)))


def _files(e: Entry) -> tuple[str, ...]:
    """The files probed for an entry: its files, or those of its first plane."""
    return e.planes[0] if e.planes else e.paths


SLOW_PROBE_S = 0.002
"""Mean seconds per tile header from which the rest are read on :data:`PROBE_THREADS` threads.

Reading a header is Python work (the GIL) once the file is in the OS cache: 36 TIFF headers
took 10 ms on one thread and 16-19 ms on eight (thread starts, GIL hand-offs). Where storage
answers slowly (a network file system, a cold disk), threads overlap the waits."""

PROBE_THREADS = 8


def _probe_all(entries: Sequence[Entry]) -> list[TileHeader]:
    jobs = [(p, e.series) for e in entries for p in _files(e)]
    headers = _probe_headers(jobs)
    out, i = [], 0
    for e in entries:
        hs = headers[i : i + len(_files(e))]
        i += len(_files(e))
        if len(_files(e)) > 1:
            if any(h.shape != hs[0].shape or h.dtype != hs[0].dtype for h in hs):
                raise InputError(f"{e.where}: channel files of tile {e.name} differ in shape/dtype")
            hs = [TileHeader(hs[0].shape, hs[0].dtype, sum(h.n_channels for h in hs), False)]
        out.append(hs[0])
    return out


def _probe_headers(jobs: Sequence[tuple[str, int]]) -> list[TileHeader]:
    """:func:`probe_tile` of each ``(path, series)``, in order: one after the other while they
    are quick, the rest on threads once their mean passes :data:`SLOW_PROBE_S` (the first is
    not timed: it also pays for the reader's first use)."""
    headers = [probe_tile(*job) for job in jobs[:1]]
    started = time.perf_counter()
    for job in jobs[1:]:
        if time.perf_counter() - started > SLOW_PROBE_S * max(len(headers) - 1, 1):
            break
        headers.append(probe_tile(*job))
    if len(headers) < len(jobs):
        with ThreadPoolExecutor(max_workers=PROBE_THREADS) as pool:
            headers += pool.map(lambda job: probe_tile(*job), jobs[len(headers):])
    return headers


def _grey_rgb(path: str, series: int) -> bool:
    """True when the first tile stores grey as RGB (R = G = B)."""
    data = FileSource((path,), series).read()
    return all(np.array_equal(data[0], ch) for ch in data[1:3])


def layout_from_entries(
    entries: Sequence[Entry],
    *,
    ndim: int,
    origin: str,
    channel_names: Sequence[str] | None = None,
    pixel_size: PixelSize | Sequence[float] | None = None,
    unit: str = "micrometer",
) -> Layout:
    """Probe every tile and build a layout, refusing inconsistent tiles.

    Parameters
    ----------
    entries : sequence of Entry
    ndim : int
        Spatial dimensionality the layout declares (2 or 3).
    origin : str
        The layout's file or folder, for messages.
    channel_names : sequence of str, optional
        Names when each entry lists one file per channel.
    pixel_size : PixelSize or sequence of float, optional
        Zyx, in ``unit``. When None, what the first tile's file states
        (:func:`~tilefuse.io.readers.calibration.stated_pixel_size`, in micrometres), else the
        default of 1 (``layout.pixel_size_known`` is then False).
    unit : str
        Unit of a given ``pixel_size``.
    """
    if not entries:
        raise InputError(f"{origin}: the layout lists no tiles")
    if all(is_zarr_array(p) for e in entries for p in e.paths):  # OME-Zarr tiles, saved
        return layout_from_zarr_entries(entries, ndim=ndim, origin=origin, unit=unit,
                                        channel_names=channel_names, pixel_size=pixel_size)
    entries = [_expand_planes(e) for e in entries]
    names = [e.label or (e.name if e.series == 0 else f"{e.name}#{e.series}") for e in entries]
    seen: dict[str, str] = {}
    for name, e in zip(names, entries, strict=True):
        if name in seen:
            raise InputError(f"{e.where}: tile {name} is listed twice (first at {seen[name]})")
        seen[name] = e.where
    headers = _probe_all(entries)
    first = headers[0]
    for e, h in zip(entries, headers, strict=True):
        if h.dtype != first.dtype:
            raise InputError(
                f"{e.where}: tile {e.name} is {h.dtype}, but {entries[0].name} is {first.dtype}; "
                "all tiles must share one dtype"
            )
        if h.n_channels != first.n_channels:
            raise InputError(
                f"{e.where}: tile {e.name} has {h.n_channels} channels, "
                f"{entries[0].name} has {first.n_channels}"
            )
        if e.planes and len(h.shape) != 2:
            raise InputError(
                f"{e.where}: {_files(e)[0]} holds a z-stack {h.shape}; with {{z}} each file "
                "must hold one plane (drop {z} from the pattern to read stacks)"
            )
        if len(h.shape) > ndim:
            raise InputError(
                f"{e.where}: tile {e.name} is {len(h.shape)}D {h.shape} but the layout is "
                f"dim = {ndim}; set dim = {len(h.shape)} and give z positions"
            )
    same, keep = False, None
    n_channels = first.n_channels
    if first.rgb and _grey_rgb(_files(entries[0])[0], entries[0].series):
        same, keep, n_channels = True, (0,), 1
    if channel_names is None:
        channel_names = ["RGB"[i] if first.rgb else str(i) for i in range(n_channels)]
        if n_channels == 1:
            channel_names = ["0"]
    if len(channel_names) != n_channels:
        raise InputError(
            f"{origin}: {len(channel_names)} channel name(s) ({', '.join(channel_names)}) for "
            f"tiles of {n_channels} channel(s), e.g. {entries[0].name}")
    if pixel_size is None:
        pixel_size = stated_pixel_size(_files(entries[0])[0], ndim, entries[0].series)
        unit = "micrometer" if pixel_size is not None else unit
    tiles = []
    for name, e, h in zip(names, entries, headers, strict=True):
        source: TileSource
        if e.planes:
            shape = (len(e.planes), *h.shape)
            source = PlaneStackSource(e.planes, keep, same, e.paths)
        else:
            shape = h.shape if len(h.shape) == ndim else (1, *h.shape)
            source = FileSource(e.paths, e.series, keep, same)
        tiles.append(Tile(name, shape, e.affine, source))
    return Layout(
        tuple(tiles), first.dtype, tuple(channel_names), pixel_size, unit, origin=origin
    )
