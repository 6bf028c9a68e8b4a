"""The workspace a viewer works in: one folder per viewer, shared by every dock.

The Correct and Review docks choose it; Segment and Explain list its model versions
(its promoted one selected); autosave submits into it when the window closes.
``workspace_events.changed(viewer)`` fires when the folder or its model versions change
(a promotion, a rollback), so the docks that list models refresh.
"""

from __future__ import annotations

import weakref
from pathlib import Path

from psygnal import Signal

_folders: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _WorkspaceEvents:
    changed = Signal(object)   # the viewer


workspace_events = _WorkspaceEvents()


def default_workspace_folder() -> Path:
    from ..core.models import user_home

    return user_home() / "workspace"


def workspace_folder(viewer) -> Path:
    found = _folders.get(viewer) if viewer is not None else None
    return found or default_workspace_folder()


def set_workspace_folder(viewer, folder) -> None:
    folder = Path(str(folder))
    if viewer is None or _folders.get(viewer) == folder:
        return
    _folders[viewer] = folder
    workspace_events.changed.emit(viewer)


def models_changed(viewer) -> None:
    """The workspace's versions changed (fine-tuning promoted one, or a rollback)."""
    workspace_events.changed.emit(viewer)


def open_workspace(viewer):
    """The viewer's workspace, opened (created when it is the default one), or None when it cannot be."""
    from ..core.errors import MedsegError
    from ..core.workspace import Workspace

    folder = workspace_folder(viewer)
    try:
        if folder == default_workspace_folder():
            folder.parent.mkdir(parents=True, exist_ok=True)
        return Workspace(folder, create=folder == default_workspace_folder())
    except (MedsegError, OSError):
        return None
