"""The zarr groups and arrays tilefuse writes, as folders and JSON documents, without zarr-python.

zarr-python costs ~0.15 s to import and starts an event-loop thread; a fusion that writes its
own chunk files (:class:`~tilefuse.ome_zarr.chunkstore.ChunkFiles`) needs from it only the
metadata documents of one group and its levels. This module writes exactly those, byte for
byte what zarr-python writes for the same array (tested): ``zarr.json`` (zarr v3: bytes +
zstd level 0, the "default" chunk keys ``c/i/j``, optionally sharded) or ``.zarray`` with an
empty ``.zattrs`` (zarr v2: Blosc zstd level 5 with byte shuffle, ``/`` chunk keys), and the
group's ``zarr.json`` or ``.zgroup`` + ``.zattrs``. Every document is written through a
temporary file and a rename. Whatever else an array needs (shards, the dask path, a resume's
checks) opens the same folder with zarr-python (:meth:`Level.zarr_array`).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import zarr

__all__ = ["ArraySpec", "Level", "chunk_key", "create_group", "read_group_attributes",
           "update_group_attributes"]

ZarrFormat = Literal[2, 3]

PARTIAL_PREFIX = ".tilefuse-"
"""Starts the name of a metadata document's temporary: ``.tilefuse-{name}.{uuid4 hex}.partial``
(removed by :func:`tilefuse.ome_zarr.chunkstore.remove_partial_files`)."""

ZSTD_LEVEL = 0
"""zarr v3 level codec: zstd at level 0 (zstd's default, 3), no checksum: zarr-python's default."""

BLOSC = {"id": "blosc", "cname": "zstd", "clevel": 5, "shuffle": 1, "blocksize": 0}
"""zarr v2 level compressor: Blosc with zstd at level 5 and byte shuffle."""


@dataclass(frozen=True)
class ArraySpec:
    """One level as tilefuse stores it.

    Attributes
    ----------
    shape, chunks : tuple of int
        Array and chunk shape (the chunk inside a shard when sharded).
    dtype : numpy.dtype
        Boolean, integer or real float; stored little-endian.
    dimension_names : tuple of str
        Axis names (zarr v3 ``dimension_names``; v2 has none).
    zarr_format : {2, 3}
    shards : tuple of int or None
        Shard shape (zarr v3 only), a multiple of `chunks`; None: one file per chunk.
    """

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    dimension_names: tuple[str, ...]
    zarr_format: ZarrFormat
    shards: tuple[int, ...] | None = None

    def documents(self) -> dict[str, dict[str, Any]]:
        """The array's metadata files, name -> JSON document, as zarr-python writes them."""
        if self.zarr_format == 2:
            return {".zarray": self._zarray(), ".zattrs": {}}
        return {"zarr.json": self._zarr_json()}

    def _fill(self) -> bool | int | float:
        """The fill value, 0 of the dtype, as JSON."""
        return self.dtype.type(0).item()

    def _zarray(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "chunks": list(self.chunks),
                "dtype": self.dtype.newbyteorder("<").str, "fill_value": self._fill(),
                "order": "C", "filters": None, "dimension_separator": "/",
                "compressor": dict(BLOSC), "zarr_format": 2}

    def _zarr_json(self) -> dict[str, Any]:
        codecs = _chunk_codecs(self.dtype)
        grid = self.chunks
        if self.shards is not None:
            grid = self.shards
            codecs = [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": list(self.chunks), "codecs": codecs,
                "index_codecs": [_bytes_codec(np.dtype("uint64")), {"name": "crc32c"}],
                "index_location": "end"}}]
        return {"shape": list(self.shape), "data_type": self.dtype.name,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(grid)}},
                "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
                "fill_value": self._fill(), "codecs": codecs, "attributes": {},
                "dimension_names": list(self.dimension_names), "zarr_format": 3,
                "node_type": "array", "storage_transformers": []}


def _bytes_codec(dtype: np.dtype) -> dict[str, Any]:
    """zarr v3 ``bytes`` codec: little-endian, no configuration for one-byte types."""
    if dtype.itemsize == 1:
        return {"name": "bytes"}
    return {"name": "bytes", "configuration": {"endian": "little"}}


def _chunk_codecs(dtype: np.dtype) -> list[dict[str, Any]]:
    return [_bytes_codec(dtype),
            {"name": "zstd", "configuration": {"level": ZSTD_LEVEL, "checksum": False}}]


