"""Synthetic cyclic acquisitions (CyCIF, CODEX, IBEX) with exact ground truth.

The same slide is imaged in several rounds ("cycles"). Every cycle visits the same stage
positions (a regular grid), but the slide was re-mounted in between: in cycle ``k`` the slide
is turned by ``rotations_deg[k]`` about the scene centre and shifted by ``shifts_px[k]``, and
each tile lands with its own stage error. Channel 0 shows the same nuclei in every cycle (with a
per-cycle gain and offset); the other channels show a different marker per cycle.

The scene is an analytic function of continuous coordinates, sampled point by point through each
tile's true affine, so the truth is exact at any rotation or fractional position
(:func:`cycle_tilesets`). :func:`cycles_from_image` re-cuts a real image the same way
(semi-synthetic cycles; the image, cubic-spline interpolated, is the scene).
:func:`cycle_alignment_error` scores aligned layouts against the truth.

Examples
--------
>>> cs = cycle_tilesets(n_cycles=2, grid=(2, 2), tile_shape=(64, 64), seed=0)
>>> len(cs.layouts), cs.true_affines[1].shape, cs.layouts[1].channels
(2, (4, 3, 3), ('DAPI', 'CD8'))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tilefuse.errors import InputError
from tilefuse.io.readers.memory import layout_from_arrays
from tilefuse.model.layout import Layout, translation_affine

__all__ = ["CycleSet", "cycle_alignment_error", "cycle_tilesets", "cycles_from_image"]

MARKERS = ("CD3", "CD8", "CD4", "CD20", "CD45", "PanCK", "Ki67", "CD68", "SMA", "Vimentin")
"""Marker channel names, used in turn (cycle ``k``, marker channel ``m``)."""
_MARGIN = 24  # scene pixels around the farthest tile corner of any cycle
_FULL_SCALE = 60000  # uint16 value of scene intensity 1.0


@dataclass(frozen=True)
class CycleSet:
    """A cyclic acquisition with exact truth.

    Attributes
    ----------
    layouts : tuple of Layout
        One per cycle; tiles at their stage positions (a regular grid, the same in every cycle),
        in memory, 2D, uint16, channels ``("DAPI", marker, ...)``.
    true_affines : tuple of numpy.ndarray, each shape (n_tiles, 3, 3)
        Per cycle: tile pixel index -> scene pixel, the exact placement the tiles were rendered
        with (stage error, the cycle's rotation and shift included).
    rotations_deg : tuple of float
        Per cycle, the slide's rotation about the scene centre; cycle 1 is 0.0.
    shifts_px : tuple of (float, float)
        Per cycle, the slide's (y, x) shift after the rotation; cycle 1 is (0, 0).
    scene_shape : (int, int)
        Scene extent that every tile of every cycle lies within.
    """

    layouts: tuple[Layout, ...]
    true_affines: tuple[np.ndarray, ...]
    rotations_deg: tuple[float, ...]
    shifts_px: tuple[tuple[float, float], ...]
    scene_shape: tuple[int, int]


@dataclass(frozen=True)
class _Blobs:
    """Elliptical Gaussian blobs with an internal texture, on a smooth background.

    ``sample(affine, shape)[i]`` is the intensity at scene point ``affine @ i``, exact.
    """

    extent: tuple[float, float]
    density: float  # blobs per pixel
    seed: int
    background: float = 0.1

    def _params(self) -> tuple[np.ndarray, ...]:
        rng = np.random.default_rng(self.seed)
        n = max(4, int(self.extent[0] * self.extent[1] * self.density))
        centres = rng.uniform(0, 1, (n, 2)) * np.asarray(self.extent)
        axes = rng.uniform(3.0, 7.0, (n, 2))
        angle = rng.uniform(0, np.pi, n)
        heights = rng.uniform(0.2, 0.4, n)  # below full scale after any gain
        wave = rng.normal(0, 1, (n, 2))
        wave *= (2 * np.pi / rng.uniform(6.0, 10.0, n) / np.linalg.norm(wave, axis=1))[:, None]
        phase = rng.uniform(0, 2 * np.pi, n)
        freqs = rng.normal(0, 1, (4, 2)) / (np.mean(self.extent) / 5)
        bg_phase = rng.uniform(0, 2 * np.pi, 4)
        return centres, axes, angle, heights, wave, phase, freqs, bg_phase

    def sample(self, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """Scene values seen through ``affine`` (tile px -> scene px), float64 of ``shape``."""
        centres, axes, angle, heights, wave, phase, freqs, bg_phase = self._params()
        lin, off = affine[:2, :2], affine[:2, 2]
        iy, ix = np.meshgrid(np.arange(shape[0], dtype=float), np.arange(shape[1], dtype=float),
                             indexing="ij")
        coords = np.tensordot(lin, np.stack([iy, ix]), axes=1) + off[:, None, None]
        out = np.full(tuple(shape), self.background)
        for f, p in zip(freqs, bg_phase, strict=True):
            out += 0.03 * np.cos(np.tensordot(f, coords, axes=1) + p)
        inv = np.linalg.inv(lin)
        reach = 4.0 * axes.max(axis=1) * np.abs(inv).sum(axis=1).max() + 2
        local = (centres - off) @ inv.T
        near = np.all((local + reach[:, None] >= 0) & (local - reach[:, None] <= shape), axis=1)
        for k in np.flatnonzero(near):
            lo = np.maximum(np.floor(local[k] - reach[k]), 0).astype(int)
            hi = np.minimum(np.ceil(local[k] + reach[k]) + 1, shape).astype(int)
            if np.any(hi <= lo):
                continue
            win = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))
            dy, dx = coords[0][win] - centres[k, 0], coords[1][win] - centres[k, 1]
            c, s = np.cos(angle[k]), np.sin(angle[k])
            u, v = (c * dy + s * dx) / axes[k, 0], (-s * dy + c * dx) / axes[k, 1]
            texture = 1.0 + 0.25 * np.cos(wave[k, 0] * dy + wave[k, 1] * dx + phase[k])
            out[win] += heights[k] * texture * np.exp(-0.5 * (u * u + v * v))
        return out


def _rigid(angle_deg: float, shift: Sequence[float], centre: np.ndarray,
           scale: float = 1.0) -> np.ndarray:
    """Scale and rotation about ``centre`` then a shift, homogeneous (3, 3), acting on (y, x)."""
    theta = np.deg2rad(angle_deg)
    rot = np.eye(3)
    rot[:2, :2] = scale * np.array([[np.cos(theta), -np.sin(theta)],
                                    [np.sin(theta), np.cos(theta)]])
    return (translation_affine(centre + np.asarray(shift, dtype=float)) @ rot
            @ translation_affine(-centre))


def _per_cycle(values, n_cycles: int, name: str, draw) -> list:
    """Per-cycle values given (``n_cycles`` or ``n_cycles - 1`` of them) or drawn."""
    if values is None:
        return [draw() for _ in range(n_cycles - 1)]
    values = list(values)
    if len(values) == n_cycles:
        values = values[1:]
    if len(values) != n_cycles - 1:
        raise InputError(f"{name}: {len(values)} values for {n_cycles} cycles; expected "
                         f"{n_cycles} (cycle 1 first) or {n_cycles - 1} (cycles 2..)")
    return values


@dataclass(frozen=True)
class _Plan:
    """Where every tile of every cycle lies in the scene."""

    affines: tuple[np.ndarray, ...]  # per cycle (n_tiles, 3, 3): tile px -> scene px
    stage: np.ndarray  # (n_tiles, 2) stage positions, the same in every cycle
    angles: tuple[float, ...]
    shifts: tuple[tuple[float, float], ...]
    scene_shape: tuple[int, int]


def _plan(rng: np.random.Generator, n_cycles: int, grid: Sequence[int],
          tile_shape: tuple[int, int], overlap: float, max_rotation_deg: float,
          max_shift_px: float, stage_error_px: float, rotations_deg, shifts_px, scales,
          scene_shape: Sequence[int] | None = None) -> _Plan:
    """Draw the cycles' rotations, shifts and stage errors; size the scene (or fit it)."""
    if n_cycles < 1:
        raise InputError(f"n_cycles {n_cycles} must be at least 1")
    step = [round(n * (1 - overlap)) for n in tile_shape]
    stage = np.array([[r * step[0], c * step[1]] for r in range(grid[0])
                      for c in range(grid[1])], dtype=float)
    span = stage.max(axis=0) + tile_shape
    angles = [0.0] + [float(a) for a in _per_cycle(
        rotations_deg, n_cycles, "rotations_deg",
        lambda: float(rng.choice([-1, 1]) * rng.uniform(0.3, 1.0) * max_rotation_deg))]

    def draw_shift() -> tuple[float, float]:
        length, turn = rng.uniform(0.5, 1.0) * max_shift_px, rng.uniform(0, 2 * np.pi)
        return (float(length * np.sin(turn)), float(length * np.cos(turn)))

    shifts = [(0.0, 0.0)] + [(float(s[0]), float(s[1])) for s in _per_cycle(
        shifts_px, n_cycles, "shifts_px", draw_shift)]
    factors = [1.0] + [float(v) for v in _per_cycle(scales, n_cycles, "scales", lambda: 1.0)]
    # Room for the largest shift and the corners' travel under the largest rotation and scale.
    half = np.linalg.norm(span) / 2
    reach = (max(np.hypot(*s) for s in shifts) + half * np.deg2rad(max(map(abs, angles)))
             + half * max(abs(f - 1) for f in factors) + stage_error_px + _MARGIN)
    if scene_shape is None:
        base = np.full(2, np.ceil(reach))
        scene_shape = (int(span[0] + 2 * base[0]), int(span[1] + 2 * base[1]))
    else:
        base = np.floor((np.asarray(scene_shape[:2], dtype=float) - span) / 2)
        if np.any(base < reach):
            raise InputError(f"an image of {tuple(scene_shape)} px is too small for a "
                             f"{grid[0]} x {grid[1]} grid of {tile_shape} tiles with "
                             f"{reach:.0f} px of room for the cycles' rotations and shifts")
        scene_shape = (int(scene_shape[0]), int(scene_shape[1]))
    centre = np.asarray(scene_shape, dtype=float) / 2
    affines = []
    for k in range(n_cycles):
        model = _rigid(angles[k], shifts[k], centre, factors[k])
        error = rng.uniform(-stage_error_px, stage_error_px, stage.shape)
        affines.append(np.stack([model @ translation_affine(p + base + e)
                                 for p, e in zip(stage, error, strict=True)]))
    return _Plan(tuple(affines), stage, tuple(angles), tuple(shifts),
                 (int(scene_shape[0]), int(scene_shape[1])))


def _to_uint16(values: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    values = values + rng.normal(0, noise, values.shape)
    return np.rint(np.clip(values, 0, 1) * _FULL_SCALE).astype(np.uint16)


def cycle_tilesets(*, n_cycles: int = 3, grid: tuple[int, int] = (3, 4),
                   tile_shape: tuple[int, int] = (256, 256), overlap: float = 0.15,
                   max_rotation_deg: float = 1.0, max_shift_px: float = 50.0,
                   stage_error_px: float = 2.0, noise: float = 0.01,
                   rotations_deg: Sequence[float] | None = None,
                   shifts_px: Sequence[tuple[float, float]] | None = None,
                   channels_per_cycle: int = 2, seed: int = 0,
                   scales: Sequence[float] | None = None) -> CycleSet:
    """Render ``n_cycles`` tiled acquisitions of one slide, re-mounted between cycles.

    Parameters
    ----------
    n_cycles : int
    grid : (rows, cols)
    tile_shape : (y, x)
    overlap : float
        Fraction of a tile shared with each neighbour (stage grid).
    max_rotation_deg, max_shift_px : float
        Bounds of the drawn per-cycle rotation (|angle|, between 0.3 and 1 times the bound) and
        shift (length between 0.5 and 1 times the bound, any direction); cycle 1 has neither.
    stage_error_px : float
        Max |error| per axis of each tile's true position against its stage position
        (uniform, fractional; drawn afresh in every cycle, cycle 1 included).
    noise : float
        Standard deviation of Gaussian noise, as a fraction of the scene's full scale.
    rotations_deg, shifts_px : sequence, optional
        Given instead of drawn: ``n_cycles`` values (cycle 1's must be 0) or ``n_cycles - 1``
        (cycles 2..).
    channels_per_cycle : int
        Channel 0 is the shared nuclei channel ("DAPI"); the others are markers.
    seed : int
    scales : sequence of float, optional
        Per-cycle magnification against cycle 1 (1.0: none, the default), given like
        ``rotations_deg``.

    Returns
    -------
    CycleSet
    """
    if channels_per_cycle < 1:
        raise InputError(f"channels_per_cycle {channels_per_cycle} must be at least 1")
    rng = np.random.default_rng(seed)
    tile_shape = (int(tile_shape[0]), int(tile_shape[1]))
    plan = _plan(rng, n_cycles, grid, tile_shape, overlap, max_rotation_deg, max_shift_px,
                 stage_error_px, rotations_deg, shifts_px, scales)
    nuclei = _Blobs((float(plan.scene_shape[0]), float(plan.scene_shape[1])), 1 / 500, seed)
    layouts = []
    for k, affines in enumerate(plan.affines):
        gain, offset = (1.0, 0.0) if k == 0 else (rng.uniform(0.6, 1.2), rng.uniform(0.0, 0.1))
        markers = [_Blobs(nuclei.extent, 1 / 1500, seed * 1000 + 17 * k + m, background=0.05)
                   for m in range(1, channels_per_cycle)]
        tiles = []
        for aff in affines:
            planes = [gain * nuclei.sample(aff, tile_shape) + offset]
            planes += [m.sample(aff, tile_shape) for m in markers]
            tiles.append(_to_uint16(np.stack(planes), rng, noise))
        names = ["DAPI"] + [MARKERS[(k * (channels_per_cycle - 1) + m) % len(MARKERS)]
                            for m in range(channels_per_cycle - 1)]
        layouts.append(layout_from_arrays(tiles, positions=plan.stage, channels=names))
    return CycleSet(tuple(layouts), plan.affines, plan.angles, plan.shifts, plan.scene_shape)


def cycles_from_image(image: np.ndarray, *, n_cycles: int = 3, grid: tuple[int, int] = (3, 4),
                      tile_shape: tuple[int, int] = (512, 512), overlap: float = 0.15,
                      max_rotation_deg: float = 1.0, max_shift_px: float = 50.0,
                      stage_error_px: float = 2.0, noise: float = 0.005,
                      rotations_deg: Sequence[float] | None = None,
                      shifts_px: Sequence[tuple[float, float]] | None = None,
                      seed: int = 0) -> CycleSet:
    """Semi-synthetic cycles re-cut from one real 2D image (e.g. a stitched mosaic).

    Like :func:`cycle_tilesets`, but every cycle's single channel samples ``image`` (cubic
    splines, the image taken as the continuous scene) through the tiles' true affines, with a
    per-cycle intensity change (gain, offset and a gamma between 0.8 and 1.25) and noise.
    The grid is centred in the image; the scene frame is the image's pixel frame.

    Parameters
    ----------
    image : numpy.ndarray, shape (y, x)
        Any real dtype; scaled to [0, 1] by its 0.1 and 99.9 percentiles.

    Returns
    -------
    CycleSet
        One channel per cycle, "speckle".
    """
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise InputError(f"cycles_from_image takes a 2D image; got shape {img.shape}")
    lo, hi = np.percentile(img, [0.1, 99.9])
    coeffs = ndimage.spline_filter((img - lo) / max(hi - lo, 1e-12), order=3)
    rng = np.random.default_rng(seed)
    tile_shape = (int(tile_shape[0]), int(tile_shape[1]))
    plan = _plan(rng, n_cycles, grid, tile_shape, overlap, max_rotation_deg, max_shift_px,
                 stage_error_px, rotations_deg, shifts_px, None, img.shape)
    iy, ix = np.meshgrid(np.arange(tile_shape[0], dtype=float),
                         np.arange(tile_shape[1], dtype=float), indexing="ij")
    layouts = []
    for k, affines in enumerate(plan.affines):
        gain, offset, gamma = ((1.0, 0.0, 1.0) if k == 0 else
                               (rng.uniform(0.6, 1.0), rng.uniform(0.0, 0.1),
                                float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))))
        tiles = []
        for aff in affines:
            coords = np.tensordot(aff[:2, :2], np.stack([iy, ix]), axes=1) + aff[:2, 2:, None]
            values = ndimage.map_coordinates(coeffs, coords, order=3, prefilter=False)
            values = gain * np.clip(values, 0, 1) ** gamma + offset
            tiles.append(_to_uint16(values[None], rng, noise))
        layouts.append(layout_from_arrays(tiles, positions=plan.stage, channels=["speckle"]))
    return CycleSet(tuple(layouts), plan.affines, plan.angles, plan.shifts, plan.scene_shape)


