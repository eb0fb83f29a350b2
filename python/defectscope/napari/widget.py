"""The "Find defects" napari dock widget (Qt); see :mod:`defectscope.napari.plugin`."""

from __future__ import annotations

import logging
import threading

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QWidget,
)

from defectscope.io.frames import Calibration
from defectscope.maps.options import MapOptions
from defectscope.napari.plugin import map_layers

log = logging.getLogger("defectscope")


class FindDefects(QWidget):
    """Map the selected image layer (each frame of a stack) without freezing the viewer.

    The map runs in a napari worker thread; the progress bar counts engine batches
    (the detector's ``cancel`` hook is called between them), and Cancel stops the map
    at the next batch. The model artifact and backend, and the map options (stride,
    number of ROIs, mode, unknown policy, background class, scale matching: a
    :class:`~defectscope.maps.options.MapOptions`, see :meth:`options`) are the
    widget's fields; the status line says how each frame's scale was matched (and
    warns when it could not be) and flags a frame that is out of distribution; a layer
    that names its model in ``metadata["defectscope_model"]`` (the sample data does)
    fills the model field. The progress bar counts the windows of the frame as
    recorded: a frame resampled to the model's scale has ``factor**2`` as many.
    """

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.model = QLineEdit()
        self.model.setPlaceholderText("model directory, .onnx or TensorRT engine")
        browse = QPushButton("Browse...")
        browse.clicked.connect(self._browse)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model)
        model_row.addWidget(browse)
        self.backend = QComboBox()
        self.backend.addItems(["auto", "onnxruntime", "torch", "tensorrt"])
        self.stride = QSpinBox()
        self.stride.setRange(1, 1024)
        self.stride.setValue(16)
        self.top = QSpinBox()
        self.top.setRange(1, 1000)
        self.top.setValue(10)
        # Choices and tips from the MapOptions fields: one meaning everywhere.
        fields = MapOptions.__dataclass_fields__
        self.mode = QComboBox()
        self.mode.addItems(list(fields["mode"].metadata["choices"]))
        self.mode.setToolTip(fields["mode"].metadata["help"])
        self.unknown = QComboBox()
        self.unknown.addItems(list(fields["unknown"].metadata["choices"]))
        self.unknown.setToolTip(fields["unknown"].metadata["help"])
        self.novelty = QComboBox()
        self.novelty.addItems(list(fields["novelty"].metadata["choices"]))
        self.novelty.setToolTip(fields["novelty"].metadata["help"])
        self.background = QLineEdit()
        self.background.setPlaceholderText("the model's own (e.g. Bulk)")
        self.scale = QLineEdit("auto")
        self.scale.setToolTip(fields["scale"].metadata["help"])
        self.run_button = QPushButton("Find defects")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.status = QLabel("select an image layer")
        form = QFormLayout(self)
        form.addRow("model", model_row)
        form.addRow("backend", self.backend)
        form.addRow("stride (px)", self.stride)
        form.addRow("ROIs", self.top)
        form.addRow("mode", self.mode)
        form.addRow("unknown regions", self.unknown)
        form.addRow("what is unknown", self.novelty)
        form.addRow("background class", self.background)
        form.addRow("scale (auto, off or factor)", self.scale)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        form.addRow(buttons)
        form.addRow(self.progress)
        form.addRow(self.status)
        self._lock = threading.Lock()
        self._done = self._total = 0
        self._cancelled = False
        self._detector = None
        self._detector_key = None
        self.worker = None
        self.error: BaseException | None = None
        self._timer = QTimer(self)
        self._timer.setInterval(200)
        self._timer.timeout.connect(self._show_progress)
        self.viewer.layers.selection.events.active.connect(self._fill_model)
        self._fill_model()

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "model directory") or ""
        if path:
            self.model.setText(path)

    def _image_layer(self):
        from napari.layers import Image

        layer = self.viewer.layers.selection.active
        if isinstance(layer, Image) and not layer.rgb:
            return layer
        images = [lyr for lyr in self.viewer.layers if isinstance(lyr, Image) and not lyr.rgb]
        return images[-1] if len(images) == 1 else None

    def _fill_model(self, event=None) -> None:
        layer = self._image_layer()
        if layer is not None and not self.model.text():
            self.model.setText(str(layer.metadata.get("defectscope_model", "")))

    def options(self) -> MapOptions:
        """The map options the fields hold.

        Raises
        ------
        ValueError
            Naming the field, for a value :class:`MapOptions` refuses.
        """
        return MapOptions(
            stride=self.stride.value(),
            top_k=self.top.value(),
            mode=self.mode.currentText(),
            unknown=self.unknown.currentText(),
            novelty=self.novelty.currentText(),
            background=self.background.text().strip() or None,
            scale=self.scale.text().strip() or "auto",
        )

    def set_options(self, options: MapOptions) -> None:
        """Show ``options`` in the fields (those the widget has)."""
        self.stride.setValue(options.stride)
        self.top.setValue(options.top_k)
        self.mode.setCurrentText(options.mode)
        self.unknown.setCurrentText(options.unknown)
        self.novelty.setCurrentText(options.novelty)
        self.background.setText(options.background or "")
        self.scale.setText(str(options.scale))

    def run(self) -> None:
        """Start mapping the selected image layer in a worker thread."""
        from napari.qt.threading import create_worker

        if self.busy:
            return
        layer = self._image_layer()
        if layer is None:
            self.status.setText("select one gray image layer first")
            return
        if not self.model.text():
            self.status.setText("choose a model first")
            return
        try:
            options = self.options()
        except ValueError as error:
            self.status.setText(f"error: {error}")
            return
        data = np.asarray(layer.data)
        frames = data[None] if data.ndim == 2 else data.reshape(-1, *data.shape[-2:])
        settings = {
            "artifact": self.model.text(),
            "backend": self.backend.currentText(),
            "options": options,
            "calibration": _layer_calibration(layer),
        }
        self._done, self._total, self._cancelled, self.error = 0, 0, False, None
        self.worker = create_worker(self._map_frames, frames, settings)
        self.worker.returned.connect(lambda results: self._add_layers(layer, results))
        self.worker.errored.connect(self._failed)
        self.worker.finished.connect(self._finished)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText(f"mapping {len(frames)} frame(s) of {layer.name}")
        self._timer.start()
        self.worker.start()

    def cancel(self) -> None:
        self._cancelled = True
        self.status.setText("cancelling at the next batch")

    def _tick(self) -> bool:
        with self._lock:
            self._done += 1
        return self._cancelled

    def _map_frames(self, frames: np.ndarray, settings: dict) -> list | None:
        from defectscope.maps.detector import Detector, MapCancelled
        from defectscope.tiling.tiler import window_origins

        options: MapOptions = settings["options"]
        key = (settings["artifact"], settings["backend"])
        if self._detector_key != key:
            if self._detector is not None:
                self._detector.close()
            self._detector = None  # a failed load must not leave the old one keyed
            self._detector_key = None
            self._detector = Detector.load(settings["artifact"], backend=settings["backend"])
            self._detector_key = key
        detector = self._detector
        patch = detector.engine.config.patch_size
        windows = len(window_origins(frames.shape[-2:], patch, options.stride))
        self._total = len(frames) * -(-windows // detector.batch_size)
        results = []
        for frame in frames:
            try:
                found = detector.find(
                    frame, options, calibration=settings["calibration"], cancel=self._tick
                )
            except MapCancelled:  # asked for, not an error: no layers are added
                return None
            results.append((found.result, found.rois))
        return results

    def _show_progress(self) -> None:
        if self._total:
            self.progress.setMaximum(self._total)
            self.progress.setValue(min(self._done, self._total))

    def _add_layers(self, layer, results: list | None) -> None:
        try:
            self._add_result_layers(layer, results)
        except Exception as error:  # raised in a Qt slot it would be lost: show it
            self._failed(error)

    def _add_result_layers(self, layer, results: list | None) -> None:
        from napari.layers import Layer

        if results is None:
            self.status.setText("cancelled: no layers added")
            return
        geometry = {"scale": tuple(layer.scale[-2:]), "translate": tuple(layer.translate[-2:])}
        units = getattr(layer, "units", None)
        if units is not None:
            geometry["units"] = tuple(str(u) for u in units[-2:])
        for index, (result, rois) in enumerate(results):
            name = layer.name if len(results) == 1 else f"{layer.name} [{index}]"
            for data, kwargs, kind in map_layers(result, rois, name, geometry):
                self.viewer.add_layer(Layer.create(data, kwargs, kind))
        regions = sum(len(r.regions()) for r, _ in results)
        status = f"{regions} regions, {sum(len(r) for _, r in results)} ROIs"
        self.status.setText("\n".join([status, *_result_notes([r for r, _ in results])]))

    def _failed(self, error: BaseException) -> None:
        self.error = error
        self.status.setText(f"error: {error}")

    def _finished(self) -> None:
        self._timer.stop()
        self._show_progress()
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.worker = None


def _result_notes(results: list) -> list[str]:
    """Status lines: how the frames' scale was matched, and out-of-distribution frames."""
    from defectscope.maps.scale import describe

    notes = []
    records = [r.info.get("scale") for r in results]
    shown = [rec for rec in records if rec and (rec.get("applied") or rec.get("warning"))]
    if shown:
        more = f" (and {len(shown) - 1} more frames)" if len(shown) > 1 else ""
        notes.append(describe(shown[0]) + more)
    ood = [r for r in results if r.unknown is not None and r.out_of_distribution]
    if ood:
        share = max(max(r.unknown_share, r.ood_check_share or 0.0) for r in ood)
        notes.append(
            f"out of distribution: {len(ood)} of {len(results)} frame(s), up to {share:.0%} "
            "of windows unknown; ROIs only when unknown regions are explored"
        )
    return notes


def _layer_calibration(layer) -> Calibration | None:
    """The calibration a reader stored in the layer's metadata, if any.

    One that cannot be a calibration (a pixel size that is not a finite number > 0)
    is left out with one warning line: the frame is then mapped uncalibrated.
    """
    stored = layer.metadata.get("calibration")
    if not stored:
        return None
    try:
        return Calibration(tuple(stored["scale"]), tuple(stored["offset"]), str(stored["unit"]))
    except (KeyError, TypeError, ValueError) as error:
        log.warning("layer %s: calibration refused (%s); mapped uncalibrated", layer.name, error)
        return None


def find_defects_widget(napari_viewer):
    """The "Find defects" dock widget (npe2 widget contribution)."""
    return FindDefects(napari_viewer)
