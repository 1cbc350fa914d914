"""Are two versions of tilefuse bit-identical? Fuse the same inputs with this checkout and with a
git revision, and compare every chunk file byte for byte.

    python benchmarks/compare_outputs.py --before 943882d

The revision is checked out into a temporary git worktree and run with ``PYTHONPATH`` pointing at
its ``src``; both run the ``tilefuse fuse`` command of their own version with the same options.
Cases: the MIST 5x5 phase-contrast set (pattern, registration), the two-channel Leica set, a
synthetic grid at fractional positions (linear and max blends, numpy and numba kernels), and the
same grid rotated 1 degree. Exit status 1 when any chunk differs.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def _cases(work: Path) -> dict[str, list[str]]:
    from tilefuse.testing import grid_tileset, write_tileset

    ts = grid_tileset(grid=(3, 4), tile_shape=(300, 400), overlap=0.1, position_error=7,
                      fractional=True, seed=4)
    synthetic = write_tileset(ts, work / "synthetic", stage=False)
    mist = DATA / "mist_phase_5x5" / "tiles"
    leica = DATA / "leica_confocal_2tiles/experiment--test/slide--S00/chamber--U00--V00"
    return {
        "mist-register": [str(mist), "--pattern", "ImageName_t01_p{index}.tif", "--grid", "5x5",
                          "--order", "column-major", "--overlap", "0.06", "--register",
                          "--chunk", "256"],
        "leica-2-channels": [str(leica), "--pattern", "field--X{col}--Y{row}/image--L00--S00--U00"
                             "--V00--J20--E00--O00--X{col}--Y{row}--T00--Z00--C{channel}.ome.tif",
                             "--overlap", "0.1", "--chunk", "256"],
        "linear-numba": [str(synthetic), "--chunk", "256", "--backend", "numba"],
        "linear-numpy": [str(synthetic), "--chunk", "256", "--backend", "numpy"],
        "max": [str(synthetic), "--chunk", "256", "--blend", "max"],
        "rotated-1deg": [str(synthetic), "--chunk", "256", "--rotate", "1"],
    }


def _fuse(src: Path | None, args: list[str], out: Path) -> None:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    command = [sys.executable, "-m", "tilefuse", "fuse", *args, "-o", str(out), "-q"]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")


def _chunk_files(image: Path) -> dict[str, Path]:
    """Every file of every level (not the group metadata, which names versions and paths)."""
    return {str(p.relative_to(image)): p for p in sorted(image.rglob("*"))
            if p.is_file() and p.parts[len(image.parts)].isdigit()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision to compare with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tree = work / "before"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(tree), args.before],
                       cwd=ROOT, check=True)
        try:
            return _compare(work, tree / "src")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                           check=True)


def _compare(work: Path, before_src: Path) -> int:
    differ = 0
    for name, case in _cases(work).items():
        old, new = work / f"{name}-before.ome.zarr", work / f"{name}-after.ome.zarr"
        _fuse(before_src, case, old)
        _fuse(None, case, new)
        a, b = _chunk_files(old), _chunk_files(new)
        same = a.keys() == b.keys() and all(filecmp.cmp(a[k], b[k], shallow=False) for k in a)
        differ += not same
        print(f"{name:18s} {len(a):5d} chunk files  {'identical' if same else 'DIFFER'}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
