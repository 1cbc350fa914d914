"""Shared by the benchmark scripts: timed child processes (JSON + peak RSS) and result tables."""

from __future__ import annotations

import argparse
import json
import re
import subprocess

__all__ = ["grid_parser", "parse_grid", "print_table", "run_timed", "run_wall"]

_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
_ELAPSED = re.compile(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): "
                      r"(?:(\d+):)?(\d+):([\d.]+)")


def _failure(proc: subprocess.CompletedProcess) -> dict:
    """``{"error": the child's last stderr line}``, ``time -v``'s own lines left out."""
    lines = [ln for ln in proc.stderr.splitlines()
             if ln.strip() and "\t" not in ln and not ln.startswith("Command exited")]
    return {"error": (lines[-1] if lines else "failed")[:300]}


def run_timed(cmd: list[str]) -> dict:
    """Run ``cmd`` (which prints one JSON object as its last stdout line) under ``time -v``.

    Returns
    -------
    dict
        The child's JSON plus ``peak_rss_mb``; or ``{"error": last stderr line}`` on failure.
    """
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        return _failure(proc)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rss = _RSS.search(proc.stderr)
    result["peak_rss_mb"] = int(rss.group(1)) / 1024 if rss else float("nan")
    return result


def run_wall(cmd: list[str]) -> dict:
    """Run ``cmd`` as a whole process under ``time -v``: its wall clock, start-up included.

    Returns
    -------
    dict
        ``seconds`` (elapsed wall clock, as ``time`` reports it: 10 ms steps) and
        ``peak_rss_mb``; or ``{"error": last stderr line}`` on failure.
    """
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        return _failure(proc)
    elapsed, rss = _ELAPSED.search(proc.stderr), _RSS.search(proc.stderr)
    if elapsed is None or rss is None:
        return {"error": "no timing from /usr/bin/time -v"}
    hours, minutes, seconds = elapsed.groups()
    return {"seconds": int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds),
            "peak_rss_mb": int(rss.group(1)) / 1024}


def print_table(rows: dict, columns: list[tuple[str, str, str]], *, width: int = 12) -> None:
    """Print one row per entry of ``rows``; failed entries (``{"error": ...}``) say why.

    Parameters
    ----------
    rows : dict of name -> dict
        The results, one per variant or tool.
    columns : list of (header, key, format)
        E.g. ``("seconds", "seconds", ".2f")``; a missing value prints as ``-``.
    """
    print(f"{'':<{width}}" + "".join(f"{header:>13}" for header, _, _ in columns))
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<{width}}  failed: {row['error']}")
            continue
        cells = [format(row[key], fmt) if row.get(key) is not None else "-"
                 for _, key, fmt in columns]
        print(f"{name:<{width}}" + "".join(f"{c:>13}" for c in cells))


def parse_grid(text: str) -> tuple[int, int]:
    """``"8x8"`` -> ``(8, 8)``."""
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid {text!r}: expected ROWSxCOLS, e.g. 8x8") from None
    return rows, cols


def grid_parser(doc: str, *, grid: str, tile: int | None = None,
                seed: int | None = None) -> argparse.ArgumentParser:
    """The options every tile-set benchmark shares: ``--grid`` (parsed to (rows, cols)) and,
    when given defaults, ``--tile`` (side in pixels) and ``--seed``.

    Parameters
    ----------
    doc : str
        The script's docstring; its first line describes the script.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--grid", type=parse_grid, default=grid, help=f"ROWSxCOLS (default {grid})")
    if tile is not None:
        parser.add_argument("--tile", type=int, default=tile, help=f"tile side (default {tile})")
    if seed is not None:
        parser.add_argument("--seed", type=int, default=seed)
    return parser
