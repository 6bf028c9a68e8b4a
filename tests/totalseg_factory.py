"""TotalSegmentator's results folder for one task, in nnU-Net v2's format, on a real scan.

TotalSegmentator's weights cannot be downloaded here. Each part of a task becomes a
dataset folder named as TotalSegmentator names it, holding a trained configuration
(``plans.json``, ``dataset.json``, ``fold_0/checkpoint_final.pth``) whose network is the
one nnU-Net's planner describes (``test_nnunet.PLANS``'s architecture), initialised here
with a fixed seed per part. The class names come from the installed ``totalsegmentator``
package, imported (its tables, not its code paths), so the import under test, which reads
the same files as data, is checked against the package itself.

The checkpoints name ``nnUNetTrainer`` as their trainer: ``nnUNetv2_predict`` looks the
trainer class up by that name, and the search for ``nnUNetTrainerNoMirroring`` imports
trainer variants whose torchvision does not load beside a CPU-only torch. The folders keep
TotalSegmentator's trainer names, and the checkpoints its no-mirroring setting.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent

# Part dataset folders as TotalSegmentator 2.x names them.
FOLDER_NAMES = {
    291: "Dataset291_TotalSegmentator_part1_organs_1559subj",
    292: "Dataset292_TotalSegmentator_part2_vertebrae_1532subj",
    293: "Dataset293_TotalSegmentator_part3_cardiac_1559subj",
    294: "Dataset294_TotalSegmentator_part4_muscles_1559subj",
    295: "Dataset295_TotalSegmentator_part5_ribs_1559subj",
    850: "Dataset850_TotalSegMRI_part1_organs_1088subj",
    851: "Dataset851_TotalSegMRI_part2_muscles_1088subj",
}


def tables(task: str):
    """(dataset ids, trainer, {dataset id: {value: name}}) from TotalSegmentator's own package."""
    from totalsegmentator import map_to_binary
    from totalsegmentator.map_tasks_config import TASK_CONFIGS

    default = TASK_CONFIGS[task]["sub_modes"]["default"]
    ids_to_part = {"total": map_to_binary.map_taskid_to_partname_ct,
                   "total_mr": map_to_binary.map_taskid_to_partname_mr}[task]
    parts = {"total": map_to_binary.class_map_5_parts, "total_mr": map_to_binary.class_map_parts_mr}[task]
    return list(default["task_id"]), default["trainer"], {d: parts[ids_to_part[d]] for d in default["task_id"]}


