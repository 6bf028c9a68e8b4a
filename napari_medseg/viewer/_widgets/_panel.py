"""The base of every napari-medseg dock: a magicgui container that scrolls inside its dock."""

from __future__ import annotations

from magicgui.widgets import Container


class DockPanel(Container):
    """A vertical container whose dock scrolls when the screen is shorter than its controls.

    napari docks a magicgui widget's ``.native``; for a ``scrollable`` container that is the
    inner widget, which napari takes out of its scroll area, so the dock's minimum height
    became the sum of its controls (823 px for Correct, measured on a 768-px screen).
    Here ``.native`` is the scroll area itself.
    """

    def __init__(self, **kwargs):
        super().__init__(scrollable=True, **kwargs)
        self.root_native_widget._magic_widget = self  # napari's dock finds the widget through it

    @property
    def native(self):
        return self.root_native_widget
