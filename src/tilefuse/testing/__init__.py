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
from typing import ClassVar

import numpy as np

from tilefuse.io.readers.memory import layout_from_arrays
from tilefuse.model.layout import Layout, translation_affine
from tilefuse.testing.cycles import (
    CycleSet,
    cycle_alignment_error,
    cycle_tilesets,
    cycles_from_image,
)

__all__ = [
    "CycleSet",
    "cycle_alignment_error",
    "cycle_tilesets",
    "cycles_from_image",
    "PatternSource",
    "Scene",
    "TextureSource",
    "coverage",
    "pattern_layout",
    "texture_layout",
    "TileSet",
    "cut_tiles",
    "grid_positions",
    "grid_tileset",
    "miscalibrated_tileset",
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
    return _tileset(layout, layout_from_arrays(tiles, positions=stage_pos), tiles, scene, dtype)


def miscalibrated_tileset(
    grid: Sequence[int] = (6, 6),
    tile_shape: Sequence[int] = (192, 192),
    overlap: float = 0.15,
    *,
    angle_deg: float = 0.8,
    scale: float = 1.03,
    stage_noise: float = 1.0,
    empty: Sequence[int] = (),
    dtype: np.dtype | str = "uint16",
    seed: int = 0,
) -> TileSet:
    """A grid acquired by a stage miscalibrated against the camera, with exact truth.

    The stage reports a regular grid (``stage``); the camera sees each tile at
    ``scale * R(angle_deg) @ stage`` plus a uniform stage error of up to ``stage_noise`` px per
    axis, rounded to whole pixels (``layout``). ``R`` turns (y, x) as
    :meth:`~tilefuse.model.layout.Layout.rotated` does. The tiles listed in ``empty`` show
    only flat background (a constant with noise of 0.1 % of full scale), so no link can place
    them.

    Parameters
    ----------
    grid : (rows, cols)
    tile_shape : (y, x)
    overlap : float
        Planned fraction shared with each neighbour (at the stage's scale).
    angle_deg, scale : float
        The camera's offsets against the stage's: rotation (degrees) and scale.
    stage_noise : float
        Max |error| of each stage position, pixels per axis.
    empty : sequence of int
        Tiles (row-major indices) that show background only.

    Returns
    -------
    TileSet
        ``truth`` is the scene over the true layout, with the empty tiles' pixels as they
        are nowhere (the scene is drawn there).
    """
    rng = np.random.default_rng(seed + 1)
    tile_shape = tuple(int(n) for n in tile_shape)
    stage_pos = grid_positions(grid, tile_shape, overlap)
    theta = np.deg2rad(angle_deg)
    lin = scale * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    true_pos = stage_pos @ lin.T + rng.uniform(-stage_noise, stage_noise, stage_pos.shape)
    true_pos = np.round(true_pos)
    true_pos -= true_pos.min(axis=0)
    margin = 16
    extent = tuple(float(v) for v in true_pos.max(axis=0) + np.asarray(tile_shape) + margin)
    scene = Scene(extent, "cells", seed)
    tiles = []
    for k, p in enumerate(true_pos):
        if k in set(int(e) for e in empty):
            flat = 0.2 + rng.normal(0, 0.001, tile_shape)
            tiles.append(_to_dtype(np.clip(flat, 0, 1), dtype))
        else:
            tiles.append(_to_dtype(scene.sample(translation_affine(p), tile_shape), dtype))
    layout = layout_from_arrays(tiles, positions=true_pos)
    return _tileset(layout, layout_from_arrays(tiles, positions=stage_pos), tiles, scene, dtype)


def _tileset(layout: Layout, stage: Layout, tiles: list[np.ndarray], scene: Scene,
             dtype: np.dtype | str) -> TileSet:
    """The :class:`TileSet` of tiles placed by `layout`: the scene rendered on its output
    grid as truth, zero where no tile covers."""
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
class _CoordinateSource:
    """A tile made on the fly from a function of mosaic coordinates: overlapping tiles agree
    exactly, and tiles cost no disk. Subclasses name their ``kind`` and make the pixels.

    Attributes
    ----------
    origin : tuple of int
        Mosaic index of the tile's first pixel (y, x).
    shape : tuple of int
        Tile shape (y, x).
    """

    origin: tuple[int, int]
    shape: tuple[int, int]
    kind: ClassVar[str] = ""

    @property
    def key(self) -> tuple:
        return (self.kind, self.origin, self.shape)

    def read(self) -> np.ndarray:
        """Pixels ``(1, y, x)``: the subclass's function of :meth:`coordinates`."""
        raise NotImplementedError

    def coordinates(self, margin: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Global row and column indices of the tile, widened by `margin` on each side."""
        gy = np.arange(self.shape[0] + 2 * margin, dtype=np.int64) + self.origin[0] - margin
        gx = np.arange(self.shape[1] + 2 * margin, dtype=np.int64) + self.origin[1] - margin
        return gy, gx


@dataclass(frozen=True, slots=True)
class PatternSource(_CoordinateSource):
    """A procedural pattern of mosaic coordinates (waves and a hashed texture): any mosaic
    size can be fused from it; used by the scale benchmarks."""

    kind: ClassVar[str] = "pattern"

    def read(self) -> np.ndarray:
        """Pixels ``(1, y, x)`` uint16: smooth waves plus a fine hashed texture."""
        gy, gx = self.coordinates()
        wave_y = (np.sin(gy / 97.0) * 8000 + 20000).astype(np.uint16)
        wave_x = (np.cos(gx / 131.0) * 8000 + 20000).astype(np.uint16)
        texture = ((gy[:, None] * 2654435761) ^ (gx[None, :] * 40503)) & 1023
        return (wave_y[:, None] + wave_x[None, :] + texture.astype(np.uint16))[None]


def pattern_layout(grid: Sequence[int], tile: int = 1024, overlap: float = 0.1) -> Layout:
    """A ``grid`` of on-the-fly tiles at integer positions, for scale tests (no files)."""
    return _coordinate_layout(PatternSource, grid, tile, overlap)


def _coordinate_layout(source: type[_CoordinateSource], grid: Sequence[int], tile: int,
                       overlap: float) -> Layout:
    """A ``grid`` of `source` tiles of ``tile`` x ``tile`` at integer positions."""
    from tilefuse.model.layout import Tile

    step = round(tile * (1 - overlap))
    tiles = []
    for r in range(grid[0]):
        for c in range(grid[1]):
            origin = (r * step, c * step)
            tiles.append(Tile(f"r{r}c{c}", (tile, tile), translation_affine(origin),
                              source(origin, (tile, tile))))
    return Layout(tuple(tiles), np.dtype(np.uint16), origin=source.kind)


def _hash_texture(gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """Pseudo-random values in [0, 1) for global pixel indices (outer product of gy, gx)."""
    with np.errstate(over="ignore"):
        h = (gy.astype(np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15)
             + gx.astype(np.uint64)[None, :] * np.uint64(0xC2B2AE3D27D4EB4F))
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
    return (h >> np.uint64(40)).astype(np.float64) / 2.0**24


@dataclass(frozen=True, slots=True)
class TextureSource(_CoordinateSource):
    """A band-limited random texture of mosaic coordinates. Unlike :class:`PatternSource` it
    has no period and no preferred direction, so every overlap registers to one unambiguous
    shift."""

    kind: ClassVar[str] = "texture"

    def read(self) -> np.ndarray:
        """Pixels ``(1, y, x)`` uint16: hashed noise smoothed over 3 x 3 pixels, plus a wave."""
        gy, gx = self.coordinates(margin=1)
        noise = _hash_texture(gy, gx)
        noise = (noise[:-2] + noise[1:-1] + noise[2:]) / 3
        noise = (noise[:, :-2] + noise[:, 1:-1] + noise[:, 2:]) / 3
        wave = np.sin(gy[1:-1, None] / 211.0) + np.cos(gx[None, 1:-1] / 157.0)
        return np.rint(8000 + 30000 * noise + 4000 * wave).astype(np.uint16)[None]


def texture_layout(grid: Sequence[int], tile: int = 256, overlap: float = 0.1, *,
                   stage_error: float = 0.0, seed: int = 0) -> tuple[Layout, Layout]:
    """A ``grid`` of :class:`TextureSource` tiles: the true layout and one with stage errors.

    Parameters
    ----------
    grid : (rows, cols)
    tile : int
        Tile side, pixels.
    overlap : float
    stage_error : float
        Max |error| of each stage position, pixels per axis (uniform).

    Returns
    -------
    truth, stage : Layout
        The tiles at their true (integer) positions, and at the stage positions.
    """
    truth = _coordinate_layout(TextureSource, grid, tile, overlap)
    rng = np.random.default_rng(seed)
    error = rng.uniform(-stage_error, stage_error, truth.positions.shape)
    return truth, truth.with_positions(truth.positions + error)
