"""nnU-Net v2 results folders: checkpoints read without running code, networks built from plans."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch

from napari_medseg.core.errors import MedsegError
from napari_medseg.core.nnunet import build_network, find_results_folder, read_checkpoint

# The architecture entry as nnU-Net v2's planner writes it (ExperimentPlanner, PlainConvUNet),
# shrunk to two stages.
PLANS = {
    "dataset_name": "Dataset001_Tiny", "plans_name": "nnUNetPlans",
    "configurations": {"3d_fullres": {
        "patch_size": [16, 16, 16], "spacing": [3.0, 1.5, 1.5], "normalization_schemes": ["CTNormalization"],
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
                            "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]],
                            "n_conv_per_stage": [2, 2], "n_conv_per_stage_decoder": [2], "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}},
}
DATASET = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
           "numTraining": 2, "file_ending": ".nii.gz"}
MARKER = "napari-medseg-test-marker"


class _RunsCode:
    """A pickled object whose loading would run code: it writes a marker file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _checkpoint(network, **extra) -> dict:
    return {"network_weights": network.state_dict(), "optimizer_state": {"lr": np.float32(0.01)},
            "logging": {"mean_fg_dice": [np.float32(0.5), np.float32(0.6)]}, "current_epoch": 3,
            "init_args": {"plans": PLANS, "configuration": "3d_fullres", "fold": 0, "dataset_json": DATASET,
                          "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2), **extra}


@pytest.fixture
def results(tmp_path):
    network = build_network(PLANS, "3d_fullres", 1, 3)
    folder = tmp_path / "Dataset001_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    for fold in (0, 1):
        (folder / f"fold_{fold}").mkdir(parents=True)
        torch.save(_checkpoint(network), folder / f"fold_{fold}" / "checkpoint_final.pth")
    (folder / "plans.json").write_text(json.dumps(PLANS))
    (folder / "dataset.json").write_text(json.dumps(DATASET))
    return folder, network


def test_a_results_folder_is_found_from_the_dataset_folder_and_its_checkpoint_read(results):
    folder, network = results
    found = find_results_folder(folder.parent)
    assert found.folder == folder and found.configuration == "3d_fullres" and list(found.folds) == ["0", "1"]
    assert found.channel_names == ["CT"] and found.label_names == {0: "background", 1: "liver", 2: "spleen"}
    checkpoint = read_checkpoint(found.checkpoint("1"))
    assert checkpoint.mirroring_axes == (0, 1, 2) and checkpoint.trainer == "nnUNetTrainer"
    rebuilt = build_network(found.plans, found.configuration, 1, 3)
    rebuilt.load_state_dict(checkpoint.weights)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), network.eval()(x))
    with pytest.raises(MedsegError, match="no fold 4"):
        found.checkpoint("4")


def test_a_numpy_1_checkpoint_is_read_by_the_old_name_of_its_scalars(results, tmp_path):
    folder, _network = results
    path = folder / "fold_0" / "checkpoint_final.pth"
    # Rewrite the pickle as numpy 1.x wrote it: GLOBAL 'numpy.core.multiarray scalar'.
    source = zipfile.ZipFile(path)
    old = tmp_path / "numpy1.pth"
    with zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            target.writestr(info, data)
    assert read_checkpoint(old).trainer == "nnUNetTrainer"


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(results, tmp_path):
    folder, network = results
    marker = tmp_path / MARKER
    bad = tmp_path / "checkpoint_final.pth"
    torch.save(_checkpoint(network, extra_state=_RunsCode(marker)), bad)
    with pytest.raises(MedsegError) as caught:
        read_checkpoint(bad)
    message = str(caught.value)
    assert message.startswith("refusing nnU-Net checkpoint 'checkpoint_final.pth'") and "io.open" in message, message
    assert "\n" not in message and not marker.exists()


def test_a_checkpoint_that_is_not_one_is_a_clear_error(tmp_path):
    buffer = io.BytesIO()
    torch.save({"state_dict": {}}, buffer)
    (tmp_path / "other.pth").write_bytes(buffer.getvalue())
    with pytest.raises(MedsegError, match="no 'network_weights'"):
        read_checkpoint(tmp_path / "other.pth")
    (tmp_path / "broken.pth").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(MedsegError, match="cannot read nnU-Net checkpoint 'broken.pth'"):
        read_checkpoint(tmp_path / "broken.pth")


@pytest.mark.parametrize("key, value, words", [
    ("network_class_name", "os.system", "not one of nnU-Net's networks"),
    ("network_class_name", "dynamic_network_architectures.architectures.unet.NoSuchUNet", "does not exist"),
    ("conv_op", "subprocess.Popen", "not a network operation"),
    ("nonlin", "torch.nn.modules.module.Module", "not a network operation"),
    ("features_per_stage", [4], "cannot be built"),
])
def test_plans_that_name_anything_but_a_known_network_are_refused(key, value, words):
    plans = json.loads(json.dumps(PLANS))
    architecture = plans["configurations"]["3d_fullres"]["architecture"]
    if key == "network_class_name":
        architecture[key] = value
    else:
        architecture["arch_kwargs"][key] = value
    with pytest.raises(MedsegError) as caught:
        build_network(plans, "3d_fullres", 1, 3)
    assert "\n" not in str(caught.value) and (words is None or words in str(caught.value)), str(caught.value)
