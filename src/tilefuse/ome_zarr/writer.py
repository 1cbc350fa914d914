"""Writing a mosaic as an OME-Zarr image (NGFF 0.5 on zarr v3, or NGFF 0.4 on zarr v2).

Level 0 is the mosaic itself, stored with one zarr chunk per dask chunk. Each further level is a
2x mean downsample in y and x of the previous level *read back from the store*, so the fusion
graph runs once and every level costs one dask compute of chunk-sized tasks. The group metadata
that makes the folder an OME-Zarr image is written last: an interrupted run leaves a folder that
no reader mistakes for a finished image.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numcodecs
import numpy as np
import zarr
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from tilefuse import __version__
from tilefuse.errors import InputError
from tilefuse.io.outputs import (
    MANIFEST,
    MANIFEST_KEY,
    check_image_output,
    is_finished,
    read_manifest,
    remove_image,
)
from tilefuse.model.units import check_unit
from tilefuse.ome_zarr.chunkstore import ChunkFiles, remove_partial_files

__all__ = ["MANIFEST", "is_finished_image", "max_levels",
           "pyramid_shapes", "read_ome_zarr_level", "write_ome_zarr", "written_blocks"]

log = logging.getLogger(__name__)

_AXIS_ORDER = "tczyx"
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
_SPATIAL = ("z", "y", "x")
_VERSIONS = ("0.4", "0.5")
BATCH_CHUNKS = 8192  # chunks per dask compute when storing a level
# Green/magenta first: the pair stays distinguishable for colour-blind viewers.
_PALETTE = ("00FF00", "FF00FF", "00FFFF", "FFFF00", "FF0000", "0000FF", "FFFFFF")
_GREY = "FFFFFF"
_HEX = re.compile(r"^#?([0-9A-Fa-f]{6})$")
def max_levels(shape_yx: Sequence[int]) -> int:
    """The most pyramid levels an image of `shape_yx` can have: halving y and x until both
    are 1 pixel (more would repeat 1 x 1 levels, which viewers refuse)."""
    return 1 + max(math.ceil(math.log2(max(int(n), 1))) for n in shape_yx)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def pyramid_shapes(
    shape: Sequence[int],
    chunks_yx: Sequence[int],
    axes: Sequence[str],
    levels: int | None = None,
) -> list[tuple[int, ...]]:
    """Shapes of every pyramid level, full resolution first.

    Parameters
    ----------
    shape : sequence of int
        Level-0 shape, one entry per axis in `axes`.
    chunks_yx : (int, int)
        Chunk size along y and x.
    axes : sequence of str
        Axis names, e.g. ``("c", "z", "y", "x")``; must contain ``"y"`` and ``"x"``.
    levels : int, optional
        Number of levels including level 0. By default levels are added while y or x is larger
        than its chunk size, so the last level fits in one chunk in y and x.

    Returns
    -------
    list of tuple of int
        ``shapes[k]`` is level k; y and x of level ``k + 1`` are ``ceil(n / 2)`` of level k, the
        other axes are unchanged.
    """
    axes = _check_axes(axes, len(shape))
    iy, ix = axes.index("y"), axes.index("x")
    cy, cx = (int(c) for c in chunks_yx)
    if cy < 1 or cx < 1:
        raise InputError(f"chunk sizes must be >= 1, got {tuple(chunks_yx)}")
    if levels is not None and levels < 1:
        raise InputError(f"levels must be >= 1, got {levels}")
    shapes = [tuple(int(n) for n in shape)]
    while _needs_level(shapes[-1], len(shapes), levels, (iy, ix), (cy, cx)):
        nxt = list(shapes[-1])
        nxt[iy], nxt[ix] = -(-nxt[iy] // 2), -(-nxt[ix] // 2)
        shapes.append(tuple(nxt))
    return shapes


def write_ome_zarr(
    array: da.Array,
    path: str | os.PathLike,
    *,
    axes: Sequence[str],
    pixel_size: Sequence[float] | None = None,
    unit: str = "micrometer",
    ngff_version: str = "0.5",
    levels: int | None = None,
    channel_names: Sequence[str] | None = None,
    channel_colors: Sequence[str] | None = None,
    origin: Sequence[float] | None = None,
    overwrite: bool = False,
    name: str | None = None,
    compute_kwargs: dict | None = None,
    compute: Callable[..., tuple] | None = None,
    manifest: dict | None = None,
    resume: bool = False,
) -> Path:
    """Write `array` and its 2x mean pyramid as an OME-Zarr image.

    Parameters
    ----------
    array : dask.array.Array, shape (..., y, x)
        The mosaic; its axes are named by `axes` (a subset of ``t, c, z, y, x`` in that order).
        Each dask chunk becomes one zarr chunk (irregular chunks are rechunked first).
    path : str or os.PathLike
        Output folder, e.g. ``mosaic.ome.zarr``.
    axes : sequence of str
        One name per dimension of `array`.
    pixel_size : sequence of float, optional
        Physical pixel size per spatial axis (the z, y, x present), default 1.0 each.
    unit : str
        Unit of the spatial axes.
    ngff_version : {"0.5", "0.4"}
        "0.5" writes a zarr v3 store, "0.4" a zarr v2 store.
    levels : int, optional
        Number of levels including level 0; by default until one chunk holds y and x.
    channel_names, channel_colors : sequence of str, optional
        One per channel (hex ``RRGGBB`` colours); default ``"Channel i"`` and a palette.
    origin : sequence of float, optional
        Position of the mosaic's first pixel, in pixels, one per spatial axis present (z, y, x),
        e.g. a plan's output origin; written as the NGFF translation (times the pixel size).
        Default 0.
    overwrite : bool
        Replace an existing `path` that tilefuse wrote (or an empty folder) instead of
        refusing. Any other folder or file is never deleted (see :mod:`tilefuse.io.outputs`).
    name : str, optional
        Image name in the metadata; default the folder name without ``.zarr``.
    compute_kwargs : dict, optional
        Keyword arguments for every dask compute (e.g. ``scheduler="threads"``).
    compute : callable, optional
        Runs the dask collections of one level, like ``dask.compute(*collections)``; lets a
        caller drive progress bars on any scheduler. Overrides `compute_kwargs`.
    manifest : dict, optional
        What this run was asked to do (layout hash, parameters, version), saved as
        the group attribute ``tilefuse`` before any pixel is written (with the tilefuse version
        always: it marks the folder as tilefuse's); a resume must present the same.
    resume : bool
        Continue an interrupted write of the same image at `path`: level-0 chunks that exist
        and decode are kept, the others are written; the pyramid and metadata are then made.
        Resuming a finished image of the same manifest does nothing.

    Returns
    -------
    pathlib.Path
        The written image folder.

    Raises
    ------
    FileExistsError
        `path` exists and `overwrite` is False.
    InputError
        Invalid options, `path` cannot be written, or a resume finds a finished image, another
        run's manifest, or a level 0 of another shape.
    """
    array = da.asarray(array)
    axes = _check_axes(axes, array.ndim)
    if resume and overwrite:
        raise InputError("resume and overwrite exclude each other")
    _check_dtype(array.dtype)
    if ngff_version not in _VERSIONS:
        raise InputError(f"ngff_version must be one of {_VERSIONS}, got {ngff_version!r}")
    if array.size == 0:
        raise InputError(f"cannot write an empty image of shape {array.shape}")
    sizes = _spatial_sizes(axes, pixel_size)
    unit = check_unit(unit)
    offsets = _spatial_origin(axes, origin)
    channels = _channel_specs(axes, array.shape, channel_names, channel_colors)
    array = _regular_chunks(array)
    chunks = tuple(c[0] for c in array.chunks)
    iy, ix = axes.index("y"), axes.index("x")
    _check_levels(levels, (array.shape[iy], array.shape[ix]))
    shapes = pyramid_shapes(array.shape, (chunks[iy], chunks[ix]), axes, levels)
    zarr_format = 3 if ngff_version == "0.5" else 2
    if compute is None:
        kwargs = dict(compute_kwargs or {})
        compute = lambda *collections: dask.compute(*collections, **kwargs)  # noqa: E731
    manifest = json.loads(json.dumps({"tilefuse": __version__, **(manifest or {})}))
    out = check_image_output(path, overwrite=overwrite, resume=resume)
    if resume:
        if _finished_match(out, manifest):
            log.info("%s is already complete; nothing to resume", out)
            return out
        group = _open_unfinished(out, zarr_format, manifest)
        removed = remove_partial_files(out)
        if removed:
            log.info("removed %d partly written chunk file(s) left by the interrupted run", removed)
    else:
        group = _new_image(out, zarr_format, manifest)

    lo = hi = None
    labelled = _labeller(compute, math.prod(array.numblocks) > BATCH_CHUNKS)
    for k, shape in enumerate(shapes):
        last = k == len(shapes) - 1
        log.info("level %d: shape %s, chunks %s", k, shape, chunks)
        if k == 0:
            target = _level_zero(group, shape, chunks, array.dtype, axes, zarr_format, resume)
            lo, hi = _store_missing_blocks(array, target, out / "0", axes, last,
                                           labelled("fuse"), resume)
            continue
        source = _downsample_level(group[str(k - 1)], axes)
        target = _create_level(group, str(k), shape, chunks, array.dtype, axes, zarr_format)
        lo, hi = _store_level(source, target, axes, stats=last, compute=labelled(f"pyramid {k}"))

    attrs = _image_attrs(axes, sizes, offsets, unit, len(shapes), ngff_version, channels, lo, hi,
                         name or _default_name(out))
    group.attrs.update(attrs)
    log.info("wrote %s (%d levels, NGFF %s)", out, len(shapes), ngff_version)
    return out


def read_ome_zarr_level(path: str | os.PathLike, level: int = 0) -> da.Array:
    """Open one resolution level of an OME-Zarr image lazily.

    Parameters
    ----------
    path : str or os.PathLike
        The image folder (NGFF 0.4 or 0.5).
    level : int
        0 is full resolution; negative values count from the coarsest level.

    Returns
    -------
    dask.array.Array
        The level, chunked as stored.

    Raises
    ------
    InputError
        `path` is not a finished OME-Zarr image or `level` does not exist.
    """
    try:
        group = zarr.open_group(Path(path), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise InputError(f"{path}: not a zarr group") from exc
    attrs = group.attrs.asdict()
    multiscales = attrs.get("ome", attrs).get("multiscales")
    if not multiscales:
        raise InputError(f"{path}: no OME-Zarr multiscales metadata (unfinished write?)")
    datasets = multiscales[0]["datasets"]
    if not -len(datasets) <= level < len(datasets):
        raise InputError(f"{path}: level {level} does not exist ({len(datasets)} levels)")
    return da.from_zarr(group[datasets[level]["path"]])


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_axes(axes: Sequence[str], ndim: int) -> tuple[str, ...]:
    """Validate axis names: one per dim, from ``tczyx`` in that order, with y and x."""
    axes = tuple(str(a).lower() for a in axes)
    if len(axes) != ndim:
        raise InputError(f"axes {axes} name {len(axes)} dims but the array has {ndim}")
    order = [_AXIS_ORDER.find(a) for a in axes]
    if -1 in order or order != sorted(set(order)):
        raise InputError(f"axes must be distinct names from 't c z y x' in that order, got {axes}")
    if "y" not in axes or "x" not in axes:
        raise InputError(f"axes must include 'y' and 'x', got {axes}")
    return axes


def _check_dtype(dtype: np.dtype) -> None:
    """Accept boolean, integer and real floating dtypes."""
    if np.dtype(dtype).kind not in "biuf":
        raise InputError(f"cannot write dtype {dtype}; expected an integer or real float type")


def _spatial_sizes(axes: Sequence[str], pixel_size: Sequence[float] | None) -> dict[str, float]:
    """Map each spatial axis present to its physical pixel size."""
    spatial = [a for a in axes if a in _SPATIAL]
    if pixel_size is None:
        pixel_size = [1.0] * len(spatial)
    sizes = [float(s) for s in pixel_size]
    if len(sizes) != len(spatial):
        raise InputError(
            f"pixel_size has {len(sizes)} values but there are {len(spatial)} spatial axes "
            f"{tuple(spatial)}"
        )
    if not all(math.isfinite(s) and s > 0 for s in sizes):
        raise InputError(f"pixel sizes must be finite and > 0, got {tuple(sizes)}")
    return dict(zip(spatial, sizes))


def _channel_specs(
    axes: Sequence[str],
    shape: Sequence[int],
    names: Sequence[str] | None,
    colors: Sequence[str] | None,
) -> list[tuple[str, str]]:
    """(label, RRGGBB colour) per channel; one grey channel when there is no c axis."""
    n = shape[axes.index("c")] if "c" in axes else 1
    if names is None:
        names = [f"Channel {i}" for i in range(n)]
    if colors is None:
        colors = [_GREY] if n == 1 else [_PALETTE[i % len(_PALETTE)] for i in range(n)]
    if len(names) != n or len(colors) != n:
        raise InputError(
            f"got {len(names)} channel names and {len(colors)} colours for {n} channel(s)"
        )
    hexes = []
    for color in colors:
        match = _HEX.match(str(color))
        if match is None:
            raise InputError(f"channel colour {color!r} is not a hex RRGGBB value")
        hexes.append(match.group(1).upper())
    return list(zip((str(s) for s in names), hexes))


def _new_image(out: Path, zarr_format: int, manifest: dict) -> zarr.Group:
    """Empty `out` (a tilefuse image or empty folder, checked before), mark it as tilefuse's
    with the manifest, and create the zarr group.

    Creating the folder is the writability check; it happens before anything is computed.
    """
    try:
        if out.exists():
            remove_image(out)
        out.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(out, mode="w", zarr_format=zarr_format)  # "w" empties `out`
        group.attrs[MANIFEST_KEY] = manifest
    except OSError as exc:
        raise InputError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return group


def _spatial_origin(axes: Sequence[str], origin: Sequence[float] | None) -> dict[str, float]:
    """Map each spatial axis present to the pixel position of the mosaic's first pixel."""
    spatial = [a for a in axes if a in _SPATIAL]
    values = [0.0] * len(spatial) if origin is None else [float(v) for v in origin]
    if len(values) != len(spatial) or not all(math.isfinite(v) for v in values):
        raise InputError(f"origin {tuple(values)} must give one finite value per spatial axis "
                         f"{tuple(spatial)}")
    return dict(zip(spatial, values, strict=True))


def _check_levels(levels: int | None, shape_yx: tuple[int, int]) -> None:
    """Refuse a level count below 1 or beyond 1 x 1 pixel."""
    if levels is None:
        return
    most = max_levels(shape_yx)
    if not 1 <= levels <= most:
        raise InputError(f"levels {levels}: a {shape_yx[1]} x {shape_yx[0]} (x, y) image has 1 to "
                         f"{most} pyramid levels (the last one 1 pixel)")


def _default_name(path: Path) -> str:
    """Folder name without ``.ome.zarr`` / ``.zarr``."""
    name = path.name
    for suffix in (".ome.zarr", ".zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


# --------------------------------------------------------------------------------------------
# Chunks and pyramid
# --------------------------------------------------------------------------------------------


def _needs_level(
    shape: Sequence[int],
    n_levels: int,
    levels: int | None,
    yx_axes: tuple[int, int],
    chunks_yx: tuple[int, int],
) -> bool:
    """Whether to add a level: below `levels` if given, else while y or x spans several chunks."""
    if levels is not None:
        return n_levels < levels
    return any(shape[a] > c for a, c in zip(yx_axes, chunks_yx))


def _is_regular(chunks: Sequence[int]) -> bool:
    """True when zarr can store these chunks: all equal but a smaller last one."""
    return all(c == chunks[0] for c in chunks[:-1]) and chunks[-1] <= chunks[0]


def _regular_chunks(array: da.Array) -> da.Array:
    """Rechunk axes whose chunks zarr cannot hold to their largest chunk size."""
    if all(_is_regular(c) for c in array.chunks):
        return array
    target = tuple(c[0] if _is_regular(c) else max(c) for c in array.chunks)
    log.info("rechunking irregular chunks %s to %s", array.chunks, target)
    return array.rechunk(target)


def _downsample_level(previous: zarr.Array, axes: Sequence[str]) -> da.Array:
    """2x mean in y and x of a stored level, one output chunk per task.

    Parameters
    ----------
    previous : zarr.Array, shape (..., y, x)
        The stored level, chunk shape C.

    Returns
    -------
    dask.array.Array, shape (..., ceil(y / 2), ceil(x / 2))
        Chunked as C, so it stores into a level with chunk shape C without locking. Each task
        reads its 2x2 chunks straight from their files (:class:`ChunkFiles`) where the store
        allows, else through zarr.
    """
    iy, ix = axes.index("y"), axes.index("x")
    read = list(previous.chunks)
    read[iy], read[ix] = 2 * read[iy], 2 * read[ix]
    read_chunks = da.core.normalize_chunks(tuple(read), previous.shape)
    out_chunks = tuple(
        tuple(-(-c // 2) for c in cs) if i in (iy, ix) else cs for i, cs in enumerate(read_chunks)
    )
    meta = np.empty((0,) * previous.ndim, dtype=previous.dtype)
    files = ChunkFiles.for_array(previous, skip_empty=False)
    if files is None:
        src = da.from_zarr(previous, chunks=read_chunks)
        return da.map_blocks(_mean_2x_yx, src, chunks=out_chunks, dtype=src.dtype, meta=meta,
                             iy=iy, ix=ix)
    name = "tilefuse-downsample-" + dask.base.tokenize(files.folder, previous.shape)
    return da.map_blocks(_DownsampledBlock(files, iy, ix), chunks=out_chunks,
                         dtype=previous.dtype, meta=meta, name=name)


@dataclass(frozen=True)
class _DownsampledBlock:
    """The task that makes one block of the next level from 2x2 chunk files of this one."""

    files: ChunkFiles
    iy: int
    ix: int

    def __call__(self, block_id: tuple[int, ...] | None = None) -> np.ndarray:
        first = [b * 2 if i in (self.iy, self.ix) else b for i, b in enumerate(block_id)]
        grid = [-(-n // c) for n, c in zip(self.files.shape, self.files.chunks, strict=True)]
        spans = [range(f, min(f + 2, g)) if i in (self.iy, self.ix) else range(f, f + 1)
                 for i, (f, g) in enumerate(zip(first, grid, strict=True))]
        pieces = np.empty([len(s) for s in spans], dtype=object)
        for index in np.ndindex(pieces.shape):
            pieces[index] = self.files.read(tuple(s[k] for s, k in zip(spans, index,
                                                                        strict=True)))
        return _mean_2x_yx(np.block(pieces.tolist()), self.iy, self.ix)


def _mean_2x_yx(block: np.ndarray, iy: int, ix: int) -> np.ndarray:
    """2x mean of one block in y and x.

    Parameters
    ----------
    block : numpy.ndarray, shape (..., h, w)
        y at axis `iy`, x at axis `ix`.

    Returns
    -------
    numpy.ndarray, shape (..., ceil(h / 2), ceil(w / 2))
        Same dtype. An odd last row/column averages the pixels that exist. Integers are
        rounded half to even (``np.rint``), never truncated.

    Notes
    -----
    Pairs are averaged along y, then along x. Integers of up to 16 bits are averaged in float32,
    where every sum and half is exact, so the result equals the float64 one; wider types and
    floats use float64.
    """
    small_int = block.dtype.kind in "biu" and block.dtype.itemsize <= 2
    out = block
    for axis in (iy, ix):
        out = _pair_mean(out, axis, np.float32 if small_int else np.float64)
    if block.dtype.kind in "biu":
        out = np.rint(out, out=out)
    return out.astype(block.dtype)


def _pair_mean(a: np.ndarray, axis: int, work: type) -> np.ndarray:
    """Mean of neighbouring pairs along `axis` in dtype `work`; an odd last one is kept."""
    n = a.shape[axis]
    pick = [slice(None)] * a.ndim
    pick[axis] = slice(0, n - 1, 2)
    out = a[tuple(pick)].astype(work)
    pick[axis] = slice(1, n, 2)
    out += a[tuple(pick)]
    out *= 0.5  # exact: a division by 2
    if n % 2:
        pick[axis] = slice(n - 1, n)
        out = np.concatenate([out, a[tuple(pick)].astype(work)], axis=axis)
    return out


# --------------------------------------------------------------------------------------------
# Storing
# --------------------------------------------------------------------------------------------


def _create_level(
    group: zarr.Group,
    key: str,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: np.dtype,
    axes: Sequence[str],
    zarr_format: int,
    write_empty_chunks: bool = False,
) -> zarr.Array:
    """Create one empty level (replacing any left by an interrupted run): zstd (v3 default) or
    Blosc/zstd with "/" chunk keys (v2)."""
    common = {"shape": shape, "chunks": chunks, "dtype": dtype, "overwrite": True,
              "config": {"write_empty_chunks": write_empty_chunks}}
    if zarr_format == 3:
        return group.create_array(key, dimension_names=list(axes), **common)
    return group.create_array(
        key,
        compressors=numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
        chunk_key_encoding={"name": "v2", "separator": "/"},
        **common,
    )


def _store_level(
    source: da.Array,
    target: zarr.Array | None,
    axes: Sequence[str],
    *,
    stats: bool,
    compute: Callable[..., tuple],
    blocks: Sequence[tuple[int, ...]] | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Store `source` (or only its `blocks`) into `target` in one dask compute, with
    per-channel min/max of what was stored if `stats`.

    Each block is encoded and written by the task that holds it (:class:`ChunkFiles`) when
    the target allows; otherwise through zarr (``da.store``).

    Returns
    -------
    lo, hi : numpy.ndarray of shape (n_channels,), or None
        Finite per-channel minimum and maximum (NaN and inf ignored), when `stats`.
    """
    reduce_axes = tuple(i for i, a in enumerate(axes) if a != "c")
    writer = _direct_writer(source, target)
    if writer is not None:
        channel_axis = axes.index("c") if "c" in axes else None
        return _store_direct(source, writer, blocks, reduce_axes if stats else None, compute,
                             channel_axis)
    if blocks is not None:
        source, target, regions = _block_regions(source, target, blocks)
        stored = da.store(source, target, regions=regions, lock=False, compute=False)
    else:
        stored = da.store(source, target, lock=False, compute=False) if target is not None else None
    if not stats:
        compute(stored)
        return None, None
    if source.dtype.kind in "biu":  # every value is finite: no conversion, no masking
        lo, hi = source.min(axis=reduce_axes), source.max(axis=reduce_axes)
    else:
        values = source.astype(np.float64)
        finite = da.isfinite(values)
        lo = da.where(finite, values, np.inf).min(axis=reduce_axes)
        hi = da.where(finite, values, -np.inf).max(axis=reduce_axes)
    _, lo, hi = compute(stored, lo, hi)
    return np.atleast_1d(lo), np.atleast_1d(hi)


def _block_regions(source: da.Array, target: zarr.Array, blocks):
    starts = [np.cumsum((0, *c)) for c in source.chunks]
    regions = [tuple(slice(int(s[i]), int(s[i + 1])) for s, i in zip(starts, b)) for b in blocks]
    return [source.blocks[b] for b in blocks], [target] * len(blocks), regions


def _direct_writer(source: da.Array, target: zarr.Array | None) -> ChunkFiles | None:
    """A ChunkFiles for `target` when each dask block of `source` is exactly one chunk."""
    if target is None:
        return None
    for cs, c in zip(source.chunks, target.chunks):
        if any(n != c for n in cs[:-1]) or cs[-1] > c:
            return None
    return ChunkFiles.for_array(target, skip_empty=not target.config.write_empty_chunks)


def _labeller(compute: Callable[..., tuple], batched: bool) -> Callable[[str], Callable]:
    """``label -> compute`` for each level: labelled bars when level 0 takes several computes
    (and `compute` accepts ``label``), else `compute` as given, whose bars count computes."""
    accepts = batched and "label" in inspect.signature(compute).parameters
    return lambda label: functools.partial(compute, label=label) if accepts else compute


def _store_direct(source, writer: ChunkFiles, blocks, reduce_axes, compute, channel_axis):
    """One task per block: write it, and return its finite min/max when `reduce_axes`
    (per channel, the channels at `channel_axis`, if any). At most :data:`BATCH_CHUNKS` blocks
    per compute, so neither the graph nor the scheduler ever holds a huge mosaic's work.

    The graph is built by hand: ``dask.delayed`` would walk the writer's zarr metadata for
    collections on every call.
    """
    blocks = [tuple(b) for b in (blocks if blocks is not None else np.ndindex(*source.numblocks))]
    results = []
    for first in range(0, len(blocks), BATCH_CHUNKS):  # a bounded graph per compute
        batch = blocks[first : first + BATCH_CHUNKS]
        name = "store-" + dask.base.tokenize(source.name, writer.folder, reduce_axes, batch)
        dsk = {(name, i): (_StoreBlock(writer, b, reduce_axes), (source.name, *b))
               for i, b in enumerate(batch)}
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=[source])
        results += compute(*[Delayed((name, i), graph, layer=name) for i in range(len(batch))])
    if reduce_axes is None or not results:
        return None, None
    n = source.shape[channel_axis] if channel_axis is not None else 1
    lo, hi = np.full(n, np.inf), np.full(n, -np.inf)
    step = source.chunks[channel_axis][0] if channel_axis is not None else 0
    for b, (block_lo, block_hi) in zip(blocks, results):
        first = b[channel_axis] * step if channel_axis is not None else 0
        sl = slice(first, first + np.size(block_lo))
        lo[sl] = np.minimum(lo[sl], block_lo)
        hi[sl] = np.maximum(hi[sl], block_hi)
    return lo, hi


@dataclass(frozen=True)
class _StoreBlock:
    """The task that stores one block (see :func:`_write_block`)."""

    writer: ChunkFiles
    block: tuple[int, ...]
    reduce_axes: tuple[int, ...] | None

    def __call__(self, data: np.ndarray):
        return _write_block(self.writer, self.block, data, self.reduce_axes)


def _write_block(writer: ChunkFiles, block, data: np.ndarray, reduce_axes):
    """Store one chunk; its per-channel finite (min, max) when `reduce_axes` is given."""
    writer.write(block, data)
    if reduce_axes is None:
        return None
    if data.dtype.kind in "biu":
        return data.min(axis=reduce_axes), data.max(axis=reduce_axes)
    values = data.astype(np.float64)
    finite = np.isfinite(values)
    return (np.where(finite, values, np.inf).min(axis=reduce_axes),
            np.where(finite, values, -np.inf).max(axis=reduce_axes))


# --------------------------------------------------------------------------------------------
# Level 0, resumable
# --------------------------------------------------------------------------------------------

def is_finished_image(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a zarr group carrying OME multiscales metadata (written last)."""
    return is_finished(Path(folder))


def _finished_match(out: Path, manifest: dict) -> bool:
    """True when `out` is a finished image of this very run; refuses a finished other run."""
    if not is_finished_image(out):
        return False
    saved = read_manifest(out)
    if saved != manifest:
        raise InputError(f"{out}: is a finished image of another run "
                         f"({_differences(saved, manifest)} differ); nothing to resume: pass "
                         "--overwrite to replace it")
    return True


def _differences(saved: dict | None, manifest: dict) -> str:
    saved = saved or {}
    return ", ".join(sorted(k for k in set(saved) | set(manifest)
                            if saved.get(k) != manifest.get(k)))


def _open_unfinished(out: Path, zarr_format: int, manifest: dict | None) -> zarr.Group:
    """Open an interrupted write for resuming, refusing anything that is not exactly that."""
    if read_manifest(out) is None:
        raise InputError(f"{out}: nothing to resume (no tilefuse run manifest); run without "
                         "--resume")
    try:
        group = zarr.open_group(out, mode="r+", zarr_format=zarr_format)
    except Exception as exc:
        raise InputError(f"{out}: cannot open the interrupted output to resume ({exc})") from exc
    saved = read_manifest(out)
    if manifest is not None and saved != manifest:
        raise InputError(
            f"{out}: was started with other inputs or parameters "
            f"({_differences(saved, manifest)} differ); resume only with the same command, or "
            "start again with --overwrite"
        )
    return group


def _level_zero(group, shape, chunks, dtype, axes, zarr_format, resume: bool) -> zarr.Array:
    """Level 0, every chunk stored as a file (even all-fill ones) so written chunks can be
    told from missing ones on a resume."""
    if resume and "0" in group:
        target = group["0"].with_config({"write_empty_chunks": True})
        if tuple(target.shape) != tuple(shape) or tuple(target.chunks) != tuple(chunks):
            raise InputError(
                f"level 0 of the interrupted output is {target.shape} in chunks {target.chunks}, "
                f"this run makes {tuple(shape)} in {tuple(chunks)}; start again with --overwrite"
            )
        return target
    return _create_level(group, "0", shape, chunks, dtype, axes, zarr_format,
                         write_empty_chunks=True)


def written_blocks(target: zarr.Array, folder: Path) -> set[tuple[int, ...]]:
    """Chunks of `target` that exist as files and decode; broken chunk files are removed."""
    grid = tuple(-(-n // c) for n, c in zip(target.shape, target.chunks))

    def check(block: tuple[int, ...]) -> tuple[int, ...] | None:
        path = folder / target.metadata.encode_chunk_key(block)
        if not path.is_file():
            return None
        try:
            target.get_block_selection(block)
        except Exception:  # a chunk cut short by a crash: write it again
            log.warning("chunk %s of %s does not decode; it will be written again", block, folder)
            path.unlink(missing_ok=True)
            return None
        return block

    with ThreadPoolExecutor(max_workers=8) as pool:
        found = pool.map(check, np.ndindex(*grid))
        return {b for b in found if b is not None}


def _store_missing_blocks(
    source: da.Array, target: zarr.Array, folder: Path, axes, stats: bool, compute, resume: bool
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Store the blocks of `source` that `target` lacks (all of them on a fresh write)."""
    done = written_blocks(target, folder) if resume else set()
    if not done:
        return _store_level(source, target, axes, stats=stats, compute=compute)
    todo = [b for b in np.ndindex(*source.numblocks) if b not in done]
    log.info("resuming: %d of %d chunks already written", len(done), len(done) + len(todo))
    if todo:
        _store_level(source, target, axes, stats=False, compute=compute, blocks=todo)
    if not stats:
        return None, None
    return _store_level(da.from_zarr(target), None, axes, stats=True, compute=compute)


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


def _image_attrs(
    axes: Sequence[str],
    sizes: dict[str, float],
    origin: dict[str, float],
    unit: str,
    n_levels: int,
    version: str,
    channels: list[tuple[str, str]],
    lo: np.ndarray | None,
    hi: np.ndarray | None,
    name: str,
) -> dict[str, Any]:
    """Group attributes: ``{"ome": {...}}`` for 0.5, top-level keys for 0.4."""
    multiscale: dict[str, Any] = {
        "name": name,
        "axes": [_axis_meta(a, unit) for a in axes],
        "datasets": [
            {"path": str(k),
             "coordinateTransformations": [_scale(axes, sizes, k),
                                           _translation(axes, sizes, origin, k)]}
            for k in range(n_levels)
        ],
        "type": "mean",
        "metadata": {"description": "2x2 mean in y and x of the previous level"},
    }
    omero = {"channels": _omero_channels(channels, lo, hi)}
    if version == "0.4":
        multiscale["version"] = "0.4"
        return {"multiscales": [multiscale], "omero": {"version": "0.4", **omero}}
    return {"ome": {"version": "0.5", "multiscales": [multiscale], "omero": omero}}


def _axis_meta(axis: str, unit: str) -> dict[str, str]:
    """NGFF axis entry; space axes carry `unit`."""
    meta = {"name": axis, "type": _AXIS_TYPES[axis]}
    if meta["type"] == "space":
        meta["unit"] = unit
    return meta


def _scale(axes: Sequence[str], sizes: dict[str, float], level: int) -> dict[str, Any]:
    """Scale transform of `level`: y and x double per level, other axes unchanged."""
    factor = {"y": 2.0**level, "x": 2.0**level}
    return {
        "type": "scale",
        "scale": [sizes.get(a, 1.0) * factor.get(a, 1.0) for a in axes],
    }


def _translation(axes: Sequence[str], sizes: dict[str, float], origin: dict[str, float],
                 level: int) -> dict[str, Any]:
    """Translation of `level`: the physical position of its first pixel's centre.

    A pixel of level k averages 2^k x 2^k pixels of level 0, so its centre sits
    (2^k - 1) / 2 level-0 pixels after theirs in y and x; every level starts at the mosaic's
    origin.
    """
    shift = {"y": (2.0**level - 1) / 2, "x": (2.0**level - 1) / 2}
    return {
        "type": "translation",
        "translation": [(origin.get(a, 0.0) + shift.get(a, 0.0)) * sizes.get(a, 1.0)
                        if a in sizes else 0.0 for a in axes],
    }


def _omero_channels(
    channels: list[tuple[str, str]], lo: np.ndarray | None, hi: np.ndarray | None
) -> list[dict[str, Any]]:
    """omero channel entries, display window = data range of the coarsest level."""
    out = []
    for i, (label, color) in enumerate(channels):
        vmin = float(lo[i]) if lo is not None and np.isfinite(lo[i]) else 0.0
        vmax = float(hi[i]) if hi is not None and np.isfinite(hi[i]) else 1.0
        out.append(
            {
                "label": label,
                "color": color,
                "active": True,
                "window": {"min": vmin, "max": vmax, "start": vmin, "end": vmax},
            }
        )
    return out
