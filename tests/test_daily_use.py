"""Daily use in the viewer (#24): the app fits the screen, every control says what it is, and
the loop closes in the viewer (a fresh prediction, Grad-CAM's choices, a promoted version)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from napari_medseg.viewer._reader import read_scan
from napari_medseg.viewer._sample import sample_path
from test_review_widget import open_widget, wait_open, worklist_folder  # noqa: F401 - a fixture

REPO = Path(__file__).resolve().parents[1]
WIDGET_NAMES = ("Scan", "Segment", "Explain", "Correct", "Reading layout", "Recover edits", "Review")


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    return struct.unpack(">II", header[16:24])


@pytest.mark.slow
@pytest.mark.parametrize("screen, layout", [((1920, 1080), True), ((1366, 768), False), ((1366, 768), True)])
def test_the_app_window_fits_the_screen(tmp_path, screen, layout):
    """``python -m napari_medseg.app`` on its own virtual screen: the window it shows (its
    screenshot, frame included) is no larger than that screen."""
    if shutil.which("xvfb-run") is None:
        pytest.skip("needs xvfb-run")
    out = tmp_path / "window.png"
    width, height = screen
    env = {**os.environ, "NAPARI_MEDSEG_HOME": str(tmp_path / "home")}
    command = ["xvfb-run", "-a", "-s", f"-screen 0 {width}x{height}x24", sys.executable, "-m", "napari_medseg.app",
               "--screenshot", str(out)] + (["--layout"] if layout else [])
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    shown = png_size(out)
    assert shown[0] <= width and shown[1] <= height, f"window {shown} on a {screen} screen"
    assert shown[0] >= 0.8 * width and shown[1] >= 0.8 * height  # and it uses the screen


def _inside_napari_canvas(control, root) -> bool:
    """The reading layout's side views are napari viewers with napari's own sliders."""
    owner = control
    while owner is not None and owner is not root:
        if type(owner).__name__ == "QtViewer":
            return True
        owner = owner.parent()
    return False


def _docked(viewer):
    widgets = {}
    for name in WIDGET_NAMES:
        _dock, widgets[name] = viewer.window.add_plugin_dock_widget("napari-medseg", name, tabify=True)
    return widgets


def test_every_value_control_in_every_dock_has_a_label_and_a_tooltip(make_napari_viewer, monkeypatch, tmp_path):
    from qtpy.QtWidgets import (QAbstractSlider, QAbstractSpinBox, QCheckBox, QComboBox, QLineEdit, QScrollBar,
                                QTableWidget)

    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    viewer = make_napari_viewer()
    missing = []
    for name, widget in _docked(viewer).items():
        root = getattr(widget, "native", widget)
        for control in root.findChildren((QAbstractSpinBox, QLineEdit, QComboBox, QAbstractSlider, QCheckBox)):
            if isinstance(control, QLineEdit) and isinstance(control.parent(), (QAbstractSpinBox, QComboBox)) \
                    or isinstance(control, QScrollBar) or _inside_napari_canvas(control, root):
                continue  # an editor inside a spin box or drop-down, a scroll bar, napari's own view controls
            owner, tip = control, ""
            while owner is not None and owner is not root and not tip:
                parent = owner.parent()
                if isinstance(parent, QTableWidget):
                    break
                tip, owner = owner.toolTip(), parent
            if not tip:
                text = getattr(control, "text", lambda: "")() if isinstance(control, QCheckBox) else ""
                missing.append(f"{name}: {type(control).__name__} {text or control.objectName()!r}")
    assert missing == []
    # magicgui's labels: every value widget of the plugin's containers has one (or is a check box's text)
    from magicgui.widgets import CheckBox, Container, PushButton, Table
    from magicgui.widgets.bases import ValueWidget

    unlabelled = []
    for name, widget in _docked(viewer).items():
        if not isinstance(widget, Container):
            continue
        stack = [widget]
        while stack:
            container = stack.pop()
            for child in container:
                if isinstance(child, Container):
                    stack.append(child)
                elif isinstance(child, ValueWidget) and not isinstance(child, (PushButton, CheckBox, Table)) \
                        and type(child).__name__ not in ("Label",) and not child.label:
                    unlabelled.append(f"{name}: {type(child).__name__}")
    assert unlabelled == []


def test_explain_lists_the_cards_classes_and_the_networks_layers_for_gradcam(make_napari_viewer, monkeypatch,
                                                                             tmp_path):
    from napari_medseg.viewer._widgets.explain import ExplainWidget

    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    viewer = make_napari_viewer()
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Explain")
    widget._model.value = next(value for value in widget._model.choices if "brain-t1.safetensors" in str(value))
    widget._method.value = "gradcam"
    # Opening a scan adds a layer: napari then resets every choice of the docked widget.
    for data, kwargs, kind in read_scan(str(sample_path())):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    assert [widget._target.native.itemText(i) for i in range(widget._target.native.count())] == ["brain"]
    assert widget._target.value == 1
    layers = list(widget._layer.choices)
    assert len(layers) > 5 and widget._layer.value == layers[0]
    from napari_medseg.core.explain import default_layer
    from napari_medseg.core.models import load_model

    model = load_model(widget._model.value)
    assert widget._layer.value == default_layer(model.network, model.card.network.architecture)


def test_correct_knows_the_prediction_right_after_run(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    from napari_medseg.viewer._widgets.correct import CorrectWidget
    from napari_medseg.viewer._widgets.segment import SegmentWidget

    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    viewer = make_napari_viewer()
    for data, kwargs, kind in read_scan(str(sample_path())):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    segment, correct = SegmentWidget(viewer), CorrectWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment")
    viewer.window.add_dock_widget(correct, name="Correct", tabify=True)
    task = segment.run()
    qtbot.waitUntil(lambda: not task.running, timeout=120000)
    assert task.error is None
    assert correct._correction.value is segment.last_layer
    assert correct._stats.value.startswith("edited voxels: 0;"), correct._stats.value


def test_a_promoted_version_is_offered_and_selected_by_segment_and_explain(make_napari_viewer, monkeypatch,
                                                                           tmp_path, sphere_model):
    from test_finetune import workspace_with

    from napari_medseg.core.finetune import fine_tune
    from napari_medseg.viewer._widgets.explain import ExplainWidget
    from napari_medseg.viewer._widgets.segment import SegmentWidget
    from napari_medseg.viewer._workspace import default_workspace_folder, models_changed

    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    viewer = make_napari_viewer()
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment")
    assert "brain-t1" in segment._model.current_choice  # no workspace model yet: the default model
    default_workspace_folder().parent.mkdir(parents=True, exist_ok=True)
    workspace = workspace_with(default_workspace_folder(), sphere_model)
    result = fine_tune(workspace, steps=40, device="cpu", learning_rate=3e-3, batch_size=2, patch_size=(16, 16, 16))
    assert result.promoted and result.version == "v2", result.reason
    promoted = str(workspace.registry.resolve(f"{workspace.model_name}@v2"))
    workspace.close()
    models_changed(viewer)  # what the Correct dock says when its fine-tuning process ends
    assert promoted in segment._model.choices
    assert segment._model.value == promoted and "v2" in segment._model.current_choice
    explain = ExplainWidget(viewer)  # a dock opened later selects it too
    viewer.window.add_dock_widget(explain, name="Explain")
    assert explain._model.value == promoted


def test_save_mask_in_the_scan_dock_refuses_the_scan_it_was_read_from(make_napari_viewer, qtbot, monkeypatch,
                                                                      tmp_path):
    from napari.utils.notifications import notification_manager

    from napari_medseg.viewer._widgets.scan import ScanWidget

    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    source = tmp_path / "head.nii.gz"
    shutil.copyfile(sample_path(), source)
    before = source.read_bytes()
    viewer = make_napari_viewer()
    for data, kwargs, kind in read_scan(str(source)):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = ScanWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Scan")
    widget.new_mask()
    shown = []
    notification_manager.notification_ready.connect(lambda n: shown.append(str(n.message)))
    task = widget.save_mask(str(source))
    qtbot.waitUntil(lambda: not task.running, timeout=30000)
    assert task.error is not None and source.read_bytes() == before
    assert any("refusing to write" in text and "head.nii.gz" in text for text in shown), shown
    good = tmp_path / "mask.nii.gz"
    task = widget.save_mask(str(good))
    qtbot.waitUntil(lambda: not task.running, timeout=30000)
    assert task.error is None and good.is_file()


def test_review_submits_off_the_gui_thread(make_napari_viewer, qtbot, worklist_folder, monkeypatch):
    import threading

    import napari_medseg.core.workspace as workspace_module

    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, worklist_folder)
    assert widget.step(+1)
    wait_open(qtbot, widget, widget.cases[0].name)
    on_gui_thread = []
    store = workspace_module.Workspace.submit

    def recording(self, *args, **kwargs):  # the real store, noting which thread calls it
        on_gui_thread.append(threading.current_thread() is threading.main_thread())
        return store(self, *args, **kwargs)

    monkeypatch.setattr(workspace_module.Workspace, "submit", recording)
    widget.layers["labels"].paint((5, 5, 5), 1, refresh=True)
    assert widget.submit()
    qtbot.waitUntil(lambda: bool(on_gui_thread) and (widget.task is None or not widget.task.running), timeout=60000)
    assert on_gui_thread == [False]


def test_the_app_has_napari_open_scans_and_folders_with_our_reader_unless_the_user_chose(
        make_napari_viewer, nifti_factory, tmp_path, monkeypatch):
    import numpy as np
    from napari.settings import get_settings

    from conftest import random_volume, write_dicom_series
    from napari_medseg.app import PLUGIN
    from napari_medseg.viewer._layers import medseg_meta
    from napari_medseg.viewer._window import prefer_our_reader

    settings = get_settings().plugins
    monkeypatch.setattr(settings, "extension2reader", {"*.nrrd": "napari"})
    viewer = make_napari_viewer()
    nifti = nifti_factory("head.nii.gz")
    # plugin=None: what napari's File > Open does (viewer.open's default is napari's own reader).
    with pytest.raises(Exception, match="Multiple plugins"):  # napari's own reader claims .nii.gz too
        viewer.open(str(nifti), plugin=None)
    added = prefer_our_reader(PLUGIN)
    assert "*.nii.gz" in added and "*/" in added and "*.nrrd" not in added
    assert settings.extension2reader["*.nrrd"] == "napari"  # the user's own choice stays
    [image] = viewer.open(str(nifti), plugin=None)
    assert medseg_meta(image).get("geometry")
    study = write_dicom_series(tmp_path / "study", random_volume((6, 16, 16)), (0, 0, 0), (1, 1, 1), np.eye(3))
    [series] = viewer.open(str(study), plugin=None)
    assert 6 in series.data.shape
    assert prefer_our_reader(PLUGIN) == []  # nothing twice
