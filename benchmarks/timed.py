"""Run a benchmark child process under ``/usr/bin/time -v``: its JSON result and peak RSS."""

from __future__ import annotations

import json
import re
import subprocess

__all__ = ["run_timed"]

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
