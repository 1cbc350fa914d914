"""Registration that knows the stage: the fitted stage model, widened candidate pairs, progress
and executors."""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, read_positions
from tilefuse.io.readers.build import Entry, layout_from_entries
from tilefuse.model.layout import translation_affine
from tilefuse.registration import RegistrationReport, register
from tilefuse.registration.stage_model import fit_stage_model
from tilefuse.testing import grid_tileset, miscalibrated_tileset

EMPTY = (7, 16, 27, 35)
LEICA = DATA / "leica_confocal_2tiles/experiment--test/slide--S00/chamber--U00--V00"
LEICA_PIXEL_UM = 0.24050019550342  # Pixels PhysicalSizeX/Y in the fields' OME-XML
MIST = DATA / "mist_phase_5x5"


def centred_errors(got: np.ndarray, truth: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Distance of each position from the truth after removing the mean offset of `reference`."""
    d = np.asarray(got, dtype=float) - truth
    return np.linalg.norm(d - d[reference].mean(axis=0), axis=1)


# ------------------------------------------------------------------------ the 6x6 miscalibrated set


@pytest.fixture(scope="module")
def miscalibrated():
    """6x6 tiles of 192 px, stage rotated 0.8 deg and scaled 3 % against the camera, +-1 px stage
    noise, whole-pixel true positions, four tiles of background only."""
    ts = miscalibrated_tileset((6, 6), (192, 192), 0.15, angle_deg=0.8, scale=1.03,
                               stage_noise=1.0, empty=EMPTY, seed=0)
    registered, report = register(ts.stage, workers=2)
    return ts, registered, report


def test_empty_tiles_are_placed_by_the_fitted_stage_model(miscalibrated):
    ts, registered, report = miscalibrated
    truth = ts.layout.positions
    content = np.ones(len(truth), dtype=bool)
    content[list(EMPTY)] = False
    err = centred_errors(registered.positions, truth, content)
    assert err[content].max() <= 0.3, err.round(3)  # measured 0.001
    assert err[~content].max() <= 2.0, err.round(2)  # measured 0.44, 0.71, 1.45, 1.31
    placed = {t.index: t.placed_by for t in report.tiles}
    assert {i for i, p in placed.items() if p == "model"} == set(EMPTY)
    assert report.summary["tiles_by_model"] == 4 and report.summary["tiles_by_stage"] == 0
    # by their stage offsets (moved with the rest), as before the model: 7.8-19.2 px off
    stage_err = centred_errors(ts.stage.positions, truth, content)
    assert stage_err[~content].min() > 5


def test_fitted_angle_and_scale(miscalibrated, tmp_path):
    ts, _, report = miscalibrated
    model = report.stage_model
    assert model["kind"] == "affine" and model["used"] and model["tiles"] == 32
    assert abs(model["angle_deg"] - 0.8) <= 0.05  # measured 0.783
    for s in model["scale_percent"]:
        assert abs(s - 3.0) <= 0.1, model["scale_percent"]  # measured 3.033, 3.011
    # per axis the +-1 px noise alone scatters a fit of 32 tiles by ~0.06 % (1 sigma): the fit
    # to the registered positions is the fit to the true ones (what any method can reach)
    content = [i for i in range(36) if i not in EMPTY]
    oracle = fit_stage_model(ts.stage.positions[content], ts.layout.positions[content])
    assert abs(model["angle_deg"] - oracle.angle_deg) <= 1e-3
    np.testing.assert_allclose(model["scale_percent"], oracle.scale_percent, atol=1e-3)
    assert abs(model["shear_deg"]) <= 0.1  # none simulated, noise: ~0.035 sd; measured 0.066
    line = next(ln for ln in report.summary_lines() if ln.startswith("stage model"))
    assert "rotated +0.78" in line and "scale y +3.03 % x +3.01 %" in line, line
    path = tmp_path / "report.json"
    report.to_json(path)
    back = RegistrationReport.from_json(path)
    assert back.to_dict() == report.to_dict() and back.stage_model["kind"] == "affine"


def test_second_pass_centred_by_the_model_recovers_links_beyond_max_shift():
    """With max_shift 5 px, the 3 % scale alone moves each neighbour ~5 px from its stage
    offset: the first pass rejects 14 of 60 links at the edge of the window; searched again in
    3.7 px windows centred by the fitted model, all 14 are accepted, and exact."""
    ts = miscalibrated_tileset((6, 6), (192, 192), 0.15, seed=0)
    registered, report = register(ts.stage, workers=2, max_shift=5)
    assert report.second_pass["tried"] == 14 and report.second_pass["accepted"] == 14
    assert report.second_pass["window"] == pytest.approx(3.7, abs=0.05)
    assert report.summary["links_accepted"] == 60
    truth = ts.layout.positions
    for lk in report.links:
        i, j = lk.tiles
        assert np.abs(np.subtract(lk.measured, truth[j] - truth[i])).max() <= 0.05
    err = centred_errors(registered.positions, truth, np.ones(36, dtype=bool))
    assert err.max() <= 0.05, err.round(3)  # measured 0.027


def test_stage_model_fit_kinds_and_robustness():
    rng = np.random.default_rng(0)
    strip = np.stack([np.zeros(5), np.arange(5) * 100.0], axis=1)
    turn = np.deg2rad(0.5)
    lin = 0.98 * np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    model = fit_stage_model(strip, strip @ lin.T + 7)
    assert model.kind == "similarity" and model.used  # a strip determines angle and one scale
    assert model.angle_deg == pytest.approx(0.5, abs=1e-9)
    assert model.scale_percent[1] == pytest.approx(-2.0, abs=1e-9)
    grid = np.array([(r * 100.0, c * 100.0) for r in range(4) for c in range(4)])
    noisy = grid + rng.uniform(-1, 1, grid.shape)
    assert not fit_stage_model(grid, noisy).used  # no miscalibration: stage offsets kept
    moved = grid @ lin.T
    moved[5] += [30.0, -20.0]  # one tile far off (a stage glitch) does not bend the fit
    robust = fit_stage_model(grid, moved)
    assert robust.angle_deg == pytest.approx(0.5, abs=0.01)
    assert robust.residual_max > 30
    assert fit_stage_model(grid[:1], grid[:1]).kind == "none"


# -------------------------------------------------------------------------------------- Leica


def test_leica_stage_metadata_scale_error():
    """Two fields placed by their OME-XML stage positions (metres / PhysicalSize): one link
    determines one offset, so the model is a similarity (its angle and length only)."""
    rows = read_positions(LEICA / "positions.csv")
    entries = []
    for r in rows:
        name = r["file"]
        field = f"field--X{int(r['col']):02d}--Y{int(r['row']):02d}"
        yx = [float(r["stage_y_m"]) * 1e6 / LEICA_PIXEL_UM,
              float(r["stage_x_m"]) * 1e6 / LEICA_PIXEL_UM]
        entries.append(Entry(name, (str(LEICA / field / name),), translation_affine(yx)))
    layout = layout_from_entries(entries, ndim=2, origin=str(LEICA))
    layout = replace(layout, pixel_size=(LEICA_PIXEL_UM, LEICA_PIXEL_UM), unit="micrometer")
    _, report = register(layout)
    assert report.summary["links_accepted"] == 1
    model = report.stage_model
    assert model["kind"] == "similarity" and model["tiles"] == 2
    stage = layout.positions[1] - layout.positions[0]
    fiji = np.array([float(rows[1]["fiji_y"]), float(rows[1]["fiji_x"])])
    expected = 100 * (np.linalg.norm(fiji) / np.linalg.norm(stage) - 1)  # -3.31 %
    assert expected == pytest.approx(-3.31, abs=0.01)
    # Fiji's offset is a reference to ~1 px in 937: 0.1 %
    assert model["scale_percent"][0] == pytest.approx(expected, abs=0.1)  # measured -3.30
    assert model["scale_percent"][0] == model["scale_percent"][1]
    assert model["angle_deg"] == pytest.approx(np.degrees(np.arctan2(fiji[1], fiji[0])),
                                               abs=0.1)  # 0.198 deg; measured 0.17
    corrected = model["corrected_pixel_size"]
    assert corrected[0] == pytest.approx(LEICA_PIXEL_UM / (1 + expected / 100), rel=1e-3)
    assert any("pixel size by the stage 0.248" in ln for ln in report.summary_lines()), (
        report.summary_lines())


# ------------------------------------------------------------------------- widened candidates


def test_reregistering_a_registered_mist_layout_keeps_every_tile_linked(caplog):
    """At MIST's registered positions some overlaps are only 5-7 px thick (< min_overlap_px):
    candidates come from the positions widened by max_shift, so they are still measured."""
    shape = (183, 245)
    step = (round(shape[0] * 0.94), round(shape[1] * 0.94))
    entries = []
    for k in range(25):  # column-major numbering
        col, row = divmod(k, 5)
        name = f"tiles/ImageName_t01_p{k + 1:02d}.tif"
        entries.append(Entry(name, (str(MIST / name),),
                             translation_affine([row * step[0], col * step[1]])))
    nominal = layout_from_entries(entries, ndim=2, origin=str(MIST))
    first, _ = register(nominal)
    with caplog.at_level(logging.WARNING, logger="tilefuse.registration"):
        again, report = register(first)
    assert report.summary["tiles_by_image"] == 25, report.summary_lines()
    assert not [r for r in caplog.records if "no accepted link" in r.getMessage()]
    truth = {r["file"]: (float(r["gt_y"]), float(r["gt_x"]))
             for r in read_positions(MIST / "positions.csv")}
    expected = np.array([truth[Path(t.name).name] for t in again.tiles])
    err = centred_errors(again.positions, expected, np.ones(25, dtype=bool))
    assert err.max() <= 0.004, err.round(4)  # as from the nominal grid (measured 0.0017)


# ------------------------------------------------------------------------ progress, executors


def test_progress_and_a_process_executor_give_the_same_result():
    ts = grid_tileset((2, 3), (96, 96), 0.25, position_error=4, seed=3)
    plain, plain_report = register(ts.stage, workers=1)
    calls: list[tuple[int, int, str]] = []
    context = multiprocessing.get_context("spawn")  # nothing shared: every job is pickled
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        registered, report = register(ts.stage, executor=pool, workers=2,
                                      progress=lambda *a: calls.append(a))
    np.testing.assert_array_equal(registered.positions, plain.positions)
    assert report.to_dict()["links"] == plain_report.to_dict()["links"]
    pairs = [c for c in calls if c[2] == "registering pairs"]
    total = report.timings["pairs_measured"]
    assert pairs[0] == (0, total, "registering pairs") and pairs[-1] == (total, total,
                                                                         "registering pairs")
    assert total == len(report.links) + report.null_samples
    assert [c for c in calls if c[2] == "solving"] == [(0, 0, "solving"), (1, 1, "solving")]
    assert calls[-1] == (1, 1, "solving")
