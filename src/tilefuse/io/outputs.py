"""What tilefuse may write, replace or delete: only what it created, never one of its inputs.

Every command that writes a file or folder asks this module first. The rules:

- an output that exists is replaced only when the caller says so (``overwrite``), and only when
  tilefuse made it: an image folder holding tilefuse's run manifest and nothing but what
  tilefuse writes there, or an empty folder; a file (a PNG, a layout) that is not an input;
- never an input: not the layout file, not a tile file, not a folder holding any of them (the
  current folder included), whatever ``overwrite`` says;
- a symbolic link is never followed to delete its target;
- remote URLs (``s3://...``) are refused by name: tilefuse writes local or mounted folders;
- an OME-TIFF file is tilefuse's when its OME-XML says so: ``Creator="tilefuse ..."`` and the run
  manifest as a ``CommentAnnotation`` in namespace :data:`TIFF_MANIFEST_NAMESPACE`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from tilefuse.errors import InputError
from tilefuse.ome_zarr.zarr_nodes import read_group_attributes

__all__ = [
    "MANIFEST",
    "MANIFEST_KEY",
    "OME_TIFF_SUFFIXES",
    "TIFF_MANIFEST_NAMESPACE",
    "ZARR_SUFFIXES",
    "check_tiff_output",
    "image_stem",
    "is_finished",
    "check_file_output",
    "check_image_output",
    "input_files",
    "is_tilefuse_image",
    "read_manifest",
    "read_tiff_manifest",
    "refuse_url",
    "remove_image",
]

log = logging.getLogger(__name__)

MANIFEST_KEY = "tilefuse"
"""Group attribute holding the run manifest, written before any pixel: marks the image as
tilefuse's and says what the run was asked to do."""
MANIFEST = "tilefuse-run.json"
"""Where versions before 0.2 kept the manifest (a file in the image folder); still read."""

ZARR_SUFFIXES = (".ome.zarr", ".zarr")
"""Endings of an image folder's name that are not part of the image's name (any case)."""
OME_TIFF_SUFFIXES = (".ome.tif", ".ome.tiff")
"""Endings of an OME-TIFF output's name that are not part of the image's name (any case)."""
TIFF_MANIFEST_NAMESPACE = "tilefuse/run-manifest"
"""Namespace of the OME-XML ``CommentAnnotation`` holding the run manifest (JSON) of an OME-TIFF
tilefuse wrote: with ``Creator="tilefuse VERSION"``, what marks the file as tilefuse's."""

# What tilefuse writes into an image folder: zarr metadata (and the temporaries of its
# documents), level folders, the manifest.
_OWN_ENTRIES = re.compile(r"^(zarr\.json|\.zattrs|\.zgroup|\.zmetadata|\d+|"
                          + re.escape(MANIFEST) + r"|\.tilefuse-write-test"
                          r"|\.tilefuse-.+\.[0-9a-f]{32}\.partial)$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def refuse_url(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse a remote URL (``s3://``, ``gs://``, ``https://``...) as a local path.

    Raises
    ------
    InputError
        `path` looks like a URL.
    """
    if _URL.match(str(path)):
        raise InputError(f"{what} {path}: remote URLs are not supported; write to a local or "
                         "mounted folder (e.g. one that rclone or s3fs mounts) and copy it there")


def image_stem(path: str | os.PathLike) -> str:
    """An image's name without ``.ome.zarr`` / ``.zarr`` / ``.ome.tif(f)`` (any case): the
    image's name, its napari layer's, and the stem of the layout files saved beside it.

    >>> image_stem("out/Mosaic.OME.zarr"), image_stem("m.zarr"), image_stem("folder")
    ('Mosaic', 'm', 'folder')
    >>> image_stem("out/m.ome.tiff")
    'm'
    """
    name = Path(path).name
    for suffix in (*ZARR_SUFFIXES, *OME_TIFF_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def read_manifest(folder: Path) -> dict | None:
    """The run manifest of the image in `folder` (its group attribute ``tilefuse``, or the
    file of earlier versions; of an OME-TIFF file, its OME-XML annotation), or None when there
    is none: then the folder (or file) is not tilefuse's."""
    if folder.is_file():
        return read_tiff_manifest(folder)
    attrs = _group_attrs(folder)
    saved = attrs.get(MANIFEST_KEY) if attrs is not None else None
    if saved is None:
        try:
            saved = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
    return saved if isinstance(saved, dict) and "tilefuse" in saved else None


def _group_attrs(folder: Path) -> dict | None:
    """The attributes of the zarr group in `folder` (v3 ``zarr.json`` or v2 ``.zattrs``), or
    None where neither can be read."""
    for zarr_format in (3, 2):
        try:
            return read_group_attributes(folder, zarr_format)
        except (OSError, ValueError):
            continue
    return None


def is_finished(folder: Path) -> bool:
    """Whether the image in `folder` carries its OME multiscales metadata (written last)."""
    attrs = _group_attrs(folder) or {}
    ome = attrs.get("ome", {})
    return "multiscales" in attrs or (isinstance(ome, dict) and "multiscales" in ome)


def is_tilefuse_image(folder: Path) -> bool:
    """True when `folder` is a real folder holding tilefuse's manifest and only what tilefuse
    writes into an image (zarr metadata, numbered level folders)."""
    if folder.is_symlink() or not folder.is_dir() or read_manifest(folder) is None:
        return False
    return not _foreign_entries(folder)


def _foreign_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not _OWN_ENTRIES.match(p.name))


