"""Imported models against their own tools, side by side on the same folder and scan.

**``napari-medseg predict`` with an imported nnU-Net model against ``nnUNetv2_predict``**,
both as whole processes on the CPU, on the genuine results folder that
``tests/nnunet_factory.py`` builds with nnU-Net's own planner and trainer (two folds,
real lung CT), and two scans: the held-out crop (68 x 68 x 30 at 0.8 x 0.8 x 4 mm,
resampled both ways) and the whole pyradiomics lung CT it came from (512 x 512 x 48
at 0.6 x 0.6 x 5 mm). Three interleaved pairs per setting, medians:

* at nnU-Net's own settings (its default mirroring, and ``--disable_tta``): wall time and
  peak memory (the proportional set size of the whole process tree, sampled every 20 ms,
  since nnU-Net works in worker processes that share their libraries), with the Dice of
  our labels against theirs;
* our engine's window plan without mirroring (``--windows ours --no-tta``), with its
  Dice against nnU-Net's ``--disable_tta`` output;
* with ``--amp``: nnU-Net's windows without mirroring, in bf16 (``predict --amp``, which a
  CPU with native bf16 computes faster), with its Dice against ``--disable_tta``.

    .venv/bin/python benchmarks/bench_import.py [--runs 3] [--folds 0 1] [--scans crop|ct|both] [--skip-mirroring]
        [--amp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def tree_peak(command: list, env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak MB of the proportional set size (PSS) summed over the process and its
    children: nnU-Net works in worker processes, and PSS counts the libraries they share once)."""
    import psutil

    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, encoding="utf-8",
                             errors="replace", env=env)
    process = psutil.Process(child.pid)
    peak = [0.0]

    def sample():
        while child.poll() is None:
            try:
                total = sum(p.memory_full_info().pss for p in [process, *process.children(recursive=True)])
            except psutil.Error:
                total = 0
            peak[0] = max(peak[0], total)
            time.sleep(0.02)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    _out, err = child.communicate()
    watcher.join()
    if child.returncode:
        raise SystemExit(f"{Path(command[0]).name} failed: {err[-1500:]}")
    return time.perf_counter() - started, peak[0] / 2**20


def dice(a: np.ndarray, b: np.ndarray, classes) -> str:
    out = []
    for c in classes:
        x, y = a == c, b == c
        out.append(1.0 if not x.any() and not y.any() else 2 * float((x & y).sum()) / float(x.sum() + y.sum()))
    return " / ".join(f"{v:.4f}" for v in out)


