"""Cyclic imaging: tilefuse against ASHLAR 1.20 on the same cycles, with and without rotation.

    python benchmarks/bench_cycles.py [--grid 4x5] [--tile 512] [--cycles 3] [--repeats 2]

Two synthetic acquisitions with exact truth (``tilefuse.testing.cycle_tilesets``: the same
nuclei in channel 0 "DAPI" of every cycle with a per-cycle gain and offset, one marker channel per
cycle, ±2 px stage error per tile, 1% noise): "rotated", where cycles 2.. are turned by up to
1 degree and shifted by up to 50 px as a whole, and "shifted", the same without rotation. Each
cycle is written as one folder of single-channel TIFF tiles ``img_r{row}_c{col}_ch{channel}.tif``
plus a TileConfiguration.txt that lists the same files. Both tools get the same information: the
files and the stage layout, a regular grid (``step = round(tile * (1 - overlap))``), which
ASHLAR's FilePatternReader derives from the pattern and the overlap, and which the
TileConfiguration states; the stage error is only in the truth.

tilefuse  ``tilefuse fuse c1/TileConfiguration.txt c2/... -o out.ome.zarr --register -q``
ashlar    ASHLAR 1.20's own steps (``ashlar/scripts/ashlar.py``): ``FilePatternReader`` per
          cycle, ``EdgeAligner`` on cycle 1, ``LayerAligner`` for the others, ``Mosaic`` +
          ``PyramidWriter`` to ``out.ome.tif``; max shift 30 px (ASHLAR's default, 15, would
          throw away the tiles that a 1 degree rotation moves farthest).

Each tool runs as its own process under ``/usr/bin/time -v`` (ASHLAR from benchmarks/.venv-reg,
which ``make bench`` creates); rounds interleave the tools. Seconds = the whole process (start,
imports, registration, fusion, writing), median over ``--repeats``; peak RSS = the largest.

Alignment error, measured the same way on both outputs, independent of either tool: in each
fused mosaic, cycle k's DAPI against cycle 1's DAPI on a grid of 128² patches that both cover,
local shift by sub-pixel phase correlation (scikit-image, ``upsample_factor=20``); per cycle the
RMS over patches, and the largest patch shift of any cycle. "truth RMS" is the error of the
tile placements themselves against the exact truth (``cycle_alignment_error``, per cycle, the
worst cycle shown) where the tool's placements are known: ASHLAR's aligner positions, tilefuse's
per-cycle layouts when its output records them. Results: benchmarks/results/cycles.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import grid_parser, print_table

HERE = Path(__file__).resolve().parent
REG_PYTHON = HERE / ".venv-reg" / "bin" / "python"
PATTERN = "img_r{row:03}_c{col:03}_ch{channel}.tif"
ASHLAR_MAX_SHIFT = 30.0  # px (pixel size 1): covers a 1 degree turn's travel at the corners
PATCH = 128  # side of the patches the alignment error is measured on
UPSAMPLE = 20  # sub-pixel factor of the phase correlation
TOOLS = ("ashlar", "tilefuse")
_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
_TILE_NAME = re.compile(r"img_r(\d+)_c(\d+)_ch")


# ------------------------------------------------------------------------------- the data


def write_cycles(folder: Path, args: argparse.Namespace, rotated: bool):
    """Render the cycles and write them as TIFF tiles + TileConfiguration, one folder each.

    Returns the ``CycleSet`` (truth) and the per-cycle folders.
    """
    import tifffile

    from tilefuse.testing import cycle_tilesets

    rotations = None if rotated else [0.0] * args.cycles
    cs = cycle_tilesets(n_cycles=args.cycles, grid=args.grid, tile_shape=(args.tile, args.tile),
                        overlap=args.overlap, max_rotation_deg=1.0, max_shift_px=50.0,
                        stage_error_px=2.0, noise=0.01, rotations_deg=rotations,
                        channels_per_cycle=2, seed=args.seed)
    folders = []
    for k, layout in enumerate(cs.layouts, 1):
        sub = folder / f"cycle{k}"
        sub.mkdir(parents=True)
        lines = [f"# tilefuse.channels = {json.dumps(list(layout.channels))}", "dim = 2"]
        for i, tile in enumerate(layout.tiles):
            row, col = divmod(i, args.grid[1])
            names = [PATTERN.format(row=row, col=col, channel=c)
                     for c in range(len(layout.channels))]
            for name, plane in zip(names, tile.source.read(), strict=True):
                tifffile.imwrite(sub / name, plane)
            y, x = (float(v) for v in tile.position)
            lines.append(f"{names[0]}; ; ({x!r}, {y!r})")
            lines.append(f"# tilefuse.tile = {json.dumps({'more_files': names[1:]})}")
        (sub / "TileConfiguration.txt").write_text("\n".join(lines) + "\n")
        folders.append(sub)
    return cs, folders


def ashlar_overlap(cs, cols: int) -> float:
    """The overlap that makes ASHLAR's grid ``(row, col) * tile * (1 - overlap)`` the stage
    layout; refuses a stage layout that is not that grid in every cycle."""
    first = cs.layouts[0].tiles[0]
    step = float(cs.layouts[0].tiles[1].position[1] - first.position[1])
    overlap = 1.0 - step / first.shape[1]
    for k, layout in enumerate(cs.layouts, 1):
        stage = np.array([t.position for t in layout.tiles]) - first.position
        rc = np.array([divmod(i, cols) for i in range(len(layout.tiles))], dtype=float)
        grid = rc * np.asarray(first.shape) * (1 - overlap)
        if not np.allclose(stage, grid, atol=1e-9):
            raise SystemExit(f"cycle {k}: the stage layout is not a regular grid, which is all "
                             "ASHLAR's FilePatternReader can be told")
    return overlap


# ---------------------------------------------------------------------- one tool per process


def child_ashlar(folders: list[Path], out: Path, overlap: float) -> dict:
    """ASHLAR 1.20 as its ``process_single`` runs it; stdout (its progress) goes to stderr."""
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        from ashlar import filepattern, reg

        readers = [filepattern.FilePatternReader(str(f), PATTERN, overlap, 1.0) for f in folders]
        edge = reg.EdgeAligner(readers[0], channel=0, max_shift=ASHLAR_MAX_SHIFT)
        edge.run()
        shape = edge.mosaic_shape
        mosaics = [reg.Mosaic(edge, shape)]
        positions = [edge.positions.tolist()]
        for reader in readers[1:]:
            layer = reg.LayerAligner(reader, edge, channel=0, max_shift=ASHLAR_MAX_SHIFT)
            layer.run()
            mosaics.append(reg.Mosaic(layer, shape))
            positions.append(layer.positions.tolist())
        edge.reader = edge.reader.reader  # as ashlar.py: no tile cache while writing
        reg.PyramidWriter(mosaics, str(out)).run()
    return {"work_s": time.perf_counter() - started, "positions": positions}


def run_process(cmd: list[str]) -> dict:
    """Run ``cmd`` under ``time -v``: wall seconds, peak RSS and its last stdout line's JSON."""
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines()
                 if ln.strip() and "\t" not in ln and not ln.startswith("Command exited")]
        return {"error": (lines[-1] if lines else "failed")[:300]}
    result: dict = {}
    last = proc.stdout.strip().splitlines()[-1:] or [""]
    if last[0].startswith("{"):
        result = json.loads(last[0])
    rss = _RSS.search(proc.stderr)
    result["seconds"] = seconds
    result["peak_rss_mb"] = int(rss.group(1)) / 1024 if rss else float("nan")
    return result


