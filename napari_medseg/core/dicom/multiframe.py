"""Enhanced and legacy-converted multi-frame images, and segmentation objects (SEG), via highdicom.

Their geometry comes from the shared and per-frame functional groups, which highdicom
reads (``Image.get_volume``, ``Segmentation.get_volume``); no tag parsing of our own.
highdicom's volumes are indexed ``(frame, row, column)``; ours ``(column, row, frame)``.
"""

from __future__ import annotations

import numpy as np

from ..errors import NotAVolumeError, UnreadableScanError
from ..privacy import library_warnings_silenced, scrub

# highdicom index (frame, row, column) -> our file index (column, row, frame)
_REORDER = [2, 1, 0, 3]


def _volume_arrays(volume) -> tuple[np.ndarray, np.ndarray]:
    """``(data in file order, affine LPS for file order)`` from a highdicom Volume."""
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise NotAVolumeError(f"the object holds a {array.ndim}D array, not one volume")
    return array.transpose(2, 1, 0), np.asarray(volume.affine, float)[:, _REORDER]


def read_multiframe(path) -> tuple[np.ndarray, np.ndarray]:
    """``(data, affine_lps)`` of an enhanced or legacy-converted multi-frame image, rescaled."""
    import highdicom as hd

    try:
        with library_warnings_silenced():
            image = hd.imread(str(path))
            volume = image.get_volume(dtype=np.float32)
    except (ValueError, RuntimeError, AttributeError, KeyError) as exc:
        raise UnreadableScanError(f"the multi-frame image '{path.name}' could not be read as one volume "
                                  f"({scrub(str(exc).splitlines()[0])[:120]})") from None
    data, affine = _volume_arrays(volume)
    if np.allclose(data, np.round(data)) and -32768 <= data.min() and data.max() <= 32767:
        data = data.astype(np.int16)
    return data, affine


def read_segmentation(path) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(labels, affine_lps, {segment number: label})`` of a DICOM SEG, segments combined."""
    import highdicom as hd

    try:
        with library_warnings_silenced():
            seg = hd.seg.segread(str(path))
            names = {int(item.SegmentNumber): str(getattr(item, "SegmentLabel", f"segment {item.SegmentNumber}"))
                     for item in seg.SegmentSequence}
            volume = seg.get_volume(combine_segments=True, relabel=False, skip_overlap_checks=True,
                                    dtype=np.uint16)
    except (ValueError, RuntimeError, AttributeError, KeyError) as exc:
        raise UnreadableScanError(f"the segmentation '{path.name}' could not be read "
                                  f"({scrub(str(exc).splitlines()[0])[:120]})") from None
    labels, affine = _volume_arrays(volume)
    if labels.max() < 256:
        labels = labels.astype(np.uint8)
    return labels, affine, names


def onto_grid(labels: np.ndarray, affine_lps: np.ndarray, target_affine_lps: np.ndarray,
              target_shape: tuple) -> np.ndarray:
    """Labels on one grid resampled by nearest voxel onto another, through patient space."""
    from scipy import ndimage

    mapping = np.linalg.inv(affine_lps) @ target_affine_lps
    if np.allclose(mapping, np.eye(4), atol=1e-4) and labels.shape == tuple(target_shape):
        return labels
    return ndimage.affine_transform(labels, mapping[:3, :3], offset=mapping[:3, 3], output_shape=tuple(target_shape),
                                    order=0, mode="constant", cval=0, prefilter=False)
