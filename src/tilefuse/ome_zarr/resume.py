"""Resuming an interrupted fusion when tile files changed in between.

The run manifest keeps one short digest per tile of the size and modification time of every
file the tile is read from. A resume with the same parameters but changed tile files (a broken
tile replaced, say) fuses again every level-0 chunk a changed tile touches, and keeps the rest;
without that check, chunks fused from the old pixels would survive in silence.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from tilefuse.errors import InputError
from tilefuse.model.layout import Layout

__all__ = ["TILE_FILES_KEY", "refresh_changed_tiles", "tile_digests"]

log = logging.getLogger(__name__)

TILE_FILES_KEY = "tile_files"
"""Manifest entry: one digest per tile of its files' sizes and modification times."""


def tile_files(tile) -> list[str]:
    """The files one tile is read from: every channel file, every z plane (through a source
    that wraps another, such as an intensity-corrected one)."""
    source = tile.source
    while hasattr(source, "source"):
        source = source.source
    planes = getattr(source, "planes", None)
    if planes:
        return [path for plane in planes for path in plane]
    return list(getattr(source, "paths", ()))


def tile_digests(layouts: list[Layout]) -> list[str]:
    """Per tile (all time points in order), 12 hex digits of its files' (size, mtime)."""
    out = []
    for layout in layouts:
        for tile in layout.tiles:
            stats: list[tuple[int, int] | None] = []
            for path in tile_files(tile):
                try:
                    st = os.stat(path)
                    stats.append((st.st_size, st.st_mtime_ns))
                except OSError:
                    stats.append(None)
            out.append(hashlib.sha256(repr(stats).encode()).hexdigest()[:12])
    return out


def refresh_changed_tiles(output: Path, saved: dict, manifest: dict, plan) -> None:
    """Before a resume whose manifest differs from the saved one only in tile files: delete
    the level-0 chunks that changed tiles touch (they are fused again) and record the new
    digests, so the resume goes on. Does nothing when the manifests differ otherwise (the
    writer then refuses the resume) or not at all.

    A finished image is never touched: its resume is refused by the writer (tile files
    differ), since deleting chunks there would leave holes under a stale pyramid.

    Parameters
    ----------
    output : Path
        The unfinished image folder.
    saved, manifest : dict
        The manifest of the interrupted run and of this one.
    plan : FusionPlan or tuple of FusionPlan
        This run's plan (a tuple for a time series: any change there is refused).
    """
    import zarr

    from tilefuse.io.outputs import MANIFEST_KEY, is_finished

    old, new = saved.get(TILE_FILES_KEY), manifest.get(TILE_FILES_KEY)
    others = {k for k in set(saved) | set(manifest) if k != TILE_FILES_KEY
              and saved.get(k) != manifest.get(k)}
    if old == new or others or old is None or new is None or len(old) != len(new):
        return
    if is_finished(output):
        return
    changed = [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]
    if not hasattr(plan, "chunks"):  # a time series' plan
        raise InputError(f"{output}: {len(changed)} tile file(s) changed since this time series "
                         "run started; start again with --overwrite")
    try:
        group = zarr.open_group(output, mode="r+")
    except Exception as exc:  # zarr's own errors: the output is not what it should be
        raise InputError(f"{output}: cannot open the interrupted output to resume ({exc})"
                         ) from exc
    removed = (_remove_chunks_of(group["0"], output / "0", plan, set(changed))
               if "0" in group else 0)  # killed before level 0 existed: nothing to remove
    group.attrs[MANIFEST_KEY] = {**saved, TILE_FILES_KEY: new}
    log.warning("%d tile file(s) changed since the run started (first: %s); the %d written "
                "chunk(s) they touch are fused again", len(changed),
                plan.layout.tiles[changed[0]].name, removed)


def _remove_chunks_of(level, folder: Path, plan, tiles: set[int]) -> int:
    """Delete the chunk files of `level` whose chunk a tile of `tiles` touches (the shard
    files holding such a chunk, when sharded)."""
    removed = 0
    chunk_plan = plan.chunks
    per_file = [s // c for s, c in zip(level.shards or level.chunks, level.chunks, strict=True)]
    keys: set[tuple[int, ...]] = set()
    for block in np.ndindex(*chunk_plan.grid):
        if tiles.isdisjoint(int(t) for t in chunk_plan.tiles_of(block)):
            continue
        keys.update(tuple(b // n for b, n in zip(full, per_file, strict=True))
                    for full in _with_channels(level, block))
    for key in sorted(keys):
        path = folder / level.metadata.encode_chunk_key(key)
        if path.is_file():
            path.unlink()
            removed += 1
    return removed


def _with_channels(level, block: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The level's chunk indices of spatial `block` (every channel chunk when there is a c axis)."""
    extra = level.ndim - len(block)
    if extra == 0:
        return [tuple(block)]
    lead = [range(-(-level.shape[k] // level.chunks[k])) for k in range(extra)]
    return [(*head, *block) for head in np.ndindex(*(len(r) for r in lead))]
