"""BigStitcher dataset.xml in and out: real files (tests/data/bigstitcher_xml, see SOURCE.txt)
and a file-map TIFF dataset made from a tile set with exact truth."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tifffile

import tilefuse
from conftest import DATA, run_main
from test_omezarr_tiles import write_image
from tilefuse._layouts import save_layout
from tilefuse.bdv import REGISTRATION_NAME, prepend_transforms, read_spimdata
from tilefuse.bdv.spimdata import from_tilefuse, read_tree, to_tilefuse
from tilefuse.errors import InputError
from tilefuse.io.readers import looks_like_layout, read_layout
from tilefuse.model.timeseries import TimeSeries
from tilefuse.testing import grid_tileset

REAL = DATA / "bigstitcher_xml"
pbs = pytest.importorskip("pydantic_bigstitcher")

VOXEL = (0.5, 0.5, 2.0)  # x y z, µm: calibration scales z by 4


def _affine_text(m: np.ndarray) -> str:
    return " ".join(repr(float(v)) for v in m[:3].ravel())


def write_dataset(folder: Path, tiles: list, positions: np.ndarray, *, channels: int = 1,
                  times: int = 1, loader: str = "filemap") -> Path:
    """A BigStitcher dataset: one image per tile, channel and time point (channel k = tile +
    1000 k, time point t = tile + 100 t), placed at `positions` (zyx or yx, pixels) by a
    translation and the calibration, as BigStitcher writes them. `loader` "filemap": TIFF files
    (spimreconstruction.filemap2); "zarr": 5D (t c z y x) NGFF 0.4 images in a container, one
    per view, as BigStitcher-Spark / AIND write them (bdv.multimg.zarr)."""
    folder.mkdir(parents=True, exist_ok=True)
    maps, setups, regs = [], [], []
    ratio = [1.0, VOXEL[1] / VOXEL[0], VOXEL[2] / VOXEL[0]]
    calib = np.diag([*ratio, 1.0])
    for i, (data, pos) in enumerate(zip(tiles, positions, strict=True)):
        size = [*reversed(data.shape)] + [1] * (3 - data.ndim)
        xyz = [*reversed([float(p) for p in pos])] + [0.0] * (3 - len(pos))
        move = np.eye(4)
        move[:3, 3] = np.asarray(ratio) * xyz
        for c in range(channels):
            sid = i * channels + c
            setups.append(
                f"<ViewSetup><id>{sid}</id><name>s{sid}</name><size>{' '.join(map(str, size))}"
                f"</size><voxelSize><unit>µm</unit><size>{' '.join(map(str, VOXEL))}</size>"
                f"</voxelSize><attributes><illumination>0</illumination><channel>{c}</channel>"
                f"<tile>{i}</tile><angle>0</angle></attributes></ViewSetup>")
            for t in range(times):
                pixels = data + np.asarray(1000 * c + 100 * t, data.dtype)
                if loader == "zarr":
                    name = f"tile{i}_c{c}_t{t}.zarr"
                    five = pixels[(None,) * (5 - data.ndim)]  # t c z y x
                    write_image(folder / "SPIM.ome.zarr" / name, five, (0, 0, 0), "0.4",
                                axes="tczyx", levels=1)
                    maps.append(f'<zgroup setup="{sid}" timepoint="{t}"><path>{name}</path>'
                                "</zgroup>")
                    continue
                name = f"tile{i}_c{c}_t{t}.tif"
                tifffile.imwrite(folder / name, pixels)
                maps.append(f'<FileMapping view_setup="{sid}" timepoint="{t}" series="0" '
                            f'channel="0"><file type="relative">{name}</file></FileMapping>')
            for t in range(times):
                regs.append(
                    f'<ViewRegistration timepoint="{t}" setup="{sid}">'
                    f'<ViewTransform type="affine"><Name>Translation to Regular Grid</Name>'
                    f"<affine>{_affine_text(move)}</affine></ViewTransform>"
                    f'<ViewTransform type="affine"><Name>calibration</Name>'
                    f"<affine>{_affine_text(calib)}</affine></ViewTransform>"
                    "</ViewRegistration>")
    names = "".join(f"<Channel><id>{c}</id><name>ch{c}</name></Channel>" for c in range(channels))
    tile_names = "".join(f"<Tile><id>{i}</id><name>{i}</name></Tile>" for i in range(len(tiles)))
    text = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<!-- made by tilefuse tests -->\n'
        '<SpimData version="0.2"><BasePath type="relative">.</BasePath><SequenceDescription>'
        + (_ZARR_LOADER if loader == "zarr" else _FILEMAP_LOADER).format("".join(maps))
        + "<ViewSetups>" + "".join(setups)
        + '<Attributes name="illumination"><Illumination><id>0</id><name>0</name></Illumination>'
        f'</Attributes><Attributes name="channel">{names}</Attributes>'
        f'<Attributes name="tile">{tile_names}</Attributes><Attributes name="angle"><Angle>'
        "<id>0</id><name>0</name></Angle></Attributes></ViewSetups>"
        f'<Timepoints type="pattern"><integerpattern>0-{times - 1}</integerpattern></Timepoints>'
        "<MissingViews /></SequenceDescription><ViewRegistrations>" + "".join(regs)
        + "</ViewRegistrations><ViewInterestPoints /><BoundingBoxes /><PointSpreadFunctions />"
        "<StitchingResults /><IntensityAdjustments /><tilefuseUnknown keep='me'/></SpimData>")
    path = folder / "dataset.xml"
    path.write_text(text, encoding="utf-8")
    return path


_FILEMAP_LOADER = ('<ImageLoader format="spimreconstruction.filemap2"><imglib2container>'
                   "ArrayImgFactory</imglib2container><ZGrouped>false</ZGrouped><files>{}"
                   "</files></ImageLoader>")
_ZARR_LOADER = ('<ImageLoader format="bdv.multimg.zarr" version="1.0"><zarr type="relative">'
                "SPIM.ome.zarr</zarr><zgroups>{}</zgroups></ImageLoader>")


def _without(root: ET.Element, name: str) -> ET.Element:
    """A copy of `root` without the ViewTransforms named `name`."""
    root = ET.fromstring(ET.tostring(root))
    for reg in root.iter("ViewRegistration"):
        for t in list(reg):
            if t.findtext("Name") == name:
                reg.remove(t)
    return root


def _same_tree(a: ET.Element, b: ET.Element) -> bool:
    """Tag, attributes, stripped text and children equal, recursively (comments included)."""
    return (a.tag == b.tag and a.attrib == b.attrib
            and (a.text or "").strip() == (b.text or "").strip() and len(a) == len(b)
            and all(_same_tree(x, y) for x, y in zip(a, b, strict=True)))


# ------------------------------------------------------------------------------ exact truth


@pytest.mark.parametrize("loader", ["filemap", "zarr"])
@pytest.mark.parametrize("shape", [(40, 56), (5, 32, 40)])
def test_dataset_fuses_pixel_exact(tmp_path, shape, loader):
    ts = grid_tileset(grid=(2, 2), tile_shape=shape, overlap=0.2, position_error=3, seed=4)
    xml = write_dataset(tmp_path, ts.tiles, ts.layout.positions, loader=loader)
    layout = read_layout(xml)
    assert looks_like_layout(xml)
    assert layout.ndim == len(shape)
    np.testing.assert_allclose(layout.affines, ts.layout.affines, atol=1e-12)
    assert tuple(layout.pixel_size) == tuple(reversed(VOXEL))[-len(shape):]
    assert layout.pixel_size.source == "BigStitcher XML" and layout.unit == "micrometer"
    fused = np.asarray(tilefuse.fuse(layout, blend="first").data)
    np.testing.assert_array_equal(fused, ts.truth)


@pytest.mark.parametrize("loader", ["filemap", "zarr"])
def test_channels_and_time_points(tmp_path, loader):
    ts = grid_tileset(grid=(1, 2), tile_shape=(32, 40), overlap=0.25, seed=2)
    xml = write_dataset(tmp_path, ts.tiles, ts.layout.positions, channels=2, times=2,
                        loader=loader)
    series = read_layout(xml)
    assert isinstance(series, TimeSeries) and series.shared and series.names == ("0", "1")
    assert series.channels == ("ch0", "ch1") and len(series.at_time(0).tiles) == 2
    tile = series.at_time(1).tiles[1]
    data = tile.source.read()
    np.testing.assert_array_equal(data[0], ts.tiles[1] + 100)
    np.testing.assert_array_equal(data[1], ts.tiles[1] + 1100)
    assert run_main("fuse", xml, "-o", tmp_path / "f.ome.zarr", "-q").returncode == 0
    saved = read_layout(tmp_path / "f.layout.csv")  # the layout saved beside reads the same
    for t in range(2):
        np.testing.assert_array_equal(saved.at_time(t).affines, series.at_time(t).affines)
        for a, b in zip(saved.at_time(t).tiles, series.at_time(t).tiles, strict=True):
            np.testing.assert_array_equal(a.source.read(), b.source.read())


def test_register_writes_back_a_prepended_transform(tmp_path):
    ts = grid_tileset(grid=(2, 2), tile_shape=(64, 64), overlap=0.25, position_error=4, seed=1)
    xml = write_dataset(tmp_path, ts.tiles, ts.stage.positions)
    out = tmp_path / "dataset.registered.xml"
    result = run_main("register", xml, "-o", out, "-q")
    assert result.returncode == 0, result.stderr
    registered = tilefuse.register(read_layout(xml))[0]
    back = read_layout(out)
    np.testing.assert_allclose(back.affines, registered.affines, atol=1e-9)
    np.testing.assert_allclose(back.positions - back.positions[0],
                               ts.layout.positions - ts.layout.positions[0], atol=0.5)
    prolog, root = read_tree(out)
    assert prolog == read_tree(xml)[0]  # XML declaration and the comment before the root
    regs = root.findall("ViewRegistrations/ViewRegistration")
    assert all(reg[0].findtext("Name") == REGISTRATION_NAME and len(reg) == 3 for reg in regs)
    assert _same_tree(_without(root, REGISTRATION_NAME), read_tree(xml)[1])
    typed = pbs.ViewRegistrations.from_xml(ET.tostring(root.find("ViewRegistrations")))
    assert [len(r.view_transforms) for r in typed.elements] == [3] * 4
    again = run_main("register", xml, "-o", out, "-q")  # never replaced without --overwrite
    assert again.returncode == 2 and "exists" in again.stderr
    over = run_main("register", xml, "-o", xml, "--overwrite", "-q")
    assert over.returncode == 2 and "input" in over.stderr


# ------------------------------------------------------------------------------ real files


@pytest.mark.parametrize("name", ["bigstitcher_0.xml", "bigstitcher_1.xml", "bigstitcher_2.xml",
                                  "bigstitcher_6.xml"])
def test_real_files_round_trip(tmp_path, name):
    source = REAL / name
    data = read_spimdata(source)
    rng = np.random.default_rng(0)
    moves = {}
    for view, m in data.views.items():
        scale = np.linalg.norm(m[:3, :3], axis=0)
        tf = to_tilefuse(m, scale)  # tilefuse's affine of the view, and back
        np.testing.assert_allclose(from_tilefuse(tf, scale), m, atol=1e-9 * np.abs(m).max())
        move = np.eye(4)
        move[:3, 3] = rng.uniform(-20, 20, 3)
        moves[view] = move
    out = prepend_transforms(source, tmp_path / "out.xml", moves, REGISTRATION_NAME)
    back = read_spimdata(out)
    for view, m in data.views.items():
        np.testing.assert_allclose(back.views[view], moves[view] @ m, atol=1e-9)
    prolog, root = read_tree(out)
    original_prolog, original = read_tree(source)
    assert prolog == original_prolog
    assert _same_tree(_without(root, REGISTRATION_NAME), original)
    typed = pbs.SpimData2.from_xml(out.read_bytes())  # the whole file, by the typed model
    assert all(r.view_transforms[0].name == REGISTRATION_NAME
               for r in typed.view_registrations.elements)
    if name == "bigstitcher_6.xml":
        assert "shared by Nikita Vladimirov" in out.read_text(encoding="utf-8")
        assert root.find("generatedBy") is not None


@pytest.mark.parametrize("name, message", [
    ("bigstitcher_0.xml", "image loader 'bdv.n5' is not read"),
    ("bigstitcher_6.xml", "2 illuminations (0, 1)"),
    ("bigstitcher_3.xml", "setup 13: affine '' is not 12 finite numbers"),
])
def test_real_files_refused_in_one_line(name, message):
    result = run_main("info", REAL / name)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_real_zarr_file_names_missing_image():
    with pytest.raises(FileNotFoundError, match="OME-Zarr image not found"):
        read_layout(REAL / "bigstitcher_2.xml")


def test_write_back_refuses_other_layouts(tmp_path):
    layout = grid_tileset(grid=(1, 2), tile_shape=(16, 16)).layout
    with pytest.raises(InputError, match="only for a layout read from one"):
        save_layout(layout, tmp_path / "x.xml")


# ------------------------------------------------------------------------------ fuse --bdv


def test_fuse_bdv_writes_a_dataset_xml_for_the_image(tmp_path):
    import zarr

    ts = grid_tileset(grid=(2, 2), tile_shape=(5, 32, 40), overlap=0.2, position_error=2, seed=3)
    xml = write_dataset(tmp_path / "in", ts.tiles, ts.layout.positions, channels=2)
    out = tmp_path / "fused.ome.zarr"
    (tmp_path / "fused.xml").write_text("not ours")
    refused = run_main("fuse", xml, "-o", out, "--bdv", "-q")
    assert refused.returncode == 2 and "was not written by a run" in refused.stderr
    assert not out.exists()
    (tmp_path / "fused.xml").unlink()
    assert run_main("fuse", xml, "-o", out, "--bdv", "-q").returncode == 0
    bdv = tmp_path / "fused.xml"
    typed = pbs.SpimData2.from_xml(bdv.read_bytes())
    loader = typed.sequence_description.image_loader
    assert loader.fmt == "bdv.multimg.zarr"
    assert {(tmp_path / loader.zarr.path / z.path).resolve() for z in loader.zgroups.elements} \
        == {out.resolve()}
    size = " ".join(map(str, reversed(zarr.open_array(out / "0").shape[1:])))  # c z y x
    assert [s.size for s in typed.sequence_description.view_setups.elements] == [size] * 2
    back = read_layout(bdv)  # tilefuse reads it too: one tile, the fused image, in place
    level0 = np.asarray(zarr.open_array(out / "0"))
    assert len(back.tiles) == 1 and back.channels == ("ch0", "ch1")
    np.testing.assert_array_equal(back.tiles[0].source.read(), level0)
    assert tuple(back.pixel_size) == tuple(reversed(VOXEL))
    np.testing.assert_allclose(back.positions[0], tilefuse.fuse(read_layout(xml)).origin,
                               atol=1e-9)
    again = run_main("fuse", xml, "-o", out, "--bdv", "--overwrite", "-q")
    assert again.returncode == 0, again.stderr  # ours: replaced


def test_time_series_registration_written_back(tmp_path):
    ts = grid_tileset(grid=(2, 2), tile_shape=(64, 64), overlap=0.25, position_error=4, seed=1)
    xml = write_dataset(tmp_path, ts.tiles, ts.stage.positions, channels=2, times=2)
    result = run_main("register", xml, "-q")
    assert result.returncode == 0, result.stderr
    back = read_layout(tmp_path / "dataset.registered.xml")  # the default name
    assert isinstance(back, TimeSeries) and back.shared and back.channels == ("ch0", "ch1")
    truth = ts.layout.positions - ts.layout.positions[0]
    for layout in back.layouts:
        np.testing.assert_allclose(layout.positions - layout.positions[0], truth, atol=0.5)
    regs = read_tree(tmp_path / "dataset.registered.xml")[1].iter("ViewRegistration")
    assert sorted(reg[0].findtext("Name") for reg in regs) == [REGISTRATION_NAME] * 16


def test_bdv_ome_zarr_loader_reads_channels_of_one_image(tmp_path):
    ts = grid_tileset(grid=(1, 1), tile_shape=(24, 32), seed=6)
    image = np.stack([ts.tiles[0], ts.tiles[0] // 2])  # c y x
    write_image(tmp_path / "img.ome.zarr", image, (0, 0), "0.5", axes="cyx", levels=1)
    setups = "".join(
        f"<ViewSetup><id>{c}</id><name>{c}</name><size>32 24 1</size><voxelSize><unit>nm</unit>"
        f"<size>80 80 80</size></voxelSize><attributes><illumination>0</illumination><channel>"
        f"{c}</channel><tile>0</tile><angle>0</angle></attributes></ViewSetup>" for c in (0, 1))
    regs = "".join(f'<ViewRegistration timepoint="0" setup="{c}"><ViewTransform type="affine">'
                   "<Name>shift</Name><affine>1 0 0 5 0 1 0 7 0 0 1 0</affine></ViewTransform>"
                   "</ViewRegistration>" for c in (0, 1))
    xml = tmp_path / "mobie.xml"
    xml.write_text('<SpimData version="0.2"><BasePath type="relative">.</BasePath>'
                   '<SequenceDescription><ImageLoader format="bdv.ome.zarr"><ome.zarr '
                   'type="relative">img.ome.zarr</ome.zarr></ImageLoader><ViewSetups>'
                   f"{setups}</ViewSetups></SequenceDescription><ViewRegistrations>{regs}"
                   "</ViewRegistrations></SpimData>")
    layout = read_layout(xml)
    assert len(layout.tiles) == 1 and len(layout.channels) == 2 and layout.unit == "nanometer"
    np.testing.assert_array_equal(layout.tiles[0].source.read(), image)
    np.testing.assert_array_equal(layout.positions[0], [7, 5])


def test_bad_projects_refused_in_one_line(tmp_path):
    ts = grid_tileset(grid=(1, 2), tile_shape=(32, 40), overlap=0.25, seed=2)
    xml = write_dataset(tmp_path, ts.tiles, ts.layout.positions)
    text = xml.read_text(encoding="utf-8")
    (tmp_path / "wrong_size.xml").write_text(text.replace("<size>40 32 1</size>",
                                                          "<size>40 30 1</size>", 1))
    result = run_main("info", tmp_path / "wrong_size.xml")
    assert result.returncode == 2 and "image is 1 x 32 x 40 (z y x)" in result.stderr
    assert "gives setup 0 size 1 x 30 x 40" in result.stderr
    (tmp_path / "not_spim.xml").write_text("<Other/>")
    result = run_main("info", tmp_path / "not_spim.xml")
    assert result.returncode == 2 and "root element <Other>, expected <SpimData>" in result.stderr
    result = run_main("fuse", xml, "-o", tmp_path / "m.ome.tif", "--bdv", "-q")
    assert result.returncode == 2 and "--bdv writes a dataset.xml for an OME-Zarr" in result.stderr
    assert not (tmp_path / "m.ome.tif").exists()
