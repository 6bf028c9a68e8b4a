"""A genuine nnU-Net v2 results folder, made by nnU-Net's own code on real CT.

Six crops of pyradiomics' two lung CTs (BSD-3) get thresholded body and bone labels;
``nnUNetv2_plan_and_preprocess`` plans them, the architecture is shrunk so that the CPU
can train it, and nnU-Net's own ``nnUNetTrainer`` trains folds 0 and 1 for one short
epoch (its schedule set on the instance: ``nnUNetv2_train`` cannot be used here, because
its search for trainer variants imports timm, whose torchvision does not load beside a
CPU-only torch). A seventh crop, never trained on, is the held-out scan. The folder is
cached: a second call returns at once.

    python tests/nnunet_factory.py [CACHE_DIR]

Used by ``tests/test_nnunet.py`` (cached under ``.cache/test-data``, built once for all
test workers) and ``benchmarks/bench_import.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DATASET = "Dataset001_LungCT"
TRAINER = "nnUNetTrainer"
ITERATIONS = 120         # per epoch (nnU-Net: 250), one epoch; 200 gave no better pseudo Dice
# Training is seeded (an unseeded epoch once learned no bone at all). Each fold starts from
# a seed whose epoch was measured to find both classes (120 iterations: pseudo Dice
# [0.935, 0.729] and [0.890, 0.663]), so that CI trains each fold once; a retry steps by 100.
FIRST_SEEDS = {0: 20261307, 1: 20261208}
MIN_PSEUDO_DICE = 0.3    # per class, on the fold's validation patches
ATTEMPTS = 4
VALIDATION_ITERATIONS = 5
CONFIGURATION = "3d_fullres"
# (scan, x offset, y offset) of each 96 x 96 crop; the last one is held out.
CROPS = [("lung1", -60, -40), ("lung1", 20, -40), ("lung1", -20, 30), ("lung2", -60, -40),
         ("lung2", 20, -30), ("lung2", -20, 30), ("lung1", 40, 40)]
SHRUNK = {"n_stages": 3, "features_per_stage": [8, 16, 32], "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
          "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]], "n_conv_per_stage": [2, 2, 2],
          "n_conv_per_stage_decoder": [2, 2]}
PATCH = [16, 64, 64]


def default_cache() -> Path:
    from dicom_factory import CACHE

    return Path(os.environ.get("NAPARI_MEDSEG_NNUNET_CACHE", CACHE))


def crop(name: str, dx: int, dy: int):
    import SimpleITK as sitk

    from dicom_factory import pyradiomics_scan

    image = sitk.ReadImage(str(pyradiomics_scan(name)))
    size = image.GetSize()
    start = [size[0] // 2 + dx - 48, size[1] // 2 + dy - 48, 0]
    part = sitk.RegionOfInterest(image, [96, 96, min(24, size[2])], start)
    values = sitk.GetArrayFromImage(part)
    labels = sitk.GetImageFromArray(((values > -500).astype(np.uint8) + (values > 300)).astype(np.uint8))
    labels.CopyInformation(part)
    return part, labels


def resampled(image, spacing: tuple, interpolator=None):
    """``image`` on a grid of ``spacing`` mm over the same extent (linear unless told)."""
    import SimpleITK as sitk

    size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    origin = image.TransformContinuousIndexToPhysicalPoint(
        [(t / s - 1) / 2 for s, t in zip(image.GetSpacing(), spacing)])
    return sitk.Resample(image, size, sitk.Transform(), interpolator or sitk.sitkLinear, origin, spacing,
                         image.GetDirection(), -1024.0 if interpolator is None else 0.0, image.GetPixelID())


def environment(root: Path) -> dict:
    return {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
            "nnUNet_results": str(root / "results"), "nnUNet_n_proc_DA": "1", "nnUNet_compile": "false"}


def run(command: list, env: dict, log) -> None:
    tool = Path(sys.executable).parent / command[0]
    began = time.perf_counter()
    done = subprocess.run([str(tool), *command[1:]], env=env, capture_output=True, encoding="utf-8", errors="replace")
    log.write(f"$ {' '.join(command)}  ({time.perf_counter() - began:.0f} s)\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n")
    log.flush()
    if done.returncode:
        raise SystemExit(f"{command[0]} failed; see {log.name}")


def build(cache: Path | None = None) -> dict:
    """The results folder, the held-out scan and its labels (built once)."""
    import fcntl

    root = (cache or default_cache()) / "nnunet-genuine"
    root.mkdir(parents=True, exist_ok=True)
    with open(root.parent / "nnunet-genuine.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; other test workers wait, then reuse it
        return _build(root)


def _build(root: Path) -> dict:
    import SimpleITK as sitk

    folder = root / "results" / DATASET / f"{TRAINER}__nnUNetPlans__{CONFIGURATION}"
    held_out = root / "held_out" / "case_0000.nii.gz"
    out = {"root": root, "folder": folder, "held_out": held_out, "held_out_labels": root / "held_out" / "labels.nii.gz"}
    complete = root / "complete"
    if complete.is_file():
        return out
    import shutil

    for part in ("raw", "pre", "results", "held_out"):
        shutil.rmtree(root / part, ignore_errors=True)
    raw = root / "raw" / DATASET
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(exist_ok=True)
    held_out.parent.mkdir(parents=True, exist_ok=True)
    for index, (name, dx, dy) in enumerate(CROPS):
        image, labels = crop(name, dx, dy)
        if index == len(CROPS) - 1:
            # From another scanner, in effect: 0.8 mm in-plane and 4 mm slices (the model works
            # at about 0.6 x 0.6 x 5 mm), so that both of nnU-Net's resamplings run.
            image = resampled(image, (0.8, 0.8, 4.0))
            labels = sitk.Cast(resampled(labels, (0.8, 0.8, 4.0), sitk.sitkNearestNeighbor), sitk.sitkUInt8)
            sitk.WriteImage(image, str(held_out))
            sitk.WriteImage(labels, str(out["held_out_labels"]))
        else:
            sitk.WriteImage(image, str(raw / "imagesTr" / f"case{index}_0000.nii.gz"))
            sitk.WriteImage(labels, str(raw / "labelsTr" / f"case{index}.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"},
                                                  "labels": {"background": 0, "body": 1, "bone": 2},
                                                  "numTraining": len(CROPS) - 1, "file_ending": ".nii.gz"}))
    env = environment(root)
    with open(root / "build.log", "w", encoding="utf-8") as log:
        run(["nnUNetv2_plan_and_preprocess", "-d", "1", "-c", CONFIGURATION, "-np", "1"], env, log)
        plans_path = root / "pre" / DATASET / "nnUNetPlans.json"
        plans = json.loads(plans_path.read_text())
        configuration = plans["configurations"][CONFIGURATION]
        configuration["patch_size"] = PATCH
        configuration["batch_size"] = 2
        configuration["architecture"]["arch_kwargs"].update(SHRUNK)
        plans_path.write_text(json.dumps(plans, indent=2))
        # Augmentation in the trainer's own process (nnUNet_n_proc_DA=0): its worker
        # processes draw unseeded random numbers, so the epoch would differ from run to run.
        training_env = {**env, "nnUNet_n_proc_DA": "0"}
        for fold in ("0", "1"):
            began = time.perf_counter()
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--train-fold", fold],
                                  env=training_env, capture_output=True, encoding="utf-8", errors="replace")
            log.write(f"fold {fold} ({time.perf_counter() - began:.0f} s)\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n")
            if done.returncode:
                raise SystemExit(f"training fold {fold} failed; see {log.name}")
    complete.write_text("built\n")
    return out


def train_fold(fold: int) -> None:
    """nnU-Net's own trainer for one fold, with one short epoch (run in its own process).

    The epoch is seeded. Where its validation finds a class missed (pseudo Dice below
    MIN_PSEUDO_DICE), the fold is trained again from the next seed, so that every test
    can rely on a model that finds body and bone.
    """
    import random

    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    pre = Path(os.environ["nnUNet_preprocessed"]) / DATASET
    for attempt in range(ATTEMPTS):
        plans = load_json(str(pre / "nnUNetPlans.json"))
        plans["continue_training"] = False  # as nnU-Net's run_training sets it
        trainer = nnUNetTrainer(plans, CONFIGURATION, fold,
                                load_json(str(pre / "dataset.json")), device=torch.device("cpu"))
        trainer.num_epochs = 1
        trainer.num_iterations_per_epoch = ITERATIONS
        trainer.num_val_iterations_per_epoch = VALIDATION_ITERATIONS
        seed = FIRST_SEEDS[fold] + 100 * attempt
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        trainer.run_training()
        dice = [float(d) for d in trainer.logger.get_value("dice_per_class_or_region", step=-1)]
        print(f"fold {fold}, seed {seed}: pseudo Dice {dice}", flush=True)
        if min(dice) >= MIN_PSEUDO_DICE:
            return
    raise SystemExit(f"fold {fold} missed a class after {ATTEMPTS} seeds: pseudo Dice {dice}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--train-fold"]:
        train_fold(int(sys.argv[2]))
        raise SystemExit(0)
    began = time.perf_counter()
    paths = build(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(f"{paths['folder']} ({time.perf_counter() - began:.0f} s)")
