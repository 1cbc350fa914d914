"""OME-Zarr tiles in: images placed by their NGFF scale + translation (0.4 on zarr v2, 0.5 on
zarr v3), read lazily at level 0, fused pixel-exact against a tile set's truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

import tilefuse
from conftest import run_main
from tilefuse.io.readers import looks_like_layout, read_layout
from tilefuse.io.readers.omezarr import ZarrSource
from tilefuse.testing import grid_tileset

PIXEL = (2.0, 0.25, 0.25)  # z y x, micrometre


def write_image(path: Path, data: np.ndarray, position, version: str, *,
                axes: str = "yx", levels: int = 2) -> None:
    """An OME-Zarr image written with zarr alone: `levels` levels (each 2x binned in y, x by
    striding), level-0 scale = PIXEL, translation = `position` (pixels) x PIXEL."""
    fmt = 2 if version == "0.4" else 3
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    spatial = [a for a in axes if a in "zyx"]
    size = dict(zip("zyx", PIXEL, strict=True))
    pos = dict(zip(spatial, position, strict=True))
    datasets = []
    for k in range(levels):
        step = tuple(2**k if a in "yx" else 1 for a in axes)
        level = data[tuple(slice(None, None, s) for s in step)]
        group.create_array(str(k), data=np.ascontiguousarray(level), chunks=level.shape)
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [size.get(a, 1.0) * s for a, s in zip(axes, step,
                                                                                strict=True)]},
            {"type": "translation", "translation": [pos.get(a, 0.0) * size.get(a, 1.0)
                                                    for a in axes]}]})
    kinds = {"t": "time", "c": "channel"}
    multiscale = {"axes": [{"name": a, "type": kinds.get(a, "space"),
                            **({"unit": "micrometer"} if a in "zyx" else {})} for a in axes],
                  "datasets": datasets}
    if version == "0.4":
        group.attrs.update({"multiscales": [{"version": "0.4", **multiscale}]})
    else:
        group.attrs.update({"ome": {"version": "0.5", "multiscales": [multiscale]}})


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("shape", [(40, 48), (4, 32, 40)])
def test_folder_of_images_fuses_pixel_exact(tmp_path, version, shape):
    ts = grid_tileset(grid=(2, 2), tile_shape=shape, overlap=0.2, position_error=3, seed=7)
    axes = "zyx"[-len(shape):]
    for i, (tile, pos) in enumerate(zip(ts.tiles, ts.layout.positions, strict=True)):
        write_image(tmp_path / f"tile{i}.ome.zarr", tile, pos + 100, version, axes=axes)
    layout = read_layout(tmp_path)
    assert [t.name for t in layout.tiles] == [f"tile{i}.ome.zarr" for i in range(4)]
    assert all(isinstance(t.source, ZarrSource) for t in layout.tiles)  # lazy: read by path
    np.testing.assert_allclose(layout.positions, ts.layout.positions + 100, atol=1e-12)
    assert tuple(layout.pixel_size) == PIXEL[-len(shape):]
    assert layout.pixel_size.source == "OME-Zarr metadata" and layout.unit == "micrometer"
    fused = np.asarray(tilefuse.fuse(layout, blend="first").data)
    np.testing.assert_array_equal(fused, ts.truth)


def test_list_file_channels_and_time(tmp_path):
    ts = grid_tileset(grid=(1, 2), tile_shape=(24, 32), overlap=0.25, seed=1)
    names = []
    for i, (tile, pos) in enumerate(zip(ts.tiles, ts.layout.positions, strict=True)):
        data = np.stack([np.stack([tile, tile + 7]), np.stack([tile + 1, tile + 8])])  # t c y x
        write_image(tmp_path / "imgs" / f"f{i}.zarr", data, pos, "0.5", axes="tcyx", levels=1)
        names.append(f"imgs/f{i}.zarr")
    listing = tmp_path / "tiles.txt"
    listing.write_text("# OME-Zarr tiles\n" + "\n".join(names) + "\n")
    assert looks_like_layout(listing)
    series = read_layout(listing)
    assert len(series) == 2 and len(series.channels) == 2
    np.testing.assert_array_equal(series.at_time(1).tiles[0].source.read(),
                                  np.stack([ts.tiles[0] + 1, ts.tiles[0] + 8]))
    out = tmp_path / "out.ome.zarr"
    assert run_main("fuse", listing, "-o", out, "-q").returncode == 0
    back = read_layout(tmp_path / "out.layout.csv")  # the saved layout reads the same pixels
    assert len(back) == 2 and back.channels == series.channels
    for t in range(2):
        for a, b in zip(back.at_time(t).tiles, series.at_time(t).tiles, strict=True):
            np.testing.assert_array_equal(a.source.read(), b.source.read())


def test_hcs_plate_fields_are_tiles(tmp_path):
    ts = grid_tileset(grid=(1, 2), tile_shape=(24, 32), overlap=0.25, seed=3)
    plate = zarr.open_group(str(tmp_path / "plate.zarr"), mode="w", zarr_format=2)
    plate.attrs["plate"] = {"version": "0.4", "wells": [{"path": "A/1"}],
                            "rows": [{"name": "A"}], "columns": [{"name": "1"}]}
    well = tmp_path / "plate.zarr" / "A" / "1"
    zarr.open_group(str(well), mode="w", zarr_format=2).attrs["well"] = {
        "images": [{"path": str(i)} for i in range(2)]}
    for i, (tile, pos) in enumerate(zip(ts.tiles, ts.layout.positions, strict=True)):
        write_image(well / str(i), tile, pos, "0.4")
    layout = read_layout(tmp_path / "plate.zarr")
    assert [t.name for t in layout.tiles] == ["A/1/0", "A/1/1"]
    fused = np.asarray(tilefuse.fuse(layout, blend="first").data)
    np.testing.assert_array_equal(fused, ts.truth)


def test_cli_fuses_a_folder_and_refuses_bad_metadata(tmp_path):
    ts = grid_tileset(grid=(1, 2), tile_shape=(24, 32), overlap=0.25, seed=5)
    for i, (tile, pos) in enumerate(zip(ts.tiles, ts.layout.positions, strict=True)):
        write_image(tmp_path / "in" / f"t{i}.zarr", tile, pos, "0.4")
    result = run_main("fuse", tmp_path / "in", "-o", tmp_path / "out.ome.zarr", "-q")
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.asarray(zarr.open_array(tmp_path / "out.ome.zarr" / "0")),
                                  ts.truth)
    read = read_layout(tmp_path / "in")
    for sidecar in ("out.layout.csv", "out.TileConfiguration.txt"):  # read back, same run
        back = read_layout(tmp_path / sidecar)
        np.testing.assert_array_equal(back.affines, read.affines)
        assert back.pixel_size == read.pixel_size and back.unit == read.unit
        for a, b in zip(back.tiles, read.tiles, strict=True):
            np.testing.assert_array_equal(a.source.read(), b.source.read())
    attrs = tmp_path / "in" / "t1.zarr" / ".zattrs"
    doc = json.loads(attrs.read_text())
    doc["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] = [1.0]
    attrs.write_text(json.dumps(doc))
    bad = run_main("info", tmp_path / "in")
    assert bad.returncode == 2 and "t1.zarr: scale [1.0] does not give one value per axis" \
        in bad.stderr
