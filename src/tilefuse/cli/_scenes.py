"""``--scene all``: one fusion run per scene of a CZI, each output named after its scene.

One output per scene rather than one OME-Zarr collection: scenes are separate regions with their
own extents and tiles, so each is an ordinary image that every viewer opens, with its own
layout files beside it and its own resume.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tilefuse import _run
from tilefuse.errors import InputError
from tilefuse.io.outputs import image_stem, refuse_url
from tilefuse.pipeline import FuseRequest

__all__ = ["scene_output", "scene_requests"]

_TIFF_NAMES = (".ome.tiff", ".ome.tif")


def scene_requests(request: FuseRequest) -> list[FuseRequest]:
    """The runs a request makes: itself, or with ``scene="all"`` one per scene of its CZI.

    Each scene's output (and report) is named after the scene (:func:`scene_output`), the name
    being ZEN's scene name or ``S<index>`` (:func:`tilefuse.io.readers.czi.czi_scenes`). An
    existing output of any scene is refused before anything is fused (unless `overwrite` or
    `resume`), so a run never stops half way through the scenes on a name clash.

    Raises
    ------
    InputError
        ``scene="all"`` for an input that is not a CZI file.
    FileExistsError
        A scene's output exists and neither `overwrite` nor `resume` is set.
    """
    if request.scene != "all":
        return [request]
    if not str(request.layout).lower().endswith(".czi"):
        raise InputError(f"--scene all: {request.layout} is not a CZI file; scenes are a CZI's")
    refuse_url(request.output, "-o")
    runs = []
    from tilefuse.io.readers.czi import czi_scenes  # only for a CZI

    for index, name in czi_scenes(request.layout).items():
        out = scene_output(Path(request.output), name)
        if (out.exists() or out.is_symlink()) and not (request.overwrite or request.resume):
            raise FileExistsError(f"{out} exists (scene {index} of {request.layout}); pass "
                                  "--overwrite to replace it or --resume to continue it")
        report = None if request.report is None else _run.report_file(request.report, f".{name}")
        runs.append(replace(request, scene=index, output=out, report=report))
    return runs


def scene_output(output: Path, name: str) -> Path:
    """The output of scene `name`: the name before the image suffix.

    >>> scene_output(Path("out/m.ome.zarr"), "S1"), scene_output(Path("m.ome.tif"), "A1")
    (PosixPath('out/m.S1.ome.zarr'), PosixPath('m.A1.ome.tif'))
    """
    stem = image_stem(output)
    if stem == output.name:  # not a zarr name
        lower = output.name.lower()
        cut = next((len(s) for s in _TIFF_NAMES if lower.endswith(s)), len(output.suffix))
        stem = output.name[: len(output.name) - cut] if cut else output.name
    return output.with_name(f"{stem}.{name}{output.name[len(stem):]}")