def input_files(layout_path: str | os.PathLike | None, tiles: Iterable[str]) -> set[Path]:
    """The resolved paths of a run's inputs: the layout file (or folder) and every tile file.

    Parameters
    ----------
    layout_path : path, optional
        What the user named as input.
    tiles : iterable of str
        Every file a tile is read from (all channel files, all planes).
    """
    found = {_resolved(Path(p)) for p in tiles}
    if layout_path is not None:
        found.add(_resolved(Path(layout_path)))
    return found


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _refuse_inputs(path: Path, inputs: Iterable[Path], what: str) -> None:
    """Refuse `path` when it is an input or a folder that holds one (at any depth). A new name
    inside an input folder is fine: nothing there is replaced."""
    target = _resolved(path)
    for item in sorted(inputs):
        if item == target:
            raise InputError(f"{what} {path} is one of this run's inputs; tilefuse never "
                             "writes over its inputs: choose another name")
        if target in item.parents:
            raise InputError(f"{what} {path} holds this run's input {item}; tilefuse never "
                             "replaces a folder holding its inputs: choose another name")


def check_file_output(path: str | os.PathLike, *, overwrite: bool, inputs: Iterable[Path] = (),
                      what: str = "output", suffixes: tuple[str, ...] = ()) -> Path:
    """Check that a file output (picture, layout, report, flat field) may be written.

    Parameters
    ----------
    path : path
        The file to write.
    overwrite : bool
        Whether an existing file may be replaced.
    inputs : iterable of Path
        Resolved input paths (:func:`input_files`): never written, whatever `overwrite` says.
    what : str
        How messages name the file (``"-o"``, ``"--report"``).
    suffixes : tuple of str
        Accepted suffixes, lower case with the dot (empty: any).

    Returns
    -------
    pathlib.Path

    Raises
    ------
    InputError, FileExistsError
        A URL, a wrong suffix, an input, a symbolic link, a folder, or an existing file
        without `overwrite`.
    """
    refuse_url(path, what)
    out = Path(path)
    if suffixes and out.suffix.lower() not in suffixes:
        raise InputError(f"{what} {out}: expected a file name ending in "
                         f"{' or '.join(suffixes)}")
    _refuse_inputs(out, inputs, what)
    if out.is_symlink():  # as for images: never written through, and not deleted either
        raise InputError(f"{what} {out} is a symbolic link; tilefuse does not write through "
                         "links: name the file itself")
    if out.is_dir():
        raise InputError(f"{what} {out} is a folder; expected a file name")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{what} {out} exists; pass --overwrite to replace it")
    return out


def check_image_output(path: str | os.PathLike, *, overwrite: bool, resume: bool = False,
                       inputs: Iterable[Path] = ()) -> Path:
    """Check that an image folder may be written, before anything is read or computed.

    An existing folder is replaced only with `overwrite`, and only when it is empty or a
    tilefuse image (:func:`is_tilefuse_image`); with `resume` it must be a tilefuse image.

    Raises
    ------
    InputError, FileExistsError, FileNotFoundError
        With the reason and what to do.
    """
    refuse_url(path)
    out = Path(path)
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    _refuse_inputs(out, inputs, "output")
    if out.is_symlink():
        raise InputError(f"output {out} is a symbolic link; tilefuse does not write through "
                         "links: name the folder itself")
    if resume:
        if not out.exists():
            raise FileNotFoundError(f"{out} does not exist; nothing to resume")
        if read_manifest(out) is None:
            raise InputError(f"{out}: not a tilefuse output (no run manifest); nothing to resume")
        return out
    if not out.exists():
        return out
    if out.is_dir() and not any(out.iterdir()):
        return out
    if not overwrite:
        raise FileExistsError(f"{out} exists{_state(out)}; pass --overwrite to replace it")
    _check_replaceable(out)
    return out


