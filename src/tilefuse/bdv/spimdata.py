"""BigStitcher / BigDataViewer ``dataset.xml`` (SpimData 0.2): parsing, and BigStitcher's affines.

Conventions of the file
-----------------------
- A ``ViewSetup`` has a ``size`` (``x y z`` pixels) and a ``voxelSize`` (``x y z``, a unit);
  its ``attributes`` name its tile, channel, illumination and angle by id.
- A ``ViewRegistration`` (one per time point and setup) is a list of ``ViewTransform``s, each a
  row-major 3 x 4 affine in ``x y z``. The list composes as ``T[0] @ T[1] @ ... @ T[-1]``: the
  last is applied first (usually the calibration, which scales y and z by their voxel size over
  x's, so that the world unit is one x pixel).

Where the typed model is used
-----------------------------
``pydantic-bigstitcher`` models the view setups and the view registrations (both parsed with
it here), and the zarr and N5 image loaders; it does not model the file-map TIFF loader
(``spimreconstruction.filemap2``) and, when it writes a file back, it re-serialises every element
(dropping comments, the XML declaration and the text layout). So the file itself is held as an
:mod:`xml.etree` tree (comments kept) and only the parts tilefuse reads go through the typed
model; a written-back file changes nothing but the transforms it adds.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tilefuse.errors import InputError

__all__ = ["Setup", "SpimDataXml", "compose", "format_affine", "from_tilefuse", "parse_affine",
           "read_spimdata", "read_tree", "to_tilefuse", "world_scale"]

_SWAP = np.eye(4)[[2, 1, 0, 3]]  # x y z <-> z y x (its own inverse)


@dataclass(frozen=True)
class Setup:
    """One ``ViewSetup``.

    Attributes
    ----------
    id : str
    name : str
    size : tuple of int
        ``(x, y, z)`` pixels.
    voxel_size : tuple of float
        ``(x, y, z)`` in `unit`.
    unit : str
        As the file writes it (``µm``, ``um``, ``nm``...).
    attributes : dict of str to str
        ``tile``, ``channel``, ``illumination``, ``angle`` -> id.
    """

    id: str
    name: str
    size: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    unit: str
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SpimDataXml:
    """What tilefuse reads of a ``dataset.xml``.

    Attributes
    ----------
    path : pathlib.Path
    base : pathlib.Path
        ``BasePath`` resolved against the file's folder: relative image paths start here.
    loader : xml.etree.ElementTree.Element or None
        The ``ImageLoader`` element as written.
    setups : dict of str to Setup
    views : dict of (str, str) to numpy.ndarray
        ``(timepoint, setup)`` -> the composed registration, shape (4, 4), ``x y z``.
    names : dict of (str, str) to str
        ``(attribute, id)`` -> name, e.g. ``("channel", "1") -> "488"``.
    """

    path: Path
    base: Path
    loader: ET.Element | None
    setups: dict[str, Setup]
    views: dict[tuple[str, str], np.ndarray]
    names: dict[tuple[str, str], str]

    @property
    def loader_format(self) -> str | None:
        """The image loader's ``format`` attribute, if there is a loader."""
        return None if self.loader is None else self.loader.get("format")


def parse_affine(text: str | None, where: str) -> np.ndarray:
    """A ``ViewTransform``'s row-major 3 x 4 text as a homogeneous (4, 4) ``x y z`` affine."""
    try:
        values = [float(v) for v in (text or "").split()]
    except ValueError:
        values = []
    if len(values) != 12 or not np.all(np.isfinite(values)):
        raise InputError(f"{where}: affine {(text or '').strip()!r} is not 12 finite numbers "
                         "(a row-major 3 x 4 matrix)")
    out = np.eye(4)
    out[:3] = np.reshape(values, (3, 4))
    return out


def format_affine(affine: np.ndarray) -> str:
    """A (4, 4) ``x y z`` affine as ``ViewTransform`` text (row-major 3 x 4, exact floats)."""
    return " ".join(repr(float(v)) for v in np.asarray(affine, dtype=np.float64)[:3].ravel())


def compose(transforms: list[np.ndarray]) -> np.ndarray:
    """A ``ViewRegistration``'s transforms composed: ``T[0] @ ... @ T[-1]`` (last first)."""
    out = np.eye(4)
    for t in transforms:
        out = out @ t
    return out


