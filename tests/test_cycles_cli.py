"""Cyclic imaging end to end: ``tilefuse fuse CYCLE1 CYCLE2 CYCLE3`` and ``tilefuse register``.

Three cycles of one slide (:func:`tilefuse.testing.cycle_tilesets`: the same nuclei on DAPI with a
per-cycle gain, a different marker each, every cycle rotated and shifted as a whole, per-tile
stage error), written as two-channel TIFF tiles and a CSV layout per cycle at the stage
positions. Checked against the truth the tiles were rendered with: where the aligned layouts put
every scene point (:func:`tilefuse.testing.cycle_alignment_error`) and where the fused marker
pixels land (each output pixel predicted from the true tile placements).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from scipy import ndimage

from conftest import PIXEL, run_main, unfinish, write_cycle
from tilefuse import read_layout
from tilefuse.io.readers import write_csv_layout
from tilefuse.io.tile_cache import read_tile
from tilefuse.io.tiles import FileSource
from tilefuse.model.layout import Layout, Tile
from tilefuse.plan.geometry import output_box
from tilefuse.testing import CycleSet, cycle_alignment_error, cycle_tilesets

SET = {"n_cycles": 3, "grid": (2, 3), "tile_shape": (192, 192), "seed": 2}


@pytest.fixture(scope="module")
def cycles(tmp_path_factory) -> tuple[CycleSet, list[Path]]:
    """The cycle set and each cycle's CSV layout."""
    cs = cycle_tilesets(**SET)
    root = tmp_path_factory.mktemp("cycles")
    return cs, [write_cycle(one, root / f"cycle{k}") for k, one in enumerate(cs.layouts, 1)]


@pytest.fixture(scope="module")
def fused(cycles, tmp_path_factory):
    """``fuse --register`` of the three cycles into OME-Zarr with a report: (image, report,
    result)."""
    _, paths = cycles
    root = tmp_path_factory.mktemp("fused")
    out, report = root / "m.ome.zarr", root / "m.json"
    result = run_main("fuse", *paths, "-o", out, "--register", "--report", report, "--chunk",
                      "128")
    assert result.returncode == 0, result.stderr
    return out, report, result


def _level(out: Path, k: int = 0) -> np.ndarray:
    return np.asarray(zarr.open_group(out, mode="r")[str(k)])


def _read_back(out: Path, n: int = 3, suffix: str = ".layout.csv") -> list[Layout]:
    stem = out.name.split(".")[0]
    names = [stem + suffix] + [f"{stem}.cycle{k}{suffix}" for k in range(2, n + 1)]
    return [read_layout(out.parent / name) for name in names]


def _inside(layout: Layout, points: np.ndarray, margin: float) -> list[tuple[int, np.ndarray]]:
    """Per point (homogeneous (3, m) in the layout's frame): the first tile holding it at least
    `margin` px from its edge and its tile pixel, or (-1, nan)."""
    found = np.full(points.shape[1], -1)
    local = np.full((2, points.shape[1]), np.nan)
    for i, tile in enumerate(layout.tiles):
        p = (np.linalg.inv(tile.affine) @ points)[:2]
        ok = (found < 0) & np.all((p >= margin) & (p <= np.array(tile.shape)[:, None] - 1 - margin),
                                  axis=0)
        found[ok], local[:, ok] = i, p[:, ok]
    return [(int(i), local[:, j]) for j, i in enumerate(found)]


