"""Edits are never lost in the viewer: autosave of every labels layer, and a question before dropping edits.

:func:`install` attaches one :class:`ViewerAutosave` to a viewer (every napari-medseg
widget and the reader call it; it is idempotent). It then

* follows every 3D labels layer: napari's ``paint``, ``set_data`` and ``data`` events
  mark it changed, and a background thread stores the change within about a second
  (:class:`~napari_medseg.core.autosave.MaskAutosave`: a journal of changed voxels,
  compacted into snapshots). The GUI thread only sets a flag;
* asks Submit, Save, Discard or Cancel when the window is closed, or an edited labels
  layer is removed, while edits are neither saved nor submitted (Cancel keeps the
  window open, or puts the layer back);
* on a clean close removes the autosaves that are no longer needed; a discarded one
  is kept until the next clean close, so a wrong click can be undone.

Autosaves live in ``<workspace>/autosave/`` of the default workspace
(``$NAPARI_MEDSEG_HOME/workspace``); ``napari-medseg recover`` and the Recover widget
read them back.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from pathlib import Path

import numpy as np
from napari.layers import Labels
from napari.utils.notifications import show_info, show_warning
from qtpy.QtCore import QEvent, QObject, Signal

from ._workspace import workspace_folder
from ._layers import (correction_parts, geometry_of, medseg_meta, original_prediction, scan_layer_of,
                      update_medseg_meta, write_layer_mask)
from ..core import autosave
from ..core.errors import MedsegError

log = logging.getLogger(__name__)
SETTLE_S = 0.3            # wait this long after a change, so one stroke is stored once
RECHECK_S = 1.0           # look again at the last stored regions after this long
PREPARE_PAUSE_S = 0.002   # pause per 4 MB while hashing the scan and packing the first snapshot
ANSWERS = ("Submit", "Save", "Discard", "Cancel")
_managers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_by_key: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


class _Relay(QObject):
    warned = Signal(str)


class _Tracked:
    """One labels layer and its autosave."""

    def __init__(self, layer, store: autosave.MaskAutosave, key: str):
        self.layer_ref = weakref.ref(layer)
        self.store = store
        self.key = key
        self.dirty = False
        self.full = False         # compare the whole mask (the change did not say where)
        self.regions: list = []   # where napari's paint events say the mask changed
        self.prepared = False
        self.history = (0, 0)     # lengths of the layer's undo and redo histories when last seen
        self.warned = False

        self.last_regions: list = []  # looked at once more in the next round (see ``take``)

    def take(self):
        """The pending regions (``None``: the whole mask), clearing them.

        napari emits ``paint`` for a single paint call before it writes the data; the
        regions of the round before are looked at once more, so a write that lands after
        its region was read is stored one round later rather than never.
        """
        regions, full = self.regions, self.full
        self.regions, self.full, self.dirty = [], False, False
        combined = regions + self.last_regions
        self.last_regions = regions
        return None if full else combined


def _scan_identity(scan_data, geometry):
    return lambda pause=0.0: autosave.scan_identity(scan_data, geometry, pause)


class ViewerAutosave(QObject):
    """Autosave and the unsaved-edits questions for one viewer."""

    def __init__(self, viewer, root: str | Path | None = None):
        super().__init__()
        self.viewer_ref = weakref.ref(viewer)
        self.root = Path(root) if root is not None else autosave.default_root()
        self.tracked: dict[int, _Tracked] = {}
        self.closing = False
        self.on_close: list = []   # called once the window is really closing (the reading layout's views)
        self._discarded_now: set = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._relay = _Relay()
        self._relay.warned.connect(lambda text: show_warning(text))
        viewer.layers.events.inserted.connect(self._inserted)
        viewer.layers.events.removed.connect(self._removed)
        for layer in list(viewer.layers):
            self.track(layer)
        self._thread = threading.Thread(target=self._run, name="napari-medseg autosave", daemon=True)
        self._thread.start()
        window = getattr(viewer, "window", None)
        qt_window = getattr(window, "_qt_window", None)
        if qt_window is not None:
            qt_window.installEventFilter(self)
            original_close = window.close

            def close_from_code():
                # ``viewer.close()`` tears the window down whatever a close event answers, so
                # nothing is asked; unsaved edits stay autosaved and are offered for recovery.
                self.closing = True
                self.shutdown(clean=False)
                self._closed()
                original_close()

            window.close = close_from_code

    # -- following layers --------------------------------------------------------------------------
    def track(self, layer) -> _Tracked | None:
        if not isinstance(layer, Labels) or layer.ndim != 3 or not isinstance(layer.data, np.ndarray):
            return None
        if medseg_meta(layer).get("scratch"):  # a prompt preview or strokes: not a mask of its own
            return None
        if id(layer) in self.tracked:
            return self.tracked[id(layer)]
        viewer = self.viewer_ref()
        scan = scan_layer_of(viewer, layer) if viewer is not None else None
        geometry = geometry_of(layer) or (geometry_of(scan) if scan is not None else None)
        info = medseg_meta(layer)
        store = autosave.MaskAutosave(
            self.root, layer.data, scan=_scan_identity(None if scan is None else scan.data, geometry),
            geometry=geometry, label_names=info.get("label_names"), model=info.get("model", ""),
            origin=original_prediction(layer))
        key = uuid.uuid4().hex
        tracked = _Tracked(layer, store, key)
        self.tracked[id(layer)] = tracked
        _by_key[key] = tracked
        update_medseg_meta(layer, autosave_key=key)
        tracked.history = _history_lengths(layer)
        layer.events.paint.connect(self._painted_callback(tracked))
        layer.events.set_data.connect(self._refreshed_callback(tracked))
        layer.events.data.connect(self._replaced_callback(tracked))
        self._wake.set()  # the thread hashes the scan and packs the starting mask now
        return tracked

    # The GUI thread only notes where the mask changed; the thread below does the work.
    def _painted_callback(self, tracked: _Tracked):
        def painted(event):
            tracked.regions.extend(_atom_regions(getattr(event, "value", None) or []))
            tracked.history = _history_lengths(tracked.layer_ref())
            self._mark(tracked)
        return painted

    def _refreshed_callback(self, tracked: _Tracked):
        def refreshed(_event=None):
            # A refresh follows undo and redo (no paint event), and every slice change. The
            # history lengths tell them apart; the item that moved says where the mask changed.
            layer = tracked.layer_ref()
            lengths = _history_lengths(layer)
            if layer is None or lengths == tracked.history:
                return
            undone = lengths[1] > tracked.history[1]
            tracked.history = lengths
            moved = layer._redo_history if undone else layer._undo_history
            tracked.regions.extend(_atom_regions(moved[-1]) if moved else [])
            if not moved:
                tracked.full = True
            self._mark(tracked)
        return refreshed

    def _replaced_callback(self, tracked: _Tracked):
        def replaced(_event=None):
            tracked.full = True
            self._mark(tracked)
        return replaced

    def _mark(self, tracked: _Tracked) -> None:
        tracked.dirty = True
        self._wake.set()

    def forget(self, layer) -> None:
        """Stop following a layer whose content is about to be replaced by a new model result."""
        tracked = self.tracked.pop(id(layer), None)
        if tracked is not None:
            tracked.layer_ref = lambda: None  # its pending change, if any, is not an edit
            tracked.store.finish(delete=True)

    def tracked_for(self, layer) -> _Tracked | None:
        return self.tracked.get(id(layer))

    def _inserted(self, event) -> None:
        self.track(event.value)

    # -- the autosave thread ------------------------------------------------------------------------
    def _run(self) -> None:
        _lower_priority()
        while not self._stop.is_set():
            woken = self._wake.wait(timeout=RECHECK_S)
            if self._stop.is_set():
                return
            if woken:
                time.sleep(SETTLE_S)
            self._wake.clear()
            for tracked in list(self.tracked.values()):
                if tracked.dirty or tracked.last_regions:
                    self._save(tracked, tracked.take())
                elif not tracked.prepared:
                    tracked.prepared = True
                    tracked.store.prepare(pause=PREPARE_PAUSE_S)

    def _save(self, tracked: _Tracked, regions: list | None = None) -> None:
        layer = tracked.layer_ref()
        if layer is None:
            return
        try:
            tracked.store.update(layer.data, regions)
            tracked.warned = False
        except (MedsegError, OSError) as exc:
            tracked.dirty = tracked.full = True  # try again, the whole mask, with the next change
            if not tracked.warned:
                tracked.warned = True
                text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                self._relay.warned.emit(f"napari-medseg: autosave of '{layer.name}' failed ({text}); "
                                        "your edits are still open: save or submit them")

    def flush(self, tracked: _Tracked | None = None) -> None:
        """Store every pending change now (on the calling thread)."""
        for item in [tracked] if tracked is not None else list(self.tracked.values()):
            item.take()
            self._save(item)  # the whole mask: nothing may be missed here

    def unsaved(self) -> list:
        self.flush()
        return [t for t in self.tracked.values() if t.store.unsaved and t.layer_ref() is not None]

    # -- questions ------------------------------------------------------------------------------
    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt's name
        if event.type() == QEvent.Type.Close and not self.closing:
            if not self.confirm_close():
                event.ignore()
                return True
            self.closing = True
            self.shutdown(clean=True)
            self._closed()
        return False

    def _closed(self) -> None:
        callbacks, self.on_close = self.on_close, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001 - closing must go on
                log.exception("error while closing")

    def _parent_widget(self):
        viewer = self.viewer_ref()
        return getattr(getattr(viewer, "window", None), "_qt_window", None)

    def confirm_close(self) -> bool:
        """Ask about unsaved edits before the window closes; False: keep it open."""
        from ._dialogs import ask

        pending = self.unsaved()
        if not pending:
            return True
        names = ", ".join(f"'{t.layer_ref().name}'" for t in pending)
        answer = ask(self._parent_widget(), "napari-medseg: unsaved edits",
                     f"{names} {'has' if len(pending) == 1 else 'have'} edits that are neither saved nor "
                     "submitted.\n\nSubmit them to the correction queue, save them to a file, or discard "
                     "them? (Discarded edits stay recoverable until the next clean close.)",
                     ANSWERS, default="Submit", escape="Cancel")
        return all(self._settle(t, answer, closing=True) for t in pending) if answer != "Cancel" else False

    def _settle(self, tracked: _Tracked, answer: str, closing: bool = False) -> bool:
        """Carry out one answer for one layer; False when it did not happen (the user must decide again)."""
        layer = tracked.layer_ref()
        if answer == "Discard":
            if closing and tracked.store.session is not None:
                self._discarded_now.add(tracked.store.session.meta["id"])
            tracked.store.finish(state="discarded")
            return True
        if answer == "Save":
            return save_layer_interactively(self._parent_widget(), layer)
        if answer == "Submit":
            return submit_layer_now(self.viewer_ref(), layer, workspace_folder(self.viewer_ref()))
        return False

    def _removed(self, event) -> None:
        layer = event.value
        tracked = self.tracked.get(id(layer))
        if tracked is None or self.closing:
            return
        self.flush(tracked)
        if not tracked.store.unsaved:
            self.tracked.pop(id(layer), None)
            tracked.store.finish()
            return
        # Ask once the removal is over: ``viewer.close()`` removes every layer before it
        # closes the window, and a closing viewer asks nothing (the autosave stays).
        from qtpy.QtCore import QTimer

        QTimer.singleShot(0, lambda: self._ask_removed(layer, event.index, tracked))

    def _ask_removed(self, layer, index: int, tracked: _Tracked) -> None:
        from ._dialogs import ask

        window = self._parent_widget()
        if self.closing or window is None or not window.isVisible():
            return
        answer = ask(window, "napari-medseg: unsaved edits",
                     f"'{layer.name}' has edits that are neither saved nor submitted.\n\nSubmit them, save "
                     "them to a file, or discard them? Cancel puts the layer back.",
                     ANSWERS, default="Submit", escape="Cancel")
        if answer == "Cancel" or not self._settle(tracked, answer):
            viewer = self.viewer_ref()
            if viewer is not None and layer not in viewer.layers:
                viewer.layers.insert(min(index, len(viewer.layers)), layer)
                show_info(f"napari-medseg: '{layer.name}' was kept")
            return
        self.tracked.pop(id(layer), None)
        tracked.store.finish()

    # -- closing ------------------------------------------------------------------------------
    def shutdown(self, clean: bool) -> None:
        """Stop autosaving. ``clean``: the user answered for every edit, so tidy the autosave folder."""
        self.flush()
        self._stop.set()
        self._wake.set()
        for tracked in list(self.tracked.values()):
            # A clean close leaves nothing unsettled; edits left by a close from code stay ``open``.
            unsettled = tracked.store.unsaved and not clean
            tracked.store.finish(delete=not unsettled and tracked.store.session is not None
                                 and tracked.store.session.meta.get("state") in ("saved", "submitted"))
        self.tracked.clear()
        if clean:
            try:
                autosave.clean_up(self.root, keep=self._discarded_now)
            except OSError as exc:
                log.warning("could not tidy the autosave folder: %s", exc.strerror or exc)


_offered_recovery = False
# What the first viewer of a process is offered to recover: the Recover widget registers
# its question here (widgets sit above autosave, which never imports them).
RECOVERY_OFFERS: list = []


def _lower_priority() -> None:
    """Run this thread at the lowest CPU priority: on a 2-core machine the GUI and the
    renderer must win every contest with the autosave (Linux sets it per thread)."""
    import os

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def _history_lengths(layer) -> tuple:
    if layer is None:
        return (0, 0)
    return len(getattr(layer, "_undo_history", ())), len(getattr(layer, "_redo_history", ()))


def _atom_regions(item) -> list:
    """Bounding boxes (tuples of slices) of one napari history item's atoms."""
    regions = []
    for atom in item:
        slice_key = getattr(atom, "slice_key", None)   # napari's masked paint atom
        if slice_key is not None:
            regions.append(tuple(slice_key))
            continue
        indices = atom[0]                                # (indices, old values, new values)
        if len(indices) and np.size(indices[0]):
            regions.append(tuple(slice(int(np.min(i)), int(np.max(i)) + 1) for i in indices))
    return regions


