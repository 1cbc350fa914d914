"""Writing a mosaic as an OME-Zarr image (NGFF 0.5 on zarr v3, or NGFF 0.4 on zarr v2).

Level 0 is the mosaic itself, stored with one zarr chunk per dask chunk. Each further level is a
2x mean downsample in y and x of the previous level *read back from the store*, so the fusion
graph runs once and every level costs one dask compute of chunk-sized tasks. The group metadata
that makes the folder an OME-Zarr image is written last: an interrupted run leaves a folder that
no reader mistakes for a finished image.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tilefuse import __version__
from tilefuse.errors import InputError
from tilefuse.io.outputs import (
    MANIFEST,
    MANIFEST_KEY,
    check_image_output,
    image_stem,
    is_finished,
    remove_image,
)
from tilefuse.model.mosaic import BlockPixels, Mosaic, dask_is_chosen
from tilefuse.ome_zarr import NGFF_VERSIONS
from tilefuse.ome_zarr._metadata import (
    channel_specs,
    image_attrs,
    spatial_origin,
    spatial_sizes,
)
from tilefuse.ome_zarr._pyramid import (
    check_levels,
    downsample_level,
    max_levels,
    pyramid_shapes,
    regular_chunks,
)
from tilefuse.ome_zarr._shards import shard_shapes
from tilefuse.ome_zarr._store import (
    Tally,
    create_level,
    finished_match,
    level_zero,
    open_unfinished,
    store_level,
    store_missing_blocks,
)
from tilefuse.ome_zarr.chunkstore import remove_partial_files
from tilefuse.ome_zarr.zarr_nodes import (
    ArraySpec,
    Level,
    ZarrFormat,
    create_group,
    update_group_attributes,
)

__all__ = ["MANIFEST", "is_finished_image", "max_levels",
           "pyramid_shapes", "read_ome_zarr_level", "write_ome_zarr"]

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import dask.array as da

Compute = Callable[..., tuple]
"""Runs dask collections like ``dask.compute(*collections)``; may take ``label=`` (``"fuse"``,
``"pyramid K"``) and ``batch=`` (a :class:`tilefuse.ome_zarr._store.Batch`: chunks before, in
this compute and in the whole image, for one progress bar over every batch and level)."""


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def write_ome_zarr(
    mosaic: Mosaic,
    path: str | os.PathLike,
    *,
    ngff_version: str = "0.5",
    levels: int | None = None,
    overwrite: bool = False,
    name: str | None = None,
    shard: int | Sequence[int] | None = None,
) -> Path:
    """Write a mosaic and its 2x mean pyramid as an OME-Zarr image.

    Everything but the pixels comes from the mosaic itself: axes, pixel size and unit (the
    scale of every level), channel names and colours (omero), and its origin (the translation).

    Parameters
    ----------
    mosaic : Mosaic
        What :func:`tilefuse.fuse` returns, or a :class:`~tilefuse.Mosaic` made around any
        dask array (``Mosaic(data, axes=("c", "y", "x"), pixel_size=(0.5, 0.5))``). Each dask
        chunk becomes one zarr chunk (irregular chunks are rechunked first).
    path : str or os.PathLike
        Output folder, e.g. ``mosaic.ome.zarr``.
    ngff_version : {"0.5", "0.4"}
        "0.5" writes a zarr v3 store, "0.4" a zarr v2 store.
    levels : int, optional
        Number of levels including level 0; by default until one chunk holds y and x.
    overwrite : bool
        Replace an existing `path` that tilefuse wrote (or an empty folder) instead of
        refusing. Any other folder or file is never deleted (see :mod:`tilefuse.io.outputs`).
    name : str, optional
        Image name in the metadata; default the folder name without ``.ome.zarr``.
    shard : int or sequence of int, optional
        Write sharded zarr v3 arrays (NGFF 0.5 only): many chunks in one file, the shard, of
        this size in pixels, one value or one per spatial axis (z, y, x), each a multiple of
        the chunk. Every level is sharded (the shard capped at the level's size); each task
        writes whole shards. Default: one file per chunk.

    Returns
    -------
    pathlib.Path
        The written image folder.

    Raises
    ------
    FileExistsError
        `path` exists and `overwrite` is False.
    InputError
        Invalid options, or `path` cannot be written.

    Examples
    --------
    >>> import tilefuse
    >>> layout = tilefuse.read_layout("tiles/TileConfiguration.txt")  # doctest: +SKIP
    >>> tilefuse.write_ome_zarr(tilefuse.fuse(layout), "mosaic.ome.zarr")  # doctest: +SKIP
    """
    return write_image(mosaic, path, ngff_version=ngff_version, levels=levels,
                       overwrite=overwrite, name=name, shard=shard)


def write_image(
    mosaic: Mosaic,
    path: str | os.PathLike,
    *,
    ngff_version: str = "0.5",
    levels: int | None = None,
    overwrite: bool = False,
    name: str | None = None,
    compute: Compute | None = None,
    manifest: dict | None = None,
    resume: bool = False,
    shard: int | Sequence[int] | None = None,
) -> Path:
    """:func:`write_ome_zarr` with the plumbing of a run (:mod:`tilefuse.pipeline`): not public.

    Parameters
    ----------
    mosaic, path, ngff_version, levels, overwrite, name, shard
        As in :func:`write_ome_zarr`.
    compute : callable, optional
        Runs the dask collections of one level, like ``dask.compute(*collections)``; lets a
        caller choose the scheduler and drive progress bars: when it takes the keywords, it is
        passed ``label=`` and ``batch=`` (see :data:`Compute`). With a ``run_tasks`` method
        (:class:`tilefuse.runner.LocalCompute`), block pixels (what :func:`tilefuse.fuse`
        makes) are stored on local threads without dask. Default: :func:`default_compute`.
    manifest : dict, optional
        What this run was asked to do (layout hash, parameters, version), saved as
        the group attribute ``tilefuse`` before any pixel is written (with the tilefuse version
        always: it marks the folder as tilefuse's); a resume must present the same.
    resume : bool
        Continue an interrupted write of the same image at `path`: level-0 chunks that exist
        and decode are kept, the others are written; the pyramid and metadata are then made.
        Resuming a finished image of the same manifest does nothing. With `shard`, whole
        shards are kept or written.

    Raises
    ------
    FileExistsError
        `path` exists and `overwrite` is False.
    InputError
        Invalid options, `path` cannot be written, or a resume finds a finished image, another
        run's manifest, or a level 0 of another shape.
    """
    if not isinstance(mosaic, Mosaic):
        raise InputError(f"write_ome_zarr takes a Mosaic (what tilefuse.fuse returns), got "
                         f"{type(mosaic).__name__}; wrap an array as Mosaic(data, axes=...)")
    axes, shape, dtype = mosaic.axes, mosaic.shape, mosaic.dtype
    if resume and overwrite:
        raise InputError("resume and overwrite exclude each other")
    _check_dtype(dtype)
    if ngff_version not in NGFF_VERSIONS:
        raise InputError(f"ngff_version must be one of {NGFF_VERSIONS}, got {ngff_version!r}")
    if math.prod(shape) == 0:
        raise InputError(f"cannot write an empty image of shape {shape}")
    sizes = spatial_sizes(axes, mosaic.pixel_size)
    offsets = spatial_origin(axes, mosaic.origin)
    channels = channel_specs(axes, shape, mosaic.channel_names, mosaic.channel_colors)
    # block pixels (what fuse makes) are stored without dask when the compute runs tasks
    level0: da.Array | BlockPixels = (mosaic.pixels if mosaic.pixels is not None
                                      else regular_chunks(mosaic.data))
    chunks = (tuple(level0.chunk_shape) if isinstance(level0, BlockPixels)
              else tuple(c[0] for c in level0.chunks))
    iy, ix = axes.index("y"), axes.index("x")
    check_levels(levels, (shape[iy], shape[ix]))
    shapes = pyramid_shapes(shape, (chunks[iy], chunks[ix]), axes, levels)
    zarr_format: ZarrFormat = 3 if ngff_version == "0.5" else 2
    if shard is not None and zarr_format == 2:
        raise InputError("sharding needs zarr v3 (NGFF 0.5); NGFF 0.4 (zarr v2) has no shards")
    shards = (shard_shapes(shard, chunks, axes, shapes) if shard is not None
              else [None] * len(shapes))
    if compute is None:
        compute = default_compute()
    manifest = json.loads(json.dumps({"tilefuse": __version__, **(manifest or {})}))
    out = check_image_output(path, overwrite=overwrite, resume=resume)
    if resume:
        if finished_match(out, manifest):
            log.info("%s is already complete; nothing to resume", out)
            return out
        open_unfinished(out, zarr_format, manifest)
        removed = remove_partial_files(out)
        if removed:
            log.info("removed %d partly written chunk file(s) left by the interrupted run", removed)
    else:
        _new_image(out, zarr_format, manifest)

    lo = hi = None
    previous: Level | None = None
    # the progress unit: chunks, or shards when sharded (each is one file and one task)
    tally = Tally(compute, [_chunk_count(s, u or chunks)
                            for s, u in zip(shapes, shards, strict=True)])
    for k, (shape, unit) in enumerate(zip(shapes, shards, strict=True)):
        last = k == len(shapes) - 1
        log.info("level %d: shape %s, chunks %s, shards %s", k, shape, chunks, unit)
        spec = ArraySpec(tuple(shape), tuple(chunks), np.dtype(dtype), tuple(axes), zarr_format,
                         unit)
        if previous is None:
            target = level_zero(out, spec, resume)
            source = _source(level0, unit)
            lo, hi = store_missing_blocks(source, target, axes, last, tally.level(0), resume,
                                          tally)
        else:
            source = _source(downsample_level(previous, axes), unit)
            target = create_level(out / str(k), spec)
            lo, hi = store_level(source, target, axes, stats=last, compute=tally.level(k))
        previous = target

    attrs = image_attrs(axes, sizes, offsets, mosaic.unit, len(shapes), ngff_version, channels,
                        lo, hi, name or image_stem(out))
    update_group_attributes(out, zarr_format, attrs)
    log.info("wrote %s (%d levels, NGFF %s)", out, len(shapes), ngff_version)
    return out


def _source(pixels: da.Array | BlockPixels, shard: tuple[int, ...] | None
            ) -> da.Array | BlockPixels:
    """What a level is stored from: as made, or, sharded, a dask array with one block (one
    task) per shard."""
    if shard is None:
        return pixels
    array = pixels.to_dask() if isinstance(pixels, BlockPixels) else pixels
    return array.rechunk(shard)


def default_compute() -> Compute:
    """What a write runs on when the caller names nothing: ``dask.compute`` when the user chose
    where dask runs (:func:`tilefuse.model.mosaic.dask_is_chosen`); else this machine's
    threads, without dask (:class:`tilefuse.runner.LocalCompute`)."""
    from tilefuse.runner import LocalCompute

    if dask_is_chosen():
        import dask

        return dask.compute
    return LocalCompute("threads", None, None)


def _chunk_count(shape: tuple[int, ...], chunks: tuple[int, ...]) -> int:
    """Chunks of an array of `shape` in `chunks`."""
    return math.prod(-(-n // c) for n, c in zip(shape, chunks, strict=True))


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
    import zarr

    try:
        group = zarr.open_group(Path(path), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise InputError(f"{path}: not a zarr group") from exc
    attrs: dict[str, Any] = group.attrs.asdict()
    multiscales = attrs.get("ome", attrs).get("multiscales")
    if not multiscales:
        raise InputError(f"{path}: no OME-Zarr multiscales metadata (unfinished write?)")
    datasets = multiscales[0]["datasets"]
    if not -len(datasets) <= level < len(datasets):
        raise InputError(f"{path}: level {level} does not exist ({len(datasets)} levels)")
    import dask.array as da

    return da.from_zarr(group[str(datasets[level]["path"])])


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_dtype(dtype: np.dtype) -> None:
    """Accept boolean, integer and real floating dtypes."""
    if np.dtype(dtype).kind not in "biuf":
        raise InputError(f"cannot write dtype {dtype}; expected an integer or real float type")


def _new_image(out: Path, zarr_format: ZarrFormat, manifest: dict) -> None:
    """Empty `out` (a tilefuse image or empty folder, checked before), and create the zarr group
    there, marked as tilefuse's with the manifest.

    Creating the folder is the writability check; it happens before anything is computed.
    """
    try:
        if out.exists():
            remove_image(out)
        out.mkdir(parents=True, exist_ok=True)
        create_group(out, zarr_format, {MANIFEST_KEY: manifest})
    except OSError as exc:
        raise InputError(f"cannot write {out}: {exc.strerror or exc}") from exc


def is_finished_image(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a zarr group carrying OME multiscales metadata (written last)."""
    return is_finished(Path(folder))
