"""ChunkFiles writes the very files zarr would, and nothing half-written."""

from __future__ import annotations

import os
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import zarr

from tilefuse.ome_zarr import chunkstore
from tilefuse.ome_zarr.chunkstore import ChunkFiles

V2 = {"compressors": numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
      "chunk_key_encoding": {"name": "v2", "separator": "/"}}


def _pair(tmp_path, fmt: int, data: np.ndarray, chunks, **options):
    """The same empty array twice: one for zarr to fill, one for the ChunkFiles."""
    group = zarr.open_group(tmp_path / f"v{fmt}.zarr", mode="w", zarr_format=fmt)
    return [group.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype,
                               config={"write_empty_chunks": True}, **options)
            for name in ("by-zarr", "by-writer")]


def _write_all(writer: ChunkFiles, data: np.ndarray, chunks) -> None:
    grid = [-(-n // c) for n, c in zip(data.shape, chunks, strict=True)]
    for block in np.ndindex(*grid):
        region = tuple(slice(b * c, (b + 1) * c) for b, c in zip(block, chunks, strict=True))
        writer.write(block, data[region])


@pytest.mark.parametrize(("fmt", "options"), [(3, {}), (2, V2), (2, {"compressors": None}),
                                              (3, {"compressors": None})])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_files_are_byte_identical_to_zarrs(tmp_path, fmt, options, dtype):
    rng = np.random.default_rng(4)
    data = rng.normal(100, 20, (2, 37, 50)).astype(dtype)  # edge chunks on both spatial axes
    chunks = (1, 16, 16)
    by_zarr, by_writer = _pair(tmp_path, fmt, data, chunks, **options)
    by_zarr[...] = data
    writer = ChunkFiles.for_array(by_writer, skip_empty=False)
    assert writer is not None
    _write_all(writer, data, chunks)
    zarr_folder = tmp_path / f"v{fmt}.zarr" / "by-zarr"
    for block in np.ndindex(2, 3, 4):
        key = by_writer.metadata.encode_chunk_key(block)
        assert (zarr_folder / key).read_bytes() == writer.path(block).read_bytes(), block
    np.testing.assert_array_equal(zarr.open_array(writer.folder)[...], data)


@pytest.mark.parametrize(("fmt", "options"), [(3, {}), (2, V2), (2, {"compressors": None}),
                                              (3, {"compressors": None})])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_read_gives_back_what_zarr_stored(tmp_path, fmt, options, dtype):
    rng = np.random.default_rng(6)
    data = rng.normal(100, 20, (2, 37, 50)).astype(dtype)
    chunks = (1, 16, 16)
    by_zarr, _ = _pair(tmp_path, fmt, data, chunks, **options)
    by_zarr[...] = data
    files = ChunkFiles.for_array(by_zarr, skip_empty=False)
    for block in np.ndindex(2, 3, 4):
        region = tuple(slice(b * c, (b + 1) * c) for b, c in zip(block, chunks, strict=True))
        got = files.read(block)
        assert got.dtype == data.dtype
        np.testing.assert_array_equal(got, data[region], err_msg=str(block))


def test_read_of_an_unstored_chunk_is_the_fill_value(tmp_path):
    array = zarr.create_array(tmp_path / "a.zarr", shape=(8, 6), chunks=(4, 4), dtype="u2",
                              fill_value=9)
    array[:4, :4] = 1
    files = ChunkFiles.for_array(array, skip_empty=True)
    np.testing.assert_array_equal(files.read((0, 0)), np.ones((4, 4)))
    np.testing.assert_array_equal(files.read((1, 1)), np.full((4, 2), 9))  # edge, never stored


def test_empty_chunks_skipped_only_when_asked(tmp_path):
    data = np.zeros((8, 8), np.uint16)
    data[:4, :4] = 7
    for skip, expected in ((True, 1), (False, 4)):
        array = zarr.create_array(tmp_path / f"skip-{skip}.zarr", shape=data.shape,
                                  chunks=(4, 4), dtype=data.dtype)
        writer = ChunkFiles.for_array(array, skip_empty=skip)
        _write_all(writer, data, (4, 4))
        files = [p for p in (tmp_path / f"skip-{skip}.zarr" / "c").rglob("*") if p.is_file()]
        assert len(files) == expected
        np.testing.assert_array_equal(array[...], data)


def test_unknown_codecs_get_no_writer(tmp_path):
    gzip = zarr.create_array(tmp_path / "gzip.zarr", shape=(8, 8), chunks=(4, 4), dtype="u2",
                             compressors=zarr.codecs.GzipCodec())
    sharded = zarr.create_array(tmp_path / "shard.zarr", shape=(8, 8), chunks=(2, 2),
                                shards=(4, 4), dtype="u2")
    in_memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(8, 8), chunks=(4, 4),
                                  dtype="u2")
    for array in (gzip, sharded, in_memory):
        assert ChunkFiles.for_array(array, skip_empty=False) is None


def test_failed_write_leaves_no_chunk_file(tmp_path, monkeypatch):
    array = zarr.create_array(tmp_path / "a.zarr", shape=(4, 4), chunks=(4, 4), dtype="u2")
    writer = ChunkFiles.for_array(array, skip_empty=False)

    class Boom(OSError):
        pass

    def failing_open(*args, **kwargs):
        class File:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def write(self, payload):
                raise Boom("disk vanished")

        open(args[0], "wb").close()  # the temporary file exists when the write fails
        return File()

    monkeypatch.setattr(chunkstore, "open", failing_open, raising=False)
    with pytest.raises(Boom):
        writer.write((0, 0), np.ones((4, 4), np.uint16))
    assert not writer.path((0, 0)).exists()
    assert not list((tmp_path / "a.zarr").rglob("*.partial"))


def test_write_ome_zarr_same_image_through_zarr(tmp_path, monkeypatch):
    """The fallback (zarr's own writes) and the direct writer store the same image."""
    from tilefuse import fuse, layout_from_arrays
    from tilefuse.ome_zarr.writer import read_ome_zarr_level, write_ome_zarr

    rng = np.random.default_rng(5)
    tiles = [rng.integers(0, 60000, (2, 40, 50), dtype=np.uint16) for _ in range(4)]
    layout = layout_from_arrays(tiles, positions=[[0, 0], [0, 45.5], [35.25, 0], [35, 45]],
                                channels=["a", "b"])
    write_ome_zarr(fuse(layout, chunk=16), tmp_path / "direct.ome.zarr")
    monkeypatch.setattr(ChunkFiles, "for_level", classmethod(lambda cls, a, **k: None))
    write_ome_zarr(fuse(layout, chunk=16), tmp_path / "zarr.ome.zarr")
    for level in range(3):
        np.testing.assert_array_equal(read_ome_zarr_level(tmp_path / "direct.ome.zarr", level),
                                      read_ome_zarr_level(tmp_path / "zarr.ome.zarr", level))
    direct = zarr.open_group(tmp_path / "direct.ome.zarr").attrs.asdict()
    through = zarr.open_group(tmp_path / "zarr.ome.zarr").attrs.asdict()
    assert direct["ome"]["omero"] == through["ome"]["omero"]  # the same display windows


def _stored(folder) -> dict:
    """Every chunk file under an array's folder (metadata left out): relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith((".z", "zarr.json"))}


@pytest.mark.parametrize(("fmt", "dtype", "fill"), [
    (3, "float32", np.nan), (2, "float32", np.nan), (3, "float64", np.nan),
    (3, "float32", 0.0), (2, "float32", None), (2, "uint16", None), (2, "uint16", 5),
])
def test_empty_chunks_skipped_exactly_as_zarr_skips_them(tmp_path, fmt, dtype, fill):
    """A NaN fill (NaN != NaN), a None fill (zarr v2: the dtype's default) and -0.0 against a
    0.0 fill (zarr compares bits) store the same files as zarr, edge chunks included."""
    default = 0 if fill is None else fill
    data = np.full((10, 11), default, dtype)  # chunks (4, 4): 3 x 3, edges on both axes
    data[0, 0] = 1  # chunk (0, 0) holds data; (0, 1), (1, 1) and the edge (2, 2) stay empty
    data[4:8, 0:4] = -0.0 if np.dtype(dtype).kind == "f" else 1  # (1, 0): fill == -0.0
    data[8:, 4:8] = 2  # the edge chunk (2, 1) holds data; zarr pads it with the fill
    data[4, 8] = np.nan if np.dtype(dtype).kind == "f" else 3  # (1, 2): a NaN in data
    arrays = []
    for name in ("by-zarr", "by-writer"):
        group = zarr.open_group(tmp_path / name, mode="w", zarr_format=fmt)
        arrays.append(group.create_array("a", shape=data.shape, chunks=(4, 4), dtype=dtype,
                                         fill_value=fill, config={"write_empty_chunks": False}))
    by_zarr, by_writer = arrays
    by_zarr[...] = data
    writer = ChunkFiles.for_array(by_writer, skip_empty=True)
    assert writer is not None
    _write_all(writer, data, (4, 4))
    expected = _stored(tmp_path / "by-zarr" / "a")
    assert 0 < len(expected) < 9
    assert _stored(tmp_path / "by-writer" / "a") == expected
    np.testing.assert_array_equal(by_writer[...], data)
    for block in np.ndindex(3, 3):  # unstored chunks read back as zarr reads them
        region = tuple(slice(b * 4, (b + 1) * 4) for b in block)
        np.testing.assert_array_equal(writer.read(block), data[region], err_msg=str(block))


def test_a_chunk_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """fsync before rename: after a power cut the chunk is the old one or the new one, never a
    renamed empty file."""
    array = zarr.create_array(tmp_path / "a.zarr", shape=(8, 4), chunks=(4, 4), dtype="u2")
    writer = ChunkFiles.for_array(array, skip_empty=False)
    events = []
    real_fsync, real_replace = chunkstore.os.fsync, chunkstore.os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(chunkstore.os, "fsync", fsync)
    monkeypatch.setattr(chunkstore.os, "replace", replace)
    _write_all(writer, np.arange(32, dtype=np.uint16).reshape(8, 4), (4, 4))
    replaced = [i for i, (kind, _) in enumerate(events) if kind == "replace"]
    assert len(replaced) == 2
    for i in replaced:  # the very file renamed was synced before
        assert ("fsync", events[i][1]) in events[:i]
    np.testing.assert_array_equal(array[...], np.arange(32).reshape(8, 4))


@pytest.mark.parametrize(("fmt", "options"), [(3, {}), (2, V2)])
def test_leftover_partial_files_are_removed(tmp_path, fmt, options):
    data = np.arange(2 * 37 * 50, dtype=np.uint16).reshape(2, 37, 50)
    _, array = _pair(tmp_path, fmt, data, (1, 16, 16), **options)
    writer = ChunkFiles.for_array(array, skip_empty=False)
    _write_all(writer, data, (1, 16, 16))
    folder = Path(writer.folder)
    leftovers = []
    for block in ((0, 0, 0), (1, 2, 3)):  # as a kill between write and rename leaves them
        chunk = writer.path(block)
        leftovers.append(chunk.with_name(f".{chunk.name}.{'ab12' * 8}.partial"))
        leftovers[-1].write_bytes(b"half a chunk")
    nested = folder / "c" / "9" / f".7.{'0f' * 16}.partial"
    nested.parent.mkdir(parents=True, exist_ok=True)
    nested.write_bytes(b"")
    foreign = [folder / "notes.partial", folder / ".x.partial", folder / f".y.{'Z' * 32}.partial"]
    for path in foreign:  # not named as a ChunkFiles temporary: not ours to delete
        path.write_bytes(b"keep")
    assert chunkstore.remove_partial_files(folder) == 3
    assert not any(p.exists() for p in (*leftovers, nested))
    assert all(p.exists() for p in foreign)
    np.testing.assert_array_equal(zarr.open_array(folder)[...], data)
    assert chunkstore.remove_partial_files(folder) == 0
    assert chunkstore.remove_partial_files(tmp_path / "missing") == 0


# ------------------------------------------------------------------- files written in the back


def test_file_writer_has_stored_every_file_when_it_returns(tmp_path):
    """Files queued to the background writer are all in place (renamed, no temporaries) once
    ``wait`` returns; a None payload removes the file an earlier run left."""
    stale = tmp_path / "c" / "9"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    with chunkstore.FileWriter(threads=2, pending=2) as files:
        for i in range(20):
            files.submit(tmp_path / "c" / str(i), memoryview(bytes([i]) * (1000 + i)))
        files.submit(stale, None)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted(
        str(i) for i in range(20) if i != 9)
    assert all((tmp_path / "c" / str(i)).read_bytes() == bytes([i]) * (1000 + i)
               for i in range(20) if i != 9)


def test_file_writer_holds_at_most_pending_files(tmp_path, monkeypatch):
    """``submit`` waits while `pending` files are queued: the encoded bytes held are bounded.
    When a submit returns, at most `pending` files are submitted and not yet stored (a file
    counts as stored before its slot is given back, so this count never overstates the
    queue); without the bound it would reach 12, the disk being slower than the submits."""
    import threading
    import time

    submitted, stored, most, lock = [0], [0], [0], threading.Lock()

    def slow_store(path, payload):
        time.sleep(0.01)
        with lock:
            stored[0] += 1

    monkeypatch.setattr(chunkstore, "store_file", slow_store)
    with chunkstore.FileWriter(threads=1, pending=3) as files:
        for i in range(12):
            files.submit(tmp_path / str(i), memoryview(b"x"))
            with lock:
                submitted[0] += 1
                most[0] = max(most[0], submitted[0] - stored[0])
    assert stored[0] == 12
    assert most[0] == 3  # the queue fills up to its bound, and never beyond


def test_a_failed_background_write_fails_the_write(tmp_path, monkeypatch):
    """A chunk file that cannot be written (a full disk, say) fails the level: the error
    reaches the caller, and the image is not marked finished."""
    from tilefuse import fuse, layout_from_arrays
    from tilefuse.ome_zarr.writer import is_finished_image, write_ome_zarr

    real = chunkstore.store_file

    def failing(path, payload):
        if path.name == "1" and path.parent.name == "1":
            raise OSError(28, "No space left on device", str(path))
        real(path, payload)

    monkeypatch.setattr(chunkstore, "store_file", failing)
    rng = np.random.default_rng(1)
    tiles = [rng.integers(0, 60000, (40, 50), dtype=np.uint16) for _ in range(4)]
    layout = layout_from_arrays(tiles, positions=[[0, 0], [0, 45.5], [35.25, 0], [35, 45]])
    with pytest.raises(OSError, match="No space left"):
        write_ome_zarr(fuse(layout, chunk=16), tmp_path / "m.ome.zarr")
    assert not is_finished_image(tmp_path / "m.ome.zarr")
    files = chunkstore.FileWriter()
    files.submit(tmp_path / "x" / "1" / "1", memoryview(b"a"))
    with pytest.raises(OSError, match="No space left"):
        files.wait()
    with pytest.raises(OSError, match="No space left"):  # and it refuses more files
        files.submit(tmp_path / "x" / "2", memoryview(b"b"))
