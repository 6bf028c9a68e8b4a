"""The base of every napari-medseg dock: a magicgui container that scrolls inside its dock."""

from __future__ import annotations

from magicgui.widgets import Container
from napari.utils.notifications import show_error, show_info


class DockPanel(Container):
    """A vertical container whose dock scrolls when the screen is shorter than its controls.

    napari docks a magicgui widget's ``.native``; for a ``scrollable`` container that is the
    inner widget, which napari takes out of its scroll area, so the dock's minimum height
    became the sum of its controls (823 px for Correct, measured on a 768-px screen).
    Here ``.native`` is the scroll area itself.
    """

    def __init__(self, napari_viewer, **kwargs):
        super().__init__(scrollable=True, **kwargs)
        self.root_native_widget._magic_widget = self  # napari's dock finds the widget through it
        from .._autosave import install

        self.viewer = napari_viewer
        self._autosave = install(napari_viewer)  # edits in this viewer are autosaved
        self.task = None  # the dock's last background run (a BackgroundTask)

    @property
    def native(self):
        return self.root_native_widget

    def refuse_to_start(self, verb: str, running: str, model_hint: str = "") -> bool:
        """True, after a notification, when a run cannot start: no scan, no model, or one already running.

        ``self._image``, ``self._model`` and ``self.task`` are the dock's scan, model and last run.
        """
        if self._image.value is None:
            show_error(f"napari-medseg: open a 3D scan first (no image layer to {verb})")
        elif self._model.value is None:
            show_error(f"napari-medseg: no model is installed{model_hint}")
        elif self.task is not None and self.task.running:
            show_info(f"napari-medseg: {running} is already running")
        else:
            return False
        return True

    def running_task(self):
        """The run under way, or None."""
        return self.task if self.task is not None and self.task.running else None