def run_tool(tool: str, folders: list[Path], out: Path, overlap: float) -> dict:
    if tool == "ashlar":
        if not REG_PYTHON.exists():
            return {"error": "benchmarks/.venv-reg missing (make bench creates it)"}
        return run_process([str(REG_PYTHON), __file__, "--child", "ashlar", "--out", str(out),
                            "--ashlar-overlap", repr(overlap), *map(str, folders)])
    tilefuse = Path(sys.executable).with_name("tilefuse")
    return run_process([str(tilefuse), "fuse", *(str(f / "TileConfiguration.txt")
                                                 for f in folders),
                        "-o", str(out), "--register", "-q"])


# ------------------------------------------------------------------------ the error measure


def read_mosaic(path: Path) -> tuple[np.ndarray, list[str]]:
    """Level 0 of a fused output as ``(c, y, x)`` and its channel names (empty if none)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path, series=0, level=0), []
    import zarr

    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    attrs = attrs.get("ome", attrs)
    multiscale = attrs["multiscales"][0]
    axes = [a["name"] for a in multiscale["axes"]]
    data = np.asarray(group[multiscale["datasets"][0]["path"]][...])
    keep = tuple(slice(None) if a in ("c", "y", "x") else 0 for a in axes)
    data = data[keep]
    if "c" not in axes:
        data = data[None]
    names = [ch.get("label", "") for ch in attrs.get("omero", {}).get("channels", [])]
    return data, names


def dapi_planes(data: np.ndarray, names: list[str], n_cycles: int) -> list[np.ndarray]:
    """Each cycle's DAPI plane: by name when the channels are named, else cycle after cycle."""
    dapi = [i for i, n in enumerate(names) if "dapi" in n.lower()]
    if len(dapi) != n_cycles:
        per_cycle = data.shape[0] // n_cycles
        dapi = [k * per_cycle for k in range(n_cycles)]
    return [data[i] for i in dapi]


