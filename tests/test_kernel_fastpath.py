"""The numpy chunk kernel's fast paths against the straightforward math they replace, bit for bit.

The kernel interpolates a translated tile in bands, converts its pixels once, splits its box
into a weight-1 core and weighted frame slabs, and fills uncovered pixels with ``copyto``. The
reference below is the plain version of the same steps, kept here: two-tap interpolation along
each fractional axis over the whole box (``f * data[k - 1] + (1 - f) * data[k]`` in the
accumulator dtype), the full outer product of the cosine ramps, ``acc += v * w``,
``wsum += w``, then divide, fill, round, clip and cast. Every output must be equal to the last
bit (floats compared as integers, so -0.0 and NaN payloads count).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tilefuse.fusion import chunk as chunk_module
from tilefuse.fusion import resample
from tilefuse.fusion.blend import _frame
from tilefuse.fusion.chunk import ChunkTile, accumulator_dtype
from tilefuse.fusion.kernel import fuse_chunk
from tilefuse.fusion.resample import classify, snap, translation_span

FILL = 7


def reference_ramp(t: np.ndarray, n: int, width: float) -> np.ndarray:
    """The cosine feathering weight along one axis, float32 (as documented in blend.py)."""
    width = max(float(width), 0.5)
    d = np.minimum(t, (n - 1) - t) + 0.5
    w = np.ones(d.shape, dtype=np.float32)
    band = d < width
    w[band] = 0.5 - 0.5 * np.cos(np.pi * np.maximum(d[band], 0.0) / width)
    return w


def reference_values(data, pos, spans, acc):
    """A translated tile's pixels on the output indices ``spans``: sliced, or interpolated along
    each fractional axis in turn over the whole box."""
    kind = acc.type
    if classify(_affine(pos)) == "slice":
        ip = np.round(pos).astype(np.int64)
        src = (slice(lo - i, hi - i) for (lo, hi), i in zip(spans, ip, strict=True))
        return data[(slice(None), *src)]
    ip = np.floor(pos).astype(np.int64)
    frac = pos - ip
    out = data[(slice(None), *(slice(lo - i - (f != 0), hi - i)
                               for (lo, hi), i, f in zip(spans, ip, frac, strict=True)))]
    for ax, f in enumerate(frac, start=1):
        if f == 0:
            continue
        lower_taps = tuple(slice(None, -1) if k == ax else slice(None) for k in range(out.ndim))
        upper_taps = tuple(slice(1, None) if k == ax else slice(None) for k in range(out.ndim))
        upper = np.multiply(out[upper_taps], kind(1 - f), dtype=acc)
        lower = np.multiply(out[lower_taps], kind(f), dtype=acc)
        lower += upper
        out = lower
    return out.astype(acc)


def reference_chunk(tiles, positions, origin, shape, *, blend, widths, dtype, fill=FILL):
    """One output chunk by the plain math (see the module docstring)."""
    dtype = np.dtype(dtype)
    acc_dtype = accumulator_dtype(tiles[0].dtype, dtype)
    n_channels = tiles[0].shape[0]
    acc = np.zeros((n_channels, *shape), acc_dtype)
    wsum = np.zeros(shape, acc_dtype)
    covered = np.zeros(shape, bool)
    for data, pos in zip(tiles, positions, strict=True):
        pos = snap(np.asarray(pos, dtype=np.float64))
        spans = [translation_span(float(p), n, int(c0), int(cn))
                 for p, n, c0, cn in zip(pos, data.shape[1:], origin, shape, strict=True)]
        if any(s is None for s in spans):
            continue
        box = tuple(slice(lo - c0, hi - c0) for (lo, hi), c0 in zip(spans, origin, strict=True))
        values = reference_values(data, pos, spans, acc_dtype)
        w = np.ones((1,) * len(shape), np.float32)
        axes = zip(spans, pos, data.shape[1:], widths, strict=True)
        for ax, ((lo, hi), p, n, width) in enumerate(axes):
            ramp = (reference_ramp(np.arange(lo, hi, dtype=np.float64) - p, n, width)
                    if blend == "linear" else np.ones(hi - lo, np.float32))
            w = w * ramp.reshape([-1 if k == ax else 1 for k in range(len(shape))])
        w = np.broadcast_to(w, values.shape[1:])
        acc[(slice(None), *box)] += np.multiply(values, w, dtype=acc_dtype)
        wsum[box] += w
        covered[box] = True
    with np.errstate(invalid="ignore", divide="ignore"):
        values = acc / wsum
    values[:, ~covered] = fill
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def _affine(pos) -> np.ndarray:
    affine = np.eye(len(pos) + 1)
    affine[:-1, -1] = pos
    return affine


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.kind == "f" else a


def _tiles(dtype, ndim, n_channels, seed):
    """Overlapping tiles on a grid (2 x 3 in 2D, 2 x 2 x 2 in 3D), with values spanning the dtype:
    float32 ones with exact zeros and -0.0 among them."""
    rng = np.random.default_rng(seed)
    shape = (13, 26, 30)[-ndim:] if ndim == 3 else (40, 50)
    grid = (2, 2, 2) if ndim == 3 else (2, 3)
    tiles, corners = [], []
    for index in itertools.product(*(range(g) for g in grid)):
        if np.dtype(dtype).kind == "f":
            data = rng.normal(0, 1000, (n_channels, *shape)).astype(dtype)
            data.flat[rng.integers(0, data.size, 20)] = rng.choice([0.0, -0.0], 20)
        else:
            info = np.iinfo(dtype)
            data = rng.integers(max(info.min, -2**30), min(info.max, 2**30), (n_channels, *shape),
                                dtype=dtype, endpoint=True)
        data.flags.writeable = False  # as the tile cache hands them out
        tiles.append(data)
        corners.append(np.array(index) * (np.array(shape) * 0.8))  # 20 % overlap
    return tiles, corners


POSITIONS = {
    "fractional": lambda rng, c: c + rng.uniform(-2.5, 2.5, c.shape),
    "integer": lambda rng, c: np.round(c + rng.uniform(-2.5, 2.5, c.shape)),
    # some axes integer, some fractional, some within the snapping margin of an integer
    "mixed": lambda rng, c: np.round(c) + rng.choice([0.0, 0.25, 0.5, 3e-7, -4e-7], c.shape),
}


def _fuse_all(tiles, positions, chunk, **options):
    """The whole mosaic, chunk by chunk, by the kernel and by the reference (grid from 0)."""
    ends = [p + np.array(t.shape[1:]) for p, t in zip(positions, tiles, strict=True)]
    top = np.ceil(np.max(ends, axis=0))
    shape = tuple(int(s) + 2 for s in top)  # a margin no tile covers
    dtype = options["dtype"]
    n_channels = tiles[0].shape[0]
    ours = np.empty((n_channels, *shape), dtype)
    expected = np.empty_like(ours)
    chunk_tiles = [ChunkTile(_affine(p), t.shape[1:], classify(_affine(p)),
                             (lambda t=t: t)) for t, p in zip(tiles, positions, strict=True)]
    for block in itertools.product(*(range(0, s, c) for s, c in zip(shape, chunk, strict=True))):
        origin = np.array(block)
        size = tuple(min(c, s - o) for c, s, o in zip(chunk, shape, block, strict=True))
        at = (slice(None), *(slice(o, o + n) for o, n in zip(block, size, strict=True)))
        ours[at] = fuse_chunk(origin, size, chunk_tiles, n_channels=n_channels, fill=FILL,
                              backend="numpy", **options)
        expected[at] = reference_chunk(tiles, positions, origin, size, fill=FILL, **options)
    return ours, expected


CASES = [  # dtype, ndim, channels, positions, widths, chunk
    ("uint16", 2, 1, "fractional", (3.0, 2.0), (17, 23)),
    ("uint16", 2, 1, "fractional", (40.0, 55.0), (64, 64)),
    ("uint16", 2, 2, "integer", (6.0, 9.0), (25, 19)),
    ("uint16", 2, 1, "mixed", (30.0, 4.0), (200, 200)),
    ("float32", 2, 1, "fractional", (5.0, 5.0), (31, 29)),
    ("float32", 2, 2, "mixed", (60.0, 60.0), (16, 48)),
    ("float32", 2, 1, "integer", (0.3, 100.0), (33, 7)),
    ("int32", 2, 1, "fractional", (8.0, 12.0), (21, 40)),  # float64 accumulator
    ("uint16", 3, 1, "fractional", (2.0, 4.0, 5.0), (7, 11, 13)),
    ("uint16", 3, 2, "mixed", (9.0, 30.0, 30.0), (20, 50, 50)),
    ("float32", 3, 1, "integer", (3.0, 6.0, 40.0), (5, 17, 9)),
    ("float32", 3, 2, "fractional", (20.0, 3.0, 8.0), (13, 26, 30)),
]


@pytest.mark.parametrize("band_pixels", [resample.BAND_PIXELS, 7])
@pytest.mark.parametrize("blend", ["linear", "mean"])
@pytest.mark.parametrize(("dtype", "ndim", "channels", "kind", "widths", "chunk"), CASES)
def test_kernel_bit_identical_to_the_plain_math(monkeypatch, dtype, ndim, channels, kind, widths,
                                                chunk, blend, band_pixels):
    monkeypatch.setattr(resample, "BAND_PIXELS", band_pixels)  # 7: many bands, cut anywhere
    seed = len(CASES) * ndim + channels + int(widths[0])
    tiles, corners = _tiles(dtype, ndim, channels, seed)
    rng = np.random.default_rng(seed)
    positions = [POSITIONS[kind](rng, c) for c in corners]
    ours, expected = _fuse_all(tiles, positions, chunk, blend=blend, widths=widths, dtype=dtype)
    assert ours.dtype == expected.dtype
    assert np.array_equal(_bits(ours), _bits(expected))
    assert (ours == FILL).any()  # the margin: uncovered pixels were filled


def test_kernel_bit_identical_with_other_output_dtypes():
    """uint16 tiles into float32 and uint8 outputs (rounding, clipping) and float32 tiles with
    values beyond uint16 into uint16 (clipped at both ends)."""
    for tile_dtype, out_dtype, scale in (("uint16", "float32", 1), ("uint16", "uint8", 1),
                                         ("float32", "uint16", 100)):
        tiles, corners = _tiles(tile_dtype, 2, 1, seed=5)
        tiles = [t * np.asarray(scale, t.dtype) for t in tiles]
        rng = np.random.default_rng(5)
        positions = [POSITIONS["fractional"](rng, c) for c in corners]
        ours, expected = _fuse_all(tiles, positions, (24, 36), blend="linear", widths=(6.0, 6.0),
                                   dtype=out_dtype)
        assert np.array_equal(_bits(ours), _bits(expected)), (tile_dtype, out_dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fill", [0, 7, -3.5, 0.1, np.nan, -np.inf, 16777217, 2**60 + 1,
                                  np.float64(1 / 3)])
def test_fill_sets_the_bits_boolean_assignment_sets(dtype, fill):
    rng = np.random.default_rng(1)
    values = rng.normal(size=(2, 9, 11)).astype(dtype)
    where = rng.random((9, 11)) < 0.3
    expected = values.copy()
    expected[:, where] = fill
    chunk_module._fill(values, where, fill)
    assert np.array_equal(_bits(values), _bits(expected))


@pytest.mark.parametrize("band_pixels", [resample.BAND_PIXELS, 1, 5, 64])
@pytest.mark.parametrize("acc", [np.float32, np.float64])
@pytest.mark.parametrize("tile_dtype", [np.uint16, np.float32, np.int32])
def test_shift_linear_bit_identical(monkeypatch, band_pixels, acc, tile_dtype):
    """The banded interpolation alone, 2D and 3D, 1-3 channels, every mix of integer and
    fractional axes."""
    monkeypatch.setattr(resample, "BAND_PIXELS", band_pixels)
    rng = np.random.default_rng(int(band_pixels) + np.dtype(tile_dtype).itemsize)
    acc = np.dtype(acc)
    for shape in ((1, 12, 17), (3, 9, 10, 11), (2, 40, 3)):
        data = (rng.normal(0, 3000, shape) + 5000).astype(tile_dtype)
        data.flags.writeable = False
        for fractional in itertools.product([False, True], repeat=len(shape) - 1):
            if not any(fractional):
                continue
            pos = np.array([rng.uniform(-3, 3) if f else float(rng.integers(-3, 3))
                            for f in fractional])
            spans = [translation_span(float(p), n, -10, n + 20)
                     for p, n in zip(pos, shape[1:], strict=True)]
            ours = resample._shift_linear(data, pos, spans, acc, [0] * len(spans))
            expected = reference_values(data, pos, spans, acc)
            assert ours.dtype == acc and ours.flags.c_contiguous
            assert np.array_equal(_bits(ours), _bits(expected)), (shape, pos)


def test_frame_and_interior_tile_the_box_once():
    """The frame slabs and the interior cover every pixel of a box exactly once, for interiors
    anywhere (touching the edges, empty along some axis)."""
    rng = np.random.default_rng(3)
    for box_shape in ((5, 7), (4, 6, 3), (1, 9), (3, 1, 4)):
        for _ in range(30):
            interior = []
            for m in box_shape:
                a, b = sorted(rng.integers(0, m + 1, 2))
                interior.append((int(a), int(b)))
            count = np.zeros(box_shape, int)
            for region in _frame(tuple(interior), box_shape):
                assert all(s.stop > s.start for s in region)
                count[region] += 1
            if all(b > a for a, b in interior):
                count[tuple(slice(a, b) for a, b in interior)] += 1
            assert (count == 1).all(), (box_shape, interior)


@pytest.mark.parametrize(("dtype", "in_place"), [("uint16", True), ("int32", True),
                                                  ("float32", False)])
def test_first_tile_of_a_chunk_is_written_in_place_for_integer_tiles_only(monkeypatch, dtype,
                                                                           in_place):
    """A chunk's first translated integer tile is interpolated straight into the accumulator
    (bit for bit as added to zeros: ``test_kernel_bit_identical_to_the_plain_math``); float
    tiles never are, since ``0 + -0.0`` is ``+0.0``."""
    from tilefuse.fusion.blend import _Weighted

    given: list[bool] = []
    original = _Weighted.into
    monkeypatch.setattr(_Weighted, "into", lambda self, box: (
        given.append(True) or original(self, box)))
    tiles, corners = _tiles(dtype, 2, 1, seed=3)
    rng = np.random.default_rng(3)
    positions = [POSITIONS["fractional"](rng, c) for c in corners]
    ours, expected = _fuse_all(tiles, positions, (32, 32), blend="linear", widths=(6.0, 6.0),
                               dtype=dtype)
    assert np.array_equal(_bits(ours), _bits(expected))
    assert bool(given) == in_place
