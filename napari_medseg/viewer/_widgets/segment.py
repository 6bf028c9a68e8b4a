"""The "Segment" dock widget: run a model on an image layer in the background."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    Table,
)
from napari.layers import Image
from napari.utils.notifications import show_error, show_info, show_warning

from ._panel import DockPanel
from .._layers import make_metadata, medseg_meta, remember_prediction, scan_image_of, update_medseg_meta
from .._worker import BackgroundTask
from .._workspace import workspace_events
from ._models import model_choices_of, select_default_model
from ...core.card import labels_matching
from ...core.defaults import DEFAULT_OVERLAP, DEVICE_HELP, DEVICES
from ...core.errors import MedsegError
from ...core.inference import InferenceSettings
from ...core.models import ModelRegistry, peek_card
from ...core.predict import predict_scan, scope_problems, stack_channels
from ...core.windowing import preset_for_model, preset_limits
from .._dialogs import ask

MODEL_FILTER = "Models (*.safetensors *.pt *.pth)"
TABLE_COLUMNS = ("label", "name", "volume (mL)", "voxels", "check")


def run_segmentation(scan, model_spec, settings: InferenceSettings, progress=None):
    """Worker body: load the model (verified) and segment; returns the core's Prediction.

    The scope was checked (and the user asked) before the run, so it is not refused here."""
    return predict_scan(scan, model_spec, settings, force=True, progress=progress)


class SegmentWidget(DockPanel):
    """Pick an image layer and a model, Run, and get a Labels layer with volumes."""

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.registry = ModelRegistry()
        self.last_layer = None
        # Asked before running a scan the model card says is out of scope; replaceable
        # only so that a workflow can answer it ahead (the worklist asks once per list).
        self.ask = ask
        self._image = ComboBox(label="Image", choices=self._image_layers, tooltip="The 3D scan to segment")
        self._model = ComboBox(label="Model", choices=self._model_choices,
                               tooltip="The model to run: the workspace's versions (its promoted one selected), then your "
                                       "installed models")
        self._import_path = FileEdit(label="Model file", mode="r", filter=MODEL_FILTER,
                                     tooltip="A model file (.safetensors, or a weights-only .pt) to verify and import")
        self._import = PushButton(text="Import model file")
        self._device = ComboBox(label="Device", choices=list(DEVICES), value="auto", tooltip=DEVICE_HELP)
        self._overlap = FloatSpinBox(label="Overlap", min=0.0, max=0.9, step=0.025,
                                     tooltip="Least overlap of neighbouring windows, as a fraction of the patch (0-0.9)")
        self._overlap.native.setDecimals(3)  # show the engine's default, 0.125, as it is
        self._overlap.value = DEFAULT_OVERLAP
        self._tta = CheckBox(text="Mirror test-time augmentation (4x slower)", value=False,
                             tooltip="Average the prediction over mirrored copies of the scan")
        self._run = PushButton(text="Run")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._status = Label(value="")
        self._table = Table(value={"data": [], "index": [], "columns": list(TABLE_COLUMNS)})
        self._table.native.setSortingEnabled(True)  # click a header: by volume, by name, ...
        self._show = LineEdit(label="Show labels", value="",
                              tooltip="Show only some labels of the result: names or values, comma-separated "
                                      "(lung, airway or 1, 5-7); empty shows every label")
        self.extend([self._image, self._model, self._import_path, self._import, self._device,
                     self._overlap, self._tta, self._run, self._cancel, self._status, self._show, self._table])
        self._show.changed.connect(lambda _value=None: self.show_labels(self._show.value))
        # A model of several input sequences asks for one image layer per channel.
        self._channel_boxes: list = []
        self._model.changed.connect(lambda _value=None: self._channels_changed())
        self._channels_changed()
        select_default_model(self._model, napari_viewer)
        workspace_events.changed.connect(self._workspace_changed)
        self._run.changed.connect(self.run)
        self._cancel.changed.connect(self.cancel)
        self._import.changed.connect(lambda: self.import_model(self._import_path.value))
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(lambda _e=None: [box.reset_choices() for box in [self._image, *self._channel_boxes]])

    # -- choices ------------------------------------------------------------
    def _image_layers(self, _widget=None):
        return [layer for layer in self.viewer.layers if isinstance(layer, Image) and layer.ndim == 3]

    def channel_names(self) -> tuple:
        card = peek_card(Path(self._model.value)) if self._model.value else None
        return tuple(card.channels) if card is not None else ("image",)

    def _channels_changed(self) -> None:
        """One image choice per input channel of the selected model, each defaulting to the
        layer whose name holds the channel's name."""
        names = self.channel_names()
        for box in self._channel_boxes:
            self.remove(box)
        self._channel_boxes = []
        self._image.label = "Image" if len(names) == 1 else f"Image ({names[0]})"
        if len(names) == 1:
            return
        position = list(self).index(self._image)
        for offset, name in enumerate(names[1:], start=1):
            box = ComboBox(label=f"Image ({name})", choices=self._image_layers,
                           tooltip=f"The image layer for the model's '{name}' input; a layer on another grid is "
                                   "resampled onto the first one's")
            self.insert(position + offset, box)
            self._channel_boxes.append(box)
        for box, name in zip(self.channel_layers_widgets(), names):
            match = next((layer for layer in self._image_layers() if name.lower() in layer.name.lower()), None)
            if match is not None:
                box.value = match

    def channel_layers_widgets(self) -> list:
        return [self._image, *self._channel_boxes]

    def channel_layers(self) -> list:
        return [box.value for box in self.channel_layers_widgets()]

    def _model_choices(self, _widget=None):
        return model_choices_of(self.viewer)[0]

    def _workspace_changed(self, viewer) -> None:
        """The workspace or its versions changed: list them, and select the promoted one."""
        if viewer is self.viewer:
            select_default_model(self._model, self.viewer)

    # -- actions ----------------------------------------------------------------
    def import_model(self, path) -> None:
        """Verify a model file, add it to the user's models and select it."""
        try:
            entry, added = self.registry.import_model(path)
        except MedsegError as exc:
            show_error(f"napari-medseg: {exc}")
            return
        self._model.reset_choices()
        self._model.value = str(entry.path)
        if added:
            show_info(f"napari-medseg: imported model {entry.name} v{entry.version}")
        else:
            show_info(f"napari-medseg: {entry.name} v{entry.version} is already installed ({entry.source}); "
                      "it was selected, nothing was copied")

    def run(self) -> BackgroundTask | None:
        if self.refuse_to_start("segment", "a segmentation", "; import a model file first"):
            return self.running_task()
        layer = self._image.value
        layers = self.channel_layers()
        if any(item is None for item in layers):
            show_error("napari-medseg: the model takes "
                       f"{len(layers)} images ({', '.join(self.channel_names())}); pick one layer for each")
            return None
        scan = scan_image_of(layer) if len(layers) == 1 else \
            stack_channels([scan_image_of(item) for item in layers], self.channel_names())
        if not self._in_scope(scan):
            self._status.value = "not run: the scan is outside the model's scope"
            return None
        settings = InferenceSettings(device=self._device.value, overlap=float(self._overlap.value),
                                     tta=bool(self._tta.value))
        self._run.enabled, self._cancel.enabled = False, True
        self._status.value = "running..."
        self.task = BackgroundTask(
            run_segmentation, scan, self._model.value, settings, description=f"Segment {layer.name}",
            on_done=lambda prediction: self._show_result(layer, scan.geometry, prediction),
            on_finish=self._finished,
        )
        return self.task

    def _in_scope(self, scan) -> bool:
        """Check the scan against the model card; on a mismatch, ask before running."""
        card = peek_card(Path(self._model.value))
        if card is None:
            return True  # the load in the worker reports a broken file
        problems = scope_problems(scan, card)
        if not problems:
            return True
        answer = self.ask(self.native, "Scan outside the model's scope",
                          f"{problems[0][0].upper()}{problems[0][1:]}.\n\nThe result is likely to be wrong. "
                          "Segment it anyway?", ("Segment anyway", "Cancel"), default="Cancel", escape="Cancel")
        return answer == "Segment anyway"

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
    @staticmethod
    def _colormap(colors: dict, names: dict, query: str):
        """Each label in its card colour; those the filter leaves out transparent."""
        from napari.utils.colormaps import DirectLabelColormap

        shown = labels_matching(names, query)
        color_dict = {None: (0, 0, 0, 0)}
        for value in sorted(names):
            red, green, blue, alpha = (tuple(colors.get(value, (1, 1, 1, 1))) + (1.0,))[:4]
            color_dict[value] = (red, green, blue, alpha if value in shown else 0.0)
        return DirectLabelColormap(color_dict=color_dict)

    def show_labels(self, query: str) -> None:
        """Show only the labels that ``query`` names in the last result (see ``labels_matching``)."""
        layer = self.last_layer
        if layer is None or layer not in self.viewer.layers:
            return
        names = {int(k): v for k, v in (medseg_meta(layer).get("label_names") or {}).items()}
        shown = labels_matching(names, query)
        if query.strip() and not shown - {0}:
            show_warning(f"napari-medseg: no label of '{layer.name}' matches '{query}'; all are shown")
            query = ""
        colors = {int(v): tuple(c) for v, c in (medseg_meta(layer).get("label_colors") or {}).items()}
        layer.colormap = self._colormap(colors, names, query)
    def result_layer_name(self, image_layer, model) -> str:
        return f"{image_layer.name} {model.name}"

    @staticmethod
    def window_for_model(image_layer, card) -> str | None:
        """Show the scan in the CT window the model's card calls for, unless that window, or
        one the card chose before, is already set. Returns the preset applied."""
        preset = preset_for_model(card.modality, card.label_names)
        meta = medseg_meta(image_layer)
        if preset is None or meta.get("window_preset") == preset or meta.get("window_from_model"):
            return None
        low, high = preset_limits(preset)
        range_low, range_high = image_layer.contrast_limits_range
        image_layer.contrast_limits_range = (min(range_low, low), max(range_high, high))
        image_layer.contrast_limits = (low, high)
        update_medseg_meta(image_layer, window_preset=preset, window_from_model=card.title)
        show_info(f"napari-medseg: {image_layer.name} is shown in the {preset} window, as {card.title} reads CT")
        return preset

    def _show_result(self, image_layer, geometry, prediction) -> None:
        model, result = prediction.model, prediction.segmentation
        self.window_for_model(image_layer, model.card)
        name = self.result_layer_name(image_layer, model)
        names = result.label_names
        values = sorted(names)
        volumes = {row["value"]: row for row in result.volumes()}
        features = {
            "index": values,
            "name": [names[v] for v in values],
            "volume_ml": [volumes[v]["ml"] if v in volumes else np.nan for v in values],
        }
        colormap = self._colormap(result.label_colors, names, self._show.value)
        metadata = make_metadata(geometry=geometry.to_dict(), model=model.title,
                                 model_sha256=model.card.content_sha256,
                                 label_names={str(k): v for k, v in names.items()},
                                 label_colors={str(k): list(c) for k, c in result.label_colors.items()},
                                 segmentation_of=image_layer.name,
                                 scan_source_path=medseg_meta(image_layer).get("source_path"),
                                 run={k: v for k, v in result.info.items() if k != "warnings"},
                                 warnings=list(prediction.warnings))
        from .._autosave import install, is_edited

        manager = install(self.viewer)
        if name in self.viewer.layers and is_edited(self.viewer.layers[name]):
            # Somebody's corrections are in that layer: the new result never replaces them.
            base, number = name, 2
            while f"{base} ({number})" in self.viewer.layers:
                number += 1
            name = f"{base} ({number})"
            show_info(f"napari-medseg: '{base}' holds edits, so the new result went into a new layer, '{name}'")
        if name in self.viewer.layers:
            # Re-running replaces an unedited previous result rather than stacking layers.
            existing = self.viewer.layers[name]
            manager.forget(existing)
            existing.data = result.labels
            existing.features = features
            existing.colormap = colormap
            existing.metadata = metadata
            layer = existing
            remember_prediction(layer, result.labels)
            manager.track(layer)
        else:
            layer = self.viewer.add_labels(result.labels, name=name, affine=image_layer.affine.affine_matrix,
                                           features=features, colormap=colormap, metadata=metadata,
                                           opacity=0.5, units=getattr(image_layer, "units", None) or "mm")
        remember_prediction(layer, result.labels)
        rows = [[row["value"], row["name"], round(row["ml"], 2), row["voxels"], row.get("warning", "ok")]
                for row in result.volumes()]
        # magicgui reads a dict with "index" as rows; without it, as columns.
        self._table.value = {"data": rows, "index": list(range(len(rows))), "columns": list(TABLE_COLUMNS)}
        self._status.value = (f"{model.title} on {result.info['device']}: "
                              f"{result.info['seconds']:.1f} s, {result.info['windows']} windows"
                              + (f"; {len(prediction.warnings)} warning(s)" if prediction.warnings else ""))
        for message in prediction.warnings:
            show_warning(f"napari-medseg: {layer.name}: {message}")
        self.last_layer = layer
