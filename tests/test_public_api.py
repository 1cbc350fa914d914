"""The public API: real objects with real signatures, a cheap import, one function per job.

``tilefuse.fuse`` takes a Layout or a TimeSeries and returns a :class:`~tilefuse.Mosaic` that
carries its metadata; ``write_ome_zarr`` takes the Mosaic as it is.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

import tilefuse
from tilefuse import InputError, Mosaic
from tilefuse.testing import grid_tileset

PACKAGE = Path(tilefuse.__file__).parent


# ------------------------------------------------------------------------ the names themselves


def test_public_names_are_the_real_objects_with_their_signatures():
    from tilefuse.fusion import graph
    from tilefuse.io import readers
    from tilefuse.ome_tiff import writer as tiff_writer
    from tilefuse.ome_zarr import writer
    from tilefuse.registration import register

    assert tilefuse.fuse is graph.fuse and tilefuse.plan_fusion is graph.plan_fusion
    assert tilefuse.read_layout is readers.read_layout
    assert tilefuse.write_ome_zarr is writer.write_ome_zarr
    assert tilefuse.write_ome_tiff is tiff_writer.write_ome_tiff
    assert tilefuse.register is register
    assert tilefuse.Mosaic.__module__ == "tilefuse.model.mosaic"
    for name in ("fuse", "plan_fusion", "register", "write_ome_zarr", "write_ome_tiff",
                 "layout_from_arrays"):
        kinds = {p.kind for p in inspect.signature(getattr(tilefuse, name)).parameters.values()}
        assert inspect.Parameter.VAR_POSITIONAL not in kinds, name
        assert inspect.Parameter.VAR_KEYWORD not in kinds, name
    fuse = inspect.signature(tilefuse.fuse).parameters
    assert [n for n, p in fuse.items() if p.kind is p.KEYWORD_ONLY][:7] == [
        "chunk", "blend", "blend_width", "dtype", "fill", "cache_bytes", "backend"]
    write = inspect.signature(tilefuse.write_ome_zarr).parameters
    assert list(write) == ["mosaic", "path", "ngff_version", "levels", "overwrite", "name",
                           "shard"]
    write = inspect.signature(tilefuse.write_ome_tiff).parameters
    assert list(write) == ["mosaic", "path", "levels", "tile", "compression", "overwrite", "name"]


def test_every_public_name_resolves_and_the_stub_lists_them_all():
    for name in tilefuse.__all__:
        assert getattr(tilefuse, name) is not None, name
        assert name in dir(tilefuse)
    stub = ast.parse((PACKAGE / "__init__.pyi").read_text())
    listed = {alias.asname for node in stub.body if isinstance(node, ast.ImportFrom)
              for alias in node.names if node.module != "tilefuse"}
    assert listed == set(tilefuse.__all__) - {"__version__"}
    for node in stub.body:  # what the stub promises is what the package gives
        if isinstance(node, ast.ImportFrom) and node.module and node.module != "tilefuse":
            for alias in node.names:
                real = getattr(importlib.import_module(node.module), alias.name)
                assert getattr(tilefuse, alias.asname or alias.name) is real, alias.name


@pytest.mark.parametrize("gone", ["read_acquisition", "fuse_series", "plan_series",
                                  "fused_axes"])
def test_the_pairs_are_gone(gone):
    with pytest.raises(AttributeError):
        getattr(tilefuse, gone)
    from tilefuse.fusion import graph
    from tilefuse.io import readers

    assert not hasattr(readers, gone) and (gone == "fused_axes" or not hasattr(graph, gone))


def test_import_and_help_stay_cheap():
    """``import tilefuse`` loads no numerical library; ``tilefuse --help`` no dask or zarr."""
    code = ("import sys, tilefuse; print(sorted(m for m in ('numpy', 'dask', 'zarr', 'scipy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = ("import sys\nfrom tilefuse.cli.main import main\ntry:\n    main(['fuse', '--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in ('dask', 'zarr', 'scipy') "
            "if m in sys.modules), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--memory-limit" in out.stdout and out.stderr.strip() == "[]"


def test_a_small_local_fuse_loads_only_what_it_uses(tmp_path):
    """A small translation-only ``tilefuse fuse`` on local threads imports neither dask (0.3-0.5
    s: the chunks are fused and stored on threads, every pyramid level too), distributed (dask's
    scheduler lookup, 0.3 s), zarr-python (0.15 s: tilefuse writes the zarr metadata itself),
    scipy's k-d tree (0.2 s), the intensity package (0.2 s) nor numba (0.5 s with its cache):
    start-up is most of a small run. A rotated one does load the compiled kernel."""
    from tilefuse.testing import write_tileset

    ts = grid_tileset(grid=(2, 2), tile_shape=(48, 64), overlap=0.2, seed=1)
    layout = write_tileset(ts, tmp_path / "tiles", stage=False)
    heavy = ("('dask', 'distributed', 'zarr', 'scipy.spatial', 'tilefuse.intensity', 'numba', "
             "'numpy.ma', 'tilefuse.io.readers.czi', 'tilefuse.io.readers.bigstitcher')")
    for extra, loaded in (((), "[]"), (("--chunk", "32", "--ngff", "0.4"), "[]"),
                          (("--rotate", "1"), "['numba', 'numpy.ma']")):  # numba loads scipy
        code = ("import sys\nfrom tilefuse.cli.main import main\n"
                f"status = main(['fuse', {str(layout)!r}, '-o', {str(tmp_path / 'o.ome.zarr')!r}, "
                f"'-q', '--overwrite', *{list(extra)!r}])\n"
                f"print(status, sorted(m for m in {heavy} if m in sys.modules))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        assert out.stdout.strip().splitlines()[-1] == f"0 {loaded}", out.stderr


def test_the_console_script_leaves_its_objects_to_the_exit(tmp_path):
    """``tilefuse`` (``run``) freezes the collector once the command is done, so the
    interpreter's last collection skips what the command made; ``main`` alone does not."""
    from tilefuse.testing import write_tileset

    ts = grid_tileset(grid=(1, 2), tile_shape=(32, 32), overlap=0.2, seed=1)
    layout = str(write_tileset(ts, tmp_path / "tiles", stage=False))
    for entry, frozen in (("run", "True"), ("main", "False")):
        code = (f"import gc, sys\nfrom tilefuse.cli.main import {entry}\n"
                f"sys.argv = ['tilefuse', 'info', {layout!r}]\nstatus = {entry}()\n"
                "print(status, gc.get_freeze_count() > 0)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        assert out.stdout.strip().splitlines()[-1] == f"0 {frozen}", out.stderr


def test_info_and_preview_load_no_dask_or_zarr(tmp_path):
    """``tilefuse info`` and ``preview`` of a layout plan and fuse a small picture without
    dask, zarr, distributed or numba: the bulk of their start-up otherwise."""
    from tilefuse.testing import write_tileset

    ts = grid_tileset(grid=(2, 2), tile_shape=(48, 64), overlap=0.2, seed=1)
    layout = str(write_tileset(ts, tmp_path / "tiles", stage=False))
    heavy = "('dask', 'zarr', 'distributed', 'numba')"
    for args in (["info", layout], ["preview", layout, "-o", str(tmp_path / "p.png")],
                 ["preview", layout, "-o", str(tmp_path / "r.png"), "--rotate", "1"]):
        code = ("import sys\nfrom tilefuse.cli.main import main\n"
                f"status = main({args!r})\n"
                f"print(status, sorted(m for m in {heavy} if m in sys.modules))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        assert out.stdout.strip().splitlines()[-1] == "0 []", (args, out.stderr)
    assert (tmp_path / "p.png").stat().st_size > 0


# ------------------------------------------------------------------------------------ Mosaic


def test_fuse_returns_a_mosaic_that_knows_its_metadata():
    ts = grid_tileset(grid=(2, 2), tile_shape=(30, 40), overlap=0.25, seed=3)
    layout = ts.layout.with_positions(ts.layout.positions + np.array([7, -3]))
    layout = replace(layout, pixel_size=(0.5, 0.25), unit="nm")
    mosaic = tilefuse.fuse(layout, chunk=16)
    assert isinstance(mosaic, Mosaic) and isinstance(mosaic.data, da.Array)
    assert mosaic.axes == ("y", "x") and mosaic.shape == ts.truth.shape
    assert mosaic.pixel_size == (0.5, 0.25) and mosaic.unit == "nanometer"
    assert mosaic.channel_names == layout.channels and mosaic.timepoints is None
    assert mosaic.origin == (7.0, -3.0)
    assert mosaic.dtype == ts.truth.dtype and mosaic.ndim == 2
    np.testing.assert_array_equal(np.asarray(mosaic), ts.truth)
    np.testing.assert_array_equal(mosaic.compute(scheduler="sync"), ts.truth)
    assert "Mosaic(shape=" in repr(mosaic)


def test_a_time_series_is_just_another_input():
    sets = [grid_tileset(grid=(1, 2), tile_shape=(24, 32), overlap=0.25, seed=s) for s in (1, 2)]
    series = tilefuse.TimeSeries((sets[0].layout, sets[1].layout), ("a", "b"), shared=True)
    plan = tilefuse.plan_fusion(series, chunk=16)
    assert isinstance(plan, tilefuse.SeriesPlan) and len(plan) == 2
    mosaic = tilefuse.fuse(series, chunk=16)
    assert mosaic.axes == ("t", "y", "x") and mosaic.timepoints == ("a", "b")
    assert mosaic.data.chunks[0] == (1, 1)
    for t, ts in enumerate(sets):
        np.testing.assert_array_equal(mosaic.compute()[t], ts.truth)
    np.testing.assert_array_equal(tilefuse.fuse(plan).compute(), mosaic.compute())
    with pytest.raises(InputError, match="go to plan_fusion, not with a plan"):
        tilefuse.fuse(plan, blend="max")


def test_mosaic_checks_what_it_is_given():
    data = da.zeros((2, 8, 8), dtype=np.uint8)
    default = Mosaic(data, ("c", "y", "x"))
    assert default.channel_names == ("Channel 0", "Channel 1")
    assert default.pixel_size == (1.0, 1.0) and default.origin == (0.0, 0.0)
    for kwargs, match in [({"axes": ("y", "x")}, "name 2 dims"),
                          ({"axes": ("c", "x", "y")}, "in that order"),
                          ({"axes": "cyx", "pixel_size": (1.0,)}, "pixel_size has 1 values"),
                          ({"axes": "cyx", "pixel_size": (1.0, 0.0)}, "> 0"),
                          ({"axes": "cyx", "origin": (0.0, np.nan)}, "finite"),
                          ({"axes": "cyx", "channel_names": ("a",)}, "1 channel names"),
                          ({"axes": "cyx", "unit": "furlong"}, "not an OME-NGFF space unit"),
                          ({"axes": "cyx", "timepoints": ("0",)}, "time point names")]:
        with pytest.raises(InputError, match=match):
            Mosaic(data, **kwargs)
    with pytest.raises(InputError, match="must be a dask array"):
        Mosaic(np.zeros((8, 8)), ("y", "x"))  # type: ignore[arg-type]


def test_write_ome_zarr_takes_a_mosaic_not_a_bare_array(tmp_path):
    with pytest.raises(InputError, match="takes a Mosaic"):
        tilefuse.write_ome_zarr(da.zeros((8, 8), dtype=np.uint8), tmp_path / "a.ome.zarr")
    assert not (tmp_path / "a.ome.zarr").exists()
    with pytest.raises(TypeError):
        tilefuse.write_ome_zarr(Mosaic(da.zeros((8, 8), dtype=np.uint8), ("y", "x")),
                                tmp_path / "a.ome.zarr", axes="yx")  # type: ignore[call-arg]
