"""A PNG overview of a fused OME-Zarr image, from the pyramid level that fits the size asked."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["contrast_stretch", "screen_image", "write_png_overview"]


def contrast_stretch(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Map the ``low``..``high`` percentiles of ``image`` (y, x) to 0..255 uint8."""
    finite = image[np.isfinite(image)] if image.dtype.kind == "f" else image.ravel()
    if finite.size == 0:
        return np.zeros(image.shape, np.uint8)
    lo, hi = np.percentile(finite, [low, high])
    scaled = (image.astype(np.float64) - lo) / max(hi - lo, 1e-12)
    return np.rint(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def _multiscale(path: Path) -> dict[str, Any]:
    """The first ``multiscales`` entry of an OME-NGFF image (0.5: under ``"ome"``)."""
    import zarr  # here, not at import: a layout's preview needs neither zarr nor dask

    # Walked as untyped JSON: the keys are those the NGFF specification (and tilefuse) writes.
    attrs: dict[str, Any] = zarr.open_group(str(path), mode="r").attrs.asdict()
    return attrs.get("ome", attrs)["multiscales"][0]


def screen_image(zarr_path: str | os.PathLike, max_size: int = 1024) -> tuple[np.ndarray, float]:
    """The mosaic as one (y, x) plane from the smallest pyramid level still ``max_size`` wide.

    z is max-projected, the first channel and time point are shown.

    Returns
    -------
    image : numpy.ndarray, shape (y, x)
    scale : float
        Size of the returned plane relative to full resolution (1 for level 0).
    """
    from tilefuse.ome_zarr.writer import read_ome_zarr_level

    path = Path(zarr_path)
    meta = _multiscale(path)
    axes = [a["name"] for a in meta["axes"]]
    n_levels = len(meta["datasets"])
    full_width = read_ome_zarr_level(path, 0).shape[-1]
    level = 0
    while level + 1 < n_levels and max(read_ome_zarr_level(path, level + 1).shape[-2:]) >= max_size:
        level += 1
    data = read_ome_zarr_level(path, level)
    for ax in reversed(range(len(axes) - 2)):  # innermost first, so indices stay valid
        data = data.max(axis=ax) if axes[ax] == "z" else data[(slice(None),) * ax + (0,)]
    return np.asarray(data.compute()), data.shape[-1] / full_width


def write_png_overview(
    zarr_path: str | os.PathLike, png_path: str | os.PathLike, *, max_size: int = 1024
) -> Path:
    """Write the mosaic as an 8-bit PNG no larger than ``max_size`` on its long side.

    The first channel is shown in grey (z max-projected), contrast-stretched.
    """
    from PIL import Image

    image, _ = screen_image(zarr_path, max_size)
    picture = Image.fromarray(contrast_stretch(image))
    picture.thumbnail((max_size, max_size))
    png_path = Path(png_path)
    picture.save(png_path)
    return png_path
