"""One pipeline: the library, the command line and the napari widget write the same image.

``tilefuse.write_ome_zarr(tilefuse.fuse(tilefuse.read_layout(PATH)), ...)`` writes the channel
names, scale, translation and unit that ``tilefuse fuse PATH`` writes, because the metadata
travels with the Mosaic; :func:`tilefuse.pipeline.run_fusion` is ``tilefuse fuse`` itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

import tilefuse
from conftest import DATA, run_main
from tilefuse.errors import InputError
from tilefuse.fusion.graph import FusionPlan
from tilefuse.ome_zarr.writer import read_ome_zarr_level
from tilefuse.pipeline import FuseRequest, run_fusion
from tilefuse.testing import grid_tileset, write_tileset

LEICA = DATA / "leica_confocal_2tiles/experiment--test/slide--S00/chamber--U00--V00"
LEICA_PATTERN = ("field--X{col}--Y{row}/image--L00--S00--U00--V00--J20--E00--O00--X{col}--Y{row}"
                 "--T00--Z00--C{channel}.ome.tif")
README = Path(__file__).parents[1] / "README.md"

def _ome(path: Path) -> dict:
    attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    return attrs.get("ome", attrs)


def _calibrated_set(folder: Path) -> Path:
    """Two-channel 2x2 tiles, 0.4 um pixels in their ImageJ metadata, the mosaic's first pixel
    at x = 100, y = 50 of the layout."""
    ts = grid_tileset(grid=(2, 2), tile_shape=(40, 48), overlap=0.25, fractional=True, seed=8)
    folder.mkdir()
    lines = ["dim = 2"]
    for i, (tile, data) in enumerate(zip(ts.layout.tiles, ts.tiles, strict=True)):
        tifffile.imwrite(folder / f"t{i}.tif", np.stack([data, data // 3]), imagej=True,
                         resolution=(1 / 0.4, 1 / 0.4), metadata={"axes": "CYX", "unit": "um"})
        y, x = tile.position
        lines.append(f"t{i}.tif; ; ({x + 100}, {y + 50})")
    (folder / "tc.txt").write_text("\n".join(lines) + "\n")
    return folder / "tc.txt"


@pytest.mark.parametrize("case", ["leica", "calibrated"])
def test_the_library_writes_what_the_command_line_writes(tmp_path, case):
    if case == "leica":
        path, options = LEICA, {"pattern": LEICA_PATTERN, "overlap": 0.1}
        cli = ["--pattern", LEICA_PATTERN, "--overlap", "0.1"]
    else:
        path, options, cli = _calibrated_set(tmp_path / "tiles"), {}, []
    mosaic = tilefuse.fuse(tilefuse.read_layout(path, **options))
    ours = tilefuse.write_ome_zarr(mosaic, tmp_path / "x.ome.zarr")
    result = run_main("fuse", path, *cli, "-o", tmp_path / "y.ome.zarr", "-q")
    assert result.returncode == 0, result.stderr
    theirs = tmp_path / "y.ome.zarr"

    a, b = _ome(ours)["multiscales"][0], _ome(theirs)["multiscales"][0]
    assert a["axes"] == b["axes"]
    assert [ax["unit"] for ax in a["axes"] if ax["type"] == "space"] == ["micrometer"] * 2
    n = min(len(a["datasets"]), len(b["datasets"]))  # the CLI's chunk follows its memory budget
    assert a["datasets"][:n] == b["datasets"][:n]
    channels = [(c["label"], c["color"]) for c in _ome(ours)["omero"]["channels"]]
    assert channels == [(c["label"], c["color"]) for c in _ome(theirs)["omero"]["channels"]]
    for k in range(n):
        np.testing.assert_array_equal(read_ome_zarr_level(ours, k).compute(),
                                      read_ome_zarr_level(theirs, k).compute())
    scale, translation = (t[next(iter(set(t) - {"type"}))]
                          for t in a["datasets"][0]["coordinateTransformations"])
    if case == "leica":
        assert [label for label, _ in channels] == ["00", "01"]
        np.testing.assert_allclose(scale, [1.0, 0.24050019550342, 0.24050019550342])
        assert translation == [0.0, 0.0, 0.0]
    else:
        assert [label for label, _ in channels] == ["0", "1"]
        np.testing.assert_allclose(scale, [1.0, 0.4, 0.4])
        np.testing.assert_allclose(translation, [0.0, 50 * 0.4, 100 * 0.4])


def test_run_fusion_is_the_command_line_run(tmp_path):
    """Registration with its report and summary, progress stages, timings, the sidecars."""
    ts = grid_tileset(grid=(2, 2), tile_shape=(80, 80), overlap=0.25, position_error=4, seed=2)
    path = write_tileset(ts, tmp_path / "tiles", stage=True)
    seen: list[tuple[int, int, str]] = []
    said: list[str] = []
    request = FuseRequest(path, tmp_path / "m.ome.zarr", register=True, chunk=32,
                          report=tmp_path / "reg.json", scheduler="sync")
    result = run_fusion(request, progress=lambda *a: seen.append(a), message=said.append)

    assert result.output == tmp_path / "m.ome.zarr" and not result.complete
    assert result.sidecars == (tmp_path / "m.layout.csv", tmp_path / "m.TileConfiguration.txt")
    saved = tilefuse.read_layout(result.sidecars[1])
    np.testing.assert_allclose(saved.positions, result.layout.positions)
    assert isinstance(result.plan, FusionPlan) and isinstance(result.mosaic, tilefuse.Mosaic)
    assert set(result.timings) == {"read", "register", "correct", "plan", "write", "sidecars",
                                   "total"}
    assert [label for _, total, label in seen if total == 0] == [
        "reading layout", "registering", "solving", "planning", "saving layout"]
    pairs = [s for s in seen if s[2] == "registering pairs"]  # registration's own progress
    assert pairs and pairs[-1][0] == pairs[-1][1] > 0
    done, total, _ = [s for s in seen if s[2] == "fusing"][-1]
    assert done == total > 0
    assert said[0] == f"report written to {tmp_path / 'reg.json'} and {tmp_path / 'reg.png'}"
    assert said[1:] == result.reports[0].summary_lines()
    assert (tmp_path / "reg.json").exists() and (tmp_path / "reg.png").exists()

    again = run_fusion(FuseRequest(path, tmp_path / "m.ome.zarr", register=True, resume=True,
                                   scheduler="sync"))
    assert again.complete and again.sidecars == ()


def test_run_fusion_refuses_before_reading_a_pixel(tmp_path):
    from tilefuse.io.tile_cache import cache_stats, clear_cache

    ts = grid_tileset(grid=(1, 2), tile_shape=(32, 32), overlap=0.25, seed=1)
    path = write_tileset(ts, tmp_path / "tiles", stage=False)
    clear_cache()
    for output, error, match in [
        (tmp_path / "tiles", InputError, "holds this run's input"),
        (tmp_path / "m.tif", InputError, "name it NAME.ome.zarr"),
        ("s3://bucket/m.ome.zarr", InputError, "remote URLs"),
    ]:
        with pytest.raises(error, match=re.escape(match)):
            run_fusion(FuseRequest(path, output))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match="tilefuse did not make"):
        run_fusion(FuseRequest(path, tmp_path / "notes", overwrite=True))
    with pytest.raises(InputError, match="fill value 70000 does not fit the output dtype"):
        run_fusion(FuseRequest(path, tmp_path / "a.ome.zarr", fill=70000))
    assert cache_stats()["decodes"] == 0
    assert not (tmp_path / "a.ome.zarr").exists()


def test_the_readmes_python_example_runs(tmp_path, monkeypatch):
    """README.md's Python block, run as written in a folder with tiles/ and run/."""
    block = re.search(r"Python:\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    ts = grid_tileset(grid=(2, 2), tile_shape=(80, 80), overlap=0.25, position_error=4, seed=5)
    write_tileset(ts, tmp_path / "tiles", stage=True)
    (tmp_path / "run").mkdir()
    for t in range(2):
        step = grid_tileset(grid=(2, 2), tile_shape=(40, 40), overlap=0.1, seed=10 + t)
        for i, data in enumerate(step.tiles):
            r, c = divmod(i, 2)
            tifffile.imwrite(tmp_path / "run" / f"img_t{t}_r{r}_c{c}.tif", data)
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README.md", "exec"), {})
    assert [a["name"] for a in _ome(tmp_path / "series.ome.zarr")["multiscales"][0]["axes"]] == [
        "t", "y", "x"]
    mosaic = _ome(tmp_path / "mosaic.ome.zarr")
    assert [c["label"] for c in mosaic["omero"]["channels"]] == ["0"]  # the layout's, not
    assert (tmp_path / "fused.layout.csv").exists()                    # "Channel 0"
    fused = _ome(tmp_path / "fused.ome.zarr")["multiscales"][0]["datasets"][0]
    assert fused["coordinateTransformations"][0]["scale"] == [0.65, 0.65]
