"""Time to open a 512x512x300 int16 .nii.gz into a napari layer vs nibabel alone.

Run under a display (``xvfb-run -a .venv/bin/python benchmarks/bench_io.py``).
Prints both medians and the ratio; the goal is napari-medseg / nibabel <= 1.2.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_medseg.core.io import read_volume


def make_ct_like(path: Path, shape=(512, 512, 300)) -> None:
    """A CT-like int16 volume: air, a body ellipse with tissue texture, bone ring."""
    rng = np.random.default_rng(0)
    x, y = np.mgrid[-1:1:complex(shape[0]), -1:1:complex(shape[1])]
    r = np.sqrt((x / 0.8) ** 2 + (y / 0.6) ** 2)
    base = np.where(r < 1, 40, -1000).astype(np.int16)
    base[(r > 0.9) & (r < 1)] = 900
    data = np.empty(shape, np.int16)
    for k in range(shape[2]):
        data[..., k] = base + rng.integers(-20, 20, size=shape[:2], dtype=np.int16)
    affine = np.diag([0.7, 0.7, 1.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(path))


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    import napari
    from qtpy.QtWidgets import QApplication

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ct.nii.gz"
        make_ct_like(path, (512, 512, args.slices))
        size_mb = path.stat().st_size / 1e6

        def nibabel_only():
            np.asanyarray(nib.load(str(path)).dataobj)

        def core_read():
            read_volume(path)

        viewer = napari.Viewer(show=False)

        def napari_layer():
            viewer.open(str(path), plugin="napari-medseg")
            QApplication.processEvents()  # the first slice is drawn

        def timed_napari_layer():
            viewer.layers.clear()  # not timed: removing the previous layer
            start = time.perf_counter()
            napari_layer()
            elapsed = time.perf_counter() - start
            assert viewer.layers[0].data.shape == (args.slices, 512, 512)
            return elapsed

        napari_layer()  # warm-up: plugin discovery, GL context
        t_nib = median_time(nibabel_only, args.repeats)
        t_core = median_time(core_read, args.repeats)
        t_ours = statistics.median(timed_napari_layer() for _ in range(args.repeats))
        viewer.close()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"volume: 512x512x{args.slices} int16 .nii.gz ({size_mb:.0f} MB on disk), median of {args.repeats}")
    print(f"nibabel load only:             {t_nib:6.2f} s")
    print(f"napari-medseg read_volume:     {t_core:6.2f} s  (ratio to nibabel {t_core / t_nib:.2f})")
    print(f"napari-medseg to napari layer: {t_ours:6.2f} s")
    print(f"ratio (napari-medseg / nibabel): {t_ours / t_nib:.2f}  (goal <= 1.2)")


if __name__ == "__main__":
    main()
