"""Correction helpers radiologists expect from 3D Slicer's Segment Editor, on label arrays.

Each helper takes a label array (layer order) and returns a new one; the widget applies
the difference through napari's own ``Labels.data_setitem``, so napari's undo takes it
back in one step and the autosave sees it like a brush stroke. Distances are in
millimetres, through the voxel spacing, so anisotropic scans behave.
"""

from __future__ import annotations

import numpy as np

from .errors import MedsegError


def _structure(connectivity: int = 1):
    from scipy import ndimage

    return ndimage.generate_binary_structure(3, connectivity)


def fill_between_slices(labels: np.ndarray, value: int, axis: int, spacing: tuple = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Shape-based interpolation of ``value`` across the slices skipped between drawn ones.

    For every pair of consecutive slices along ``axis`` that hold the label, with empty
    slices between them, the signed distance maps of the two outlines (in mm, in-plane)
    are blended linearly across the gap; the label fills where the blend is inside. Only
    empty slices are filled; drawn slices are never changed.
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    out = labels.copy()
    moved = np.moveaxis(out, axis, 0)
    mask = np.moveaxis(labels == value, axis, 0)
    in_plane = tuple(s for a, s in enumerate(spacing) if a != axis)
    drawn = [k for k in range(mask.shape[0]) if mask[k].any()]

    def signed_distance(plane: np.ndarray) -> np.ndarray:
        inside = ndimage.distance_transform_edt(plane, sampling=in_plane)
        outside = ndimage.distance_transform_edt(~plane, sampling=in_plane)
        return outside - inside  # negative inside

    for below, above in zip(drawn, drawn[1:]):
        if above - below < 2:
            continue
        lower, upper = signed_distance(mask[below]), signed_distance(mask[above])
        for k in range(below + 1, above):
            weight = (k - below) / (above - below)
            blend = (1 - weight) * lower + weight * upper
            target = moved[k]
            target[(blend <= 0) & (target == 0)] = value
    return out


def remove_islands(labels: np.ndarray, value: int, min_mm3: float, spacing: tuple) -> np.ndarray:
    """Remove the connected parts of ``value`` smaller than ``min_mm3`` cubic millimetres."""
    from scipy import ndimage

    labels = np.asarray(labels)
    parts, count = ndimage.label(labels == value, structure=_structure(1))
    if count == 0:
        return labels.copy()
    voxel_mm3 = float(np.prod(spacing))
    sizes = np.bincount(parts.ravel()) * voxel_mm3
    small = sizes < min_mm3
    small[0] = False
    out = labels.copy()
    out[small[parts]] = 0
    return out


def keep_largest(labels: np.ndarray, value: int) -> np.ndarray:
    """Keep only the largest connected part of ``value``."""
    from scipy import ndimage

    labels = np.asarray(labels)
    parts, count = ndimage.label(labels == value, structure=_structure(1))
    out = labels.copy()
    if count > 1:
        sizes = np.bincount(parts.ravel())
        sizes[0] = 0
        out[(parts > 0) & (parts != sizes.argmax())] = 0
    return out


def fill_holes(labels: np.ndarray, value: int) -> np.ndarray:
    """Fill background enclosed by ``value`` (in 3D)."""
    from scipy import ndimage

    labels = np.asarray(labels)
    filled = ndimage.binary_fill_holes(labels == value)
    out = labels.copy()
    out[filled & (labels == 0)] = value
    return out


def grow_or_shrink(labels: np.ndarray, value: int, mm: float, spacing: tuple) -> np.ndarray:
    """Grow ``value`` by ``mm`` into background (``mm`` > 0) or shrink it by ``-mm``."""
    from scipy import ndimage

    labels = np.asarray(labels)
    out = labels.copy()
    mask = labels == value
    if mm > 0:
        distance = ndimage.distance_transform_edt(~mask, sampling=spacing)
        out[(distance <= mm) & (labels == 0)] = value
    elif mm < 0:
        distance = ndimage.distance_transform_edt(mask, sampling=spacing)
        out[mask & (distance <= -mm)] = 0
    return out


def edited_voxels(original: np.ndarray, corrected: np.ndarray) -> int:
    """How many voxels a correction changed."""
    original, corrected = np.asarray(original), np.asarray(corrected)
    if original.shape != corrected.shape:
        raise MedsegError(f"the correction has shape {corrected.shape}, the prediction {original.shape}")
    return int(np.count_nonzero(original != corrected))
