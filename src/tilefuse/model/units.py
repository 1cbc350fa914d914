"""Physical units: the space units OME-NGFF allows (UDUNITS-2 names) and common abbreviations."""

from __future__ import annotations

from tilefuse.errors import InputError

__all__ = ["NGFF_UNITS", "check_unit"]

# The space units OME-NGFF allows (UDUNITS-2 names), and the abbreviations people type.
NGFF_UNITS = (
    "angstrom", "attometer", "centimeter", "decimeter", "exameter", "femtometer", "foot",
    "gigameter", "hectometer", "inch", "kilometer", "megameter", "meter", "micrometer", "mile",
    "millimeter", "nanometer", "parsec", "petameter", "picometer", "terameter", "yard",
    "yoctometer", "yottameter", "zeptometer", "zettameter",
)
_UNIT_ALIASES = {"um": "micrometer", "µm": "micrometer", "μm": "micrometer", "micron": "micrometer",
                 "nm": "nanometer", "mm": "millimeter", "cm": "centimeter", "m": "meter",
                 "pm": "picometer", "å": "angstrom"}


def check_unit(unit: str) -> str:
    """The OME-NGFF name of a space unit (``"um"`` -> ``"micrometer"``).

    Raises
    ------
    InputError
        `unit` is neither an NGFF unit name nor a known abbreviation.
    """
    text = str(unit).strip()
    name = _UNIT_ALIASES.get(text.lower(), text.lower())
    if name not in NGFF_UNITS:
        raise InputError(f"unit {unit!r} is not an OME-NGFF space unit; expected e.g. "
                         "micrometer (um), nanometer (nm), millimeter (mm) or meter")
    return name