def chunk_key(block: Sequence[int], zarr_format: ZarrFormat) -> str:
    """The file of chunk (or shard) `block` under its array's folder: ``c/i/j`` (v3 default
    encoding) or ``i/j`` (v2 with the ``/`` separator)."""
    indices = [str(int(i)) for i in block]
    if zarr_format == 3:
        return "/".join(["c", *indices])
    return "/".join(indices) or "0"


@dataclass(frozen=True)
class Level:
    """One stored level: its folder and :class:`ArraySpec`.

    Attributes
    ----------
    folder : pathlib.Path
    spec : ArraySpec
    write_empty_chunks : bool
        Store chunks that are all fill value too (level 0, so that a resume can tell written
        chunks from missing ones); else they are left out, as zarr does by default.
    """

    folder: Path
    spec: ArraySpec
    write_empty_chunks: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return self.spec.shape

    @property
    def chunks(self) -> tuple[int, ...]:
        return self.spec.chunks

    @property
    def shards(self) -> tuple[int, ...] | None:
        return self.spec.shards

    @property
    def dtype(self) -> np.dtype:
        return self.spec.dtype

    @property
    def storage_unit(self) -> tuple[int, ...]:
        """What one file holds: the shard shape, or the chunk shape if unsharded."""
        return self.spec.shards or self.spec.chunks

    def create(self, *, replace: bool = False) -> Level:
        """Write the metadata of an empty level.

        Parameters
        ----------
        replace : bool
            Write over a level an interrupted run left at `folder` (its metadata is replaced;
            its chunk files are each written again, or removed when all fill). Otherwise the
            folder must not exist.

        Raises
        ------
        FileExistsError
            `folder` exists and `replace` is False.
        """
        self.folder.mkdir(parents=True, exist_ok=replace)
        write_documents(self.folder, self.spec.documents())
        return self

    def zarr_array(self) -> zarr.Array:
        """The level opened with zarr-python, for what its chunk files cannot do (shards, the
        dask path, decoding a resume's chunks)."""
        import zarr

        array = zarr.open_array(self.folder, mode="r+", zarr_format=self.spec.zarr_format)
        return array.with_config({"write_empty_chunks": self.write_empty_chunks})


def create_group(folder: Path, zarr_format: ZarrFormat, attributes: dict[str, Any]) -> None:
    """Write the metadata of a group with `attributes` into the existing `folder`.

    Raises
    ------
    FileExistsError
        `folder` holds zarr metadata already: a group is never written over.
    """
    documents: dict[str, dict[str, Any]] = (
        {".zgroup": {"zarr_format": 2}, ".zattrs": attributes} if zarr_format == 2
        else {"zarr.json": {"attributes": attributes, "zarr_format": 3, "node_type": "group"}})
    for name in ("zarr.json", ".zgroup", ".zarray", ".zattrs"):
        if (folder / name).exists():
            raise FileExistsError(f"{folder / name} exists: there is a zarr node here already")
    write_documents(folder, documents)


def read_group_attributes(folder: Path, zarr_format: ZarrFormat) -> dict[str, Any]:
    """The attributes of the group at `folder` (v3 ``zarr.json``, v2 ``.zattrs``).

    Raises
    ------
    OSError
        The document cannot be read.
    ValueError
        It is not JSON, or its attributes are not a JSON object.
    """
    name = "zarr.json" if zarr_format == 3 else ".zattrs"
    attributes = json.loads((folder / name).read_text())
    if zarr_format == 3 and isinstance(attributes, dict):  # the node's document holds them
        attributes = attributes.get("attributes", {})
    if not isinstance(attributes, dict):
        raise ValueError(f"{folder / name}: the group's attributes are not a JSON object")
    return attributes


def update_group_attributes(folder: Path, zarr_format: ZarrFormat,
                            attributes: dict[str, Any]) -> None:
    """Add `attributes` to those of the group at `folder` (a key given replaces the old one),
    as ``group.attrs.update`` does."""
    merged = {**read_group_attributes(folder, zarr_format), **attributes}
    if zarr_format == 2:
        write_documents(folder, {".zattrs": merged})
    else:
        document = json.loads((folder / "zarr.json").read_text())
        document["attributes"] = merged
        write_documents(folder, {"zarr.json": document})


def write_documents(folder: Path, documents: dict[str, dict[str, Any]]) -> None:
    """Write each document as ``json.dumps(indent=2)`` (zarr-python's form) through a temporary
    file and a rename, so that a crash leaves the old document or the new one."""
    for name, document in documents.items():
        path = folder / name
        tmp = folder / f"{PARTIAL_PREFIX}{name}.{uuid.uuid4().hex}.partial"
        try:
            tmp.write_text(json.dumps(document, indent=2))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
