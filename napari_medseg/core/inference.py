"""Sliding-window inference that streams to labels, and the whole predict pipeline.

The pattern follows MONAI's ``sliding_window_inference`` (plain functions with a
``progress`` callback) with three differences that make it faster and lighter:

* **Fewer, larger windows.** By default the window size is planned per axis from a
  voxel budget, so that the volume is covered by as few windows as possible with a
  small overlap; MONAI's defaults (ROI = patch size, overlap 0.25) compute most
  voxels 3-4 times.
* **Streaming.** Windows run slab by slab along the first axis. Blended logits are
  kept only for the slab still receiving windows; finished slices are turned into
  uint8 labels at once. Full float maps exist only when the caller asks for them.
* **Batch norm folded** into the convolutions (see :mod:`.network`).

Cancellation: ``progress`` may raise (the GUI raises
:class:`~napari_medseg.core.errors.Cancelled`); it is called between windows.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .errors import MedsegError
from .preprocess import (
    labels_from_probabilities_on_scan,
    labels_to_scan,
    layer_spacing,
    prepare,
    probabilities_to_scan,
)

Progress = Callable[[float, str], None]
# Blended float maps on the model grid up to this many bytes are kept so that labels
# can come from smoothly resampled probabilities; above it labels are streamed.
KEEP_PROBABILITIES_BYTES = 256 * 2**20


@dataclass
class InferenceSettings:
    """How to run the network over a volume.

    ``roi_size=None`` plans windows automatically (see :func:`plan_windows`);
    ``overlap`` is the minimum overlap of neighbouring windows, as a fraction of
    the model's patch;
    ``amp=None`` means automatic mixed precision on CUDA only (bf16 where the GPU
    supports it, else fp16); ``tta`` averages the logits of mirrored inputs.
    """

    device: str = "auto"
    roi_size: tuple | None = None
    overlap: float = 0.125
    sw_batch_size: int | None = None
    amp: bool | None = None
    tta: bool = False
    window_voxels: int | None = None

    def __post_init__(self):
        if not 0 <= float(self.overlap) < 1:
            raise MedsegError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not str(self.device).startswith("cuda:"):
            raise MedsegError(f"unknown device '{self.device}' (use auto, cpu, cuda or mps)")


@dataclass
class WindowResult:
    labels: np.ndarray                       # (D, H, W) uint8 on the grid given
    probabilities: torch.Tensor | None       # (C, D, H, W) float32 CPU, if asked for
    info: dict = field(default_factory=dict)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; asking for a missing GPU is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedsegError("--device cuda was asked for, but no CUDA GPU is available (use --device auto or cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise MedsegError("the Apple MPS device is not available here (use auto or cpu)")
    return torch.device(name)


def _round_up(value: float, divisor: int) -> int:
    return int(math.ceil(value / divisor) * divisor)


def axis_plans(size: int, margin: int, divisor: int, smallest: int) -> list[tuple[int, list[int]]]:
    """Every useful ``(roi, starts)`` for one axis: for 1, 2, 3... windows, the shortest
    window (a multiple of ``divisor``, at least ``smallest``) that covers ``size``
    voxels with neighbours sharing at least ``margin`` voxels."""
    whole = _round_up(size, divisor)
    plans = [(whole, [0])]
    count = 2
    while plans[-1][0] > smallest and plans[-1][0] < 2 * size:
        roi = max(smallest, _round_up(math.ceil((size + (count - 1) * margin) / count), divisor))
        if roi >= size:
            count += 1
            continue
        starts = sorted({int(round(k * (size - roi) / (count - 1))) for k in range(count)})
        if roi < plans[-1][0]:
            plans.append((roi, starts))
        count += 1
    return plans


def plan_fixed_axis(size: int, roi: int, overlap: float) -> list[int]:
    """MONAI-style starts for a fixed window: step ``roi * (1 - overlap)``, last one flush."""
    if size <= roi:
        return [0]
    step = max(1, int(roi * (1 - overlap)))
    starts = list(range(0, size - roi, step)) + [size - roi]
    return sorted(set(starts))


def plan_windows(shape: tuple, patch_size: tuple, divisor: int, settings: InferenceSettings,
                 device: torch.device) -> tuple[tuple, list[list[int]]]:
    """Window size and per-axis starts for a volume of ``shape``.

    With no fixed ``roi_size``, the plan computes the fewest voxels in total: of all
    window shapes within the voxel budget (3 patches on a CPU, 8 on a GPU) and no
    smaller than the patch, it takes the one whose windows, overlapping by at least
    ``overlap`` of the patch, sum to the fewest voxels. MONAI's usual settings (ROI =
    patch, overlap 0.25) compute a head's voxels 2.3 times; this plan about 1.2 times.
    """
    if settings.roi_size is not None:
        roi = tuple(_round_up(min(r, _round_up(n, divisor)), divisor) for r, n in zip(settings.roi_size, shape))
        return roi, [plan_fixed_axis(n, r, settings.overlap) for n, r in zip(shape, roi)]
    budget = settings.window_voxels or (int(np.prod(patch_size)) * (8 if device.type == "cuda" else 3))
    options = [axis_plans(n, int(math.ceil(settings.overlap * p)), divisor, min(_round_up(p, divisor),
                                                                                  _round_up(n, divisor)))
               for n, p in zip(shape, patch_size)]
    best = None
    for plan in itertools.product(*options):
        rois = [roi for roi, _ in plan]
        counts = [len(starts) for _, starts in plan]
        window = int(np.prod(rois))
        # Within budget, fewest computed voxels then fewest windows; else the smallest window.
        key = (window > budget, window if window > budget else int(np.prod(counts)) * window, int(np.prod(counts)))
        if best is None or key < best[0]:
            best = (key, plan)
    plan = best[1]
    return tuple(roi for roi, _ in plan), [starts for _, starts in plan]


def gaussian_importance(roi: tuple, sigma_scale: float = 0.125, device=None) -> torch.Tensor:
    """Separable Gaussian weights, peak 1, floor 1e-3 so borders still count."""
    weights = None
    for n in roi:
        centre = (n - 1) / 2
        sigma = max(n * sigma_scale, 1e-3)
        g = torch.exp(-0.5 * ((torch.arange(n, dtype=torch.float32) - centre) / sigma) ** 2)
        weights = g if weights is None else weights[..., None] * g
    weights = weights / weights.max()
    return weights.clamp_(min=1e-3).to(device)


class _RetryOnCPU(Exception):
    pass


def _autocast(device: torch.device, amp: bool | None):
    if device.type == "cuda" and amp is not False:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if device.type == "cpu" and amp:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def sliding_window(
    image: torch.Tensor,
    network: torch.nn.Module,
    n_classes: int,
    patch_size: tuple,
    settings: InferenceSettings | None = None,
    keep_probabilities: bool = False,
    progress: Progress | None = None,
) -> WindowResult:
    """Run ``network`` over a ``(D, H, W)`` or ``(C, D, H, W)`` CPU tensor.

    Returns uint8 labels (argmax of Gaussian-blended logits) and, if
    ``keep_probabilities``, the softmax of the blended logits. A CUDA out-of-memory
    error halves the window batch and retries; at batch 1 the run restarts on the CPU.
    """
    settings = settings or InferenceSettings()
    device = pick_device(settings.device)
    messages: list[str] = []
    while True:
        try:
            result = _sliding_window_on(image, network, n_classes, tuple(patch_size), settings, device,
                                        keep_probabilities, progress, messages)
            result.info["messages"] = messages
            return result
        except _RetryOnCPU:
            messages.append("the GPU ran out of memory even with one window at a time; "
                            "the run continued on the CPU")
            if progress:
                progress(0.0, messages[-1])
            device = torch.device("cpu")


def _sliding_window_on(image, network, n_classes, patch_size, settings, device, keep_probabilities,
                       progress, messages) -> WindowResult:
    started = time.perf_counter()
    if image.ndim == 3:
        image = image[None]
    channels, *shape = image.shape
    divisor = int(getattr(network, "divisor", 1))
    roi, starts = plan_windows(tuple(shape), patch_size, divisor, settings, device)
    padded = [max(n, s[-1] + r) for n, s, r in zip(shape, starts, roi)]
    # Windows reaching past the volume are padded with each channel's minimum (air
    # after normalisation), not 0: a normalised 0 is mid-grey tissue, and the network
    # would see a bright wall. Only those windows are padded, never the whole volume.
    air = image.amin(dim=(1, 2, 3)).view(-1, 1, 1, 1)

    def window(z: int, y: int, x: int) -> torch.Tensor:
        part = image[:, z:z + roi[0], y:y + roi[1], x:x + roi[2]]
        if tuple(part.shape[1:]) == roi:
            return part
        filled = air.expand(channels, *roi).clone()
        filled[:, :part.shape[1], :part.shape[2], :part.shape[3]] = part
        return filled

    # Channels-last lets oneDNN and cuDNN skip the layout copies around every
    # convolution: about a fifth faster and a third less memory per window on a CPU.
    network = network.to(device=device, memory_format=torch.channels_last_3d).eval()
    weights = gaussian_importance(roi, device=device)
    batch = settings.sw_batch_size or (4 if device.type == "cuda" else 1)
    depth, height, width = shape
    labels = np.empty(shape, dtype=np.uint8)
    probabilities = torch.empty((n_classes, *shape), dtype=torch.float32) if keep_probabilities else None
    # Rolling slab of blended logits covering [base, base + roi[0]) along axis 0.
    slab = torch.zeros((n_classes, roi[0], padded[1], padded[2]), dtype=torch.float32, device=device)
    weight_sum = torch.zeros((roi[0], padded[1], padded[2]), dtype=torch.float32, device=device) \
        if keep_probabilities else None
    planes = [(y, x) for y in starts[1] for x in starts[2]]
    total = len(starts[0]) * len(planes)
    done = 0
    base = 0

    def finish(stop: int) -> None:
        """Turn slab rows [base, stop) into labels (and probabilities)."""
        rows = min(stop, depth) - base
        if rows <= 0:
            return
        logits = slab[:, :rows, :height, :width]
        labels[base:base + rows] = logits.argmax(0).to(torch.uint8).cpu().numpy()
        if probabilities is not None:
            normalised = logits / weight_sum[:rows, :height, :width].clamp(min=1e-6)
            probabilities[:, base:base + rows] = torch.softmax(normalised, 0).cpu()

    flips = [(), (2,), (3,), (4,)] if settings.tta else [()]
    with torch.inference_mode():
        for z in starts[0]:
            finish(z)
            shift = z - base
            if shift >= roi[0]:
                slab.zero_()
                if weight_sum is not None:
                    weight_sum.zero_()
            elif shift:
                slab[:, : roi[0] - shift] = slab[:, shift:].clone()
                slab[:, roi[0] - shift:] = 0
                if weight_sum is not None:
                    weight_sum[: roi[0] - shift] = weight_sum[shift:].clone()
                    weight_sum[roi[0] - shift:] = 0
            base = z
            index = 0
            while index < len(planes):
                chunk = planes[index:index + batch]
                windows = torch.stack([window(z, y, x) for y, x in chunk])
                try:
                    windows = windows.to(device, non_blocking=True).contiguous(
                        memory_format=torch.channels_last_3d)
                    output = None
                    for dims in flips:
                        with _autocast(device, settings.amp):
                            logits = network(windows.flip(dims) if dims else windows)
                        logits = (logits.flip(dims) if dims else logits).float()
                        output = logits if output is None else output + logits
                    if len(flips) > 1:
                        output /= len(flips)
                except torch.OutOfMemoryError:
                    del windows
                    output = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if batch > 1:
                        batch = max(1, batch // 2)
                        messages.append(f"GPU memory was short; retrying with {batch} window(s) at a time")
                        continue
                    if device.type == "cpu":
                        raise MedsegError("not enough memory for one window; pass a smaller ROI") from None
                    raise _RetryOnCPU() from None
                for (y, x), window_logits in zip(chunk, output):
                    slab[:, :, y:y + roi[1], x:x + roi[2]] += window_logits * weights
                    if weight_sum is not None:
                        weight_sum[:, y:y + roi[1], x:x + roi[2]] += weights
                index += len(chunk)
                done += len(chunk)
                if progress:
                    progress(done / total, f"window {done} of {total}")
        finish(depth)
    info = {"device": str(device), "roi_size": list(roi), "windows": total, "window_batch": batch,
            "amp": bool(device.type == "cuda" and settings.amp is not False) or bool(settings.amp),
            "tta": settings.tta, "seconds": time.perf_counter() - started}
    return WindowResult(labels, probabilities, info)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected part of a boolean mask (the mask itself if it has one part)."""
    from scipy import ndimage

    components, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == sizes.argmax()