def main() -> None:
    import nibabel as nib

    from dicom_factory import pyradiomics_scan
    from nnunet_factory import CONFIGURATION, TRAINER, build, environment

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--folds", nargs="+", default=["0", "1"])
    parser.add_argument("--scans", choices=("crop", "ct", "both"), default="both",
                        help="the held-out crop, the whole lung CT (slow with mirroring: 8 passes), or both")
    parser.add_argument("--skip-mirroring", action="store_true",
                        help="leave out the row at nnU-Net's default mirroring (8 passes; over 10 min per "
                             "pair on the whole CT on a 2-core CPU)")
    parser.add_argument("--amp", action="store_true",
                        help="add a row at nnU-Net's windows without mirroring, in bf16 (predict --amp)")
    args = parser.parse_args()
    genuine = build()
    env = environment(genuine["root"])
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        home = {**os.environ, "NAPARI_MEDSEG_HOME": str(tmp / "home")}
        subprocess.run([str(bin_dir / "napari-medseg"), "models", "import-nnunet", str(genuine["folder"]),
                        "--folds", *args.folds, "--name", "bench-nnunet"], env=home, check=True,
                       capture_output=True)
        import SimpleITK as sitk

        whole = tmp / "lung1_0000.nii.gz"
        sitk.WriteImage(sitk.ReadImage(str(pyradiomics_scan("lung1"))), str(whole))
        scans = {"held-out crop 68x68x30": genuine["held_out"], "lung CT 512x512x48": whole}
        scans = {k: v for k, v in scans.items() if args.scans == "both" or k.startswith(
            "held" if args.scans == "crop" else "lung")}
        print(f"nnU-Net results folder: {genuine['folder'].parent.name}/{genuine['folder'].name}, "
              f"folds {' '.join(args.folds)}; {args.runs} interleaved runs; CPU, {os.cpu_count()} cores")
        print(f"{'scan':<24} {'setting':<26} {'ours s':>7} {'nnU-Net s':>9} {'ratio':>6} "
              f"{'ours MB':>8} {'nnU-Net MB':>10} {'ratio':>6}  Dice body / bone vs nnU-Net")

        def our_predict(scan, output, flags) -> tuple[float, float]:
            """Our ``predict`` with the imported model, as a whole process: (seconds, peak MiB)."""
            return tree_peak([str(bin_dir / "napari-medseg"), "predict", str(scan), "-o", str(output),
                              "--model", "bench-nnunet", "--force", "--quiet", *flags], home)

        for label, scan in scans.items():
            source = tmp / "in" / label.split()[0]
            source.mkdir(parents=True)
            os.symlink(scan, source / "case_0000.nii.gz")
            nnunet_outputs = {}
            settings = [("nnU-Net's default (mirroring)", [], ["--tta"]),
                        ("--disable_tta", ["--disable_tta"], ["--no-tta"])][1 if args.skip_mirroring else 0:]
            for setting, theirs_flags, our_flags in settings:
                ours_t, ours_m, theirs_t, theirs_m = [], [], [], []
                out_theirs = tmp / "theirs" / label.split()[0] / setting[:3]
                for _ in range(args.runs):
                    seconds, peak = tree_peak([str(bin_dir / "nnUNetv2_predict"), "-i", str(source), "-o",
                                               str(out_theirs), "-d", "1", "-c", CONFIGURATION, "-tr", TRAINER,
                                               "-f", *args.folds, "-device", "cpu", *theirs_flags], env)
                    theirs_t.append(seconds)
                    theirs_m.append(peak)
                    seconds, peak = our_predict(scan, tmp / "ours.nii.gz", our_flags)
                    ours_t.append(seconds)
                    ours_m.append(peak)
                theirs = np.asarray(nib.load(out_theirs / "case.nii.gz").dataobj)
                nnunet_outputs[setting] = theirs
                ours = np.asarray(nib.load(tmp / "ours.nii.gz").dataobj)
                a, b = statistics.median(ours_t), statistics.median(theirs_t)
                m, n = statistics.median(ours_m), statistics.median(theirs_m)
                print(f"{label:<24} {setting:<26} {a:7.2f} {b:9.2f} {a / b:6.2f} {m:8.0f} {n:10.0f} {m / n:6.2f}  "
                      f"{dice(ours, theirs, (1, 2))}", flush=True)
            rows = [("ours: our windows, no TTA", ["--windows", "ours", "--no-tta"])]
            if args.amp:
                rows.append(("ours: --no-tta --amp (bf16)", ["--no-tta", "--amp"]))
            for row, flags in rows:
                times, peaks = [], []
                for _ in range(args.runs):
                    seconds, peak = our_predict(scan, tmp / "ours_fast.nii.gz", flags)
                    times.append(seconds)
                    peaks.append(peak)
                ours = np.asarray(nib.load(tmp / "ours_fast.nii.gz").dataobj)
                b = statistics.median(theirs_t)
                print(f"{label:<24} {row:<26} {statistics.median(times):7.2f} {b:9.2f} "
                      f"{statistics.median(times) / b:6.2f} {statistics.median(peaks):8.0f} {n:10.0f} "
                      f"{statistics.median(peaks) / n:6.2f}  {dice(ours, nnunet_outputs['--disable_tta'], (1, 2))}"
                      " (vs --disable_tta)", flush=True)


if __name__ == "__main__":
    main()
