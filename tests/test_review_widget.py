"""The Review widget on a real napari viewer under Xvfb: next, previous, accept, submit, skip, resume."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import answer_question, write_sphere_scans
from napari_medseg.viewer._widgets.review import ReviewWidget
from napari_medseg.core.worklist import Worklist, run_worklist
from napari_medseg.core.workspace import Workspace


@pytest.fixture
def worklist_folder(tmp_path, sphere_model):
    """A workspace with the sphere model and four cases: three predicted, one still new."""
    scans = write_sphere_scans(tmp_path / "scans", 4)
    workspace = Workspace(tmp_path / "ws")
    workspace.ensure_model(str(sphere_model))
    worklist = Worklist(workspace)
    worklist.add([scans])
    run_worklist(workspace, workspace.load_model(), limit=3)
    assert len(worklist.cases(status="new")) == 1
    workspace.close()
    return tmp_path / "ws"


def statuses(folder) -> dict:
    workspace = Workspace(folder)
    try:
        return {case.name: case.status for case in Worklist(workspace).cases()}
    finally:
        workspace.close()


def open_widget(viewer, qtbot, folder) -> ReviewWidget:
    widget = ReviewWidget(viewer)
    widget.dock = viewer.window.add_dock_widget(widget, name="Review")
    widget._workspace.value = str(folder)
    qtbot.waitUntil(lambda: widget.task is None or not widget.task.running, timeout=30000)
    return widget


def wait_open(qtbot, widget, name: str) -> None:
    qtbot.waitUntil(lambda: widget.current is not None and widget.current.case.name == name
                    and (widget.task is None or not widget.task.running), timeout=60000)


def test_review_next_previous_accept_submit_skip_and_resume(make_napari_viewer, qtbot, worklist_folder):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, worklist_folder)
    order = [case.name for case in widget.cases]
    assert len(order) == 4 and widget.current is None
    # Most doubtful first: the scored cases by falling score, the new one last.
    scores = [case.score for case in widget.cases if case.score is not None]
    assert scores == sorted(scores, reverse=True) and widget.cases[-1].status == "new"

    assert widget.step(+1)
    wait_open(qtbot, widget, order[0])
    names = {layer.name for layer in viewer.layers}
    assert {order[0], f"{order[0]} uncertainty"} <= names
    labels = widget.layers["labels"]
    workspace = Workspace(worklist_folder)
    stored = Worklist(workspace).load_result(widget.current.case)
    workspace.close()
    assert np.array_equal(labels.data, stored["labels"]) and labels.data.max() == 1
    assert statuses(worklist_folder)[order[0]] == "in review"

    # The next case was read ahead: it opens at once, without a background task.
    assert widget.wait_for_prefetch(30)
    assert widget.step(+1) and widget.current.case.name == order[1]
    assert widget.step(-1)
    wait_open(qtbot, widget, order[0])

    # Accept moves on; a corrected mask goes to the queue; Skip needs a reason.
    assert widget.accept()
    wait_open(qtbot, widget, order[1])
    labels = widget.layers["labels"]
    labels.paint((5, 5, 5), 1, refresh=True)
    edited = np.asarray(labels.data).copy()
    assert widget.submit()
    wait_open(qtbot, widget, order[2])
    assert not widget.skip("")
    assert widget.skip("motion artefacts")
    wait_open(qtbot, widget, order[3])  # the new case, predicted when it was read ahead or opened
    now = statuses(worklist_folder)
    assert (now[order[0]], now[order[1]], now[order[2]], now[order[3]]) == (
        "accepted", "corrected", "skipped", "in review")
    workspace = Workspace(worklist_folder)
    items = workspace.items()
    case = next(c for c in Worklist(workspace).cases() if c.name == order[1])
    assert len(items) == 1 and case.item == items[0].id and items[0].origin == f"worklist:{case.id}"
    assert np.array_equal(workspace.load_item(items[0])["label"], edited)
    assert next(c for c in Worklist(workspace).cases() if c.name == order[2]).reason == "motion artefacts"
    workspace.close()

    # Unsaved edits: moving away asks first; Cancel stays, Discard moves.
    widget.layers["labels"].paint((6, 6, 6), 1, refresh=True)
    asked = answer_question(qtbot, "Cancel")
    assert not widget.step(-1)
    assert asked and widget.current.case.name == order[3]
    asked = answer_question(qtbot, "Discard")
    assert widget.step(-1)
    wait_open(qtbot, widget, order[2])
    assert asked

    # Closed and reopened: the widget opens the case where the reviewer stopped.
    viewer.window.remove_dock_widget(widget.dock)
    widget.close()
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    again = open_widget(viewer, qtbot, worklist_folder)
    wait_open(qtbot, again, order[2])
    assert {order[2], f"{order[2]} uncertainty"} <= {layer.name for layer in viewer.layers}


def test_review_buttons_without_a_case_say_so(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, tmp_path / "empty")
    assert widget.cases == [] and "no cases" in widget._status.value
    assert not widget.accept() and not widget.skip("x") and not widget.submit() and not widget.step(+1)
