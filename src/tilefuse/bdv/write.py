"""Writing SpimData XML: a registration prepended to an existing ``dataset.xml``, and a new
``dataset.xml`` beside a fused OME-Zarr (``tilefuse fuse --bdv``) so BigDataViewer and BigStitcher
open it.

New elements are made with the typed model (``pydantic-bigstitcher``); an existing file is
edited as an :mod:`xml.etree` tree so that every element, attribute and comment it had stays
(see :mod:`tilefuse.bdv.spimdata` for why the typed model does not re-serialise it).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tilefuse.bdv.spimdata import format_affine, read_tree
from tilefuse.errors import InputError

if TYPE_CHECKING:
    from tilefuse.model.mosaic import Mosaic

__all__ = ["BDV_SUFFIX", "REGISTRATION_NAME", "bdv_sidecar", "bdv_unit", "check_bdv_sidecar",
           "prepend_transforms", "write_bdv_xml", "write_mosaic_xml"]

REGISTRATION_NAME = "tilefuse registration"
"""``Name`` of the ``ViewTransform`` tilefuse prepends to each view it registered."""
BDV_SUFFIX = ".xml"
"""``tilefuse fuse -o NAME.ome.zarr --bdv`` writes ``NAME.xml`` beside the image."""
_UNITS = {"micrometer": "µm", "nanometer": "nm", "millimeter": "mm", "centimeter": "cm",
          "meter": "m"}


def bdv_unit(unit: str) -> str:
    """How BigStitcher writes a unit: ``µm`` for ``micrometer``; other names as they are."""
    return _UNITS.get(unit, unit)


def _atomic_write(out: Path, text: str) -> Path:
    """Write `text` to `out` through a temporary file in its folder (never half written)."""
    tmp = out.with_name(f".{out.name}.tilefuse-tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


def _transform_element(affine: np.ndarray, name: str) -> ET.Element:
    from pydantic_bigstitcher.transform import AffineViewTransform

    model = AffineViewTransform(typ="affine", name=name, affine=format_affine(affine))
    element: ET.Element = ET.fromstring(model.to_xml())
    return element


def prepend_transforms(source: str | os.PathLike, out: str | os.PathLike,
                       transforms: dict[tuple[str, str], np.ndarray], name: str) -> Path:
    """Copy the ``dataset.xml`` `source` to `out`, with a ``ViewTransform`` named `name`
    prepended to the ``ViewRegistration`` of each ``(timepoint, setup)`` in `transforms`.

    Parameters
    ----------
    source, out : path
        `out` must not be `source` (inputs are never written).
    transforms : dict of (str, str) to numpy.ndarray, each shape (4, 4)
        ``x y z`` affines in the file's world units.
    name : str

    Returns
    -------
    pathlib.Path
        `out`.
    """
    source, out = Path(source), Path(out)
    if out.exists() and os.path.samefile(source, out):
        raise InputError(f"-o {out} is the BigStitcher XML being read; write the registration "
                         "to another file (e.g. dataset.registered.xml)")
    prolog, root = read_tree(source)
    done = set()
    for reg in root.iter("ViewRegistration"):
        key = (reg.get("timepoint", "").strip(), reg.get("setup", "").strip())
        if key not in transforms:
            continue
        element = _transform_element(transforms[key], name)
        element.text = reg.text  # the file's own indentation, one level deeper
        for child in element:
            child.tail = (reg.text or "") + ("  " if reg.text and "\n" in reg.text else "")
        element[-1].tail = reg.text
        element.tail = reg.text
        reg.insert(0, element)
        done.add(key)
    if done != set(transforms):
        missing = sorted(set(transforms) - done)
        raise InputError(f"{source}: no ViewRegistration for timepoint/setup {missing[:3]}")
    return _atomic_write(out, prolog + ET.tostring(root, encoding="unicode") + "\n")


def check_bdv_sidecar(output: str | os.PathLike, inputs: set[Path],
                      ours: Sequence[str]) -> Path:
    """The ``NAME.xml`` written beside ``NAME.ome.zarr``: never an input, never a link; an
    existing one only when it is named in `ours` (written by the run being replaced/resumed).

    Raises
    ------
    InputError, FileExistsError
    """
    from tilefuse.io.outputs import image_stem

    output = Path(output)
    path = output.with_name(image_stem(output) + BDV_SUFFIX)
    if Path(os.path.realpath(path)) in inputs:
        raise InputError(f"--bdv would write {path}, which is this run's input; choose another "
                         "output name")
    if path.is_symlink():
        raise InputError(f"{path} is a symbolic link; tilefuse does not write through links: "
                         "remove it or choose another output name")
    if path.exists() and path.name not in ours:
        raise FileExistsError(f"{path} exists and was not written by a run into {output}; move "
                              "it away or choose another output name")
    return path


def write_bdv_xml(path: str | os.PathLike, image: str | os.PathLike, *, shape: Sequence[int],
                  pixel_size: Sequence[float], unit: str, channels: Sequence[str],
                  n_times: int = 1, origin: Sequence[float] | None = None) -> Path:
    """A ``dataset.xml`` for a fused OME-Zarr: one view setup per channel, one time point per
    time point, the ``bdv.multimg.zarr`` loader pointing at `image`, each view placed by a
    calibration (world unit: one x pixel) and the mosaic's origin.

    Parameters
    ----------
    path : path
        The XML to write (relative paths in it start from its folder).
    image : path
        The fused OME-Zarr image.
    shape : sequence of int
        Spatial shape, ``(y, x)`` or ``(z, y, x)``.
    pixel_size : sequence of float
        Zyx, one per spatial axis, in `unit`.
    channels : sequence of str
        Channel names (the image's ``c`` axis, if any, in this order).
    n_times : int
    origin : sequence of float, optional
        Mosaic pixel index of the image's first pixel, zyx.

    Returns
    -------
    pathlib.Path
    """
    import pydantic_bigstitcher as pbs
    from pydantic_bigstitcher.transform import AffineViewTransform

    path, image = Path(path), Path(image)
    ndim = len(shape)
    size_xyz = [*reversed([int(n) for n in shape])] + [1] * (3 - ndim)
    voxel = [*reversed([float(v) for v in pixel_size])]
    voxel += [voxel[0]] * (3 - ndim)
    shift = [*reversed([float(v) for v in (origin or (0.0,) * ndim)])] + [0.0] * (3 - ndim)
    calib = np.diag([1.0, voxel[1] / voxel[0], voxel[2] / voxel[0], 1.0])
    move = np.eye(4)
    move[:3, 3] = calib[:3, :3] @ shift
    rel = os.path.relpath(image.resolve(), path.resolve().parent)
    setups = [pbs.ViewSetup(
        ident=str(c), name=name, size=" ".join(map(str, size_xyz)),
        voxel_size=pbs.VoxelSize(unit=bdv_unit(unit), size=" ".join(map(repr, voxel))),
        attributes=pbs.ViewSetupAttributes(illumination="0", channel=str(c), tile="0", angle="0"))
        for c, name in enumerate(channels)]
    attributes = [
        pbs.IlluminationAttribute(name="illumination",
                                  illumination=[pbs.Attribute(id=0, name="0")]),
        pbs.ChannelAttribute(name="channel", angle=[pbs.Attribute(id=c, name=n)
                                                    for c, n in enumerate(channels)]),
        pbs.TileAttribute(name="tile", tile=[pbs.Attribute(id=0, name=image.name)]),
        pbs.AngleAttribute(name="angle", angle=[pbs.Attribute(id=0, name="0")]),
    ]
    views = [(t, c) for t in range(n_times) for c in range(len(channels))]
    loader = pbs.ZarrImageLoader(
        fmt="bdv.multimg.zarr", version="1.0", zarr=pbs.Zarr(type="relative", path="."),
        zgroups=pbs.ZGroups(elements=[pbs.ZGroupA(setup=str(c), timepoint=str(t), path=rel)
                                      for t, c in views]))
    transforms = [AffineViewTransform(typ="affine", name="tilefuse mosaic origin",
                                      affine=format_affine(move)),
                  AffineViewTransform(typ="affine", name="calibration",
                                      affine=format_affine(calib))]
    data = pbs.SpimData2(
        version="0.2", base_path=pbs.BasePath(type="relative", path="."),
        sequence_description=pbs.SequenceDescription(
            image_loader=loader,
            view_setups=pbs.ViewSetups(elements=setups, attributes=attributes),
            time_points=pbs.PatternTimePoints(
                type="pattern", elements=["0" if n_times == 1 else f"0-{n_times - 1}"])),
        view_registrations=pbs.ViewRegistrations(elements=[
            pbs.ViewRegistration(timepoint=str(t), setup=str(c), view_transforms=transforms)
            for t, c in views]))
    root = ET.fromstring(data.to_xml())
    ET.indent(root)
    return _atomic_write(path, '<?xml version="1.0" encoding="UTF-8"?>\n'
                         + ET.tostring(root, encoding="unicode") + "\n")


def bdv_sidecar(output: Path, inputs: set[Path], *, tiff: bool = False) -> Path:
    """For ``fuse --bdv``: the ``NAME.xml`` to write beside the OME-Zarr `output`, checked as
    :func:`check_bdv_sidecar` does (an existing one only when the image's manifest names it).

    Raises
    ------
    InputError
        `output` is an OME-TIFF (BigDataViewer reads the OME-Zarr output).
    """
    from tilefuse.io.outputs import read_manifest

    if tiff:
        raise InputError(f"--bdv writes a dataset.xml for an OME-Zarr image; -o {output} is an "
                         "OME-TIFF: name the output NAME.ome.zarr")
    previous = read_manifest(output) if output.is_dir() else None
    return check_bdv_sidecar(output, inputs, (previous or {}).get("sidecars", ()))


def write_mosaic_xml(mosaic: Mosaic, image: Path, path: Path) -> Path:
    """:func:`write_bdv_xml` for a fused :class:`~tilefuse.model.mosaic.Mosaic` written to
    `image`: its spatial shape, pixel size, unit, channels, time points and origin."""
    spatial = [n for a, n in zip(mosaic.axes, mosaic.shape, strict=True) if a in "zyx"]
    sizes = dict(zip(mosaic.axes, mosaic.shape, strict=True))
    channels = mosaic.channel_names or tuple(str(c) for c in range(sizes.get("c", 1)))
    return write_bdv_xml(path, image, shape=spatial, pixel_size=mosaic.pixel_size,
                         unit=mosaic.unit, channels=channels, n_times=sizes.get("t", 1),
                         origin=mosaic.origin)
