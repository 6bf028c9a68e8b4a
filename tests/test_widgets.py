"""The Scan widget in a real napari viewer under Xvfb."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from napari.layers import Image, Labels
from napari.utils.notifications import notification_manager

from conftest import AFFINES, random_volume, write_dicom_series, write_nifti
from napari_medseg.viewer._sample import sample_path
from napari_medseg.viewer._widgets.scan import ScanWidget
from napari_medseg.core.windowing import CT_PRESETS, window_to_limits


@pytest.fixture
def scan_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = ScanWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Scan")
    return viewer, widget


def wait_for(qtbot, widget):
    qtbot.waitUntil(lambda: widget.task is not None and not widget.task.running, timeout=30000)


def test_open_file_shows_geometry_and_windows(qtbot, scan_widget, tmp_path):
    viewer, widget = scan_widget
    path = write_nifti(tmp_path / "ct.nii.gz", random_volume((30, 32, 20)), AFFINES["sagittal_permuted"])
    widget.open(path)
    wait_for(qtbot, widget)
    assert len(viewer.layers) == 1 and isinstance(viewer.layers[0], Image)
    layer = viewer.layers[0]
    np.testing.assert_allclose(
        layer.data_to_world([0, 0, 0]),
        read_world_of_first_layer_voxel(path, layer), atol=1e-4)
    codes = "".join(nib.aff2axcodes(AFFINES["sagittal_permuted"]))
    assert f"Orientation: {codes}\n" in widget._info.value and "Modality: CT" in widget._info.value
    widget._preset.value = "CT lung"
    assert tuple(layer.contrast_limits) == window_to_limits(*CT_PRESETS["CT lung"])
    widget._preset.value = "MR auto (percentiles)"
    lo, hi = layer.contrast_limits
    assert -1000 <= lo < hi <= 2000


def read_world_of_first_layer_voxel(path, layer):
    """Where nibabel puts the file voxel that the layer shows at index (0, 0, 0)."""
    value = layer.data[0, 0, 0]
    data = np.asanyarray(nib.load(str(path)).dataobj)
    from napari_medseg.viewer._layers import geometry_of

    geometry = geometry_of(layer)
    marker = np.zeros(geometry.layer_shape, np.uint8)
    marker[0, 0, 0] = 1
    ijk = np.argwhere(geometry.to_file(marker))[0]
    assert data[tuple(ijk)] == value
    x, y, z = nib.affines.apply_affine(nib.load(str(path)).affine, ijk)
    return [z, -y, -x]


def test_new_mask_and_save_keep_scan_geometry(qtbot, scan_widget, tmp_path):
    viewer, widget = scan_widget
    path = write_nifti(tmp_path / "scan.nii.gz", random_volume(), AFFINES["oblique_permuted"], sform_code=2)
    widget.open(path)
    wait_for(qtbot, widget)
    mask = widget.new_mask()
    mask.data[2:5, 3:7, 4:6] = 1
    out = tmp_path / "mask.nii.gz"
    widget.save_mask(out)
    wait_for(qtbot, widget)
    written, source = nib.load(str(out)), nib.load(str(path))
    np.testing.assert_array_equal(written.affine, source.affine)
    assert written.shape == source.shape and int(written.header["sform_code"]) == 2
    assert int(np.asanyarray(written.dataobj).sum()) == 3 * 4 * 2
    # napari's own File > Save goes through the plugin's writer with the same result.
    viewer.layers.selection = {mask}
    saved = viewer.layers.save(str(tmp_path / "via_napari.nii.gz"), selected=True, plugin="napari-medseg")
    assert saved and np.array_equal(nib.load(saved[0]).affine, source.affine)


def test_broken_file_notifies_and_adds_nothing(qtbot, scan_widget, tmp_path):
    viewer, widget = scan_widget
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00broken")
    before = len(notification_manager.records)
    widget.open(bad)
    wait_for(qtbot, widget)
    assert len(viewer.layers) == 0
    messages = [str(n.message) for n in notification_manager.records[before:]]
    assert any("broken.nii.gz" in m for m in messages), messages
    # napari's own open path shows the same message instead of raising.
    assert viewer.open(str(bad), plugin="napari-medseg") == []


def test_four_d_file_offers_a_volume_choice(qtbot, scan_widget, tmp_path):
    viewer, widget = scan_widget
    data = np.stack([random_volume(seed=s) for s in range(4)], axis=-1)
    path = write_nifti(tmp_path / "fmri.nii.gz", data, AFFINES["ras"])
    widget.open(path)
    wait_for(qtbot, widget)
    assert widget.needs_volume and len(widget._volume.choices) == 4 and len(viewer.layers) == 0
    widget._volume.value = 2
    widget.open(path)
    wait_for(qtbot, widget)
    assert len(viewer.layers) == 1
    np.testing.assert_array_equal(viewer.layers[0].data, read_layer(path, 2))


def read_layer(path, index):
    from napari_medseg.core.io import read_volume

    return read_volume(path, volume_index=index).layer_data()


def test_mixed_dicom_folder_offers_a_series_choice(qtbot, scan_widget, tmp_path):
    viewer, widget = scan_widget
    write_dicom_series(tmp_path / "s" / "a", random_volume((4, 8, 8)), (0, 0, 0), (1, 1, 1), np.eye(3),
                       series_uid="1.2.3.1", series_number="1")
    write_dicom_series(tmp_path / "s" / "b", random_volume((6, 8, 8)), (0, 0, 0), (1, 1, 1), np.eye(3),
                       series_uid="1.2.3.2", series_number="2")
    widget.open(tmp_path / "s")
    wait_for(qtbot, widget)
    assert widget.needs_series and len(widget._series.choices) == 2
    widget._series.value = "1.2.3.1"
    widget.open(tmp_path / "s")
    wait_for(qtbot, widget)
    assert viewer.layers[0].data.shape[0] == 4  # the 4-slice series, slices on axis 0
    assert "DOE" not in viewer.layers[0].name


def test_cancel_stops_a_dicom_read(qtbot, scan_widget, tmp_path):
    viewer, widget = scan_widget
    # 400 files: the read reports progress per file and cannot finish before cancel() below
    # (with 60 it sometimes did, on a loaded 2-core machine).
    folder = write_dicom_series(tmp_path / "big", random_volume((400, 16, 16)), (0, 0, 0), (1, 1, 1), np.eye(3))
    task = widget.open(folder)
    task.cancel()
    wait_for(qtbot, widget)
    assert task.cancelled and len(viewer.layers) == 0


def test_sample_data_opens_through_napari(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-medseg", "mni152_t1")
    assert layers[0].data.shape == (91, 109, 91)
    world = layers[0].data_to_world([0, 0, 0])
    # The file is LAS: layer (0, 0, 0) is the most inferior, anterior, right voxel = file (0, 108, 0).
    x, y, z = nib.affines.apply_affine(nib.load(sample_path()).affine, [0, 108, 0])
    np.testing.assert_allclose(world, [z, -y, -x], atol=1e-4)
