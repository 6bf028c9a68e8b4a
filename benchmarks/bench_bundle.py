"""An imported MONAI bundle against MONAI's own bundle runner, side by side on the same files.

The model zoo's real ``spleen_ct_segmentation`` configs with a seeded ``model.pt`` (see
``tests/bundle_factory.py``; the zoo's weights cannot be reached from here), on the real
pyradiomics lung CTs, whole (512 x 512 x 48 and x 61 at about 0.6 x 0.6 x 5 mm) or cropped.
Both run as whole processes on the CPU: ``python -m monai.bundle run`` with the bundle's own
``inference.json``, and ``napari-medseg predict`` after ``models import-bundle``. Interleaved
pairs, medians of wall time and of peak memory (PSS of the process tree), and the Dice of
our labels against the runner's.

    .venv/bin/python benchmarks/bench_bundle.py [--runs 3] [--scans lung1 lung2] [--crop]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))


def main() -> None:
    import SimpleITK as sitk
    from bench_import import dice, tree_peak
    from bundle_factory import build, ct_scan

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scans", nargs="+", default=["lung1", "lung2"])
    parser.add_argument("--crop", action="store_true", help="a 160 x 160 x 24 crop instead of the whole CT")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-bundle-"))
    env = dict(os.environ, NAPARI_MEDSEG_HOME=str(root / "home"))
    python = sys.executable
    rows = []
    for index, name in enumerate(args.scans):
        scans = root / name
        scan = ct_scan(scans / "imagesTs" / f"{name}.nii.gz", name, crop=args.crop)
        bundle = build(root / f"bundle-{name}", scan)
        model = f"spleen-{index}"
        tree_peak([python, "-m", "napari_medseg.cli", "models", "import-bundle", str(bundle), "--name", model], env)
        runner = [python, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
                  "--bundle_root", str(bundle), "--dataset_dir", str(scans), "--output_dir", str(root / f"monai-{name}")]
        ours = [python, "-m", "napari_medseg.cli", "predict", str(scan), "-o", str(root / f"ours-{name}.nii.gz"),
                "--model", model, "--device", "cpu", "--force", "--quiet"]
        theirs_times, ours_times = [], []
        for _ in range(args.runs):
            theirs_times.append(tree_peak(runner, env))
            ours_times.append(tree_peak(ours, env))
        theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(root / f"monai-{name}" / name / f"{name}_trans.nii.gz")))
        mine = sitk.GetArrayFromImage(sitk.ReadImage(str(root / f"ours-{name}.nii.gz")))
        size = sitk.ReadImage(str(scan)).GetSize()
        t_theirs = statistics.median(t for t, _ in theirs_times)
        t_ours = statistics.median(t for t, _ in ours_times)
        m_theirs = statistics.median(m for _, m in theirs_times)
        m_ours = statistics.median(m for _, m in ours_times)
        rows.append((f"{name} {'x'.join(map(str, size))}", t_ours, t_theirs, m_ours, m_theirs,
                     dice(mine.astype(int), theirs.astype(int), (0, 1))))
    print(f"\n{'scan':<22} {'ours s':>7} {'MONAI s':>8} {'time':>6} {'ours MB':>8} {'MONAI MB':>9} {'memory':>7}  "
          "Dice vs MONAI (background / spleen)")
    for label, t_ours, t_theirs, m_ours, m_theirs, score in rows:
        print(f"{label:<22} {t_ours:7.2f} {t_theirs:8.2f} {t_ours / t_theirs:5.2f}x {m_ours:8.0f} {m_theirs:9.0f} "
              f"{m_ours / m_theirs:6.2f}x  {score}")


if __name__ == "__main__":
    main()
