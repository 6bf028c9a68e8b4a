"""nnU-Net v2 results folders: checkpoints read without running code, networks built from plans."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_medseg.core.errors import MedsegError
from napari_medseg.core.nnunet import build_network, channel_normalisations, find_results_folder, read_checkpoint

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


@pytest.fixture(scope="module")
def planned_by_nnunet(tmp_path_factory):
    """plans.json as nnU-Net 2.8's own fingerprint extractor and planner write it, for two
    crops of pyradiomics' lung CTs with thresholded body and bone labels."""
    import SimpleITK as sitk

    from dicom_factory import pyradiomics_scan

    root = tmp_path_factory.mktemp("nnunet")
    raw = root / "raw" / "Dataset001_Tiny"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for index, name in enumerate(("lung1", "lung2")):
        image = sitk.ReadImage(str(pyradiomics_scan(name)))
        size = image.GetSize()
        crop = sitk.RegionOfInterest(image, [96, 96, min(24, size[2])], [size[0] // 2 - 48, size[1] // 2 - 48, 0])
        values = sitk.GetArrayFromImage(crop)
        labels = sitk.GetImageFromArray(((values > -500).astype(np.uint8) + (values > 300)).astype(np.uint8))
        labels.CopyInformation(crop)
        sitk.WriteImage(crop, str(raw / "imagesTr" / f"case{index}_0000.nii.gz"))
        sitk.WriteImage(labels, str(raw / "labelsTr" / f"case{index}.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"},
                                                  "labels": {"background": 0, "body": 1, "bone": 2},
                                                  "numTraining": 2, "file_ending": ".nii.gz"}))
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "results")}
    bin_dir = Path(sys.executable).parent
    for command in (["nnUNetv2_extract_fingerprint", "-d", "1", "-np", "1"], ["nnUNetv2_plan_experiment", "-d", "1"]):
        subprocess.run([str(bin_dir / command[0]), *command[1:]], env=env, check=True, capture_output=True)
    return json.loads((root / "pre" / "Dataset001_Tiny" / "nnUNetPlans.json").read_text())


def test_the_network_is_the_one_nnunets_own_code_builds_from_its_planners_plans(planned_by_nnunet):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    architecture = planned_by_nnunet["configurations"]["3d_fullres"]["architecture"]
    theirs = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                    architecture["_kw_requires_import"], 1, 3, deep_supervision=False)
    ours = build_network(planned_by_nnunet, "3d_fullres", 1, 3)
    assert type(ours) is type(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    patch = planned_by_nnunet["configurations"]["3d_fullres"]["patch_size"]
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


def test_ct_normalisation_is_nnunets_ctnormalization_on_a_real_ct(planned_by_nnunet):
    import SimpleITK as sitk
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

    from dicom_factory import pyradiomics_scan
    from napari_medseg.core.pipeline import intensity_statistics, normalise

    [card_normalisation] = channel_normalisations(planned_by_nnunet, "3d_fullres")
    assert card_normalisation.kind == "ct_zscore"
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(pyradiomics_scan("lung2")))).astype(np.float32)
    properties = planned_by_nnunet["foreground_intensity_properties_per_channel"]["0"]
    theirs = CTNormalization(use_mask_for_norm=False, intensityproperties=properties).run(image.copy())
    stats = intensity_statistics(image, card_normalisation)
    ours = normalise(torch.from_numpy(image), card_normalisation, stats).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    assert float(np.std(ours)) > 0.1  # the real CT spans the window


def test_a_plans_normalisation_not_reproduced_yet_is_refused_in_one_line(planned_by_nnunet):
    plans = json.loads(json.dumps(planned_by_nnunet))
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["RescaleTo01Normalization"]
    with pytest.raises(MedsegError, match="RescaleTo01Normalization, which the import does not reproduce yet"):
        channel_normalisations(plans, "3d_fullres")


@pytest.mark.parametrize("use_mask", [True, False])
def test_zscore_is_nnunets_zscorenormalization_with_and_without_its_mask_rule(use_mask):
    """On a real brain MR with its background set to zero (as BraTS ships them)."""
    import SimpleITK as sitk
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization

    from dicom_factory import pyradiomics_scan
    from napari_medseg.core.card import Normalisation
    from napari_medseg.core.pipeline import _normalised, intensity_statistics, nonzero_box

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(pyradiomics_scan("brain1")))).astype(np.float32)
    image[image < np.percentile(image, 40)] = 0
    data, seg, _box = crop_to_nonzero(image[None].copy())
    theirs = ZScoreNormalization(use_mask_for_norm=use_mask, intensityproperties={}).run(data[0].copy(), seg[0])
    from scipy import ndimage

    region = image[nonzero_box(image)]
    mask = ndimage.binary_fill_holes(region != 0) if use_mask else None
    normalisation = Normalisation(kind="zscore", use_mask=use_mask)
    stats = intensity_statistics(region[mask] if use_mask else region, normalisation)
    ours = _normalised(torch.from_numpy(region), normalisation, stats, mask).numpy()
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


