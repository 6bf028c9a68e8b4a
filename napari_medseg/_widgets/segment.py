"""The "Segment" dock widget: run a model on an image layer in the background."""

from __future__ import annotations

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    PushButton,
    Table,
)
from napari.layers import Image
from napari.utils.notifications import show_info

from .._layers import METADATA_KEY
from .._worker import BackgroundTask
from ..core.inference import InferenceSettings, segment
from ..core.models import ModelRegistry
from .scan import layer_geometry

MODEL_FILTER = "Models (*.safetensors *.pt *.pth)"
TABLE_COLUMNS = ("label", "name", "volume (mL)", "voxels")


def run_segmentation(image: np.ndarray, layer_affine_ras: np.ndarray, model_spec: str,
                     settings: InferenceSettings, progress=None):
    """Worker body: load the model (verified) and segment; returns (model, result)."""
    model = ModelRegistry().load(model_spec)
    return model, segment(image, layer_affine_ras, model, settings, progress=progress)


class SegmentWidget(Container):
    """Pick an image layer and a model, Run, and get a Labels layer with volumes."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.task: BackgroundTask | None = None
        self.registry = ModelRegistry()
        self._image = ComboBox(label="Image", choices=self._image_layers)
        self._model = ComboBox(label="Model", choices=self._model_choices)
        self._import_path = FileEdit(label="Model file", mode="r", filter=MODEL_FILTER)
        self._import = PushButton(text="Import model file")
        self._device = ComboBox(label="Device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self._overlap = FloatSpinBox(label="Overlap", min=0.0, max=0.9, step=0.05, value=0.125)
        self._tta = CheckBox(text="Mirror test-time augmentation (4x slower)", value=False)
        self._run = PushButton(text="Run")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._status = Label(value="")
        self._table = Table(value={"data": [], "index": [], "columns": list(TABLE_COLUMNS)})
        self.extend([self._image, self._model, self._import_path, self._import, self._device,
                     self._overlap, self._tta, self._run, self._cancel, self._status, self._table])
        self._run.changed.connect(self.run)
        self._cancel.changed.connect(self.cancel)
        self._import.changed.connect(lambda: self.import_model(self._import_path.value))
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(lambda _e=None: self._image.reset_choices())

    # -- choices ------------------------------------------------------------
    def _image_layers(self, _widget=None):
        return [layer for layer in self.viewer.layers if isinstance(layer, Image) and layer.ndim == 3]

    def _model_choices(self, _widget=None):
        choices = []
        for entry in self.registry.entries():
            label = f"{entry.name} {entry.version} ({entry.source})" + (" *" if entry.current else "")
            choices.append((label, str(entry.path)))
        return choices

    # -- actions ----------------------------------------------------------------
    def import_model(self, path) -> None:
        """Verify a model file, add it to the user's models and select it."""
        from napari.utils.notifications import show_error

        from ..core.errors import MedsegError

        try:
            entry = self.registry.import_model(path)
        except MedsegError as exc:
            show_error(f"napari-medseg: {exc}")
            return
        self._model.reset_choices()
        self._model.value = str(entry.path)
        show_info(f"napari-medseg: imported model {entry.name} v{entry.version}")

    def run(self) -> BackgroundTask | None:
        from napari.utils.notifications import show_error

        layer = self._image.value
        if layer is None:
            show_error("napari-medseg: open a 3D scan first (no image layer to segment)")
            return None
        if self._model.value is None:
            show_error("napari-medseg: no model is installed; import a model file first")
            return None
        if self.task is not None and self.task.running:
            show_info("napari-medseg: a segmentation is already running")
            return self.task
        geometry = layer_geometry(layer)
        settings = InferenceSettings(device=self._device.value, overlap=float(self._overlap.value),
                                     tta=bool(self._tta.value))
        self._run.enabled, self._cancel.enabled = False, True
        self._status.value = "running..."
        self.task = BackgroundTask(
            run_segmentation, np.asarray(layer.data), geometry.layer_affine_ras, self._model.value, settings,
            description=f"Segment {layer.name}",
            on_done=lambda out: self._show_result(layer, geometry, *out),
            on_finish=self._finished,
        )
        return self.task

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def _finished(self) -> None:
        self._run.enabled, self._cancel.enabled = True, False
        if self.task is not None and self.task.cancelled:
            self._status.value = "cancelled; nothing was added"
        elif self.task is not None and self.task.error is not None:
            self._status.value = "failed; see the notification"

    # -- result ----------------------------------------------------------------
    def result_layer_name(self, image_layer, model) -> str:
        return f"{image_layer.name} {model.name}"

    def _show_result(self, image_layer, geometry, model, result) -> None:
        from napari.utils.colormaps import DirectLabelColormap

        name = self.result_layer_name(image_layer, model)
        names = result.label_names
        values = sorted(names)
        volumes = {row["value"]: row for row in result.volumes()}
        features = {
            "index": values,
            "name": [names[v] for v in values],
            "volume_ml": [volumes[v]["ml"] if v in volumes else np.nan for v in values],
        }
        colors = {v: result.label_colors.get(v, (1, 1, 1, 1)) for v in values}
        colors[None] = (0, 0, 0, 0)
        colormap = DirectLabelColormap(color_dict=colors)
        metadata = {METADATA_KEY: {"geometry": geometry.to_dict(), "model": model.title,
                                   "model_sha256": model.card.get("content_sha256"),
                                   "label_names": {str(k): v for k, v in names.items()},
                                   "segmentation_of": image_layer.name, "run": dict(result.info)}}
        if name in self.viewer.layers:
            # Re-running replaces the previous result rather than stacking layers.
            existing = self.viewer.layers[name]
            existing.data = result.labels
            existing.features = features
            existing.colormap = colormap
            existing.metadata = metadata
            layer = existing
        else:
            layer = self.viewer.add_labels(result.labels, name=name, affine=image_layer.affine.affine_matrix,
                                           features=features, colormap=colormap, metadata=metadata,
                                           opacity=0.5, units=getattr(image_layer, "units", None) or "mm")
        rows = [[row["value"], row["name"], round(row["ml"], 2), row["voxels"]] for row in result.volumes()]
        # magicgui reads a dict with "index" as rows; without it, as columns.
        self._table.value = {"data": rows, "index": list(range(len(rows))), "columns": list(TABLE_COLUMNS)}
        self._status.value = (f"{model.title} on {result.info['device']}: "
                              f"{result.info['seconds']:.1f} s, {result.info['windows']} windows")
        for message in result.info.get("messages", []):
            show_info(f"napari-medseg: {message}")
        self.last_layer = layer
