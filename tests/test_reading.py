"""The reading layout in a real napari viewer under Xvfb: planes, letters, crosshair, window/level, editing."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from qtpy.QtCore import QPoint, Qt

from conftest import AFFINES
from napari_medseg.viewer._widgets.reading import LETTER_MARGIN, cursor_report, open_reading_layout, plane_setup

SHAPE = (40, 48, 36)
VARIANTS = {
    "stored": AFFINES["ras"],
    "permuted": AFFINES["sagittal_permuted"],
    "flipped": AFFINES["las_flipped"],
    "oblique": AFFINES["oblique"],
}


def marker_scan(tmp_path, name: str, affine: np.ndarray):
    """Noise with a bright cube at the patient's right, anterior and superior, written as stored."""
    affine = np.array(affine, dtype=float)
    centre = affine[:3, :3] @ ((np.array(SHAPE) - 1) / 2) + affine[:3, 3]
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in SHAPE], indexing="ij")).reshape(3, -1)
    reach = (affine[:3, :3] @ corners + affine[:3, 3:]).max(axis=1) - centre  # RAS+: toward R, A, S
    for fraction in np.linspace(0.6, 0.1, 11):
        target = centre + fraction * reach
        voxel = np.round(np.linalg.solve(affine[:3, :3], target - affine[:3, 3])).astype(int)
        if np.all(voxel >= 3) and np.all(voxel < np.array(SHAPE) - 3):
            break
    data = np.random.default_rng(0).normal(100, 10, SHAPE).astype(np.float32)
    half = 3
    data[tuple(slice(v - half, v + half + 1) for v in voxel)] = 2000
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    world = np.array([target[2], -target[1], -target[0]])  # napari world: (S, P, L) mm
    return path, world


def bright_centroid(shot: np.ndarray) -> tuple[float, float]:
    """Where the white marker is in a canvas screenshot, as fractions of width and height."""
    rgb = shot[..., :3].astype(int)
    white = (rgb.min(axis=-1) > 200)  # the yellow letters and crosshair have little blue
    ys, xs = np.nonzero(white)
    assert xs.size > 4, "the marker is not in the view"
    return xs.mean() / shot.shape[1], ys.mean() / shot.shape[0]


def letters_drawn(shot: np.ndarray) -> dict:
    """Which edges of a canvas screenshot have yellow letter pixels near their middle."""
    rgb = shot[..., :3].astype(int)
    yellow = (rgb[..., 0] > 200) & (rgb[..., 1] > 170) & (rgb[..., 2] < 90)
    h, w = yellow.shape
    band = 2 * LETTER_MARGIN
    middle_rows, middle_cols = slice(int(h * 0.4), int(h * 0.6)), slice(int(w * 0.4), int(w * 0.6))
    return {"middle_left": bool(yellow[middle_rows, :band].sum() > 10),
            "middle_right": bool(yellow[middle_rows, w - band:].sum() > 10),
            "top_center": bool(yellow[:band, middle_cols].sum() > 10),
            "bottom_center": bool(yellow[h - band:, middle_cols].sum() > 10)}