def head_mask(image: torch.Tensor) -> np.ndarray:
    """Voxels inside the imaged body: above an Otsu threshold, holes filled, largest part."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    values = image.numpy()
    step = max(1, int(round((values.size / 1e6) ** (1 / 3))))
    threshold = threshold_otsu(values[::step, ::step, ::step])
    body = largest_component(ndimage.binary_opening(values > threshold, iterations=1))
    # Close gaps in the outline before filling, so dark enclosed parts (CSF, sinuses) count.
    body = ndimage.binary_closing(body, iterations=3)
    return ndimage.binary_fill_holes(body)


def postprocess(result: WindowResult, image: torch.Tensor, steps: dict) -> None:
    """Model-declared clean-up on the model grid (``card["postprocessing"]``), in place.

    ``inside_body``: labels only inside the imaged body (Otsu, filled), so that noise in
    the air around a head is never labelled. ``largest_component``: keep only each
    label's largest connected part.
    """
    keep = np.ones(result.labels.shape, dtype=bool)
    if steps.get("inside_body"):
        keep &= head_mask(image)
    if steps.get("largest_component"):
        for value in np.unique(result.labels[keep]):
            if value == 0:
                continue
            keep &= (result.labels != value) | largest_component((result.labels == value) & keep)
    if keep.all():
        return
    result.labels[~keep] = 0
    if result.probabilities is not None:
        outside = torch.from_numpy(~keep)
        result.probabilities[1:, outside] = 0
        result.probabilities[0, outside] = 1


# -- the whole pipeline ------------------------------------------------------------------

@dataclass
class Segmentation:
    """A prediction on the scan's own (layer-order) grid."""

    labels: np.ndarray                       # uint8, layer order, scan grid
    probabilities: np.ndarray | None         # (C, D, H, W) float32 if asked for
    label_names: dict
    label_colors: dict
    spacing: tuple
    info: dict = field(default_factory=dict)

    def volumes(self) -> list[dict]:
        """Per-label voxel count and volume in mL (background excluded)."""
        return label_volumes(self.labels, self.spacing, self.label_names)