def _state(out: Path) -> str:
    """What an existing output is, for the 'exists' message."""
    if read_manifest(out) is None:
        return ""
    if is_finished(out):
        return " (a finished tilefuse image)"
    return " (an unfinished tilefuse run: --resume continues it)"


def _check_replaceable(out: Path) -> None:
    """Refuse to replace anything but an empty folder or a tilefuse image."""
    if not out.is_dir():
        raise InputError(f"output {out} is a file that tilefuse did not make; it is not "
                         "replaced: choose another name or move it away")
    if read_manifest(out) is None:
        raise InputError(f"output {out} is a folder that tilefuse did not make (no tilefuse run "
                         "manifest); it is not replaced: choose another name, or empty it "
                         "yourself")
    foreign = _foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                          else "")
        raise InputError(f"output {out} holds files tilefuse did not write ({shown}); it is not "
                         "replaced: move them away or choose another name")


def remove_image(out: Path) -> None:
    """Delete a tilefuse image folder, entry by entry, keeping the (empty) folder.

    Only what :func:`check_image_output` allows is removed; anything else raises.
    """
    if out.is_symlink():  # checked before, but the run may have been long: check again
        raise InputError(f"output {out} is a symbolic link; tilefuse does not delete through "
                         "links")
    if not any(out.iterdir()):
        return
    _check_replaceable(out)
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    log.info("removed the previous tilefuse image in %s", out)


# --------------------------------------------------------------------------------------------
# OME-TIFF files
# --------------------------------------------------------------------------------------------


def read_tiff_manifest(path: Path) -> dict | None:
    """The run manifest an OME-TIFF tilefuse wrote carries in its OME-XML, or None: a file
    that is not a TIFF, has no OME-XML, another ``Creator``, or no manifest annotation."""
    import xml.etree.ElementTree as ET

    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            description = tif.pages.first.description
        root = ET.fromstring(description)
    except (OSError, ValueError, IndexError, ET.ParseError, tifffile.TiffFileError):
        return None
    if not root.tag.endswith("OME") or not root.get("Creator", "").startswith("tilefuse "):
        return None
    for element in root.iter():
        if element.tag.endswith("CommentAnnotation") and \
                element.get("Namespace") == TIFF_MANIFEST_NAMESPACE:
            value = next((e.text for e in element if e.tag.endswith("Value")), None)
            try:
                saved = json.loads(value or "")
            except ValueError:
                return None
            return saved if isinstance(saved, dict) and "tilefuse" in saved else None
    return None


def check_tiff_output(path: str | os.PathLike, *, overwrite: bool, resume: bool = False,
                      inputs: Iterable[Path] = ()) -> Path:
    """Check that an OME-TIFF file may be written, before anything is read or computed.

    An existing file is replaced only with `overwrite`, and only when tilefuse wrote it
    (:func:`read_tiff_manifest`); never an input, a folder or a symbolic link. A resume is
    refused: an OME-TIFF is written in one go (from a temporary file renamed at the end).

    Raises
    ------
    InputError, FileExistsError
        With the reason and what to do.
    """
    refuse_url(path)
    out = Path(path)
    if resume:
        raise InputError(f"--resume is not available for an OME-TIFF output ({out}): it is "
                         "written in one go; run again with --overwrite, or write NAME.ome.zarr")
    _refuse_inputs(out, inputs, "output")
    if out.is_symlink():
        raise InputError(f"output {out} is a symbolic link; tilefuse does not write through "
                         "links: name the file itself")
    if out.is_dir():
        raise InputError(f"output {out} is a folder; an OME-TIFF output is a file name "
                         "ending in .ome.tif")
    if not out.exists():
        return out
    if not overwrite:
        mine = " (an OME-TIFF tilefuse wrote)" if read_tiff_manifest(out) is not None else ""
        raise FileExistsError(f"{out} exists{mine}; pass --overwrite to replace it")
    if read_tiff_manifest(out) is None:
        raise InputError(f"output {out} is a file that tilefuse did not write (no tilefuse "
                         "run manifest in its OME-XML); it is not replaced: choose another "
                         "name or move it away")
    return out
