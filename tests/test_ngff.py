"""Tests for tilefuse.ome_zarr.writer: OME-Zarr writing, pyramid values, metadata, failures."""

from __future__ import annotations

import logging
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from dask.callbacks import Callback
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr_models import v04, v05

from tilefuse.errors import InputError
from tilefuse.model.mosaic import Mosaic
from tilefuse.ome_zarr import _pyramid
from tilefuse.ome_zarr.writer import pyramid_shapes, read_ome_zarr_level, write_ome_zarr

SYNC = {"scheduler": "synchronous"}


def write(array, path, *, axes, compute_kwargs=None, ngff_version="0.5", levels=None,
          overwrite=False, **metadata):
    """:func:`write_ome_zarr` of ``Mosaic(array, axes, **metadata)`` (pixel_size, unit,
    channel_names, channel_colors, origin), under ``dask.config.set(**compute_kwargs)``."""
    with dask.config.set(**(compute_kwargs or {})):
        return write_ome_zarr(Mosaic(da.asarray(array), tuple(axes), **metadata), path,
                              ngff_version=ngff_version, levels=levels, overwrite=overwrite)


# --------------------------------------------------------------------------------------------
# Helpers: an independent numpy reference and metadata access
# --------------------------------------------------------------------------------------------


def reference_mean_2x(a: np.ndarray) -> np.ndarray:
    """2x mean of the last two axes by NaN padding + nanmean (independent of the module)."""
    h, w = a.shape[-2:]
    padded = np.full((*a.shape[:-2], h + h % 2, w + w % 2), np.nan)
    padded[..., :h, :w] = a
    blocks = padded.reshape(*a.shape[:-2], (h + 1) // 2, 2, (w + 1) // 2, 2)
    mean = np.nanmean(blocks, axis=(-3, -1))
    if a.dtype.kind in "biu":
        mean = np.rint(mean)
    return mean.astype(a.dtype)


def reference_pyramid(a: np.ndarray, n: int) -> list[np.ndarray]:
    out = [a]
    for _ in range(n - 1):
        out.append(reference_mean_2x(out[-1]))
    return out


def ome_attrs(path) -> dict:
    """The OME metadata dict for either NGFF version (empty when absent)."""
    attrs = zarr.open_group(path, mode="r").attrs.asdict()
    return attrs.get("ome", attrs)


def multiscale(path) -> dict:
    return ome_attrs(path)["multiscales"][0]


def scales(path) -> list[list[float]]:
    return [d["coordinateTransformations"][0]["scale"] for d in multiscale(path)["datasets"]]


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(42).integers(0, 65535, (300, 250), dtype=np.uint16)


# --------------------------------------------------------------------------------------------
# Round trip, validation, readers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "model", "zarr_format"), [("0.5", v05.Image, 3), ("0.4", v04.Image, 2)]
)
def test_roundtrip_validates_and_reads_back(tmp_path, image, version, model, zarr_format):
    path = tmp_path / "mosaic.ome.zarr"
    out = write(
        da.from_array(image, chunks=64),
        path,
        axes=("y", "x"),
        ngff_version=version,
        compute_kwargs=SYNC,
    )
    assert out == path

    group = zarr.open_group(path, mode="r")
    assert group.metadata.zarr_format == zarr_format
    model.from_zarr(group)  # raises on invalid OME-Zarr metadata or layout

    nodes = list(Reader(parse_url(str(path)))())
    levels = [np.asarray(d) for d in nodes[0].data]
    expected = reference_pyramid(image, 4)
    assert [lv.shape for lv in levels] == [(300, 250), (150, 125), (75, 63), (38, 32)]
    np.testing.assert_array_equal(levels[0], image)
    for got, want in zip(levels, expected, strict=True):
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, want)


