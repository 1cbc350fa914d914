"""A chunk of a 3D mosaic reads only the planes of a translated z-stack it needs.

Truth: the same mosaic fused from whole tiles (``tile_planes`` forced to None), bit for bit, in
both kernels, with integer and fractional z positions, chunks deeper and shallower than the
interpolation taps, a rotated tile among translated ones, and several channels; and each
reader's planes equal the same planes of its whole tile.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tifffile

from tilefuse import fuse
from tilefuse.fusion import jobs
from tilefuse.fusion.chunk import ChunkTile
from tilefuse.fusion.kernel import fuse_chunk
from tilefuse.intensity.apply import CorrectedSource, TileCorrection
from tilefuse.io.readers.memory import layout_from_arrays
from tilefuse.io.tile_cache import cache_stats, clear_cache, read_tile
from tilefuse.io.tiles import FileSource, PlaneStackSource
from tilefuse.model.layout import Layout

numba = pytest.importorskip("numba")


def _stacks(rng, n: int = 4, channels: int = 1, planes: int = 13, size: int = 20):
    return [rng.integers(0, 60000, (channels, planes, size, size), dtype=np.uint16)
            for _ in range(n)]


def _whole(monkeypatch) -> None:
    monkeypatch.setattr(jobs, "tile_planes", lambda *a: None)


POSITIONS = {
    "integer z": [[0, 0, 0], [2, 0, 15], [5, 15, 0], [1, 15, 15]],
    "fractional z": [[0.4, 0.3, 0.0], [2.7, 0.0, 15.6], [5.5, 15.2, 0.0], [1.0, 15.0, 15.0]],
}


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("case", sorted(POSITIONS))
@pytest.mark.parametrize("chunk", [(1, 16, 16), (4, 16, 16), (7, 32, 32)])
def test_windows_fuse_the_same_mosaic_as_whole_tiles(monkeypatch, backend, case, chunk):
    rng = np.random.default_rng(1)
    layout = layout_from_arrays(_stacks(rng, channels=2), positions=POSITIONS[case],
                                channels=["a", "b"])
    windowed = fuse(layout, chunk=chunk, backend=backend).compute()
    with monkeypatch.context() as m:
        _whole(m)
        whole = fuse(layout, chunk=chunk, backend=backend).compute()
    assert windowed.shape == whole.shape
    assert np.array_equal(windowed, whole)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_rotated_tile_among_windowed_ones_reads_whole(monkeypatch, backend):
    rng = np.random.default_rng(2)
    stacks = _stacks(rng, n=2)
    angle = np.deg2rad(3)
    rotated = np.eye(4)
    rotated[2:4, 2:4] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    rotated[:3, 3] = [1.5, 2.0, 14.0]
    layout = layout_from_arrays(stacks, affines=np.stack([np.eye(4), rotated]))
    assert [jobs.tile_planes(t.affine, t.shape, p, np.zeros(3), (4, 16, 16))
            for t, p in zip(layout.tiles, ("slice", "affine"), strict=True)] == [(0, 4), None]
    windowed = fuse(layout, chunk=(4, 16, 16), backend=backend).compute()
    _whole(monkeypatch)
    assert np.array_equal(windowed, fuse(layout, chunk=(4, 16, 16), backend=backend).compute())


@dataclasses.dataclass(frozen=True, eq=False)
class CountingSource:
    """An in-memory z-stack that records what is read of it."""

    data: np.ndarray
    log: list

    @property
    def key(self) -> tuple:
        return ("counting", id(self))

    def read(self) -> np.ndarray:
        self.log.append(None)
        return self.data

    def read_planes(self, start: int, stop: int) -> np.ndarray:
        self.log.append((start, stop))
        return self.data[:, start:stop]


def test_each_chunk_reads_its_planes_and_the_taps_only():
    clear_cache()
    rng = np.random.default_rng(3)
    log: list = []
    stacks = _stacks(rng, n=2, planes=30)
    base = layout_from_arrays(stacks, positions=[[0, 0, 0], [2.5, 0, 15]])
    layout = Layout(tuple(dataclasses.replace(t, source=CountingSource(s, log))
                          for t, s in zip(base.tiles, stacks, strict=True)),
                    base.dtype, base.channels)
    out = fuse(layout, chunk=(8, 40, 40), backend="numpy").compute()
    assert None not in log  # no tile was read whole
    # tile 0 at z = 0: the planes of each 8-deep chunk; tile 1 at z = 2.5 covers mosaic planes
    # 3..31: chunk [8, 16) reads its planes 5.5..13.5, so the taps 5..13, stop 14
    assert sorted(log) == [(0, 6), (0, 8), (5, 14), (8, 16), (13, 22), (16, 24), (21, 30),
                           (24, 30)]
    clear_cache()
    assert np.array_equal(out, fuse(base, chunk=(8, 40, 40), backend="numpy").compute())


def _bad_window(first: int, planes: int):
    data = np.ones((1, 10, 8, 8), np.uint16)
    return ChunkTile(np.eye(4), (10, 8, 8), "slice", lambda: data[:, first:first + planes],
                     first_plane=first)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_window_missing_planes_is_refused_not_fused_short(backend):
    for tile in (_bad_window(2, 3), _bad_window(0, 2)):  # the chunk needs planes 1:4
        with pytest.raises(ValueError, match="lack"):
            fuse_chunk(np.array([1, 0, 0]), (3, 8, 8), [tile], n_channels=1,
                       dtype=np.dtype(np.uint16), blend="linear", widths=(1.0, 2.0, 2.0),
                       backend=backend)


# ------------------------------------------------------------------------------- the readers

VOLUME = np.arange(2 * 9 * 6 * 5, dtype=np.uint16).reshape(2, 9, 6, 5)  # c, z, y, x


@pytest.mark.parametrize("kind", ["ZYX", "ImageJ ZCYX", "OME CZYX", "OME ZCYX"])
def test_tiff_planes_equal_the_whole_tiles_planes(tmp_path, kind):
    path = str(tmp_path / "stack.tif")
    if kind == "ZYX":
        tifffile.imwrite(path, VOLUME[0])
    elif kind == "ImageJ ZCYX":
        tifffile.imwrite(path, np.moveaxis(VOLUME, 0, 1), imagej=True,
                         metadata={"axes": "ZCYX"})
    else:
        axes = kind.split()[1]
        data = VOLUME if axes == "CZYX" else np.moveaxis(VOLUME, 0, 1)
        tifffile.imwrite(path, data, ome=True, metadata={"axes": axes})
    source = FileSource((path,))
    whole = source.read()
    assert whole.shape == ((1, 9, 6, 5) if kind == "ZYX" else (2, 9, 6, 5))
    for start, stop in [(0, 1), (2, 6), (8, 9), (0, 9)]:
        part = source.read_planes(start, stop)
        assert part is not None and np.array_equal(part, whole[:, start:stop])


def test_a_tiff_volume_in_one_page_is_read_whole(tmp_path):
    path = str(tmp_path / "volume.tif")
    tifffile.imwrite(path, VOLUME[0, :8], tile=(8, 16, 16))  # one volumetric (SGI) page
    source = FileSource((path,))
    assert source.read_planes(1, 3) is None
    clear_cache()
    part = read_tile(source, planes=(1, 3))  # cut from the whole tile, read once
    assert np.array_equal(part, VOLUME[0, None, 1:3])
    assert np.array_equal(read_tile(source, planes=(4, 6)), VOLUME[0, None, 4:6])
    assert cache_stats()["decodes"] == 1


def _plane_files(folder, n: int) -> list[tuple[str]]:
    """Planes 0..n-1 of VOLUME's first channel, one TIFF file each."""
    planes = []
    for z in range(n):
        path = str(folder / f"z{z}.tif")
        tifffile.imwrite(path, VOLUME[0, z])
        planes.append((path,))
    return planes


