"""The Correct dock's prompt tools in a real viewer with the reading layout: clicks on the
canvases, strokes with napari's brush, the preview, accept as one undo step, the worker
off the GUI thread, and prompts stored with a submitted correction."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from qtpy.QtCore import QPoint, Qt, QTimer

from conftest import oblique_sphere_scan
from napari_medseg.core.workspace import Workspace
from napari_medseg.viewer._layers import edit_labels, make_metadata, medseg_meta


def dice(a, b) -> float:
    return 2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


@pytest.fixture
def prompting(make_napari_viewer, qtbot, tmp_path):
    """A viewer with the oblique sphere scan, the reading layout, an empty labels layer and
    the Correct dock: ``(viewer, layout, widget, labels, truth in layer order, centre world)``."""
    from napari_medseg.viewer._widgets.correct import CorrectWidget
    from napari_medseg.viewer._widgets.reading import open_reading_layout

    path, truth, centre_ras, _affine = oblique_sphere_scan(tmp_path)
    viewer = make_napari_viewer(show=True)
    [image] = viewer.open(str(path), plugin="napari-medseg")
    geometry_dict = medseg_meta(image)["geometry"]
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="scan lesion", affine=image.affine,
                               metadata=make_metadata(geometry=geometry_dict, segmentation_of=image.name))
    layout = open_reading_layout(viewer)
    widget = CorrectWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Correct")
    widget._workspace.value = str(tmp_path / "ws")
    widget._correction.value = labels
    from napari_medseg.core.geometry import ScanGeometry

    geometry = ScanGeometry.from_dict(geometry_dict)
    truth_layer = np.asarray(geometry.to_layer(truth))
    centre_world = np.asarray(image.data_to_world(np.argwhere(truth_layer).mean(0)))
    qtbot.wait(300)
    return viewer, layout, widget, labels, truth_layer, centre_world


def _click(qtbot, canvas, point: QPoint, modifier=Qt.KeyboardModifier.NoModifier):
    qtbot.mouseMove(canvas, point)
    qtbot.mousePress(canvas, Qt.MouseButton.LeftButton, modifier, pos=point)
    qtbot.mouseRelease(canvas, Qt.MouseButton.LeftButton, modifier, pos=point)


def _wait(qtbot, tool):
    qtbot.waitUntil(lambda: tool.task is not None and not tool.task.running and not tool._pending, timeout=60000)
    assert tool.task.error is None, tool.task.error


def test_a_click_in_the_coronal_view_previews_the_sphere_and_accept_is_one_undo_step(prompting, qtbot):
    from napari_medseg.viewer._autosave import manager_of

    viewer, layout, widget, labels, truth, centre = prompting
    tool = widget.prompts
    layout.set_point(centre)
    layout.jump_to_crosshair()
    qtbot.wait(200)
    tool._clicks.value = "this label (positive)"
    canvas = layout.views["coronal"].qt_viewer.canvas.native
    _click(qtbot, canvas, QPoint(canvas.width() // 2, canvas.height() // 2))
    assert tool.task is not None, "the click on the coronal canvas added no prompt"
    _wait(qtbot, tool)
    preview = tool.preview.data == 1
    assert dice(preview, truth) >= 0.95, dice(preview, truth)
    assert not np.any(labels.data), "the labels layer changed before Accept"
    assert "1 prompts" in tool._status.value
    history = len(labels._undo_history)
    changed = tool.accept()
    assert changed == np.count_nonzero(preview) and len(labels._undo_history) == history + 1
    np.testing.assert_array_equal(labels.data == 1, preview)
    assert tool.preview is None and f"{labels.name} prompt preview" not in viewer.layers
    tracked = manager_of(viewer).tracked_for(labels)
    qtbot.waitUntil(lambda: tracked.store.changes > 0, timeout=5000)  # the autosave saw it
    labels.undo()
    assert not np.any(labels.data)


def test_a_negative_click_removes_a_leak_and_leaves_other_labels_and_far_voxels(prompting, qtbot):
    viewer, layout, widget, labels, truth, centre = prompting
    tool = widget.prompts
    leak = np.zeros_like(truth)
    z, y, x = np.argwhere(truth).mean(0).round().astype(int)
    leak[z - 2:z + 3, y - 2:y + 3, x:] = True   # a bar from the sphere out to the scan's edge
    leak &= ~truth
    mask = np.where(truth | leak, 1, 0).astype(np.uint8)
    mask[:3, :3, :3] = 2                        # another finished label, in a far corner
    labels.data = mask
    far = np.argwhere(leak)[-1]                 # the bar's end, well outside the sphere
    tool.add_click(labels.data_to_world(far), positive=False)
    _wait(qtbot, tool)
    result = tool.session.labels
    assert np.count_nonzero(leak & (result == 1)) <= 0.1 * np.count_nonzero(leak)
    assert dice(result == 1, truth) >= 0.95
    assert np.all(result[:3, :3, :3] == 2)
    region = tool.session._steps[-1].region
    outside = np.ones(truth.shape, bool)
    outside[region] = False
    np.testing.assert_array_equal(result[outside], mask[outside])
    tool.reject()
    np.testing.assert_array_equal(labels.data, mask)  # Reject drops the preview, nothing written


def test_strokes_and_undo_of_a_prompt(prompting, qtbot):
    viewer, layout, widget, labels, truth, centre = prompting
    tool = widget.prompts
    strokes = tool.paint_strokes()
    assert viewer.layers.selection.active is strokes and strokes.mode == "paint" and strokes.selected_label == 1
    z, y, x = np.argwhere(truth).mean(0).round().astype(int)
    painted = np.zeros(truth.shape, np.uint8)
    painted[z][truth[z]] = 1
    edit_labels(strokes, painted)  # one slice painted, as one brush step
    tool._stroke_value.value = "not this label"
    assert strokes.selected_label == 2
    tool.apply_strokes()
    _wait(qtbot, tool)
    assert not np.any(strokes.data)  # the strokes were used; the layer is ready for the next ones
    first = tool.preview.data.copy()
    assert dice(first == 1, truth) >= 0.9, dice(first == 1, truth)
    tool.add_click(labels.data_to_world((z, y, x + 2)), positive=True)
    _wait(qtbot, tool)
    assert tool.undo()
    np.testing.assert_array_equal(tool.preview.data, first)
    assert tool.session.prompt_count == 1


def test_the_preview_is_updated_off_the_gui_thread(prompting, qtbot):
    """The largest gap between 10-ms timer ticks while a prompt is decided stays under 100 ms."""
    viewer, layout, widget, labels, truth, centre = prompting
    tool = widget.prompts
    tool._start_mm.value = 60.0   # a region of the whole scan: the slowest update this scan allows
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    began = time.perf_counter()
    tool.add_click(centre, positive=True)
    tool.add_click(labels.data_to_world((2, 2, 2)), positive=False)   # queued behind the first
    tool.add_click(centre + 3.0, positive=True)
    _wait(qtbot, tool)
    took = time.perf_counter() - began
    timer.stop()
    ticks = [t for t in ticks if t >= began]
    gaps = np.diff(ticks)
    assert tool.session.prompt_count == 3 and took > 0.2 and len(gaps) > 10
    assert gaps.max() <= 0.1, f"the event loop stalled for {gaps.max() * 1000:.0f} ms"


def test_submit_stores_the_prompts_and_their_mask_de_identified(prompting, qtbot, tmp_path):
    viewer, layout, widget, labels, truth, centre = prompting
    tool = widget.prompts
    tool.add_click(centre, positive=True)
    _wait(qtbot, tool)
    tool.accept()
    produced = np.array(labels.data, copy=True)
    brushed = produced.copy()
    brushed[0, 0, 0] = 1
    edit_labels(labels, brushed)  # a brush edit afterwards
    task = widget.submit()
    qtbot.waitUntil(lambda: not task.running, timeout=60000)
    assert task.error is None, task.error
    workspace = Workspace(tmp_path / "ws")
    [item] = workspace.items()
    assert "prompts.json" in item.files and "prompted" in item.files and workspace.verify() == []
    loaded = workspace.load_item(item)
    np.testing.assert_array_equal(loaded["prompted"], produced)
    assert loaded["label"][0, 0, 0] == 1 and loaded["prompted"][0, 0, 0] == 0
    [session] = loaded["prompts"]
    [point] = session["points"]
    assert session["label"] == 1 and point["positive"] is True
    np.testing.assert_allclose(point["index"], labels.world_to_data(centre), atol=0.51)
    stored = json.loads(workspace.item_path(item, "prompts.json").read_text())
    assert set(stored) == {"sessions"} and set(stored["sessions"][0]) == {"label", "points", "boxes", "strokes"}
    workspace.close()
