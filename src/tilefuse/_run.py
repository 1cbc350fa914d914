"""What a fusion run checks before it reads a pixel, and what it records for a resume.

Used by :mod:`tilefuse.pipeline` (so by the command line and the napari widget alike):

- the run's inputs (the layout file or folder and every file a tile is read from), which are
  never written, replaced or deleted (:mod:`tilefuse.io.outputs`);
- the output's name, the layout files saved beside it (``NAME.layout.csv``,
  ``NAME.TileConfiguration.txt``) and the registration report's files;
- the chunk: as given (checked against the layout and the memory budget), as an interrupted run
  chose it, or the largest the memory budget allows;
- the run manifest stored with the image: a resume must be asked exactly the same.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tilefuse import __version__
from tilefuse.errors import InputError
from tilefuse.fusion.graph import FusionPlan, SeriesPlan
from tilefuse.io.outputs import check_file_output, image_stem, input_files, read_manifest
from tilefuse.io.tile_cache import DEFAULT_CACHE_BYTES
from tilefuse.io.tiles import TIFF_SUFFIXES
from tilefuse.model.layout import Layout, Tile
from tilefuse.model.timeseries import TimeSeries
from tilefuse.ome_zarr.resume import TILE_FILES_KEY, tile_digests
from tilefuse.ome_zarr.resume import tile_files as files_of_tile
from tilefuse.plan.chunking import chunk_shape

__all__ = ["SIDECAR_SUFFIXES", "budget_chunk", "check_chunk", "check_output_name", "check_shard",
           "check_report", "check_sidecars", "memory_budget", "report_file", "report_files",
           "resume_chunk", "run_inputs", "run_manifest", "sidecar_path", "tile_cache_bytes",
           "tile_files"]

log = logging.getLogger("tilefuse")

Chunk = int | tuple[int, ...] | None

SIDECAR_SUFFIXES = (".layout.csv", ".TileConfiguration.txt")
"""The layout files saved beside an image ``NAME.ome.zarr``: ``NAME`` + each of these."""

# File types a zarr folder must not be named as (the image would look like another format).
_FILE_SUFFIXES = (*TIFF_SUFFIXES, ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".h5", ".hdf5", ".n5",
                  ".czi", ".txt", ".csv", ".json", ".xml")


def tile_files(layout: Layout | TimeSeries) -> list[str]:
    """Every file the tiles are read from: all channel files, all z planes, all time points."""
    layouts = layout.layouts if isinstance(layout, TimeSeries) else (layout,)
    return [path for one in layouts for tile in one.tiles for path in files_of_tile(tile)]


def run_inputs(layout_path: str | os.PathLike | None, layout: Layout | TimeSeries) -> set[Path]:
    """The resolved paths a run reads (the layout file or folder, every tile file): never
    written, replaced or deleted."""
    return input_files(layout_path, tile_files(layout))


def check_output_name(output: Path) -> None:
    """The fusion output's name says zarr (checked before anything is read)."""
    if output.suffix.lower() in _FILE_SUFFIXES:
        hint = (" (or NAME.ome.tif for a pyramidal OME-TIFF)"
                if output.suffix.lower() in TIFF_SUFFIXES else "")
        raise InputError(f"-o {output}: the output is an OME-Zarr folder; name it "
                         f"NAME.ome.zarr{hint}")


def sidecar_path(output: Path, suffix: str) -> Path:
    """The layout file saved beside the image ``output``: ``NAME`` + `suffix`."""
    return output.with_name(image_stem(output) + suffix)


def check_sidecars(output: Path, inputs: set[Path],
                   suffixes: Sequence[str] = SIDECAR_SUFFIXES) -> list[str]:
    """The layout files written beside the output (``NAME`` + each of `suffixes`): never an
    input; an existing one only when the output being replaced or resumed wrote it. Returns
    their names (for the manifest)."""
    paths = [sidecar_path(output, suffix) for suffix in suffixes]
    previous = read_manifest(output) if output.exists() else None  # a folder or OME-TIFF
    ours = set((previous or {}).get("sidecars", ()))
    for path in paths:
        if Path(os.path.realpath(path)) in inputs:
            raise InputError(f"-o {output} would save its layout as {path}, which is this run's "
                             "input; choose another output name")
        if (path.exists() or path.is_symlink()) and path.name not in ours:
            raise FileExistsError(f"{path} exists and was not written by a run into {output}; "
                                  "move it away or choose another output name")
        if path.is_symlink():  # never write through a link into its target
            raise InputError(f"{path} is a symbolic link; tilefuse does not write its layout "
                             "through links: remove it or choose another output name")
    return [p.name for p in paths]


def report_file(report: str | os.PathLike, suffix: str = "") -> Path:
    """The registration report ``NAME.json`` with `suffix` (``.tNAME``) before ``.json``."""
    path = Path(report)
    return path.with_name(path.stem + suffix + path.suffix)


