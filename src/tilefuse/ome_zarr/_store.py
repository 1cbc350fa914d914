"""Storing levels: chunk files written by the task that makes them (:class:`ChunkFiles`) or
through zarr, at most :data:`BATCH_CHUNKS` chunks per compute; level 0 resumable; a
:class:`Tally` tells each compute where it stands in the whole write.

Levels are :class:`~tilefuse.ome_zarr.zarr_nodes.Level` folders whose metadata tilefuse writes
itself; zarr-python is imported only where chunk files cannot do the work (shards, the dask
path's fallback, decoding a sharded level's files on a resume)."""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tilefuse.errors import InputError
from tilefuse.io.outputs import is_finished, read_manifest
from tilefuse.model.mosaic import BlockPixels
from tilefuse.ome_zarr._blocks import (
    BATCH_CHUNKS,
    StoredPixels,
    block_stats,
    merge_stats,
    stats_of_blocks,
    store_blocks,
    write_block,
)
from tilefuse.ome_zarr._shards import ShardFiles
from tilefuse.ome_zarr.chunkstore import ChunkFiles
from tilefuse.ome_zarr.zarr_nodes import ArraySpec, Level, chunk_key, read_group_attributes

if TYPE_CHECKING:  # dask is imported by the dask path only: block pixels store without it
    import dask.array as da
    import zarr

log = logging.getLogger(__name__)



def create_level(folder: Path, spec: ArraySpec, write_empty_chunks: bool = False,
                 replace: bool = True) -> Level:
    """Create one empty level at `folder` (over one an interrupted run left, if `replace`):
    zstd (v3) or Blosc/zstd with "/" chunk keys (v2); v3 may be sharded (``spec.shards``)."""
    try:
        return Level(folder, spec, write_empty_chunks).create(replace=replace)
    except OSError as exc:
        raise InputError(f"cannot write {folder}: {exc.strerror or exc}") from exc


