"""A PNG overview of a fused OME-Zarr image, from the pyramid level that fits the size asked."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr

from tilefuse.ngff import read_ome_zarr_level

__all__ = ["contrast_stretch", "write_png_overview"]


def contrast_stretch(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Map the ``low``..``high`` percentiles of ``image`` (y, x) to 0..255 uint8."""
    finite = image[np.isfinite(image)] if image.dtype.kind == "f" else image.ravel()
    if finite.size == 0:
        return np.zeros(image.shape, np.uint8)
    lo, hi = np.percentile(finite, [low, high])
    scaled = (image.astype(np.float64) - lo) / max(hi - lo, 1e-12)
    return np.rint(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def _level_count(path: Path) -> int:
    attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    multiscales = attrs.get("ome", attrs).get("multiscales")
    return len(multiscales[0]["datasets"])


def write_png_overview(
    zarr_path: str | os.PathLike, png_path: str | os.PathLike, *, max_size: int = 1024
) -> Path:
    """Write the mosaic as an 8-bit PNG no larger than ``max_size`` on its long side.

    The first channel is shown in grey (middle z plane for z-stacks), contrast-stretched.
    """
    from PIL import Image

    zarr_path, png_path = Path(zarr_path), Path(png_path)
    n_levels = _level_count(zarr_path)
    level = 0
    while level + 1 < n_levels and max(read_ome_zarr_level(zarr_path, level).shape[-2:]) > max_size:
        level += 1
    data = read_ome_zarr_level(zarr_path, level)
    while data.ndim > 2:
        data = data[data.shape[0] // 2] if data.ndim == 3 and data.shape[0] > 4 else data[0]
    image = Image.fromarray(contrast_stretch(np.asarray(data.compute())))
    image.thumbnail((max_size, max_size))
    image.save(png_path)
    return png_path