def report_files(report: str | os.PathLike | None, layout: Layout | TimeSeries) -> list[Path]:
    """Every JSON report a registration of `layout` writes: one, or one per time point when a
    time series is registered one time point at a time (``NAME.tT.json``); each has a picture
    beside it (``.png``)."""
    if not report:
        return []
    if isinstance(layout, TimeSeries) and not layout.shared and len(layout) > 1:
        return [report_file(report, f".t{name}") for name in layout.names]
    return [report_file(report)]


def check_report(report: str | os.PathLike | None, layout: Layout | TimeSeries,
                 inputs: set[Path], *, overwrite: bool, ours: Sequence[str] = ()) -> list[str]:
    """Every report file (:func:`report_files`) and its picture: new files, or `overwrite`, or
    named in `ours` (written by the run being resumed); never inputs. Returns the JSON names
    (for the manifest)."""
    paths = report_files(report, layout)
    if paths and paths[0].suffix.lower() != ".json":
        raise InputError(f"--report {report}: expected a file name ending in .json")
    for path in paths:
        for one in (path, path.with_suffix(".png")):
            check_file_output(one, overwrite=overwrite or path.name in ours, inputs=inputs,
                              what="--report" if one is path else "--report picture")
    return [p.name for p in paths]


def check_chunk(chunk: Chunk, layout: Layout | TimeSeries) -> None:
    """A chunk gives one size or one per spatial axis of the layout."""
    ndim = layout.ndim
    if isinstance(chunk, tuple) and len(chunk) not in (1, ndim):
        raise InputError(f"--chunk takes 1 or {ndim} values for this {ndim}D layout, "
                         f"got {len(chunk)}")


def check_shard(shard: Chunk, layout: Layout | TimeSeries, *, ngff: str, tiff: bool) -> None:
    """A shard gives one size or one per spatial axis, for a zarr v3 (NGFF 0.5) output."""
    if shard is None:
        return
    if tiff:
        raise InputError("--shard is for OME-Zarr output; an OME-TIFF has no shards")
    if ngff != "0.5":
        raise InputError(f"--shard needs zarr v3 (--ngff 0.5); --ngff {ngff} (zarr v2) has "
                         "no shards")
    ndim = layout.ndim
    if isinstance(shard, tuple) and len(shard) not in (1, ndim):
        raise InputError(f"--shard takes 1 or {ndim} values for this {ndim}D layout, "
                         f"got {len(shard)}")


def resume_chunk(output: Path, chunk: Chunk, *, resume: bool) -> Chunk:
    """On a resume without a chunk, the chunk the interrupted run chose (the automatic choice
    depends on the machine's memory, which may differ on another node)."""
    saved = read_manifest(output) if resume and chunk is None else None
    if saved and saved.get("chunk"):
        shape = tuple(int(n) for n in saved["chunk"])
        return shape[0] if len(shape) == 1 else shape
    return chunk


def budget_chunk(layout: Layout | TimeSeries, chunk: Chunk, *, memory_limit: str | int,
                 workers: int | None, cache_bytes: int, backend: str,
                 scheduler: str = "threads", dask: bool = False) -> int | tuple[int, ...]:
    """`chunk`, checked against `memory_limit`; or the largest chunk the budget allows.

    The budget is a size, or a fraction of the memory this job may use (the smallest of RAM,
    its cgroup limits and its SLURM allocation). The estimate counts the libraries, the tiles
    the cache will actually hold and the chunk tasks that can run at once. With a job queue
    (``scheduler`` ``slurm``, ``pbs``...) the chunks are fused in the worker jobs, so the
    budget is per worker process: a fraction is of its share of the configured job memory,
    and its threads are the job's cores per process, wherever ``tilefuse`` itself runs.
    Any scheduler but local threads, or `dask` (an OME-TIFF write), counts dask's memory.
    """
    from tilefuse.plan.info import choose_chunk, chunk_peak, layout_memory

    budget, threads = memory_budget(memory_limit, scheduler, workers)
    n_ch, itemsize = len(layout.channels), layout.dtype.itemsize
    options = layout_memory(layout)
    options["dask"] = dask or scheduler not in ("threads", "sync")
    if isinstance(chunk, tuple) and len(chunk) == 1:
        chunk = chunk[0]
    if chunk is None:
        side = choose_chunk(layout.ndim, n_ch, itemsize, threads, cache_bytes, budget, backend,
                            **options)
        log.info("chunk %d chosen for a %.1f GB memory budget", side, budget / 1e9)
        return side
    need = chunk_peak(chunk_shape(chunk, layout.ndim), n_ch, itemsize, threads, cache_bytes,
                      backend, **options)
    if need.total > budget:
        log.warning("--chunk %s needs ~%.0f MiB (%s), above the %.0f MiB memory limit", chunk,
                    need.total / 2**20, need.parts(), budget / 2**20)
    return chunk


def memory_budget(memory_limit: str | int, scheduler: str = "threads",
                  workers: int | None = None) -> tuple[int, int]:
    """Bytes and threads of one fusing process: `memory_limit` (a size, or a fraction of this
    job's memory) and the threads; with a job queue, of one worker process (its share of the
    configured job memory, the job's cores per process)."""
    from tilefuse.cluster import JOBQUEUES, worker_resources
    from tilefuse.plan.info import parse_bytes

    worker = worker_resources(scheduler) if scheduler in JOBQUEUES else None
    if worker is not None:
        return parse_bytes(str(memory_limit), total=worker[0]), worker[1]
    return parse_bytes(str(memory_limit)), workers or os.cpu_count() or 1


