"""The napari dock widget: a layout in, an OME-Zarr mosaic out, shown as a multiscale layer.

The run is :func:`tilefuse.pipeline.run_fusion`, the one ``tilefuse fuse`` makes, in a worker
thread: time series, registration, intensity correction, cyclic imaging (later cycles aligned
to cycle 1 on a shared channel, every channel of every cycle in one image), the layout saved
beside the image, resuming an interrupted run, and the output checks (never an input, never a
folder tilefuse did not make) are the command line's. Its progress bar is fed by the
pipeline's progress callback.

This and :mod:`tilefuse.napari.reader` are the only modules of tilefuse that import Qt or
napari; ``import tilefuse`` loads neither.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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

from tilefuse.errors import USER_ERRORS, InputError
from tilefuse.fusion.blend import BLENDS
from tilefuse.io.outputs import image_stem
from tilefuse.napari.reader import METADATA_KEY, place_tile_layers, resolved
from tilefuse.pipeline import FuseRequest, FuseResult, ProgressFn, run_fusion
from tilefuse.plan.chunking import DEFAULT_CHUNK

if TYPE_CHECKING:
    import dask.array as da
    import napari

__all__ = ["FuseWidget", "WidgetRun", "add_mosaic", "read_levels", "run_in_widget"]

log = logging.getLogger(__name__)

_AUTO = "auto"
"""What the chunk box shows at 0: no chunk given (memory budget, or the resumed run's)."""

FLATFIELD_CHOICES = ("none", "estimate")

CYCLE_SEPARATOR = ";"
"""Between the later cycles' layouts in the widget's field (paths may hold commas)."""


@dataclass
class WidgetRun:
    """What a run in the widget produced, or the user error that stopped it.

    Attributes
    ----------
    error : str or None
        One line for the user when the input or output was wrong; the rest is then unset.
    result : FuseResult or None
        The pipeline's result.
    levels : list of dask.array.Array
        The written image's resolution levels, finest first.
    messages : list of str
        What the pipeline had to say (registration summaries).
    """

    error: str | None = None
    result: FuseResult | None = None
    levels: list[da.Array] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


def run_in_widget(request: FuseRequest, progress: ProgressFn | None = None) -> WidgetRun:
    """Run :func:`tilefuse.pipeline.run_fusion`; user errors come back as ``run.error``.

    Parameters
    ----------
    request : FuseRequest
    progress : callable, optional
        ``progress(done, total, label)``, called from this thread (the widget relays it).

    Returns
    -------
    WidgetRun
        Bugs (anything but a user error) are raised, not returned.
    """
    messages: list[str] = []
    try:
        result = run_fusion(request, progress=progress, message=messages.append)
    except USER_ERRORS as exc:
        return WidgetRun(error=_message(exc), messages=messages)
    return WidgetRun(result=result, levels=read_levels(result.output), messages=messages)


def _message(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, InputError) else f"{type(exc).__name__}: {text}"


def read_levels(path: str | os.PathLike) -> list[da.Array]:
    """All resolution levels of an OME-Zarr image, finest first (lazy dask arrays)."""
    from tilefuse.ome_zarr.writer import read_ome_zarr_level

    levels = [read_ome_zarr_level(path, 0)]
    coarsest = read_ome_zarr_level(path, -1)
    while levels[-1].shape != coarsest.shape:
        levels.append(read_ome_zarr_level(path, len(levels)))
    return levels


def add_mosaic(viewer: napari.Viewer, run: WidgetRun) -> list:
    """Show a written mosaic: one multiscale layer (one per channel for several channels),
    translated to the mosaic's origin in layout pixels; a time series keeps its ``t`` axis."""
    assert run.result is not None
    mosaic = run.result.mosaic
    name = image_stem(run.result.output)
    meta = {METADATA_KEY: {"output": resolved(run.result.output)}}
    translate = (*(0.0 for a in mosaic.axes if a == "t"), *mosaic.origin)
    if "c" in mosaic.axes:
        n = len(mosaic.channel_names)
        return viewer.add_image(
            run.levels, multiscale=True, channel_axis=mosaic.axes.index("c"),
            name=[f"{name} [{c}]" for c in mosaic.channel_names],
            translate=[translate] * n, metadata=[meta] * n,
        )
    return [viewer.add_image(run.levels, multiscale=True, name=name, translate=translate,
                             metadata=meta)]


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
        What the last run had to say (the registration summary).
    """

    progress_changed = Signal(int, int, str)
    run_finished = Signal()

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker: Any = None
        self._build()
        self.progress_changed.connect(self._show_progress)

    # -- layout of the widget ---------------------------------------------------------------

    def _build(self) -> None:
        self.layout_path = _line("TileConfiguration.txt, .csv, .czi, folder")
        self.pattern = _line("folder only: tile_{index}.tif (or img_t{t}_{index}.tif)")
        self.grid = _line("folder only: ROWSxCOLS")
        self.overlap = _line("folder only: 0.1")
        self.cycles = _line("cyclic imaging: cycle 2, 3… layouts, separated by ;")
        self.align_channel = _line("cycles only: their shared channel, e.g. DAPI (default: first)")
        self.output_path = _line("mosaic.ome.zarr")
        self.blend = QComboBox()
        self.blend.addItems(BLENDS)
        self.chunk = QSpinBox()  # its minimum, 0, reads "auto": as fuse without --chunk
        self.chunk.setRange(0, 8192)
        self.chunk.setSingleStep(64)
        self.chunk.setSpecialValueText(_AUTO)
        self.chunk.setValue(0)
        self.chunk.setToolTip(f"output chunk in pixels; {_AUTO}: the largest the memory budget "
                              f"allows, or an interrupted run's (typical: {DEFAULT_CHUNK})")
        self.flatfield = QComboBox()
        self.flatfield.addItems(FLATFIELD_CHOICES)
        self.register_first = QCheckBox("register first")
        self.match_intensity = QCheckBox("match tile intensities")
        self.overwrite = QCheckBox("overwrite output")
        self.resume = QCheckBox("resume an interrupted run")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setTextVisible(True)
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.status = _label()
        self.summary = _label()

        form = QFormLayout()
        form.addRow("layout", self._with_buttons(
            self.layout_path, ("file…", self._browse_layout), ("folder…", self._browse_folder)))
        form.addRow("pattern", self.pattern)
        form.addRow("grid", self.grid)
        form.addRow("overlap", self.overlap)
        form.addRow("later cycles", self._with_buttons(self.cycles, ("add…", self._add_cycles)))
        form.addRow("align channel", self.align_channel)
        form.addRow("output", self._with_buttons(self.output_path, ("…", self._browse_output)))
        form.addRow("blend", self.blend)
        form.addRow("chunk", self.chunk)
        form.addRow("flat field", self.flatfield)
        box = QVBoxLayout(self)
        box.addLayout(form)
        for widget in (self.register_first, self.match_intensity, self.overwrite, self.resume,
                       self.run_button, self.progress, self.status, self.summary):
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

    def _add_cycles(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(
            self, "Later cycles (cycle 2, 3…)", "",
            "Layouts (*.txt *.csv *.czi *.ome.tif *.ome.tiff);;All (*)")
        if paths:
            self.cycles.setText(CYCLE_SEPARATOR.join([*self._cycle_paths(), *paths]))

    def _cycle_paths(self) -> list[str]:
        """The later cycles' layouts in the field, in order."""
        return [os.path.expanduser(p.strip())
                for p in self.cycles.text().split(CYCLE_SEPARATOR) if p.strip()]

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
            No layout or no output given, or the overlap is not a number.
        """
        layout, output = self.layout_path.text().strip(), self.output_path.text().strip()
        if not layout:
            raise InputError("give a layout file (or a folder of tiles with a pattern)")
        if not output:
            raise InputError("give an output path, e.g. mosaic.ome.zarr")
        overlap: float | None = None
        if text := self.overlap.text().strip():
            try:
                overlap = float(text)
            except ValueError:
                raise InputError(f"overlap must be a number such as 0.1, got {text!r}") from None
        flatfield = self.flatfield.currentText()
        cycles = tuple(self._cycle_paths())
        channel = self.align_channel.text().strip()
        if channel and not cycles:
            raise InputError("an align channel is for cyclic imaging: give the later cycles' "
                             "layouts too")
        return FuseRequest(
            layout=os.path.expanduser(layout), output=os.path.expanduser(output),
            pattern=self.pattern.text().strip() or None, grid=self.grid.text().strip() or None,
            overlap=overlap, blend=self.blend.currentText(),
            register=self.register_first.isChecked(), chunk=self.chunk.value() or None,
            flatfield=None if flatfield == "none" else flatfield,
            match_intensity=self.match_intensity.isChecked(),
            overwrite=self.overwrite.isChecked(), resume=self.resume.isChecked(),
            cycles=cycles, align_channel=(channel,) if channel else (),
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
        self.worker = thread_worker(run_in_widget)(request, self.progress_changed.emit)
        self.worker.returned.connect(lambda run: self._done(request, run))
        self.worker.errored.connect(self._crashed)
        self.worker.start()

    def _drop_mosaic_layers(self, output: str | os.PathLike) -> None:
        """Remove layers showing `output` before it is overwritten under them."""
        target = resolved(output)
        for layer in list(self.viewer.layers):
            info = layer.metadata.get(METADATA_KEY)
            if isinstance(info, dict) and info.get("output") == target:
                self.viewer.layers.remove(layer)

    def _show_progress(self, done: int, total: int, label: str) -> None:
        self.progress.setRange(0, total)
        self.progress.setValue(done)
        self.progress.setFormat(f"{label} %p%" if total else label)

    def _done(self, request: FuseRequest, run: WidgetRun) -> None:
        self.summary.setText("\n".join(run.messages))
        if run.error is not None or run.result is None:
            self._fail(run.error or "no result")
            return
        if request.register:
            place_tile_layers(self.viewer, run.result.layout, resolved(request.layout))
        add_mosaic(self.viewer, run)
        self.status.setText(f"already complete: {run.result.output}" if run.result.complete
                            else f"wrote {run.result.output}")
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


def _line(placeholder: str) -> QLineEdit:
    edit = QLineEdit()
    edit.setPlaceholderText(placeholder)
    return edit


def _label() -> QLabel:
    label = QLabel()
    label.setWordWrap(True)
    return label