def store_level(
    source: da.Array | BlockPixels,
    target: Level | None,
    axes: Sequence[str],
    *,
    stats: bool,
    compute: Callable[..., tuple],
    blocks: Sequence[tuple[int, ...]] | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Store `source` (or only its `blocks`) into `target`, in batches of at most
    :data:`BATCH_CHUNKS` chunks, with per-channel min/max of what was stored if `stats`.

    `compute` is a level's compute of a :class:`Tally` (:class:`LevelCompute`:
    ``compute(*collections, chunks=n)``, and ``compute.run_tasks`` for local threads).

    Each block is encoded and written by the task that holds it (:class:`ChunkFiles`; for a
    sharded target each block is one shard, :class:`ShardFiles`) when the target allows;
    otherwise through zarr (``da.store``). Block pixels (:class:`BlockPixels`) with
    `run_tasks` and chunk files are stored without dask (:func:`store_blocks`); otherwise they
    go through dask like any array.

    Returns
    -------
    lo, hi : numpy.ndarray of shape (n_channels,), or None
        Finite per-channel minimum and maximum (NaN and inf ignored), when `stats`.
    """
    reduce_axes = tuple(i for i, a in enumerate(axes) if a != "c")
    channel_axis = axes.index("c") if "c" in axes else None
    run_tasks = getattr(compute, "run_tasks", None)
    z_innermost = not getattr(source, "reads_planes", False)  # see tile_order
    if isinstance(source, BlockPixels):
        files = _chunk_files(source, target) if run_tasks is not None else None
        if files is not None:
            assert run_tasks is not None
            grid = [-(-n // c) for n, c in zip(source.shape, source.chunk_shape, strict=True)]
            order = tile_order(blocks if blocks is not None else np.ndindex(*grid), axes,
                               z_innermost=z_innermost)
            return store_blocks(source, files, order, reduce_axes if stats else None,
                                run_tasks, channel_axis)
        source = source.to_dask()
    count = (0 if target is None else len(blocks) if blocks is not None  # chunks stored
             else int(np.prod([-(-n // c) for n, c in zip(target.shape, target.storage_unit,
                                                           strict=True)])))
    writer = _direct_writer(source, target)
    if writer is not None:
        order = tile_order(blocks if blocks is not None else np.ndindex(*source.numblocks),
                           axes, z_innermost=z_innermost)
        return _store_direct(source, writer, order, reduce_axes if stats else None, compute,
                             channel_axis)
    import dask.array as da
    # dask types store's targets as ArrayLike; it needs only __setitem__, which zarr.Array has.
    array = target.zarr_array() if target is not None else None
    if blocks is not None:
        assert array is not None  # only the stats-only pass (no blocks) has no target
        sources, targets, regions = _block_regions(source, array, blocks)
        stored = da.store(sources, targets,  # type: ignore[arg-type]  # see above
                          regions=regions, lock=False, compute=False)
    else:
        stored = (da.store(source, array, lock=False, compute=False)  # type: ignore[arg-type]
                  if array is not None else None)
    if not stats:
        compute(stored, chunks=count)
        return None, None
    if source.dtype.kind in "biu":  # every value is finite: no conversion, no masking
        lo, hi = source.min(axis=reduce_axes), source.max(axis=reduce_axes)
    else:
        values = source.astype(np.float64)
        finite = da.isfinite(values)
        lo = da.where(finite, values, np.inf).min(axis=reduce_axes)
        hi = da.where(finite, values, -np.inf).max(axis=reduce_axes)
    _, lo, hi = compute(stored, lo, hi, chunks=count)
    return np.atleast_1d(lo), np.atleast_1d(hi)


def tile_order(blocks: Iterable[Sequence[int]], axes: Sequence[str], *,
               z_innermost: bool = True) -> list[tuple[int, ...]]:
    """The blocks in the order to compute them: C order, but z innermost unless told not to.

    Where chunks read whole z-stacks, the chunks of one lateral column (every z, the same y and
    x) read the same tiles, so computed one after another they find them in the tile cache; in
    C order (z outermost) each z-slab goes through every tile of the mosaic before the next
    slab does. Where chunks read only their planes (``z_innermost=False``: the source's
    ``reads_planes``), z goes outermost: a slab's planes of every tile fit the cache better
    (measured: 9 tiles' worth of planes decoded for 8 stacks, 42 column by column;
    ``tests/test_tile_cache.py``), and within a slab the lateral axis with fewer chunks goes
    innermost, so that the tiles one sweep keeps in use are those across the narrow side.
    """
    ordered = [tuple(int(i) for i in b) for b in blocks]
    if "z" not in axes or not ordered:
        return ordered
    z = list(axes).index("z")
    if z_innermost:
        ordered.sort(key=lambda b: (*b[:z], *b[z + 1:], b[z]))
        return ordered
    counts = [max(b[k] for b in ordered) + 1 for k in range(len(axes))]
    lateral = sorted(range(z + 1, len(axes)), key=lambda k: -counts[k])
    ordered.sort(key=lambda b: (*b[:z], b[z], *(b[k] for k in lateral)))
    return ordered


def _block_regions(
    source: da.Array, target: zarr.Array, blocks: Sequence[tuple[int, ...]]
) -> tuple[list[da.Array], list[zarr.Array], list[tuple[slice, ...]]]:
    """Each block of `source` with `target` and the region of `target` it is stored in."""
    starts = [np.cumsum((0, *c)) for c in source.chunks]
    regions = [tuple(slice(int(s[i]), int(s[i + 1])) for s, i in zip(starts, b, strict=True))
               for b in blocks]
    return [source.blocks[b] for b in blocks], [target] * len(blocks), regions


def _chunk_files(source: BlockPixels, target: Level | None) -> ChunkFiles | None:
    """Chunk files of `target` when each block of `source` is exactly one of its chunks
    (unsharded: :meth:`ChunkFiles.for_level`)."""
    if target is None or target.shards is not None:
        return None
    if tuple(source.chunk_shape) != tuple(target.chunks):
        return None
    return ChunkFiles.for_level(target, skip_empty=not target.write_empty_chunks)


def _direct_writer(source: da.Array, target: Level | None) -> ChunkFiles | ShardFiles | None:
    """A writer for `target` when each dask block of `source` is exactly one of its files
    (one chunk, or one shard when sharded)."""
    if target is None:
        return None
    for cs, c in zip(source.chunks, target.storage_unit, strict=True):
        if any(n != c for n in cs[:-1]) or cs[-1] > c:
            return None
    if target.shards is not None:
        return ShardFiles(target.zarr_array(), str(target.folder))
    return ChunkFiles.for_level(target, skip_empty=not target.write_empty_chunks)


@dataclass(frozen=True)
class Batch:
    """Where one compute of a write stands, so that a caller can show one bar for the image.

    Attributes
    ----------
    label : str
        ``"fuse"`` (level 0) or ``"pyramid K"``.
    start, count, total : int
        Chunks stored before this compute (all levels), in it, and in the whole image; for a
        sharded image, shards (each one file and one task) instead of chunks throughout.
    level_start, level_total : int
        Chunks (or shards) of this compute's level stored before it, and in the level.
    """

    label: str
    start: int
    count: int
    total: int
    level_start: int
    level_total: int


def _takes(compute: Callable[..., tuple], name: str) -> bool:
    """Whether `compute` accepts the keyword `name`."""
    try:
        params = inspect.signature(compute).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


class Tally:
    """Counts the chunks of a whole write (every level) and tells each compute where it stands.

    ``tally.level(k)`` is the compute level `k` is stored with: ``run(*collections, chunks=n)``
    calls the caller's compute with ``label=`` (``"fuse"``, ``"pyramid K"``) and ``batch=``
    (a :class:`Batch`) when it takes them, so one progress bar can span every batch and level.

    Parameters
    ----------
    compute : callable
        Like ``dask.compute(*collections)``.
    totals : sequence of int
        Chunks of each level, level 0 first (shards, when the image is sharded).
    """

    def __init__(self, compute: Callable[..., tuple], totals: Sequence[int]) -> None:
        self.compute = compute
        self.totals = [int(n) for n in totals]
        self.total = sum(self.totals)
        self.done = 0
        self.labels = _takes(compute, "label")
        self.batches = _takes(compute, "batch")

    def skip(self, chunks: int) -> None:
        """Count `chunks` as stored already (a resume keeps them)."""
        self.done += chunks

    def level(self, k: int) -> LevelCompute:
        """The compute that stores level `k`: ``run(*collections, chunks=n)``, and its
        ``run.run_tasks`` when the caller's compute runs tasks on local threads."""
        return LevelCompute(self, k)