def test_v04_layout_and_codecs(tmp_path, image):
    path = tmp_path / "v4.zarr"
    write(da.from_array(image, chunks=64), path, axes="yx", ngff_version="0.4")
    arr = zarr.open_group(path, mode="r")["0"]
    assert arr.metadata.dimension_separator == "/"
    (codec,) = arr.compressors
    assert codec.codec_id == "blosc" and codec.cname == "zstd"
    assert ome_attrs(path)["multiscales"][0]["version"] == "0.4"


def test_v05_layout_and_codecs(tmp_path, image):
    path = tmp_path / "v5.zarr"
    write(da.from_array(image, chunks=64), path, axes="yx")
    group = zarr.open_group(path, mode="r")
    assert group.attrs["ome"]["version"] == "0.5"
    arr = group["0"]
    assert arr.metadata.dimension_names == ("y", "x")
    assert any(type(c).__name__ == "ZstdCodec" for c in arr.metadata.codecs)


def test_read_ome_zarr_level(tmp_path, image):
    path = tmp_path / "r.zarr"
    write(da.from_array(image, chunks=64), path, axes="yx", levels=3)
    np.testing.assert_array_equal(read_ome_zarr_level(path, 0).compute(), image)
    assert read_ome_zarr_level(path, -1).shape == (75, 63)
    with pytest.raises(InputError, match="level 3"):
        read_ome_zarr_level(path, 3)


# --------------------------------------------------------------------------------------------
# Pyramid values
# --------------------------------------------------------------------------------------------

KNOWN = np.array(
    [
        [0, 1, 2, 2, 9],
        [3, 5, 3, 4, 8],
        [10, 20, 1, 2, 7],
    ]
)


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_integer_mean_odd_edges_round_half_even(tmp_path, version):
    path = tmp_path / "k.zarr"
    a = da.from_array(KNOWN.astype(np.uint8), chunks=2)
    write(a, path, axes="yx", levels=3, ngff_version=version, compute_kwargs=SYNC)
    # 2x2 means 2.25 -> 2, 2.75 -> 3; right column (9+8)/2 = 8.5 -> 8 (half to even);
    # bottom row (10+20)/2 = 15, (1+2)/2 = 1.5 -> 2 (half to even, not truncated to 1); corner 7.
    level1 = read_ome_zarr_level(path, 1).compute()
    np.testing.assert_array_equal(level1, [[2, 3, 8], [15, 2, 7]])
    assert level1.dtype == np.uint8
    # From level 1 as stored: (2+3+15+2)/4 = 5.5 -> 6; (8+7)/2 = 7.5 -> 8.
    np.testing.assert_array_equal(read_ome_zarr_level(path, 2).compute(), [[6, 8]])


def test_float_stays_float(tmp_path):
    path = tmp_path / "f.zarr"
    a = da.from_array(KNOWN.astype(np.float32), chunks=2)
    write(a, path, axes="yx", levels=2, compute_kwargs=SYNC)
    level1 = read_ome_zarr_level(path, 1).compute()
    assert level1.dtype == np.float32
    np.testing.assert_array_equal(level1, np.float32([[2.25, 2.75, 8.5], [15, 1.5, 7]]))


def test_signed_integers_round_half_even(tmp_path):
    path = tmp_path / "s.zarr"
    a = np.array([[-1, -2, 5], [0, 0, 0]], dtype=np.int16)  # -0.75 -> -1; (5+0)/2 = 2.5 -> 2
    write(da.from_array(a), path, axes="yx", levels=2, compute_kwargs=SYNC)
    np.testing.assert_array_equal(read_ome_zarr_level(path, 1).compute(), [[-1, 2]])


def _arrays(dtype) -> st.SearchStrategy[np.ndarray]:
    shape = hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=9)
    if np.dtype(dtype).kind == "f":
        width = np.dtype(dtype).itemsize * 8
        return hnp.arrays(dtype, shape, elements=st.floats(-1e6, 1e6, width=width))
    return hnp.arrays(dtype, shape)  # the full integer range


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64])
       .flatmap(_arrays))
