"""End to end: the bundled brain model and the predict / train / models CLI."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import AFFINES, head_copy, write_nifti
from napari_medseg.viewer._sample import sample_path
from napari_medseg.cli import main
from napari_medseg.core.inference import InferenceSettings, segment
from napari_medseg.core.io import read_volume
from napari_medseg.core.models import ModelRegistry
from napari_medseg.core.metrics import dice


@pytest.fixture(scope="module")
def brain_model():
    return ModelRegistry(home="/nonexistent-medseg-home").load("brain-t1")


@pytest.mark.parametrize("kind", ["permuted", "oblique", "thick"])
def test_brain_model_finds_the_brain_in_any_orientation_and_grid(tmp_path, brain_model, kind):
    image, reference = head_copy(kind)
    nib.save(image, tmp_path / "head.nii.gz")
    volume = read_volume(tmp_path / "head.nii.gz")
    result = segment(volume.layer_data(), volume.geometry.layer_affine_ras, brain_model, InferenceSettings("cpu"))
    predicted = volume.geometry.to_file(result.labels)
    score = dice(predicted, np.asarray(reference.dataobj))
    print(f"Dice on the {kind} copy: {score:.4f}")
    assert score >= 0.9
    volume_ml = result.volumes()[0]["ml"]
    assert 1500 < volume_ml < 2300  # the MNI152 brain mask holds 1912 mL


def test_predict_cli_writes_the_mask_in_the_input_geometry(tmp_path, capsys):
    image, _ = head_copy("permuted")
    source = tmp_path / "oblique_head.nii.gz"
    # a genuinely oblique header on real head voxels
    affine = AFFINES["oblique_permuted"] @ np.diag([1.3, 1.3, 1.3, 1])
    write_nifti(source, np.asarray(image.dataobj), affine)
    out, probs = tmp_path / "mask.nii.gz", tmp_path / "probs.nii.gz"
    code = main(["predict", str(source), "-o", str(out), "--device", "cpu", "--probabilities", str(probs), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    written, original = nib.load(out), nib.load(source)
    np.testing.assert_array_equal(written.affine, original.affine)
    assert written.shape == original.shape and written.get_data_dtype() == np.uint8
    assert int(written.header["qform_code"]) == int(original.header["qform_code"])
    maps = nib.load(probs)
    assert maps.shape == original.shape + (2,)
    np.testing.assert_allclose(maps.affine, original.affine, atol=1e-5)
    mask = np.asarray(written.dataobj)
    assert ((np.asarray(maps.dataobj)[..., 1] > 0.5) == (mask == 1)).mean() > 0.99
    assert summary["volumes"][0]["name"] == "brain" and summary["volumes"][0]["voxels"] == int((mask == 1).sum())


def test_predict_on_the_sample_keeps_its_affine(tmp_path):
    out = tmp_path / "sample_mask.nii.gz"
    assert main(["predict", str(sample_path()), "-o", str(out), "--quiet"]) == 0
    np.testing.assert_array_equal(nib.load(out).affine, nib.load(sample_path()).affine)


@pytest.mark.parametrize("args, message", [
    (["predict", "{missing}", "-o", "{out}"], "does not exist"),
    (["predict", "{scan}", "-o", "{out}", "--model", "no-such-model"], "no model named 'no-such-model'"),
    (["predict", "{scan}", "-o", "{out}", "--model", "{missing_model}"], "does not exist"),
    (["predict", "{scan}", "-o", "{tmp}/mask.txt"], "use .nii.gz"),
    (["predict", "{scan}", "-o", "{out}", "--probabilities", "{tmp}/p.nrrd"], "use .nii.gz or .nii"),
    (["predict", "{flat}", "-o", "{out}"], "3D"),
    (["predict", "{scan}", "-o", "{out}", "--overlap", "1.2"], "overlap"),
])
def test_predict_errors_are_one_line_and_exit_nonzero(tmp_path, capsys, args, message):
    flat = write_nifti(tmp_path / "flat.nii.gz", np.ones((30, 40, 1), np.int16) * 100, np.eye(4))
    values = {"missing": str(tmp_path / "none.nii.gz"), "out": str(tmp_path / "out.nii.gz"),
              "scan": str(sample_path()), "tmp": str(tmp_path), "flat": str(flat),
              "missing_model": str(tmp_path / "absent.safetensors")}
    code = main([a.format(**values) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("napari-medseg: error:") and message in err[-1]
    assert not (tmp_path / "out.nii.gz").exists()


def test_models_list_shows_the_bundled_model(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path))
    assert main(["models", "list"]) == 0
    assert "brain-t1" in capsys.readouterr().out
    assert main(["models", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert any(m["name"] == "brain-t1" and m["labels"] == ["background", "brain"] for m in listed)
