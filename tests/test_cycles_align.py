"""Cyclic imaging (issue 17): later cycles aligned to cycle 1, against exact truth.

Synthetic cycles (:func:`tilefuse.testing.cycle_tilesets`) show the same nuclei in every cycle,
turned by up to 1 degree and shifted by up to 50 px as a whole, with per-tile stage errors and
noise; semi-synthetic ones re-cut the authors'-reference mosaic of a real confocal set. The
bounds are on :func:`tilefuse.testing.cycle_alignment_error`: the RMS distance, over the area
every cycle covers, between where a cycle's aligned tiles and cycle 1's put the same scene point.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from conftest import DATA, read_positions
from tilefuse.errors import InputError
from tilefuse.io.readers.memory import layout_from_arrays
from tilefuse.io.tile_cache import read_tile
from tilefuse.model.layout import Layout
from tilefuse.registration.cycles import align_cycle, reference_alignment
from tilefuse.testing import CycleSet, cycle_alignment_error, cycle_tilesets, cycles_from_image

# Measured (see each test): synthetic cycles 0.005-0.014 px RMS (seeds 1-4), the scaled one
# 0.016, semi-synthetic 0.008 / 0.007; the issue asks for 0.2 px. The bound sits at about twice
# the largest measured.
BOUND_PX = 0.03


def _true_reference(cs: CycleSet) -> Layout:
    """Cycle 1 at its true placement: its mosaic frame is then the scene frame."""
    return cs.layouts[0].with_affines(cs.true_affines[0])


def _arrays(layout: Layout) -> list[np.ndarray]:
    return [np.array(read_tile(t.source)) for t in layout.tiles]


@pytest.fixture(scope="module")
def three_cycles():
    cs = cycle_tilesets(n_cycles=3, seed=1)  # rotations -0.97 and +0.40 deg, shifts 49, 35 px
    ref = _true_reference(cs)
    calls: list[tuple[int, int, str]] = []
    aligned = [align_cycle(ref, cs.layouts[k], cycle_number=k + 1, workers=2,
                           progress=lambda d, t, label: calls.append((d, t, label)))
               for k in (1, 2)]
    return cs, ref, aligned, calls


def test_the_generators_truth_is_exact():
    cs = cycle_tilesets(n_cycles=2, grid=(2, 2), tile_shape=(96, 96), noise=0.0, seed=3)
    assert [lay.channels for lay in cs.layouts] == [("DAPI", "CD3"), ("DAPI", "CD8")]
    assert cs.rotations_deg[0] == 0.0 and 0.3 <= abs(cs.rotations_deg[1]) <= 1.0
    assert 25 <= np.hypot(*cs.shifts_px[1]) <= 50
    np.testing.assert_array_equal(cs.layouts[0].positions, cs.layouts[1].positions)
    # Independent check: a cycle-2 tile's nuclei, looked up in a cycle-1 tile through the two
    # true affines (cubic interpolation), agree up to the cycle's gain and offset.
    a, b = cs.layouts[0].tiles[0], cs.layouts[1].tiles[0]
    img_a = read_tile(a.source)[0].astype(float)
    img_b = read_tile(b.source)[0].astype(float)

    def agreement(true_b: np.ndarray) -> float:
        iy, ix = np.mgrid[0:96, 0:96].astype(float)
        pts = np.linalg.inv(cs.true_affines[0][0]) @ true_b @ np.stack(
            [iy.ravel(), ix.ravel(), np.ones(iy.size)])
        inside = np.all((pts[:2] >= 2) & (pts[:2] <= 93), axis=0)
        looked_up = ndimage.map_coordinates(img_a, pts[:2, inside], order=3)
        return float(np.corrcoef(looked_up, img_b.ravel()[inside])[0, 1])

    exact = agreement(cs.true_affines[1][0])
    off = cs.true_affines[1][0].copy()
    off[:2, 2] += 0.5
    assert exact > 0.99999, exact  # measured 0.9999999 over 4004 px (noise 0)
    assert agreement(off) < 0.995  # measured 0.9895: half a pixel off is plain to see
    # The error measure: 0 at the truth, tens of px at the stage positions.
    true = [lay.with_affines(aff) for lay, aff in zip(cs.layouts, cs.true_affines, strict=True)]
    assert cycle_alignment_error(true, cs) == [0.0, pytest.approx(0.0, abs=1e-9)]
    assert cycle_alignment_error(list(cs.layouts), cs, reference=true[0])[1] > 20


def test_three_cycles_align_within_a_few_hundredths_of_a_pixel(three_cycles):
    cs, ref, aligned, calls = three_cycles
    errors = cycle_alignment_error([ref] + [a.layout for a in aligned], cs)
    # measured 0.0, 0.0050, 0.0077 px (seed 1); seeds 2-4: 0.0064-0.0135 px
    assert errors[0] == 0.0 and max(errors) <= BOUND_PX, errors
    for a, k in zip(aligned, (1, 2), strict=True):
        assert a.cycle == k + 1 and a.channel == 0
        assert abs(a.rotation_deg - cs.rotations_deg[k]) < 0.01  # measured 0.0017, 0.0019
        # (seeds 2-4: up to 0.0077)
        assert a.scale == 1.0 and not a.placed_by_model
        assert all(r.score is not None and r.score > 0.9 and r.reason == "" for r in a.tiles)
        # the per-tile corrections are the stage errors (up to 2 px per axis, both cycles)
        assert max(np.hypot(*r.correction) for r in a.tiles) < 6
        record = json.loads(json.dumps(a.to_dict()))
        assert record["cycle"] == k + 1 and len(record["tiles"]) == 12
        assert a.summary_lines()[0].startswith(f"cycle {k + 1}: rotation")
    assert ("aligning cycle 3" in {label for *_, label in calls}
            and (12, 12, "aligning cycle 2") in calls)


def test_reference_alignment_is_the_identity(three_cycles):
    _, ref, _, _ = three_cycles
    first = reference_alignment(ref)
    assert first.cycle == 1 and first.layout is ref and np.array_equal(first.matrix, np.eye(3))
    assert first.summary_lines() == ["cycle 1: reference (12 tiles, channel 0)"]
    assert [t["placed_by_model"] for t in first.to_dict()["tiles"]] == [False] * 12


def test_a_scaled_cycle_needs_allow_scale():
    cs = cycle_tilesets(n_cycles=2, grid=(3, 3), tile_shape=(192, 192), rotations_deg=[0.6],
                        shifts_px=[(20.0, -30.0)], scales=[1.008], seed=5)
    ref = _true_reference(cs)
    scaled = align_cycle(ref, cs.layouts[1], cycle_number=2, allow_scale=True, workers=2)
    errors = cycle_alignment_error([ref, scaled.layout], cs)
    assert errors[1] <= BOUND_PX, errors  # measured 0.016
    assert scaled.scale == pytest.approx(1.008, abs=5e-4)  # measured 1.00783
    rigid = align_cycle(ref, cs.layouts[1], cycle_number=2, workers=2)
    assert cycle_alignment_error([ref, rigid.layout], cs)[1] > 0.4  # measured 0.56


def test_corrupted_tiles_are_placed_by_the_model_and_reported():
    cs = cycle_tilesets(n_cycles=2, grid=(3, 3), tile_shape=(192, 192), seed=7)
    arrays = _arrays(cs.layouts[1])
    rng = np.random.default_rng(0)
    arrays[2] = rng.integers(0, 60000, arrays[2].shape).astype(np.uint16)  # noise
    arrays[4] = arrays[4][::-1].copy()  # the nuclei channel shows the marker: other structures
    arrays[7] = np.full_like(arrays[7], 12000)  # an empty field
    cycle = layout_from_arrays(arrays, positions=cs.layouts[1].positions,
                               channels=cs.layouts[1].channels)
    ref = _true_reference(cs)
    out = align_cycle(ref, cycle, cycle_number=2, workers=2)
    assert out.placed_by_model == [2, 4, 7]
    for i in (2, 7):
        assert out.tiles[i].reason == "no structure above the noise in the alignment channel"
        assert out.tiles[i].score is None
    # the marker does not match cycle 1's nuclei: a low score, or a match far off the model
    assert ("correlation with cycle 1" in out.tiles[4].reason
            or "from the cycle's model" in out.tiles[4].reason), out.tiles[4]
    assert all(out.tiles[i].correction == (0.0, 0.0) for i in (2, 4, 7))
    assert any("tile 4 placed by the cycle's model" in line for line in out.summary_lines())
    # Kept where the model puts it: off by its stage error only (at most 2 px per axis).
    centre = np.array([95.5, 95.5, 1.0])
    for i in (2, 4, 7):
        miss = (out.layout.tiles[i].affine @ centre - cs.true_affines[1][i] @ centre)[:2]
        assert np.hypot(*miss) < 2 * np.sqrt(2) + 0.1
    fixed = out.layout.with_affines(np.stack(
        [cs.true_affines[1][i] if i in (2, 4, 7) else t.affine
         for i, t in enumerate(out.layout.tiles)]))
    assert cycle_alignment_error([ref, fixed], cs)[1] <= BOUND_PX  # measured 0.010


def test_each_cycle_has_its_own_alignment_channel():
    cs = cycle_tilesets(n_cycles=2, grid=(3, 3), tile_shape=(192, 192), seed=9)
    swapped = layout_from_arrays([a[::-1] for a in _arrays(cs.layouts[1])],
                                 positions=cs.layouts[1].positions,
                                 channels=cs.layouts[1].channels[::-1])
    ref = _true_reference(cs)
    out = align_cycle(ref, swapped, cycle_number=2, channel=1, workers=2)
    assert out.channel == 1 and out.to_dict()["channel"] == 1
    assert cycle_alignment_error([ref, out.layout], cs)[1] <= BOUND_PX  # measured 0.008
    with pytest.raises(InputError, match="alignment channel 2 does not exist"):
        align_cycle(ref, swapped, cycle_number=2, channel=2)


def test_3d_and_disjoint_cycles_are_refused():
    stack = [np.zeros((4, 48, 48), np.uint16)] * 2
    layout3d = layout_from_arrays(stack, positions=[[0, 0, 0], [0, 0, 40]])
    flat = layout_from_arrays([np.zeros((48, 48), np.uint16)] * 2, positions=[[0, 0], [0, 40]])
    with pytest.raises(InputError, match=r"cycle 2 \(memory\) is 3D; cycle alignment takes 2D"):
        align_cycle(flat, layout3d, cycle_number=2)
    with pytest.raises(InputError, match=r"cycle 1 \(memory\) is 3D"):
        align_cycle(layout3d, flat, cycle_number=2)
    # Cycle 2 imaged another part of the slide, 1500 px away: nothing to align to.
    cs = cycle_tilesets(n_cycles=2, grid=(2, 3), tile_shape=(128, 128), rotations_deg=[0.5],
                        shifts_px=[(0.0, 1500.0)], seed=11)
    with pytest.raises(InputError, match=r"cycle 2: no credible alignment to cycle 1: .*same area"):
        align_cycle(_true_reference(cs), cs.layouts[1], cycle_number=2, workers=2)


def test_semi_synthetic_cycles_from_a_real_confocal_mosaic():
    """lscm_speckle_3x4 fused at the authors' positions, re-cut per cycle with a rotation, an
    offset, stage errors, a gain, offset and gamma change, and noise."""
    import tifffile

    import tilefuse

    folder = DATA / "lscm_speckle_3x4"
    rows = read_positions(folder / "positions.csv")
    tiles = [tifffile.imread(folder / r["file"]) for r in rows]
    tiles = [t[..., 0] if t.ndim == 3 else t for t in tiles]  # stored as RGB, R = G = B
    pos = np.array([[float(r["authors_y"]), float(r["authors_x"])] for r in rows])
    mosaic = np.asarray(tilefuse.fuse(layout_from_arrays(tiles, positions=pos)).data)
    assert mosaic.shape == (2869, 3795)
    centre = mosaic[400:2400, 700:3100]  # room for a 2 x 3 grid of 512 px tiles, cycles moved
    cs = cycles_from_image(centre, n_cycles=3, grid=(2, 3), tile_shape=(512, 512), seed=0)
    ref = _true_reference(cs)  # cycle 1 at the authors' positions, as the brief allows
    aligned = [align_cycle(ref, cs.layouts[k], cycle_number=k + 1, workers=2) for k in (1, 2)]
    errors = cycle_alignment_error([ref] + [a.layout for a in aligned], cs)
    assert max(errors) <= BOUND_PX, errors  # measured 0.0, 0.0079, 0.0072
    assert all(not a.placed_by_model for a in aligned)
    for a, k in zip(aligned, (1, 2), strict=True):
        assert abs(a.rotation_deg - cs.rotations_deg[k]) < 0.002  # measured 0.0002, 0.0003


def test_alignment_channels_take_ints_as_indices_and_text_as_names_first():
    """An int is a channel index even where a channel is named "1"; text is a name, and a
    number only when no channel has that name (the command line's ``--align-channel``)."""
    from types import SimpleNamespace

    from tilefuse.registration.cycles import alignment_channels

    cycles = [SimpleNamespace(channels=("1", "DAPI")), SimpleNamespace(channels=("DAPI", "1"))]
    assert alignment_channels(cycles, [1]) == (1, 1)
    assert alignment_channels(cycles, ["1"]) == (0, 1)
    assert alignment_channels(cycles, ["DAPI", 0]) == (1, 0)
    assert alignment_channels(cycles, []) == (0, 0)