def install(viewer) -> ViewerAutosave | None:
    """The viewer's autosave (created once); the first one of a process offers what can be recovered."""
    global _offered_recovery
    if viewer is None:
        return None
    manager = _managers.get(viewer)
    if manager is None:
        manager = ViewerAutosave(viewer)
        _managers[viewer] = manager
        if not _offered_recovery and getattr(viewer, "window", None) is not None:
            _offered_recovery = True
            from qtpy.QtCore import QTimer

            viewer_ref = weakref.ref(viewer)
            for offer in list(RECOVERY_OFFERS):
                QTimer.singleShot(0, lambda offer=offer: viewer_ref() is not None and offer(viewer_ref()))
    return manager


def manager_of(viewer) -> ViewerAutosave | None:
    return _managers.get(viewer) if viewer is not None else None


def mark_clean(layer_or_meta, state: str) -> None:
    """A layer was saved or submitted: its autosave is no longer the only copy."""
    key = medseg_meta(layer_or_meta).get("autosave_key")
    tracked = _by_key.get(key) if key else None
    if tracked is not None:
        layer = tracked.layer_ref()
        if layer is not None:
            tracked.take()
            tracked.store.update(layer.data)
        tracked.store.mark_clean(state)


def is_edited(layer) -> bool:
    """Whether a labels layer holds somebody's work: opened from a file, or changed since the model made it."""
    if medseg_meta(layer).get("edited"):
        return True
    prediction = original_prediction(layer)
    if prediction is None:
        return False
    data = np.asarray(layer.data)
    return prediction.shape != data.shape or not np.array_equal(prediction, data)