class LevelCompute:
    """One level's compute of a :class:`Tally`.

    ``run(*collections, chunks=n)`` computes dask collections; ``run.run_tasks(tasks,
    chunks=n)`` (None unless the caller's compute has a ``run_tasks``, as
    :class:`tilefuse.runner.LocalCompute` has) runs zero-argument tasks on local threads
    and returns their results. Both pass ``label=`` and ``batch=`` on, and count `chunks`
    as stored.
    """

    def __init__(self, tally: Tally, k: int) -> None:
        self.tally = tally
        self.label = "fuse" if k == 0 else f"pyramid {k}"
        self.k = k
        self.level_first = tally.done
        local = getattr(tally.compute, "run_tasks", None) is not None
        self.run_tasks = self._tasks if local else None

    def _kwargs(self, chunks: int) -> dict[str, object]:
        tally = self.tally
        kwargs: dict[str, object] = {}
        if tally.labels:
            kwargs["label"] = self.label
        if tally.batches:
            kwargs["batch"] = Batch(self.label, tally.done, chunks, tally.total,
                                    tally.done - self.level_first, tally.totals[self.k])
        return kwargs

    def __call__(self, *collections: object, chunks: int) -> tuple:
        with old_objects_frozen():
            out = self.tally.compute(*collections, **self._kwargs(chunks))
        self.tally.done += chunks
        return out

    def _tasks(self, tasks: Sequence[Callable[[], Any]], *, chunks: int) -> list[Any]:
        with old_objects_frozen():
            out: list[Any] = self.tally.compute.run_tasks(  # type: ignore[attr-defined]
                tasks, **self._kwargs(chunks))
        self.tally.done += chunks
        return out


