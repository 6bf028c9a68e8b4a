"""Statistics of huge volumes from strided subsamples, and what the intensities say.

A strided subsample keeps every ``step``-th voxel along each axis: a small copy whose
percentiles match the volume's closely, read in one pass without a random gather.
"""

from __future__ import annotations

import math

import numpy as np


def subsample_step(shape: tuple, max_voxels: int) -> int:
    """The stride along every axis that leaves at most about ``max_voxels`` voxels."""
    return max(1, int(math.ceil((float(np.prod(shape)) / max_voxels) ** (1 / len(shape)))))


def strided_sample(array, max_voxels: int = 1_000_000, dtype=None) -> np.ndarray:
    """Every ``subsample_step``-th voxel of ``array`` along each axis, as a small array."""
    step = subsample_step(np.shape(array), max_voxels)
    return np.asarray(array[(slice(None, None, step),) * np.ndim(array)], dtype=dtype)


def looks_like_ct(array) -> bool:
    """Air at about -1000 HU is the signature of CT; MR intensities are not negative."""
    low, high = np.percentile(strided_sample(array), [0.5, 99.5])
    return bool(low < -500 and high > 0)
