"""Paging speed of the reading layout against napari's single view, side by side in one run.

A 512 x 512 x 300 CT (pyradiomics' real lung CT, 512 x 512 x 48, stacked to 300 slices;
int16 HU) with a labels layer (lung and body masks by threshold) is opened in a real
napari viewer under Xvfb. A slice step is ``dims.current_step`` plus one on the axial
axis. Two times are taken for every step, until every canvas that shows the change is
done with it (the single canvas for napari alone; the axial canvas and the two
crosshair-bearing canvases for the layout):

* **on screen** (the goal's figure): until Qt has composed the window and swapped it
  (``QOpenGLWidget.frameSwapped``, counted only after that canvas drew this step). This
  is when the redrawn views are visible.
* **drawn**: until each canvas's vispy ``draw`` event has run to its end, i.e. its GL
  commands are issued. Software OpenGL (llvmpipe) rasterises later, at the flush, so this
  figure leaves napari's own rasterisation out but counts the axial view's for the layout
  (Qt flushes it before the side canvases draw); it is the figure the earlier
  results in the README were taken with.

(Before 2026-11-26 this script disconnected napari's own draw callbacks after its
warm-up, so most steps never drew and the median came from one step; its earlier
figure, 1.12, was wrong.) Median of 60 steps each, the two conditions interleaved in
blocks of 10. Goal: layout <= 1.5 x napari, on screen.

    xvfb-run -a .venv/bin/python benchmarks/bench_reading.py [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def ct_volume() -> tuple[np.ndarray, np.ndarray]:
    from dicom_factory import pyradiomics_scan

    from napari_medseg.core.io import read_volume

    volume = read_volume(pyradiomics_scan("lung1"))
    slab = np.asarray(volume.layer_data(), dtype=np.int16)  # (48, 512, 512)
    reps = int(np.ceil(300 / slab.shape[0]))
    ct = np.concatenate([slab if k % 2 == 0 else slab[::-1] for k in range(reps)])[:300]
    labels = np.zeros(ct.shape, np.uint8)
    labels[ct > -200] = 1          # body
    labels[(ct < -500) & (ct > -950)] = 2   # lung (and some air near the body)
    return np.ascontiguousarray(ct), labels


class Drawn:
    """When a canvas has drawn a step (end of its vispy ``draw`` event) and when that frame
    reached the screen (the first ``frameSwapped`` of its window after that draw)."""

    def __init__(self, canvas):
        self.canvas = canvas
        self.drawn = self.shown = None

    def reset(self) -> None:
        self.drawn = self.shown = None

    def _on_draw(self, _event=None) -> None:
        self.drawn = time.perf_counter()

    def _on_swap(self) -> None:
        if self.drawn is not None and self.shown is None:
            self.shown = time.perf_counter()

    def connect(self) -> None:
        # Last: after the scene has drawn (vispy calls a new callback first by default).
        self.canvas.events.draw.connect(self._on_draw, position="last")
        self.canvas.native.frameSwapped.connect(self._on_swap)

    def disconnect(self) -> None:  # ours only: napari's own draw callbacks stay
        self.canvas.events.draw.disconnect(self._on_draw)
        self.canvas.native.frameSwapped.disconnect(self._on_swap)


def time_steps(viewer, canvases, steps: int, app) -> tuple[list, list]:
    """Per step: seconds until every canvas drew it, and until every canvas showed it."""
    for canvas in canvases:
        canvas.connect()
    drawn, shown = [], []
    for _ in range(steps):
        for canvas in canvases:
            canvas.reset()
        step = list(viewer.dims.current_step)
        step[0] = (step[0] + 1) % viewer.dims.nsteps[0]
        start = time.perf_counter()
        viewer.dims.current_step = tuple(step)
        deadline = start + 5.0
        while any(c.shown is None for c in canvases) and time.perf_counter() < deadline:
            app.processEvents()
        complete = all(c.shown is not None for c in canvases)
        drawn.append(max(c.drawn for c in canvases) - start if complete else float("nan"))
        shown.append(max(c.shown for c in canvases) - start if complete else float("nan"))
    for canvas in canvases:
        canvas.disconnect()
    return drawn, shown


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_medseg.viewer._widgets.reading import ReadingLayout

    ct, labels = ct_volume()
    print(f"CT {ct.shape[2]} x {ct.shape[1]} x {ct.shape[0]} int16 with a labels layer")
    app = QApplication.instance() or QApplication([])
    names = ("napari single view", "reading layout")
    drawn = {name: [] for name in names}
    shown = {name: [] for name in names}
    single = napari.Viewer(show=True)
    single.add_image(ct, name="ct", contrast_limits=(-1000, 400))
    single.add_labels(labels, name="labels", opacity=0.4)
    single.window._qt_window.resize(1400, 900)
    reading = napari.Viewer(show=True)
    reading.add_image(ct, name="ct", contrast_limits=(-1000, 400))
    reading.add_labels(labels, name="labels", opacity=0.4)
    reading.window._qt_window.resize(1400, 900)
    layout = ReadingLayout(reading)
    reading.window.add_dock_widget(layout, name="Reading layout", area="right")
    for _ in range(50):
        app.processEvents()
    layout.reset_views()
    for _ in range(20):
        app.processEvents()
    canvases = {"napari single view": [Drawn(single.window._qt_viewer.canvas._scene_canvas)],
                "reading layout": [Drawn(view.qt_viewer.canvas._scene_canvas) for view in layout.views.values()]}
    viewers = {"napari single view": (single, reading), "reading layout": (reading, single)}

    def in_front(viewer, other) -> None:
        # Under Xvfb there is no compositor: a window hidden behind another is never painted.
        other.window._qt_window.hide()
        viewer.window._qt_window.show()
        viewer.window._qt_window.raise_()
        for _ in range(20):
            app.processEvents()

    for _ in range(max(1, args.steps // 10)):
        for name in names:
            viewer, other = viewers[name]
            in_front(viewer, other)
            time_steps(viewer, canvases[name], 2, app)  # warm-up after the window came to the front
            block_drawn, block_shown = time_steps(viewer, canvases[name], 10, app)
            drawn[name] += block_drawn
            shown[name] += block_shown
    for label, results in (("on screen", shown), ("drawn", drawn)):
        medians = {name: 1000 * statistics.median([t for t in values if t == t]) for name, values in results.items()}
        print(f"   {label}:")
        for name, value in medians.items():
            p90 = 1000 * float(np.nanpercentile(results[name], 90))
            missed = sum(1 for t in results[name] if t != t)
            print(f"      {name:<20} median {value:6.1f} ms per slice step (p90 {p90:6.1f} ms), "
                  f"{len(results[name])} steps" + (f", {missed} never shown within 5 s" if missed else ""))
        ratio = medians["reading layout"] / medians["napari single view"]
        goal = " (goal <= 1.50)" if label == "on screen" else ""
        print(f"      ratio reading layout / napari single view: {ratio:.2f}{goal}")
    sys.stdout.flush()
    # Closing two GL viewers (one of them hidden) can hang under Xvfb; the figures are out.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
