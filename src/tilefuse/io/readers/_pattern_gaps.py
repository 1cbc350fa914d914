"""Gaps in a pattern's grid: which positions have no file, and what that file would be called.

A grid with gaps is legitimate (a skipped field, an empty well); a silent gap is not. The
pattern reader logs one WARNING naming the empty grid positions and the file it expected at
each, a few of them when many are missing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence

__all__ = ["describe_gaps", "expected_name", "field_widths", "log_gaps", "missing_positions"]

MAX_LISTED = 10
_FIELD = re.compile(r"\{\s*(row|col|index)\s*\}", re.IGNORECASE)


def missing_positions(present: Sequence[tuple[int, int]],
                      grid: tuple[int, int]) -> list[tuple[int, int]]:
    """Grid positions ``(row, col)`` of a ``rows x cols`` grid that are not in ``present``.

    Returns
    -------
    list of (int, int)
        Row by row.
    """
    have = set(present)
    return [(r, c) for r in range(grid[0]) for c in range(grid[1]) if (r, c) not in have]


def field_widths(values: dict[str, list[str]]) -> dict[str, int]:
    """Zero padding of each numeric field, as written in the names found.

    A field is padded when some value found starts with ``0`` and has more than one digit
    (``p01``); it is then padded to the shortest width found. Otherwise numbers are written as
    they are (``p1``, ``p10``).

    Parameters
    ----------
    values : dict of str to list of str
        The texts each field matched, by field name.
    """
    widths = {}
    for name, texts in values.items():
        padded = any(len(t) > 1 and t.startswith("0") for t in texts)
        widths[name] = min(len(t) for t in texts) if padded and texts else 0
    return widths


def expected_name(pattern: str, numbers: dict[str, int], widths: dict[str, int]) -> str:
    """``pattern`` with ``{row}``, ``{col}`` and ``{index}`` replaced by ``numbers``.

    Other fields (``{channel}``, ``{z}``, ``{t}``) and wildcards stay as written.
    """

    def fill(m: re.Match) -> str:
        name = m.group(1).lower()
        if name not in numbers:
            return m.group(0)
        return f"{numbers[name]:0{widths.get(name, 0)}d}"

    return _FIELD.sub(fill, pattern)


def describe_gaps(missing: list[tuple[int, int]], grid: tuple[int, int],
                  name_of: Callable[[tuple[int, int]], str], pattern: str) -> str:
    """One line naming the empty grid positions, the first ``MAX_LISTED`` of them in full.

    Parameters
    ----------
    missing : list of (int, int)
        Empty grid positions, in the order to list them.
    grid : (int, int)
        Rows and columns.
    name_of : callable
        Grid position -> the file name the pattern expected there.
    pattern : str
    """
    listed = ", ".join(f"row {r}, column {c} ({name_of((r, c))})"
                       for r, c in missing[:MAX_LISTED])
    more = f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
    return (f"{len(missing)} of the {grid[0] * grid[1]} positions of the {grid[0]}x{grid[1]} "
            f"grid have no file matching {pattern!r} and stay empty in the mosaic: "
            f"{listed}{more}")


def log_gaps(
    log: logging.Logger, found: list[dict], keys: list[tuple[int, int]],
    grid: tuple[int, int] | None, acquisition: dict[tuple[int, int], int] | None,
    first_index: int | None, pattern: str,
) -> None:
    """Log the grid positions that no file fills, each with the file name expected there.

    Parameters
    ----------
    log : logging.Logger
    found : list of dict
        The field values (text) of every file the pattern matched.
    keys : list of (int, int)
        The grid positions that have files.
    grid : (int, int) or None
        Rows and columns; None: the rows and columns found (counted from the smallest).
    acquisition : dict of (int, int) to int, or None
        With ``{index}``: grid position -> acquisition step (from 0); the positions are
        then listed in acquisition order, else row by row.
    first_index : int or None
        The grid's first index as given (None: the smallest found).
    pattern : str
    """
    numeric = [f for f in ("row", "col", "index") if found and f in found[0]]
    widths = field_widths({f: [values[f] for values in found] for f in numeric})
    note = ""
    if acquisition is not None:
        assert grid is not None  # {index} places tiles on a given grid (pattern.py needs one)
        smallest = min(int(values["index"]) for values in found)
        first = smallest if first_index is None else int(first_index)
        missing = sorted(missing_positions(keys, grid), key=acquisition.__getitem__)

        def name_of(rc: tuple[int, int]) -> str:
            return expected_name(pattern, {"index": first + acquisition[rc]}, widths)

        if first_index is None and smallest > 1:
            note = (f" (index {smallest}, the smallest found, is taken as the grid's first "
                    "tile; give the first index, --first-index, if the grid starts earlier)")
    else:
        r0 = min(int(values["row"]) for values in found)
        c0 = min(int(values["col"]) for values in found)
        if grid is None:
            grid = (max(r for r, _ in keys) + 1, max(c for _, c in keys) + 1)
        missing = missing_positions(keys, grid)

        def name_of(rc: tuple[int, int]) -> str:
            return expected_name(pattern, {"row": rc[0] + r0, "col": rc[1] + c0}, widths)

    if missing:
        log.warning("%s%s", describe_gaps(missing, grid, name_of, pattern), note)
