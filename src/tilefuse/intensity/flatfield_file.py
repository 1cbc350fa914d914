"""Flat and dark fields on disk: a float32 TIFF written by :func:`save_flatfield` (``tilefuse
flatfield``) and read back, checked against a layout's tiles, by :func:`load_flatfield`."""

from __future__ import annotations

import os

import numpy as np

from tilefuse.errors import InputError
from tilefuse.intensity.flatfield import _common_shape
from tilefuse.model.layout import Layout

__all__ = ["load_flatfield", "save_flatfield"]


def save_flatfield(
    path: str | os.PathLike, flat: np.ndarray, dark: np.ndarray | None = None
) -> None:
    """Write a flat field (and dark field) as a float32 TIFF.

    Parameters
    ----------
    path : path-like
        ``.tif`` file; the flat is series 0, the dark (when given) series 1.
    flat : numpy.ndarray, shape (c, *tile_spatial)
    dark : numpy.ndarray, same shape, optional
    """
    import tifffile

    flat = np.asarray(flat, dtype=np.float32)
    with tifffile.TiffWriter(path) as tif:
        tif.write(flat, metadata={"tilefuse": "flatfield", "shape": list(flat.shape)})
        if dark is not None:
            tif.write(np.asarray(dark, dtype=np.float32),
                      metadata={"tilefuse": "darkfield", "shape": list(flat.shape)})


def load_flatfield(
    path: str | os.PathLike, layout: Layout
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a flat field written by :func:`save_flatfield` and check it fits ``layout``.

    Returns
    -------
    flat : numpy.ndarray, shape (c, *tile_spatial), float32
    dark : numpy.ndarray or None

    Raises
    ------
    FileNotFoundError
    InputError
        The file is not a readable TIFF, or its shape does not match the layout's tiles.
    """
    import tifffile

    if not os.path.isfile(path):
        raise FileNotFoundError(f"flat-field file not found: {path}")
    try:
        with tifffile.TiffFile(path) as tif:
            arrays = [s.asarray() for s in tif.series]
    except Exception as exc:  # tifffile raises anything on a bad file
        raise InputError(f"{path}: cannot read flat field ({exc})") from exc
    shape = _common_shape(layout)
    flat = _fit_shape(arrays[0], shape, len(layout.channels), path)
    dark = _fit_shape(arrays[1], shape, len(layout.channels), path) if len(arrays) > 1 else None
    return flat, dark


def _fit_shape(arr: np.ndarray, tile_shape: tuple, n_channels: int, path) -> np.ndarray:
    """Bring a stored field to (c, *tile_shape) (or (c, 1, y, x)), or refuse a mismatch."""
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == len(tile_shape):  # a single-channel field saved without its channel axis
        arr = arr[None]
    ok_spatial = arr.shape[1:] == tuple(tile_shape) or (
        len(tile_shape) == 3 and arr.shape[1:] == (1, *tile_shape[1:])
    )
    if arr.ndim != len(tile_shape) + 1 or not ok_spatial or arr.shape[0] not in (1, n_channels):
        raise InputError(
            f"{path}: flat field of shape {arr.shape} does not match the tiles "
            f"(c, *shape) = {(n_channels, *tile_shape)}"
        )
    return arr
