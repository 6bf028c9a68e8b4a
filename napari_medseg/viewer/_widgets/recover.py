"""The "Recover edits" dock widget: masks autosaved by a napari that did not close cleanly.

Each row is one autosave: when it was last stored, how many voxels were edited, and
its scan (by content hash, shape and spacing: autosaves never keep a name or a path).
**Restore** puts the mask on its scan: on the open image layer with the same voxel
values, or, when none is open, on the scan file you pick (its content is checked).
"""

from __future__ import annotations

import numpy as np
from magicgui.widgets import CheckBox, Label, PushButton, Table
from napari.layers import Image
from napari.utils.notifications import show_error, show_info

from ._panel import DockPanel
from .._layers import label_features, make_metadata, volume_to_layer_data
from ...core import autosave
from ...core.errors import MedsegError

COLUMNS = ("last autosave", "edited voxels", "scan", "state", "id")


def _describe_scan(session: autosave.Recoverable) -> str:
    scan = session.scan
    spacing = " x ".join(f"{s:g}" for s in scan.get("spacing_mm", []))
    return f"{scan.get('sha256', '?')[:10]}, {'x'.join(map(str, session.shape))}" + (f", {spacing} mm" if spacing else "")


class RecoverWidget(DockPanel):
    """List autosaved edits and put one back on its scan."""

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.root = self._autosave.root
        self.sessions: list = []
        self._info = Label(value="")
        self._all = CheckBox(text="Also show discarded and recovered autosaves", value=False,
                             tooltip="List the autosaves already settled, too")
        self._table = Table(value={"data": [], "index": [], "columns": list(COLUMNS)})
        self._restore = PushButton(text="Restore the selected edits")
        self._refresh = PushButton(text="Refresh")
        self.extend([self._info, self._all, self._table, self._restore, self._refresh])
        self._restore.changed.connect(lambda: self.restore())
        self._refresh.changed.connect(self.refresh)
        self._all.changed.connect(self.refresh)
        self.refresh()

    def refresh(self, _value=None) -> None:
        found = [s for s in autosave.list_sessions(self.root) if not s.owner_alive]
        self.sessions = found if self._all.value else [s for s in found if s.crashed]
        rows = [[s.updated.replace("T", " ")[:19], s.edited_voxels, _describe_scan(s), s.state, s.id]
                for s in self.sessions]
        self._table.value = {"data": rows, "index": list(range(len(rows))), "columns": list(COLUMNS)}
        self._info.value = (f"{len(self.sessions)} autosaved edit(s) can be restored" if self.sessions
                            else "nothing to recover")

    def _selected(self) -> int | None:
        rows = sorted({index.row() for index in self._table.native.selectedIndexes()})
        return rows[0] if rows else (0 if len(self.sessions) == 1 else None)

    def _matching_scan(self, session: autosave.Recoverable):
        wanted = session.scan.get("sha256")
        for layer in self.viewer.layers:
            if isinstance(layer, Image) and list(layer.data.shape) == list(session.shape):
                if wanted is None or autosave.scan_identity(np.asarray(layer.data), None)["sha256"] == wanted:
                    return layer
        return None

    def _read_scan(self, scan_path: str | None):
        """The scan file the user points to (asked for when None): ``(volume, path)`` or None."""
        from qtpy.QtWidgets import QFileDialog

        from ...core.io import read_volume

        if scan_path is None:
            scan_path, _ = QFileDialog.getOpenFileName(self.native, "Open the scan these edits belong to")
            if not scan_path:
                return None
        return read_volume(scan_path), scan_path

    def restore(self, row: int | None = None, scan_path: str | None = None):
        """Put the chosen autosave on its scan as a new labels layer; returns the layer."""
        row = self._selected() if row is None else row
        if row is None or row >= len(self.sessions):
            show_error("napari-medseg: select the autosave to restore")
            return None
        session = self.sessions[row]
        try:
            scan = self._matching_scan(session) if scan_path is None else None
            if scan is not None:
                recovered = autosave.recover_session(self.root, session, scan=np.asarray(scan.data))
            else:
                opened = self._read_scan(scan_path)
                if opened is None:
                    return None
                data, kwargs, _kind = volume_to_layer_data(opened[0], source_path=opened[1])
                recovered = autosave.recover_session(self.root, session, scan=np.asarray(data))
                scan = self.viewer.add_image(data, **kwargs)
        except (MedsegError, OSError) as exc:
            show_error(f"napari-medseg: {exc}")
            return None
        geometry, names = recovered.geometry, recovered.label_names
        values = {"segmentation_of": scan.name, "edited": True, "model": recovered.model,
                  "label_names": {str(k): v for k, v in names.items()}, "recovered_from": session.id}
        if geometry is not None:
            values["geometry"] = geometry.to_dict()
        metadata = make_metadata(**values)
        stamp = session.updated.replace("T", " ")[:16]
        layer = self.viewer.add_labels(recovered.mask, name=f"{scan.name} recovered {stamp}", affine=scan.affine.affine_matrix,
                                       metadata=metadata, opacity=0.5,
                                       **({"features": label_features(names)} if names else {}))
        show_info(f"napari-medseg: restored {session.edited_voxels} edited voxels on '{scan.name}'")
        self.refresh()
        return layer


def offer_recovery(viewer) -> RecoverWidget | None:
    """At start: if a napari ended without a clean close, dock the Recover widget."""
    from .._autosave import manager_of

    manager = manager_of(viewer)
    root = manager.root if manager is not None else autosave.default_root()
    crashed = [s for s in autosave.list_sessions(root) if s.crashed]
    if not crashed or getattr(viewer, "window", None) is None:
        return None
    widget = RecoverWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Recover edits")
    show_info(f"napari-medseg: {len(crashed)} edited mask(s) from a session that did not close cleanly can be "
              "restored (Recover edits)")
    return widget