def test_plane_files_read_only_the_planes_asked_and_check_them(tmp_path):
    planes = _plane_files(tmp_path, 5)
    source = PlaneStackSource(tuple(planes))
    assert np.array_equal(source.read_planes(2, 4), source.read()[:, 2:4])
    tifffile.imwrite(planes[3][0], VOLUME[0, 3, :4])
    with pytest.raises(Exception, match="plane 3"):
        source.read_planes(2, 4)


def test_windows_of_plane_files_decode_plane_0_once(tmp_path, monkeypatch):
    """Plane 0 is decoded for the check once per process, not for every window; a plane 0
    rewritten as another shape is seen again (its files' state is part of the memo)."""
    import tilefuse.io.tiles as tiles

    planes = _plane_files(tmp_path, 6)
    source = PlaneStackSource(tuple(planes))
    decoded: list[str] = []
    real = tiles.FileSource.read
    monkeypatch.setattr(tiles.FileSource, "read",
                        lambda self: decoded.append(self.paths[0]) or real(self))
    assert np.array_equal(source.read_planes(2, 4), VOLUME[0, None, 2:4])
    assert np.array_equal(source.read_planes(4, 6), VOLUME[0, None, 4:6])
    assert np.array_equal(source.read_planes(3, 4), VOLUME[0, None, 3:4])
    assert decoded == [planes[0][0]] + [planes[z][0] for z in (2, 3, 4, 5, 3)]
    tifffile.imwrite(planes[0][0], VOLUME[0, 0, :4])  # plane 0 now another shape
    with pytest.raises(Exception, match=r"plane 4 is 6 x 5 uint16, but plane 0 .* is 4 x 5"):
        source.read_planes(4, 6)


