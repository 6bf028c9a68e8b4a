"""One pipeline for every model: the network's input does not depend on the field of view,
its statistics come from the region of interest, and maps come back onto the scan's grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_medseg.viewer._sample import sample_path
from napari_medseg.core.io import read_volume
from napari_medseg.core.models import ModelRegistry
from napari_medseg.core.pipeline import labels_to_scan, prepare, to_scan


@pytest.fixture(scope="module")
def registry():
    return ModelRegistry(home="/nonexistent-medseg-home")


@pytest.fixture(scope="module")
def head():
    volume = read_volume(sample_path())
    return np.asarray(volume.layer_data(), dtype=np.float32), volume.geometry.layer_affine_ras


def padded(image, affine, mm=60.0):
    pad = [int(round(mm / s)) for s in np.linalg.norm(affine[:3, :3], axis=0)]
    out = np.pad(image, [(p, p) for p in pad], constant_values=float(image.min()))
    shifted = affine.copy()
    shifted[:3, 3] -= affine[:3, :3] @ pad
    return out, shifted


@pytest.mark.parametrize("name", ["brain-t1", "brain-t1-attention"])
def test_the_network_input_is_the_same_with_60_mm_of_air_around_the_head(registry, head, name):
    model = registry.load(name)
    image, affine = head
    plain = prepare(image, affine, model.card, model.roi_network)
    wide = prepare(*padded(image, affine), model.card, model.roi_network)
    assert plain.tensor.shape == wide.tensor.shape
    assert float((plain.tensor - wide.tensor).abs().max()) <= 1e-3
    for key in ("low", "high"):
        assert plain.info["statistics"][key] == pytest.approx(wide.info["statistics"][key], abs=1e-3)


def test_the_network_input_is_the_same_for_a_permuted_and_flipped_file(registry, tmp_path):
    model = registry.load("brain-t1")
    source = nib.load(sample_path())
    data = np.asarray(source.dataobj)
    permuted = np.flip(np.transpose(data, (2, 0, 1)), 0).copy()
    affine = source.affine[:, [2, 0, 1, 3]].copy()
    affine[:, 0] *= -1
    affine[:3, 3] = source.affine[:3, 3] + source.affine[:3, 2] * (data.shape[2] - 1)
    nib.save(nib.Nifti1Image(permuted, affine), tmp_path / "permuted.nii.gz")
    a = read_volume(sample_path())
    b = read_volume(tmp_path / "permuted.nii.gz")
    pa = prepare(a.layer_data(), a.geometry.layer_affine_ras, model.card, model.roi_network)
    pb = prepare(b.layer_data(), b.geometry.layer_affine_ras, model.card, model.roi_network)
    assert float((pa.tensor - pb.tensor).abs().max()) <= 1e-3


def test_statistics_come_from_the_region_not_the_field_of_view(registry, head):
    """A bright object far from the head changes whole-FOV statistics, not the region's."""
    model = registry.load("brain-t1")
    image, affine = head
    wide, wide_affine = padded(image, affine)
    with_object = wide.copy()
    with_object[:15, :42, :42] = 20 * float(image.max())  # a bright block in the air, 30 mm from the head
    region = prepare(with_object, wide_affine, model.card, model.roi_network)
    clean = prepare(wide, wide_affine, model.card, model.roi_network)
    assert region.info["statistics"]["high"] == pytest.approx(clean.info["statistics"]["high"], rel=1e-3)
    exact = model.card.replace(pipeline={**model.card.pipeline.to_dict(), "normalisation": {
        **model.card.pipeline.normalisation.to_dict(), "statistics": "field_of_view"}})
    fov = prepare(with_object, wide_affine, exact, model.roi_network)
    assert fov.info["statistics"]["high"] > 2 * region.info["statistics"]["high"]
    box = region.info["region"]
    assert all(start > 0 for start, _stop in box)  # the air margin is outside the region


