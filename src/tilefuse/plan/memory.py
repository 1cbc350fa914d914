"""How much memory this process may use: physical RAM, cgroup limits and the SLURM allocation.

A job on a cluster node sees the node's physical RAM but is killed at its cgroup's limit, so a
budget taken from RAM alone is a promise the job cannot keep. :func:`memory_limits` reads every
source it finds and :func:`total_memory` takes the smallest:

- physical RAM and ``RLIMIT_RSS`` (what ``distributed.system.memory_limit()`` reads besides the
  root cgroup; read here directly, since importing ``distributed`` costs a quarter of a second
  of every command's start);
- the *root* cgroup and the process's *own* cgroup with each of its ancestors, from
  ``/proc/self/cgroup`` (v2: ``memory.max`` and ``memory.high``; v1:
  ``memory.limit_in_bytes``): a SLURM or systemd job without a cgroup namespace sits deep in
  the tree, where ``distributed`` does not look.
- ``SLURM_MEM_PER_NODE``, or ``SLURM_MEM_PER_CPU`` times ``SLURM_CPUS_ON_NODE`` (else
  ``SLURM_CPUS_PER_TASK``, else 1), in MiB as SLURM writes them (a K/M/G/T suffix is accepted).

The roots are module constants (:data:`CGROUP_ROOT`, :data:`PROC_CGROUP`) and parameters, so
tests can point them at a fake tree.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from tilefuse.errors import InputError

__all__ = ["CGROUP_ROOT", "PROC_CGROUP", "SYSTEM", "cgroup_limits", "memory_limits", "parse_bytes",
           "slurm_limit", "total_memory"]

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
_V2_FILES: tuple[str, ...] = ("memory.max", "memory.high")
_V1_FILES: tuple[str, ...] = ("memory.limit_in_bytes",)
_FALLBACK_BYTES = 8 * 2**30
SYSTEM = "RAM or RLIMIT_RSS"  # the key of the system's own reading
_SLURM_UNITS = {"": 2**20, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def total_memory(
    *, cgroup_root: Path | None = None, proc_cgroup: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """The memory this process may use, in bytes: the smallest of :func:`memory_limits`.

    Parameters
    ----------
    cgroup_root, proc_cgroup, environ
        As in :func:`memory_limits`.

    Returns
    -------
    int
        Bytes; 8 GiB when nothing at all can be read.
    """
    limits = memory_limits(cgroup_root=cgroup_root, proc_cgroup=proc_cgroup, environ=environ)
    return min(limits.values()) if limits else _FALLBACK_BYTES


def memory_limits(
    *, cgroup_root: Path | None = None, proc_cgroup: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Every memory limit found, by where it was read.

    Parameters
    ----------
    cgroup_root : Path, optional
        Where the cgroup file systems are mounted (default :data:`CGROUP_ROOT`).
    proc_cgroup : Path, optional
        The process's cgroup membership file (default :data:`PROC_CGROUP`).
    environ : mapping, optional
        Environment to read the SLURM variables from (default ``os.environ``).

    Returns
    -------
    dict of str -> int
        E.g. ``{SYSTEM: 25e9, "cgroup /sys/fs/cgroup/job_1/memory.max": 4e9,
        "SLURM_MEM_PER_NODE": 4e9}``: :data:`SYSTEM` is the smaller of physical RAM and
        ``RLIMIT_RSS``. Only positive limits appear.
    """
    limits = {}
    system = _system_memory()
    if system:
        limits[SYSTEM] = system
    for path, value in cgroup_limits(cgroup_root or CGROUP_ROOT,
                                     proc_cgroup or PROC_CGROUP).items():
        limits[f"cgroup {path}"] = value
    slurm = slurm_limit(os.environ if environ is None else environ)
    if slurm is not None:
        limits[slurm[0]] = slurm[1]
    return limits


def _system_memory() -> int | None:
    """Physical RAM, or ``RLIMIT_RSS`` when that is set and smaller; None if unreadable."""
    try:
        ram = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None
    try:
        import resource

        rss = resource.getrlimit(resource.RLIMIT_RSS)[0]
    except (ImportError, ValueError, OSError, AttributeError):  # not on every platform
        return ram
    return min(ram, int(rss)) if 0 < rss != resource.RLIM_INFINITY else ram


def cgroup_limits(cgroup_root: Path, proc_cgroup: Path) -> dict[str, int]:
    """Memory limits of this process's cgroups and all their ancestors.

    Parameters
    ----------
    cgroup_root : Path
        Mount point of the cgroup file systems: v2 files directly below it, v1 files below
        ``memory/``.
    proc_cgroup : Path
        Lines ``hierarchy:controllers:path`` as in ``/proc/self/cgroup`` (v2: ``0::/path``;
        v1: ``N:memory:/path``).

    Returns
    -------
    dict of str -> int
        File path -> limit in bytes, for every limit file that exists and holds a number
        (``max`` means no limit and is left out). Directories that are not mounted here (a
        container sees only its own subtree) are skipped; the root is always read.
    """
    try:
        text = Path(proc_cgroup).read_text()
    except OSError:
        text = ""
    found: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            base, names = Path(cgroup_root), _V2_FILES
        elif "memory" in controllers.split(","):
            base, names = Path(cgroup_root) / "memory", _V1_FILES
        else:
            continue
        found.update(_limits_along(base, path, names))
    for name in _V2_FILES:  # a namespaced container: its own cgroup is the root
        found.update(_read_limit(Path(cgroup_root) / name))
    found.update(_read_limit(Path(cgroup_root) / "memory" / _V1_FILES[0]))
    return found


