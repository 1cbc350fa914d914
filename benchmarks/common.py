"""Shared by the benchmark scripts: timed child processes (JSON + peak RSS) and result tables."""

from __future__ import annotations

import json
import re
import subprocess

__all__ = ["print_table", "run_timed"]

_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")


def run_timed(cmd: list[str]) -> dict:
    """Run ``cmd`` (which prints one JSON object as its last stdout line) under ``time -v``.

    Returns
    -------
    dict
        The child's JSON plus ``peak_rss_mb``; or ``{"error": last stderr line}`` on failure.
    """
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines()
                 if ln.strip() and "\t" not in ln and not ln.startswith("Command exited")]
        return {"error": (lines[-1] if lines else "failed")[:300]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rss = _RSS.search(proc.stderr)
    result["peak_rss_mb"] = int(rss.group(1)) / 1024 if rss else float("nan")
    return result


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
