"""Start napari with the plugin's widgets docked and the sample scan open.

``python -m napari_medseg.app [SCAN] [--screenshot PNG] [--demo explain]``
"""

from __future__ import annotations

import argparse

PLUGIN = "napari-medseg"
WIDGETS = ("Scan", "Segment", "Explain", "Correct")
FIRST = "Segment"   # the tab shown at start: what a radiologist does first with an open scan


def build_viewer(scan: str | None = None, widgets: tuple = WIDGETS):
    """A viewer with ``widgets`` docked as tabs of one column and ``scan`` (or the sample) open,
    its window fitted to the screen; returns (viewer, {name: widget})."""
    import napari

    from .viewer._window import fit_to_screen, prefer_our_reader

    prefer_our_reader(PLUGIN)
    viewer = napari.Viewer(title="napari-medseg")
    docked, docks = {}, {}
    for index, name in enumerate(widgets):
        docks[name], docked[name] = viewer.window.add_plugin_dock_widget(PLUGIN, name, tabify=index > 0)
    shown = docks.get(FIRST) or next(iter(docks.values()), None)
    if shown is not None:
        shown.raise_()
    fit_to_screen(viewer)
    if scan:
        viewer.open(scan, plugin=PLUGIN)
    else:
        viewer.open_sample(PLUGIN, "mni152_t1")
    viewer.dims.axis_labels = ("S-I (z)", "P-A (y)", "L-R (x)")
    return viewer, docked


def demo_segment(viewer, widgets) -> None:
    """Segment the open scan with the Segment dock's model and show the mask as an outline."""
    from .core.inference import InferenceSettings
    from .viewer._layers import layer_geometry, scan_image_of
    from .viewer._widgets.segment import run_segmentation

    image = viewer.layers[0]
    segment = widgets["Segment"]
    segment._show_result(image, layer_geometry(image), run_segmentation(scan_image_of(image), segment._model.value,
                                                                        InferenceSettings()))
    viewer.layers[-1].contour = 1
    viewer.layers.selection.active = image


def demo_explain(viewer, widgets) -> None:
    """Segment the scan and show its entropy map with the doubtful regions (for the README)."""
    import numpy as np

    from .viewer._widgets.explain import run_explain
    from .viewer._layers import layer_geometry
    from .core.inference import InferenceSettings

    demo_segment(viewer, widgets)
    image = viewer.layers[0]
    geometry = layer_geometry(image)
    explain = widgets["Explain"]
    explain._method.value = "entropy"
    explain._show(image, *run_explain(np.asarray(image.data), geometry.layer_affine_ras, explain._model.value,
                                      "entropy", InferenceSettings()))
    explain._order.value = "size"
    explain._regions.native.selectRow(0)
    explain.go_to_region(0)


def demo_reading(viewer, widgets, segment: bool) -> None:
    """Open the reading layout; for the README, with a segmentation and the crosshair on the brain."""
    import numpy as np

    from .viewer._widgets.reading import open_reading_layout

    image = viewer.layers[0]
    if segment:
        demo_segment(viewer, widgets)
    layout = open_reading_layout(viewer)
    if segment:
        # the crosshair on the left putamen region, a point every plane cuts through brain
        layout.set_point(np.asarray(image.data_to_world(np.array(image.data.shape) * [0.55, 0.45, 0.6])))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m napari_medseg.app")
    parser.add_argument("scan", nargs="?", help="scan to open instead of the sample")
    parser.add_argument("--screenshot", help="save a screenshot of the whole window and quit")
    parser.add_argument("--demo", choices=["segment", "explain", "reading"], help="prepare a demonstration state (for screenshots)")
    parser.add_argument("--layout", action="store_true", help="open the reading layout (axial, coronal, sagittal)")
    args = parser.parse_args(argv)
    import napari

    docked = {"explain": ("Segment", "Explain"), "reading": ("Segment",)}.get(args.demo, WIDGETS)
    viewer, widgets = build_viewer(args.scan, docked)
    if args.demo == "segment":
        demo_segment(viewer, widgets)
    if args.demo == "explain":
        demo_explain(viewer, widgets)
    if args.layout or args.demo == "reading":
        demo_reading(viewer, widgets, segment=args.demo == "reading")
    if args.screenshot:
        from qtpy.QtWidgets import QApplication

        for _ in range(30):
            QApplication.processEvents()
        from .viewer._widgets.reading import layout_of

        if layout_of(viewer) is not None:
            layout_of(viewer).reset_views()
            for _ in range(10):
                QApplication.processEvents()
        from napari._qt.dialogs.qt_notification import NapariQtNotification

        for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
            toast.close()  # start-up notices would cover the canvas
        for _ in range(10):
            QApplication.processEvents()
        viewer.screenshot(args.screenshot, canvas_only=False)
        viewer.close()
        return
    napari.run()


if __name__ == "__main__":
    main()