def test_a_correction_the_same_on_every_plane_reads_planes(tmp_path):
    inner = layout_from_arrays([VOLUME], positions=[[0, 0, 0]], channels=["a", "b"]).tiles[0]
    flat = np.full((2, 1, 6, 5), 2.0, np.float32)
    flat_per_plane = np.full((2, 9, 6, 5), 2.0, np.float32)
    plane_wise = CorrectedSource(inner.source, TileCorrection(flat, None, None, None), "a")
    assert np.array_equal(plane_wise.read_planes(3, 5), plane_wise.read()[:, 3:5])
    varying = CorrectedSource(inner.source, TileCorrection(flat_per_plane, None, None, None), "b")
    assert varying.read_planes(3, 5) is None


def test_windows_of_one_tile_are_cached_apart():
    clear_cache()
    log: list = []
    source = CountingSource(VOLUME, log)
    a = read_tile(source, planes=(0, 3))
    b = read_tile(source, planes=(3, 6))
    again = read_tile(source, planes=(0, 3))
    assert again is a and not np.shares_memory(a, b)
    assert log == [(0, 3), (3, 6)]
    assert not a.flags.writeable


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_tiff_stacks_fuse_the_same_read_by_planes(tmp_path, monkeypatch, backend):
    rng = np.random.default_rng(4)
    stacks = _stacks(rng, n=2, planes=11)
    base = layout_from_arrays(stacks, positions=[[0.5, 0, 0], [2, 0.25, 15]])
    sources = []
    for i, stack in enumerate(stacks):
        path = str(tmp_path / f"t{i}.tif")
        tifffile.imwrite(path, stack[0])
        sources.append(FileSource((path,)))
    layout = Layout(tuple(dataclasses.replace(t, source=s)
                          for t, s in zip(base.tiles, sources, strict=True)),
                    base.dtype, base.channels)
    clear_cache()
    windowed = fuse(layout, chunk=(3, 32, 32), backend=backend).compute()
    assert cache_stats()["decodes"] > len(sources)  # read in windows
    assert np.array_equal(windowed, fuse(base, chunk=(3, 32, 32), backend=backend).compute())