def label_volumes(labels: np.ndarray, spacing: tuple, names: dict | None = None) -> list[dict]:
    counts = np.bincount(np.asarray(labels).ravel(), minlength=max(names or {0: 0}) + 1)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    rows = []
    for value in range(1, len(counts)):
        if counts[value] == 0 and names is not None and value not in names:
            continue
        rows.append({"value": value, "name": (names or {}).get(value, f"label {value}"),
                     "voxels": int(counts[value]), "ml": float(counts[value]) * voxel_ml})
    return rows


def segment(layer_array: np.ndarray, layer_affine_ras: np.ndarray, model, settings: InferenceSettings | None = None,
            want_probabilities: bool = False, progress: Progress | None = None) -> Segmentation:
    """Segment a layer-order scan with a loaded :class:`~napari_medseg.core.models.Model`.

    Steps: normalise and resample to the model's voxel size (5 %), sliding window
    (90 %), back onto the scan grid (5 %). The result shares the scan's grid.
    """
    settings = settings or InferenceSettings()
    card = model.card

    def report(start: float, span: float):
        if progress is None:
            return None
        return lambda fraction, message: progress(start + span * fraction, message)

    if progress:
        progress(0.0, "preparing the scan")
    spacing = layer_spacing(layer_affine_ras)
    if np.asarray(layer_array).ndim != 3 or min(np.shape(layer_array)) < 2:
        raise MedsegError(f"segmentation needs a 3D scan; this one has shape {tuple(np.shape(layer_array))}")
    prepared = prepare(layer_array, spacing, card["normalisation"], card.get("target_spacing"))
    n_classes = len(card["labels"])
    model_bytes = 4 * n_classes * int(np.prod(prepared.model_shape))
    smooth = prepared.resampled and model_bytes <= KEEP_PROBABILITIES_BYTES
    result = sliding_window(prepared.tensor, model.network, n_classes, tuple(card["patch_size"]), settings,
                            keep_probabilities=want_probabilities or smooth, progress=report(0.05, 0.9))
    postprocess(result, prepared.tensor, card.get("postprocessing") or {})
    if progress:
        progress(0.95, "mapping the result onto the scan grid")
    probabilities = None
    if prepared.resampled and smooth:
        labels = labels_from_probabilities_on_scan(result.probabilities, prepared.scan_shape)
    else:
        labels = labels_to_scan(result.labels, prepared.scan_shape)
    if want_probabilities:
        probabilities = probabilities_to_scan(result.probabilities, prepared.scan_shape).numpy()
    info = dict(result.info, model=model.title, model_sha256=card.get("content_sha256"),
                model_shape=list(prepared.model_shape), scan_shape=list(prepared.scan_shape))
    if progress:
        progress(1.0, "done")
    return Segmentation(labels, probabilities, model.label_names, model.label_colors, spacing, info)