def _predicted(cs: CycleSet, first: Layout, k: int, channel: int, points: np.ndarray):
    """What cycle `k`'s channel should hold at mosaic `points` (homogeneous (3, m)): the scene
    point of each (through cycle 1's tile as fused and its TRUE placement), then cycle k's tile
    that truly holds it, sampled there. Returns (values, mask of points both cover)."""
    scene = np.full((3, points.shape[1]), np.nan)
    for j, (i, p) in enumerate(_inside(first, points, 2)):
        if i >= 0:
            scene[:, j] = cs.true_affines[0][i] @ np.array([*p, 1.0])
    values, ok = np.zeros(points.shape[1]), np.zeros(points.shape[1], dtype=bool)
    truth = cs.layouts[k].with_affines(cs.true_affines[k])
    covered = np.isfinite(scene[0])
    for j, (i, p) in zip(np.flatnonzero(covered),
                         _inside(truth, scene[:, covered], 2), strict=True):
        if i >= 0:
            pixels = read_tile(cs.layouts[k].tiles[i].source)[channel].astype(float)
            values[j] = ndimage.map_coordinates(pixels, p[:, None], order=1)[0]
            ok[j] = True
    return values, ok


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def test_three_cycles_fuse_into_one_image_with_every_channel(cycles, fused):
    cs, _ = cycles
    out, _, result = fused
    image = _level(out)
    ome = zarr.open_group(out, mode="r").attrs["ome"]
    names = [c["label"] for c in ome["omero"]["channels"]]
    assert names == ["DAPI (cycle 1)", "CD3 (cycle 1)", "DAPI (cycle 2)", "CD8 (cycle 2)",
                     "DAPI (cycle 3)", "CD4 (cycle 3)"]
    first = _read_back(out)[0]
    origin, shape = output_box(first)
    assert image.shape == (6, *shape)  # cycle 1's output grid
    assert "fused 3 cycles" in result.stderr
    # every later DAPI agrees with cycle 1's where all three cycles are (gain and offset differ)
    # Measured: NCC 0.9976, 0.9967, residual 0.9% of the range; cycle 2 moved by 0.5 px more:
    # 0.991 and 1.8%.
    shared = np.all(image[0::2] > 0, axis=0)
    for k in (1, 2):
        a, b = image[0][shared].astype(float), image[2 * k][shared].astype(float)
        assert _ncc(a, b) > 0.995, k
        gain, offset = np.polyfit(a, b, 1)
        rms = np.sqrt(np.mean((gain * a + offset - b) ** 2))
        assert rms < 0.013 * np.ptp(b), (k, rms)
    # The marker pixels land where the scene says: every 4th output pixel predicted from truth.
    # Measured: NCC 0.9997, 0.9995, median error 0.03%, 0.08% of the range; cycle 2 moved by
    # 0.25 px more: 0.9977 and 0.35%.
    gy, gx = np.meshgrid(*(np.arange(0, n, 4) for n in shape), indexing="ij")
    points = np.vstack([gy.ravel() + origin[0], gx.ravel() + origin[1], np.ones(gy.size)])
    for k in (1, 2):
        want, ok = _predicted(cs, first, k, 1, points)
        got = image[2 * k + 1][gy.ravel()[ok], gx.ravel()[ok]].astype(float)
        assert ok.sum() > 9000
        assert _ncc(want[ok], got) > 0.999, k
        assert np.median(np.abs(want[ok] - got)) < 0.002 * np.ptp(want[ok]), k


def test_the_python_api_makes_the_commands_image(cycles, fused):
    """``tilefuse.register`` (cycle 1), ``tilefuse.align_cycles`` (channels by name) and
    ``tilefuse.fuse_cycles``: the pixels of ``fuse --register`` bit for bit, and every cycle
    where the truth puts it."""
    import tilefuse
    from tilefuse.fusion.cycles import plan_cycles

    cs, paths = cycles
    out, _, _ = fused
    layouts = [read_layout(p) for p in paths]
    first, _ = tilefuse.register(layouts[0])
    aligned = tilefuse.align_cycles([first, *layouts[1:]], channel="DAPI", workers=2)
    assert [a.cycle for a in aligned] == [1, 2, 3] and aligned[0].layout is first
    assert max(cycle_alignment_error([a.layout for a in aligned], cs)) < 0.05
    plans = plan_cycles([a.layout for a in aligned], chunk=128)
    # cycle 1's widths for every cycle; each its own kernel: the turned cycles compiled
    assert all(p.widths == plans[0].widths for p in plans)
    assert [p.backend for p in plans] == ["numpy", "numba", "numba"]
    mosaic = tilefuse.fuse_cycles([a.layout for a in aligned], chunk=128)
    assert mosaic.channel_names == tuple(f"{name} (cycle {k})" for k, one in
                                         enumerate(layouts, 1) for name in one.channels)
    assert mosaic.channel_names[::2] == ("DAPI (cycle 1)", "DAPI (cycle 2)", "DAPI (cycle 3)")
    assert np.array_equal(mosaic.compute(), _level(out))


