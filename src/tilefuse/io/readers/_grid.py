"""Grids of tiles: a ``ROWSxCOLS`` grid given by the user, and where the k-th tile of each of
Fiji's acquisition orders sits in it."""

from __future__ import annotations

import re

from tilefuse.errors import InputError

__all__ = ["ORDERS", "grid_index_to_rc", "parse_grid"]

ORDERS = ("row-major", "column-major", "snake-rows", "snake-cols")
"""Fiji's Grid/Collection orders: how an index runs over the grid."""


def parse_grid(grid: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"5x4"`` or ``(5, 4)`` -> (rows, columns); None stays None.

    Raises
    ------
    InputError
        Not ROWSxCOLS, or a grid without a row or a column.
    """
    if grid is None:
        return None
    if isinstance(grid, str):
        m = re.fullmatch(r"\s*(\d+)\s*[xX\u00d7]\s*(\d+)\s*", grid)
        if not m:
            raise InputError(f"--grid {grid}: expected ROWSxCOLS, e.g. --grid 5x4")
        grid = (int(m.group(1)), int(m.group(2)))
    rows, cols = (int(v) for v in grid)
    if rows < 1 or cols < 1:
        raise InputError(f"--grid {rows}x{cols}: expected at least one row and one column")
    return rows, cols


def grid_index_to_rc(k: int, grid: tuple[int, int], order: str) -> tuple[int, int]:
    """Grid (row, column) of the ``k``-th tile (from 0) of a Fiji Grid/Collection order.

    Parameters
    ----------
    k : int
        Acquisition index counted from 0, ``0 <= k < rows * cols``.
    grid : (int, int)
        Rows and columns.
    order : {"row-major", "column-major", "snake-rows", "snake-cols"}
        ``snake-rows``: row 0 left to right, row 1 right to left, ...; ``snake-cols`` likewise
        down column 0, up column 1, ...
    """
    rows, cols = grid
    if order in ("row-major", "snake-rows"):
        row, col = divmod(k, cols)
        if order == "snake-rows" and row % 2:
            col = cols - 1 - col
        return row, col
    col, row = divmod(k, rows)
    if order == "snake-cols" and col % 2:
        row = rows - 1 - row
    return row, col