def test_maps_come_back_onto_the_scan_grid(registry, head):
    model = registry.load("brain-t1-attention")
    image, affine = head
    prepared = prepare(image, affine, model.card)
    # A smooth map on the network grid: its first axis, scaled to [0, 1].
    d = prepared.model_shape[0]
    ramp = torch.linspace(0, 1, d).view(d, 1, 1).expand(*prepared.model_shape).clone()
    back = to_scan(ramp, prepared)
    assert back.shape == image.shape and back.dtype == np.float32
    box = tuple(slice(max(0, s.start), min(n, s.stop)) for s, n in zip(prepared.region, image.shape))
    assert any(s.start < 0 for s in prepared.region)  # the head touches the edge: the region reaches past it
    inside = back[box]
    assert np.all(np.diff(inside[:, inside.shape[1] // 2, inside.shape[2] // 2]) >= -1e-6)  # still a ramp
    wide, wide_affine = padded(image, affine)
    wide_prepared = prepare(wide, wide_affine, model.card)
    wide_back = to_scan(ramp, wide_prepared)
    outside = np.ones(wide.shape, bool)
    outside[wide_prepared.region] = False
    assert outside.any() and np.all(wide_back[outside] == 0)  # outside the region: the background value
    probabilities = torch.stack([1 - ramp, ramp])
    labels = labels_to_scan(probabilities, prepared)
    assert labels.shape == image.shape and set(np.unique(labels)) <= {0, 1}
    np.testing.assert_array_equal(labels[box] == 1, inside > 0.5)


@pytest.mark.parametrize("order", ["SPL", "RAS", "SAR", "PSL", "ILA"])
def test_any_axis_order_is_a_view_that_comes_back_and_crops_the_same(order):
    """An axis order names the direction of each working axis (nnU-Net's transposes give PSL
    and the like; TotalSegmentator's canonical images are SAR): the working view, its inverse,
    and a crop read as one block of the layer array all agree."""
    from napari_medseg.core.pipeline import crop, crop_working, from_working, spacing_to_working, to_working

    layer = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    working = to_working(layer, order)
    assert np.array_equal(from_working(working, order), layer)
    assert np.array_equal(from_working(to_working(torch.from_numpy(layer), order), order).numpy(), layer)
    letters = {"S": 0, "I": 0, "P": 1, "A": 1, "L": 2, "R": 2}
    assert working.shape == tuple(layer.shape[letters[c]] for c in order)
    assert spacing_to_working((1.0, 2.0, 3.0), order) == tuple(float(letters[c] + 1) for c in order)
    region = (slice(1, 4), slice(-1, 3), slice(2, 9))
    assert np.array_equal(crop_working(layer, region, order, -5.0), crop(np.ascontiguousarray(working), region, -5.0))


def test_spline_grids_come_back_in_slabs_when_only_the_plane_was_resampled():
    """A 'spline' grid (an imported nnU-Net model) whose separate axis keeps its slices: the
    slab-wise way back (our windows, no nnU-Net rounding) fits every slab, on a scan deeper than
    one slab, and agrees with nnU-Net's whole-volume way back. A whole lung CT crashed here."""
    from conftest import make_card

    card = make_card(grid={"kind": "spacing", "spacing": [5.0, 2.0, 2.0], "interpolation": "spline",
                           "order": 3, "order_z": 0, "back_order": 1, "back_order_z": 0},
                     roi={"kind": "none"})
    layer = np.random.default_rng(1).normal(size=(40, 30, 30)).astype(np.float32)
    affine = np.array([[0, 0, -1.0, 0], [0, -1.0, 0, 0], [5.0, 0, 0, 0], [0, 0, 0, 1]])
    prepared = prepare(layer, affine, card)
    assert prepared.back_axis == 0 and prepared.model_shape == (40, 15, 15)
    z = torch.linspace(-1, 1, 40).view(40, 1, 1).expand(40, 15, 15)
    scores = torch.stack([torch.zeros_like(z), z])
    fast = labels_to_scan(scores, prepared, slab=16)
    exact = labels_to_scan(scores, prepared, dtype=torch.float32)
    assert fast.shape == exact.shape == layer.shape
    assert (fast == exact).mean() > 0.99 and set(np.unique(fast)) == {0, 1}
