"""Bring a scan onto a model's grid and intensity scale, and predictions back.

The model sees voxels in napari layer order (axes S, P, L; see
:mod:`napari_medseg.core.geometry`), so reorientation is the same view the viewer
uses: transposes and flips, never a resample. Only the voxel size is resampled, to
the model's ``target_spacing``, and only when it differs by more than 1 %.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MedsegError

# Resample only when the scan's voxel size differs from the model's by more than this.
SPACING_TOLERANCE = 0.01


def layer_spacing(layer_affine_ras: np.ndarray) -> tuple:
    """Voxel size in mm along the layer axes."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(layer_affine_ras)[:3, :3], axis=0))


def _subsample(array: np.ndarray, max_voxels: int = 2_000_000) -> np.ndarray:
    step = max(1, int(np.ceil((array.size / max_voxels) ** (1 / array.ndim))))
    return np.asarray(array[(slice(None, None, step),) * array.ndim], dtype=np.float32)


def intensity_parameters(array: np.ndarray, normalisation: dict) -> tuple[float, float, float, float]:
    """``(clip_low, clip_high, offset, scale)`` so that ``(clip(x) - offset) / scale``.

    ``{"kind": "ct", "window": [lo, hi]}`` clips HU to the window and maps it to
    [-1, 1]. ``{"kind": "mr_robust_zscore"}`` clips to the 0.5/99.5 percentiles and
    z-scores with the median and IQR of the voxels brighter than the mean, so the
    large air background and bright outliers do not set the scale.
    """
    kind = normalisation.get("kind")
    if kind == "ct":
        low, high = (float(v) for v in normalisation.get("window", (-1000.0, 1000.0)))
        return low, high, (low + high) / 2, (high - low) / 2
    if kind == "mr_robust_zscore":
        sample = _subsample(array)
        low, high = np.percentile(sample, [0.5, 99.5])
        clipped = np.clip(sample, low, high)
        foreground = clipped[clipped > clipped.mean()]
        if foreground.size < 16:
            foreground = clipped
        q25, median, q75 = np.percentile(foreground, [25, 50, 75])
        scale = float(q75 - q25) / 1.349
        if not np.isfinite(scale) or scale <= 1e-6:
            scale = float(clipped.std()) or 1.0
        return float(low), float(high), float(median), scale
    raise MedsegError(f"unknown intensity normalisation {kind!r} in the model file")


def normalise(array: np.ndarray, normalisation: dict) -> torch.Tensor:
    """A float32 tensor of the normalised intensities (a new array; input untouched)."""
    low, high, offset, scale = intensity_parameters(array, normalisation)
    tensor = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
    tensor.clamp_(low, high).sub_(offset).div_(scale)
    return tensor


def model_grid_shape(shape: tuple, spacing: tuple, target_spacing: tuple | None) -> tuple:
    """Shape of the scan on the model's grid (the same field of view)."""
    if target_spacing is None:
        return tuple(shape)
    out = []
    for n, s, t in zip(shape, spacing, target_spacing):
        out.append(n if abs(s / t - 1) <= SPACING_TOLERANCE else max(1, int(round(n * s / t))))
    return tuple(out)


def resample(tensor: torch.Tensor, shape: tuple, mode: str = "trilinear") -> torch.Tensor:
    """Resample a ``(C, D, H, W)`` or ``(D, H, W)`` tensor to ``shape`` over the same extent.

    Voxel centres follow the half-voxel convention (``align_corners=False``), so the
    grid keeps the scan's field of view exactly. Downsampling by 2 or more first
    averages blocks, which stops aliasing of thin bright structures.
    """
    squeeze = tensor.ndim == 3
    x = tensor[None, None] if squeeze else tensor[None]
    if tuple(x.shape[2:]) == tuple(shape):
        return tensor
    factors = [int(np.floor(n / m)) for n, m in zip(x.shape[2:], shape)]
    if mode == "trilinear" and max(factors) >= 2:
        kernel = [max(1, f) for f in factors]
        x = F.avg_pool3d(x, kernel_size=kernel, stride=kernel, ceil_mode=True, count_include_pad=False)
    if mode == "nearest":
        y = F.interpolate(x, size=tuple(shape), mode="nearest-exact")
    else:
        y = F.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=False)
    return y[0, 0] if squeeze else y[0]


@dataclass
class PreparedInput:
    """A scan ready for the network, with what is needed to undo the resampling."""

    tensor: torch.Tensor        # (D, H, W) float32 on the model grid
    scan_shape: tuple           # layer-order shape of the scan
    model_shape: tuple

    @property
    def resampled(self) -> bool:
        return self.scan_shape != self.model_shape


def prepare(layer_array: np.ndarray, spacing: tuple, normalisation: dict,
            target_spacing: tuple | None) -> PreparedInput:
    """Normalise a layer-order array and resample it to the model's voxel size."""
    if np.asarray(layer_array).ndim != 3:
        raise MedsegError(f"the model needs a 3D image; this one has shape {tuple(np.shape(layer_array))}")
    tensor = normalise(layer_array, normalisation)
    shape = model_grid_shape(tuple(tensor.shape), spacing, target_spacing)
    return PreparedInput(resample(tensor, shape), tuple(tensor.shape), shape)


def probabilities_to_scan(probabilities: torch.Tensor, scan_shape: tuple) -> torch.Tensor:
    """Linear resampling of ``(C, d, h, w)`` class probabilities onto the scan grid."""
    return resample(probabilities, scan_shape, mode="trilinear").clamp_(0, 1)


def labels_to_scan(labels: np.ndarray, scan_shape: tuple) -> np.ndarray:
    """Nearest-neighbour resampling of a label map onto the scan grid."""
    if tuple(labels.shape) == tuple(scan_shape):
        return labels
    index = [np.minimum((np.arange(m) + 0.5) * n / m, n - 1).astype(np.intp) for n, m in zip(labels.shape, scan_shape)]
    return labels[np.ix_(*index)]


def labels_from_probabilities_on_scan(probabilities: torch.Tensor, scan_shape: tuple,
                                      slab: int = 16) -> np.ndarray:
    """Argmax of linearly resampled probabilities, one slab of scan slices at a time.

    Smoother than nearest-neighbour labels when the model grid is coarser than the
    scan, while never holding the full-resolution float maps (only ``slab`` slices).
    """
    depth = probabilities.shape[1]
    out = np.empty(scan_shape, dtype=np.uint8)
    x = probabilities[None].float()
    hw = tuple(scan_shape[1:])
    scale = depth / scan_shape[0]
    for start in range(0, scan_shape[0], slab):
        stop = min(scan_shape[0], start + slab)
        # source slices that the linear interpolation of [start, stop) touches
        centres = (np.arange(start, stop) + 0.5) * scale - 0.5
        lo = max(0, int(np.floor(centres.min())))
        hi = min(depth - 1, int(np.ceil(centres.max()))) + 1
        part = x[:, :, lo:hi]
        # Interpolate along H and W for the touched source slices, then along D by hand.
        part = F.interpolate(part, size=(hi - lo,) + hw, mode="trilinear", align_corners=False)
        c = np.clip(centres, 0, depth - 1) - lo
        i0 = np.floor(c).astype(int)
        i1 = np.minimum(i0 + 1, hi - lo - 1)
        w = torch.from_numpy((c - i0).astype(np.float32)).view(1, 1, -1, 1, 1)
        slab_probs = part[:, :, i0] * (1 - w) + part[:, :, i1] * w
        out[start:stop] = slab_probs[0].argmax(0).to(torch.uint8).numpy()
    return out
