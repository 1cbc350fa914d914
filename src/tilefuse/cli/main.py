"""The ``tilefuse`` command: argument parsing, logging, exit status; one library call per command.

A user's mistake (missing file, malformed layout, existing output) is one line on stderr and exit
status 2, never a traceback. The commands themselves are in :mod:`tilefuse.cli.commands`.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from tilefuse import __version__
from tilefuse.cli.allocator import retain_freed_memory
from tilefuse.cli.argtypes import (
    dtype_name,
    finite_float,
    fraction,
    nonnegative_int,
    positive_float,
    positive_int,
    scene_index,
    space_unit,
)
from tilefuse.errors import USER_ERRORS
from tilefuse.fusion.blend import BLENDS
from tilefuse.fusion.kernel import BACKENDS
from tilefuse.io.tile_cache import DEFAULT_CACHE_BYTES
from tilefuse.ome_tiff import FORMATS
from tilefuse.ome_zarr import NGFF_VERSIONS
from tilefuse.plan.chunking import DEFAULT_CHUNK, MAX_Z_CHUNK

__all__ = ["main"]

_CACHE_MB = DEFAULT_CACHE_BYTES // 2**20
_NO_NANNY = ("threads", "processes", "sync")  # schedulers that start no distributed workers


def _add_layout_options(p: argparse.ArgumentParser, *, cycles: bool = False) -> None:
    what = ("TileConfiguration.txt, CSV layout, .czi, OME-TIFF with stage positions, "
            "BigStitcher dataset.xml, a folder of OME-Zarr images, or a folder of tiles with "
            "--pattern")
    if not cycles:
        p.add_argument("layout", help=what)
    else:  # several inputs: the cycles of a cyclic acquisition
        p.add_argument("layout", nargs="+", help=what + "; several: the cycles of a cyclic "
                       "acquisition (CyCIF, CODEX), each aligned to the first")
        p.add_argument("--align-channel", nargs="+", default=(), metavar="NAME|INDEX",
                       help="with several inputs: the channel all cycles share (nuclei), by "
                            "name or index, one or one per cycle (default: each one's first)")
        p.add_argument("--align-scale", action="store_true",
                       help="with several inputs: let each later cycle's model scale as well "
                            "as turn and shift (a cycle imaged at a slightly different "
                            "magnification)")
    g = p.add_argument_group("folders of tiles")
    g.add_argument("--pattern", default=None,
                   help="file names with {row} {col} {index} {channel} {z} {t}, e.g. "
                        "'img_p{index}.tif'")
    g.add_argument("--grid", default=None, metavar="ROWSxCOLS", help="grid for {index}, e.g. 5x5")
    g.add_argument("--order", default=None,
                   choices=("row-major", "column-major", "snake-rows", "snake-cols"),
                   help="how {index} runs over the grid (default row-major)")
    g.add_argument("--overlap", type=fraction, default=None,
                   help="fraction of a tile shared with a neighbour (default 0.1)")
    g.add_argument("--first-index", type=nonnegative_int, default=None,
                   help="index of the first tile (default: the smallest found)")
    g.add_argument("--z-step", type=positive_float, default=None, metavar="PX",
                   help="spacing of z planes in lateral pixels (default: from OME-TIFF, else 1)")
    p.add_argument("--timepoint", type=nonnegative_int, default=None, metavar="N",
                   help="time point of a time series (from 0) to register on, preview or "
                        "describe (default 0)")
    g = p.add_argument_group("stage positions (CZI, OME-TIFF)")
    g.add_argument("--flip-x", action="store_true", help="stage x runs against the camera's")
    g.add_argument("--flip-y", action="store_true", help="stage y runs against the camera's")
    g.add_argument("--swap-xy", action="store_true", help="stage x is the camera's y")
    g.add_argument("--scene", type=scene_index, default=None, metavar="N|all",
                   help="CZI scene to read; all: fuse every scene into its own output, "
                        "OUT.<scene>.ome.zarr (info: describe each)")
    p.add_argument("--rotate", type=finite_float, metavar="DEG", default=None,
                   help="rotate every tile about its centre (camera rotated against the stage)")
    p.add_argument("--pixel-size", type=positive_float, nargs="+", metavar="S", default=None,
                   help="physical pixel size: one value, or one per axis (z y x), default 1")
    p.add_argument("--unit", type=space_unit, default="micrometer",
                   help="unit of --pixel-size, an OME-NGFF name or um/nm/mm (default micrometer)")


def _add_chunk_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk", type=positive_int, nargs="+", default=None, metavar="N",
                   help="output chunk size: one value or one per axis (default "
                        f"{DEFAULT_CHUNK}; z chunks <= {MAX_Z_CHUNK})")


def _add_registration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-shift", type=positive_float, default=None, metavar="PX",
                   help="largest correction of a stage position, in pixels (default: derived)")
    p.add_argument("--channel", type=nonnegative_int, default=0,
                   help="channel to register on (default 0)")
    p.add_argument("--register-downsample", type=positive_int, default=1, metavar="N",
                   help="search overlaps binned NxN in y and x, then refine each link at full "
                        "resolution within N+1 px: faster for large tiles, full-resolution "
                        "accuracy (default 1: no binning)")
    p.add_argument("--keep-stage-positions", action="store_true",
                   help="fuse at the stage positions when no link is accepted (default: "
                        "stop with an error, the tiles most likely do not match the layout)")
    p.add_argument("--report", default=None, metavar="REPORT.json",
                   help="write the registration report (every link and tile) as JSON")


def _add_intensity_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("intensity")
    g.add_argument("--flatfield", default=None, metavar="estimate|FLAT.tif",
                   help="divide every tile by a flat field: estimated from the tiles, or saved "
                        "by 'tilefuse flatfield'")
    g.add_argument("--darkfield", default=None, metavar="estimate|DARK.tif",
                   help="subtract a dark field first (estimate it, or a TIFF of the tile shape)")
    g.add_argument("--match-intensity", action="store_true",
                   help="per-tile gains from the overlaps so neighbours agree")


def _add_scheduler_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", default="threads", metavar="NAME",
                   help="where the work runs: threads (default), processes, distributed (a "
                        "local cluster), slurm, pbs, sge or lsf (worker jobs submitted with "
                        "dask's jobqueue.<name> settings, cancelled when the run ends; needs "
                        "tilefuse[hpc]) or the address of a running dask scheduler, e.g. "
                        "tcp://host:8786")
    p.add_argument("--workers", "--threads", dest="workers", type=positive_int, default=None,
                   help="threads, processes or local-cluster workers (default: one per core); "
                        "with slurm, pbs, sge or lsf: worker jobs (default 1)")


_EXAMPLES = {
    "tilefuse": """examples:
  tilefuse info tiles/TileConfiguration.txt
  tilefuse fuse tiles/TileConfiguration.txt -o mosaic.ome.zarr --register --pixel-size 0.65
  tilefuse COMMAND --help    (the options and examples of one command)""",
    "fuse": """examples:
  tilefuse fuse tiles/TileConfiguration.txt -o mosaic.ome.zarr --pixel-size 0.65
  tilefuse fuse stage.csv -o mosaic.ome.zarr --register --report mosaic.report.json
  tilefuse fuse tiles/ --pattern 'img_{row}_{col}.tif' --overlap 0.15 -o mosaic.ome.zarr
  tilefuse fuse scan.czi -o mosaic.ome.zarr --ngff 0.4    (zarr v2: for Fiji's N5/Zarr reader)
  tilefuse fuse cycle1.czi cycle2.czi cycle3.czi -o cycif.ome.zarr --align-channel DAPI""",
    "register": """examples:
  tilefuse register tiles/TileConfiguration.txt    (writes TileConfiguration.registered.txt)
  tilefuse register stage.csv -o registered.csv --report report.json --max-shift 40
  tilefuse register cycle1.csv cycle2.csv -o reg.csv    (reg.csv, reg.cycle2.csv: aligned)
  tilefuse preview stage.csv -o links.png --report report.json    (then look at the links)""",
    "preview": """examples:
  tilefuse preview tiles/TileConfiguration.txt -o layout.png
  tilefuse preview stage.csv -o links.png --report report.json    (links coloured by NCC)
  tilefuse preview mosaic.ome.zarr -o mosaic.png --max-size 2048""",
    "flatfield": """examples:
  tilefuse flatfield tiles/TileConfiguration.txt -o flat.tif
  tilefuse flatfield scan.czi -o flat.tif --darkfield --sample 128
  tilefuse fuse scan.czi -o mosaic.ome.zarr --flatfield flat.tif    (use it)""",
    "info": """examples:
  tilefuse info tiles/TileConfiguration.txt
  tilefuse info scan.czi --chunk 1024 --workers 16    (memory of that run)
  tilefuse info tiles/ --pattern 'img_p{index}.tif' --grid 5x4""",
}
"""The examples under each ``--help``."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line naming the option and what it expects, not the
    usage block first (that is under ``--help``)."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())  # one line, whatever argparse wrapped
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tilefuse", description="Fuse overlapping microscope tiles into an OME-Zarr mosaic.",
        epilog=_EXAMPLES["tilefuse"], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tilefuse {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fuse = sub.add_parser("fuse", help="fuse a layout into a multiscale OME-Zarr mosaic")
    _add_layout_options(fuse, cycles=True)
    fuse.add_argument("--channel-names", nargs="+", default=(), metavar="NAME",
                      help="with several inputs: the output's channel names, one per channel "
                           "of every cycle (default 'NAME (cycle K)')")
    _add_chunk_option(fuse)
    fuse.add_argument("-o", "--output", required=True,
                      help="output: mosaic.ome.zarr (a folder) or mosaic.ome.tif")
    fuse.add_argument("--register", action="store_true",
                      help="refine the positions from the image content before fusing")
    _add_registration_options(fuse)
    fuse.add_argument("--blend", choices=BLENDS, default="linear",
                      help="how overlaps combine (default linear: cosine feathering)")
    fuse.add_argument("--blend-width", type=positive_float, default=None, metavar="PX",
                      help="feathering width in pixels (default: the median overlap)")
    fuse.add_argument("--fill", type=float, default=0,
                      help="value where no tile is, within the output dtype (default 0)")
    fuse.add_argument("--dtype", type=dtype_name, default=None,
                      help="output dtype: uint8, uint16, uint32, int8, int16, int32, float32 or "
                           "float64 (default: the tiles')")
    fuse.add_argument("--ngff", choices=NGFF_VERSIONS, default="0.5",
                      help="OME-Zarr version: 0.5 (zarr v3, default) or 0.4 (zarr v2)")
    fuse.add_argument("--levels", type=positive_int, default=None,
                      help="pyramid levels incl. full resolution (default: until one chunk)")
    fuse.add_argument("--shard", type=positive_int, nargs="+", default=None, metavar="N",
                      help="sharded zarr v3 output: shard size in pixels, one value or one per "
                           "axis, a multiple of the chunk; many chunks per file (default: one "
                           "file per chunk; `tilefuse info` says when sharding helps)")
    fuse.add_argument("--format", choices=FORMATS, default=None,
                      help="output format (default: by the name: NAME.ome.tif is a pyramidal "
                           "OME-TIFF for QuPath/OMERO, anything else OME-Zarr)")
    fuse.add_argument("--bdv", action="store_true",
                      help="also write NAME.xml beside NAME.ome.zarr: a BigStitcher/"
                           "BigDataViewer dataset.xml that opens the fused image in Fiji")
    _add_intensity_options(fuse)
    _add_scheduler_options(fuse)
    fuse.add_argument("--resume", action="store_true",
                      help="continue an interrupted run of the same command into OUTPUT")
    fuse.add_argument("--cache-mb", type=positive_int, default=None,
                      help=f"decoded-tile cache per process in MiB (default {_CACHE_MB}, or "
                           "four chunk reads of the largest tiles when more, up to a quarter of "
                           "--memory-limit)")
    fuse.add_argument("--backend", choices=BACKENDS, default="auto",
                      help="chunk kernel: numba (compiled) or numpy; auto (default) takes numba "
                           "for rotated tiles and mosaics over 256 MPix; same mosaic either way")
    fuse.add_argument("--memory-limit", default="0.5", metavar="BYTES",
                      help="memory budget: picks the chunk size when --chunk is not given, "
                           "warns when it is (e.g. 8GB; default 0.5 = half of the job's "
                           "memory: RAM, cgroup or SLURM limit)")
    fuse.add_argument("--overwrite", action="store_true",
                      help="replace an output that tilefuse wrote before (never other files)")
    fuse.add_argument("-q", "--quiet", action="store_true",
                      help="only the summary: no progress bar, no registration details")

    reg = sub.add_parser("register", help="refine tile positions from the image content")
    _add_layout_options(reg, cycles=True)
    reg.add_argument("-o", "--output", default=None, metavar="LAYOUT",
                     help="registered TileConfiguration (default: NAME.registered.txt beside "
                          "the input, as Fiji names it)")
    _add_registration_options(reg)
    _add_scheduler_options(reg)
    reg.add_argument("--overwrite", action="store_true",
                     help="replace an existing registered layout or report (never an input)")
    reg.add_argument("-q", "--quiet", action="store_true",
                     help="print nothing: no progress bar, no summary")

    prev = sub.add_parser("preview", help="a picture of the mosaic with tile outlines and links")
    _add_layout_options(prev)
    prev.add_argument("-o", "--output", required=True, help="PNG file to write")
    prev.add_argument("--report", default=None, metavar="REPORT.json",
                      help="registration report: colour links by NCC, mark stage placements")
    prev.add_argument("--max-size", type=positive_int, default=1024,
                      help="longest side of the picture in pixels (default 1024)")
    prev.add_argument("--overwrite", action="store_true", help="replace an existing picture")

    flat = sub.add_parser("flatfield", help="estimate a flat field from the tiles and save it")
    _add_layout_options(flat)
    flat.add_argument("-o", "--output", required=True, help="TIFF to write (flat, then dark)")
    flat.add_argument("--darkfield", action="store_true", help="also estimate a dark field")
    flat.add_argument("--sample", type=positive_int, default=64,
                      help="tiles sampled for the estimate (default 64)")
    flat.add_argument("--overwrite", action="store_true", help="replace an existing TIFF")
    flat.add_argument("-q", "--quiet", action="store_true",
                      help="only the summary: no progress bar")

    info = sub.add_parser("info", help="describe a layout: tiles, mosaic size, overlaps, memory")
    _add_layout_options(info)
    _add_chunk_option(info)
    info.add_argument("--workers", "--threads", dest="workers", type=positive_int, default=None,
                      help="threads the memory estimate is for (default: one per core)")
    info.add_argument("--cache-mb", type=positive_int, default=None,
                      help="decoded-tile cache per process in MiB the estimate is for "
                           f"(default: what fuse takes, {_CACHE_MB} or more for large tiles)")
    info.add_argument("--backend", choices=BACKENDS, default="auto",
                      help="chunk kernel the memory estimate is for (default auto)")
    for name, command in sub.choices.items():  # examples under every command's --help
        command.epilog = _EXAMPLES.get(name)
        command.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (poll reports an error)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # not a file descriptor (tests, IDEs)
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tilefuse`` command; returns the exit status."""
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)  # --help, malformed options end here, quickly
    if unknown:  # named with its command, not with the top-level usage
        parser.exit(2, f"tilefuse {args.command}: error: unrecognized arguments: "
                       f"{' '.join(unknown)} (see 'tilefuse {args.command} --help')\n")
    from tilefuse.cli.commands import COMMANDS

    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # this process is ours: reuse freed blocks (see tilefuse.cli.allocator); and so do the
    # dask workers it starts (not needed, and dask not imported, on the local schedulers)
    retain_freed_memory(workers=getattr(args, "scheduler", "threads") not in _NO_NANNY)
    if not args.verbose:  # decoders' own complaints become our one-line errors instead
        for name in ("tifffile", "imageio", "PIL"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        status = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError as exc:
        if not _stdout_closed():  # a broken pipe elsewhere (a dead worker): an error
            print(f"tilefuse {args.command}: error: {exc}", file=sys.stderr)
            return 2
        # `tilefuse info ... | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        return 0
    except USER_ERRORS as exc:
        print(f"tilefuse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only folder, a name too long: one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"tilefuse {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"tilefuse: interrupted{exc}", file=sys.stderr)
        return 130


def run() -> int:
    """The ``tilefuse`` console script (and ``python -m tilefuse``): :func:`main`, then the
    objects it made are left to the process's end (``gc.freeze``). The interpreter's last
    garbage collection would otherwise walk them all only for the process to exit: ~25 ms of
    every command, and 0.3-0.45 s once numba has loaded the compiled kernel (its type system
    makes that many objects). A caller of :func:`main` in its own process keeps its collector
    as is."""
    status = main()
    gc.freeze()
    return status


if __name__ == "__main__":
    sys.exit(run())