def test_align_cycles_refuses_a_channel_a_cycle_lacks(cycles):
    import tilefuse
    from tilefuse import InputError

    _, paths = cycles
    layouts = [read_layout(p) for p in paths]
    marker = layouts[1].channels[1]  # cycle 2's own marker: not in cycle 1
    with pytest.raises(InputError, match=rf"alignment channel {marker}: cycle 1 has no such "
                                         rf"channel; its channels are DAPI, "):
        tilefuse.align_cycles(layouts, channel=marker)
    with pytest.raises(InputError, match="gives 2 channels for 3 cycles"):
        tilefuse.align_cycles(layouts, channel=["DAPI", "DAPI"])


def test_the_report_holds_each_cycle_and_a_picture(cycles, fused):
    from PIL import Image

    cs, paths = cycles
    _, report, result = fused
    doc = json.loads(report.read_text())
    assert doc["registration"]["summary"]["links_accepted"] == 7  # cycle 1's registration
    assert [c["cycle"] for c in doc["cycles"]] == [1, 2, 3]
    assert [c["input"] for c in doc["cycles"]] == [str(p) for p in paths]
    saved = _read_back(fused[0])
    for entry, layout in zip(doc["cycles"], saved, strict=True):  # the model the tiles got
        a = layout.tiles[0].affine
        assert np.degrees(np.arctan2(a[1, 0], a[0, 0])) == pytest.approx(entry["rotation_deg"])
        assert len(entry["tiles"]) == 6 and not any(t["placed_by_model"] for t in entry["tiles"])
        assert all(np.hypot(*t["correction"]) < 3 for t in entry["tiles"])
    turns = [c["rotation_deg"] for c in doc["cycles"]]
    assert np.abs(np.subtract(turns, cs.rotations_deg)).max() < 0.06, turns  # 0.014, 0.034
    with Image.open(report.with_suffix(".png")) as picture:
        assert picture.size[0] >= 2 * 256  # a panel per later cycle
    assert "cycle 2: rotation" in result.stderr and "cycle 3: rotation" in result.stderr
    assert f"report written to {report}" in result.stderr


def test_each_cycle_layout_is_saved_beside_the_image_and_in_the_manifest(cycles, fused):
    cs, _ = cycles
    out, _, _ = fused
    saved = _read_back(out)
    assert not saved[1].tiles[0].is_translation  # rotated: full affines kept
    fiji = _read_back(out, suffix=".TileConfiguration.txt")
    for one, other in zip(saved, fiji, strict=True):
        np.testing.assert_array_equal(one.affines, other.affines)
    errors = cycle_alignment_error(saved, cs)
    assert errors[0] == 0.0 and max(errors[1:]) < 0.15, errors  # measured 0.032, 0.078 px
    manifest = zarr.open_group(out, mode="r").attrs["tilefuse"]
    assert {"m.cycle2.layout.csv", "m.cycle3.TileConfiguration.txt"} <= set(manifest["sidecars"])
    assert [c["cycle"] for c in manifest["cycles"]] == [2, 3]


def test_channel_names_align_channel_per_cycle_and_ome_tiff(cycles, fused, tmp_path):
    """Cycle 3 stores DAPI second: --align-channel 0 DAPI 1 picks it; all six channels and
    their given names reach the OME-TIFF, pixels as in the OME-Zarr run."""
    from xml.etree import ElementTree

    cs, paths = cycles
    swapped = write_cycle(cs.layouts[2], tmp_path / "cycle3", reverse=True)
    out = tmp_path / "t.ome.tif"
    names = ["a", "b", "c", "d", "e", "f"]
    result = run_main("fuse", paths[0], paths[1], swapped, "-o", out, "--chunk", "128", "-q",
                      "--register",
                      "--align-channel", "0", "DAPI", "1", "--channel-names", *names)
    assert result.returncode == 0, result.stderr
    with tifffile.TiffFile(out) as tif:
        pixels = tif.series[0].asarray()
        xml = tif.ome_metadata
    channels = [c.get("Name") for c in ElementTree.fromstring(xml).iter()
                if c.tag.endswith("}Channel")]
    assert channels == names
    zarr_pixels = _level(fused[0])
    assert pixels.shape == zarr_pixels.shape
    np.testing.assert_array_equal(pixels[:4], zarr_pixels[:4])
    np.testing.assert_array_equal(pixels[4:], zarr_pixels[5:3:-1])  # cycle 3's, swapped
    errors = cycle_alignment_error(_read_back(out), cs)
    assert max(errors) < 0.15, errors


