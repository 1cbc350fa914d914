"""Whole chunks of a local zarr array, encoded and written (or read and decoded) in the calling
thread.

zarr-python 3 routes every write through its event-loop thread and a thread-pool hop per codec.
For the 1-4 MiB chunks fusion makes, that machinery costs ~4 ms a chunk, mostly holding the GIL,
which is more than fusing the chunk. A :class:`ChunkFiles` encodes a chunk with the very codec
the array was created with (the numcodecs compressors release the GIL), pads an edge chunk with
the fill value as zarr does, and writes the bytes under the key zarr's own chunk-key encoding
gives, through a temporary file and a rename so a crash never leaves half a chunk. The files are
byte-for-byte what zarr writes (tested). Reading is the same path backwards, used to build
each pyramid level from the one below. Arrays whose codecs it does not reproduce exactly
(sharding, filters, transposes, big-endian, remote stores) get no ChunkFiles; callers then go
through zarr as before.

Empty chunks are told as zarr tells them: equal to the fill value with NaN equal to NaN, a 0.0
fill compared bit for bit (a chunk of -0.0 is stored), and a zarr v2 ``fill_value`` of None
meaning the dtype's default (0). A chunk file is synced to disk before it is renamed into place,
and :func:`remove_partial_files` deletes the temporaries a killed writer left behind.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tilefuse.ome_zarr.zarr_nodes import BLOSC, ZSTD_LEVEL, Level, chunk_key

if TYPE_CHECKING:
    import zarr

__all__ = ["ChunkFiles", "remove_partial_files"]

# The temporary a chunk is written to before its rename: ``.{chunk name}.{uuid4 hex}.partial``,
# or, by zarr's local store (a shard file), ``{name without suffix}.{uuid4 hex}.partial``.
_PARTIAL = re.compile(r"\.?[^.].*\.[0-9a-f]{32}\.partial")


@dataclass(frozen=True)
class ChunkFiles:
    """Writes and reads whole chunks of one zarr array (v2 or v3) stored in a local folder.

    Every chunk file is synced to disk (``os.fsync``) before its rename, so after a power cut
    or an OS crash a chunk is the old one or the new one, never a renamed empty file. It costs
    what writing the bytes to the disk costs: +18% on a 64-tile fusion here.

    Attributes
    ----------
    folder : str
        The array's folder.
    shape, chunks : tuple of int
        Array and chunk shape.
    dtype : numpy.dtype
    fill_value : scalar or None
        Pads edge chunks; None (zarr v2) means the dtype's default, 0, as zarr reads it.
    key : callable
        Names chunk files (``key(block) -> str``, relative to `folder`), as zarr does.
    compressor : numcodecs codec or None
    encode_array : bool
        Hand the compressor the array (v2: Blosc takes the typesize from it) or its bytes (v3).
    skip_empty : bool
        Do not store chunks that are all fill value (zarr's ``write_empty_chunks=False``).
    """

    folder: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any
    key: Callable[[tuple[int, ...]], str]
    compressor: Any
    encode_array: bool
    skip_empty: bool

    @classmethod
    def for_level(cls, level: Level, *, skip_empty: bool) -> ChunkFiles | None:
        """Chunk files of a level tilefuse creates (:class:`~tilefuse.ome_zarr.zarr_nodes.Level`,
        without zarr-python), or None when it is sharded or cannot be written here."""
        dtype = np.dtype(level.dtype)
        if level.shards is not None or sys.byteorder != "little" or dtype.kind not in "biuf":
            return None
        fmt = level.spec.zarr_format
        make = functools.partial(
            cls, folder=str(level.folder), shape=tuple(level.shape), chunks=tuple(level.chunks),
            dtype=dtype, fill_value=dtype.type(0), skip_empty=skip_empty,
            key=functools.partial(chunk_key, zarr_format=fmt))
        if fmt == 2:
            from numcodecs.blosc import Blosc

            blosc = {k: v for k, v in BLOSC.items() if k != "id"}
            return make(compressor=Blosc(**blosc), encode_array=True)
        from numcodecs.zstd import Zstd

        return make(compressor=Zstd(level=ZSTD_LEVEL, checksum=False), encode_array=False)

    @classmethod
    def for_array(cls, array: zarr.Array, *, skip_empty: bool) -> ChunkFiles | None:
        """Chunk files of ``array``, or None when its storage is not one this class reproduces."""
        import numcodecs
        from zarr.codecs import BytesCodec, ZstdCodec
        from zarr.storage import LocalStore

        meta = array.metadata
        dtype = np.dtype(array.dtype)
        store = array.store_path.store
        if not isinstance(store, LocalStore) or sys.byteorder != "little":
            return None
        if dtype.byteorder == ">" or dtype.kind not in "biuf":
            return None
        folder = str(Path(store.root) / array.path)
        make = functools.partial(
            cls, folder=folder, shape=tuple(array.shape), chunks=tuple(array.chunks), dtype=dtype,
            fill_value=meta.fill_value, key=meta.encode_chunk_key, skip_empty=skip_empty)
        if meta.zarr_format == 2:
            if meta.filters or meta.order != "C":
                return None
            return make(compressor=meta.compressor, encode_array=True)
        codecs = tuple(meta.codecs)
        if not codecs or not isinstance(codecs[0], BytesCodec) or len(codecs) > 2:
            return None
        if codecs[0].endian is not None and codecs[0].endian.value != "little":
            return None
        if len(codecs) == 1:
            return make(compressor=None, encode_array=False)
        if not isinstance(codecs[1], ZstdCodec):
            return None
        zstd = numcodecs.Zstd(level=codecs[1].level, checksum=codecs[1].checksum)
        return make(compressor=zstd, encode_array=False)

    def path(self, block: tuple[int, ...]) -> Path:
        """The file that holds chunk ``block``."""
        return Path(self.folder) / self.key(tuple(block))

    def write(self, block: tuple[int, ...], data: np.ndarray) -> None:
        """Encode and store one chunk.

        Parameters
        ----------
        block : tuple of int
            Chunk index per axis.
        data : numpy.ndarray
            The chunk's values; smaller than ``chunks`` at the array's far edges.
        """
        path, payload = self.encode(block, data)
        store_file(path, payload)

    def encode(self, block: tuple[int, ...], data: np.ndarray) -> tuple[Path, memoryview | None]:
        """One chunk's file and its bytes (:meth:`write` without the writing); None for a chunk
        that is not stored (all fill value, when empty chunks are skipped).

        Parameters
        ----------
        block, data
            As in :meth:`write`.
        """
        chunk = np.ascontiguousarray(data, dtype=self.dtype)
        if chunk.shape != self.chunks:
            padded = np.full(self.chunks, self._fill, dtype=self.dtype)
            padded[tuple(slice(0, n) for n in chunk.shape)] = chunk
            chunk = padded
        path = self.path(block)
        if self.skip_empty and _all_fill(chunk, self._fill):
            return path, None
        payload = chunk if self.encode_array else chunk.reshape(-1).view(np.uint8)
        # bytes of their own: they may be written after the caller has reused `data`
        encoded = (self.compressor.encode(payload) if self.compressor is not None
                   else payload.tobytes())
        return path, memoryview(encoded).cast("B")

    @property
    def _fill(self) -> Any:
        """The fill value as zarr applies it: a v2 ``None`` is the dtype's default (0)."""
        return self.dtype.type(0) if self.fill_value is None else self.fill_value

    def read(self, block: tuple[int, ...]) -> np.ndarray:
        """Decode one stored chunk; the fill value where none is stored.

        Returns
        -------
        numpy.ndarray
            The chunk cropped to the array, shape ``chunks`` or smaller at the far edges;
            read-only when it comes from a file.
        """
        box = tuple(slice(b * c, min((b + 1) * c, n))
                    for b, c, n in zip(block, self.chunks, self.shape, strict=True))
        size = tuple(s.stop - s.start for s in box)
        try:
            raw = self.path(block).read_bytes()
        except FileNotFoundError:
            return np.full(size, self._fill, dtype=self.dtype)
        if self.compressor is not None:
            raw = self.compressor.decode(raw)
        chunk = np.frombuffer(raw, dtype=self.dtype).reshape(self.chunks)
        return chunk[tuple(slice(0, n) for n in size)]


def store_file(path: Path, payload: memoryview | None) -> None:
    """Store one encoded chunk (:meth:`ChunkFiles.encode`): write `payload` to `path` (synced,
    renamed into place), or, for None, remove the file a previous run may have left."""
    if payload is None:
        path.unlink(missing_ok=True)
    else:
        _write_atomic(path, payload)


class FileWriter:
    """Stores encoded chunks on background threads, so that the threads fusing and encoding
    chunks do not wait for the disk (each file is synced before its rename: ~3 ms a chunk).

    ``submit(path, payload)`` queues one file (:func:`store_file`) and returns at once, unless
    `pending` files are queued already (then it waits for one: the encoded bytes held are
    bounded); it raises the error of a file that failed before. :meth:`wait` (or leaving a
    ``with`` block) returns once every queued file is stored, raising the first error.

    Parameters
    ----------
    threads : int
        Files written at once.
    pending : int
        Files queued at most.
    """

    def __init__(self, threads: int = 2, pending: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tilefuse-io")
        self._room = threading.BoundedSemaphore(pending)
        self._error: BaseException | None = None  # the first failure, set as files finish

    def submit(self, path: Path, payload: memoryview | None) -> None:
        """Queue one file (see the class)."""
        if self._error is not None:
            raise self._error
        self._room.acquire()
        try:
            future = self._pool.submit(store_file, path, payload)
        except BaseException:
            self._room.release()
            raise
        future.add_done_callback(self._done)

    def _done(self, future: Future[None]) -> None:
        self._room.release()
        if future.exception() is not None and self._error is None:
            self._error = future.exception()

    def wait(self) -> None:
        """Return once every queued file is stored; raise the first failure."""
        self._pool.shutdown(wait=True)  # every file's _done has run when this returns
        if self._error is not None:
            raise self._error

    def __enter__(self) -> FileWriter:
        return self

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        if kind is None:
            self.wait()
        else:  # already failing: let the queued files finish, keep the first error
            self._pool.shutdown(wait=True)


def _all_fill(chunk: np.ndarray, fill: Any) -> bool:
    """Whether ``chunk`` is all ``fill``, as zarr decides (``NDBuffer.all_equal``): NaN equals
    NaN, and a 0.0 fill is compared bit for bit, so a chunk of -0.0 is not empty."""
    fill = np.asarray(fill, dtype=chunk.dtype)
    if chunk.dtype.kind == "f":
        if fill == 0:
            bits = f"u{chunk.dtype.itemsize}"
            return bool(np.all(chunk.view(bits) == fill.view(bits)))
        if np.isnan(fill):
            return bool(np.isnan(chunk).all())
    return bool(np.all(chunk == fill))


def _write_atomic(path: Path, payload: memoryview) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder, synced to disk
    before the rename, so a crash leaves the old chunk or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_partial_files(folder: str | os.PathLike[str]) -> int:
    """Delete the temporaries that writes killed before their rename left under ``folder``.

    Only files named as :class:`ChunkFiles` names them (``.{chunk}.{32 hex digits}.partial``)
    or as zarr's local store names them (``{name}.{32 hex digits}.partial``: shard files)
    are touched; anything else, and every stored chunk, stays. Call it when no writer is
    running on the folder (a run that starts or resumes): it would delete a live temporary.

    Parameters
    ----------
    folder : path
        A zarr array, group or store folder; searched recursively. A missing folder is fine.

    Returns
    -------
    int
        How many files were deleted.
    """
    removed = 0
    for root, _, names in os.walk(folder):
        for name in names:
            if _PARTIAL.fullmatch(name):
                Path(root, name).unlink(missing_ok=True)
                removed += 1
    return removed