def test_mean_block_matches_reference(a):
    got = _pyramid.mean_2x_yx(a, a.ndim - 2, a.ndim - 1)
    want = reference_mean_2x(a)
    assert got.dtype == a.dtype
    np.testing.assert_allclose(got, want, rtol=1e-6)
    if a.dtype.kind in "iu":
        np.testing.assert_array_equal(got, want)


def test_pyramid_across_chunk_boundaries_matches_reference(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 255, (2, 77, 53), dtype=np.uint8)
    path = tmp_path / "zyx.zarr"
    write(da.from_array(a, chunks=(1, 10, 12)), path, axes="zyx", compute_kwargs=SYNC)
    n = len(multiscale(path)["datasets"])
    for k, want in enumerate(reference_pyramid(a, n)):
        np.testing.assert_array_equal(read_ome_zarr_level(path, k).compute(), want)


# --------------------------------------------------------------------------------------------
# Shapes, scales, axes, channels
# --------------------------------------------------------------------------------------------


def test_yx_scales_double_per_level(tmp_path, image):
    path = tmp_path / "s.zarr"
    write(
        da.from_array(image, chunks=64), path, axes="yx", pixel_size=(0.5, 0.25), unit="nanometer"
    )
    assert scales(path) == [[0.5 * 2**k, 0.25 * 2**k] for k in range(4)]
    assert multiscale(path)["axes"] == [
        {"name": "y", "type": "space", "unit": "nanometer"},
        {"name": "x", "type": "space", "unit": "nanometer"},
    ]


