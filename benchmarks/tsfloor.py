"""The tensorstore floor: read every tile once, paste at rounded positions, write zarr v3.

    python benchmarks/tsfloor.py TileConfiguration.txt OUT.zarr

The least a fusion of translated tiles has to do, written as fast as plainly written Python
goes: it imports only numpy, tifffile and tensorstore (no tilefuse, no dask, no zarr-python),
parses the ``TileConfiguration.txt`` itself (2D, ``name; ; (x, y)`` lines), reads the tiles
with one thread per core, pastes each at its rounded position (the last tile wins in an
overlap), and writes the mosaic as zarr v3 with the codecs and chunks tilefuse writes
(little-endian bytes + zstd level 0, 1024² chunks). ``bench_fusion.py`` runs it as its own
process (the whole-process floor) and imports :func:`floor` (the in-process ``floor-ts``).
"""

from __future__ import annotations

import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorstore as ts
import tifffile

CHUNK = 1024
_LINE = re.compile(r"\s*([^;#]+?)\s*;\s*;\s*\(\s*([-+\d.eE]+)\s*,\s*([-+\d.eE]+)\s*\)")


def zarr3_spec(path: str, shape, dtype, chunks) -> dict:
    """A tensorstore spec that creates (replacing) a zarr v3 array coded as tilefuse codes it.

    Parameters
    ----------
    path : str
        Folder of the array.
    shape, chunks : sequence of int
        Array and chunk shape, zyx.
    dtype : numpy.dtype
    """
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
            "metadata": {"shape": [int(n) for n in shape], "data_type": np.dtype(dtype).name,
                         "chunk_grid": {"name": "regular",
                                        "configuration": {"chunk_shape": [int(c) for c in chunks]}},
                         "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                    {"name": "zstd", "configuration": {"level": 0}}]},
            "create": True, "delete_existing": True}


def read_tile_configuration(path: str) -> tuple[list[str], np.ndarray]:
    """Tile files and positions of a 2D ``TileConfiguration.txt``.

    Returns
    -------
    names : list of str
        Tile paths, resolved against the layout's folder.
    positions : numpy.ndarray, shape (n_tiles, 2), float64
        Top-left corners, (y, x).
    """
    folder = os.path.dirname(os.path.abspath(path))
    names, positions = [], []
    with open(path) as f:
        for line in f:
            m = _LINE.fullmatch(line.strip())
            if m:
                names.append(os.path.join(folder, m[1]))
                positions.append((float(m[3]), float(m[2])))
    return names, np.array(positions)


def floor(layout_path: str, out: str) -> tuple[int, int]:
    """Read, paste at rounded positions, write; returns the mosaic shape (y, x)."""
    names, positions = read_tile_configuration(layout_path)
    pos = np.round(positions).astype(int)
    pos -= pos.min(axis=0)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        tiles = list(pool.map(tifffile.imread, names))
    shape = tuple(int(n) for n in (pos + np.array([t.shape for t in tiles])).max(axis=0))
    mosaic = np.zeros(shape, dtype=tiles[0].dtype)
    for (y, x), data in zip(pos, tiles, strict=True):
        mosaic[y : y + data.shape[0], x : x + data.shape[1]] = data
    array = ts.open(zarr3_spec(out, shape, mosaic.dtype, (CHUNK, CHUNK))).result()
    array.write(mosaic).result()
    return shape


if __name__ == "__main__":
    floor(sys.argv[1], sys.argv[2])