@pytest.fixture
def layout_on(make_napari_viewer, qtbot):
    def make(path):
        viewer = make_napari_viewer(show=True)
        [image] = viewer.open(str(path), plugin="napari-medseg")
        image.contrast_limits = (0, 1000)
        layout = open_reading_layout(viewer)
        qtbot.wait(300)
        layout.reset_views()
        qtbot.wait(100)
        return viewer, layout, image
    return make


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_marker_shows_at_the_patients_right_and_front_under_R_and_A(layout_on, qtbot, tmp_path, variant):
    path, world = marker_scan(tmp_path, variant, VARIANTS[variant])
    viewer, layout, _image = layout_on(path)
    layout.set_point(world)
    qtbot.wait(200)
    expected = {"axial": ("R", "A"), "coronal": ("R", "S"), "sagittal": ("A", "S")}
    if variant == "oblique":
        # napari slices an oblique volume along its voxel axes with only the in-plane part of
        # the rotation; the axial view is the one the radiologist's orientation test needs.
        expected = {"axial": expected["axial"]}
    for plane, (left, top) in expected.items():
        shot = layout.views[plane].qt_viewer.screenshot(flash=False)
        x, y = bright_centroid(shot)
        letters = layout.edge_letters(plane)
        assert x < 0.5 and y < 0.5, f"{variant} {plane}: marker at ({x:.2f}, {y:.2f}) of the canvas"
        assert letters["middle_left"] == left and letters["top_center"] == top
    assert ("Oblique" in layout.note.text()) == (variant == "oblique")
    # The letters are drawn in the canvas itself (so screenshots keep them), at all four edges.
    for view in layout.views.values():
        view.crosshair.visible = False  # the crosshair is yellow too
    qtbot.wait(100)
    for plane in layout.views:
        drawn = letters_drawn(layout.views[plane].qt_viewer.screenshot(flash=False))
        assert all(drawn.values()), f"{variant} {plane}: letters drawn at {drawn}"
    for view in layout.views.values():
        view.crosshair.visible = True
    # The neurological convention puts the patient's right on the screen's right.
    layout.set_convention("neurological")
    qtbot.wait(200)
    x, _y = bright_centroid(layout.views["axial"].qt_viewer.screenshot(flash=False))
    assert x > 0.5 and layout.edge_letters("axial")["middle_right"] == "R"
    layout.set_convention("radiological")


def _canvas(layout, plane):
    return layout.views[plane].qt_viewer.canvas.native


def test_a_click_in_the_axial_view_moves_the_other_views_there(layout_on, qtbot, tmp_path):
    path, _world = marker_scan(tmp_path, "stored", VARIANTS["stored"])
    viewer, layout, _image = layout_on(path)
    canvas = _canvas(layout, "axial")
    target = QPoint(int(canvas.width() * 0.3), int(canvas.height() * 0.35))
    qtbot.mouseMove(canvas, target)
    qtbot.mousePress(canvas, Qt.MouseButton.LeftButton, pos=target)
    qtbot.mouseRelease(canvas, Qt.MouseButton.LeftButton, pos=target)
    qtbot.wait(100)
    clicked = np.asarray(viewer.cursor.position)[-3:]
    coronal = layout.views["coronal"].model.dims
    sagittal = layout.views["sagittal"].model.dims
    step = np.asarray([r.step for r in viewer.dims.range])[-3:]
    # The coronal view now shows the clicked P position, the sagittal view the clicked L position.
    assert abs(coronal.point[-2] - clicked[1]) <= step[1] and abs(sagittal.point[-1] - clicked[2]) <= step[2]
    assert abs(viewer.dims.point[-2] - clicked[1]) <= step[1]
    report = cursor_report(viewer, clicked)
    assert report.startswith("RAS (") and "voxel [" in report and f"{-clicked[2]:.1f}" in report


