"""The "Explain" dock widget: maps over the scan, and a list of the doubtful regions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from magicgui.widgets import ComboBox, FloatSlider, Label, PushButton, SpinBox, Table
from napari.layers import Image, Labels, Points, Shapes
from napari.utils.notifications import show_error

from ._panel import DockPanel
from .._layers import layer_geometry, make_metadata, medseg_meta
from .._worker import BackgroundTask
from .._workspace import workspace_events
from ._models import model_choices_of, select_default_model
from ...core.defaults import DEVICE_HELP, DEVICES
from ...core.explain import METHODS, explain, region_mask, uncertain_regions
from ...core.inference import InferenceSettings
from ...core.models import ModelRegistry, peek_card

COLORMAPS = {"attention": "inferno", "gradcam": "turbo", "entropy": "inferno", "tta": "inferno",
             "activation": "turbo"}
REGION_CHOICES = ("the predicted mask", "a labels layer", "one part of a labels layer", "a shapes or points layer")
REGION_COLUMNS = ("region", "mL", "mean", "peak", "centre (LPS mm)")
POINT_RADIUS_MM = 10.0


def run_explain(image, layer_affine_ras, model_spec, method, settings, progress=None, **options):
    """Worker body: load the model (verified) and make the map; returns (model, explanation, regions)."""
    model = ModelRegistry().load(model_spec)
    result = explain(image, layer_affine_ras, model, method, settings=settings, progress=progress, **options)
    return model, result, uncertain_regions(result.map, layer_affine_ras)


class ExplainWidget(DockPanel):
    """Pick a scan, a method and its options, Run; the map overlays the scan, and the
    doubtful regions are listed (a click moves the viewer there)."""

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.registry = ModelRegistry()
        # What the chosen model's card offers. The drop-downs read it through callables, since
        # napari resets every choice of a docked widget whenever a layer is added or removed.
        self._offered = {"methods": list(METHODS), "targets": [], "layers": {"attention": [], "other": []}}
        self.regions: list = []
        self.last_layer = None
        self._image = ComboBox(label="Image", choices=self._image_layers, tooltip="The 3D scan to explain")
        self._model = ComboBox(label="Model", choices=self._model_choices,
                               tooltip="The model to explain: the workspace's versions first, then your installed models")
        self._method = ComboBox(label="Method", choices=self._method_choices, value="entropy",
                                tooltip="What to map: attention gates, Grad-CAM, entropy, TTA variance or a layer's activation")
        self._target = ComboBox(label="Class", choices=self._target_choices, tooltip="Grad-CAM's target class (from the model card)")
        self._layer = ComboBox(label="Layer", choices=self._layer_choices, tooltip="The network layer to map (the default is listed first)")
        self._channel = SpinBox(label="Channel", min=0, max=1023, value=0, tooltip="The activation's channel (0-based)")
        self._region_kind = ComboBox(label="Region", choices=list(REGION_CHOICES), value=REGION_CHOICES[0],
                                     tooltip="Where Grad-CAM's target lies")
        self._region_layer = ComboBox(label="Region layer", choices=self._region_layers,
                                      tooltip="The layer that holds the region (labels, shapes or points)")
        self._part = SpinBox(label="Part (1 = largest)", min=1, max=10000, value=1,
                             tooltip="Which connected part of the label, largest first")
        self._device = ComboBox(label="Device", choices=list(DEVICES), value="auto", tooltip=DEVICE_HELP)
        self._run = PushButton(text="Run")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._opacity = FloatSlider(label="Opacity", min=0.0, max=1.0, step=0.05, value=0.6,
                                    tooltip="Opacity of the map over the scan (0-1)")
        readout = getattr(self._opacity._widget, "_readout_widget", None)  # the slider's number box
        if readout is not None:
            readout.setToolTip(self._opacity.tooltip)
        self._legend = Label(value="")
        self._order = ComboBox(label="Order regions by", choices=["size", "mean uncertainty"], value="size",
                               tooltip="How the doubtful regions are listed")
        self._regions = Table(value={"data": [], "index": [], "columns": list(REGION_COLUMNS)})
        self._regions.native.setMinimumHeight(180)
        self.extend([self._image, self._model, self._method, self._target, self._layer, self._channel,
                     self._region_kind, self._region_layer, self._part, self._device, self._run, self._cancel,
                     self._opacity, self._legend, self._order, self._regions])
        select_default_model(self._model, napari_viewer)
        workspace_events.changed.connect(self._workspace_changed)
        self._model.changed.connect(self._model_changed)
        self._method.changed.connect(self._method_changed)
        self._region_kind.changed.connect(self._method_changed)
        self._run.changed.connect(self.run)
        self._cancel.changed.connect(self.cancel)
        self._opacity.changed.connect(self._set_opacity)
        self._order.changed.connect(lambda _v=None: self._show_regions())
        self._regions.native.cellClicked.connect(lambda row, _column: self.go_to_region(row))
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(lambda _e=None: (self._image.reset_choices(), self._region_layer.reset_choices()))
        self._model_changed()

    # -- choices ------------------------------------------------------------------
    def _image_layers(self, _widget=None):
        return [layer for layer in self.viewer.layers if isinstance(layer, Image) and layer.ndim == 3
                and "explanation" not in medseg_meta(layer)]

    def _region_layers(self, _widget=None):
        return [layer for layer in self.viewer.layers if isinstance(layer, (Labels, Shapes, Points))]

    def _model_choices(self, _widget=None):
        return model_choices_of(self.viewer)[0]

    def _workspace_changed(self, viewer) -> None:
        if viewer is self.viewer:
            select_default_model(self._model, self.viewer)

    def _method_choices(self, _widget=None):
        return self._offered["methods"]

    def _target_choices(self, _widget=None):
        return self._offered["targets"]

    def _layer_choices(self, _widget=None):
        method = self._method.value if hasattr(self, "_method") else None
        return self._offered["layers"]["attention" if method == "attention" else "other"]

    def _model_changed(self, _value=None) -> None:
        card = peek_card(Path(self._model.value)) if self._model.value else None
        if card is None:
            return
        from ...core.explain import default_layer, layer_names
        from ...core.network import build_network

        network = build_network(card.network.architecture, card.network.hparams)
        gates = [n for n in layer_names(network) if n.startswith("gates.")]
        default = default_layer(network, card.network.architecture)
        self._offered = {
            "methods": [m for m in METHODS if m in card.explain],
            "targets": [(name, value) for value, name in card.label_names.items() if value],
            "layers": {"attention": ["all gates"] + gates,
                       "other": [default] + [n for n in layer_names(network) if n != default]},
        }
        methods = self._offered["methods"]
        self._method.reset_choices()
        if methods and self._method.value not in methods:
            self._method.value = "entropy" if "entropy" in methods else methods[0]
        self._target.reset_choices()
        self._method_changed()

    def _method_changed(self, _value=None) -> None:
        method = self._method.value
        self._layer.reset_choices()
        self._layer.visible = method in ("attention", "gradcam", "activation")
        self._channel.visible = method == "activation"
        self._target.visible = self._region_kind.visible = method == "gradcam"
        kind = self._region_kind.value
        self._region_layer.visible = method == "gradcam" and kind != REGION_CHOICES[0]
        self._part.visible = method == "gradcam" and kind == REGION_CHOICES[2]

    # -- running ---------------------------------------------------------------------
    def _region(self, image_layer):
        """The Grad-CAM region the user chose, as a mask on the scan's layer grid (or None)."""
        kind = self._region_kind.value
        if self._method.value != "gradcam" or kind == REGION_CHOICES[0]:
            return None
        source = self._region_layer.value
        if source is None:
            raise ValueError("choose the layer that holds the region")
        shape = image_layer.data.shape
        if isinstance(source, Labels):
            if source.data.shape != shape:
                raise ValueError(f"'{source.name}' has shape {source.data.shape}, the scan {shape}")
            value = int(self._target.value or 1)
            if kind == REGION_CHOICES[2]:
                return region_mask(np.asarray(source.data), value, int(self._part.value))
            return np.asarray(source.data) > 0
        return self._drawn_region(source, image_layer)

    def _drawn_region(self, source, image_layer) -> np.ndarray:
        """Shapes become boxes (as deep as their smaller side); points become 10 mm balls."""
        shape = image_layer.data.shape
        mask = np.zeros(shape, dtype=bool)
        spacing = np.linalg.norm(image_layer.affine.affine_matrix[:3, :3], axis=0)
        if isinstance(source, Points):
            grid = np.indices(shape, sparse=True)
            for point in source.data:
                centre = image_layer.world_to_data(source.data_to_world(point))
                distance = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing))
                mask |= distance <= POINT_RADIUS_MM ** 2
            return mask
        for vertices in source.data:
            corners = np.array([image_layer.world_to_data(source.data_to_world(v)) for v in vertices])
            low, high = corners.min(axis=0), corners.max(axis=0)
            extent = high - low
            flat = int(np.argmin(extent))
            depth = max(1.0, float(np.partition(extent, 1)[1]) / 2)
            low[flat], high[flat] = low[flat] - depth, high[flat] + depth
            box = tuple(slice(max(0, int(np.floor(a))), min(n, int(np.ceil(b)) + 1))
                        for a, b, n in zip(low, high, shape))
            mask[box] = True
        return mask

    def run(self) -> BackgroundTask | None:
        if self.refuse_to_start("explain", "an explanation", ""):
            return self.running_task()
        layer = self._image.value
        if self._method.value is None:
            show_error("napari-medseg: this model's card offers no explanation maps")
            return None
        try:
            region = self._region(layer)
        except ValueError as exc:
            show_error(f"napari-medseg: {exc}")
            return None
        geometry = layer_geometry(layer)
        method = self._method.value
        options = {"target": self._target.value, "channel": int(self._channel.value), "region": region,
                   "layer": None if self._layer.value in (None, "all gates") else self._layer.value}
        self._run.enabled, self._cancel.enabled = False, True
        self.task = BackgroundTask(
            run_explain, np.asarray(layer.data), geometry.layer_affine_ras, self._model.value, method,
            InferenceSettings(device=self._device.value), description=f"Explain {layer.name} ({method})",
            on_done=lambda out: self._show(layer, *out), on_finish=self._finished, **options)
        return self.task

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def _finished(self) -> None:
        self._run.enabled, self._cancel.enabled = True, False

    # -- results ----------------------------------------------------------------------
    def _show(self, image_layer, model, result, regions) -> None:
        name = f"{image_layer.name} {result.method}"
        colormap = COLORMAPS[result.method]
        kwargs = dict(affine=image_layer.affine.affine_matrix, colormap=colormap, blending="additive",
                      units=getattr(image_layer, "units", None) or "mm",
                      opacity=float(self._opacity.value), contrast_limits=list(result.contrast_limits),
                      metadata=make_metadata(explanation=result.method, model=model.title, names=result.names,
                                             geometry=medseg_meta(image_layer).get("geometry"), info=result.info))
        maps = result.maps if result.maps.ndim == 4 else result.maps[None]
        layers = []
        for index, label in enumerate(result.names):
            layer_name = name if len(result.names) == 1 else f"{name} {label}"
            if layer_name in self.viewer.layers:
                existing = self.viewer.layers[layer_name]
                existing.data = maps[index]
                existing.contrast_limits = list(result.contrast_limits)
                layers.append(existing)
            else:
                layers.append(self.viewer.add_image(maps[index], name=layer_name, **kwargs))
        for layer in layers:
            if hasattr(layer, "colorbar"):
                layer.colorbar.visible = True
        self.last_layer = layers[-1]
        low, high = result.contrast_limits
        self._legend.value = f"{', '.join(result.names)}: {colormap}, {low:g} (dark) to {high:g} (bright)"
        self.regions = regions
        self._image_for_regions = image_layer
        self._show_regions()

    def _set_opacity(self, value) -> None:
        if self.last_layer is not None and self.last_layer in self.viewer.layers:
            self.last_layer.opacity = float(value)

    def _show_regions(self) -> None:
        key = (lambda r: -r["voxels"]) if self._order.value == "size" else (lambda r: -r["mean"])
        self.regions = sorted(self.regions, key=key)
        rows = [[r["id"], r["ml"], r["mean"], r["peak"], ", ".join(f"{v:.1f}" for v in r["centre_lps_mm"])]
                for r in self.regions]
        self._regions.value = {"data": rows, "index": list(range(len(rows))), "columns": list(REGION_COLUMNS)}

    def go_to_region(self, row: int) -> None:
        """Move the viewer's slices and camera to a listed region's centre."""
        if not 0 <= row < len(self.regions):
            return
        layer = getattr(self, "_image_for_regions", None) or self._image.value
        world = np.asarray(layer.data_to_world(self.regions[row]["centre_index"]), dtype=float)
        for axis, value in enumerate(world[-3:]):
            self.viewer.dims.set_point(self.viewer.dims.ndim - 3 + axis, float(value))
        self.viewer.camera.center = tuple(world[-3:])
