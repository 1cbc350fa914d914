"""The fusion of one output chunk: a pure function of the chunk box and the tiles touching it.

It knows nothing of files or dask: tiles come with a ``read`` callable, so the same kernel runs in
a thread, a process or on a cluster worker, and is easy to test against a reference.

Values are accumulated in float32 when the tiles and the output have at most 16 bits (integers)
or are float32, which holds every such value exactly, and in float64 when either is wider
(int32, uint32, float64; int64 or uint64 output of narrower tiles), so nothing is rounded on the
way: see :func:`accumulator_dtype`, chosen once per run by the plan. What float64 cannot hold
exactly (64-bit integer or complex tiles, extended precision) is refused by name.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import numpy as np

from tilefuse.errors import InputError
from tilefuse.fusion.blend import make_reducer
from tilefuse.fusion.chunk import (
    ChunkTile,
    accumulator_dtype,
    check_fill,
    exact_in_float32,
    finalize,
    read_checked,
)
from tilefuse.fusion.resample import place_tile

__all__ = [
    "BACKENDS",
    "ChunkTile",
    "accumulator_dtype",
    "check_fill",
    "finalize",
    "fuse_chunk",
    "resolve_backend",
]

BACKENDS = ("auto", "numpy", "numba")

NUMBA_MIN_PIXELS = 256 * 2**20
"""Output pixels (times channels) from which ``auto`` compiles translations too.

Loading the compiled kernel costs ~0.4 s per process (numba's import, 0.16-0.19 s, and its
first use, 0.24 s: its registries and the scipy.linalg they import). On translations it then
runs a chunk 2-3x faster, which repays the load only on large jobs: whole ``tilefuse fuse``
runs on 2 cores (``benchmarks/bench_fusion.py`` tiles of 1024², 4 interleaved rounds) took
1.01-1.14 s with numpy against 1.30-1.66 s compiled at 10x10 tiles (87 MPix), and the same
(2.09-2.34 against 1.99-2.35 s) at 16x16 (220 MPix). On affine tiles the compiled kernel is
3-7x faster and always taken.
"""


def resolve_backend(backend: str = "auto", *, pixels: int | None = None,
                    affine: bool = True) -> str:
    """The chunk kernel to run: ``"numba"`` (compiled, when numba is installed) or ``"numpy"``.

    ``"auto"`` picks numba when it can be imported, except for a small job of translations
    only: fewer than :data:`NUMBA_MIN_PIXELS` output pixels (`pixels`) and no affine tile,
    where loading the compiled kernel would cost more than it saves. Both give the same mosaic:
    bit-identical for translations, equal to float rounding for general affines (see
    :mod:`tilefuse.fusion._numba.kernel`).

    Parameters
    ----------
    backend : {"auto", "numpy", "numba"}
    pixels : int, optional
        Output pixels times channels of the job; unknown (None): as a large job.
    affine : bool
        Some tile takes the general affine path (rotation, scale, shear).
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    has_numba = importlib.util.find_spec("numba") is not None
    if backend == "numba" and not has_numba:
        raise InputError('backend "numba" needs numba: pip install "tilefuse[fast]"')
    if backend == "auto":
        small = pixels is not None and pixels < NUMBA_MIN_PIXELS and not affine
        return "numba" if has_numba and not small else "numpy"
    return backend


def fuse_chunk(
    chunk_origin: np.ndarray,
    chunk_shape: tuple[int, ...],
    tiles: Sequence[ChunkTile],
    *,
    n_channels: int,
    dtype: np.dtype,
    blend: str = "linear",
    widths: Sequence[float] = (),
    fill: float = 0,
    backend: str = "numpy",
    accumulator: np.dtype | str | None = None,
) -> np.ndarray:
    """Fuse the tiles touching one output chunk.

    Parameters
    ----------
    chunk_origin : numpy.ndarray, shape (ndim,)
        Mosaic pixel index of the chunk's first pixel.
    chunk_shape : tuple of int
        Spatial shape of the chunk.
    tiles : sequence of ChunkTile
        In layout order.
    n_channels : int
    dtype : numpy.dtype
        Output dtype.
    blend : str
        One of :data:`tilefuse.fusion.blend.BLENDS`.
    widths : sequence of float
        Feathering width per spatial axis (``linear`` only).
    fill : float
        Value of pixels no tile covers.
    backend : {"numpy", "numba"}
        ``numba`` runs :func:`tilefuse.fusion._numba.kernel.fuse_chunk_compiled` (same result,
        faster).
    accumulator : {float32, float64}, optional
        Dtype of the running sums (the plan's :func:`accumulator_dtype`); default: what the
        output dtype needs. A tile that needs a wider one is refused (:func:`read_checked`).

    Returns
    -------
    numpy.ndarray, shape (n_channels, *chunk_shape), ``dtype``
    """
    dtype = np.dtype(dtype)
    needed = np.dtype(np.float32 if exact_in_float32(dtype) else np.float64)
    acc = needed if accumulator is None else np.dtype(accumulator)
    if acc.itemsize < needed.itemsize:
        raise InputError(f"a {acc} accumulator cannot hold output dtype {dtype} exactly; "
                         "plan with accumulator_dtype()")
    if backend == "numba":
        from tilefuse.fusion._numba.kernel import fuse_chunk_compiled

        return fuse_chunk_compiled(chunk_origin, chunk_shape, tiles, n_channels=n_channels,
                                   dtype=dtype, blend=blend, widths=widths, fill=fill,
                                   accumulator=acc)
    reducer = make_reducer(blend, n_channels, tuple(chunk_shape), widths, acc)
    for tile in tiles:
        data = read_checked(tile, acc)
        placement = place_tile(data, tile.affine, chunk_origin, chunk_shape, path=tile.path,
                               accumulator=acc, tile_shape=tile.shape,
                               first_plane=tile.first_plane,
                               into=reducer.into if data.dtype.kind in "biu" else None)
        if placement is not None:
            reducer.add(placement, tile.shape)
    return finalize(reducer.values(), reducer.covered, dtype, fill)


