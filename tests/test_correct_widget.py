"""The Correct widget in a real viewer: helpers with napari's undo, Submit, the queue, fine-tuning
in a separate process, and versions."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import sphere_case
from napari_medseg.viewer._layers import make_metadata, remember_prediction
from napari_medseg.core.geometry import ScanGeometry
from napari_medseg.core.workspace import Workspace


@pytest.fixture
def correct_widget(make_napari_viewer, tmp_path, monkeypatch):
    from napari_medseg.viewer._widgets.correct import CorrectWidget

    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    viewer = make_napari_viewer()
    image, label, affine = sphere_case(3)
    geometry = ScanGeometry(affine, image.shape)
    scan = viewer.add_image(image, name="spheres", affine=geometry.world_affine,
                            metadata=make_metadata(geometry=geometry.to_dict()))
    hollow = label.copy()
    z, y, x = (int(round(c)) for c in np.argwhere(label).mean(0))
    hollow[z - 1:z + 2, y - 1:y + 2, x - 1:x + 2] = 0  # a hole the model left, at the sphere's centre
    layer = viewer.add_labels(hollow, name="spheres prediction", affine=scan.affine.affine_matrix,
                              metadata=make_metadata(geometry=geometry.to_dict(), segmentation_of="spheres",
                                                     model="spheres v1"))
    remember_prediction(layer, hollow)
    widget = CorrectWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Correct")
    widget._workspace.value = str(tmp_path / "ws")
    widget._correction.value = layer
    return viewer, widget, layer, label


def test_helpers_edit_through_napari_and_undo_takes_them_back(qtbot, correct_widget):
    viewer, widget, layer, reference = correct_widget
    before = np.array(layer.data, copy=True)
    assert widget.apply("holes") == int((reference != before).sum()) > 0
    np.testing.assert_array_equal(layer.data, reference)
    assert "edited voxels:" in widget._stats.value and "Dice" in widget._stats.value
    layer.undo()
    np.testing.assert_array_equal(layer.data, before)
    widget._grow_mm.value = 2.0
    grown = widget.apply("grow")
    assert grown > 0 and int((layer.data == 1).sum()) > int((before == 1).sum())
    layer.undo()
    np.testing.assert_array_equal(layer.data, before)
    # A brush stroke updates the count too.
    layer.selected_label = 1
    layer.paint((2, 2, 2), 1)
    expected = f"edited voxels: {int((np.asarray(layer.data) != before).sum())}"
    qtbot.waitUntil(lambda: expected in widget._stats.value, timeout=5000)


def test_submit_stores_the_correction_and_the_queue_lists_and_reopens_it(qtbot, correct_widget, tmp_path):
    viewer, widget, layer, reference = correct_widget
    widget.apply("holes")
    widget._reviewer.value = "Dr Who"
    widget._note.value = "filled the hole"
    task = widget.submit()
    qtbot.waitUntil(lambda: not task.running, timeout=60000)
    assert task.error is None, task.error
    workspace = Workspace(tmp_path / "ws")
    [item] = workspace.items()
    assert item.reviewer == "Dr Who" and item.note == "filled the hole" and item.model == "spheres v1"
    assert item.edited_voxels == int((reference != np.asarray(workspace.load_item(item)["prediction"])).sum())
    assert workspace.setting("reviewer") == "Dr Who"
    assert widget._queue.value["data"][0][0] == item.id[:12]
    widget.reopen_selected(0)
    assert f"item {item.id[:8]} label" in viewer.layers
    np.testing.assert_array_equal(viewer.layers[f"item {item.id[:8]} label"].data, reference)


def test_a_failed_submit_keeps_the_correction_and_offers_a_retry(qtbot, correct_widget, tmp_path):
    viewer, widget, layer, _reference = correct_widget
    widget.apply("holes")
    edited = np.array(layer.data, copy=True)
    import shutil

    blocker = tmp_path / "ws" / "items"
    shutil.rmtree(blocker, ignore_errors=True)
    blocker.write_text("not a folder")  # the workspace cannot hold items: every submit fails
    task = widget.submit()
    qtbot.waitUntil(lambda: not task.running, timeout=60000)
    assert task.error is not None and "Retry" in widget._submit.text
    np.testing.assert_array_equal(layer.data, edited)  # nothing lost
    blocker.unlink()
    blocker.mkdir()
    task = widget.submit()
    qtbot.waitUntil(lambda: not task.running, timeout=60000)
    assert task.error is None and len(Workspace(tmp_path / "ws").items()) == 1


def test_fine_tuning_runs_in_its_own_process_and_shows_progress(qtbot, correct_widget, tmp_path, sphere_model):
    viewer, widget, layer, reference = correct_widget
    workspace = Workspace(tmp_path / "ws")
    workspace.ensure_model(str(sphere_model))
    for seed, split in ((11, "train"), (12, "validation")):
        image, label, affine = sphere_case(seed)
        workspace.submit(image, ScanGeometry(affine, image.shape), label, split=split)
    workspace.close()
    widget._steps.value = 4
    process = widget.start_fine_tuning()
    assert process is not None and widget._finetune.enabled is False
    qtbot.waitUntil(lambda: widget._finetune.enabled, timeout=300000)
    assert widget.last_result is not None and widget.last_result["version"] == "v2", widget._train_status.value
    assert widget._progress.value == 1000 and "validation Dice" in widget._train_status.value
    assert [row[0] for row in widget._versions.value["data"]] == ["v1", "v2"]
    if widget.last_result["promoted"]:
        widget.rollback_selected(0)
        assert Workspace(tmp_path / "ws").current_version() == "v1"