# -- a genuine results folder: nnU-Net's own planner and trainer on real CT ---------------------

@pytest.fixture(scope="module")
def genuine():
    """Folds 0 and 1 trained by nnU-Net's own trainer (see ``nnunet_factory``), with a held-out scan
    at another voxel size (0.8 x 0.8 x 4 mm against the model's 0.6 x 0.6 x 5 mm)."""
    from nnunet_factory import build

    return build()


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "napari_medseg.cli", *map(str, args)], capture_output=True,
                          encoding="utf-8", errors="replace", **kwargs)


def _nnunet_predict(genuine, folds, tta, out):
    from nnunet_factory import CONFIGURATION, TRAINER, environment

    source = out / "input"
    source.mkdir(parents=True)
    (source / "case_0000.nii.gz").write_bytes(genuine["held_out"].read_bytes())
    command = [str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(source), "-o", str(out / "theirs"),
               "-d", "1", "-c", CONFIGURATION, "-tr", TRAINER, "-f", *folds, "-device", "cpu", "--save_probabilities"]
    done = subprocess.run(command + ([] if tta else ["--disable_tta"]), env=environment(genuine["root"]),
                          capture_output=True, encoding="utf-8", errors="replace")
    assert done.returncode == 0, done.stderr[-2000:]
    labels = np.asarray(nib.load(out / "theirs" / "case.nii.gz").dataobj)
    return labels, np.load(out / "theirs" / "case.npz")["probabilities"]     # (C, z, y, x)


def dice(a, b) -> float:
    return 1.0 if not a.any() and not b.any() else 2 * float((a & b).sum()) / float(a.sum() + b.sum())



