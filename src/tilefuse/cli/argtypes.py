"""Value checks for the command line: each option is checked against what it means.

Every function takes the text a user typed and returns the value, or raises
:class:`argparse.ArgumentTypeError` with what was expected; argparse names the option.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from tilefuse.errors import InputError
from tilefuse.model.units import check_unit

__all__ = ["FUSABLE_DTYPES", "dtype_name", "finite_float", "fraction",
           "nonnegative_int", "positive_float", "positive_int", "scene_index", "space_unit"]

FUSABLE_DTYPES = ("uint8", "uint16", "uint32", "int8", "int16", "int32", "float32", "float64")
"""Output dtypes a mosaic can be written in."""


def _number(text: str, kind: type) -> float:
    try:
        return kind(text)
    except ValueError:
        name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (an index)."""
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (not nan, not inf)."""
    value = _number(text, float)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A finite number in [0, 1) (an overlap fraction)."""
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to below 1 "
                                         f"(0.1 = 10%), got {text!r}")
    return value


def dtype_name(text: str) -> str:
    """One of :data:`FUSABLE_DTYPES` (numpy spellings such as ``u2`` or ``float`` accepted)."""
    try:
        name = np.dtype(text).name
    except TypeError:
        name = None
    if name not in FUSABLE_DTYPES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(FUSABLE_DTYPES)}, "
                                         f"got {text!r}")
    return name


def space_unit(text: str) -> str:
    """An OME-NGFF space unit name or abbreviation, returned as the NGFF name."""
    try:
        return check_unit(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def scene_index(text: str) -> int | str:
    """A CZI scene: an index >= 0, or ``all``."""
    if text.strip().lower() == "all":
        return "all"
    try:
        return nonnegative_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a scene index (0, 1, ...) or 'all', got {text!r}") from None
