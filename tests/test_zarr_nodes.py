"""tilefuse writes the zarr metadata of its images itself: the very documents zarr-python
writes, read back by zarr-python, and chunk files named and encoded as zarr names them."""

from __future__ import annotations

import dask.array as da
import numcodecs
import numpy as np
import pytest
import zarr

from tilefuse.ome_zarr.chunkstore import ChunkFiles
from tilefuse.ome_zarr.zarr_nodes import (
    ArraySpec,
    Level,
    chunk_key,
    create_group,
    read_group_attributes,
    update_group_attributes,
)

CASES = [  # shape, chunks, dtype, axes, zarr format, shards
    ((100, 130), (32, 64), "uint16", ("y", "x"), 3, None),
    ((3, 100, 130), (1, 32, 64), "float32", ("c", "y", "x"), 3, (1, 64, 128)),
    ((2, 5, 40, 50), (1, 2, 16, 16), "uint8", ("c", "z", "y", "x"), 3, None),
    ((40, 50), (16, 16), "bool", ("y", "x"), 3, (32, 48)),
    ((7, 40, 50), (4, 16, 16), "int64", ("z", "y", "x"), 3, None),
    ((100, 130), (32, 64), "uint16", ("y", "x"), 2, None),
    ((3, 40, 50), (1, 16, 16), "float64", ("c", "y", "x"), 2, None),
    ((40, 50), (16, 16), "int8", ("y", "x"), 2, None),
    ((40, 50), (16, 16), "bool", ("y", "x"), 2, None),
]


def _zarr_python_array(folder, shape, chunks, dtype, axes, fmt, shards):
    """What tilefuse wrote through zarr-python before (create_array as it called it)."""
    group = zarr.open_group(folder, mode="w-", zarr_format=fmt)
    if fmt == 3:
        return group.create_array("0", shape=shape, chunks=chunks, dtype=dtype,
                                  dimension_names=list(axes), shards=shards)
    return group.create_array(
        "0", shape=shape, chunks=chunks, dtype=dtype,
        compressors=numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
        chunk_key_encoding={"name": "v2", "separator": "/"})