def save_layer_interactively(parent, layer) -> bool:
    """Ask for a file name and save the layer through the plugin's writer; True when written."""
    from qtpy.QtWidgets import QFileDialog

    from napari.utils.notifications import show_error

    path, _ = QFileDialog.getSaveFileName(parent, f"Save '{layer.name}'", f"{layer.name}.nii.gz",
                                          "Masks (*.nii.gz *.nii *.nrrd *.mha)")
    if not path:
        return False
    try:
        write_layer_mask(path, np.asarray(layer.data), layer.as_layer_data_tuple()[1])
    except MedsegError as exc:
        show_error(f"napari-medseg: {exc}")
        return False
    mark_clean(layer, "saved")
    return True


def submit_layer_now(viewer, layer, folder) -> bool:
    """Submit a layer to the workspace queue right away (when the viewer is closing); True when stored."""
    from napari.utils.notifications import show_error

    from ..core.workspace import Workspace, submit_correction

    try:
        scan, geometry, label, prediction, model = correction_parts(viewer, layer)
        workspace = Workspace(folder)
        try:
            item = submit_correction(workspace, scan, geometry, label, prediction, model=model,
                                     reviewer=workspace.setting("reviewer", ""))
        finally:
            workspace.close()
    except MedsegError as exc:
        show_error(f"napari-medseg: {exc}")
        return False
    mark_clean(layer, "submitted")
    show_info(f"napari-medseg: '{layer.name}' submitted as item {item.id[:12]}")
    return True
