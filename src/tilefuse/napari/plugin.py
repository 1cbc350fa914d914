"""The napari plugin: open tile layouts as placed tiles, fuse them from a dock widget.

Two contributions, declared in ``napari.yaml``:

- a reader (:func:`get_reader`) for the layout files :func:`tilefuse.read_layout` reads
  (TileConfiguration ``.txt``, ``.csv``, ``.czi``, ``.ome.tif``): one image layer per tile and
  channel, placed by the tile's affine in mosaic pixel units, blended additively so overlaps
  (and any misplacement) show up brighter;
- a dock widget (:class:`FuseWidget`): read a layout, optionally register it, fuse it into an
  OME-Zarr in a worker thread with a progress bar, then show the mosaic as one multiscale layer.

This is the only module of tilefuse that imports Qt or napari; ``import tilefuse`` never loads it.
Everything is in mosaic pixel units (no ``scale``), so tiles and fused mosaic overlay exactly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from tilefuse.errors import InputError
from tilefuse.fusion.blend import BLENDS
from tilefuse.io.readers import read_layout
from tilefuse.io.tiles import read_tile
from tilefuse.model.layout import Layout

if TYPE_CHECKING:
    import dask.array as da
    import napari

__all__ = ["FuseRequest", "FuseResult", "FuseWidget", "get_reader", "run_fusion", "tile_layers"]

log = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]
ProgressFn = Callable[[int, int, str], None]

USER_ERRORS = (InputError, FileNotFoundError, FileExistsError, PermissionError,
               NotADirectoryError, IsADirectoryError)
METADATA_KEY = "tilefuse"
COLORMAPS = ("green", "magenta", "cyan", "yellow", "red", "blue")
DEFAULT_CHUNK = 1024


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


def get_reader(path: str | Sequence[str]) -> Callable[[Any], list[LayerData]] | None:
    """The reader for ``path`` if :func:`tilefuse.read_layout` can read it, else None.

    The layout is read here (headers only, no pixels), so napari falls through to other
    readers for text, CSV or TIFF files that are not tile layouts. Never raises.

    Parameters
    ----------
    path : str or sequence of str
        What napari asks to open; a list is accepted when it holds exactly one path.

    Returns
    -------
    callable or None
        ``reader(path) -> list of LayerData``, or None when this is not a readable layout.
    """
    if not isinstance(path, str | os.PathLike):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        layout = read_layout(path)
    except Exception as exc:  # any failure means "not ours": napari tries other readers
        log.debug("tilefuse does not read %s: %s", path, exc)
        return None
    source = _resolved(path)
    return lambda _path: tile_layers(layout, source=source)


def tile_layers(layout: Layout, *, source: str | None = None) -> list[LayerData]:
    """One image layer per tile and channel, placed by the tile's affine (mosaic pixels).

    Parameters
    ----------
    layout : Layout
        The tiles; their pixels are read now.
    source : str, optional
        The layout file the tiles came from; stored in each layer's metadata so that
        :class:`FuseWidget` can move the layers to their registered positions.

    Returns
    -------
    list of (data, meta, "image")
        ``data`` is one channel of a tile, shape ``tile.shape``; ``meta`` holds name, affine,
        blending, colormap, contrast limits (shared per channel) and metadata.
    """
    pixels = [read_tile(tile.source) for tile in layout.tiles]
    limits = _contrast_limits(pixels)
    multi = len(layout.channels) > 1
    layers = []
    for tile, data in zip(layout.tiles, pixels):
        for c, channel in enumerate(layout.channels):
            meta = {
                "name": f"{tile.name} [{channel}]" if multi else tile.name,
                "affine": np.array(tile.affine),
                "blending": "additive",
                "colormap": COLORMAPS[c % len(COLORMAPS)] if multi else "gray",
                "contrast_limits": limits[c],
                "metadata": {METADATA_KEY: {"layout": source, "tile": tile.name,
                                            "channel": channel}},
            }
            layers.append((data[c], meta, "image"))
    return layers


def _resolved(path: str | os.PathLike) -> str:
    return str(Path(path).resolve())


def _contrast_limits(pixels: Sequence[np.ndarray]) -> list[tuple[float, float]]:
    """Per-channel (min, max) over all tiles, so every tile of a channel is shown alike."""
    lo = np.min([p.reshape(p.shape[0], -1).min(axis=1) for p in pixels], axis=0)
    hi = np.max([p.reshape(p.shape[0], -1).max(axis=1) for p in pixels], axis=0)
    return [(float(a), float(b) if b > a else float(a) + 1.0) for a, b in zip(lo, hi)]


def place_tile_layers(viewer: napari.Viewer, layout: Layout, source: str) -> int:
    """Move the tile layers read from ``source`` to the placements in ``layout``.

    Parameters
    ----------
    viewer : napari.Viewer
    layout : Layout
        The same tiles (matched by name), e.g. after registration.
    source : str
        The layout file the layers were read from (resolved path).

    Returns
    -------
    int
        Number of layers moved.
    """
    affines = {tile.name: tile.affine for tile in layout.tiles}
    moved = 0
    for layer in viewer.layers:
        info = layer.metadata.get(METADATA_KEY)
        if not isinstance(info, dict) or info.get("layout") != source:
            continue
        if info.get("tile") in affines:
            layer.affine = np.array(affines[info["tile"]])
            moved += 1
    return moved


# --------------------------------------------------------------------------------------------
# Fusion, off the UI thread
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FuseRequest:
    """What the widget asks for.

    Attributes
    ----------
    layout : str
        Layout file, or a folder of tiles (then ``options`` holds at least ``pattern``).
    output : str
        The OME-Zarr folder to write.
    blend : str
        One of :data:`tilefuse.fusion.blend.BLENDS`.
    register : bool
        Refine tile positions from the pixels before fusing.
    overwrite : bool
        Replace an existing ``output``.
    chunk : int
        Output chunk size along y and x.
    options : dict
        Options for :func:`tilefuse.read_layout` (``pattern``, ``grid``, ``overlap``).
    """

    layout: str
    output: str
    blend: str = "linear"
    register: bool = False
    overwrite: bool = False
    chunk: int = DEFAULT_CHUNK
    options: dict = field(default_factory=dict)


@dataclass
class FuseResult:
    """What a fusion run produced, or the user error that stopped it.

    Attributes
    ----------
    error : str or None
        One line for the user when the input was wrong; the other fields are then unset.
    output : pathlib.Path or None
        The written OME-Zarr folder.
    levels : list of dask.array.Array
        Its resolution levels, finest first.
    origin : numpy.ndarray or None
        Mosaic pixel index of the mosaic's first pixel (the layer's translation), zyx.
    layout : Layout or None
        The layout that was fused (registered when asked).
    channels : tuple of str
        Channel names of the mosaic.
    summary : list of str
        The registration summary; empty without registration.
    """

    error: str | None = None
    output: Path | None = None
    levels: list = field(default_factory=list)
    origin: np.ndarray | None = None
    layout: Layout | None = None
    channels: tuple[str, ...] = ()
    summary: list[str] = field(default_factory=list)


def run_fusion(request: FuseRequest, progress: ProgressFn | None = None) -> FuseResult:
    """Read, optionally register, fuse and write; user errors come back as ``result.error``.

    Parameters
    ----------
    request : FuseRequest
    progress : callable, optional
        ``progress(done, total, label)``; ``total == 0`` means "busy, no count". Called from
        this thread (the caller relays it to the UI).

    Returns
    -------
    FuseResult
        Bugs (anything but a user error) are raised, not returned.
    """
    try:
        return _fuse(request, progress or _no_progress)
    except USER_ERRORS as exc:
        return FuseResult(error=_message(exc))


def _no_progress(done: int, total: int, label: str) -> None:
    """Progress sink that ignores everything."""


def _message(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, InputError) else f"{type(exc).__name__}: {text}"


def _check_output(request: FuseRequest) -> Path:
    """The output path, refused before any work when it cannot be written."""
    if not request.layout.strip():
        raise InputError("give a layout file (or a folder of tiles with a pattern)")
    if not request.output.strip():
        raise InputError("give an output path, e.g. mosaic.ome.zarr")
    output = Path(request.output).expanduser()
    if output.exists() and not request.overwrite:
        raise FileExistsError(f"{output} exists; tick 'overwrite' to replace it")
    return output


def _fuse(request: FuseRequest, progress: ProgressFn) -> FuseResult:
    from tilefuse.fusion.graph import fuse, fused_axes, plan_fusion
    from tilefuse.ome_zarr.writer import write_ome_zarr

    output = _check_output(request)
    progress(0, 0, "reading layout")
    layout = read_layout(Path(request.layout).expanduser(), **request.options)
    summary: list[str] = []
    if request.register:
        from tilefuse.registration import register

        progress(0, 0, "registering")
        layout, report = register(layout)
        summary = report.summary_lines()
    chunk = (*(() if layout.ndim == 2 else (min(request.chunk, 64),)), request.chunk,
             request.chunk)
    plan = plan_fusion(layout, chunk=chunk, blend=request.blend)
    written = write_ome_zarr(
        fuse(plan), output, axes=fused_axes(layout), pixel_size=layout.pixel_size,
        unit=layout.unit, channel_names=layout.channels, overwrite=request.overwrite,
        compute=_progress_compute(progress),
    )
    return FuseResult(output=written, levels=read_levels(written), origin=plan.chunks.origin,
                      layout=layout, channels=layout.channels, summary=summary)


def _progress_compute(progress: ProgressFn) -> Callable[..., tuple]:
    """A ``compute(*collections)`` for :func:`write_ome_zarr` that reports tasks done.

    The dask callbacks are passed to this compute only (not registered globally), so napari's
    own dask computations in the UI thread neither count here nor see these tasks.
    """
    import dask

    calls = iter(range(1 << 30))

    def compute(*collections, label: str | None = None):
        k = next(calls)
        label = label or ("fusing" if k == 0 else f"pyramid level {k}")
        counts = {"done": 0, "total": 0}

        def start_state(dsk, state):
            counts["total"] = sum(len(state[s]) for s in ("ready", "waiting", "running"))
            counts["total"] += len(state["finished"])
            progress(0, counts["total"], label)

        def posttask(key, result, dsk, state, worker_id):
            counts["done"] += 1
            done, total = counts["done"], counts["total"]
            if done == total or done % max(1, total // 200) == 0:  # <= 200 UI updates
                progress(done, total, label)

        callbacks = [(None, start_state, None, posttask, None)]
        return dask.compute(*collections, scheduler="threads", callbacks=callbacks)

    return compute


def read_levels(path: str | os.PathLike) -> list[da.Array]:
    """All resolution levels of an OME-Zarr image, finest first (lazy dask arrays)."""
    from tilefuse.ome_zarr.writer import read_ome_zarr_level

    levels = [read_ome_zarr_level(path, 0)]
    coarsest = read_ome_zarr_level(path, -1)
    while levels[-1].shape != coarsest.shape:
        levels.append(read_ome_zarr_level(path, len(levels)))
    return levels


def mosaic_name(output: str | os.PathLike) -> str:
    """Layer name of a mosaic: the folder name without ``.ome.zarr`` / ``.zarr``."""
    name = Path(output).name
    for ext in (".ome.zarr", ".zarr"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def add_mosaic(viewer: napari.Viewer, result: FuseResult) -> list:
    """Show a written mosaic: one multiscale layer (one per channel for several channels)."""
    origin = tuple(float(v) for v in result.origin)
    name = mosaic_name(result.output)
    meta = {METADATA_KEY: {"output": _resolved(result.output)}}
    if len(result.channels) > 1:
        n = len(result.channels)
        return viewer.add_image(
            result.levels, multiscale=True, channel_axis=0,
            name=[f"{name} [{c}]" for c in result.channels],
            translate=[origin] * n, metadata=[meta] * n,
        )
    return [viewer.add_image(result.levels, multiscale=True, name=name, translate=origin,
                             metadata=meta)]


# --------------------------------------------------------------------------------------------
# Widget
# --------------------------------------------------------------------------------------------


class FuseWidget(QWidget):
    """Dock widget: layout in, OME-Zarr mosaic out, shown as a multiscale layer.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        Injected by napari.

    Attributes
    ----------
    status : QLabel
        What is happening, or the user error that stopped the run.
    summary : QLabel
        The registration summary of the last run.
    """

    progress_changed = Signal(int, int, str)
    run_finished = Signal()

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None
        self._build()
        self.progress_changed.connect(self._show_progress)

    # -- layout of the widget ---------------------------------------------------------------

    def _build(self) -> None:
        self.layout_path = QLineEdit(placeholderText="TileConfiguration.txt, .csv, .czi, folder")
        self.pattern = QLineEdit(placeholderText="folder only: tile_{index}.tif")
        self.grid = QLineEdit(placeholderText="folder only: ROWSxCOLS")
        self.overlap = QLineEdit(placeholderText="folder only: 0.1")
        self.output_path = QLineEdit(placeholderText="mosaic.ome.zarr")
        self.blend = QComboBox()
        self.blend.addItems(BLENDS)
        self.chunk = QSpinBox()
        self.chunk.setRange(16, 8192)
        self.chunk.setSingleStep(64)
        self.chunk.setValue(DEFAULT_CHUNK)
        self.register_first = QCheckBox("register first")
        self.overwrite = QCheckBox("overwrite output")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setTextVisible(True)
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.status = QLabel(wordWrap=True)
        self.summary = QLabel(wordWrap=True)

        form = QFormLayout()
        form.addRow("layout", self._with_buttons(
            self.layout_path, ("file…", self._browse_layout), ("folder…", self._browse_folder)))
        form.addRow("pattern", self.pattern)
        form.addRow("grid", self.grid)
        form.addRow("overlap", self.overlap)
        form.addRow("output", self._with_buttons(self.output_path, ("…", self._browse_output)))
        form.addRow("blend", self.blend)
        form.addRow("chunk", self.chunk)
        box = QVBoxLayout(self)
        box.addLayout(form)
        for widget in (self.register_first, self.overwrite, self.run_button, self.progress,
                       self.status, self.summary):
            box.addWidget(widget)
        box.addStretch()

    def _with_buttons(self, edit: QLineEdit, *buttons: tuple[str, Callable[[], None]]) -> QWidget:
        row = QWidget()
        line = QHBoxLayout(row)
        line.setContentsMargins(0, 0, 0, 0)
        line.addWidget(edit)
        for text, slot in buttons:
            button = QPushButton(text)
            button.clicked.connect(slot)
            line.addWidget(button)
        return row

    def _browse_layout(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Tile layout", "", "Layouts (*.txt *.csv *.czi *.ome.tif *.ome.tiff);;All (*)"
        )
        if path:
            self.layout_path.setText(path)

    def _browse_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Folder of tiles (give a pattern)")
        if path:
            self.layout_path.setText(path)

    def _browse_output(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Output OME-Zarr", "mosaic.ome.zarr")
        if path:
            self.output_path.setText(path)

    # -- running ----------------------------------------------------------------------------

    def request(self) -> FuseRequest:
        """The run the fields describe.

        Raises
        ------
        InputError
            The overlap is not a number.
        """
        options: dict[str, Any] = {
            "pattern": self.pattern.text().strip() or None,
            "grid": self.grid.text().strip() or None,
        }
        overlap = self.overlap.text().strip()
        if overlap:
            try:
                options["overlap"] = float(overlap)
            except ValueError:
                raise InputError(f"overlap must be a number such as 0.1, got {overlap!r}") from None
        return FuseRequest(
            layout=self.layout_path.text().strip(), output=self.output_path.text().strip(),
            blend=self.blend.currentText(), register=self.register_first.isChecked(),
            overwrite=self.overwrite.isChecked(), chunk=self.chunk.value(),
            options={k: v for k, v in options.items() if v is not None},
        )

    def run(self) -> None:
        """Start a run in a worker thread; ``run_finished`` is emitted when it is over."""
        from napari.qt.threading import thread_worker

        if not self.run_button.isEnabled():  # a run is in progress
            return
        try:
            request = self.request()
        except InputError as exc:
            self._fail(str(exc))
            return
        if request.overwrite:
            self._drop_mosaic_layers(request.output)
        self.run_button.setEnabled(False)
        self.status.setText("running…")
        self.summary.setText("")
        self.worker = thread_worker(run_fusion)(request, self.progress_changed.emit)
        self.worker.returned.connect(lambda result: self._done(request, result))
        self.worker.errored.connect(self._crashed)
        self.worker.start()

    def _drop_mosaic_layers(self, output: str) -> None:
        """Remove layers showing ``output`` before it is overwritten under them."""
        target = _resolved(output)
        for layer in list(self.viewer.layers):
            info = layer.metadata.get(METADATA_KEY)
            if isinstance(info, dict) and info.get("output") == target:
                self.viewer.layers.remove(layer)

    def _show_progress(self, done: int, total: int, label: str) -> None:
        self.progress.setRange(0, total)
        self.progress.setValue(done)
        self.progress.setFormat(f"{label} %p%" if total else label)

    def _done(self, request: FuseRequest, result: FuseResult) -> None:
        if result.error is not None:
            self._fail(result.error)
            return
        if request.register:
            place_tile_layers(self.viewer, result.layout, _resolved(request.layout))
        add_mosaic(self.viewer, result)
        self.summary.setText("\n".join(result.summary))
        self.status.setText(f"wrote {result.output}")
        self._show_progress(1, 1, "done")
        self._finish()

    def _fail(self, message: str) -> None:
        self.status.setText(f"Error: {message}")
        self._show_progress(0, 1, "")
        self._finish()

    def _crashed(self, exc: Exception) -> None:
        """A bug, not a user error: napari shows the traceback; the widget is usable again."""
        self.status.setText(f"failed: {type(exc).__name__}: {exc}")
        self._finish()

    def _finish(self) -> None:
        self.run_button.setEnabled(True)
        self.run_finished.emit()
