"""The Review dock widget: work through the workspace's worklist, most doubtful case first.

Thin over :mod:`napari_medseg.core.worklist`: the table lists the cases; opening one
shows its scan, its stored prediction and its uncertainty map in the scan's geometry;
Accept, Submit correction and Skip record the decision and open the next case, which a
background thread has already read (and predicted, when it was still new). The case
being reviewed is kept in the workspace, so the widget reopens it after a restart.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, LineEdit, PushButton, Table
from napari.utils.notifications import show_error, show_info, show_warning

from ._panel import DockPanel
from .._layers import make_metadata, remember_prediction, volume_to_layer_data
from .._worker import BackgroundTask
from .._workspace import set_workspace_folder, workspace_folder
from ...core.errors import MedsegError
from ...core import worklist as worklist_core
from ...core.worklist import ORDERS, OpenedCase, Worklist, load_worklist_model, run_worklist
from ...core.workspace import Workspace, submit_correction

COLUMNS = ("case", "status", "model", "uncertainty", "volumes (mL)", "reviewer")
CURRENT_KEY = "worklist_current"
ORDER_KEY = "worklist_order"
KEYS = {"next": "Alt-Right", "previous": "Alt-Left", "accept": "Alt-A"}


class ReviewWidget(DockPanel):
    """Review the worklist: next/previous, Accept, Submit correction, Skip."""

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.current: OpenedCase | None = None
        self.layers: dict = {}
        self._prefetched: dict = {}
        self._prefetch_lock = threading.Lock()
        self._prefetch_thread: threading.Thread | None = None
        self._prefetch_target: str | None = None
        self._workspace = FileEdit(label="Workspace", mode="d", value=str(workspace_folder(napari_viewer)),
                                   tooltip="The workspace folder that holds the worklist")
        self._add = FileEdit(label="Add scans", mode="d", value="",
                             tooltip="A folder of scans to add to the worklist (searched with its subfolders)")
        self._run = PushButton(text="Predict every new case")
        self._order = ComboBox(label="Order", choices=list(ORDERS), value="uncertainty",
                               tooltip="Most doubtful first, by name, or newest first")
        self._reviewer = LineEdit(label="Reviewer", value="", tooltip="Your name, stored with each decision")
        self._table = Table(value={"data": [], "index": [], "columns": list(COLUMNS)})
        self._previous = PushButton(text=f"Previous ({KEYS['previous']})")
        self._next = PushButton(text=f"Next ({KEYS['next']})")
        self._accept = PushButton(text=f"Accept ({KEYS['accept']})")
        self._submit = PushButton(text="Submit correction")
        self._reason = LineEdit(label="Skip reason", value="", tooltip="Why the case is skipped (needed to skip)")
        self._skip = PushButton(text="Skip")
        self._status = Label(value="")
        self.extend([self._workspace, self._add, self._run, self._order, self._reviewer, self._table,
                     Container(widgets=[self._previous, self._next], layout="horizontal", labels=False),
                     Container(widgets=[self._accept, self._submit], layout="horizontal", labels=False),
                     self._reason, self._skip, self._status])
        self._workspace.changed.connect(lambda _v=None: self._workspace_changed())
        self._add.changed.connect(lambda value: self.add(value))
        self._run.changed.connect(self.run_pending)
        self._order.changed.connect(lambda _v=None: self._order_changed())
        self._previous.changed.connect(lambda: self.step(-1))
        self._next.changed.connect(lambda: self.step(+1))
        self._accept.changed.connect(self.accept)
        self._submit.changed.connect(self.submit)
        self._skip.changed.connect(lambda: self.skip(self._reason.value))
        self._table.native.cellDoubleClicked.connect(lambda row, _column: self.open_row(row))
        self._table.native.setEditTriggers(self._table.native.EditTrigger.NoEditTriggers)
        self.viewer.bind_key(KEYS["next"], lambda _v: self.step(+1), overwrite=True)
        self.viewer.bind_key(KEYS["previous"], lambda _v: self.step(-1), overwrite=True)
        self.viewer.bind_key(KEYS["accept"], lambda _v: self.accept(), overwrite=True)
        self.cases: list = []
        self._workspace_changed()

    # -- the workspace ---------------------------------------------------------------------------
    @property
    def folder(self) -> Path:
        return Path(self._workspace.value)

    def _open(self) -> tuple[Workspace, Worklist] | None:
        """The workspace and its worklist, or None after a notification that says why not."""
        try:
            workspace = Workspace(self.folder)
        except MedsegError as exc:
            show_error(f"napari-medseg: {exc}")
            return None
        return workspace, Worklist(workspace)

    def _workspace_changed(self) -> None:
        """Show the worklist and reopen the case the reviewer stopped at."""
        set_workspace_folder(self.viewer, self.folder)
        opened = self._open()
        if opened is None:
            return
        workspace, _ = opened
        try:
            order = workspace.setting(ORDER_KEY, "uncertainty")
            current = workspace.setting(CURRENT_KEY)
            self._reviewer.value = self._reviewer.value or workspace.setting("reviewer", "")
        finally:
            workspace.close()
        if order in ORDERS and order != self._order.value:
            with self._order.changed.blocked():
                self._order.value = order
        self.refresh()
        if current and any(case.id == current for case in self.cases):
            self.open_case(current)

    def _order_changed(self) -> None:
        self._remember(ORDER_KEY, self._order.value)
        self.refresh()

    def _remember(self, key: str, value) -> None:
        workspace = Workspace(self.folder)
        try:
            workspace.set_setting(key, value)
        finally:
            workspace.close()

    def refresh(self) -> None:
        opened = self._open()
        if opened is None:
            return
        workspace, worklist = opened
        try:
            self.cases = worklist.cases(order=self._order.value)
            counts = worklist.counts()
        finally:
            workspace.close()
        rows = [[case.name, case.status + (f": {case.reason}" if case.reason else "")
                 + (f" (WARNING: {'; '.join(case.warnings)})" if case.warnings else ""), case.model,
                 "" if case.score is None else f"{case.score:.4f}", case.volume_text(), case.reviewer]
                for case in self.cases]
        self._table.value = {"data": rows, "index": list(range(len(rows))), "columns": list(COLUMNS)}
        current = self.current.case.id if self.current else None
        for row, case in enumerate(self.cases):
            if case.id == current:
                self._table.native.selectRow(row)
        self._status.value = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no cases yet"

    # -- adding and predicting ------------------------------------------------------------------------
    def add(self, path) -> None:
        if not path or not str(path).strip() or str(path) in (".", ""):
            return
        opened = self._open()
        if opened is None:
            return
        workspace, worklist = opened
        try:
            added, known = worklist.add([path])
        except MedsegError as exc:
            show_error(f"napari-medseg: {exc}")
            return
        finally:
            workspace.close()
        failed = [case for case in added if case.status == "failed"]
        show_info(f"napari-medseg: {len(added)} case(s) added" + (f", {len(failed)} failed" if failed else "")
                  + (f"; {len(known)} were already listed" if known else ""))
        self.refresh()

    def run_pending(self) -> BackgroundTask | None:
        """Predict every new case in the background (the model is loaded once)."""
        if self.task is not None and self.task.running:
            show_info("napari-medseg: the worklist is busy")
            return None
        self.task = BackgroundTask(_run_in_folder, str(self.folder), description="Predicting the worklist",
                                   on_done=self._run_done, on_finish=self.refresh)
        return self.task

    def _run_done(self, summary) -> None:
        show_info(f"napari-medseg: predicted {summary.predicted} case(s), {summary.failed} failed")

    # -- moving between cases -----------------------------------------------------------------------
    def _index_of(self, case_id: str | None) -> int | None:
        return next((i for i, case in enumerate(self.cases) if case.id == case_id), None)

    def _neighbour(self, direction: int, case_id: str | None = None) -> str | None:
        """The next (or previous) case that can be opened."""
        start = self._index_of(case_id or (self.current.case.id if self.current else None))
        index = (-1 if direction > 0 else len(self.cases)) if start is None else start
        while True:
            index += direction
            if not 0 <= index < len(self.cases):
                return None
            case = self.cases[index]
            if case.files or case.status == "new":  # failed cases have nothing to show
                return case.id

    def step(self, direction: int) -> bool:
        target = self._neighbour(direction)
        if target is None:
            show_info(f"napari-medseg: no {'next' if direction > 0 else 'previous'} case to review")
            return False
        return self.open_case(target)

    def open_row(self, row: int) -> bool:
        return 0 <= row < len(self.cases) and self.open_case(self.cases[row].id)

    def open_case(self, case_id: str) -> bool:
        """Open a case (asking first about unsaved edits of the current one); False if it did not open."""
        if self.current is not None and self.current.case.id != case_id and not self._settle_current(case_id):
            return False
        loaded = self._take_prefetched(case_id)
        if loaded is not None:
            self._show(loaded)
            return True
        if self.task is not None and self.task.running:
            show_info("napari-medseg: the worklist is busy; try again when it is done")
            return False
        self.task = BackgroundTask(self._load_or_await, case_id, description="Opening the case", on_done=self._show)
        return True

    def _load_or_await(self, case_id: str, progress=None) -> OpenedCase:
        """Worker body: the case being read ahead is awaited, never read (or predicted) twice."""
        thread = self._prefetch_thread
        if thread is not None and thread.is_alive() and self._prefetch_target == case_id:
            thread.join()
            loaded = self._take_prefetched(case_id)
            if loaded is not None:
                return loaded
        return worklist_core.open_case(str(self.folder), case_id, progress=progress)

    def _settle_current(self, case_id: str) -> bool:
        """Submit, save or discard the current case's unsaved edits; False on Cancel."""
        from .._autosave import is_edited
        from .._dialogs import ask

        layer = self.layers.get("labels")
        if layer is None or layer not in self.viewer.layers or not is_edited(layer):
            return True
        answer = ask(self.native, "napari-medseg: unsaved edits",
                     f"'{layer.name}' has edits that are neither saved nor submitted.\n\nSubmit them to the "
                     "correction queue, save them with the case, or discard them?",
                     ("Submit", "Save", "Discard", "Cancel"), default="Submit", escape="Cancel")
        if answer == "Cancel":
            return False
        if answer == "Submit":  # the case opens once the submission is stored
            self._submit_now(advance=False, then=lambda: self.open_case(case_id))
            return False
        if answer == "Save":
            return self._save_reviewed()
        return True

    def _show(self, loaded: OpenedCase) -> None:
        from .._autosave import mark_clean

        case, volume = loaded.case, loaded.volume
        geometry = volume.geometry
        data, kwargs, _ = volume_to_layer_data(volume, name=case.name, source_path=case.sources[0])
        names = {int(row["value"]): row["name"] for row in case.volumes}
        values = sorted({0, *names})
        label_kwargs = {
            "name": f"{case.name} {case.model}".strip(), "affine": geometry.world_affine,
            "colormap": _label_colormap(values),
            "features": {"index": values, "name": [names.get(v, "background") for v in values]},
            "metadata": make_metadata(geometry=geometry.to_dict(), model=case.model, segmentation_of=case.name,
                                      label_names={str(k): v for k, v in names.items()}, worklist_case=case.id)}
        map_kwargs = {"name": f"{case.name} uncertainty", "affine": geometry.world_affine,
                      "metadata": make_metadata(geometry=geometry.to_dict(), kind="uncertainty")}
        if self.layers and all(layer in self.viewer.layers for layer in self.layers.values()):
            # The case's layers take the new case's data: removing and adding layers costs
            # napari a garbage collection each, which Next cannot afford.
            self._replace_data(data, kwargs, loaded, label_kwargs, map_kwargs)
        else:
            self._clear_layers()
            scan = self.viewer.add_image(data, **kwargs)
            uncertainty = self.viewer.add_image(loaded.uncertainty, colormap="inferno", blending="additive",
                                                opacity=0.6, contrast_limits=(0.0, 1.0), units="mm", **map_kwargs)
            labels = self.viewer.add_labels(loaded.labels.copy(), opacity=0.5, units="mm", **label_kwargs)
            remember_prediction(labels, loaded.labels)  # unsaved edits: anything changed since it was shown
            self.layers = {"scan": scan, "labels": labels, "uncertainty": uncertainty}
        labels = self.layers["labels"]
        mark_clean(labels, "saved")
        self.viewer.layers.selection.active = labels
        self.current = loaded
        if case.status == "predicted":
            self._set_status("in review")
        self._remember(CURRENT_KEY, case.id)
        self.refresh()
        self._status.value = (f"{case.name}: {case.status}, uncertainty "
                              f"{'-' if case.score is None else f'{case.score:.4f}'}; {case.volume_text()}")
        for message in case.warnings:
            show_warning(f"napari-medseg: {case.name}: {message}")
        self._start_prefetch()

    def _replace_data(self, data, kwargs, loaded: OpenedCase, label_kwargs: dict, map_kwargs: dict) -> None:
        scan, labels, uncertainty = self.layers["scan"], self.layers["labels"], self.layers["uncertainty"]
        reframe = tuple(scan.data.shape) != tuple(data.shape) or not np.allclose(scan.affine.affine_matrix,
                                                                                  kwargs["affine"])
        if self._autosave is not None:
            self._autosave.forget(labels)  # settled before; the next case is tracked anew
        for layer, values, layer_kwargs in ((scan, data, kwargs), (uncertainty, loaded.uncertainty, map_kwargs),
                                            (labels, loaded.labels.copy(), label_kwargs)):
            layer.data = values
            for key in ("affine", "name", "metadata", "colormap", "features", "contrast_limits"):
                if key in layer_kwargs and not (key == "colormap" and layer is scan):
                    setattr(layer, key, layer_kwargs[key])
        labels._reset_history()  # undo must never reach into the previous case
        remember_prediction(labels, loaded.labels)
        if self._autosave is not None:
            self._autosave.track(labels)
        if reframe:
            self.viewer.reset_view()

    def _clear_layers(self) -> None:
        manager = self._autosave
        for key in ("labels", "uncertainty", "scan"):
            layer = self.layers.get(key)
            if layer is not None and layer in self.viewer.layers:
                if key == "labels" and manager is not None:
                    manager.forget(layer)  # settled before: removing it asks nothing
                self.viewer.layers.remove(layer)
        self.layers = {}

    # -- prefetch ------------------------------------------------------------------------------------
    def _start_prefetch(self) -> None:
        target = self._neighbour(+1)
        if target is None or target in self._prefetched:
            return
        if self._prefetch_thread is not None and self._prefetch_thread.is_alive():
            return
        folder = str(self.folder)
        self._prefetch_target = target

        def work():
            try:
                loaded = worklist_core.open_case(folder, target)
            except MedsegError as exc:
                loaded = exc
            except Exception as exc:  # noqa: BLE001 - shown when the case is opened
                loaded = MedsegError(f"{type(exc).__name__}: {exc}")
            with self._prefetch_lock:
                self._prefetched = {target: loaded}

        self._prefetch_thread = threading.Thread(target=work, name="napari-medseg prefetch", daemon=True)
        self._prefetch_thread.start()

    def wait_for_prefetch(self, timeout: float | None = None) -> bool:
        thread = self._prefetch_thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def _take_prefetched(self, case_id: str) -> OpenedCase | None:
        with self._prefetch_lock:
            loaded = self._prefetched.pop(case_id, None)
        if isinstance(loaded, MedsegError):
            return None  # opened the slow way, which shows the error
        return loaded

    # -- decisions ---------------------------------------------------------------------------------------
    def _set_status(self, status: str, reason: str = "", item: str | None = None) -> None:
        opened = self._open()
        if opened is None:
            return
        workspace, worklist = opened
        try:
            reviewer = self._reviewer.value.strip()
            if reviewer:
                workspace.set_setting("reviewer", reviewer)
            self.current.case = worklist.set_status(self.current.case, status, reason=reason,
                                                    reviewer=reviewer or None, item=item)
        finally:
            workspace.close()

    def _labels_now(self) -> np.ndarray:
        return np.asarray(self.layers["labels"].data)

    def _save_reviewed(self) -> bool:
        from .._autosave import mark_clean

        opened = self._open()
        if opened is None:
            return
        workspace, worklist = opened
        try:
            self.current.case = worklist.store_reviewed(self.current.case, self._labels_now(),
                                                        self.current.volume.geometry)
        except MedsegError as exc:
            show_error(f"napari-medseg: {exc}")
            return False
        finally:
            workspace.close()
        remember_prediction(self.layers["labels"], self._labels_now())
        mark_clean(self.layers["labels"], "saved")
        return True

    def accept(self) -> bool:
        """The mask is right (with any edits made): record it and open the next case."""
        if self.current is None:
            show_info("napari-medseg: open a case first")
            return False
        from .._autosave import is_edited

        if is_edited(self.layers["labels"]) and not self._save_reviewed():
            return False
        self._set_status("accepted")
        show_info(f"napari-medseg: '{self.current.case.name}' accepted")
        return self._advance()

    def skip(self, reason: str) -> bool:
        if self.current is None:
            show_info("napari-medseg: open a case first")
            return False
        if not reason or not reason.strip():
            show_error("napari-medseg: give a reason to skip the case (for example 'motion artefacts')")
            return False
        from .._autosave import mark_clean

        self._set_status("skipped", reason=reason.strip())
        mark_clean(self.layers["labels"], "saved")
        remember_prediction(self.layers["labels"], self._labels_now())  # edits of a skipped case are dropped
        self._reason.value = ""
        return self._advance()

    def submit(self) -> bool:
        return self._submit_now(advance=True)

    def _submit_now(self, advance: bool, then=None) -> bool:
        """Submit the corrected mask into the queue (de-identified, off the GUI thread) and mark
        the case corrected; then open the next case (``advance``) or call ``then``."""
        if self.current is None:
            show_info("napari-medseg: open a case first")
            return False
        if self.task is not None and self.task.running:
            show_info("napari-medseg: the worklist is busy; try again when it is done")
            return False
        loaded = self.current
        labels = np.array(self._labels_now(), copy=True)
        self.task = BackgroundTask(
            submit_correction, str(self.folder), loaded.volume.layer_data(), loaded.volume.geometry, labels,
            loaded.prediction, model=loaded.case.model, reviewer=self._reviewer.value.strip(),
            origin=f"worklist:{loaded.case.id}", description=f"Submit {loaded.case.name}",
            on_done=lambda item: self._submitted(loaded, item, advance, then))
        return True

    def _submitted(self, loaded: OpenedCase, item, advance: bool, then) -> None:
        from .._autosave import mark_clean

        if self.current is not loaded:
            return
        self._save_reviewed()
        self._set_status("corrected", item=item.id)
        mark_clean(self.layers["labels"], "submitted")
        show_info(f"napari-medseg: '{loaded.case.name}' submitted as item {item.id[:12]}")
        if advance:
            self._advance()
        elif then is not None:
            then()

    def _advance(self) -> bool:
        self.refresh()
        target = self._neighbour(+1)
        if target is None:
            show_info("napari-medseg: that was the last case of the worklist")
            return True
        return self.open_case(target)


def _label_colormap(values: list):
    from napari.utils.colormaps import DirectLabelColormap

    from ...core.card import default_color

    colors = {value: default_color(value) for value in values}
    colors[None] = (0, 0, 0, 0)
    return DirectLabelColormap(color_dict=colors)


def _run_in_folder(folder: str, progress=None):
    workspace = Workspace(folder)
    try:
        return run_worklist(workspace, load_worklist_model(workspace), progress=progress)
    finally:
        workspace.close()
