"""The output chunk: its default size and the cap on z, defined once for every entry point.

The library (:func:`tilefuse.plan_fusion`), the memory budget, the command line and the napari
widget all turn a chunk option into a shape here, so a z-stack gets the same chunks whichever
way it is fused. Imports nothing heavy: the command line reads these defaults for its help.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from tilefuse.errors import InputError

__all__ = ["DEFAULT_CHUNK", "MAX_Z_CHUNK", "chunk_shape"]

DEFAULT_CHUNK = 1024
"""Output chunk side (= zarr chunk) along y and x when none is given."""
MAX_Z_CHUNK = 64
"""Largest z chunk a single size gives a z-stack: keeps 3D chunks near the 2D memory budget."""


def chunk_shape(chunk: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    """The output chunk shape for a chunk option.

    Parameters
    ----------
    chunk : int, sequence of int, or None
        One size for every axis (z capped at :data:`MAX_Z_CHUNK`), one size per spatial axis
        (taken as given), or None for :data:`DEFAULT_CHUNK`.
    ndim : {2, 3}
        Spatial axes of the layout.

    Returns
    -------
    tuple of int, shape (ndim,)

    Raises
    ------
    InputError
        Not one positive integer or `ndim` of them.

    Examples
    --------
    >>> chunk_shape(None, 2), chunk_shape(256, 3), chunk_shape((8, 32, 32), 3)
    ((1024, 1024), (64, 256, 256), (8, 32, 32))
    """
    if chunk is None:
        chunk = DEFAULT_CHUNK
    if isinstance(chunk, int | numbers.Integral):  # numpy integers too
        shape = (int(chunk),) * ndim
        if ndim == 3:
            shape = (min(shape[0], MAX_Z_CHUNK), *shape[1:])
    else:
        shape = tuple(int(c) for c in chunk)
    if len(shape) != ndim or any(c < 1 for c in shape):
        raise InputError(f"chunk {shape} must be one positive integer or {ndim} of them")
    return shape
