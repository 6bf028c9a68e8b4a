"""Autosave must not be felt, must stay small, and must come back fast (issue: edits never lost).

1. **Event-loop gap while brushing** on a 512 x 512 x 300 labels layer in a real napari
   viewer under Xvfb. A Qt timer paints brush dabs (``Labels.paint``) every 10 ms,
   grouped 20 to a stroke as a mouse drag groups them; another Qt timer ticks every
   5 ms and records the largest gap between ticks. Autosave off (napari alone, the
   peer) against on. Goal: on <= 1.1 x off, and at most 50 ms above it.
2. **Journal for an hour of editing**: 5,000 strokes (brush discs of 3 to 25 voxels,
   random labels, erasing too) on a 512 x 512 x 300 mask, stored after each stroke.
   Reports the largest autosave folder seen; goal < 50 MB. The peer is saving the whole
   mask as .nii.gz after each stroke, which is what a user without autosave does.
3. **Recovery** of that 512 x 512 x 300 mask: snapshot plus journal back to an array.
   Goal <= 2 s.

    xvfb-run -a .venv/bin/python benchmarks/bench_autosave.py [--seconds 20] [--strokes 5000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = (300, 512, 512)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def brushing_gap(seconds: float, autosave_on: bool, home: Path) -> dict:
    """Largest Qt event-loop gap while a brush paints continuously."""
    os.environ["NAPARI_MEDSEG_HOME"] = str(home)
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_medseg.viewer._autosave import install

    viewer = napari.Viewer(show=True)
    rng = np.random.default_rng(0)
    image = viewer.add_image(rng.normal(100, 20, SHAPE).astype(np.float32), name="scan")
    labels = viewer.add_labels(np.zeros(SHAPE, np.uint8), name="mask")
    viewer.dims.set_current_step(0, SHAPE[0] // 2)
    manager = install(viewer) if autosave_on else None
    app = QApplication.instance()
    for _ in range(20):
        app.processEvents()
    ticks, state = [], {"dab": 0, "z": SHAPE[0] // 2}
    labels.brush_size = 15
    labels.selected_label = 1

    def dab():
        if state["dab"] % 20 == 0:
            labels._begin_stroke()
            state["centre"] = rng.integers(40, 470, 2)
            state["z"] = int(rng.integers(20, SHAPE[0] - 20))
        angle = state["dab"] * 0.3
        y, x = state["centre"] + (np.array([np.sin(angle), np.cos(angle)]) * 25).astype(int)
        labels.paint((state["z"], int(y), int(x)), 1 + state["dab"] // 20 % 3)
        state["dab"] += 1
        if state["dab"] % 20 == 0:
            labels._commit_stroke()  # a stroke ends: napari's paint event, as on mouse release

    painter, ticker = QTimer(), QTimer()
    painter.timeout.connect(dab)
    ticker.timeout.connect(lambda: ticks.append(time.perf_counter()))
    painter.start(10)
    ticker.start(5)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.001)
    painter.stop()
    ticker.stop()
    gaps = np.diff(ticks[10:]) * 1000
    stored = None
    if manager is not None:
        manager.flush()
        tracked = manager.tracked_for(labels)
        stored = tracked.store.changes if tracked else 0
    viewer.close()
    for _ in range(10):
        app.processEvents()
    return {"max_gap_ms": float(gaps.max()), "p99_gap_ms": float(np.percentile(gaps, 99)),
            "strokes": state["dab"] // 20, "autosaves": stored}


def journal_and_recovery(strokes: int, work: Path) -> dict:
    import nibabel as nib

    from napari_medseg.core import autosave
    from napari_medseg.core.geometry import ScanGeometry

    rng = np.random.default_rng(1)
    mask = np.zeros(SHAPE, np.uint8)
    geometry = ScanGeometry(np.diag([0.7, 0.7, 1.0, 1.0]), SHAPE[::-1])
    store = autosave.MaskAutosave(work / "autosave", mask, geometry=geometry, scan={"shape": list(SHAPE)})
    largest, update_s = 0, []
    yy, xx = np.mgrid[-12:13, -12:13]
    for k in range(strokes):
        radius = rng.uniform(1.5, 12.5)
        disc = (yy ** 2 + xx ** 2) <= radius ** 2
        z, y, x = rng.integers(0, SHAPE[0]), rng.integers(12, SHAPE[1] - 13), rng.integers(12, SHAPE[2] - 13)
        value = int(rng.choice([0, 1, 2, 3], p=[0.2, 0.5, 0.2, 0.1]))
        # A stroke: a few overlapping discs along a short path, on one slice.
        for step in range(int(rng.integers(3, 12))):
            dy, dx = step * 2, step
            if y + dy + 13 < SHAPE[1] and x + dx + 13 < SHAPE[2]:
                region = mask[z, y + dy - 12:y + dy + 13, x + dx - 12:x + dx + 13]
                region[disc] = value
        start = time.perf_counter()
        store.update(mask)
        update_s.append(time.perf_counter() - start)
        if k % 50 == 0 or k == strokes - 1:
            largest = max(largest, folder_bytes(work / "autosave"))
    folder = store.session.folder
    store.finish()
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        restored, _meta = autosave.load_session(folder)
        timings.append(time.perf_counter() - start)
    assert np.array_equal(restored, mask), "the recovered mask differs from the edited one"
    # The peer: the whole mask saved as .nii.gz after a stroke.
    peer = []
    for _ in range(3):
        start = time.perf_counter()
        nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0), np.eye(4)), str(work / "peer.nii.gz"))
        peer.append(time.perf_counter() - start)
    return {"largest_mb": largest / 1e6, "final_mb": folder_bytes(folder) / 1e6 if folder.exists() else 0,
            "update_median_ms": 1000 * float(np.median(update_s)), "update_p99_ms": 1000 * float(np.percentile(update_s, 99)),
            "recovery_s": float(np.median(timings)), "peer_save_s": float(np.median(peer)),
            "peer_mb": (work / "peer.nii.gz").stat().st_size / 1e6, "edited": store.edited}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0, help="brushing time per condition")
    parser.add_argument("--rounds", type=int, default=8, help="runs of each condition")
    parser.add_argument("--strokes", type=int, default=5000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-autosave-"))
    try:
        print(f"1. brushing a {SHAPE[2]} x {SHAPE[1]} x {SHAPE[0]} labels layer, {args.seconds:.0f} s per run, "
              f"{args.rounds} runs each, interleaved (after one warm-up run)")
        brushing_gap(3, False, work / "home-warmup")
        rows = {"off": [], "on": []}
        for round_ in range(args.rounds):
            for mode in (("off", "on") if round_ % 2 == 0 else ("on", "off")):
                result = brushing_gap(args.seconds, mode == "on", work / f"home-{mode}-{round_}")
                rows[mode].append(result)
                print(f"   autosave {mode:>3}: largest gap {result['max_gap_ms']:6.1f} ms, p99 {result['p99_gap_ms']:5.1f} ms, "
                      f"{result['strokes']} strokes" + (f", {result['autosaves']} autosaves" if mode == "on" else ""))
        off = float(np.median([r["max_gap_ms"] for r in rows["off"]]))
        on = float(np.median([r["max_gap_ms"] for r in rows["on"]]))
        print(f"   largest gap, median over runs: off {off:.1f} ms, on {on:.1f} ms: ratio {on / off:.2f} (goal <= 1.10), "
              f"difference {on - off:+.1f} ms (goal <= +50)")
        worst_off = max(r["max_gap_ms"] for r in rows["off"])
        worst_on = max(r["max_gap_ms"] for r in rows["on"])
        p99_off = float(np.median([r["p99_gap_ms"] for r in rows["off"]]))
        p99_on = float(np.median([r["p99_gap_ms"] for r in rows["on"]]))
        print(f"   worst single run: off {worst_off:.1f} ms, on {worst_on:.1f} ms; p99 gap, median: off {p99_off:.1f} ms, "
              f"on {p99_on:.1f} ms (ratio {p99_on / p99_off:.2f})")
        print(f"2. journal for {args.strokes} strokes on a 512 x 512 x 300 mask")
        result = journal_and_recovery(args.strokes, work)
        print(f"   largest autosave folder {result['largest_mb']:.1f} MB (goal < 50), at the end {result['final_mb']:.1f} MB; "
              f"one autosave: median {result['update_median_ms']:.0f} ms, p99 {result['update_p99_ms']:.0f} ms (background thread)")
        print(f"   peer, whole mask as .nii.gz after a stroke: {result['peer_save_s']:.2f} s and {result['peer_mb']:.1f} MB each; "
              f"ratio of one autosave to it {result['update_median_ms'] / 1000 / result['peer_save_s']:.3f}")
        print(f"3. recovery of the 512 x 512 x 300 mask ({result['edited']} edited voxels): {result['recovery_s']:.2f} s "
              f"(goal <= 2 s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