def world_scale(affine: np.ndarray) -> np.ndarray:
    """World length of one pixel step along x, y and z (the linear part's column norms), (3,)."""
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def to_tilefuse(affine: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """A BigStitcher view affine (pixel ``xyz`` -> world) as tilefuse's (pixel ``zyx`` -> mosaic
    pixel ``zyx``), the mosaic pixel being `scale` (``xyz``) world units, shape (4, 4)."""
    unscale = np.diag([*(1.0 / np.asarray(scale, dtype=np.float64)), 1.0])
    return _SWAP @ unscale @ np.asarray(affine, dtype=np.float64) @ _SWAP


def from_tilefuse(affine: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_tilefuse`: a tilefuse ``zyx`` affine as a BigStitcher one."""
    rescale = np.diag([*np.asarray(scale, dtype=np.float64), 1.0])
    return rescale @ _SWAP @ np.asarray(affine, dtype=np.float64) @ _SWAP


def read_tree(path: str | os.PathLike) -> tuple[str, ET.Element]:
    """The text before the root element (XML declaration, comments) and the root element, with
    the comments inside it kept.

    Raises
    ------
    InputError
        Not well-formed XML, or its root is not ``SpimData``.
    """
    text = Path(path).read_text(encoding="utf-8")
    parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))
    try:
        parser.feed(text)
        root = parser.close()
    except ET.ParseError as exc:
        raise InputError(f"{path}: not well-formed XML ({exc})") from None
    if root.tag != "SpimData":
        raise InputError(f"{path}: root element <{root.tag}>, expected <SpimData> (a BigStitcher "
                         "or BigDataViewer dataset.xml)")
    return text[: text.find("<SpimData")], root


def _typed(model: Any, element: ET.Element, path: Path) -> Any:
    """`element` parsed with a pydantic-bigstitcher model; its errors named by file."""
    from pydantic import ValidationError

    try:
        return model.from_xml(ET.tostring(element))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InputError(f"{path}: <{element.tag}> is not valid SpimData: {where}: "
                         f"{first['msg']}") from None


def read_spimdata(path: str | os.PathLike) -> SpimDataXml:
    """Read a BigStitcher ``dataset.xml``: setups, names and composed registrations.

    Raises
    ------
    FileNotFoundError
        `path` does not exist.
    InputError
        Not SpimData XML, a view without a setup, or a malformed transform (named).
    """
    import pydantic_bigstitcher as pbs

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BigStitcher XML not found: {path}")
    _, root = read_tree(path)
    base_el = root.find("BasePath")
    base_text = (base_el.text or ".").strip() if base_el is not None else "."
    base = Path(base_text)
    if base_el is None or base_el.get("type", "relative") == "relative":
        base = path.parent / base
    sequence = root.find("SequenceDescription")
    setups_el = None if sequence is None else sequence.find("ViewSetups")
    setups: dict[str, Setup] = {}
    names: dict[tuple[str, str], str] = {}
    if setups_el is not None:
        for one in setups_el.findall("ViewSetup"):
            setup = _typed(pbs.ViewSetup, one, path)
            size = tuple(int(v) for v in setup.size.split())
            voxel = tuple(float(v) for v in setup.voxel_size.size.split())
            if len(size) != 3 or len(voxel) != 3 or min(voxel) <= 0:
                raise InputError(f"{path}: ViewSetup {setup.ident}: size {setup.size!r} and "
                                 f"voxel size {setup.voxel_size.size!r} need 3 positive values")
            attrs = setup.attributes.model_dump()
            setups[setup.ident.strip()] = Setup(
                setup.ident.strip(), setup.name, size, voxel, setup.voxel_size.unit.strip(),
                {k: str(v).strip() for k, v in attrs.items()})
        for group in setups_el.findall("Attributes"):
            for item in group:
                names[(group.get("name", ""), (item.findtext("id") or "").strip())] = (
                    item.findtext("name") or "").strip()
    views: dict[tuple[str, str], np.ndarray] = {}
    registrations = root.find("ViewRegistrations")
    if registrations is not None:
        for reg in _typed(pbs.ViewRegistrations, registrations, path).elements:
            where = f"{path}: ViewRegistration timepoint {reg.timepoint} setup {reg.setup}"
            views[(reg.timepoint.strip(), reg.setup.strip())] = compose(
                [parse_affine(t.affine, where) for t in reg.view_transforms])
    loader = None if sequence is None else sequence.find("ImageLoader")
    return SpimDataXml(path, base, loader, setups, views, names)