@contextlib.contextmanager
def old_objects_frozen() -> Iterator[None]:
    """Leave the objects that exist now out of the garbage collector's passes for the block.

    A compute makes objects by the thousand (tasks, arrays, results), so Python's collector
    runs during it, and a full collection walks every object of the process, most of them
    made by imports (~48,000 after tilefuse's): one took 15-30 ms of a 0.3 s fusion of 6x6
    tiles of 1024², holding the GIL while both threads waited. ``gc.freeze`` sets those old
    objects aside (objects made in the block are still collected) and ``gc.unfreeze`` gives
    them back afterwards. A process that froze objects itself is left as it is.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _store_direct(source, writer: ChunkFiles | ShardFiles, blocks, reduce_axes, compute,
                  channel_axis):
    """One task per block: write it, and return its finite min/max when `reduce_axes`
    (per channel, the channels at `channel_axis`, if any). At most :data:`BATCH_CHUNKS` blocks
    per compute, so neither the graph nor the scheduler ever holds a huge mosaic's work.

    The graph is built by hand: ``dask.delayed`` would walk the writer's zarr metadata for
    collections on every call.
    """
    import dask
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    blocks = [tuple(b) for b in (blocks if blocks is not None else np.ndindex(*source.numblocks))]
    results = []
    for first in range(0, len(blocks), BATCH_CHUNKS):  # a bounded graph per compute
        batch = blocks[first : first + BATCH_CHUNKS]
        name = "store-" + dask.base.tokenize(source.name, writer.folder, reduce_axes, batch)
        dsk: dict[Any, Any] = {(name, i): (_StoreBlock(writer, b, reduce_axes), (source.name, *b))
               for i, b in enumerate(batch)}
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=[source])
        results += compute(*[Delayed((name, i), graph, layer=name) for i in range(len(batch))],
                           chunks=len(batch))
    if reduce_axes is None or not results:
        return None, None
    return merge_stats(results, blocks, source.shape, [c[0] for c in source.chunks],
                       channel_axis)


@dataclass(frozen=True)
class _StoreBlock:
    """The task that stores one block (see :func:`_write_block`)."""

    writer: ChunkFiles | ShardFiles
    block: tuple[int, ...]
    reduce_axes: tuple[int, ...] | None

    def __call__(self, data: np.ndarray):
        return write_block(self.writer, self.block, data, self.reduce_axes)


def finished_match(out: Path, manifest: dict) -> bool:
    """True when `out` is a finished image of this very run; refuses a finished other run."""
    if not is_finished(out):
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


def open_unfinished(out: Path, zarr_format: Literal[2, 3], manifest: dict | None) -> None:
    """Check that `out` is an interrupted write of this very run (a zarr group of
    `zarr_format` with the same manifest), refusing anything else."""
    saved = read_manifest(out)
    if saved is None:
        raise InputError(f"{out}: nothing to resume (no tilefuse run manifest); run without "
                         "--resume")
    try:
        read_group_attributes(out, zarr_format)
    except (OSError, ValueError) as exc:
        raise InputError(f"{out}: cannot open the interrupted output to resume: not a zarr "
                         f"v{zarr_format} group ({exc})") from exc
    if manifest is not None and saved != manifest:
        raise InputError(
            f"{out}: was started with other inputs or parameters "
            f"({_differences(saved, manifest)} differ); resume only with the same command, or "
            "start again with --overwrite"
        )


def level_zero(out: Path, spec: ArraySpec, resume: bool) -> Level:
    """Level 0, every chunk (or shard) stored as a file (even all-fill ones) so written ones
    can be told from missing ones on a resume; a resume keeps the level there when its
    metadata is exactly what this run writes."""
    level = Level(out / "0", spec, write_empty_chunks=True)
    documents = spec.documents()
    if not (resume and (level.folder / next(iter(documents))).is_file()):
        return create_level(level.folder, spec, write_empty_chunks=True, replace=resume)
    for name, document in documents.items():
        try:
            stored = json.loads((level.folder / name).read_text())
        except (OSError, ValueError):
            stored = None
        if stored != document:
            raise InputError(
                f"level 0 of the interrupted output ({level.folder / name}) is not what this "
                f"run makes ({spec.shape} in chunks {spec.chunks}, shards {spec.shards}, "
                f"{spec.dtype}); start again with --overwrite")
    return level


def written_blocks(target: Level, reduce_axes: tuple[int, ...] | None = None
                   ) -> dict[tuple[int, ...], Any]:
    """Chunks (shards, when sharded) of `target` that exist as files and decode, each with its
    per-channel finite ``(min, max)`` over `reduce_axes` when given (None otherwise, so a resume
    decodes a kept chunk once); broken files are removed."""
    grid = tuple(-(-n // c) for n, c in zip(target.shape, target.storage_unit, strict=True))
    files = ChunkFiles.for_level(target, skip_empty=False)
    read = files.read if files is not None else target.zarr_array().get_block_selection
    folder = target.folder

    def check(block: tuple[int, ...]) -> tuple[tuple[int, ...], Any] | None:
        path = folder / chunk_key(block, target.spec.zarr_format)
        if not path.is_file():
            return None
        try:
            data = read(block)
        except Exception:  # a chunk cut short by a crash: write it again
            log.warning("chunk %s of %s does not decode; it will be written again", block, folder)
            path.unlink(missing_ok=True)
            return None
        return block, None if reduce_axes is None else block_stats(np.asarray(data), reduce_axes)

    with ThreadPoolExecutor(max_workers=8) as pool:
        found = pool.map(check, (tuple(int(i) for i in b) for b in np.ndindex(*grid)))
        return dict(f for f in found if f is not None)


def store_missing_blocks(
    source: da.Array | BlockPixels, target: Level, axes, stats: bool, compute, resume: bool,
    tally: Tally | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Store the blocks of `source` that `target` lacks (all of them on a fresh write); the
    chunks kept count as stored in `tally`. With `stats`, a kept chunk's min/max come from the
    decode that checks it, a new chunk's from the task that stores it (block pixels) or from
    reading it back."""
    reduce_axes = tuple(i for i, a in enumerate(axes) if a != "c")
    files = ChunkFiles.for_level(target, skip_empty=False)
    run_tasks = getattr(compute, "run_tasks", None)
    blockwise = stats and files is not None and run_tasks is not None
    done = written_blocks(target, reduce_axes if blockwise else None) if resume else {}
    if not done:
        return store_level(source, target, axes, stats=stats, compute=compute)
    unit = source.chunk_shape if isinstance(source, BlockPixels) else source.chunksize
    grid = [-(-n // c) for n, c in zip(source.shape, unit, strict=True)]
    todo = [b for b in (tuple(int(i) for i in b) for b in np.ndindex(*grid)) if b not in done]
    if isinstance(tally, Tally):
        tally.skip(len(done))
    log.info("resuming: %d of %d chunks already written", len(done), len(done) + len(todo))
    # block pixels stored on threads return the min/max of the chunks they store
    fused_stats = (blockwise and isinstance(source, BlockPixels)
                   and _chunk_files(source, target) is not None)
    new = (store_level(source, target, axes, stats=fused_stats, compute=compute, blocks=todo)
           if todo else (None, None))
    if not stats:
        return None, None
    if not blockwise:
        return _stored_stats(target, axes, compute)
    assert files is not None and run_tasks is not None
    channel_axis = axes.index("c") if "c" in axes else None
    pixels = StoredPixels(files)
    kept = list(done)
    lo, hi = merge_stats([done[b] for b in kept], kept, pixels.shape, pixels.chunk_shape,
                         channel_axis)
    if todo and not fused_stats:  # read the new chunks back
        new = merge_stats(stats_of_blocks(pixels, reduce_axes, run_tasks, blocks=todo), todo,
                          pixels.shape, pixels.chunk_shape, channel_axis)
    if new[0] is not None and new[1] is not None:
        lo, hi = np.minimum(lo, new[0]), np.maximum(hi, new[1])
    return lo, hi


def _stored_stats(target: Level, axes, compute) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-channel finite min/max of a stored level, read back through dask (after a resume
    whose chunks are not plain chunk files stored on local threads)."""
    import dask.array as da

    return store_level(da.from_zarr(target.zarr_array()), None, axes, stats=True,
                       compute=compute)
