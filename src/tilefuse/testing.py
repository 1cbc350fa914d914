"""Synthetic tile sets with exact ground truth, for tests, the demo and benchmarks.

The scene is an analytic function of continuous mosaic coordinates (a smooth background plus
Gaussian "cells"), so a tile placed at any integer, fractional or rotated position is sampled
*exactly*, and the true mosaic is the same function on the output grid.

Examples
--------
>>> ts = grid_tileset(grid=(2, 2), tile_shape=(64, 64), overlap=0.1, seed=0)
>>> len(ts.layout.tiles), ts.truth.shape
(4, (122, 122))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tilefuse.io.readers.memory import layout_from_arrays
from tilefuse.model.layout import Layout, translation_affine

__all__ = [
    "PatternSource",
    "Scene",
    "coverage",
    "pattern_layout",
    "TileSet",
    "cut_tiles",
    "grid_positions",
    "grid_tileset",
    "write_tileset",
]


@dataclass(frozen=True)
class Scene:
    """An analytic image that can be sampled at any continuous zyx coordinate.

    Attributes
    ----------
    extent : tuple of float
        Size of the region the cells are scattered over, zyx.
    kind : {"cells", "smooth", "empty"}
        Cell-like blobs on a faint background, low-frequency content only, or a flat field.
    """

    extent: tuple[float, ...]
    kind: str = "cells"
    seed: int = 0
    amplitude: float = 1.0

    def _params(self):
        rng = np.random.default_rng(self.seed)
        ndim = len(self.extent)
        area = float(np.prod(self.extent[-2:]))
        n_cells = max(4, int(area / 900)) if self.kind == "cells" else 0
        centres = rng.uniform(0, 1, (n_cells, ndim)) * np.asarray(self.extent)
        sigmas = rng.uniform(2.5, 7.0, n_cells)
        heights = rng.uniform(0.3, 0.7, n_cells)
        n_waves = 6 if self.kind != "empty" else 0
        freqs = rng.normal(0, 1, (n_waves, ndim)) / (np.mean(self.extent[-2:]) / 6)
        phases = rng.uniform(0, 2 * np.pi, n_waves)
        return centres, sigmas, heights, freqs, phases

    def sample(self, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """The scene seen through a tile: pixel ``i`` of the result is the scene at ``affine @ i``.

        Parameters
        ----------
        affine : array, shape (ndim + 1, ndim + 1)
            Tile pixel index -> scene coordinate, zyx.
        shape : tuple of int
            Tile shape.

        Returns
        -------
        numpy.ndarray of ``shape``, float64, values in [0, amplitude]
        """
        affine = np.asarray(affine, dtype=np.float64)
        ndim = len(shape)
        lin, off = affine[:-1, :-1], affine[:-1, -1]
        axes = [np.arange(n, dtype=np.float64) for n in shape]
        idx = np.stack(np.meshgrid(*axes, indexing="ij"))
        coords = np.tensordot(lin, idx, axes=1) + off.reshape(-1, *[1] * ndim)
        centres, sigmas, heights, freqs, phases = self._params()
        out = np.full(tuple(shape), 0.2)
        weight = 0.05 if self.kind == "cells" else 0.12
        for f, p in zip(freqs, phases, strict=True):
            out += weight * np.cos(np.tensordot(f, coords, axes=1) + p)
        inv = np.linalg.inv(lin)
        reach = np.abs(inv).sum(axis=1)
        if len(centres):  # only the cells whose 4-sigma window reaches this tile
            centre_idx = (centres - off) @ inv.T
            margin = 4 * sigmas[:, None] * reach + 2  # a superset: the window test decides
            near = np.all((centre_idx + margin >= 0) & (centre_idx - margin <= shape), axis=1)
            centres, sigmas, heights = centres[near], sigmas[near], heights[near]
        for c, s, h in zip(centres, sigmas, heights, strict=True):
            centre_idx = inv @ (c - off)
            lo = np.maximum(np.floor(centre_idx - 4 * s * reach), 0).astype(int)
            hi = np.minimum(np.ceil(centre_idx + 4 * s * reach) + 1, shape).astype(int)
            if np.any(hi <= lo):
                continue
            win = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            local = coords[(slice(None), *win)]
            r2 = sum((local[i] - c[i]) ** 2 for i in range(ndim))
            out[win] += h * np.exp(-r2 / (2 * s * s))
        return np.clip(out, 0.0, 1.0) * self.amplitude

    def render(self, shape: Sequence[int],
               origin: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
        """Sample the scene on a pixel grid whose first pixel is at ``origin``, float64."""
        first = np.zeros(len(shape)) if origin is None else np.asarray(origin, dtype=float)
        return self.sample(translation_affine(first), shape)


def _to_dtype(values: np.ndarray, dtype: np.dtype | str) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return values.astype(dtype)
    top = min(np.iinfo(dtype).max, 60000)
    return np.rint(values * top).astype(dtype)


def grid_positions(
    grid: Sequence[int], tile_shape: Sequence[int], overlap: float
) -> np.ndarray:
    """Nominal top-left positions of a regular row-major grid, shape (n_tiles, ndim), zyx."""
    ndim = len(tile_shape)
    steps = [round(n * (1 - overlap)) for n in tile_shape[-2:]]
    pos = []
    for r in range(grid[0]):
        for c in range(grid[1]):
            pos.append(([0.0] * (ndim - 2)) + [r * steps[0], c * steps[1]])
    return np.asarray(pos, dtype=np.float64)


@dataclass(frozen=True)
class TileSet:
    """A synthetic acquisition with exact truth.

    Attributes
    ----------
    layout : Layout
        Tiles at their *true* placements (in memory).
    stage : Layout
        The same tiles at their nominal (stage) positions, before any error.
    tiles : list of numpy.ndarray
        Tile pixels, each of the tile shape.
    truth : numpy.ndarray
        The scene on the mosaic grid that :func:`tilefuse.fuse` produces for ``layout``; 0
        (the default fill) where no tile covers the mosaic.
    covered : numpy.ndarray of bool
        Mosaic pixels inside at least one tile (pixel centre within the tile's pixel centres).
    truth_origin : numpy.ndarray
        Mosaic pixel index of ``truth[0, 0]``, zyx.
    """

    layout: Layout
    stage: Layout
    tiles: list
    truth: np.ndarray
    covered: np.ndarray
    truth_origin: np.ndarray
    scene: Scene


def grid_tileset(
    grid: Sequence[int] = (3, 3),
    tile_shape: Sequence[int] = (128, 128),
    overlap: float = 0.1,
    *,
    dtype: np.dtype | str = "uint16",
    kind: str = "cells",
    position_error: float = 0.0,
    fractional: bool = False,
    rotation_deg: float = 0.0,
    noise: float = 0.0,
    seed: int = 0,
) -> TileSet:
    """Cut a grid of tiles from an analytic scene.

    Parameters
    ----------
    grid : (rows, cols)
    tile_shape : (y, x) or (z, y, x)
    overlap : float
        Fraction of the tile shared with each neighbour.
    position_error : float
        Max |error| in pixels between true and stage positions (uniform, per axis in y, x).
    fractional : bool
        Keep the true positions fractional; otherwise they are rounded to integers.
    rotation_deg : float
        Every tile is rotated about its centre by this angle (a camera at an angle to the stage).
    noise : float
        Standard deviation of Gaussian noise added to each tile, as a fraction of full scale.
    """
    rng = np.random.default_rng(seed + 1)
    tile_shape = tuple(int(n) for n in tile_shape)
    ndim = len(tile_shape)
    stage_pos = grid_positions(grid, tile_shape, overlap)
    err = np.zeros_like(stage_pos)
    err[:, -2:] = rng.uniform(-position_error, position_error, (len(stage_pos), 2))
    true_pos = stage_pos + err
    if not fractional:
        true_pos = np.round(true_pos)
    true_pos -= true_pos.min(axis=0)
    stage_pos = stage_pos - stage_pos.min(axis=0)
    margin = 16
    extent = tuple(float(v) for v in true_pos.max(axis=0) + np.asarray(tile_shape) + margin)
    scene = Scene(extent, kind, seed)
    base = np.stack([translation_affine(p) for p in true_pos])
    true_layout = layout_from_arrays([np.zeros((1,) * ndim)] * len(base), affines=base)
    if rotation_deg:
        true_layout = true_layout.rotated(rotation_deg)
    affines = true_layout.affines
    tiles = []
    for aff in affines:
        values = scene.sample(aff, tile_shape)
        if noise:
            values = values + rng.normal(0, noise, values.shape)
        tiles.append(_to_dtype(np.clip(values, 0, 1), dtype))
    layout = layout_from_arrays(tiles, affines=affines)
    stage = layout_from_arrays(tiles, positions=stage_pos)
    from tilefuse.plan.geometry import output_box

    origin, shape = output_box(layout)
    truth = _to_dtype(scene.render(shape, origin), dtype)
    covered = coverage(layout, origin, shape)
    truth[~covered] = 0
    return TileSet(layout, stage, tiles, truth, covered, origin, scene)


def coverage(layout: Layout, origin: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Mosaic pixels whose centre lies within some tile's pixel centres, bool of ``shape``.

    Computed independently of the fusion kernel: every output pixel is mapped back through each
    tile's inverse affine.
    """
    grids = np.meshgrid(*[np.arange(n) + o for n, o in zip(shape, origin, strict=True)],
                        indexing="ij")
    points = np.stack([g.ravel() for g in grids] + [np.ones(grids[0].size)])
    covered = np.zeros(grids[0].size, dtype=bool)
    for tile in layout.tiles:
        t = np.linalg.inv(tile.affine)[:-1] @ points
        inside = np.all((t >= -1e-6) & (t <= np.asarray(tile.shape)[:, None] - 1 + 1e-6), axis=0)
        covered |= inside
    return covered.reshape(tuple(shape))


def cut_tiles(image: np.ndarray, positions: np.ndarray, tile_shape: Sequence[int]) -> list:
    """Cut tiles from ``image`` at integer ``positions`` (n_tiles, ndim); returns the tiles."""
    out = []
    for p in np.asarray(positions, dtype=int):
        sl = tuple(slice(int(a), int(a) + n) for a, n in zip(p, tile_shape, strict=True))
        out.append(image[sl].copy())
    return out


def write_tileset(tileset: TileSet, folder: str | os.PathLike, *, stage: bool = True) -> Path:
    """Write the tiles as TIFF files plus a ``TileConfiguration.txt``; returns the layout path.

    With ``stage=True`` the layout file holds the stage (nominal) positions, as a microscope
    would write them; otherwise the true positions (translations only).
    """
    import tifffile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layout = tileset.stage if stage else tileset.layout
    ndim = layout.ndim
    lines = [f"dim = {ndim}"]
    for i, (tile, data) in enumerate(zip(layout.tiles, tileset.tiles, strict=True)):
        name = f"tile_{i:04d}.tif"
        tifffile.imwrite(folder / name, data)
        coords = ", ".join(f"{v:.3f}" for v in tile.position[::-1])
        lines.append(f"{name}; ; ({coords})")
    path = folder / "TileConfiguration.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(frozen=True, slots=True)
class PatternSource:
    """A tile made on the fly from a procedural pattern of mosaic coordinates.

    Overlapping tiles agree exactly (the pattern is a function of the global pixel index), tiles
    cost no disk, and any mosaic size can be fused; used by the scale benchmarks.

    Attributes
    ----------
    origin : tuple of int
        Mosaic index of the tile's first pixel (y, x).
    shape : tuple of int
        Tile shape (y, x).
    """

    origin: tuple[int, int]
    shape: tuple[int, int]

    @property
    def key(self) -> tuple:
        return ("pattern", self.origin, self.shape)

    def read(self) -> np.ndarray:
        """Pixels ``(1, y, x)`` uint16: smooth waves plus a fine hashed texture."""
        gy = np.arange(self.shape[0], dtype=np.int64) + self.origin[0]
        gx = np.arange(self.shape[1], dtype=np.int64) + self.origin[1]
        wave_y = (np.sin(gy / 97.0) * 8000 + 20000).astype(np.uint16)
        wave_x = (np.cos(gx / 131.0) * 8000 + 20000).astype(np.uint16)
        texture = ((gy[:, None] * 2654435761) ^ (gx[None, :] * 40503)) & 1023
        return (wave_y[:, None] + wave_x[None, :] + texture.astype(np.uint16))[None]


def pattern_layout(grid: Sequence[int], tile: int = 1024, overlap: float = 0.1) -> Layout:
    """A ``grid`` of on-the-fly tiles at integer positions, for scale tests (no files)."""
    from tilefuse.model.layout import Tile

    step = round(tile * (1 - overlap))
    tiles = []
    for r in range(grid[0]):
        for c in range(grid[1]):
            origin = (r * step, c * step)
            tiles.append(Tile(f"r{r}c{c}", (tile, tile), translation_affine(origin),
                              PatternSource(origin, (tile, tile))))
    return Layout(tuple(tiles), np.dtype(np.uint16), origin="pattern")
