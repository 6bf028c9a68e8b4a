"""The model card's domain is checked before predicting, and implausible results are flagged."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_card, write_nifti
from dicom_factory import pyradiomics_scan
from napari_medseg.core.domain import result_warnings, scan_problems
from napari_medseg.core.inference import Segmentation
from napari_medseg.core.models import ModelRegistry


@pytest.fixture(scope="module")
def brain_card():
    return ModelRegistry(home="/nonexistent-medseg-home").load("brain-t1").card


def test_the_bundled_models_declare_their_domain(brain_card):
    registry = ModelRegistry(home="/nonexistent-medseg-home")
    for entry in registry.entries():
        domain = entry.card.domain
        assert (domain.modality, domain.contrast, domain.body_part) == ("MR", "T1", "head"), entry.name
        assert entry.card.labels[1].expected_ml == (800.0, 2300.0)
        assert entry.card.checks.max_foreground_ml == 2500


def test_a_chest_ct_is_refused_by_the_brain_model_unless_forced(tmp_path):
    ct = pyradiomics_scan("lung1")
    out = tmp_path / "mask.nii.gz"
    refused = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "predict", str(ct), "-o", str(out)],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and not out.exists()
    assert refused.stderr.startswith("napari-medseg: error: this scan is CT (air at about -1000 HU)")
    assert "--force" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    forced = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "predict", str(ct), "-o", str(out),
                             "--force", "--json", "--quiet"], capture_output=True, text=True)
    assert forced.returncode == 0 and out.exists(), forced.stderr
    summary = json.loads(forced.stdout)
    assert any("this scan is CT" in w for w in summary["warnings"])


def test_a_wide_body_is_not_a_head(brain_card):
    grid = np.mgrid[:40, :60, :120].astype(np.float32)
    body = ((grid[1] - 30) / 25) ** 2 + ((grid[2] - 60) / 55) ** 2 < 1  # 330 mm wide at 3 mm voxels
    image = np.where(body, 400.0, 5.0).astype(np.float32)
    problems = scan_problems(image, (3.0, 3.0, 3.0), brain_card, "MR", False)
    assert len(problems) == 1 and "not a head" in problems[0]
    head = ((grid[1] - 30) / 25) ** 2 + ((grid[2] - 60) / 26) ** 2 < 1  # 156 mm wide
    assert scan_problems(np.where(head, 400.0, 5.0).astype(np.float32), (3.0, 3.0, 3.0), brain_card, "MR",
                         False) == []


def test_a_dicom_body_part_outside_the_domain_is_named(brain_card):
    image = np.full((20, 20, 20), 100.0, np.float32)
    problems = scan_problems(image, (1.0, 1.0, 1.0), brain_card, "MR", False, body_part="CHEST")
    assert problems == [f"the DICOM header says the body part is CHEST, but {brain_card.title} is made for the head"]
    assert scan_problems(image, (1.0, 1.0, 1.0), brain_card, "MR", False, body_part="BRAIN") == []


def test_implausible_volumes_and_the_all_head_failure_are_flagged(brain_card):
    grid = np.mgrid[:60, :60, :60]
    head = np.sqrt(((grid - 30) ** 2).sum(0)) < 28
    image = np.where(head, 300.0, 2.0).astype(np.float32)
    labels = head.astype(np.uint8)  # everything labelled: 4 mm voxels make this 5.9 L
    result = Segmentation(labels, None, brain_card.label_names, brain_card.label_colors, (4.0, 4.0, 4.0),
                          expected_ml={1: (800.0, 2300.0)})
    warnings = result_warnings(result, labels, image, brain_card)
    assert any("outside the 800-2300 mL expected for brain" in w for w in warnings)
    assert any("more than the 2500 mL" in w for w in warnings)
    assert any("of the imaged body was labelled brain" in w for w in warnings)
    expected_ml = int(labels.sum()) * 64 / 1000
    assert result.volumes()[0]["warning"].startswith(f"{expected_ml:.0f} mL is outside")


def test_the_share_of_the_body_counts_only_labels_inside_it(brain_card):
    """A small body with labels all around it is at most 100% labelled (it had read 1513% on a real breast MR)."""
    grid = np.mgrid[:40, :40, :40]
    body = np.sqrt(((grid - 20) ** 2).sum(0)) < 8
    image = np.where(body, 300.0, 2.0).astype(np.float32)
    labels = np.ones(image.shape, np.uint8)  # the body and all the air around it
    result = Segmentation(labels, None, brain_card.label_names, brain_card.label_colors, (1.0, 1.0, 1.0))
    [share] = [w for w in result_warnings(result, labels, image, brain_card) if "of the imaged body" in w]
    assert "100% of the imaged body was labelled brain" in share
    half = labels * (grid[0] < 20)  # half of the body, and air
    assert not any("of the imaged body" in w for w in result_warnings(result, half, image, brain_card))


def test_post_processing_does_not_hide_a_failure(brain_card):
    """The checks judge the raw network output: a clean final mask still carries the raw failure."""
    image = np.full((30, 30, 30), 300.0, np.float32)
    raw = np.ones(image.shape, np.uint8)
    final = np.zeros(image.shape, np.uint8)
    final[10:20, 10:20, 10:20] = 1
    result = Segmentation(final, None, brain_card.label_names, brain_card.label_colors, (5.0, 5.0, 5.0))
    assert any("the network labelled 3375 mL" in w for w in result_warnings(result, raw, image, brain_card))


def test_segment_widget_asks_before_running_out_of_scope(qtbot, make_napari_viewer, monkeypatch, tmp_path):
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication, QMessageBox

    from napari_medseg.viewer._reader import read_scan
    from napari_medseg.viewer._widgets.segment import SegmentWidget

    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    viewer = make_napari_viewer()
    for data, kwargs, kind in read_scan(str(pyradiomics_scan("lung1"))):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = SegmentWidget(viewer)
    seen = []

    def answer(label):
        def click():
            box = QApplication.activeModalWidget()
            if not isinstance(box, QMessageBox):
                QTimer.singleShot(50, click)
                return
            seen.append(box.text())
            next(b for b in box.buttons() if b.text() == label).click()
        QTimer.singleShot(50, click)

    answer("Cancel")
    assert widget.run() is None and "outside the model's scope" in widget._status.value
    assert seen[0].startswith("This scan is CT") and len(viewer.layers) == 1
    answer("Segment anyway")
    task = widget.run()
    assert task is not None
    qtbot.waitUntil(lambda: not task.running, timeout=120000)
    assert len(viewer.layers) == 2 and len(seen) == 2


def test_the_volume_table_and_the_json_carry_the_volume_warning(tmp_path):
    """A model whose card expects 1-2 mL, on a scan where it labels far more."""
    from napari_medseg.core.models import save_model
    from napari_medseg.core.network import AttentionUNet3D

    card = make_card(name="tiny-organ", spacing=(2.0, 2.0, 2.0))
    data = card.to_dict()
    data["labels"][1]["expected_ml"] = [1, 2]
    path = save_model(tmp_path / "organ.safetensors", AttentionUNet3D(1, 2, (4, 8)), data)
    scan = write_nifti(tmp_path / "s.nii.gz", np.random.default_rng(0).normal(100, 20, (40, 40, 40))
                       .astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    result = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "predict", str(scan), "-o",
                             str(tmp_path / "m.nii.gz"), "--model", str(path), "--json", "--quiet"],
                            capture_output=True, text=True)
    summary = json.loads(result.stdout)
    row = summary["volumes"][0]
    if row["ml"] > 2:
        assert "outside the 1-2 mL expected for lesion" in row["warning"]
        assert any("outside the 1-2 mL" in w for w in summary["warnings"])
        assert "warning: " in result.stderr
    else:  # an untrained network may label nothing; then the low side is the implausible one
        assert "warning" in row or row["ml"] >= 1