def test_a_right_drag_changes_window_and_level(layout_on, qtbot, tmp_path):
    path, _world = marker_scan(tmp_path, "stored", VARIANTS["stored"])
    viewer, layout, image = layout_on(path)
    before = tuple(image.contrast_limits)
    canvas = _canvas(layout, "coronal")
    start = QPoint(canvas.width() // 2, canvas.height() // 2)
    qtbot.mousePress(canvas, Qt.MouseButton.RightButton, pos=start)
    for k in range(1, 6):
        qtbot.mouseMove(canvas, QPoint(start.x() + 20 * k, start.y() - 8 * k))
        qtbot.wait(10)
    qtbot.mouseRelease(canvas, Qt.MouseButton.RightButton, pos=QPoint(start.x() + 100, start.y() - 40))
    after = tuple(image.contrast_limits)
    width_before, width_after = before[1] - before[0], after[1] - after[0]
    assert width_after > width_before and sum(after) / 2 > sum(before) / 2  # wider window, higher level
    assert "window" in layout.window_label.text()
    # Every view shows the same window.
    for view in layout._extra_views():
        copy = view.copies[id(image)]
        assert tuple(copy.contrast_limits) == pytest.approx(after)


def test_a_stroke_in_the_coronal_view_edits_the_voxels_it_covers(layout_on, qtbot, tmp_path):
    from napari_medseg.viewer._autosave import manager_of

    path, world = marker_scan(tmp_path, "stored", VARIANTS["stored"])
    viewer, layout, image = layout_on(path)
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="mask", affine=image.affine,
                               metadata=image.metadata)
    qtbot.wait(200)
    labels.mode = "paint"
    labels.brush_size = 3
    labels.selected_label = 2
    view = layout.views["coronal"]
    copy = view.copies[id(labels)]
    assert copy.mode == "paint" and copy.selected_label == 2  # the views share the tools
    view.model.layers.selection.active = copy
    layout.set_point(world)
    qtbot.wait(100)
    canvas = _canvas(layout, "coronal")
    points = [QPoint(int(canvas.width() * f), int(canvas.height() * 0.5)) for f in (0.47, 0.48, 0.49, 0.5, 0.51, 0.52, 0.53)]
    qtbot.mouseMove(canvas, points[0])
    qtbot.mousePress(canvas, Qt.MouseButton.LeftButton, pos=points[0])
    start_world = np.asarray(view.model.cursor.position)[-3:]
    for point in points[1:]:
        qtbot.mouseMove(canvas, point)
        qtbot.wait(10)
    end_world = np.asarray(view.model.cursor.position)[-3:]
    qtbot.mouseRelease(canvas, Qt.MouseButton.LeftButton, pos=points[-1])
    qtbot.wait(200)
    painted = np.argwhere(labels.data == 2)
    assert painted.size, "the stroke did not reach the labels layer"
    # Every painted voxel lies in the coronal slice shown; the stroke's ends are painted.
    coronal_index = int(np.round(labels.world_to_data(view.model.dims.point[-3:])[1]))
    assert set(painted[:, 1]) == {coronal_index}
    for end in (start_world, end_world):
        voxel = tuple(np.round(labels.world_to_data(end)).astype(int))
        assert np.all(np.array(voxel) >= 0) and np.all(np.array(voxel) < labels.data.shape)
        assert labels.data[voxel] == 2
    # One napari undo (in any view) takes the stroke back; the autosave saw it.
    tracked = manager_of(viewer).tracked_for(labels)
    qtbot.waitUntil(lambda: tracked.store.changes > 0, timeout=3000)
    copy.undo()
    assert not (labels.data == 2).any()


def test_reading_keys_page_slices_jump_and_cycle_window_presets(layout_on, qtbot, tmp_path):
    path, world = marker_scan(tmp_path, "stored", VARIANTS["stored"])
    viewer, layout, image = layout_on(path)
    layout.set_point(world)
    canvas = _canvas(layout, "coronal")
    canvas.setFocus()
    before = viewer.dims.current_step
    qtbot.keyClick(canvas, Qt.Key.Key_PageDown)
    after = viewer.dims.current_step
    assert after[1] == before[1] + 1 and after[0] == before[0]  # the coronal view's own axis
    limits = tuple(image.contrast_limits)
    qtbot.keyClick(canvas, Qt.Key.Key_W)
    assert tuple(image.contrast_limits) != limits and "window" in layout.window_label.text()
    layout.views["coronal"].model.camera.center = (0.0, 0.0, 0.0)
    qtbot.keyClick(canvas, Qt.Key.Key_J)
    centre = layout.views["coronal"].model.camera.center
    assert centre[-2:] == pytest.approx((layout.point()[0], layout.point()[2]))


def test_plane_setup_follows_the_conventions():
    assert plane_setup("axial")[2] == ("R", "L", "A", "P")
    assert plane_setup("axial", "neurological")[2] == ("L", "R", "A", "P")
    assert plane_setup("sagittal", "neurological")[2] == ("A", "P", "S", "I")
    assert plane_setup("coronal")[1] == ("up", "right")
