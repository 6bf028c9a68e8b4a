"""Edits are never lost, in a real napari viewer under Xvfb: no silent overwrite, autosave, questions, recovery."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from napari.layers import Labels

from autosave_child import replay
from conftest import answer_question, closed_by_user
from napari_medseg.viewer._autosave import manager_of
from napari_medseg.viewer._sample import sample_path
from napari_medseg.core import autosave
from napari_medseg.core.errors import MedsegError
from napari_medseg.core.io import read_volume

HERE = Path(__file__).resolve().parent


def _open(viewer, path):
    return viewer.open(str(path), plugin="napari-medseg")


def _digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def scan_copy(tmp_path):
    path = tmp_path / "head.nii.gz"
    shutil.copy(sample_path(), path)
    return path


def test_run_edit_run_keeps_the_edited_layer_and_adds_a_new_one(make_napari_viewer, qtbot, scan_copy):
    from napari_medseg.viewer._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    _open(viewer, scan_copy)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    widget.run()
    qtbot.waitUntil(lambda: widget.task is not None and not widget.task.running, timeout=120000)
    first = widget.last_layer
    # An unedited result may be replaced: Run again leaves one layer.
    widget.run()
    qtbot.waitUntil(lambda: not widget.task.running, timeout=120000)
    assert widget.last_layer is first and len([l for l in viewer.layers if isinstance(l, Labels)]) == 1
    # A correction: erase a block of 8,000 voxels inside the brain.
    z, y, x = (int(c) for c in np.argwhere(first.data == 1).mean(0))
    block = tuple(np.indices((20, 20, 20)).reshape(3, -1) + np.array([[z - 10], [y - 10], [x - 10]]))
    first.data_setitem(block, 0)
    edited = np.array(first.data, copy=True)
    assert int((edited[z - 10:z + 10, y - 10:y + 10, x - 10:x + 10] == 0).sum()) == 8000
    widget._tta.value = True
    widget.run()
    qtbot.waitUntil(lambda: not widget.task.running, timeout=240000)
    assert widget.task.error is None
    second = widget.last_layer
    assert second is not first and second.name == f"{first.name} (2)"
    assert first in viewer.layers
    np.testing.assert_array_equal(first.data, edited)  # every corrected voxel intact
    assert int((second.data[z - 10:z + 10, y - 10:y + 10, x - 10:x + 10] == 1).sum()) > 7000


def test_a_write_over_a_source_is_refused_and_the_source_is_unchanged(make_napari_viewer, scan_copy, tmp_path):
    from napari.utils.notifications import notification_manager

    viewer = make_napari_viewer()
    [image] = _open(viewer, scan_copy)
    before = _digest(scan_copy)
    mask = viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="mask", affine=image.affine,
                             metadata=image.metadata)
    mask.data[10:20, 10:20, 10:20] = 1
    notification_manager.records.clear()
    assert mask.save(str(scan_copy), plugin="napari-medseg") == []
    assert _digest(scan_copy) == before
    message = notification_manager.records[-1].message
    assert "refusing to write" in message and "head.nii.gz" in message and "\n" not in message
    # A link to the source is the source.
    link = tmp_path / "link.nii.gz"
    os.link(scan_copy, link)
    assert mask.save(str(link), plugin="napari-medseg") == []
    assert _digest(scan_copy) == before
    # The scan a segmentation belongs to, even once its layer is closed.
    from napari_medseg.viewer._layers import update_medseg_meta

    update_medseg_meta(mask, scan_source_path=str(scan_copy), source_path=None)
    viewer.layers.remove(image)
    assert mask.save(str(scan_copy), plugin="napari-medseg") == []
    assert _digest(scan_copy) == before
    # Elsewhere is fine.
    assert mask.save(str(tmp_path / "mask.nii.gz"), plugin="napari-medseg")
    assert read_volume(tmp_path / "mask.nii.gz").layer_data().sum() == 1000


def test_the_cli_refuses_the_same_write_with_the_same_words(scan_copy, tmp_path):
    result = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "predict", str(scan_copy), "-o",
                             str(scan_copy)], capture_output=True, text=True)
    assert result.returncode == 2 and "refusing to write" in result.stderr and "head.nii.gz" in result.stderr


def _session_for(manager, layer):
    tracked = manager.tracked_for(layer)
    return None if tracked is None or tracked.store.session is None else tracked.store.session


def _stored(manager, labels, expected) -> bool:
    """Whether the layer's autosave holds ``expected``; a session whose first snapshot is
    still being written holds no mask yet (load_session says so), which is not yet."""
    session = _session_for(manager, labels)
    if session is None:
        return False
    try:
        return np.array_equal(autosave.load_session(session.folder)[0], expected)
    except MedsegError:
        return False


def test_each_stroke_is_autosaved_within_two_seconds(make_napari_viewer, qtbot, scan_copy):
    viewer = make_napari_viewer()
    [image] = _open(viewer, scan_copy)
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="mask", affine=image.affine,
                               metadata=image.metadata)
    manager = manager_of(viewer)
    for value, centre in ((1, (40, 50, 45)), (2, (30, 60, 40)), (0, (40, 50, 45))):
        labels.brush_size = 9
        start = time.monotonic()
        labels.paint(centre, value)
        expected = np.array(labels.data, copy=True)

        qtbot.waitUntil(lambda: _stored(manager, labels, expected), timeout=2000)
        print(f"stroke stored after {time.monotonic() - start:.2f} s")
    # A correction helper and napari's undo are stored too.
    labels.undo()
    undone = np.array(labels.data, copy=True)
    qtbot.waitUntil(lambda: _stored(manager, labels, undone), timeout=2000)
    meta = json.loads((_session_for(manager, labels).folder / "meta.json").read_text())
    assert "head" not in json.dumps(meta) and meta["scan"]["sha256"] == autosave.scan_identity(image.data, None)["sha256"]


def test_closing_with_unsaved_edits_asks_first(make_napari_viewer, qtbot, scan_copy):
    viewer = make_napari_viewer(show=True)  # a window on screen, as the user has
    [image] = _open(viewer, scan_copy)
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="mask", affine=image.affine,
                               metadata=image.metadata)
    labels.paint((40, 50, 45), 1)
    window = viewer.window._qt_window
    asked = answer_question(qtbot, "Cancel")
    window.close()
    qtbot.waitUntil(lambda: bool(asked), timeout=5000)
    assert "'mask'" in asked[0] and window.isVisible()  # Cancel: still open, edits still there
    assert labels.data.sum() > 0
    manager = manager_of(viewer)
    session_folder = _session_for(manager, labels).folder
    asked = answer_question(qtbot, "Discard")
    window.close()
    qtbot.waitUntil(lambda: bool(asked) and not window.isVisible(), timeout=5000)
    closed_by_user(viewer)
    # Discard keeps the autosave until the next clean close, so a wrong click can be undone.
    [kept] = [s for s in autosave.list_sessions(manager.root) if s.folder == session_folder]
    assert kept.state == "discarded"
    np.testing.assert_array_equal(autosave.load_session(session_folder)[0], labels.data)


def test_saving_then_closing_asks_nothing_and_leaves_nothing(make_napari_viewer, qtbot, scan_copy, tmp_path):
    viewer = make_napari_viewer(show=True)  # a window on screen, as the user has
    [image] = _open(viewer, scan_copy)
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="mask", affine=image.affine,
                               metadata=image.metadata)
    labels.paint((40, 50, 45), 1)
    manager = manager_of(viewer)
    assert [t.layer_ref() for t in manager.unsaved()] == [labels]
    assert labels.save(str(tmp_path / "mask.nii.gz"), plugin="napari-medseg")
    assert manager.unsaved() == []
    labels.paint((30, 30, 30), 2)  # edited again after the save
    assert [t.layer_ref() for t in manager.unsaved()] == [labels]
    assert labels.save(str(tmp_path / "mask.nii.gz"), plugin="napari-medseg")
    viewer.window._qt_window.close()  # nothing to ask
    closed_by_user(viewer)
    assert autosave.list_sessions(manager.root) == []


def test_removing_an_edited_layer_asks_and_cancel_puts_it_back(make_napari_viewer, qtbot, scan_copy):
    viewer = make_napari_viewer(show=True)  # a window on screen, as the user has
    [image] = _open(viewer, scan_copy)
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="mask", affine=image.affine,
                               metadata=image.metadata)
    labels.paint((40, 50, 45), 1)
    painted = np.array(labels.data, copy=True)
    asked = answer_question(qtbot, "Cancel")
    viewer.layers.remove(labels)
    qtbot.waitUntil(lambda: "mask" in viewer.layers, timeout=5000)
    assert asked and viewer.layers["mask"] is labels
    np.testing.assert_array_equal(labels.data, painted)
    answer_question(qtbot, "Discard")
    viewer.layers.remove(labels)
    qtbot.wait(200)
    assert "mask" not in viewer.layers
    [session] = autosave.list_sessions(manager_of(viewer).root)
    assert session.state == "discarded"


def test_submit_on_close_stores_the_correction(make_napari_viewer, qtbot, scan_copy):
    from napari_medseg.core.workspace import Workspace

    viewer = make_napari_viewer(show=True)  # a window on screen, as the user has
    [image] = _open(viewer, scan_copy)
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="mask", affine=image.affine,
                               metadata=image.metadata)
    labels.paint((40, 50, 45), 1)
    painted = np.array(labels.data, copy=True)
    from napari_medseg.viewer._workspace import workspace_folder

    folder = workspace_folder(viewer)
    root = manager_of(viewer).root
    answer_question(qtbot, "Submit")
    viewer.window._qt_window.close()
    closed_by_user(viewer)
    workspace = Workspace(folder)
    [item] = workspace.items()
    np.testing.assert_array_equal(workspace.load_item(item)["label"], painted)
    workspace.close()
    assert autosave.list_sessions(root) == []  # submitted: nothing left to recover


def _kill_run(scan: Path, home: Path, seed: int, mode: str) -> tuple:
    ops = home / "ops.jsonl"
    home.mkdir(parents=True)
    env = {**os.environ, "NAPARI_MEDSEG_HOME": str(home), "QT_QPA_PLATFORM": "offscreen"}
    child = subprocess.run([sys.executable, str(HERE / "autosave_child.py"), str(scan), str(ops), str(seed), mode],
                           env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == -9, child.stderr[-2000:]
    listed = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "recover", "--list", "--json"], env=env,
                            capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    sessions = json.loads(listed.stdout)
    if not sessions:
        return mode, ops, None
    [session] = sessions
    out = home / "recovered.nii.gz"
    done = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "recover", session["id"], "-o", str(out)],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return mode, ops, np.asarray(read_volume(out).layer_data())


@pytest.mark.slow
def test_sigkill_twenty_times_never_loses_or_corrupts_an_autosave(tmp_path):
    """Ten runs wait 3 s after painting, then die; ten die at a random moment (autosaves in flight included)."""
    scan = tmp_path / "head.nii.gz"
    shutil.copy(sample_path(), scan)
    runs = [(seed, "wait" if seed % 2 == 0 else "random") for seed in range(20)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda run: _kill_run(scan, tmp_path / f"run{run[0]}", *run), runs))
    exact = 0
    for mode, ops, recovered in results:
        states = replay(str(scan), str(ops))
        if recovered is None:
            # Killed before the first autosave: there was nothing painted yet, or under a second of it.
            assert mode == "random"
            continue
        if mode == "wait":
            np.testing.assert_array_equal(recovered, states[-1])  # voxel for voxel the painted mask
            exact += 1
            continue
        # Killed at random: the last complete autosave. An autosave may catch a stroke half
        # painted, so each voxel holds the value of one state or of the next one.
        assert any(np.all((recovered == states[k]) | (recovered == states[k + 1])) for k in range(len(states) - 1)) \
            or any(np.array_equal(recovered, state) for state in states)
    assert exact == 10


def test_the_recover_widget_puts_a_crashed_sessions_mask_back_on_its_scan(make_napari_viewer, qtbot, scan_copy,
                                                                        tmp_path, monkeypatch):
    home = Path(os.environ["NAPARI_MEDSEG_HOME"])
    ops = tmp_path / "ops.jsonl"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    child = subprocess.run([sys.executable, str(HERE / "autosave_child.py"), str(scan_copy), str(ops), "3", "wait"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == -9, child.stderr[-2000:]
    painted = replay(str(scan_copy), str(ops))[-1]
    from napari_medseg.viewer._widgets.recover import RecoverWidget, offer_recovery

    viewer = make_napari_viewer()
    offered = offer_recovery(viewer)
    assert isinstance(offered, RecoverWidget) and len(offered.sessions) == 1
    assert offered._table.value["data"][0][1] == int((painted != 0).sum())
    # The scan is not open: Restore opens the file picked for it and checks that it is the same scan.
    layer = offered.restore(0, scan_path=str(scan_copy))
    np.testing.assert_array_equal(layer.data, painted)
    assert layer.metadata["medseg"]["segmentation_of"] in viewer.layers
    np.testing.assert_allclose(layer.affine.affine_matrix, viewer.layers[0].affine.affine_matrix)
    assert offered.sessions == []  # recovered: no longer offered
    assert home.exists()