def tile_cache_bytes(layout: Layout | TimeSeries, chunk: Chunk, *, memory_limit: str | int,
                     scheduler: str = "threads", workers: int | None = None) -> int:
    """The tile cache of a run that names none: :data:`DEFAULT_CACHE_BYTES`, raised to hold
    four of the largest reads of a chunk (:func:`tilefuse.fusion.graph.largest_read`: a
    chunk's planes of a z-stack read by planes, else a whole tile) when those are larger, up
    to a quarter of the memory budget (:func:`memory_budget`).

    Light-sheet stacks of 2048² read 65 planes at a time are 0.5 GiB a read: the default cache
    holds one, and the chunks of a z-slab decode each stack's planes again and again (5.1
    reads per voxel in ``benchmarks/bench_3d.py``, 1.51x the floor); four reads' worth decodes
    each voxel once (1.00x the floor, peak RSS 5.0 GB against the floor's 4.5 GB).
    """
    from tilefuse.fusion.graph import largest_read

    layouts = layout.layouts if isinstance(layout, TimeSeries) else (layout,)
    want = 4 * max(largest_read(one, chunk_shape(chunk, one.ndim)) for one in layouts)
    if want <= DEFAULT_CACHE_BYTES:
        return DEFAULT_CACHE_BYTES
    budget = memory_budget(memory_limit, scheduler, workers)[0]
    cache = max(DEFAULT_CACHE_BYTES, min(want, budget // 4))
    log.info("tile cache %.0f MiB: four chunk reads of the largest tiles (%.0f MiB wanted, a "
             "quarter of the memory budget at most); --cache-mb sets it", cache / 2**20,
             want / 2**20)
    return cache


def _tile_identity(tile: Tile) -> tuple:
    """A tile as the manifest knows it: name, resolved files, series and channels kept, shape
    (the same tiles named by a relative or an absolute path are the same run)."""
    source = tile.source
    files = [os.path.realpath(p) for p in files_of_tile(tile)]
    return (tile.name, files or source.key, getattr(source, "series", None),
            getattr(source, "channels", None), tile.shape)


def run_manifest(layout: Layout | TimeSeries, plan: FusionPlan | SeriesPlan, *,
                 backend: str, ngff: str, levels: int | None, flatfield: str | None,
                 darkfield: str | None, match_intensity: bool,
                 sidecars: Sequence[str], reports: Sequence[str] = (),
                 shard: Chunk = None) -> dict:
    """What a fusion run was asked to do: a resume must be asked exactly the same (tile files
    that changed since are fused again, see :mod:`tilefuse.ome_zarr.resume`). A sharded run
    records its ``shard`` (an unsharded one has no such entry)."""
    options: dict[str, Any] = {
        "backend": backend, "ngff": ngff, "levels": levels, "flatfield": flatfield,
        "darkfield": darkfield, "match_intensity": match_intensity, "sidecars": sidecars,
        "reports": reports, "shard": shard,
    }
    if isinstance(layout, TimeSeries):
        assert isinstance(plan, SeriesPlan)
        manifest = run_manifest(layout.at_time(0), plan.plans[0], **options)
        digest = hashlib.sha256()
        for one, one_plan in zip(layout.layouts, plan.plans, strict=True):
            digest.update(run_manifest(one, one_plan, **options)["layout_sha256"].encode())
        manifest.update(layout_sha256=digest.hexdigest(), tiles=layout.n_tiles,
                        timepoints=list(layout.names))
        manifest[TILE_FILES_KEY] = tile_digests(list(layout.layouts))
        return manifest
    assert isinstance(plan, FusionPlan)
    digest = hashlib.sha256()
    for tile in layout.tiles:
        digest.update(repr(_tile_identity(tile)).encode())
        digest.update(np.round(tile.affine, 9).tobytes())
    digest.update(repr((str(layout.dtype), layout.channels)).encode())
    sharded = {} if shard is None else {"shard": [int(n) for n in np.atleast_1d(shard)]}
    return {
        **sharded,
        "tilefuse": __version__,
        "layout_sha256": digest.hexdigest(),
        "tiles": len(layout.tiles),
        "blend": plan.blend,
        "blend_width": [round(w, 6) for w in plan.widths],
        "chunk": list(plan.chunks.chunk_shape),
        "backend": plan.backend,
        "dtype": str(plan.dtype),
        "fill": plan.fill,
        "ngff": ngff,
        "levels": levels,
        "pixel_size": list(layout.pixel_size),
        "unit": layout.unit,
        "flatfield": flatfield,
        "darkfield": darkfield,
        "match_intensity": match_intensity,
        "sidecars": list(sidecars),
        "reports": list(reports),
        TILE_FILES_KEY: tile_digests([layout]),
    }