def plans(spacing, patch, modality: str) -> dict:
    from test_nnunet import PLANS

    out = copy.deepcopy(PLANS)
    configuration = out["configurations"]["3d_fullres"]
    configuration.update(spacing=list(spacing), patch_size=list(patch),
                         normalization_schemes=["CTNormalization" if modality == "CT" else "ZScoreNormalization"],
                         use_mask_for_norm=[False], resampling_fn_data="resample_data_or_seg_to_shape",
                         resampling_fn_data_kwargs={"is_seg": False, "order": 3, "order_z": 0,
                                                    "force_separate_z": None},
                         resampling_fn_seg="resample_data_or_seg_to_shape",
                         resampling_fn_seg_kwargs={"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                         resampling_fn_probabilities="resample_data_or_seg_to_shape",
                         resampling_fn_probabilities_kwargs={"is_seg": False, "order": 1, "order_z": 0,
                                                             "force_separate_z": None},
                         data_identifier="nnUNetPlans_3d_fullres", preprocessor_name="DefaultPreprocessor",
                         batch_size=2, median_image_size_in_voxels=[16, 64, 64], batch_dice=False)
    out.update(original_median_spacing_after_transp=list(spacing), original_median_shape_after_transp=[16, 64, 64],
               image_reader_writer="SimpleITKIO", transpose_forward=[0, 1, 2], transpose_backward=[0, 1, 2],
               experiment_planner_used="ExperimentPlanner", label_manager="LabelManager",
               foreground_intensity_properties_per_channel={"0": {
                   "max": 1500.0, "mean": 80.0, "median": 40.0, "min": -1000.0, "percentile_00_5": -950.0,
                   "percentile_99_5": 1200.0, "std": 350.0}})
    return out


def build_task(root: Path, task: str, spacing=(4.0, 2.0, 2.0), patch=(16, 32, 32), seed: int = 0) -> Path:
    """``root``/… as TotalSegmentator's results folder with every part of ``task``; returns the results folder."""
    from napari_medseg.core.nnunet import build_network

    ids, trainer, part_names = tables(task)
    modality = "MR" if task.endswith("_mr") else "CT"
    results = Path(root)
    for index, dataset_id in enumerate(ids):
        names = part_names[dataset_id]
        folder = results / FOLDER_NAMES[dataset_id] / f"{trainer}__nnUNetPlans__3d_fullres"
        part_plans = plans(spacing, patch, modality)
        part_plans["dataset_name"] = FOLDER_NAMES[dataset_id]
        labels = {"background": 0, **{name: value for value, name in sorted(names.items())}}
        dataset = {"channel_names": {"0": modality}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}
        torch.manual_seed(seed * 100 + dataset_id)
        network = build_network(part_plans, "3d_fullres", 1, len(labels))
        with torch.no_grad():
            # Each part labels a share of the scan and leaves the rest to the parts before it.
            network.decoder.seg_layers[-1].bias[0] = 0.6 + 0.25 * index
        write_configuration(folder, part_plans, dataset, network, mirroring=None)
    return results


def write_configuration(folder: Path, plans: dict, dataset: dict, network, mirroring=(0, 1, 2)) -> Path:
    """A trained configuration in nnU-Net's format: fold 0's checkpoint of ``network`` (as
    nnU-Net's trainer saves it), ``plans.json`` and ``dataset.json``."""
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    torch.save({"network_weights": network.state_dict(), "current_epoch": 1, "trainer_name": "nnUNetTrainer",
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset,
                              "device": torch.device("cpu")},
                "inference_allowed_mirroring_axes": mirroring}, folder / "fold_0" / "checkpoint_final.pth")
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1))
    return folder


def scan(target: Path, name: str = "brain1", size=(80, 80, 16), canonical: bool = False) -> Path:
    """A crop of one of pyradiomics' real scans (BSD-3), as NIfTI; ``canonical``: turned to RAS
    as TotalSegmentator turns every input before nnU-Net sees it."""
    import nibabel as nib
    import SimpleITK as sitk

    from dicom_factory import pyradiomics_scan

    image = sitk.ReadImage(str(pyradiomics_scan(name)))
    full = image.GetSize()
    start = [(full[i] - size[i]) // 2 for i in range(3)]
    sitk.WriteImage(sitk.RegionOfInterest(image, list(size), start), str(target))
    if canonical:
        nib.save(nib.as_closest_canonical(nib.load(target)), target)
    return target


def merge_like_totalsegmentator(part_labels: dict, task: str) -> np.ndarray:
    """TotalSegmentator's merge (nnunet.py): each part's classes onto the task's numbering,
    a later part written over an earlier one; computed from its own tables."""
    from totalsegmentator.map_to_binary import class_map

    ids, _trainer, part_names = tables(task)
    inverse = {name: value for value, name in class_map[task].items()}
    merged = None
    for dataset_id in ids:
        seg = part_labels[dataset_id].astype(np.uint8)
        lut = np.zeros(max(part_names[dataset_id]) + 1, dtype=np.uint8)
        for value, name in part_names[dataset_id].items():
            lut[value] = inverse[name]
        mapped = lut[seg]
        merged = np.zeros_like(mapped) if merged is None else merged
        np.copyto(merged, mapped, where=mapped != 0)
    return merged
