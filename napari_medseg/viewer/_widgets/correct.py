"""The "Correct" dock widget: editing helpers, prompts, Submit to the queue, the queue, fine-tuning, versions.

Painting, filling, erasing and undo are napari's own Labels tools. The helpers here
(fill between slices, remove islands, keep the largest part, fill holes, grow or shrink)
change the layer through ``_layers.edit_labels`` (napari's ``data_setitem``), so napari's
undo takes each one back in one step. The prompt tools (:mod:`.prompting`) turn clicks and strokes into a preview that
Accept writes the same way. Fine-tuning runs ``napari-medseg finetune`` in a separate process, so a
crash there cannot take napari down; its progress and loss are shown here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from magicgui.widgets import (ComboBox, FileEdit, FloatSpinBox, Label, LineEdit, ProgressBar, PushButton,
                              SpinBox, Table)
from napari.layers import Labels
from napari.utils.notifications import show_error, show_info

from ._panel import DockPanel
from .prompting import PromptControls
from .._layers import (accepted_prompts, correction_parts, edit_labels, layer_geometry, original_prediction,
                       prediction_events, remember_prediction)
from .._worker import BackgroundTask
from .._workspace import models_changed, set_workspace_folder, workspace_folder
from ...core import editing
from ...core.defaults import FINETUNE_STEPS
from ...core.metrics import dice
from ...core.progress import read_progress_line
from ...core.workspace import Workspace, submit_correction

AXES = {"axial (S-I)": 0, "coronal (P-A)": 1, "sagittal (L-R)": 2}
QUEUE_COLUMNS = ("id", "created", "status", "split", "reviewer", "edited voxels")
VERSION_COLUMNS = ("version", "status", "validation Dice", "in use", "why")


class CorrectWidget(DockPanel):
    """Correct a labels layer, submit it, and teach the model from the queue."""

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.process = None
        self.last_result: dict | None = None
        # Not ``self._labels``: magicgui's Container keeps its show-labels flag under that name,
        # and a ComboBox there (empty, so falsy) hid the label of every control in this dock.
        self._correction = ComboBox(label="Correction", choices=self._labels_layers,
                                tooltip="The labels layer to correct and submit")
        self._value = SpinBox(label="Label value", min=1, max=255, value=1,
                              tooltip="The label the helpers work on (1-255)")
        self._axis = ComboBox(label="Between slices along", choices=list(AXES), value="axial (S-I)",
                              tooltip="The axis whose painted slices Fill between slices joins")
        self._fill_between = PushButton(text="Fill between slices")
        self._island_mm3 = FloatSpinBox(label="Smallest island (mm³)", min=0.0, max=1e7, step=10.0, value=100.0,
                                        tooltip="Remove islands removes parts smaller than this, in mm³")
        self._islands = PushButton(text="Remove islands")
        self._largest = PushButton(text="Keep the largest part")
        self._holes = PushButton(text="Fill holes")
        self._grow_mm = FloatSpinBox(label="Grow (+) / shrink (-) mm", min=-50.0, max=50.0, step=0.5, value=1.0,
                                     tooltip="Margin in mm: positive grows the label, negative shrinks it")
        self._grow = PushButton(text="Grow or shrink")
        self.prompts = PromptControls(napari_viewer, lambda: self._correction.value, lambda: self._value.value)
        self._stats = Label(value="")
        self._workspace = FileEdit(label="Workspace", mode="d", value=str(workspace_folder(napari_viewer)),
                                   tooltip="The workspace folder that holds the queue and the model versions")
        self._reviewer = LineEdit(label="Reviewer", value="", tooltip="Your name, stored with each correction")
        self._note = LineEdit(label="Note", value="", tooltip="A free-text note stored with the correction")
        self._submit = PushButton(text="Submit correction")
        self._queue = Table(value={"data": [], "index": [], "columns": list(QUEUE_COLUMNS)})
        self._refresh = PushButton(text="Refresh queue")
        self._reopen = PushButton(text="Reopen selected item")
        self._steps = SpinBox(label="Fine-tune steps", min=1, max=100000, value=FINETUNE_STEPS,
                              tooltip="Training steps of one fine-tuning round (one crop each)")
        self._finetune = PushButton(text="Fine-tune in the background")
        self._progress = ProgressBar(label="Fine-tuning", min=0, max=1000, value=0, tooltip="Progress of the fine-tuning run")
        self._train_status = Label(value="")
        self._versions = Table(value={"data": [], "index": [], "columns": list(VERSION_COLUMNS)})
        self._rollback = PushButton(text="Use the selected version")
        self.extend([self._correction, self._value, self._axis, self._fill_between, self._island_mm3, self._islands,
                     self._largest, self._holes, self._grow_mm, self._grow, *self.prompts.widgets, self._stats,
                     self._workspace, self._reviewer, self._note, self._submit, self._queue, self._refresh, self._reopen,
                     self._steps, self._finetune, self._progress, self._train_status, self._versions,
                     self._rollback])
        self._fill_between.changed.connect(lambda: self.apply("fill_between"))
        self._islands.changed.connect(lambda: self.apply("islands"))
        self._largest.changed.connect(lambda: self.apply("largest"))
        self._holes.changed.connect(lambda: self.apply("holes"))
        self._grow.changed.connect(lambda: self.apply("grow"))
        self._submit.changed.connect(self.submit)
        self._refresh.changed.connect(self.refresh)
        self._reopen.changed.connect(self.reopen_selected)
        self._finetune.changed.connect(self.start_fine_tuning)
        self._rollback.changed.connect(self.rollback_selected)
        self._correction.changed.connect(self._watch)
        self._workspace.changed.connect(lambda _v=None: self._workspace_changed())
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(lambda _e=None: self._correction.reset_choices())
        self._watched = None
        prediction_events.recorded.connect(self._prediction_recorded)
        self._workspace_changed()
        self._watch()

    # -- the layer ------------------------------------------------------------------------------
    def _labels_layers(self, _widget=None):
        return [layer for layer in self.viewer.layers if isinstance(layer, Labels) and layer.ndim == 3]

    def _watch(self, _value=None) -> None:
        if self._watched is not None:
            try:
                self._watched.events.paint.disconnect(self._stats_soon)
            except (TypeError, ValueError, RuntimeError):
                pass
        self._watched = self._correction.value
        if self._watched is not None:
            self._watched.events.paint.connect(self._stats_soon)
        self._update_stats()

    def _prediction_recorded(self, layer) -> None:
        """A prediction just appeared (Segment's Run, a case opened): correct that layer from here."""
        if layer not in self.viewer.layers:
            return
        self._correction.reset_choices()
        if self._correction.value is layer:
            self._watch()
        else:
            self._correction.value = layer  # calls _watch

    def _stats_soon(self, _event=None) -> None:
        # napari emits ``paint`` before a single paint call writes the data: count afterwards.
        from qtpy.QtCore import QTimer

        QTimer.singleShot(0, self._update_stats)

    def _update_stats(self, _event=None) -> None:
        layer = self._correction.value
        prediction = original_prediction(layer) if layer is not None else None
        if layer is None or prediction is None:
            self._stats.value = "" if layer is None else "no model prediction recorded for this layer"
            return
        current = np.asarray(layer.data)
        self._stats.value = (f"edited voxels: {editing.edited_voxels(prediction, current)}; "
                             f"Dice against the model's prediction: {dice(prediction, current, None):.4f}")

    def apply(self, helper: str) -> int:
        """Run one helper on the chosen layer, as one undoable edit; returns voxels changed."""
        layer = self._correction.value
        if layer is None:
            show_error("napari-medseg: choose a labels layer to correct")
            return 0
        data = np.asarray(layer.data)
        value = int(self._value.value)
        geometry = layer_geometry(layer)
        spacing = geometry.layer_spacing
        if helper == "fill_between":
            new = editing.fill_between_slices(data, value, AXES[self._axis.value], spacing)
        elif helper == "islands":
            new = editing.remove_islands(data, value, float(self._island_mm3.value), spacing)
        elif helper == "largest":
            new = editing.keep_largest(data, value)
        elif helper == "holes":
            new = editing.fill_holes(data, value)
        else:
            new = editing.grow_or_shrink(data, value, float(self._grow_mm.value), spacing)
        changed = edit_labels(layer, new)  # one step in napari's undo history
        self._update_stats()
        return changed

    # -- submitting ------------------------------------------------------------------------------
    def _folder(self) -> Path:
        return Path(str(self._workspace.value))

    def _workspace_changed(self) -> None:
        set_workspace_folder(self.viewer, self._folder())  # Segment and Explain list its versions
        try:
            workspace = Workspace(self._folder())
        except Exception as exc:  # noqa: BLE001 - shown, never raised into Qt
            show_error(f"napari-medseg: {exc}")
            return
        try:
            if not self._reviewer.value:
                self._reviewer.value = workspace.setting("reviewer", "")
        finally:
            workspace.close()
        self.refresh()

    def submit(self) -> BackgroundTask | None:
        from ...core.errors import MedsegError

        layer = self._correction.value
        if layer is None:
            show_error("napari-medseg: choose the labels layer to submit")
            return None
        try:
            parts = correction_parts(self.viewer, layer)
        except MedsegError as exc:
            show_error(f"napari-medseg: {exc}")
            return None
        self._submit.enabled = False
        self._submitting = layer
        # The correction stays open in the viewer whatever happens: a failed submit loses nothing.
        scan, geometry, label, prediction, model = parts
        prompts, prompted = accepted_prompts(layer)
        self.task = BackgroundTask(
            submit_correction, self._folder(), scan, geometry, label, prediction, model=model,
            reviewer=str(self._reviewer.value), note=str(self._note.value), prompts=prompts, prompted=prompted,
            description=f"Submit {layer.name}", on_done=self._submitted, on_finish=self._submit_finished)
        return self.task

    def _submitted(self, item) -> None:
        show_info(f"napari-medseg: correction stored as item {item.id[:12]} ({item.split}, "
                  f"{item.edited_voxels} edited voxels)")
        self._note.value = ""
        layer = getattr(self, "_submitting", None)
        if layer is not None:
            from .._autosave import mark_clean
            from .._layers import update_medseg_meta

            update_medseg_meta(layer, submitted_item=item.id)
            mark_clean(layer, "submitted")
        self.refresh()

    def _submit_finished(self) -> None:
        self._submit.enabled = True
        if self.task is not None and self.task.error is not None:
            self._submit.text = "Retry submit (the correction is still open)"
        else:
            self._submit.text = "Submit correction"

    # -- the queue and versions --------------------------------------------------------------------
    def refresh(self) -> None:
        try:
            workspace = Workspace(self._folder())
        except Exception as exc:  # noqa: BLE001
            show_error(f"napari-medseg: {exc}")
            return
        try:
            self.items = workspace.items()
            self.versions = workspace.versions()
        finally:
            workspace.close()
        rows = [[i.id[:12], i.created, i.status, i.split, i.reviewer, i.edited_voxels] for i in self.items]
        self._queue.value = {"data": rows, "index": list(range(len(rows))), "columns": list(QUEUE_COLUMNS)}
        vrows = [[v["version"], v["status"],
                  v["metrics"].get("validation_dice_after", v["metrics"].get("validation_dice_before", "")),
                  "yes" if v["current"] else "", v["reason"]] for v in self.versions]
        self._versions.value = {"data": vrows, "index": list(range(len(vrows))), "columns": list(VERSION_COLUMNS)}

    def _selected_row(self, table) -> int | None:
        rows = sorted({index.row() for index in table.native.selectedIndexes()})
        return rows[0] if rows else None

    def reopen_selected(self, row: int | None = None) -> None:
        """Open a queued item's scan, label and prediction in the viewer."""
        row = self._selected_row(self._queue) if row is None else row
        if row is None or row >= len(getattr(self, "items", [])):
            show_error("napari-medseg: select an item in the queue first")
            return
        from .._layers import make_metadata, volume_to_layer_data

        item = self.items[row]
        workspace = Workspace(self._folder())
        try:
            loaded = workspace.load_item(item)
        finally:
            workspace.close()
        data, kwargs, _ = volume_to_layer_data(loaded["scan"], name=f"item {item.id[:8]}")
        scan = self.viewer.add_image(data, **kwargs)
        meta = make_metadata(geometry=loaded["scan"].geometry.to_dict(), segmentation_of=scan.name,
                             model=item.model, edited=True, submitted_item=item.id)
        layer = self.viewer.add_labels(loaded["label"], name=f"item {item.id[:8]} label", affine=scan.affine.affine_matrix,
                                       metadata=meta, opacity=0.5)
        if "prediction" in loaded:
            remember_prediction(layer, loaded["prediction"])
        self._correction.value = layer

    def rollback_selected(self, row: int | None = None) -> None:
        row = self._selected_row(self._versions) if row is None else row
        if row is None or row >= len(getattr(self, "versions", [])):
            show_error("napari-medseg: select a version first")
            return
        version = self.versions[row]["version"]
        workspace = Workspace(self._folder())
        try:
            workspace.rollback(version)
        except Exception as exc:  # noqa: BLE001
            show_error(f"napari-medseg: {exc}")
            return
        finally:
            workspace.close()
        show_info(f"napari-medseg: predictions from this workspace now use {version}")
        self.refresh()
        models_changed(self.viewer)

    # -- fine-tuning in its own process --------------------------------------------------------------
    def start_fine_tuning(self):
        from qtpy.QtCore import QProcess

        if self.process is not None and self.process.state() != QProcess.ProcessState.NotRunning:
            show_info("napari-medseg: fine-tuning is already running")
            return self.process
        self.process = QProcess()
        self.process.setProgram(sys.executable)
        self.process.setArguments(["-m", "napari_medseg.cli", "finetune", "--workspace", str(self._folder()),
                                   "--steps", str(int(self._steps.value)), "--progress", "json", "--quiet"])
        self.process.readyReadStandardOutput.connect(self._read_progress)
        self.process.finished.connect(self._fine_tuning_finished)
        self._buffer = ""
        self.last_result = None
        self._progress.value = 0
        self._train_status.value = "starting..."
        self._finetune.enabled = False
        self.process.start()
        return self.process

    def _read_progress(self) -> None:
        self._buffer += bytes(self.process.readAllStandardOutput()).decode("utf-8", "replace")
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            message = read_progress_line(line)
            if message is None:
                continue
            if "progress" in message:
                self._progress.value = int(1000 * message["progress"])
                self._train_status.value = message["message"]
            elif "result" in message:
                self.last_result = message["result"]

    def _fine_tuning_finished(self, code, _status=None) -> None:
        self._read_progress()
        self._finetune.enabled = True
        if code != 0:
            error = bytes(self.process.readAllStandardError()).decode("utf-8", "replace").strip().splitlines()
            show_error(error[-1] if error else f"napari-medseg: fine-tuning stopped (status {code})")
            self._train_status.value = "fine-tuning failed; the model in use did not change"
        elif self.last_result is not None:
            verdict = "promoted" if self.last_result["promoted"] else "not promoted"
            self._train_status.value = f"{self.last_result['version']} {verdict}: {self.last_result['reason']}"
            show_info(f"napari-medseg: {self._train_status.value}")
        self.refresh()
        models_changed(self.viewer)  # Segment and Explain now offer (and select) a promoted version
