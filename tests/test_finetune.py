"""Fine-tuning from the queue: promotion through the regression gate, rejection of a harmful
update, versions with lineage, rollback, and DDP with two processes on the CPU (gloo)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import sphere_case
from napari_medseg.core.finetune import fine_tune
from napari_medseg.core.geometry import ScanGeometry
from napari_medseg.core.models import load_model
from napari_medseg.core.workspace import Workspace


def workspace_with(folder: Path, base: Path, train_seeds=(20, 21, 22), validation_seeds=(30, 31),
                   harmful: bool = False) -> Workspace:
    """A workspace whose queue holds corrected spheres (or, if ``harmful``, labels of other cases)."""
    from napari_medseg.core.inference import segment

    workspace = Workspace(folder)
    workspace.ensure_model(str(base))
    model = workspace.load_model()
    for seed in train_seeds:
        image, label, affine = sphere_case(seed)
        prediction = segment(image, affine, model).labels
        if harmful:  # a wrong "correction": another case's label, in another place
            label = np.roll(sphere_case(seed + 100)[1], 9, axis=0)
        workspace.submit(image, ScanGeometry(affine, image.shape), label, prediction, model=model.title,
                         split="train")
    for seed in validation_seeds:
        image, label, affine = sphere_case(seed)
        workspace.submit(image, ScanGeometry(affine, image.shape), label, split="validation")
    return workspace


def test_a_good_fine_tune_is_promoted_and_a_harmful_one_is_not(tmp_path, sphere_model):
    workspace = workspace_with(tmp_path / "good", sphere_model)
    result = fine_tune(workspace, steps=40, device="cpu", learning_rate=3e-3, batch_size=2, patch_size=(16, 16, 16))
    assert result.promoted and result.version == "v2", result.reason
    assert result.metrics["validation_dice_after"] >= result.metrics["validation_dice_before"] - 0.01
    assert result.metrics["validation_device"] == "cpu"  # validated where it trained, not on "auto"
    versions = {v["version"]: v for v in workspace.versions()}
    assert versions["v2"]["current"] and versions["v2"]["lineage"] == result.items and len(result.items) == 3
    assert all(item.status == "used" and item.used_by == "v2" for item in workspace.items(split="train"))
    assert workspace.load_model().version == "v2"

    bad = workspace_with(tmp_path / "bad", sphere_model, harmful=True)
    result = fine_tune(bad, steps=40, device="cpu", learning_rate=3e-2, batch_size=2, patch_size=(16, 16, 16))
    assert not result.promoted and "not promoted" in result.reason and "v1 stays in use" in result.reason
    assert bad.current_version() == "v1"
    versions = {v["version"]: v for v in bad.versions()}
    assert versions["v2"]["status"] == "rejected" and versions["v2"]["reason"] == result.reason
    assert not (tmp_path / "bad" / "models" / "spheres" / "v2.safetensors").exists()
    assert all(item.status == "queued" for item in bad.items(split="train"))  # nothing was learned from them


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "napari_medseg.cli", *map(str, args)], capture_output=True,
                          text=True, **kwargs)


def test_rollback_and_predict_with_the_workspace_model(tmp_path, sphere_model):
    folder = tmp_path / "ws"
    workspace = workspace_with(folder, sphere_model)
    fine_tune(workspace, steps=10, device="cpu", learning_rate=3e-3, tolerance=1.0, patch_size=(16, 16, 16))
    image, _label, affine = sphere_case(40)
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), scan)
    out = tmp_path / "mask.nii.gz"
    result = cli("predict", scan, "-o", out, "--workspace", folder, "--json", "--quiet", "--force")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"] == "spheres vv2"
    result = cli("models", "rollback", "--workspace", folder, "--to", "v1")
    assert result.returncode == 0 and "now uses spheres v1" in result.stdout
    result = cli("predict", scan, "-o", out, "--workspace", folder, "--json", "--quiet", "--force")
    assert json.loads(result.stdout)["model"] == "spheres vv1"
    listing = cli("models", "list", "--workspace", folder)
    assert "v1   *" in listing.stdout and "v2" in listing.stdout and (folder / "models" / "spheres" /
                                                                      "v2.safetensors").exists()
    result = cli("models", "rollback", "--workspace", folder, "--to", "v9")
    assert result.returncode == 2 and "has no version 'v9'" in result.stderr


def test_cli_refuses_to_fine_tune_without_corrections_or_validation(tmp_path, sphere_model):
    folder = tmp_path / "ws"
    workspace = Workspace(folder)
    result = cli("finetune", "--workspace", folder, "--base", sphere_model, "--quiet")
    assert result.returncode == 2 and "no queued corrections" in result.stderr
    image, label, affine = sphere_case(1)
    workspace.submit(image, ScanGeometry(affine, image.shape), label, split="train")
    result = cli("finetune", "--workspace", folder, "--base", sphere_model, "--quiet")
    assert result.returncode == 2 and "no validation items" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ddp_processes_give_the_same_model_as_one(tmp_path, sphere_model):
    """torchrun with 2 processes (gloo) and a batch of 2 against one process with the same batch."""
    for name in ("one", "two"):
        workspace_with(tmp_path / name, sphere_model).close()
    common = ["finetune", "--steps", "6", "--device", "cpu", "--lr", "3e-3", "--batch-size", "2",
              "--patch-size", "16", "16", "16", "--tolerance", "1", "--quiet"]
    single = cli("--version")  # a cheap call first: the package imports
    assert single.returncode == 0
    one = cli(*common[:1], "--workspace", tmp_path / "one", *common[1:])
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "-m", "napari_medseg.cli", common[0], "--workspace",
                          str(tmp_path / "two"), *common[1:]], capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    a = load_model(tmp_path / "one" / "models" / "spheres" / "v2.safetensors").network.state_dict()
    b = load_model(tmp_path / "two" / "models" / "spheres" / "v2.safetensors").network.state_dict()
    worst = max(float((a[key] - b[key]).abs().max()) for key in a)
    print(f"largest weight difference between 1 and 2 processes: {worst:.2e}")
    assert worst < 2e-3  # float16 storage rounds weights to about 1e-3 relative
    record = json.loads(json.dumps(Workspace(tmp_path / "two").versions()[-1]))
    assert record["metrics"]["training"]["processes"] == 2