def test_zyx_keeps_z_size_and_scale(tmp_path):
    a = np.random.default_rng(2).random((3, 40, 36)).astype(np.float32)
    path = tmp_path / "zyx.zarr"
    write(
        da.from_array(a, chunks=(1, 16, 16)), path, axes="zyx", pixel_size=(2.0, 0.5, 0.5)
    )
    v05.Image.from_zarr(zarr.open_group(path, mode="r"))
    group = zarr.open_group(path, mode="r")
    assert [group[str(k)].shape for k in range(3)] == [(3, 40, 36), (3, 20, 18), (3, 10, 9)]
    assert scales(path) == [[2.0, 0.5, 0.5], [2.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    assert all(group[str(k)].dtype == np.float32 for k in range(3))


def test_channels_in_omero(tmp_path):
    a = np.stack(
        [np.full((20, 20), 10, np.uint16), np.arange(400, dtype=np.uint16).reshape(20, 20)]
    )
    path = tmp_path / "cyx.zarr"
    write(
        da.from_array(a, chunks=(1, 8, 8)),
        path,
        axes="cyx",
        channel_names=["DAPI", "GFP"],
        channel_colors=["#0000ff", "00FF00"],
        compute_kwargs=SYNC,
    )
    v05.Image.from_zarr(zarr.open_group(path, mode="r"))
    group = zarr.open_group(path, mode="r")
    n = len(multiscale(path)["datasets"])
    assert all(group[str(k)].dtype == np.uint16 and group[str(k)].shape[0] == 2 for k in range(n))
    assert scales(path)[1] == [1.0, 2.0, 2.0]
    assert multiscale(path)["axes"][0] == {"name": "c", "type": "channel"}
    channels = ome_attrs(path)["omero"]["channels"]
    assert [c["label"] for c in channels] == ["DAPI", "GFP"]
    assert [c["color"] for c in channels] == ["0000FF", "00FF00"]
    # Windows are the data range of the coarsest level.
    smallest = read_ome_zarr_level(path, -1).compute()
    assert channels[0]["window"] == {"min": 10.0, "max": 10.0, "start": 10.0, "end": 10.0}
    assert channels[1]["window"]["min"] == smallest[1].min()
    assert channels[1]["window"]["end"] == smallest[1].max()


def test_tczyx_axes_metadata(tmp_path):
    a = np.zeros((2, 1, 2, 9, 9), dtype=np.uint8)
    path = tmp_path / "t.zarr"
    write(
        da.from_array(a, chunks=(1, 1, 1, 4, 4)),
        path,
        axes="tczyx",
        pixel_size=(3.0, 1.0, 1.0),
        ngff_version="0.4",
    )
    v04.Image.from_zarr(zarr.open_group(path, mode="r"))
    assert multiscale(path)["axes"][:2] == [
        {"name": "t", "type": "time"},
        {"name": "c", "type": "channel"},
    ]
    assert scales(path)[2] == [1.0, 1.0, 3.0, 4.0, 4.0]


def test_float_nan_ignored_in_window(tmp_path):
    a = np.array([[np.nan, 1.0], [3.0, np.inf]], dtype=np.float32)
    path = tmp_path / "n.zarr"
    write(da.from_array(a), path, axes="yx", compute_kwargs=SYNC)
    (channel,) = ome_attrs(path)["omero"]["channels"]
    assert channel["window"] == {"min": 1.0, "max": 3.0, "start": 1.0, "end": 3.0}
    assert channel["color"] == "FFFFFF"


# --------------------------------------------------------------------------------------------
# Level count and chunks
# --------------------------------------------------------------------------------------------


def test_pyramid_shapes_default_stops_at_one_chunk():
    assert pyramid_shapes((300, 250), (64, 64), "yx") == [
        (300, 250),
        (150, 125),
        (75, 63),
        (38, 32),
    ]
    assert pyramid_shapes((64, 64), (64, 64), "yx") == [(64, 64)]
    assert pyramid_shapes((65, 10), (64, 64), "yx") == [(65, 10), (33, 5)]
    assert pyramid_shapes((2, 5, 100, 9), (10, 10), "czyx") == [
        (2, 5, 100, 9),
        (2, 5, 50, 5),
        (2, 5, 25, 3),
        (2, 5, 13, 2),
        (2, 5, 7, 1),
    ]


def test_pyramid_shapes_forced_levels():
    assert pyramid_shapes((300, 250), (64, 64), "yx", levels=2) == [(300, 250), (150, 125)]
    assert pyramid_shapes((4, 4), (64, 64), "yx", levels=4) == [(4, 4), (2, 2), (1, 1), (1, 1)]
    with pytest.raises(InputError):
        pyramid_shapes((4, 4), (64, 64), "yx", levels=0)


def test_levels_one_writes_only_level_zero(tmp_path, image):
    path = tmp_path / "one.zarr"
    write(da.from_array(image, chunks=64), path, axes="yx", levels=1)
    assert sorted(zarr.open_group(path, mode="r").array_keys()) == ["0"]
    assert [d["path"] for d in multiscale(path)["datasets"]] == ["0"]


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_level_chunks_equal_dask_chunks(tmp_path, image, version):
    path = tmp_path / "c.zarr"
    write(da.from_array(image, chunks=(32, 48)), path, axes="yx", ngff_version=version)
    group = zarr.open_group(path, mode="r")
    keys = [d["path"] for d in multiscale(path)["datasets"]]
    assert len(keys) == 5  # x: 250 > 48 -> 125 -> 63 -> 32; y: 300 -> ... -> 19 <= 32
    assert all(group[k].chunks == (32, 48) for k in keys)


def test_irregular_chunks_rechunked(tmp_path):
    a = np.arange(60 * 7, dtype=np.uint16).reshape(60, 7)
    darr = da.from_array(a, chunks=((10, 20, 30), (7,)))
    path = tmp_path / "irr.zarr"
    write(darr, path, axes="yx", levels=1)
    arr = zarr.open_group(path, mode="r")["0"]
    assert arr.chunks == (30, 7)
    np.testing.assert_array_equal(arr[:], a)


# --------------------------------------------------------------------------------------------
# Compute behaviour: one compute per level, level 0 computed once, logging
# --------------------------------------------------------------------------------------------


def test_one_compute_per_level_and_source_computed_once(tmp_path, caplog, capsys):
    calls = []

    def tally(block):
        if block.size:  # dask probes with an empty block to infer meta
            calls.append(block.shape)
        return block

    a = np.random.default_rng(3).integers(0, 1000, (100, 90), dtype=np.uint16)
    src = da.from_array(a, chunks=32).map_blocks(tally, dtype=a.dtype)
    starts = []
    path = tmp_path / "cnt.zarr"
    with Callback(start=lambda dsk: starts.append(1)), caplog.at_level(logging.INFO, "tilefuse"):
        write(src, path, axes="yx", compute_kwargs=SYNC)
    n_levels = len(multiscale(path)["datasets"])
    assert n_levels == 3
    assert len(starts) == n_levels
    assert len(calls) == src.npartitions  # later levels are read back, not recomputed
    assert "level 1: shape (50, 45)" in caplog.text
    assert capsys.readouterr() == ("", "")


# --------------------------------------------------------------------------------------------
# Failure behaviour
# --------------------------------------------------------------------------------------------


def _assert_unfinished(path):
    assert path.is_dir()
    assert "multiscales" not in ome_attrs(path)
    with pytest.raises(InputError, match="unfinished"):
        read_ome_zarr_level(path)


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_failure_in_later_level_leaves_no_metadata(tmp_path, image, monkeypatch, version):
    def boom(block, iy, ix):
        raise RuntimeError("disk full")

    monkeypatch.setattr(_pyramid, "mean_2x_yx", boom)
    path = tmp_path / "fail.zarr"
    with pytest.raises(RuntimeError, match="disk full"):
        write(
            da.from_array(image, chunks=64),
            path,
            axes="yx",
            ngff_version=version,
            compute_kwargs=SYNC,
        )
    _assert_unfinished(path)
    np.testing.assert_array_equal(zarr.open_group(path, mode="r")["0"][:], image)


def test_failure_in_level_zero_leaves_no_metadata(tmp_path):
    def explode(block, block_info=None):
        if block_info[0]["chunk-location"] == (1, 1):
            raise RuntimeError("bad tile")
        return block

    src = da.zeros((64, 64), dtype=np.uint8, chunks=32).map_blocks(explode, dtype=np.uint8)
    path = tmp_path / "fail0.zarr"
    with pytest.raises(RuntimeError, match="bad tile"):
        write(src, path, axes="yx", compute_kwargs=SYNC)
    _assert_unfinished(path)


def test_existing_path_refused_then_overwritten(tmp_path, image):
    path = tmp_path / "exists.zarr"
    write(da.from_array(image, chunks=64), path, axes="yx", levels=2)
    with pytest.raises(FileExistsError, match=r"exists .*; pass --overwrite to replace it"):
        write(da.from_array(image, chunks=64), path, axes="yx")
    new = np.ones((10, 12), dtype=np.uint8)
    write(da.from_array(new), path, axes="yx", overwrite=True)
    group = zarr.open_group(path, mode="r")
    assert sorted(group.array_keys()) == ["0"]
    np.testing.assert_array_equal(group["0"][:], new)


def test_existing_file_refused(tmp_path):
    path = tmp_path / "file.zarr"
    path.write_text("x")
    with pytest.raises(FileExistsError):
        write(da.zeros((4, 4), dtype=np.uint8), path, axes="yx")
    # a file tilefuse did not make is never replaced, not even with overwrite
    with pytest.raises(InputError, match="tilefuse did not make"):
        write(da.zeros((4, 4), dtype=np.uint8), path, axes="yx", overwrite=True)
    assert path.read_text() == "x"


def test_unwritable_parent_raises_before_computing(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")

    def never(block):
        raise AssertionError("computed before the writability check")

    src = da.zeros((8, 8), dtype=np.uint8, chunks=4).map_blocks(never, dtype=np.uint8)
    path = blocker / "out.zarr"
    with pytest.raises(InputError, match=r"out\.zarr") as info:
        write(src, path, axes="yx")
    assert "\n" not in str(info.value)
    assert not path.exists()


# --------------------------------------------------------------------------------------------
# Option validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"axes": "xy"}, "order"),
        ({"axes": "zyx"}, "dims"),
        ({"axes": "cz"}, "'y' and 'x'"),
        ({"axes": "yx", "pixel_size": (1.0,)}, "pixel_size"),
        ({"axes": "yx", "pixel_size": (1.0, 0.0)}, "> 0"),
        ({"axes": "yx", "ngff_version": "0.3"}, "ngff_version"),
        ({"axes": "yx", "channel_names": ["a", "b"]}, "channel"),
        ({"axes": "yx", "channel_colors": ["red"]}, "hex"),
    ],
)
def test_bad_options_raise_input_error(tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        write(da.zeros((4, 4), dtype=np.uint8), tmp_path / "bad.zarr", **kwargs)
    assert not (tmp_path / "bad.zarr").exists()


def test_every_level_carries_its_translation(tmp_path):
    """Level k's first pixel averages 2^k x 2^k level-0 pixels: its centre sits (2^k - 1) / 2
    pixels after the mosaic origin, times the pixel size."""
    image = da.zeros((3, 64, 80), dtype=np.uint16, chunks=(3, 16, 16))
    write(image, tmp_path / "t.zarr", axes="zyx", pixel_size=(2.0, 0.5, 0.25),
                   origin=(4, 10, 20), levels=3)
    datasets = multiscale(tmp_path / "t.zarr")["datasets"]
    for k, dataset in enumerate(datasets):
        scale, translation = dataset["coordinateTransformations"]
        assert scale == {"type": "scale", "scale": [2.0, 0.5 * 2**k, 0.25 * 2**k]}
        shift = (2**k - 1) / 2
        assert translation == {"type": "translation",
                               "translation": [8.0, (10 + shift) * 0.5, (20 + shift) * 0.25]}


def test_cli_writes_the_mosaic_origin(tmp_path):
    """A layout whose first tile sits at x=100, y=50 pixels: the image starts there."""
    import tifffile

    from conftest import run_main

    tifffile.imwrite(tmp_path / "a.tif", np.ones((16, 16), np.uint8))
    layout = tmp_path / "l.csv"
    layout.write_text("file,x,y\na.tif,100,50\n")
    out = tmp_path / "o.ome.zarr"
    assert run_main("fuse", layout, "-o", out, "-q", "--pixel-size", "0.5").returncode == 0
    [translation] = [t for t in multiscale(out)["datasets"][0]["coordinateTransformations"]
                     if t["type"] == "translation"]
    assert translation["translation"] == [25.0, 50.0]


@pytest.mark.parametrize("unit", ["furlong", "", "pixel"])
def test_unknown_units_are_refused(tmp_path, unit):
    with pytest.raises(InputError, match="not an OME-NGFF space unit"):
        write(da.zeros((4, 4), dtype=np.uint8), tmp_path / "u.zarr", axes="yx",
                       unit=unit)


def test_too_many_levels_are_refused(tmp_path):
    with pytest.raises(InputError, match="1 to 4 pyramid levels"):
        write(da.zeros((8, 5), dtype=np.uint8), tmp_path / "l.zarr", axes="yx",
                       levels=5)
    write(da.zeros((8, 5), dtype=np.uint8), tmp_path / "l.zarr", axes="yx", levels=4)


def test_remote_urls_are_refused(tmp_path):
    with pytest.raises(InputError, match="remote URLs are not supported"):
        write(da.zeros((4, 4), dtype=np.uint8), "s3://bucket/m.ome.zarr", axes="yx")
    assert not (Path.cwd() / "s3:").exists()
