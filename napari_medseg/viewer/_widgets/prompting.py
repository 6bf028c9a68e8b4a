"""Prompt tools of the Correct dock: clicks and strokes become a 3D preview of one label.

Clicks are taken in every view of the reading layout (and the main canvas); strokes are
painted with napari's own brush on a "prompt strokes" labels layer, on any slice of any
plane (1: this label, 2: not this label). Each prompt runs
:class:`~napari_medseg.core.prompts.PromptSession` off the GUI thread and updates a preview
layer; the labels layer changes only on Accept, as one step of napari's undo history (so
the autosave, which follows that layer, sees it). The preview and strokes layers are
scratch layers: the autosave does not follow them.
"""

from __future__ import annotations

import weakref

import numpy as np
from magicgui.widgets import ComboBox, FloatSpinBox, Label, PushButton
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info

from .._layers import edit_labels, layer_geometry, make_metadata, remember_prompts, scan_layer_of
from .._worker import BackgroundTask
from .reading import clicked, layout_of
from ...core.prompts import MAX_HALF_MM, START_HALF_MM, PromptSession

CLICK_MODES = ("off (clicks move the crosshair)", "this label (positive)", "not this label (negative)")
STROKE_VALUES = {"this label": 1, "not this label": 2}


class PromptControls:
    """Clicks, strokes, undo, accept and reject for the Correct dock's layer and label.

    :attr:`widgets` go straight into the dock's form (a nested container would get an
    indented, clipped column of its own)."""

    def __init__(self, viewer, labels_layer, label_value):
        self.viewer = viewer
        self._labels_layer, self._label_value = labels_layer, label_value  # callables
        self.session: PromptSession | None = None
        self.target = None            # the labels layer the session works on
        self.preview = None           # the preview labels layer
        self.strokes_layer = None
        self.task: BackgroundTask | None = None
        self._pending: list = []      # prompts waiting for the running one
        self._hooked: list = []       # weak references to the viewer models that carry our click callback
        self._start_mask = None
        self._clicks = ComboBox(label="Click adds", choices=list(CLICK_MODES), value=CLICK_MODES[0],
                                tooltip="What a left click in any view adds to the preview (Ctrl+click: the opposite)")
        self._start_mm = FloatSpinBox(label="First region (mm)", min=2.0, max=256.0, step=2.0, value=START_HALF_MM,
                                      tooltip="Half-size of the region a prompt re-decides at first")
        self._max_mm = FloatSpinBox(label="Largest region (mm)", min=4.0, max=1024.0, step=8.0, value=MAX_HALF_MM,
                                    tooltip="Half-size the region may grow to while the change reaches its border")
        self._paint = PushButton(text="Paint prompt strokes")
        self._stroke_value = ComboBox(label="Strokes mean", choices=list(STROKE_VALUES), value="this label",
                                      tooltip="The brush value on the prompt strokes layer: 1 this label, 2 not")
        self._apply_strokes = PushButton(text="Apply strokes")
        self._undo = PushButton(text="Undo last prompt")
        self._accept = PushButton(text="Accept preview")
        self._reject = PushButton(text="Reject preview")
        self._status = Label(value="no prompts")
        self._heading = Label(value="Prompts")
        self.widgets = [self._heading, self._clicks, self._start_mm, self._max_mm, self._paint, self._stroke_value,
                        self._apply_strokes, self._undo, self._accept, self._reject, self._status]
        self._clicks.changed.connect(self._clicks_changed)
        self._paint.changed.connect(lambda: self.paint_strokes())
        self._stroke_value.changed.connect(self._stroke_value_changed)
        self._apply_strokes.changed.connect(lambda: self.apply_strokes())
        self._undo.changed.connect(lambda: self.undo())
        self._accept.changed.connect(lambda: self.accept())
        self._reject.changed.connect(lambda: self.reject())
        self._update_buttons()

    # -- the session ---------------------------------------------------------------------------
    def _ensure_session(self) -> bool:
        layer, value = self._labels_layer(), int(self._label_value())
        if self.session is not None and (layer is not self.target or value != self.session.label):
            show_info("napari-medseg: the layer or label changed: accept or reject the preview first")
            return False
        if self.session is not None:
            return True
        if layer is None:
            show_error("napari-medseg: choose a labels layer to correct")
            return False
        scan = scan_layer_of(self.viewer, layer)
        if not isinstance(scan, Image) or tuple(scan.data.shape) != tuple(layer.data.shape):
            show_error(f"napari-medseg: prompts need the scan of '{layer.name}' open, on the same grid")
            return False
        try:
            spacing = layer_geometry(layer).layer_spacing
            self.session = PromptSession(np.asarray(scan.data), spacing, np.asarray(layer.data), value,
                                         start_half_mm=float(self._start_mm.value),
                                         max_half_mm=max(float(self._max_mm.value), float(self._start_mm.value)))
        except Exception as exc:  # noqa: BLE001 - shown, never raised into Qt
            show_error(f"napari-medseg: {exc}")
            return False
        self.target = layer
        self._start_mask = self.session.labels.copy()
        name = f"{layer.name} prompt preview"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        self.preview = self.viewer.add_labels(np.zeros(layer.data.shape, np.uint8), name=name,
                                              affine=layer.affine.affine_matrix, opacity=0.8,
                                              metadata=make_metadata(scratch="prompt preview"))
        self.preview.contour = 1
        self.preview.editable = False
        self._show(None)
        self.viewer.layers.selection.active = layer
        return True

    def _show(self, region) -> None:
        """Copy the session's label (in ``region``, or everywhere) into the preview."""
        region = region if region is not None else (slice(None),) * 3
        value = self.session.label
        self.preview.data[region] = np.where(self.session.labels[region] == value, value, 0).astype(np.uint8)
        self.preview.refresh()

    def _run(self, function, *args, description: str) -> BackgroundTask | None:
        if self._running:
            self._pending.append((function, args, description))  # applied in order
            return self.task
        self.task = BackgroundTask(function, *args, description=description, on_done=self._updated,
                                   on_finish=self._finished)
        self._update_buttons()
        return self.task

    @property
    def _running(self) -> bool:
        return self.task is not None and self.task.running

    def _updated(self, update) -> None:
        if self.session is None:  # rejected while it ran
            return
        self._show(update.region)
        grew = f", region grew {update.grew}x" if update.grew else ""
        self._status.value = (f"{self.session.prompt_count} prompts; last {update.changed_voxels} voxels, "
                              f"{update.seconds:.2f} s{grew}")

    def _finished(self) -> None:
        if self._pending and self.session is not None:
            function, args, description = self._pending.pop(0)
            self._run(function, *args, description=description)
            return
        self._pending.clear()
        self._update_buttons()

    def _update_buttons(self) -> None:
        idle = not self._running
        has = self.session is not None and self.session.prompt_count > 0
        self._undo.enabled = idle and has
        self._accept.enabled = idle and self.session is not None
        self._reject.enabled = self.session is not None

    # -- prompts ---------------------------------------------------------------------------------
    def add_click(self, world, positive: bool) -> BackgroundTask | None:
        """A click at a world position (napari's world: patient mm) of the target layer."""
        if not self._ensure_session():
            return None
        index = np.asarray(self.target.world_to_data(np.asarray(world, float)), float)[-3:]
        if np.any(np.round(index) < 0) or np.any(np.round(index) >= self.target.data.shape):
            show_info("napari-medseg: the click lies outside the scan")
            return None
        return self._run(self.session.add_point, tuple(index), bool(positive),
                         description=f"{'Positive' if positive else 'Negative'} click")

    def paint_strokes(self):
        """Open (or select) the prompt strokes layer, with the brush on."""
        layer = self._labels_layer()
        if layer is None:
            show_error("napari-medseg: choose a labels layer to correct")
            return None
        name = f"{layer.name} prompt strokes"
        if self.strokes_layer is None or self.strokes_layer not in self.viewer.layers:
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            self.strokes_layer = self.viewer.add_labels(np.zeros(layer.data.shape, np.uint8), name=name,
                                                        affine=layer.affine.affine_matrix, opacity=0.9,
                                                        metadata=make_metadata(scratch="prompt strokes"))
        self.viewer.layers.selection.active = self.strokes_layer
        self.strokes_layer.mode = "paint"
        self._stroke_value_changed()
        return self.strokes_layer

    def _stroke_value_changed(self, _value=None) -> None:
        if self.strokes_layer is not None:
            self.strokes_layer.selected_label = STROKE_VALUES[self._stroke_value.value]

    def apply_strokes(self) -> BackgroundTask | None:
        if self.strokes_layer is None or self.strokes_layer not in self.viewer.layers \
                or not np.any(self.strokes_layer.data):
            show_error("napari-medseg: paint strokes first (Paint prompt strokes)")
            return None
        if not self._ensure_session():
            return None
        strokes = np.array(self.strokes_layer.data, np.uint8)
        self.strokes_layer.data = np.zeros_like(strokes)  # the next strokes are a new prompt
        return self._run(self.session.add_strokes, strokes, description="Strokes")

    def undo(self) -> bool:
        if self.session is None or self._running:
            return False
        region = self.session.undo()
        if region is None:
            return False
        self._show(region)
        self._status.value = f"{self.session.prompt_count} prompts (last one undone)"
        self._update_buttons()
        return True

    def accept(self) -> int:
        """Write the preview into the labels layer as one undoable step; returns voxels changed."""
        if self.session is None or self._running:
            return 0
        layer, count = self.target, 0
        if layer in self.viewer.layers:
            # Only what the prompts changed: the brush may have edited other voxels meanwhile.
            count = edit_labels(layer, self.session.labels, before=self._start_mask)
            if count:
                remember_prompts(layer, self.session.record())
        self._close(f"accepted: {count} voxels changed")
        return count

    def reject(self) -> None:
        self._close("preview rejected")

    def _close(self, status: str) -> None:
        self._pending.clear()
        self.session = None
        self._start_mask = None
        if self.preview is not None and self.preview in self.viewer.layers:
            self.viewer.layers.remove(self.preview)
        self.preview = None
        self.target = None
        self._status.value = status
        self._update_buttons()

    # -- clicks in every view --------------------------------------------------------------------
    def _models(self) -> list:
        layout = layout_of(self.viewer)
        models = [self.viewer]
        if layout is not None:
            models += [view.model for view in layout.views.values() if view.model is not self.viewer]
        return models

    def _clicks_changed(self, _value=None) -> None:
        self._unhook()
        if self._clicks.value == CLICK_MODES[0]:
            return
        layer = self._labels_layer()
        if isinstance(layer, Labels):
            layer.mode = "pan_zoom"  # a click must not paint as well
        for model in self._models():
            model.mouse_drag_callbacks.append(self._on_click)
            self._hooked.append(weakref.ref(model))  # a closed view's canvas must be free to go

    def _unhook(self) -> None:
        for ref in self._hooked:
            model = ref()
            if model is not None and self._on_click in model.mouse_drag_callbacks:
                model.mouse_drag_callbacks.remove(self._on_click)
        self._hooked = []

    def _on_click(self, _model, event):
        if event.button != 1 or self._clicks.value == CLICK_MODES[0]:
            return
        if not (yield from clicked(event)):
            return
        positive = self._clicks.value == CLICK_MODES[1]
        if "Control" in {str(getattr(m, "name", m)) for m in event.modifiers}:
            positive = not positive
        self.add_click(event.position, positive)
