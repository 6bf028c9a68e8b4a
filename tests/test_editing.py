"""Correction helpers on known shapes, with real (anisotropic) voxel sizes."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.core import editing


def ball(shape, centre, radius_mm, spacing):
    grid = np.indices(shape).astype(float)
    distance = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)))
    return distance <= radius_mm


def test_fill_between_slices_interpolates_the_shape_across_the_gap():
    spacing = (3.0, 1.0, 1.0)
    labels = np.zeros((21, 60, 60), np.uint8)
    grid = np.indices((60, 60))
    for k, radius in ((4, 10.0), (16, 20.0)):
        labels[k][np.hypot(grid[0] - 30, grid[1] - 30) <= radius] = 1
    filled = editing.fill_between_slices(labels, 1, axis=0, spacing=spacing)
    radii = [np.sqrt(filled[k].sum() / np.pi) for k in range(4, 17)]
    assert np.all(np.diff(radii) >= 0) and radii[-1] - radii[0] > 9  # grows from one outline to the other
    assert radii[6] == pytest.approx(15.0, abs=1.0)      # halfway: halfway between the radii
    np.testing.assert_array_equal(filled[4], labels[4])  # drawn slices are never changed
    assert filled[:4].sum() == 0 and filled[17:].sum() == 0
    other_axis = editing.fill_between_slices(labels, 1, axis=1, spacing=spacing)
    np.testing.assert_array_equal(other_axis, labels)  # nothing to fill along a drawn axis


def test_remove_islands_by_volume_in_cubic_millimetres():
    spacing = (2.0, 1.0, 1.0)
    labels = np.zeros((30, 40, 40), np.uint8)
    labels[ball(labels.shape, (15, 20, 20), 8.0, spacing)] = 1
    labels[2:4, 2:5, 2:5] = 1       # 18 voxels = 36 mm3
    labels[25:28, 30:35, 30:35] = 1  # 75 voxels = 150 mm3
    cleaned = editing.remove_islands(labels, 1, min_mm3=100.0, spacing=spacing)
    assert cleaned[2:4, 2:5, 2:5].sum() == 0 and cleaned[25:28, 30:35, 30:35].all()
    assert editing.keep_largest(labels, 1).sum() == int(ball(labels.shape, (15, 20, 20), 8.0, spacing).sum())


def test_fill_holes_fills_a_hollow_shell():
    spacing = (1.0, 1.0, 1.0)
    outer, inner = ball((40, 40, 40), (20, 20, 20), 15, spacing), ball((40, 40, 40), (20, 20, 20), 10, spacing)
    labels = (outer & ~inner).astype(np.uint8)
    filled = editing.fill_holes(labels, 1)
    np.testing.assert_array_equal(filled == 1, outer)


def test_grow_and_shrink_by_millimetres_on_an_anisotropic_grid():
    spacing = (2.5, 0.8, 0.8)
    shape = (30, 90, 90)
    labels = ball(shape, (15, 45, 45), 12.0, spacing).astype(np.uint8)
    grown = editing.grow_or_shrink(labels, 1, 4.0, spacing)
    shrunk = editing.grow_or_shrink(labels, 1, -4.0, spacing)
    volume = lambda m: m.sum() * np.prod(spacing)  # noqa: E731
    assert volume(grown == 1) == pytest.approx(4 / 3 * np.pi * 16 ** 3, rel=0.08)
    assert volume(shrunk == 1) == pytest.approx(4 / 3 * np.pi * 8 ** 3, rel=0.12)


def test_helpers_leave_other_labels_alone():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[5:15, 5:15, 5:15] = 1
    labels[0:3, 0:3, 0:3] = 2
    for result in (editing.grow_or_shrink(labels, 1, 3.0, (1, 1, 1)), editing.fill_holes(labels, 1),
                   editing.remove_islands(labels, 1, 10.0, (1, 1, 1))):
        np.testing.assert_array_equal(result == 2, labels == 2)
    assert editing.edited_voxels(labels, editing.grow_or_shrink(labels, 1, 1.0, (1, 1, 1))) > 0
