"""The main window on the screen it is shown on: never taller or wider than that screen.

The plugin's docks share one tabbed column on the right (each dock scrolls inside when
its controls are taller than the screen), so the canvas and the slice slider stay in view
on a 1366 x 768 laptop as on a 1920 x 1080 workstation.
"""

from __future__ import annotations

PLUGIN_DOCK_AREA = "right"


def qt_window(viewer):
    return getattr(getattr(viewer, "window", None), "_qt_window", None)


def available_screen(window):
    """The usable part of the screen the window is on (without task bars), as a QRect."""
    from qtpy.QtWidgets import QApplication

    screen = window.screen() if hasattr(window, "screen") and window.screen() is not None \
        else QApplication.primaryScreen()
    return screen.availableGeometry()


def fit_to_screen(viewer) -> None:
    """Make the main window fill its screen's usable area, and no more."""
    from qtpy.QtCore import QSize

    window = qt_window(viewer)
    if window is None:
        return
    area = available_screen(window)
    window.setMaximumSize(QSize(16777215, 16777215))
    window.resize(area.width(), area.height())
    window.move(area.topLeft())
    if window.isVisible():
        window.showMaximized()  # where a window manager runs; Xvfb keeps the size set above


# Docks the plugin adds by name (the others come from napari's plugin menu, "NAME (napari-medseg)").
OWN_DOCKS = ("Reading layout", "Recover edits")


def plugin_docks(viewer, exclude=()) -> list:
    """The QDockWidgets that hold napari-medseg widgets, docked (not floating) and not closed."""
    from qtpy.QtWidgets import QDockWidget

    window = qt_window(viewer)
    if window is None:
        return []
    found = []
    for dock in window.findChildren(QDockWidget):
        name = getattr(dock, "name", "") or dock.objectName()
        if dock in exclude or dock.isFloating() or dock.isHidden() and dock.parent() is not window:
            continue
        if name.endswith("(napari-medseg)") or name in OWN_DOCKS:
            found.append(dock)
    return found


def tabify_with_plugin_docks(viewer, dock) -> None:
    """Put ``dock`` in the same tabbed stack as the other napari-medseg docks, and show it."""
    window = qt_window(viewer)
    if window is None or dock is None:
        return
    for other in plugin_docks(viewer, exclude=(dock,)):
        if window.dockWidgetArea(other) == window.dockWidgetArea(dock) and not other.isFloating():
            window.tabifyDockWidget(other, dock)
            break
    dock.show()
    dock.raise_()


# The scan files this plugin reads that napari's own reader also claims; without a
# preference napari asks "Choose reader" on every open.
SCAN_PATTERNS = ("*.nii", "*.nii.gz", "*.nrrd", "*.nhdr", "*.mha", "*.mhd", "*.dcm")


def prefer_our_reader(plugin: str) -> list:
    """Make ``plugin`` napari's reader for scan files and for folders (DICOM studies), where
    the user has not chosen another: napari remembers a folder choice only for that one
    folder, so each new study would ask again. Returns the patterns it set."""
    from napari.settings import get_settings

    settings = get_settings().plugins
    chosen = dict(settings.extension2reader)
    added = [pattern for pattern in (*SCAN_PATTERNS, "*/") if pattern not in chosen]
    if added:
        settings.extension2reader = {**chosen, **{pattern: plugin for pattern in added}}
    return added