def test_preparation_is_nnunets_preprocessing_on_a_scan_at_another_voxel_size(genuine):
    """Transpose, crop to non-zero, CTNormalization and the spline resampling with the separate
    z axis: our network input equals nnU-Net's DefaultPreprocessor's, voxel for voxel."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from napari_medseg.core.io import read_volume
    from napari_medseg.core.nnunet import model_from_results_folder
    from napari_medseg.core.pipeline import prepare

    _network, card = model_from_results_folder(genuine["folder"], folds=["0"])
    volume = read_volume(genuine["held_out"])
    ours = prepare(volume.layer_data(), volume.geometry.layer_affine_ras, card)
    plans = PlansManager(load_json(str(genuine["folder"] / "plans.json")))
    theirs, _seg, _properties = DefaultPreprocessor(verbose=False).run_case(
        [str(genuine["held_out"])], None, plans, plans.get_configuration("3d_fullres"),
        load_json(str(genuine["folder"] / "dataset.json")))
    assert ours.resampled and ours.model_shape == theirs.shape[1:] == (24, 91, 91)
    np.testing.assert_allclose(ours.tensor.numpy(), theirs[0], atol=1e-5)


@pytest.mark.parametrize("folds, tta", [(["0"], True), (["0"], False), (["0", "1"], True), (["0", "1"], False)],
                         ids=["1 fold", "1 fold, --disable_tta", "2 folds", "2 folds, --disable_tta"])
def test_our_prediction_is_nnunetv2_predicts_on_a_genuine_results_folder(genuine, tmp_path, folds, tta):
    imported = cli("models", "import-nnunet", genuine["folder"], "--folds", *folds, "--name", "lung-ct")
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith(f"imported lung-ct v1.0.0: {len(folds)} fold(s), 2 classes (body, bone), CT")
    theirs, their_probabilities = _nnunet_predict(genuine, folds, tta, tmp_path)
    done = cli("predict", genuine["held_out"], "-o", tmp_path / "ours.nii.gz", "--probabilities",
               tmp_path / "ours_p.nii.gz", "--model", "lung-ct", "--tta" if tta else "--no-tta")
    assert done.returncode == 0, done.stderr
    ours = np.asarray(nib.load(tmp_path / "ours.nii.gz").dataobj)
    probabilities = np.asarray(nib.load(tmp_path / "ours_p.nii.gz").dataobj)      # (x, y, z, C)
    probabilities = np.moveaxis(probabilities, -1, 0).transpose(0, 3, 2, 1)
    assert ours.shape == theirs.shape
    scores = {c: dice(ours == c, theirs == c) for c in (1, 2)}
    assert (theirs == 2).sum() > 100, "the trained model finds bone"
    assert min(scores.values()) >= 0.99, scores
    assert np.abs(probabilities - their_probabilities).max() < 1e-3


def test_a_genuine_folder_imports_once_and_refuses_folds_it_does_not_have(genuine):
    first = cli("models", "import-nnunet", genuine["folder"].parent)
    assert first.returncode == 0 and "2 fold(s)" in first.stdout, first.stderr
    again = cli("models", "import-nnunet", genuine["folder"].parent)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1] == (
        "napari-medseg: error: Dataset001_LungCT-3d_fullres v1.0.0 is already installed; pass --version "
        "(or --name) to import another copy")
    missing = cli("models", "import-nnunet", genuine["folder"], "--folds", "3", "--version", "2")
    assert missing.returncode == 2 and "has no fold 3" in missing.stderr.splitlines()[-1]
    shown = cli("models", "show", "Dataset001_LungCT-3d_fullres", "--json")
    card = json.loads(shown.stdout)
    assert card["pipeline"]["windows"]["mirror_axes"] == [0, 1, 2] and card["pipeline"]["grid"]["spacing"][0] == 5.0
    assert card["provenance"]["folds"] == ["0", "1"] and card["licence"].startswith("not stated")


def test_gradcam_runs_on_the_imported_nnunet_model_and_points_at_its_class(genuine, tmp_path):
    assert cli("models", "import-nnunet", genuine["folder"], "--folds", "0", "--name", "lung-ct").returncode == 0
    done = cli("explain", genuine["held_out"], "--method", "gradcam", "--class", "bone", "--model", "lung-ct",
               "-o", tmp_path / "gradcam.nii.gz", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "Grad-CAM bone at folds.0.decoder.stages.1" in done.stdout
    heat = np.asarray(nib.load(tmp_path / "gradcam.nii.gz").dataobj)
    bone = np.asarray(nib.load(genuine["held_out_labels"]).dataobj) == 2
    assert heat.shape == bone.shape and heat[bone].mean() > 20 * heat[~bone].mean()


def test_one_fine_tuning_round_runs_on_the_imported_nnunet_model(genuine, tmp_path):
    """Corrections of real lung CT crops train a new version of the imported network, which the
    held-out gate then judges; the weights stay float32, as nnU-Net runs them."""
    from nnunet_factory import DATASET, PATCH

    from napari_medseg.core.finetune import fine_tune
    from napari_medseg.core.inference import segment
    from napari_medseg.core.io import read_volume
    from napari_medseg.core.models import read_model_file
    from napari_medseg.core.nnunet import import_nnunet
    from napari_medseg.core.workspace import Workspace

    entry = import_nnunet(genuine["folder"], folds=["0"], name="lung-ct-tune")
    workspace = Workspace(tmp_path / "workspace")
    workspace.ensure_model(str(entry.path))
    model = workspace.load_model()
    raw = genuine["root"] / "raw" / DATASET
    for index, split in ((0, "train"), (1, "train"), (2, "validation")):
        scan = read_volume(raw / "imagesTr" / f"case{index}_0000.nii.gz")
        label = read_volume(raw / "labelsTr" / f"case{index}.nii.gz").layer_data().astype(np.uint8)
        image = scan.layer_data()
        prediction = segment(image, scan.geometry.layer_affine_ras, model).labels if split == "train" else None
        workspace.submit(image, scan.geometry, label, prediction, model=model.title, split=split)
    result = fine_tune(workspace, steps=3, device="cpu", patch_size=tuple(PATCH), learning_rate=1e-4)
    assert result.metrics["training"]["steps"] == 3
    assert 0 < result.metrics["validation_dice_before"] <= 1 and 0 < result.metrics["validation_dice_after"] <= 1
    if result.promoted:
        state, card = read_model_file(workspace.registry.resolve(f"{card_name(workspace)}@{result.version}"))
        assert card.network.architecture == "NnUNetEnsemble"
        assert all(t.dtype == torch.float32 for name, t in state.items() if "running_" not in name)
    else:
        assert "not promoted" in result.reason and workspace.current_version() == "v1"
    _state, first = read_model_file(workspace.registry.resolve(f"{card_name(workspace)}@v1"))
    assert first.provenance["weights"] == "float32"
    assert all(t.dtype == torch.float32 for t in _state.values() if t.is_floating_point())


def card_name(workspace) -> str:
    return workspace.model_name


# -- several input channels ------------------------------------------------------------------

def _two_channel_folder(root: Path) -> Path:
    """An nnU-Net folder for CT plus a second image, each channel with its own scheme
    (CTNormalization; ZScoreNormalization with the mask rule), the network nnU-Net's planner
    describes (PLANS), seeded."""
    from totalseg_factory import plans, write_configuration

    two = plans((4.0, 1.2, 1.2), (16, 32, 32), "CT")
    configuration = two["configurations"]["3d_fullres"]
    configuration.update(normalization_schemes=["CTNormalization", "ZScoreNormalization"],
                         use_mask_for_norm=[False, True])
    # The planner records every channel's foreground intensities (ZScore does not use them).
    two["foreground_intensity_properties_per_channel"]["1"] = dict(two["foreground_intensity_properties_per_channel"]["0"])
    two["dataset_name"] = "Dataset002_TwoChannel"
    dataset = {"channel_names": {"0": "CT", "1": "second"}, "labels": {"background": 0, "a": 1, "b": 2},
               "numTraining": 1, "file_ending": ".nii.gz"}
    folder = root / "Dataset002_TwoChannel" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    torch.manual_seed(2)
    network = build_network(two, "3d_fullres", 2, 3)
    with torch.no_grad():
        network.decoder.seg_layers[-1].bias[0] = 0.0
    write_configuration(folder, two, dataset, network)
    return folder


def test_a_two_channel_nnunet_model_is_nnunetv2_predicts_with_each_channels_scheme(tmp_path):
    """CT and a second image that is zero in other voxels than the CT (so the crop is the
    non-zero voxels of any channel, as nnU-Net's): our prediction is nnUNetv2_predict's."""
    import SimpleITK as sitk

    from totalseg_factory import scan

    folder = _two_channel_folder(tmp_path / "results")
    ct = scan(tmp_path / "case_0000.nii.gz", "lung1", size=(64, 64, 12))
    image = sitk.ReadImage(str(ct))
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    second = np.sqrt(np.abs(values + 1024.0))
    second[:, :, :10] = 0.0            # zero where the CT is not
    second[2:4, 20:30, 20:30] = 0.0     # and a hole the crop's mask rule sees
    values[:, :, -6:] = 0.0             # the CT is zero where the second image is not
    values[:, :6], second[:, :6] = 0.0, 0.0   # and both are zero in some rows: the crop drops them
    sitk.WriteImage(_like(values, image), str(ct))
    other = tmp_path / "case_0001.nii.gz"
    sitk.WriteImage(_like(second, image), str(other))
    env = {**os.environ, "NAPARI_MEDSEG_HOME": str(tmp_path / "home")}
    imported = cli("models", "import-nnunet", folder, "--name", "two", env=env)
    assert imported.returncode == 0, imported.stderr
    card = json.loads(cli("models", "show", "two", "--json", env=env).stdout)
    assert card["channels"] == ["CT", "second"]
    assert [n["kind"] for n in card["pipeline"]["channel_normalisations"]] == ["ct_zscore", "zscore"]
    done = cli("predict", ct, other, "-o", tmp_path / "ours.nii.gz", "--probabilities", tmp_path / "ours_p.nii.gz",
               "--model", "two", "--no-tta", env=env)
    assert done.returncode == 0, done.stderr
    from napari_medseg.core.io import read_volume
    from napari_medseg.core.models import ModelRegistry
    from napari_medseg.core.pipeline import prepare

    volumes = [read_volume(path) for path in (ct, other)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
        model = ModelRegistry().load("two")
    prepared = prepare(np.stack([v.layer_data() for v in volumes]), volumes[0].geometry.layer_affine_ras, model.card)
    assert prepared.info["region"] == [[0, 12], [6, 64], [0, 64]]      # the union of the channels' non-zero voxels
    _nnunet_predict_channels(tmp_path, (ct, other), 2, env)
    ours = np.asarray(nib.load(tmp_path / "ours.nii.gz").dataobj)
    theirs = np.asarray(nib.load(tmp_path / "theirs" / "case.nii.gz").dataobj)
    scores = {c: dice(ours == c, theirs == c) for c in (0, 1, 2)}
    print("two channels:", {c: round(float((theirs == c).mean()), 3) for c in (0, 1, 2)}, scores)
    assert min((theirs == c).mean() for c in (0, 1, 2)) > 0.05, "every class covers part of the scan"
    assert min(scores.values()) >= 0.99, scores
    probabilities = np.moveaxis(np.asarray(nib.load(tmp_path / "ours_p.nii.gz").dataobj), -1, 0).transpose(0, 3, 2, 1)
    their_probabilities = np.load(tmp_path / "theirs" / "case.npz")["probabilities"]
    assert np.abs(probabilities - their_probabilities).max() < 1e-3


def _nnunet_predict_channels(tmp_path: Path, channels, dataset_id: int, env: dict) -> None:
    """nnUNetv2_predict on one case given as its channel files, into tmp_path/theirs (no mirroring)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in channels:
        (inputs / path.name).write_bytes(path.read_bytes())
    command = [str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(tmp_path / "theirs"),
               "-d", str(dataset_id), "-c", "3d_fullres", "-tr", "nnUNetTrainer", "-f", "0", "-device", "cpu",
               "--save_probabilities", "--disable_tta"]
    done = subprocess.run(command, env={**env, "nnUNet_results": str(tmp_path / "results"),
                                        "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre")},
                          capture_output=True, encoding="utf-8", errors="replace")
    assert done.returncode == 0, done.stderr[-2000:]