def _covered(patch: np.ndarray) -> bool:
    """Inside the mosaic: at most 1% fill (0) pixels (a few zeros are interpolation artefacts)."""
    return patch.size > 0 and np.count_nonzero(patch == 0) <= 0.01 * patch.size


def _local_shift(ref: np.ndarray, mov: np.ndarray, y: int, x: int, patch: int) -> np.ndarray:
    """(y, x) shift of ``mov`` against ``ref`` at the patch ``[y:y+patch, x:x+patch]``.

    Hann-windowed cross-correlation (not phase-normalised: with independent noise the window's
    edge makes a false peak at zero shift), then again on ``mov``'s patch moved by the whole
    pixels found, so the window's pull towards zero on large shifts does not bias the result.
    """
    from skimage.registration import phase_cross_correlation

    window = np.outer(np.hanning(patch), np.hanning(patch))

    def measure(b: np.ndarray) -> np.ndarray:
        a = ref[y:y + patch, x:x + patch].astype(np.float64)
        b = b.astype(np.float64)
        shift, _, _ = phase_cross_correlation((a - a.mean()) * window, (b - b.mean()) * window,
                                              upsample_factor=UPSAMPLE, normalization=None)
        return np.asarray(shift, dtype=float)

    first = measure(mov[y:y + patch, x:x + patch])
    dy, dx = (int(v) for v in np.rint(first))
    if y - dy < 0 or x - dx < 0:
        return first
    moved = mov[y - dy:y - dy + patch, x - dx:x - dx + patch]
    if moved.shape != (patch, patch) or not _covered(moved):
        return first
    return np.array([dy, dx], dtype=float) + measure(moved)