def test_zarr_tiles_read_planes_of_the_kept_time_point_and_channels(tmp_path):
    import zarr

    from tilefuse.io.readers.omezarr import ZarrChannels, ZarrSource

    data = np.arange(2 * 2 * 7 * 4 * 3, dtype=np.uint16).reshape(2, 2, 7, 4, 3)  # t c z y x
    zarr.create_array(str(tmp_path / "a"), data=data, chunks=(1, 1, 2, 4, 3))
    zarr.create_array(str(tmp_path / "b"), data=data[:, 0], chunks=(1, 3, 4, 3))  # t z y x
    kept = ZarrSource(str(tmp_path / "a"), (1, None, None, None, None), channel_axis=True)
    assert np.array_equal(kept.read_planes(2, 5), data[1, :, 2:5])
    assert np.array_equal(kept.read_planes(2, 5), kept.read()[:, 2:5])
    one = ZarrSource(str(tmp_path / "b"), (0, None, None, None))
    both = ZarrChannels((one, ZarrSource(str(tmp_path / "b"), (1, None, None, None))))
    assert np.array_equal(both.read_planes(6, 7), both.read()[:, 6:7])
    plane = ZarrSource(str(tmp_path / "b"), (0, 3, None, None))  # a 2D tile: one plane kept
    assert plane.read_planes(0, 1) is None


def test_the_memory_estimate_counts_a_chunks_planes_of_a_stack_read_by_planes():
    from tilefuse.plan.info import chunk_peak, layout_memory

    stacks = [np.zeros((100, 64, 64), np.uint16)] * 2  # 8 KiB a plane, 800 KiB a stack
    layout = layout_from_arrays(stacks, positions=[[0, 0, 0], [0, 0, 60]])
    options = layout_memory(layout)
    assert options["max_plane_bytes"] == 8192 and options["max_tile_bytes"] == 819200
    peak = chunk_peak((8, 64, 64), 1, 2, 2, 2**20, "numpy", **options)
    whole = chunk_peak((8, 64, 64), 1, 2, 2, 2**20, "numpy",
                       **{**options, "max_plane_bytes": None})
    # the cache part: all tiles (1.6 MB, under the 1 MiB cache: the cache) + one read per
    # thread, 9 planes instead of 100
    assert whole.cache - peak.cache == 2 * (819200 - 9 * 8192)
    rotated = layout_from_arrays(stacks, affines=np.stack([np.eye(4), np.eye(4)]) + np.pad(
        [[[0, 0.1, 0], [-0.1, 0, 0], [0, 0, 0]]] * 2, ((0, 0), (0, 1), (0, 1))))
    assert layout_memory(rotated)["max_plane_bytes"] is None
    # one stack rotated among translated ones: it is read whole, and the estimate holds it whole
    shear = np.eye(4)
    shear[1, 2] = 0.1  # y gains 0.1 per x: affine
    mixed = layout_from_arrays(stacks, affines=np.stack([np.eye(4), shear]))
    options = layout_memory(mixed)
    assert options["max_plane_bytes"] == 8192 and options["max_whole_bytes"] == 819200
    assert (chunk_peak((8, 64, 64), 1, 2, 2, 2**20, "numpy", **options).cache
            == whole.cache)


def test_a_run_sizes_its_cache_for_four_chunk_reads_within_its_memory_budget(caplog):
    import logging

    from tilefuse._run import tile_cache_bytes
    from tilefuse.io.tile_cache import DEFAULT_CACHE_BYTES

    plane = 2048 * 2048 * 2  # 8 MiB
    stacks = [np.lib.stride_tricks.as_strided(np.zeros(1, np.uint16), (256, 2048, 2048),
                                              (0, 0, 0))] * 2  # no memory behind them
    layout = layout_from_arrays(stacks, positions=[[0, 0, 0], [0, 0, 1843.5]])
    with caplog.at_level(logging.INFO, logger="tilefuse"):
        cache = tile_cache_bytes(layout, None, memory_limit=64 * 2**30)
    assert cache == 4 * 65 * plane  # chunks 64 deep: 65 planes a read (2.03 GiB)
    assert "tile cache 2080 MiB" in caplog.text
    assert tile_cache_bytes(layout, (16, 256, 256), memory_limit=64 * 2**30) == 4 * 17 * plane
    assert tile_cache_bytes(layout, None, memory_limit=4 * 2**30) == 2**30  # a quarter
    assert tile_cache_bytes(layout, None, memory_limit=2**30) == DEFAULT_CACHE_BYTES
    small = layout_from_arrays([np.zeros((64, 64), np.uint16)] * 2, positions=[[0, 0], [0, 60]])
    assert tile_cache_bytes(small, None, memory_limit=64 * 2**30) == DEFAULT_CACHE_BYTES
