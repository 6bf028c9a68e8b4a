"""Correction by prompts (core.prompts and ``napari-medseg refine``), on real files."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import oblique_sphere_scan, write_nifti
from napari_medseg.core.errors import MedsegError
from napari_medseg.core.io import read_volume
from napari_medseg.core.prompts import Point, PromptSession, read_prompts, refine


def dice(a, b) -> float:
    return 2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "napari_medseg.cli", *map(str, args)], capture_output=True,
                          text=True)


@pytest.fixture
def oblique_sphere(tmp_path):
    return oblique_sphere_scan(tmp_path)


def test_a_click_inside_a_sphere_gives_the_sphere_on_an_oblique_anisotropic_grid(oblique_sphere, tmp_path):
    path, truth, centre, affine = oblique_sphere
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"points": [{"ras": centre.tolist(), "positive": True}]}))
    out = tmp_path / "out.nii.gz"
    result = _cli("refine", path, "--prompts", prompts, "-o", out, "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    written = nib.load(str(out))
    np.testing.assert_allclose(written.affine, affine, atol=1e-4)   # back on the input's grid
    mask = np.asarray(written.dataobj) == 1
    assert report["voxels_changed"] == np.count_nonzero(mask)
    assert dice(mask, truth) >= 0.95, dice(mask, truth)


def test_refine_matches_the_api_given_the_same_prompts(oblique_sphere, tmp_path):
    path, truth, centre, affine = oblique_sphere
    off = affine[:3, :3] @ np.array([50.0, 22.0, 15.0]) + affine[:3, 3]  # background, 21 mm from the centre
    points = [{"ras": centre.tolist(), "positive": True}, {"ras": (centre + [6, 0, 0]).tolist(), "positive": True},
              {"ras": off.tolist(), "positive": False}]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"points": points}))
    out = tmp_path / "out.nii.gz"
    assert _cli("refine", path, "--prompts", prompts, "-o", out, "--label", "3", "--quiet").returncode == 0
    volume = read_volume(path)
    parsed = read_prompts(prompts, volume.geometry)
    session = PromptSession(volume.layer_data(), volume.geometry.layer_spacing, label=3)
    for point in parsed.points:
        session.add_point(point.index, point.positive)
    cli_mask = volume.geometry.to_layer(np.asarray(nib.load(str(out)).dataobj))
    np.testing.assert_array_equal(cli_mask, session.labels)
    assert np.count_nonzero(session.labels == 3) > 1000


def _leaky_case():
    """A bright 12 mm ball with a mask that leaks into a dark slab beside it."""
    shape = (40, 60, 60)
    spacing = (2.0, 0.9, 0.9)
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    centre = np.array([40.0, 27.0, 27.0])
    ball = sum((g - c) ** 2 for g, c in zip(grid, centre)) < 12.0 ** 2
    rng = np.random.default_rng(5)
    image = np.where(ball, 200.0, 50.0) + rng.normal(0, 10, shape)
    leak = np.zeros(shape, bool)
    leak[17:21, 30:42, 36:50] = True   # a slab of background (8 x 11 x 13 mm) next to the ball
    return image, spacing, ball, leak


def test_a_negative_click_removes_a_leak():
    image, spacing, ball, leak = _leaky_case()
    mask = (ball | leak).astype(np.uint16)
    before = dice(mask == 1, ball)
    session = PromptSession(image, spacing, mask=mask)
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(leak & ~ball, sampling=spacing)
    target = np.unravel_index(np.argmax(depth), depth.shape)  # as the simulated user clicks
    update = session.add_point(target, positive=False)
    after = dice(session.labels == 1, ball)
    left = np.count_nonzero((session.labels == 1) & leak & ~ball) / np.count_nonzero(leak & ~ball)
    assert after >= 0.97 and after > before and left < 0.1, (before, after, left)
    assert update.changed_voxels > 0
    # Undo takes back exactly that click.
    assert session.undo()
    np.testing.assert_array_equal(session.labels, mask)
    assert not session.undo()


def test_voxels_outside_the_region_and_other_labels_never_change():
    image, spacing, ball, leak = _leaky_case()
    mask = np.zeros(image.shape, np.uint16)
    mask[leak & ~ball] = 2                 # another, finished label right beside the ball
    far = np.zeros(image.shape, bool)
    far[:, :, :6] = True
    mask[far] = 1                          # the refined label, far away from the click
    session = PromptSession(image, spacing, mask=mask, label=1)
    update = session.add_point(np.argwhere(ball).mean(0), positive=True)
    labels = session.labels
    np.testing.assert_array_equal(labels == 2, mask == 2)            # the barrier held
    outside = np.ones(image.shape, bool)
    outside[update.region] = False
    np.testing.assert_array_equal(labels[outside], mask[outside])    # nothing beyond the region
    np.testing.assert_array_equal(labels[far], mask[far])            # nor the part the click does not touch
    assert dice((labels == 1) & ~far, ball) >= 0.95
    # Unless asked: other labels may be taken (the CLI's --force).
    free = PromptSession(image, spacing, mask=mask, label=1, other_labels_fixed=False)
    free.add_point(np.argwhere(leak & ~ball).mean(0).round(), positive=True)
    assert np.count_nonzero((free.labels == 1) & (mask == 2)) > 0


def test_the_region_grows_with_the_error():
    image, spacing, ball, _leak = _leaky_case()
    session = PromptSession(image, spacing, start_half_mm=4.0)
    update = session.add_point(np.argwhere(ball).mean(0), positive=True)
    assert update.grew >= 1
    assert dice(session.labels == 1, ball) >= 0.95


def test_strokes_and_a_box_each_decide_the_label():
    image, spacing, ball, _leak = _leaky_case()
    strokes = np.zeros(image.shape, np.int8)
    middle = int(np.argwhere(ball)[:, 0].mean())
    strokes[middle][ball[middle]] = 1
    strokes[middle, 2:4, 2:50] = 2
    labels, updates = refine(image, spacing, [], strokes=strokes)
    assert len(updates) == 1 and dice(labels == 1, ball) >= 0.95
    found = np.argwhere(ball)
    labels, _ = refine(image, spacing, [], box=(found.min(0) - 1, found.max(0) + 1))
    assert dice(labels == 1, ball) >= 0.95


def test_a_large_region_is_decided_coarse_then_fine():
    shape = (96, 96, 96)
    grid = np.ogrid[:96, :96, :96]
    ball = sum((g - 48) ** 2 for g in grid) < 30 ** 2
    image = np.where(ball, 90.0, 30.0) + np.random.default_rng(1).normal(0, 6, shape)
    session = PromptSession(image, (1.0, 1.0, 1.0), start_half_mm=64.0)
    session.add_point((48, 48, 48))
    assert dice(session.labels == 1, ball) >= 0.98


@pytest.mark.parametrize("case, message", [
    ({"points": [{"ras": [900.0, 0.0, 0.0], "positive": True}]}, "lies outside the scan"),
    ({"points": []}, "hold no points"),
    ({}, "hold no points"),
    ({"points": [{"ras": [1, 2], "positive": True}]}, "needs three numbers"),
])
def test_bad_prompts_get_one_line(oblique_sphere, tmp_path, case, message):
    path, *_ = oblique_sphere
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(case))
    result = _cli("refine", path, "--prompts", prompts, "-o", tmp_path / "out.nii.gz")
    assert result.returncode != 0
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out.nii.gz").exists()


def test_a_mask_or_strokes_on_another_grid_get_one_line(oblique_sphere, tmp_path):
    path, truth, centre, affine = oblique_sphere
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"points": [{"ras": centre.tolist()}]}))
    wrong = write_nifti(tmp_path / "wrong.nii.gz", np.zeros((10, 10, 10), np.uint8), affine)
    result = _cli("refine", path, "--prompts", prompts, "--mask", wrong, "-o", tmp_path / "out.nii.gz")
    assert result.returncode != 0 and "has shape (10, 10, 10)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    prompts.write_text(json.dumps({"points": [{"ras": centre.tolist()}], "scribbles": "wrong.nii.gz"}))
    result = _cli("refine", path, "--prompts", prompts, "-o", tmp_path / "out.nii.gz")
    assert result.returncode != 0 and "scribbles 'wrong.nii.gz' have shape" in result.stderr
    with pytest.raises(MedsegError, match="outside the scan"):
        PromptSession(np.zeros((8, 8, 8)), (1, 1, 1)).add_point((8, 0, 0))
    assert Point((1, 2, 3)).positive
