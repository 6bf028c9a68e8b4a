"""Paging speed of the reading layout against napari's single view, side by side in one run.

A 512 x 512 x 300 CT (pyradiomics' real lung CT, 512 x 512 x 48, stacked to 300 slices;
int16 HU) with a labels layer (lung and body masks by threshold) is opened in a real
napari viewer under Xvfb. A slice step is ``dims.current_step`` plus one on the axial
axis; the time is measured from the step to the moment every canvas that shows the
change has drawn (vispy ``draw`` events): the single canvas for napari alone, the axial
canvas and the two crosshair-bearing canvases for the layout. (Before 2026-11-26 this
script disconnected napari's own draw callbacks after its warm-up, so most steps never
drew and the median came from one step; its earlier figure, 1.12, was wrong.) Median of 60 steps each,
the two conditions interleaved in blocks of 10. Goal: layout <= 1.5 x napari.

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
    """When a canvas showed the change: its vispy ``draw`` event."""

    def __init__(self, canvas):
        self.canvas = canvas

    def connect(self, callback) -> None:
        self._callback = lambda _event: callback()
        # Last: after the scene has drawn (vispy calls a new callback first by default,
        # which would time the start of the drawing, not the drawn view).
        self.canvas.events.draw.connect(self._callback, position="last")

    def disconnect(self) -> None:  # ours only: napari's own draw callbacks stay
        self.canvas.events.draw.disconnect(self._callback)


def time_steps(viewer, sources, steps: int, app) -> list:
    drawn = {}
    for number, source in enumerate(sources):
        source.connect(lambda n=number: drawn.__setitem__(n, time.perf_counter()))
    times = []
    for _ in range(steps):
        drawn.clear()
        step = list(viewer.dims.current_step)
        step[0] = (step[0] + 1) % viewer.dims.nsteps[0]
        start = time.perf_counter()
        viewer.dims.current_step = tuple(step)
        deadline = start + 5.0
        while len(drawn) < len(sources) and time.perf_counter() < deadline:
            app.processEvents()
        times.append(max(drawn.values()) - start if len(drawn) == len(sources) else float("nan"))
    for source in sources:
        source.disconnect()
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_medseg._widgets.reading import ReadingLayout

    ct, labels = ct_volume()
    print(f"CT {ct.shape[2]} x {ct.shape[1]} x {ct.shape[0]} int16 with a labels layer")
    app = QApplication.instance() or QApplication([])
    results = {"napari single view": [], "reading layout": []}
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
    single_canvases = [Drawn(canvas=single.window._qt_viewer.canvas._scene_canvas)]
    layout_canvases = [Drawn(canvas=view.qt_viewer.canvas._scene_canvas) for view in layout.views.values()]
    def in_front(viewer, other) -> None:
        # Under Xvfb there is no compositor: a window hidden behind another is never painted.
        other.window._qt_window.hide()
        viewer.window._qt_window.show()
        viewer.window._qt_window.raise_()
        for _ in range(20):
            app.processEvents()

    blocks = max(1, args.steps // 10)
    for _ in range(blocks):
        in_front(single, reading)
        time_steps(single, single_canvases, 2, app)  # warm-up after the window came to the front
        results["napari single view"] += time_steps(single, single_canvases, 10, app)
        in_front(reading, single)
        time_steps(reading, layout_canvases, 2, app)
        results["reading layout"] += time_steps(reading, layout_canvases, 10, app)
    medians = {name: 1000 * statistics.median([t for t in values if t == t]) for name, values in results.items()}
    for name, value in medians.items():
        p90 = 1000 * float(np.nanpercentile(results[name], 90))
        missed = sum(1 for t in results[name] if t != t)
        print(f"   {name:<20} median {value:6.1f} ms per slice step (p90 {p90:6.1f} ms), {len(results[name])} steps"
              + (f", {missed} never drawn within 5 s" if missed else ""))
    ratio = medians["reading layout"] / medians["napari single view"]
    print(f"   ratio reading layout / napari single view: {ratio:.2f} (goal <= 1.50)")
    sys.stdout.flush()
    # Closing two GL viewers (one of them hidden) can hang under Xvfb; the figures are out.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