def _limits_along(base: Path, path: str, names: tuple[str, ...]) -> dict[str, int]:
    """Limits in every directory from ``base`` down to ``base / path``."""
    parts = [p for p in path.strip().split("/") if p and p not in (".", "..")]
    found: dict[str, int] = {}
    for depth in range(len(parts) + 1):
        folder = base.joinpath(*parts[:depth])
        for name in names:
            found.update(_read_limit(folder / name))
    return found


def _read_limit(path: Path) -> dict[str, int]:
    """``{str(path): bytes}`` when ``path`` holds a positive integer, else ``{}``."""
    try:
        text = path.read_text().strip()
    except OSError:
        return {}
    if not text.isdigit() or int(text) <= 0:  # "max", empty or garbage: no limit here
        return {}
    return {str(path): int(text)}


def slurm_limit(environ: Mapping[str, str]) -> tuple[str, int] | None:
    """The SLURM job's memory on this node, from its environment.

    Parameters
    ----------
    environ : mapping
        ``SLURM_MEM_PER_NODE`` (MiB), or ``SLURM_MEM_PER_CPU`` (MiB) times
        ``SLURM_CPUS_ON_NODE`` (else ``SLURM_CPUS_PER_TASK``, else 1).

    Returns
    -------
    (str, int) or None
        The variable(s) used and the limit in bytes; None outside SLURM, or when the job asked
        for all of the node's memory (``--mem=0``).
    """
    per_node = _slurm_mib(environ, "SLURM_MEM_PER_NODE")
    if per_node:
        return "SLURM_MEM_PER_NODE", per_node
    per_cpu = _slurm_mib(environ, "SLURM_MEM_PER_CPU")
    if not per_cpu:
        return None
    for name in ("SLURM_CPUS_ON_NODE", "SLURM_CPUS_PER_TASK"):
        cpus = environ.get(name, "").strip()
        if cpus.isdigit() and int(cpus) > 0:
            return f"SLURM_MEM_PER_CPU x {name}", per_cpu * int(cpus)
    return "SLURM_MEM_PER_CPU", per_cpu


def _slurm_mib(environ: Mapping[str, str], name: str) -> int | None:
    """``environ[name]`` in bytes: a number of MiB, or with a K/M/G/T suffix; None if unset."""
    text = environ.get(name)
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*([kmgtKMGT]?)[bB]?\s*", text)
    if not m:
        log.warning("ignoring %s=%r: expected a number of MiB", name, text)
        return None
    return int(m.group(1)) * _SLURM_UNITS[m.group(2).lower()] or None


_SIZE = re.compile(r"(\d+\.?\d*(?:e[+-]?\d+)?|\.\d+(?:e[+-]?\d+)?)\s*([a-z]*)", re.IGNORECASE)
_UNITS = {"": 1, "b": 1,
          **{p: 1000 ** (i + 1) for i, p in enumerate("kmgtp")},
          **{p + "b": 1000 ** (i + 1) for i, p in enumerate("kmgtp")},
          **{p + "i": 1024 ** (i + 1) for i, p in enumerate("kmgtp")},
          **{p + "ib": 1024 ** (i + 1) for i, p in enumerate("kmgtp")}}
"""Size suffixes, lower case: decimal (kB, MB, GB, TB, PB) and binary (KiB ... PiB), the
final B optional."""


def _size_in_bytes(text: str) -> int | None:
    """``"4GB"`` -> 4_000_000_000, ``"512 MiB"`` -> 536_870_912, ``"100"`` -> 100; None when
    `text` is not a number with a known size suffix."""
    m = _SIZE.fullmatch(text)
    if m is None or m[2].lower() not in _UNITS:
        return None
    return int(float(m[1]) * _UNITS[m[2].lower()])


def parse_bytes(text: str, *, total: int | None = None) -> int:
    """``"4GB"``, ``"512MiB"``, ``"2e9"`` or a fraction of the memory limit like ``"0.5"``.

    Sizes are parsed by ``dask.utils.parse_bytes`` (``MB`` = 10**6, ``MiB`` = 2**20); a bare
    number from 0 to 1 is that fraction of :func:`total_memory` (or of ``total``).

    Parameters
    ----------
    text : str
    total : int, optional
        What a fraction is a fraction of (default :func:`total_memory`).

    Returns
    -------
    int
        Bytes, positive.

    Raises
    ------
    InputError
        ``text`` is not a positive size.
    """
    text = str(text).strip()
    problem = f"memory limit {text!r}: expected e.g. 4GB, 512MiB or a fraction of memory 0.5"
    if not re.search(r"\d", text):
        raise InputError(problem)
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and 0 < value <= 1:
        return int(value * (total_memory() if total is None else total))
    size = _size_in_bytes(text)
    if size is None or size <= 0:
        raise InputError(problem)
    return size