def test_register_writes_one_aligned_layout_per_cycle(cycles, tmp_path):
    cs, paths = cycles
    out = tmp_path / "reg.csv"
    result = run_main("register", *paths, "-o", out, "--report", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    saved = [read_layout(tmp_path / n) for n in ("reg.csv", "reg.cycle2.csv", "reg.cycle3.csv")]
    errors = cycle_alignment_error(saved, cs)
    assert max(errors) < 0.15, errors
    assert not saved[2].tiles[0].is_translation
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["registration"]["tiles"] and len(doc["cycles"]) == 3  # cycle 1 registered
    assert (tmp_path / "r.png").is_file()


def test_align_scale_lets_a_cycle_at_another_magnification_fit(tmp_path):
    """A cycle imaged 0.8% larger: ``--align-scale`` aligns it as the library's
    ``allow_scale`` does; without it the rigid model leaves it half a pixel off."""
    cs = cycle_tilesets(n_cycles=2, grid=(3, 3), tile_shape=(192, 192), rotations_deg=[0.6],
                        shifts_px=[(20.0, -30.0)], scales=[1.008], seed=5)
    paths = [write_cycle(one, tmp_path / f"c{k}") for k, one in enumerate(cs.layouts, 1)]
    errors = {}
    for name, extra in (("scaled", ["--align-scale"]), ("rigid", [])):
        out = tmp_path / f"{name}.csv"
        result = run_main("register", *paths, "-o", out, "-q", *extra)
        assert result.returncode == 0, result.stderr
        saved = [read_layout(tmp_path / n) for n in (f"{name}.csv", f"{name}.cycle2.csv")]
        errors[name] = cycle_alignment_error(saved, cs)[1]
    assert errors["scaled"] < 0.03 and errors["rigid"] > 0.4, errors  # measured 0.018, 0.557


def test_resume_after_an_interrupt_is_bit_identical(cycles, tmp_path):
    _, paths = cycles
    out = tmp_path / "m.ome.zarr"
    command = ["fuse", *paths, "-o", out, "--chunk", "128", "-q", "--report", tmp_path / "m.json"]
    assert run_main(*command).returncode == 0
    whole = [_level(out, k) for k in (0, 1)]
    unfinish(out)  # killed before the metadata, after half the chunks
    written = sorted(p for p in (out / "0").rglob("*") if p.is_file())
    for chunk in written[::2]:
        chunk.unlink()
    for sidecar in tmp_path.glob("m.cycle*"):
        sidecar.unlink()
    other = run_main("fuse", paths[0], paths[2], paths[1], "-o", out, "--chunk", "128", "-q",
                     "--report", tmp_path / "m.json", "--resume")  # cycles 2 and 3 swapped
    assert other.returncode == 2, other.stderr
    assert "(channel_names, cycles differ)" in other.stderr.splitlines()[-1]
    assert run_main(*command, "--resume").returncode == 0
    for k, before in enumerate(whole):
        np.testing.assert_array_equal(_level(out, k), before)
    assert len(list(tmp_path.glob("m.cycle*"))) == 4
    # the manifest lists every cycle's layout files: --overwrite replaces them (and only them)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("m.cycle*")}
    assert run_main(*command, "--overwrite").returncode == 0
    assert all(p.stat().st_mtime_ns > t for p, t in before.items())


@pytest.fixture(scope="module")
def variants(cycles, tmp_path_factory) -> dict[str, Path]:
    """Cycle 2 as a time series, as uint8, at another pixel size; a 3D cycle."""
    cs, paths = cycles
    root = tmp_path_factory.mktemp("variants")
    volume = root / "volume" / "stack.tif"
    volume.parent.mkdir()
    tifffile.imwrite(volume, np.zeros((4, 32, 32), np.uint16), photometric="minisblack",
                     metadata={"axes": "ZYX"})
    stack = Layout((Tile("stack", (4, 32, 32), np.eye(4), FileSource((str(volume),))),),
                   np.uint16, ("DAPI",), pixel_size=(1.0, *PIXEL))
    lines = paths[1].read_text().splitlines()  # cycle 2 as two time points (a t column)
    head = next(n for n, line in enumerate(lines) if line.startswith("name,"))
    rows = [f"{t},{line}" for t in (0, 1) for line in lines[head + 1:]]
    series = paths[1].with_name("series.csv")
    series.write_text("\n".join([*lines[:head], "t," + lines[head], *rows]) + "\n")
    return {"time series": series,
            "dtype": write_cycle(cs.layouts[1], root / "u8", dtype=np.uint8),
            "pixel size": write_cycle(cs.layouts[1], root / "px", pixel_size=(0.52, 0.52)),
            "3D": write_csv_layout(stack, volume.parent / "layout.csv")}


@pytest.mark.parametrize(("case", "needle"), [
    ("time series", "is a time series; cycles are 2D acquisitions of one time point each"),
    ("dtype", "has dtype uint8, cycle 1 has uint16"),
    ("pixel size", "has pixel size 0.52 x 0.52 micrometer, cycle 1 has 0.5 x 0.5 micrometer"),
    ("3D", "is 3D (z-stacks); cycles are aligned and fused in 2D only"),
    ("names", "--channel-names gives 5 names for 6 output channels"),
    ("channel", "--align-channel GFP: cycle 1"),
    ("one input", "--align-channel is for several inputs"),
    ("one input, scale", "--align-scale is for several inputs"),
    ("foreign layout", "m.cycle3.layout.csv exists and was not written by a run into"),
])
def test_refusals_say_one_line_and_leave_nothing(cycles, variants, tmp_path, case, needle):
    _, paths = cycles
    foreign = tmp_path / "m.cycle3.layout.csv"  # someone's file where cycle 3's layout goes
    if case == "foreign layout":
        foreign.write_text("not tilefuse's\n")
    inputs = [paths[0], variants.get(case, paths[1]), paths[2]]
    extra = {"names": ["--channel-names", *"abcde"], "channel": ["--align-channel", "GFP"],
             "one input": ["--align-channel", "DAPI"],
             "one input, scale": ["--align-scale"]}.get(case, [])
    if case.startswith("one input"):
        inputs = [paths[0]]
    result = run_main("fuse", *inputs, "-o", tmp_path / "m.ome.zarr", *extra,
                      "--report", tmp_path / "m.json")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert needle in lines[0]
    if case in ("time series", "dtype", "pixel size", "3D"):
        assert "cycle 2 (" in lines[0] and str(inputs[1]) in lines[0]
    assert list(tmp_path.iterdir()) == ([foreign] if case == "foreign layout" else [])
    assert not foreign.exists() or foreign.read_text() == "not tilefuse's\n"


def test_the_picture_marks_tiles_placed_by_the_model(cycles):
    """Orange dashes for a model-placed tile, green for a tile refined by 0 px."""
    from dataclasses import replace

    from tilefuse.registration.cycles import reference_alignment
    from tilefuse.viz.cycles import cycle_picture
    from tilefuse.viz.preview import STAGE

    cs, _ = cycles
    one = replace(reference_alignment(cs.layouts[1]), cycle=2)
    marked = replace(one, tiles=(replace(one.tiles[0], placed_by_model=True,
                                         reason="empty"), *one.tiles[1:]))

    def count(alignment, colour) -> int:
        pixels = np.asarray(cycle_picture(cs.layouts[0], [alignment], max_size=400))
        return int(np.all(pixels == colour, axis=-1).sum())

    plain, model = count(one, STAGE), count(marked, STAGE)
    assert model > plain + 100, (plain, model)  # the legend's sample is in both
    assert count(one, (0, 255, 0)) > count(marked, (0, 255, 0)) > 100


def test_a_script_fuses_cycles_with_a_request_and_the_layouts_read_back_exactly(cycles, tmp_path):
    from tilefuse.pipeline import FuseRequest, run_fusion

    _, paths = cycles
    result = run_fusion(FuseRequest(paths[0], tmp_path / "m.ome.zarr", cycles=tuple(paths[1:]),
                                    channel_names=tuple("abcdef"), chunk=128))
    assert [a.cycle for a in result.cycles] == [1, 2, 3]
    assert result.mosaic.channel_names == tuple("abcdef") and result.mosaic.shape[0] == 6
    for alignment, layout in zip(result.cycles, _read_back(result.output), strict=True):
        np.testing.assert_array_equal(layout.affines, alignment.layout.affines)  # bit for bit