def _like(values, reference):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.CopyInformation(reference)
    return image


def test_a_region_based_nnunet_model_is_nnunetv2_predicts_and_names_each_region(tmp_path):
    """BraTS-style regions (whole tumour, tumour core, enhancing tumour: one sigmoid each,
    regions_class_order 1, 2, 3) on two real MR channels: nnUNetv2_predict's labels and
    probabilities."""
    import SimpleITK as sitk

    from totalseg_factory import plans, scan, write_configuration

    regional = plans((6.0, 1.6, 1.6), (16, 32, 32), "MR")
    regional["configurations"]["3d_fullres"].update(normalization_schemes=["ZScoreNormalization"] * 2,
                                                    use_mask_for_norm=[True, True])
    regional["foreground_intensity_properties_per_channel"]["1"] = dict(
        regional["foreground_intensity_properties_per_channel"]["0"])
    regional["dataset_name"] = "Dataset003_Regions"
    dataset = {"channel_names": {"0": "T1", "1": "FLAIR"},
               "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3},
               "regions_class_order": [1, 2, 3], "numTraining": 1, "file_ending": ".nii.gz"}
    folder = tmp_path / "results" / "Dataset003_Regions" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    torch.manual_seed(3)
    network = build_network(regional, "3d_fullres", 2, 3)
    with torch.no_grad():
        network.decoder.seg_layers[-1].bias[:] = torch.tensor([0.6, -0.5, 0.1])
    write_configuration(folder, regional, dataset, network)
    t1 = scan(tmp_path / "case_0000.nii.gz", "brain1", size=(96, 96, 16))
    image = sitk.ReadImage(str(t1))
    flair = tmp_path / "case_0001.nii.gz"
    sitk.WriteImage(_like(np.sqrt(np.abs(sitk.GetArrayFromImage(image).astype(np.float32))), image), str(flair))
    env = {**os.environ, "NAPARI_MEDSEG_HOME": str(tmp_path / "home")}
    imported = cli("models", "import-nnunet", folder, "--name", "regions", env=env)
    assert imported.returncode == 0, imported.stderr
    assert ("3 classes (whole tumor (not tumor core), tumor core (not enhancing tumor), enhancing tumor), MR"
            in imported.stdout), imported.stdout
    done = cli("predict", t1, flair, "-o", tmp_path / "ours.nii.gz", "--probabilities", tmp_path / "ours_p.nii.gz",
               "--model", "regions", "--no-tta", env=env)
    assert done.returncode == 0, done.stderr
    _nnunet_predict_channels(tmp_path, (t1, flair), 3, env)
    ours = np.asarray(nib.load(tmp_path / "ours.nii.gz").dataobj)
    theirs = np.asarray(nib.load(tmp_path / "theirs" / "case.nii.gz").dataobj)
    scores = {c: dice(ours == c, theirs == c) for c in (0, 1, 2, 3)}
    print("regions:", {c: round(float((theirs == c).mean()), 3) for c in (0, 1, 2, 3)}, scores)
    assert min((theirs == c).mean() for c in (1, 2, 3)) > 0.02, "every region is written somewhere"
    assert min(scores.values()) >= 0.99, scores
    probabilities = np.moveaxis(np.asarray(nib.load(tmp_path / "ours_p.nii.gz").dataobj), -1, 0).transpose(0, 3, 2, 1)
    their_probabilities = np.load(tmp_path / "theirs" / "case.npz")["probabilities"]
    assert probabilities.shape == their_probabilities.shape == (3, *theirs.shape[::-1])
    assert np.abs(probabilities - their_probabilities).max() < 1e-3
    card = json.loads(cli("models", "show", "regions", "--json", env=env).stdout)
    assert card["pipeline"]["regions"] == [1, 2, 3] and card["explain"] == []