def _placements(layout: Layout, truth: np.ndarray, points: np.ndarray) -> list:
    """For each tile: (mask of the points it covers, where the layout puts them (m, 2))."""
    out = []
    for tile, true in zip(layout.tiles, truth, strict=True):
        local = (np.linalg.inv(true) @ points)[:2]
        inside = np.all((local >= 0) & (local <= np.asarray(tile.shape)[:, None] - 1), axis=0)
        placed = (tile.affine @ np.vstack([local, np.ones(local.shape[1])]))[:2]
        out.append((inside, placed.T))
    return out


def cycle_alignment_error(aligned: Sequence[Layout], cycles: CycleSet, *,
                          reference: Layout | None = None, step: int = 8) -> list[float]:
    """RMS misplacement (mosaic px) of every cycle against cycle 1, over their shared area.

    Scene points on a grid of ``step`` px that every cycle covers are mapped through each tile
    that holds them: by the tile's true affine back to the tile's pixel, then by the aligned
    layout forward to the mosaic. Every (tile of cycle k, tile of cycle 1) pair that holds a
    point contributes its squared distance, so a tile misplaced in an overlap counts.

    Parameters
    ----------
    aligned : sequence of Layout
        One per cycle, in cycle 1's mosaic frame, tiles in the order of ``cycles.layouts``.
    cycles : CycleSet
    reference : Layout, optional
        Cycle 1 as aligned or registered; default ``aligned[0]``.
    step : int
        Spacing of the scene points, px.

    Returns
    -------
    list of float
        One RMS per cycle, cycle 1 included: 0.0 when ``reference`` is ``aligned[0]`` (the
        same object); against another ``reference`` it measures ``aligned[0]`` like any cycle.
    """
    if len(aligned) != len(cycles.layouts):
        raise InputError(f"{len(aligned)} aligned layouts for {len(cycles.layouts)} cycles")
    ref = aligned[0] if reference is None else reference
    ys, xs = (np.arange(0, n, step, dtype=float) for n in cycles.scene_shape)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    points = np.vstack([gy.ravel(), gx.ravel(), np.ones(gy.size)])
    per_cycle = [_placements(lay, true, points)
                 for lay, true in zip(aligned, cycles.true_affines, strict=True)]
    shared = np.ones(points.shape[1], dtype=bool)
    for tiles in per_cycle:
        shared &= np.any([inside for inside, _ in tiles], axis=0)
    if not shared.any():
        raise InputError("the cycles share no area: nothing to compare")
    ref_tiles = _placements(ref, cycles.true_affines[0], points)
    out = []
    for layout, tiles in zip(aligned, per_cycle, strict=True):
        if layout is ref:  # the reference against itself: each tile with itself only
            out.append(0.0)
            continue
        total = np.zeros(points.shape[1])
        count = np.zeros(points.shape[1])
        for inside_k, placed_k in tiles:
            for inside_1, placed_1 in ref_tiles:
                both = inside_k & inside_1 & shared
                d2 = np.sum((placed_k - placed_1) ** 2, axis=1)
                total[both] += d2[both]
                count[both] += 1
        out.append(float(np.sqrt(np.mean(total[shared] / count[shared]))))
    return out
