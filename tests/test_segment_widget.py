"""The Segment widget end to end in a real napari viewer under Xvfb."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from napari.layers import Labels
from napari.utils.notifications import notification_manager
from qtpy.QtCore import QTimer

from napari_medseg.viewer._layers import medseg_meta, update_medseg_meta
from napari_medseg.viewer._reader import napari_get_reader
from napari_medseg.viewer._sample import sample_path
from napari_medseg.viewer._widgets.segment import SegmentWidget
from napari_medseg.core.io import read_volume
from napari_medseg.core.models import save_model
from napari_medseg.core.network import AttentionUNet3D
from conftest import card_dict


@pytest.fixture
def segment_widget(make_napari_viewer, monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    viewer = make_napari_viewer()
    for data, kwargs, kind in napari_get_reader(str(sample_path()))(str(sample_path())):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    yield viewer, widget
    if widget.task is not None and widget.task.running:  # never leave a worker behind a closed viewer
        widget.task.cancel()
        widget.task.worker.quit()
        widget.task.worker.await_workers() if hasattr(widget.task.worker, "await_workers") else None
        time.sleep(1)


def wait_for(qtbot, widget, timeout=60000):
    qtbot.waitUntil(lambda: widget.task is not None and not widget.task.running, timeout=timeout)


def test_run_adds_named_labels_in_the_scan_geometry_and_the_gui_stays_responsive(qtbot, segment_widget):
    viewer, widget = segment_widget
    assert widget._model.value is not None and "brain-t1" in widget._model.current_choice
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(50)
    task = widget.run()
    assert widget._cancel.enabled and not widget._run.enabled
    wait_for(qtbot, widget)
    timer.stop()
    gaps = np.diff(ticks) * 1000
    # The last gap is the GUI thread adding the Labels layer (texture upload); the rest
    # span the background run.
    print(f"Qt timer while segmenting: {len(ticks)} ticks, largest gap during the run "
          f"{gaps[:-1].max():.0f} ms, adding the result layer {gaps[-1]:.0f} ms")
    assert task.error is None
    assert len(ticks) > 5 and gaps[:-1].max() < 500  # the event loop kept running
    assert gaps[-1] < 2500
    image = viewer.layers["MNI152_T1_2mm"]
    layer = viewer.layers["MNI152_T1_2mm brain-t1"]
    assert isinstance(layer, Labels) and layer.data.shape == image.data.shape
    np.testing.assert_allclose(layer.affine.affine_matrix, image.affine.affine_matrix)
    assert list(layer.features["name"]) == ["background", "brain"]
    rows = widget._table.value["data"]
    assert rows[0][1] == "brain" and rows[0][3] == int((layer.data == 1).sum())
    assert rows[0][2] == pytest.approx(rows[0][3] * 8 / 1000, rel=1e-3)  # 2 mm voxels
    assert 1500 < rows[0][2] < 2300
    np.testing.assert_allclose(layer.colormap.map(1)[:3], (0.95, 0.35, 0.2), atol=0.01)
    assert widget._run.enabled and not widget._cancel.enabled

    # Re-running replaces the layer instead of adding another one.
    widget.run()
    wait_for(qtbot, widget)
    assert [l.name for l in viewer.layers].count("MNI152_T1_2mm brain-t1") == 1 and len(viewer.layers) == 2


def test_cancel_leaves_no_partial_layer(qtbot, segment_widget, tmp_path):
    viewer, widget = segment_widget
    card = card_dict(name="slow", spacing=(1.0, 1.0, 1.0))
    torch.manual_seed(0)
    path = save_model(tmp_path / "slow.safetensors", AttentionUNet3D(1, 2, (4, 8)), card)
    widget.import_model(path)
    assert "slow" in widget._model.current_choice
    widget._overlap.value = 0.5
    task = widget.run()
    qtbot.waitUntil(lambda: task._last_step > 70, timeout=60000)  # past preparation, some windows done
    widget.cancel()
    wait_for(qtbot, widget)
    assert task.cancelled
    assert len(viewer.layers) == 1 and "nothing was added" in widget._status.value


def test_importing_a_bad_model_file_is_a_notification(qtbot, segment_widget, tmp_path):
    viewer, widget = segment_widget
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage" * 10)
    before = len(notification_manager.records)
    widget.import_model(bad)
    messages = [str(n.message) for n in notification_manager.records[before:]]
    assert any("bad.safetensors" in m and "napari-medseg" in m for m in messages)
    assert all("bad" not in str(choice) for choice in widget._model.choices)


def test_run_without_an_image_is_a_notification(qtbot, make_napari_viewer):
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    before = len(notification_manager.records)
    assert widget.run() is None
    assert any("open a 3D scan first" in str(n.message) for n in notification_manager.records[before:])


def test_saved_segmentation_lands_in_the_scan_file_geometry(qtbot, segment_widget, tmp_path):
    from napari_medseg.viewer._writer import write_labels

    viewer, widget = segment_widget
    widget.run()
    wait_for(qtbot, widget)
    layer = viewer.layers["MNI152_T1_2mm brain-t1"]
    out = tmp_path / "brain.nii.gz"
    write_labels(str(out), layer.data, {"metadata": layer.metadata, "affine": layer.affine.affine_matrix})
    mask = read_volume(out)
    scan = read_volume(sample_path())
    np.testing.assert_array_equal(mask.geometry.affine_ras, scan.geometry.affine_ras)
    np.testing.assert_array_equal(mask.layer_data(), layer.data)


def test_a_three_class_imported_model_gives_named_coloured_sortable_volumes_and_a_subset_filter(
        qtbot, make_napari_viewer, monkeypatch, tmp_path):
    """The genuine nnU-Net folder's model (background, body, bone; see nnunet_factory) on its
    held-out real CT crop, through the Segment dock."""
    from nnunet_factory import build

    from napari_medseg.core.nnunet import import_nnunet

    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    genuine = build()
    entry = import_nnunet(genuine["folder"], folds=["0"], name="lung-ct")
    viewer = make_napari_viewer()
    for data, kwargs, kind in napari_get_reader(str(genuine["held_out"]))(str(genuine["held_out"])):
        image = getattr(viewer, f"add_{kind}")(data, **kwargs)
    # A scan whose modality is not known opens in an intensity window; the CT model's card
    # then calls for the CT soft-tissue window (W 400, L 50).
    update_medseg_meta(image, modality="unknown", window_preset=None)
    image.contrast_limits = (float(image.data.min()), float(image.data.max()))
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    widget._model.value = str(entry.path)
    widget._show.value = ""
    task = widget.run()
    wait_for(qtbot, widget, timeout=120000)
    assert task.error is None, task.error
    assert tuple(image.contrast_limits) == (-150.0, 250.0)
    assert medseg_meta(image)["window_from_model"] == "lung-ct v1.0.0"
    layer = widget.last_layer
    assert isinstance(layer, Labels) and set(np.unique(layer.data)) == {0, 1, 2}
    assert list(layer.features["name"]) == ["background", "body", "bone"]
    colors = layer.colormap.color_dict
    assert all(colors[v][3] > 0 for v in (1, 2)) and not np.allclose(colors[1], colors[2])

    table = widget._table.native
    assert [table.item(r, 1).text() for r in range(table.rowCount())] == ["body", "bone"]
    volumes = {table.item(r, 1).text(): float(table.item(r, 2).text()) for r in range(table.rowCount())}
    voxel_ml = float(np.prod(np.abs(np.diag(layer.affine.affine_matrix)[:3]))) / 1000
    for value, name in ((1, "body"), (2, "bone")):
        assert volumes[name] == pytest.approx((layer.data == value).sum() * voxel_ml, rel=0.01, abs=0.01)
    table.sortItems(2)  # the volume column, as a click on its header does
    ordered = [float(table.item(r, 2).text()) for r in range(table.rowCount())]
    assert ordered == sorted(ordered)

    widget._show.value = "bone"
    colors = layer.colormap.color_dict
    assert colors[2][3] > 0 and colors[1][3] == 0
    widget._show.value = "1"
    assert layer.colormap.color_dict[1][3] > 0 and layer.colormap.color_dict[2][3] == 0
    widget._show.value = ""
    assert all(layer.colormap.color_dict[v][3] > 0 for v in (1, 2))
    viewer.layers.remove(layer)
