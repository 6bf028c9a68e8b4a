"""Training input is checked before training starts; checkpoints resume exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import AFFINES, card_dict, write_nifti
from napari_medseg.cli import main
from napari_medseg.core.card import ModelError, parse_card
from napari_medseg.core.models import ModelRegistry, read_model_file
from napari_medseg.core.network import AttentionUNet3D
from napari_medseg.core.training import (Augmentation, DatasetError, ScanCase, TrainingConfig, grid_case,
                                         read_dataset, train)


def write_sphere_dataset(folder, n_cases=2, nnunet=False):
    """A real MSD-style folder: noisy images with a bright sphere and its label."""
    rng = np.random.default_rng(0)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    entries = []
    for index in range(n_cases):
        grid = np.mgrid[:32, :32, :32]
        centre = rng.uniform(12, 20, 3)
        label = (np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0)) < 7).astype(np.uint8)
        image = (rng.normal(100, 10, label.shape) + 200 * label).astype(np.float32)
        affine = AFFINES["sagittal_permuted"] if index % 2 else np.diag([2.0, 2.0, 2.0, 1.0])
        name = f"case_{index:03d}"
        image_name = f"{name}_0000.nii.gz" if nnunet else f"{name}.nii.gz"
        write_nifti(folder / "imagesTr" / image_name, image, affine)
        write_nifti(folder / "labelsTr" / f"{name}.nii.gz", label, affine)
        entries.append({"image": f"./imagesTr/{image_name}", "label": f"./labelsTr/{name}.nii.gz"})
    if nnunet:
        meta = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "sphere": 1}, "file_ending": ".nii.gz"}
    else:
        meta = {"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "sphere"}, "training": entries}
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


def cli(*args):
    return subprocess.run([sys.executable, "-m", "napari_medseg.cli", *map(str, args)], capture_output=True,
                          text=True)


def train_args(data, out, *extra):
    return ["train", "--data", data, "-o", out, "--steps", "2", "--patch-size", "16", "16", "16",
            "--channels", "4", "8", "--device", "cpu", *extra]


@pytest.mark.parametrize("nnunet", [False, True])
def test_train_cli_makes_a_loadable_model_from_an_msd_folder(tmp_path, capsys, nnunet):
    data = write_sphere_dataset(tmp_path / "data", nnunet=nnunet)
    (tmp_path / "models").mkdir()
    code = main(["train", "--data", str(data), "-o", str(tmp_path / "models"), "--name", "spheres",
                 "--steps", "3", "--patch-size", "16", "16", "16", "--channels", "4", "8",
                 "--val-data", str(data), "--device", "cpu"])
    assert code == 0
    path = tmp_path / "models" / "spheres.safetensors"
    model = ModelRegistry(home=tmp_path).load(str(path))
    assert model.label_names == {0: "background", 1: "sphere"}
    held_out = model.card.metrics["held_out"]
    assert model.card.provenance["training"]["steps"] == 3 and set(held_out["dice"]) == {"case_000", "case_001"}
    assert 0.0 <= held_out["mean_dice"] <= 1.0


def test_train_cli_rejects_a_folder_without_dataset_json(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "-o", str(tmp_path)]) == 2
    assert "dataset.json" in capsys.readouterr().err


BAD_DATASETS = {
    "a list": ([{"image": "x"}], "dataset.json must be an object"),
    "labels as a string": ({"labels": "brain", "training": []}, "'labels' must be an object"),
    "labels as a list": ({"labels": ["background", "brain"], "training": []}, "'labels' must be an object"),
    "an entry without image": ({"labels": {"0": "background", "1": "sphere"},
                                "training": [{"label": "./labelsTr/case_000.nii.gz"}]},
                               "training entry 0 has no 'image' key"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATASETS))
def test_a_malformed_dataset_json_is_one_line_per_fault(tmp_path, case):
    data = write_sphere_dataset(tmp_path / "data")
    meta, words = BAD_DATASETS[case]
    (data / "dataset.json").write_text(json.dumps(meta))
    result = cli(*train_args(data, tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert words in result.stderr and all(line.startswith("napari-medseg: error:")
                                          for line in result.stderr.strip().splitlines())


def test_every_bad_case_is_named_before_training(tmp_path):
    data = write_sphere_dataset(tmp_path / "data", n_cases=3)
    (data / "labelsTr" / "case_001.nii.gz").write_bytes(b"not a label")
    write_nifti(data / "labelsTr" / "case_002.nii.gz", np.full((32, 32, 32), 7, np.uint8), AFFINES["sagittal_permuted"]
                if False else np.diag([2.0, 2.0, 2.0, 1.0]))
    result = cli(*train_args(data, tmp_path))
    lines = [line for line in result.stderr.splitlines() if line.startswith("napari-medseg: error:")]
    assert result.returncode == 2 and len(lines) == 2 and "Traceback" not in result.stderr, result.stderr
    assert "'case_001.nii.gz' is not a valid NIfTI file" in lines[0]
    assert "case_002.nii.gz: holds values outside 0..1" in lines[1]


@pytest.mark.parametrize("args, words", [
    (["--steps", "0"], "--steps must be a positive whole number"),
    (["--steps", "-5"], "--steps must be a positive whole number"),
    (["--patch-size", "0", "0", "0"], "--patch-size must be three positive numbers"),
    (["--patch-size", "15", "16", "16"], "each side must be a multiple of 2"),
    (["--spacing", "0", "2", "2"], "--spacing must be three positive voxel sizes"),
])
def test_bad_training_arguments_are_refused_before_reading_data(tmp_path, args, words):
    data = write_sphere_dataset(tmp_path / "data")
    base = train_args(data, tmp_path)
    for flag in ("--steps", "--patch-size", "--spacing"):
        if flag in args and flag in base:
            at = base.index(flag)
            del base[at:at + (4 if flag != "--steps" else 2)]
    result = cli(*base, *args)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("change, words", [
    (lambda c: c["pipeline"]["grid"].update(spacing=[0, 2, 2]), "positive"),
    (lambda c: c["pipeline"].update(patch_size=[16, -16, 16]), "patch size"),
    (lambda c: c["labels"].pop(), "at least two labels"),
])
def test_a_card_with_an_impossible_value_is_refused_on_load(tmp_path, change, words):
    """A file whose hash is valid for its (impossible) card: the load still refuses it."""
    from safetensors.torch import save_file

    from napari_medseg.core.models import content_hash

    state = {k: v.half() for k, v in AttentionUNet3D(1, 2, (4, 8)).state_dict().items()}
    card = card_dict()
    card["content_sha256"] = None
    change(card)
    card.pop("content_sha256")
    card["content_sha256"] = content_hash(state, card)
    save_file(state, tmp_path / "bad.safetensors", metadata={"napari_medseg": json.dumps(card)})
    with pytest.raises(ModelError, match=words):
        read_model_file(tmp_path / "bad.safetensors")


def _sphere_cases(tmp_path):
    dataset = read_dataset(write_sphere_dataset(tmp_path / "data"))
    card = parse_card(card_dict(spacing=(2.0, 2.0, 2.0)), "tiny")
    return [grid_case(case, card) for case in dataset.cases], card


def test_a_resumed_run_reaches_the_same_weights_as_an_uninterrupted_one(tmp_path):
    cases, card = _sphere_cases(tmp_path)
    checkpoint = tmp_path / "run.checkpoint.pt"

    def run(steps, resume=None, every=0):
        torch.manual_seed(0)
        network = AttentionUNet3D(1, 2, (4, 8))
        config = TrainingConfig(steps=6, patch_size=(16, 16, 16), device="cpu", learning_rate=1e-2,
                                augmentation=Augmentation(synthesis_probability=0.5), checkpoint=str(checkpoint),
                                checkpoint_every=every, resume=resume)
        if steps < 6:  # stop early, as a killed run would, after the checkpoint at step 3
            from napari_medseg.core.errors import Cancelled

            def progress(fraction, message):
                if fraction * 6 >= steps:
                    raise Cancelled("stopped")
            with pytest.raises(Cancelled):
                train(network, card, cases, config, progress=progress)
            return None
        train(network, card, cases, config)
        return network.state_dict()

    uninterrupted = run(6)
    run(4, every=3)
    assert checkpoint.exists()
    resumed = run(6, resume=str(checkpoint))
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_a_training_case_is_prepared_as_at_inference(tmp_path):
    """The case's grid tensor equals the pipeline's input for the same scan."""
    from napari_medseg.core.pipeline import prepare

    cases, card = _sphere_cases(tmp_path)
    dataset = read_dataset(tmp_path / "data")
    raw: ScanCase = dataset.cases[1]
    prepared = prepare(raw.image, raw.layer_affine_ras, card)
    torch.testing.assert_close(cases[1].image, prepared.tensor)
    assert cases[1].label.shape == prepared.tensor.shape and int(cases[1].label.max()) == 1


def test_training_faults_from_a_dataset_error_keep_each_file(tmp_path):
    with pytest.raises(DatasetError) as info:
        read_dataset(write_sphere_dataset(tmp_path / "d", n_cases=1).parent / "d")
        raise DatasetError(["x"])
    assert info.value.faults