@pytest.mark.parametrize(("shape", "chunks", "dtype", "axes", "fmt", "shards"), CASES)
def test_documents_are_the_bytes_zarr_python_writes(tmp_path, shape, chunks, dtype, axes, fmt,
                                                    shards):
    reference = _zarr_python_array(tmp_path / "zarr", shape, chunks, dtype, axes, fmt, shards)
    spec = ArraySpec(shape, chunks, np.dtype(dtype), axes, fmt, shards)
    level = Level(tmp_path / "own" / "0", spec).create()
    names = sorted(p.name for p in (tmp_path / "zarr" / "0").iterdir())
    assert names == sorted(spec.documents())
    for name in names:
        assert (level.folder / name).read_bytes() == (tmp_path / "zarr" / "0" / name).read_bytes()
    # zarr-python opens it as the same array, and reads what the chunk files write
    opened = level.zarr_array()
    assert opened.metadata == reference.metadata
    data = (np.arange(np.prod(shape)).reshape(shape) % 251).astype(dtype)
    files = ChunkFiles.for_level(level, skip_empty=False)
    if shards is not None:
        assert files is None  # a shard holds many chunks: zarr-python writes it
        opened[...] = data
    else:
        assert files is not None
        for block in np.ndindex(*[-(-n // c) for n, c in zip(shape, chunks, strict=True)]):
            box = tuple(slice(b * c, (b + 1) * c) for b, c in zip(block, chunks, strict=True))
            files.write(block, data[box])
            assert files.path(block) == level.folder / reference.metadata.encode_chunk_key(block)
        reference[...] = data
        assert _chunk_bytes(level.folder) == _chunk_bytes(tmp_path / "zarr" / "0")
    np.testing.assert_array_equal(zarr.open_array(level.folder, mode="r")[...], data)


def _chunk_bytes(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (".zarray", ".zattrs", "zarr.json")}


@pytest.mark.parametrize("fmt", [2, 3])
def test_group_documents_and_attribute_updates_are_zarr_pythons(tmp_path, fmt):
    manifest = {"tilefuse": {"tilefuse": "0", "chunk": [1024, 1024], "fill": 0.5}}
    group = zarr.open_group(tmp_path / "zarr", mode="w-", zarr_format=fmt)
    group.attrs.update(manifest)
    (tmp_path / "own").mkdir()
    create_group(tmp_path / "own", fmt, manifest)
    more = {"ome": {"version": "0.5", "multiscales": [{"name": "m"}]}, "tilefuse": {"x": 1}}
    group.attrs.update(more)
    update_group_attributes(tmp_path / "own", fmt, more)
    for name in ("zarr.json",) if fmt == 3 else (".zgroup", ".zattrs"):
        assert (tmp_path / "own" / name).read_bytes() == (tmp_path / "zarr" / name).read_bytes()
    assert read_group_attributes(tmp_path / "own", fmt) == {**manifest, **more}
    assert zarr.open_group(tmp_path / "own", mode="r").attrs.asdict() == {**manifest, **more}


def test_a_group_or_a_level_is_never_written_over(tmp_path):
    """Creating a group where zarr metadata is, or a new level where a folder is, fails: only
    :func:`tilefuse.io.outputs.remove_image` deletes."""
    (tmp_path / "g").mkdir()
    create_group(tmp_path / "g", 3, {"a": 1})
    with pytest.raises(FileExistsError):
        create_group(tmp_path / "g", 3, {"a": 2})
    assert read_group_attributes(tmp_path / "g", 3) == {"a": 1}
    spec = ArraySpec((8, 8), (4, 4), np.dtype("uint16"), ("y", "x"), 3)
    level = Level(tmp_path / "g" / "0", spec).create()
    (level.folder / "c").mkdir()
    (level.folder / "c" / "keep").write_text("mine")
    with pytest.raises(FileExistsError):
        level.create()
    level.create(replace=True)  # a resume's pyramid level: metadata again, nothing deleted
    assert (level.folder / "c" / "keep").read_text() == "mine"


@pytest.mark.parametrize("block", [(0, 1), (2, 0, 5), (12, 3, 0, 7), ()])
def test_chunk_keys_are_zarr_pythons(block):
    from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding, V2ChunkKeyEncoding

    assert chunk_key(block, 3) == DefaultChunkKeyEncoding(separator="/").encode_chunk_key(block)
    assert chunk_key(block, 2) == V2ChunkKeyEncoding(separator="/").encode_chunk_key(block)


def test_resume_keeps_level_zero_only_when_its_metadata_is_this_runs(tmp_path):
    """An interrupted output whose level 0 was made with other chunks is refused, not mixed;
    one of the same chunks is completed."""
    from tilefuse import fuse, layout_from_arrays
    from tilefuse.errors import InputError
    from tilefuse.ome_zarr.writer import write_image

    rng = np.random.default_rng(3)
    tiles = [rng.integers(0, 60000, (40, 50), dtype=np.uint16) for _ in range(4)]
    layout = layout_from_arrays(tiles, positions=[[0, 0], [0, 45.5], [35.25, 0], [35, 45]])

    def interrupted(chunk: int):
        """A finished write of `chunk`, turned back into an interrupted one: no multiscales
        metadata and a level-0 chunk missing."""
        out = tmp_path / f"m{chunk}.ome.zarr"
        write_image(fuse(layout, chunk=chunk), out, manifest={"run": 1}, levels=2)
        manifest = {"tilefuse": read_group_attributes(out, 3)["tilefuse"]}
        (out / "zarr.json").unlink()
        create_group(out, 3, manifest)
        (out / "0" / "c" / "1" / "1").unlink()
        return out

    whole = np.asarray(fuse(layout, chunk=16))
    out = interrupted(16)
    write_image(fuse(layout, chunk=16), out, manifest={"run": 1}, levels=2, resume=True)
    np.testing.assert_array_equal(zarr.open_array(out / "0", mode="r")[...], whole)
    out = interrupted(32)
    with pytest.raises(InputError, match=r"level 0 of the interrupted output .* is not what"):
        write_image(fuse(layout, chunk=16), out, manifest={"run": 1}, levels=2, resume=True)


def test_a_metadata_temporary_a_crash_left_is_tilefuses_own(tmp_path):
    """A run killed while it renamed a metadata document leaves
    ``.tilefuse-zarr.json.<hex>.partial``: ``--overwrite`` takes the folder as tilefuse's, and
    the next start or resume removes the temporary; a user's file beside it stays and makes
    the folder not tilefuse's to replace."""
    from tilefuse import Mosaic
    from tilefuse.errors import InputError
    from tilefuse.ome_zarr.chunkstore import remove_partial_files
    from tilefuse.ome_zarr.writer import write_ome_zarr

    image = Mosaic(da.zeros((8, 8), dtype=np.uint8), ("y", "x"))
    out = write_ome_zarr(image, tmp_path / "a.ome.zarr")
    left = out / f".tilefuse-zarr.json.{'0' * 32}.partial"
    left.write_text("{")
    assert remove_partial_files(out) == 1 and not left.exists()
    left.write_text("{")
    write_ome_zarr(image, out, overwrite=True)  # accepted as tilefuse's, and emptied
    assert not left.exists()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"notes\.txt"):
        write_ome_zarr(image, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
