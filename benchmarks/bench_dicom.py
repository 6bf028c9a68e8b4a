"""DICOM reading speed against SimpleITK/GDCM, whole processes, side by side.

1. **Open a 1,000-slice series** (512 x 512, real CT voxels from pyradiomics' lung1,
   written with pydicom): ``napari-medseg info FOLDER`` (discovery, every header once,
   every pixel, geometry) against a process running SimpleITK's
   ``GetGDCMSeriesFileNames`` plus ``ImageSeriesReader``. Goal: ratio <= 1.0.
2. **List a study of 5,000 files in 10 series** (512 x 512 CT slices, each series split
   over two folders): ``napari-medseg info STUDY --json`` against a process running
   ``GetGDCMSeriesIDs`` over every folder of the tree (as napari-medseg 0.1 did). Goal:
   ratio <= 0.5.

Each process is timed from start to exit; median of three runs, interleaved.

    .venv/bin/python benchmarks/bench_dicom.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

SITK_SERIES = """
import sys, SimpleITK as sitk
folder = sys.argv[1]
files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder)
reader = sitk.ImageSeriesReader()
reader.SetFileNames(files)
image = reader.Execute()
print(image.GetSize())
"""
SITK_LIST = """
import os, sys, SimpleITK as sitk
found = 0
for root, dirs, files in os.walk(sys.argv[1]):
    if files:
        found += len(sitk.ImageSeriesReader.GetGDCMSeriesIDs(root))
print(found)
"""


def make_series(folder: Path, slices: int = 1000) -> Path:
    from dicom_factory import Sampler, pyradiomics_scan, write_image

    if folder.exists() and len(list(folder.iterdir())) == slices:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    sampler = Sampler(pyradiomics_scan("lung1"))
    volume = sampler.data  # file order (i, j, k) of the lung CT, 512 x 512 x 48
    rng = np.random.default_rng(0)
    uid = "1.2.826.0.1.3680043.8.498.1000"
    for k in range(slices):
        source = volume[:, :, int(k * volume.shape[2] / slices)].T  # rows, columns
        pixels = source + rng.normal(0, 5, source.shape)
        write_image(folder / f"IM{k:05d}", pixels, position=(-180.0, -180.0, 0.5 * k),
                    orientation=(1, 0, 0, 0, 1, 0), spacing=(0.7, 0.7), series_uid=uid,
                    study_uid=uid + ".1", frame_uid=uid + ".2", number=k + 1)
    return folder


def make_study(folder: Path, series: int = 10, per_series: int = 500) -> Path:
    """10 CT series of 500 slices of 512 x 512 (real lung CT voxels), each split over two folders."""
    from dicom_factory import Sampler, pyradiomics_scan, write_image

    if folder.exists() and sum(1 for _ in folder.rglob("IM*")) == series * per_series:
        return folder
    volume = Sampler(pyradiomics_scan("lung1")).data
    for s in range(series):
        uid = f"1.2.826.0.1.3680043.8.498.2000.{s}"
        for k in range(per_series):
            # Each series split over two folders, as a CD export does.
            target = folder / f"series{s}" / f"part{k % 2}"
            target.mkdir(parents=True, exist_ok=True)
            pixels = volume[:, :, (k + s) % volume.shape[2]].T
            write_image(target / f"IM{k:05d}", pixels, position=(0.0, 0.0, 2.0 * k),
                        orientation=(1, 0, 0, 0, 1, 0), spacing=(1.0, 1.0), series_uid=uid,
                        study_uid="1.2.826.0.1.3680043.8.498.2000", frame_uid=uid + ".9",
                        number=k + 1, series_number=s + 1)
    return folder


def timed(command: list) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def compare(title: str, ours: list, theirs: list, goal: float, runs: int = 3) -> None:
    a, b = [], []
    for _ in range(runs):
        a.append(timed(ours))
        b.append(timed(theirs))
    mine, peer = statistics.median(a), statistics.median(b)
    print(f"{title:<44} {mine:8.2f} {peer:8.2f} {mine / peer:7.2f}   (goal <= {goal})")


def main() -> None:
    import SimpleITK as sitk

    data = HERE / ".data"
    series = make_series(data / "dicom_1000")
    study = make_study(data / "dicom_study_5000")
    cli = str(Path(sys.executable).with_name("napari-medseg"))
    print(f"SimpleITK {sitk.Version.VersionString()}; whole processes, median of 3")
    print(f"{'task':<44} {'ours s':>8} {'GDCM s':>8} {'ratio':>7}")
    compare("open a 1,000-slice 512 x 512 series", [cli, "info", str(series)],
            [sys.executable, "-c", SITK_SERIES, str(series)], 1.0)
    compare("list a study of 5,000 512 x 512 files, 10 series", [cli, "info", str(study), "--json"],
            [sys.executable, "-c", SITK_LIST, str(study)], 0.5)


if __name__ == "__main__":
    main()
