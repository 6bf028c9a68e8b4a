"""Start napari with the plugin's widgets docked and the sample scan open.

``python -m napari_medseg.app [SCAN] [--screenshot PNG]``
"""

from __future__ import annotations

import argparse

PLUGIN = "napari-medseg"
WIDGETS = ("Scan", "Segment", "Explain")


def build_viewer(scan: str | None = None):
    import napari

    viewer = napari.Viewer(title="napari-medseg")
    for widget in WIDGETS:
        viewer.window.add_plugin_dock_widget(PLUGIN, widget)
    if scan:
        viewer.open(scan, plugin=PLUGIN)
    else:
        viewer.open_sample(PLUGIN, "mni152_t1")
    viewer.dims.axis_labels = ("S-I (z)", "P-A (y)", "L-R (x)")
    return viewer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m napari_medseg.app")
    parser.add_argument("scan", nargs="?", help="scan to open instead of the sample")
    parser.add_argument("--screenshot", help="save a screenshot of the whole window and quit")
    args = parser.parse_args(argv)
    import napari

    viewer = build_viewer(args.scan)
    if args.screenshot:
        from qtpy.QtWidgets import QApplication

        viewer.window._qt_window.resize(1400, 900)
        for _ in range(20):
            QApplication.processEvents()
        viewer.screenshot(args.screenshot, canvas_only=False)
        viewer.close()
        return
    napari.run()


if __name__ == "__main__":
    main()
