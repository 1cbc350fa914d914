"""The per-process cache of decoded tiles, and :func:`read_tile`, the way every stage reads one.

:func:`read_tile` decodes through a byte-bounded LRU cache shared by the threads of one process,
so a tile touching four output chunks is decoded once, not four times. A chunk of a 3D mosaic
asks for the planes of a translated z-stack it needs (``planes=(start, stop)``): sources that
can read planes apart (TIFF and CZI z-stacks, plane files, OME-Zarr, arrays) decode only those,
cached apart, so a 64-plane chunk of a 1,000-plane stack decodes 65 planes and the cache holds
windows, not whole stacks.

The cache keys pixels by what they are, not by where they were: an in-memory tile by a token
drawn when its :class:`~tilefuse.io.tiles.ArraySource` is made (never ``id()``, which a later
array may reuse), a file by its path with its size and modification time at read time (a tile
re-exported during a long session is decoded again). It hands out read-only views of its own
and never changes the flags of a caller's array.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

__all__ = ["DEFAULT_CACHE_BYTES", "cache_stats", "clear_cache", "read_tile", "set_cache_limit"]

DEFAULT_CACHE_BYTES = 512 * 2**20
"""Decoded-tile cache budget per process when none is given (``--cache-mb 512``)."""


def _stamp(source) -> tuple:
    """The state of the files behind ``source`` (:meth:`FileSource.stamp`); a source that wraps
    another (``.source``, e.g. an intensity correction) has its inner source's; none for arrays."""
    for _ in range(16):
        stamp = getattr(source, "stamp", None)
        if callable(stamp):
            return stamp()
        source = getattr(source, "source", None)
        if source is None:
            break
    return ()


class _TileCache:
    """Byte-bounded LRU cache of decoded tiles, safe for the threads of one process.

    Entries are keyed by ``(source.key, stamp)``: a file rewritten since it was cached has a new
    stamp, so it is decoded again and its stale pixels are dropped.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._stamps: dict[tuple, tuple] = {}  # source.key -> the stamp of its cached entry
        self._bytes = 0
        self._lock = threading.Lock()
        self._loading: dict[tuple, threading.Lock] = {}
        self.decodes = 0
        self.decoded_bytes = 0

    def get(self, source, planes: tuple[int, int] | None = None) -> np.ndarray | None:
        """The tile's pixels (``source.read()``), or with ``planes`` its planes
        ``source.read_planes(*planes)`` (cached apart; None, uncached, where the source cannot
        read them in part)."""
        tile_key = source.key if planes is None else (source.key, planes)
        key = (tile_key, _stamp(source))
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:  # one thread decodes a tile; the others wait for it
            with self._lock:
                if key in self._items:
                    return self._items[key]
            try:
                read = source.read() if planes is None else source.read_planes(*planes)
            except BaseException:
                with self._lock:
                    self._loading.pop(key, None)
                raise
            if read is None:
                with self._lock:
                    self._loading.pop(key, None)
                return None
            data = read.view()  # our own view: the caller's flags stay as they are
            data.flags.writeable = False
            with self._lock:
                self.decodes += 1
                self.decoded_bytes += data.nbytes
                self._loading.pop(key, None)
                stale = self._stamps.pop(tile_key, None)  # the same tile, as it was before
                if stale is not None and (tile_key, stale) in self._items:
                    self._bytes -= self._items.pop((tile_key, stale)).nbytes
                if data.nbytes <= self.limit:
                    self._items[key] = data
                    self._stamps[tile_key] = key[1]
                    self._bytes += data.nbytes
                    self._evict()
        return data

    def _evict(self) -> None:
        """Drop the least recently used tiles until the budget holds (lock held)."""
        while self._bytes > self.limit and self._items:
            (tile_key, stamp), old = self._items.popitem(last=False)
            if self._stamps.get(tile_key) == stamp:
                del self._stamps[tile_key]
            self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._stamps.clear()
            self._bytes = 0
            self.decodes = 0
            self.decoded_bytes = 0


_CACHE = _TileCache(DEFAULT_CACHE_BYTES)


def set_cache_limit(limit_bytes: int) -> None:
    """Set this process's tile cache budget in bytes (shrinks the cache at once)."""
    with _CACHE._lock:
        _CACHE.limit = int(limit_bytes)
        _CACHE._evict()


def cache_stats() -> dict:
    """Decodes (whole tiles or planes) and bytes decoded so far, and bytes held, by this
    process's tile cache."""
    return {"decodes": _CACHE.decodes, "decoded_bytes": _CACHE.decoded_bytes,
            "bytes": _CACHE._bytes, "limit": _CACHE.limit}


def clear_cache() -> None:
    """Drop every cached tile, reset the decode counters and forget which sources could not
    read planes apart."""
    _CACHE.clear()
    _WHOLE.clear()


def read_tile(source, cache_limit: int | None = None,
              planes: tuple[int, int] | None = None) -> np.ndarray:
    """Pixels of one tile, shape ``(c, *spatial)``, through the process's cache.

    Parameters
    ----------
    source : FileSource, PlaneStackSource, ArraySource or a source wrapping one
    cache_limit : int, optional
        Budget in bytes for this process's cache; applied before reading when given.
    planes : (int, int), optional
        Only planes ``start:stop`` of a z-stack: read alone where the source can
        (``source.read_planes``: TIFF z-stacks of one page per plane, plane files, CZI stacks,
        OME-Zarr tiles, arrays), else cut from the whole tile (read once, cached whole).

    Returns
    -------
    numpy.ndarray, shape (c, *spatial), or (c, stop - start, y, x) with ``planes``
        Read-only, shared with other readers of the same tile (or planes) in this process.
    """
    if cache_limit is not None and cache_limit != _CACHE.limit:
        set_cache_limit(cache_limit)
    if planes is not None and hasattr(source, "read_planes") and source.key not in _WHOLE:
        part = _CACHE.get(source, planes)
        if part is not None:
            return part
        _WHOLE.add(source.key)  # read whole from now on: one decode serves every window
    data = _CACHE.get(source)
    assert data is not None
    return data if planes is None else data[:, planes[0]:planes[1]]


_WHOLE: set[tuple] = set()
"""Keys of the sources found unable to read planes apart (e.g. a z-stack in one TIFF page)."""
