"""Writing a mosaic as a pyramidal OME-TIFF: tiled, compressed, the pyramid in SubIFDs.

The layout of the file is what QuPath, OMERO and Bio-Formats read (and what ASHLAR writes):
every plane of full resolution is one tiled IFD, in the order of the OME ``DimensionOrder``
XYZCT, and each holds its lower resolutions as SubIFDs, each a 2x mean in y and x of the one
above (the same levels as the OME-Zarr pyramid, :mod:`tilefuse.ome_zarr._pyramid`). The first
IFD carries the OME-XML: axes, physical pixel sizes and unit, channel names and colours, plane
positions, and the run manifest that marks the file as tilefuse's.

Nothing is held whole in memory: the mosaic is fused chunk by chunk into a raw spool file, and
each level is then read back one band of tile rows at a time (:mod:`tilefuse.ome_tiff._spool`).
All of it happens in a temporary folder beside the output, renamed into place at the end and
removed on any failure or Ctrl-C: a file named like the output is always a finished one.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import numpy as np
import tifffile

from tilefuse import __version__
from tilefuse.errors import InputError
from tilefuse.io.outputs import check_tiff_output, image_stem
from tilefuse.model.mosaic import Mosaic
from tilefuse.ome_tiff import COMPRESSIONS
from tilefuse.ome_tiff._omexml import OME_DTYPES, ome_xml
from tilefuse.ome_tiff._spool import RawLevel, fuse_to_raw, level_tiles, remove_quietly
from tilefuse.ome_zarr._pyramid import check_levels, pyramid_shapes

__all__ = ["DEFAULT_TILE", "write_ome_tiff"]

log = logging.getLogger(__name__)

Compute = Callable[..., tuple]
"""Runs dask collections like ``dask.compute(*collections)`` (may take ``label=``)."""
ProgressFn = Callable[[int, int, str], None]

DEFAULT_TILE = 512
"""TIFF tile size (y and x) in pixels."""
_BIGTIFF_BYTES = 2**31
"""Above this many uncompressed bytes (all levels) the file is a BigTIFF."""
_TIFF_COMPRESSION = {"deflate": "zlib", "lzw": "lzw", "none": None}
_WRITING = "writing OME-TIFF"


def write_ome_tiff(
    mosaic: Mosaic,
    path: str | os.PathLike,
    *,
    levels: int | None = None,
    tile: int = DEFAULT_TILE,
    compression: str = "deflate",
    overwrite: bool = False,
    name: str | None = None,
) -> Path:
    """Write a mosaic and its 2x mean pyramid as a pyramidal OME-TIFF, out of core.

    Parameters
    ----------
    mosaic : Mosaic
        What :func:`tilefuse.fuse` returns, or a :class:`~tilefuse.Mosaic` around any dask
        array, axes ``([t,] [c,] [z,] y, x)``; dtype uint8/16/32, int8/16/32, float32/64.
        Each plane (one t, c, z) is one TIFF page.
    path : str or os.PathLike
        Output file, ``NAME.ome.tif`` (or ``.ome.tiff``).
    levels : int, optional
        Number of levels including level 0; by default until one tile holds y and x.
    tile : int
        Tile size in pixels (y and x), a multiple of 16.
    compression : {"deflate", "lzw", "none"}
        Tile compression (deflate with the horizontal predictor for integers).
    overwrite : bool
        Replace an existing `path` that tilefuse wrote. A file tilefuse did not write (any
        other TIFF, an input) is never replaced (see :mod:`tilefuse.io.outputs`).
    name : str, optional
        Image name in the OME-XML; default the file name without ``.ome.tif``.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    FileExistsError
        `path` exists and `overwrite` is False.
    InputError
        Invalid options, a dtype OME-TIFF cannot hold, or `path` cannot be written.

    Examples
    --------
    >>> import tilefuse
    >>> layout = tilefuse.read_layout("tiles/TileConfiguration.txt")  # doctest: +SKIP
    >>> tilefuse.write_ome_tiff(tilefuse.fuse(layout), "mosaic.ome.tif")  # doctest: +SKIP
    """
    return write_tiff_image(mosaic, path, levels=levels, tile=tile, compression=compression,
                            overwrite=overwrite, name=name)


def write_tiff_image(
    mosaic: Mosaic,
    path: str | os.PathLike,
    *,
    levels: int | None = None,
    tile: int = DEFAULT_TILE,
    compression: str = "deflate",
    overwrite: bool = False,
    name: str | None = None,
    compute: Compute | None = None,
    manifest: dict | None = None,
    progress: ProgressFn | None = None,
) -> Path:
    """:func:`write_ome_tiff` with the plumbing of a run (:mod:`tilefuse.pipeline`): not public.

    Parameters
    ----------
    mosaic, path, levels, tile, compression, overwrite, name
        As in :func:`write_ome_tiff`.
    compute : callable, optional
        Runs the fusion (one call, label ``"fuse"``) like ``dask.compute``; default
        ``dask.compute``.
    manifest : dict, optional
        What the run was asked to do; stored in the OME-XML with the tilefuse version (the
        mark that lets a later ``overwrite`` replace this file).
    progress : callable, optional
        ``progress(done, total, "writing OME-TIFF")`` after each band of tile rows written.
    """
    if not isinstance(mosaic, Mosaic):
        raise InputError(f"write_ome_tiff takes a Mosaic (what tilefuse.fuse returns), got "
                         f"{type(mosaic).__name__}; wrap an array as Mosaic(data, axes=...)")
    shapes = _check(mosaic, levels, tile, compression)
    out = Path(path)
    manifest = json.loads(json.dumps({"tilefuse": __version__, **(manifest or {})}))
    xml = ome_xml(mosaic, name or image_stem(out), manifest)
    out = check_tiff_output(out, overwrite=overwrite)
    work = _work_folder(out)
    try:
        level0 = fuse_to_raw(mosaic.data, work / "level0.raw", compute or dask.compute)
        _write_levels(work / "image.ome.tif", level0, shapes, xml, tile,
                      _TIFF_COMPRESSION[compression], progress)
        check_tiff_output(out, overwrite=overwrite)  # the run was long: check again
        os.replace(work / "image.ome.tif", out)
    except OSError as exc:
        raise InputError(f"cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)  # our own fresh folder, nothing else
    log.info("wrote %s (%d levels, %s)", out, len(shapes), compression)
    return out


def _check(mosaic: Mosaic, levels: int | None, tile: int,
           compression: str) -> list[tuple[int, ...]]:
    """Refuse what an OME-TIFF cannot hold; the shapes of the pyramid levels."""
    if mosaic.dtype.name not in OME_DTYPES:
        raise InputError(f"cannot write dtype {mosaic.dtype} as OME-TIFF; expected one of "
                         f"{', '.join(OME_DTYPES)} (fuse with dtype=...)")
    if compression not in COMPRESSIONS:
        raise InputError(f"compression {compression!r}: expected one of {', '.join(COMPRESSIONS)}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 16 or tile % 16:
        raise InputError(f"tile {tile!r}: a TIFF tile is a multiple of 16 pixels (e.g. 512)")
    if math.prod(mosaic.shape) == 0:
        raise InputError(f"cannot write an empty image of shape {mosaic.shape}")
    check_levels(levels, mosaic.shape[-2:])  # type: ignore[arg-type]
    return pyramid_shapes(mosaic.shape, (tile, tile), mosaic.axes, levels)


_OWNER = "tilefuse-owner.json"
"""In a work folder: the host and process that made it, so that a later run can tell a folder
left by a killed run (removed) from one a live run is writing (left alone)."""


def _work_folder(out: Path) -> Path:
    """A new folder beside `out` for the partial file and the spools (same file system, so
    the finished file is renamed into place), marked with its owner. Making it is the
    writability check. Folders that killed runs left for `out` are removed first."""
    remove_stale_work(out)
    work = None
    try:
        work = Path(tempfile.mkdtemp(prefix=f"{out.name}.", suffix=".partial", dir=out.parent))
        (work / _OWNER).write_text(json.dumps({"host": socket.gethostname(),
                                               "pid": os.getpid()}))
    except OSError as exc:
        if work is not None:  # made here, a moment ago: nothing else inside
            shutil.rmtree(work, ignore_errors=True)
        raise InputError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return work


def remove_stale_work(out: Path) -> int:
    """Delete the work folders (``OUT.*.partial``, with spools that can be as large as the
    image) that runs writing `out` left when they were killed: only folders whose owner file
    names this host and a process that no longer exists. Returns how many were removed."""
    removed = 0
    for folder in out.parent.glob(f"{glob.escape(out.name)}.*.partial"):
        try:
            owner = json.loads((folder / _OWNER).read_text())
        except (OSError, ValueError):
            continue  # not provably tilefuse's: left alone
        if (folder.is_symlink() or not isinstance(owner, dict)
                or owner.get("host") != socket.gethostname() or _alive(owner.get("pid"))):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        log.warning("removed %s, left by an interrupted run", folder)
        removed += 1
    return removed


def _alive(pid: object) -> bool:
    """Whether process `pid` exists (True when that cannot be told: keep its folder)."""
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


def _write_levels(target: Path, level0: RawLevel, shapes: list[tuple[int, ...]], xml: str,
                  tile: int, compression: str | None, progress: ProgressFn | None) -> None:
    """Every level into `target`, level 0 as pages with SubIFDs, from the raw spools."""
    dtype = np.dtype(level0.dtype)
    raw = sum(math.prod(s) for s in shapes) * dtype.itemsize
    bands = sum(math.prod(s[:-2]) * -(-s[-2] // tile) for s in shapes)
    done = 0

    def band_done() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, bands, _WRITING)

    options: dict[str, Any] = {
        "dtype": dtype, "tile": (tile, tile), "compression": compression,
        "predictor": 2 if compression and dtype.kind in "iu" else None,
        "photometric": "minisblack", "metadata": None}
    with tifffile.TiffWriter(target, bigtiff=raw > _BIGTIFF_BYTES, ome=False) as tif:
        level = level0
        for k, shape in enumerate(shapes):
            down = target.with_name(f"level{k + 1}.raw") if k + 1 < len(shapes) else None
            tiles = level_tiles(level, tile, down, band_done)
            pages = (level.n_planes, *shape[-2:])
            log.info("OME-TIFF level %d: %s in %d page(s)", k, shape[-2:], level.n_planes)
            if k == 0:
                tif.write(tiles, shape=pages, subifds=len(shapes) - 1,
                          description=xml.encode("utf-8"),  # UTF-8: "µm"
                          software=f"tilefuse {__version__}", **options)
            else:
                tif.write(tiles, shape=pages, subfiletype=1, **options)
            remove_quietly(level.path)
            if down is not None:
                level = RawLevel(down, shapes[k + 1], level0.dtype)