def patch_shifts(ref: np.ndarray, mov: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """Local (y, x) shift of ``mov`` against ``ref`` on each ``patch``² patch both cover.

    Parameters
    ----------
    ref, mov : numpy.ndarray, shape (y, x)
        The same channel of two cycles in one fused mosaic, 0 = fill.
    patch : int

    Returns
    -------
    corners, shifts : numpy.ndarray, each shape (n_patches, 2)
        Top-left corner and (y, x) shift of each patch that both cover (see ``_covered``) and
        where both have texture (standard deviation at least a quarter of the median over such
        patches). The shift is ``phase_cross_correlation``'s: ``ref[p] ~ mov[p - shift]``.
    """
    boxes, spreads = [], []
    for y in range(0, ref.shape[0] - patch + 1, patch):
        for x in range(0, ref.shape[1] - patch + 1, patch):
            a, b = ref[y:y + patch, x:x + patch], mov[y:y + patch, x:x + patch]
            if _covered(a) and _covered(b):
                boxes.append((y, x))
                spreads.append((a.std(), b.std()))
    if not boxes:
        return np.zeros((0, 2)), np.zeros((0, 2))
    spread = np.asarray(spreads)
    textured = np.all(spread >= 0.25 * np.median(spread, axis=0), axis=1)
    corners = np.asarray(boxes, dtype=float)[textured].reshape(-1, 2)
    shifts = [_local_shift(ref, mov, int(y), int(x), patch) for y, x in corners]
    return corners, np.asarray(shifts).reshape(-1, 2)


def check_measure(image: np.ndarray, seed: int = 0) -> dict:
    """The error measure on a known truth: ``image`` against a copy turned by 0.8 degrees about
    its centre and shifted by (3.3, -6.7) px, with a gain, an offset and new noise; returns the
    largest deviation (px) of a patch shift from the exact displacement at the patch centre."""
    from scipy import ndimage

    ref = image.astype(np.float64)
    theta, shift = np.deg2rad(0.8), np.array([3.3, -6.7])
    turn = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    centre = (np.asarray(ref.shape) - 1) / 2
    # mov[p] = ref[turn @ (p - centre) + centre - shift], 0 outside
    mov = ndimage.affine_transform(ref, turn, offset=centre - turn @ centre - shift, order=3)
    inside = mov > 0
    rng = np.random.default_rng(seed)
    mov = np.where(inside, np.clip(0.8 * mov + 2000 + rng.normal(0, 600, mov.shape), 1, None), 0)
    corners, got = patch_shifts(ref, mov)
    q = corners + (PATCH - 1) / 2  # patch centres in ref; the same content in mov is at p
    p = (q - centre + shift) @ np.linalg.inv(turn).T + centre
    deviation = np.linalg.norm(got - (q - p), axis=1)
    if not deviation.size:
        return {"patches": 0, "rms_px": float("nan"), "max_px": float("nan")}
    return {"patches": int(deviation.size), "rms_px": float(np.sqrt(np.mean(deviation**2))),
            "max_px": float(deviation.max())}


def stage_mosaic(layout) -> np.ndarray:
    """Channel 0 of ``layout``'s tiles pasted at their (whole-pixel) stage positions, (y, x)."""
    positions = np.rint([t.position for t in layout.tiles]).astype(int)
    positions -= positions.min(axis=0)
    shape = (positions + [t.shape for t in layout.tiles]).max(axis=0)
    out = np.zeros(tuple(shape), dtype=np.uint16)
    for (y, x), tile in zip(positions, layout.tiles, strict=True):
        out[y:y + tile.shape[0], x:x + tile.shape[1]] = tile.source.read()[0]
    return out


def image_errors(out: Path, n_cycles: int) -> dict:
    """Per cycle RMS (px) of the DAPI patch shifts against cycle 1, the largest, the counts."""
    data, names = read_mosaic(out)
    planes = dapi_planes(data, names, n_cycles)
    rms, worst, counts = [], 0.0, []
    for plane in planes[1:]:
        dist = np.linalg.norm(patch_shifts(planes[0], plane)[1], axis=1)
        counts.append(int(dist.size))
        rms.append(float(np.sqrt(np.mean(dist**2))) if dist.size else float("nan"))
        worst = max(worst, float(dist.max()) if dist.size else float("nan"))
    return {"rms_px": rms, "max_px": worst, "patches": counts, "mosaic_shape": data.shape[1:]}


def ashlar_affines(positions: list) -> list[np.ndarray]:
    """ASHLAR's per-cycle tile positions ((y, x) per tile) as translation affines (n, 3, 3)."""
    out = []
    for cycle in positions:
        affines = np.tile(np.eye(3), (len(cycle), 1, 1))
        affines[:, :2, 2] = cycle
        out.append(affines)
    return out


def tilefuse_affines(out: Path, cs, cols: int) -> list[np.ndarray] | None:
    """The per-cycle layouts tilefuse saved next to ``out`` (``out.TileConfiguration.txt`` for
    cycle 1, ``out.cycleK.layout.csv``), as affines (n, 3, 3) in the generator's tile order;
    None when they are not there."""
    from tilefuse import read_layout

    stem = out.name.split(".")[0]
    files = [out.with_name(f"{stem}.TileConfiguration.txt")]
    files += [out.with_name(f"{stem}.cycle{k}.layout.csv") for k in range(2, len(cs.layouts) + 1)]
    if not all(f.exists() for f in files):
        return None
    result = []
    for f, truth in zip(files, cs.layouts, strict=True):
        affines = np.full((len(truth.tiles), 3, 3), np.nan)
        for tile in read_layout(f).tiles:
            row, col = (int(v) for v in _TILE_NAME.search(tile.name).groups())
            affines[row * cols + col] = tile.affine
        result.append(affines)
    return result


def truth_errors(affines: list[np.ndarray], cs) -> list[float]:
    """``cycle_alignment_error`` of per-cycle tile affines (tile px -> output mosaic px)."""
    from dataclasses import replace

    from tilefuse.testing import cycle_alignment_error

    aligned = [replace(layout, tiles=tuple(replace(t, affine=a)
                                           for t, a in zip(layout.tiles, cycle, strict=True)))
               for layout, cycle in zip(cs.layouts, affines, strict=True)]
    return cycle_alignment_error(aligned, cs)


# ----------------------------------------------------------------------------------- main


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"]}
    row = {"seconds": statistics.median(r["seconds"] for r in ok),
           "seconds_all": [r["seconds"] for r in ok],
           "peak_rss_mb": max(r["peak_rss_mb"] for r in ok)}
    if len(ok) < len(runs):
        row["failed_runs"] = len(runs) - len(ok)
    for key in ("rms_px", "max_px", "patches", "truth_rms_px", "mosaic_shape"):
        if key in ok[0]:
            row[key] = ok[0][key]
    for k, value in enumerate(row.get("rms_px", [])[:2], 2):
        row[f"rms_c{k}"] = value
    if row.get("truth_rms_px"):
        row["truth_worst"] = max(row["truth_rms_px"])
    return row


def run_rounds(sets: dict, args: argparse.Namespace, work: Path) -> dict:
    """Every tool on every set, ``args.repeats`` rounds, interleaved; errors from round 1."""
    runs: dict = {(tool, name): [] for name in sets for tool in TOOLS}
    for repeat in range(args.repeats):
        for name, s in sets.items():
            for tool in TOOLS:
                place = work / name / tool
                shutil.rmtree(place, ignore_errors=True)
                place.mkdir()
                out = place / ("out.ome.tif" if tool == "ashlar" else "out.ome.zarr")
                result = run_tool(tool, s["folders"], out, s["overlap"])
                print(f"round {repeat + 1}: {tool:<9} {name:<8} "
                      + (f"{result['seconds']:.1f} s" if "error" not in result
                         else f"failed: {result['error']}"), flush=True)
                positions = result.pop("positions", None)
                if repeat == 0 and "error" not in result:
                    result.update(image_errors(out, args.cycles))
                    affines = (ashlar_affines(positions) if tool == "ashlar"
                               else tilefuse_affines(out, s["cs"], args.grid[1]))
                    if affines is not None:
                        result["truth_rms_px"] = truth_errors(affines, s["cs"])
                runs[(tool, name)].append(result)
    return runs


def main() -> int:
    p = grid_parser(__doc__, grid="4x5", tile=512, seed=3)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--overlap", type=float, default=0.15)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ashlar-overlap", type=float, help=argparse.SUPPRESS)
    p.add_argument("folders", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "ashlar":
        print(json.dumps(child_ashlar(args.folders, args.out, args.ashlar_overlap)))
        return 0
    load = [os.getloadavg()[0]]
    work = Path(tempfile.mkdtemp(prefix="tilefuse-cyclebench-"))
    try:
        sets: dict = {}
        for name in ("rotated", "shifted"):
            cs, folders = write_cycles(work / name, args, rotated=name == "rotated")
            sets[name] = {"cs": cs, "folders": folders,
                          "overlap": ashlar_overlap(cs, args.grid[1])}
        check = check_measure(stage_mosaic(sets["rotated"]["cs"].layouts[0]))
        runs = run_rounds(sets, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load.append(os.getloadavg()[0])
    rows = {f"{tool} {name}": summarise(r) for (tool, name), r in runs.items()}
    g, t = args.grid, args.tile
    print(f"\n{args.cycles} cycles x {g[0]}x{g[1]} tiles of {t}² uint16, 2 channels per cycle, "
          "±2 px stage error, 1% noise. Both tools read the same TIFF tiles and the same stage "
          f"layout (the regular grid). Seconds: median of {args.repeats} runs of the whole "
          f"process; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end "
          f"(on {os.cpu_count()} cores).")
    for name, s in sets.items():
        cs = s["cs"]
        turns = ", ".join(f"{a:+.2f}°" for a in cs.rotations_deg[1:])
        moves = ", ".join(f"({y:+.1f}, {x:+.1f})" for y, x in cs.shifts_px[1:])
        print(f"  {name}: cycles 2.. turned {turns}, shifted (y, x) px {moves}")
    print(f"RMS cK: local shifts of cycle K's DAPI against cycle 1's in the fused output "
          f"({PATCH}² patches, phase correlation); max: the largest; truth RMS: the tile "
          "placements against the exact truth, worst cycle.")
    print(f"Error measure checked on a known 0.8° turn + (3.3, -6.7) px shift: deviation RMS "
          f"{check['rms_px']:.3f} px, max {check['max_px']:.3f} px over {check['patches']} "
          "patches.\n")
    print_table(rows, [("seconds", "seconds", ".1f"), ("peak RSS MB", "peak_rss_mb", ".0f"),
                       ("RMS c2 px", "rms_c2", ".3f"), ("RMS c3 px", "rms_c3", ".3f"),
                       ("max px", "max_px", ".2f"), ("truth RMS px", "truth_worst", ".3f")],
                width=18)
    (HERE / "results").mkdir(exist_ok=True)
    path = HERE / "results" / "cycles.json"
    path.write_text(json.dumps({
        "grid": g, "tile": t, "cycles": args.cycles, "repeats": args.repeats,
        "sets": {n: {"rotations_deg": s["cs"].rotations_deg, "shifts_px": s["cs"].shifts_px}
                 for n, s in sets.items()},
        "ashlar_max_shift_px": ASHLAR_MAX_SHIFT, "patch": PATCH, "measure_check": check,
        "load_average": load, "cpu_count": os.cpu_count(), "results": rows}, indent=2))
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
