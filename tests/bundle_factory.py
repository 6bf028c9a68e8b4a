"""A MONAI bundle to import: the model zoo's real ``spleen_ct_segmentation`` configs with a
``models/model.pt`` initialised here (the zoo's weights cannot be reached from these machines).

The network is MONAI's UNet from the config, seeded, with the output bias calibrated on the
scan so that about half of it falls in each class: argmax ties and near-ties then occur all
over the volume, which is what an equivalence check needs to see. A scan folder in the
layout the config's ``datalist`` globs (``imagesTs/*.nii.gz``) goes beside it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SPLEEN = Path(__file__).parent / "data" / "bundles" / "spleen_ct_segmentation"


def ct_scan(target: Path, name: str = "lung1", crop: bool = True) -> Path:
    """A real lung CT from pyradiomics (BSD-3), whole or a 160 x 160 x 24 crop, as NIfTI."""
    import SimpleITK as sitk
    from dicom_factory import pyradiomics_scan

    image = sitk.ReadImage(str(pyradiomics_scan(name)))
    if crop:
        image = sitk.RegionOfInterest(image, [160, 160, min(24, image.GetSize()[2])], [180, 180, 0])
    target.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(target))
    return target


def build(root: Path, scan: Path, seed: int = 0) -> Path:
    """``root/spleen_ct_segmentation`` with ``models/model.pt`` (a plain state dict)."""
    import torch

    from napari_medseg.core.bundle import build_sections, read_config

    bundle = root / SPLEEN.name
    shutil.copytree(SPLEEN, bundle)
    torch.manual_seed(seed)
    built = build_sections(read_config(bundle))
    network = built["network_def"].eval()
    data = built["preprocessing"]({"image": str(scan)})
    with torch.no_grad():
        logits = built["inferer"](data["image"][None].float(), network)
    last_bias = [p for name, p in network.named_parameters() if name.endswith("bias") and p.shape == (2,)][-1]
    with torch.no_grad():
        last_bias[1] -= float((logits[0, 1] - logits[0, 0]).median())
    (bundle / "models").mkdir()
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    return bundle


def run_monai_bundle(bundle: Path, scans: Path, output: Path, env=None):
    """MONAI's own bundle runner on every ``scans/imagesTs/*.nii.gz``; the path of each mask."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
               "--bundle_root", str(bundle), "--dataset_dir", str(scans), "--output_dir", str(output)]
    subprocess.run(command, check=True, capture_output=True, encoding="utf-8", errors="replace", env=env)
    return sorted(output.glob("*/*_trans.nii.gz"))


BRATS = Path(__file__).parent / "data" / "bundles" / "brats_mri_segmentation"
SEQUENCES = ("t1c", "t1", "t2", "flair")


def brats_scans(folder: Path, size=(112, 112, 20)) -> list:
    """Four MR sequences on one grid, from pyradiomics' real brain MR (``brain1``, BSD-3): the
    image and three monotone or smoothed transforms of it, zero outside the head, as the
    BraTS data is skull-stripped and zero outside. One NIfTI file per sequence."""
    import numpy as np
    import SimpleITK as sitk
    from dicom_factory import pyradiomics_scan

    image = sitk.ReadImage(str(pyradiomics_scan("brain1")))
    full = image.GetSize()
    image = sitk.Cast(sitk.RegionOfInterest(image, list(size), [(full[i] - size[i]) // 2 for i in range(3)]),
                      sitk.sitkFloat32)
    values = sitk.GetArrayFromImage(image)
    inside = values > np.percentile(values, 30)
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(image, 2.0))
    variants = {"t1c": values, "t1": np.sqrt(np.abs(values)), "t2": values.max() - values, "flair": smooth}
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SEQUENCES:
        out = sitk.GetImageFromArray(np.where(inside, variants[name], 0).astype(np.float32))
        out.CopyInformation(image)
        sitk.WriteImage(out, str(folder / f"{name}.nii.gz"))
        paths.append(folder / f"{name}.nii.gz")
    return paths


def build_brats(root: Path, scans: list, roi=(96, 96, 64), seed: int = 0) -> Path:
    """``root/brats_mri_segmentation``: the zoo's configs (the inferer's window made smaller, so
    that a CPU runs it in seconds; both runners read the same file), a seeded SegResNet whose
    output biases give each region part of the scan, and the datalist its runner reads."""
    import json

    import numpy as np
    import torch

    from napari_medseg.core.bundle import build_sections, read_config

    bundle = root / BRATS.name
    shutil.copytree(BRATS, bundle)
    config = read_config(bundle)
    config["inferer"]["roi_size"] = list(roi)
    (bundle / "configs" / "inference.json").write_text(json.dumps(config, indent=4), encoding="utf-8")
    (bundle / "configs" / "datalist.json").write_text(json.dumps(
        {"testing": [{"image": [Path(p).name for p in scans]}]}), encoding="utf-8")
    torch.manual_seed(seed)
    built = build_sections(read_config(bundle))
    network = built["network_def"].eval()
    data = built["preprocessing"]({"image": [str(p) for p in scans]})
    with torch.no_grad():
        logits = built["inferer"](data["image"][None].float(), network)[0]
    final = [p for name, p in network.named_parameters() if name.endswith("bias") and p.shape == (3,)][-1]
    with torch.no_grad():
        # Tumour core in 30 % of the volume, whole tumour in 50 %, enhancing tumour in 15 %.
        for channel, share in ((0, 0.30), (1, 0.50), (2, 0.15)):
            final[channel] -= float(np.quantile(logits[channel].numpy(), 1 - share))
    (bundle / "models").mkdir()
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    return bundle
