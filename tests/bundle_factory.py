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
