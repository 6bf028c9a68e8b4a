"""Sliding-window inference with pluggable per-window outputs, and the predict pipeline.

The engine follows MONAI's ``sliding_window_inference``: plain functions, and a
``predictor`` that returns a dict of outputs per batch of windows. Every output (logits
or probabilities, TTA variance, attention coefficients, Grad-CAM, a layer's
activation) is blended with the same Gaussian weights and streamed the same way. It
keeps its own loop, for three reasons measured in ``benchmarks/bench_inference.py``:

* **Fewer, larger windows.** The window size is planned per axis from a voxel budget,
  so the volume is covered by as few windows as possible with a small overlap;
  MONAI's defaults (ROI = patch size, overlap 0.25) compute most voxels 3-4 times.
* **Streaming.** Windows run slab by slab along the first axis. Blended outputs are
  kept only for the slab still receiving windows; finished slices become uint8 labels
  at once, and only the maps a caller asks for are kept whole. MONAI given the same
  plan still holds every output for the whole volume (more memory, and slower).
* **Batch norm folded** into the convolutions (see :mod:`.network`).

Cancellation: ``progress`` may raise :class:`~napari_medseg.core.errors.Cancelled`;
it is called between windows.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .defaults import DEFAULT_OVERLAP, WINDOW_CHOICES
from .devices import autocast, check_device_name, pick_device, uses_amp
from .errors import MedsegError
from .pipeline import (PreparedScan, body_mask, labels_to_scan, largest_component, layer_spacing, prepare,
                       probabilities_to_scan, to_scan)
from .progress import Progress, report, span

# Scores on the network grid up to this many bytes are kept, so that labels can come
# from smoothly resampled scores; above it labels are streamed and placed by nearest voxel.
KEEP_SCORES_BYTES = 256 * 2**20
# Mirror flips for test-time augmentation (spatial axes of a (N, C, D, H, W) batch).
TTA_FLIPS = ((), (2,), (3,), (4,))


@dataclass
class InferenceSettings:
    """How to run the network over a volume.

    ``roi_size=None`` plans windows automatically (see :func:`plan_windows`);
    ``overlap`` is the minimum overlap of neighbouring windows, as a fraction of
    the model's patch; ``amp=None`` means automatic mixed precision on CUDA only (bf16
    where the GPU supports it, else fp16); ``tta`` averages mirrored passes (None: as
    the model's card says). ``windows``: ``card`` tiles as the card declares (an
    imported nnU-Net model: nnU-Net's fixed step), ``ours`` always plans our windows.
    ``step`` (set from the card) tiles with windows of the patch, ``step`` of a patch
    apart, the grid padded with ``pad_value`` up to one patch, as nnU-Net does.
    ``cpu_bf16`` (set from the card): with ``amp=None``, a segmentation on a CPU with
    native bf16 runs in bf16 (see :func:`~.devices.cpu_has_native_bf16`), unless the card
    keeps its weights in float32 to run as its own tool does (imported models).
    """

    device: str = "auto"
    roi_size: tuple | None = None
    overlap: float = DEFAULT_OVERLAP
    sw_batch_size: int | None = None
    amp: bool | None = None
    tta: bool | None = None
    window_voxels: int | None = None
    windows: str = "card"
    step: float | None = None
    pad_value: float = 0.0
    blend_dtype: str = "float32"
    cpu_bf16: bool = False

    def __post_init__(self):
        if not 0 <= float(self.overlap) < 1:
            raise MedsegError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.windows not in WINDOW_CHOICES:
            raise MedsegError(f"windows must be one of {', '.join(WINDOW_CHOICES)}, got {self.windows!r}")
        check_device_name(self.device)

    @property
    def network_amp(self) -> bool | None:
        """The ``amp`` a segmentation's networks run with: True is CUDA's default anyway,
        and on a CPU with native bf16 (``cpu_bf16``) it means bf16."""
        return True if self.amp is None and self.cpu_bf16 else self.amp

    @property
    def blend_torch_dtype(self) -> torch.dtype:
        return torch.float16 if self.blend_dtype == "float16" else torch.float32

    def for_card(self, card) -> "InferenceSettings":
        """These settings with the card's defaults filled in: its mirroring and its window plan."""
        windows = card.pipeline.windows
        step = windows.step if windows.plan == "step" and self.windows == "card" and self.roi_size is None else None
        from .devices import cpu_has_native_bf16

        return replace(self, tta=windows.mirror_by_default if self.tta is None else bool(self.tta),
                       step=step, pad_value=windows.pad_value,
                       blend_dtype=windows.blend_dtype if step is not None else "float32",
                       cpu_bf16=self.amp is None and card.provenance.get("weights") != "float32"
                       and cpu_has_native_bf16())


def mirror_flips(card) -> tuple:
    """The flips that test-time augmentation averages: every combination of the card's mirror
    axes (nnU-Net's), or, when it names none, identity and one flip per axis."""
    axes = [a + 2 for a in card.pipeline.windows.mirror_axes]
    if not axes:
        return TTA_FLIPS
    return ((),) + tuple(c for k in range(1, len(axes) + 1) for c in itertools.combinations(axes, k))


@dataclass
class WindowResult:
    labels: np.ndarray | None                       # (D, H, W) uint8 on the grid given
    maps: dict = field(default_factory=dict)        # name -> (C, D, H, W) float32 CPU tensors
    info: dict = field(default_factory=dict)


# -- window planning --------------------------------------------------------------------

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
    if settings.step is not None:
        return tuple(patch_size), [step_starts(n, p, settings.step) for n, p in zip(shape, patch_size)]
    if settings.roi_size is not None:
        roi = tuple(_round_up(min(r, _round_up(n, divisor)), divisor) for r, n in zip(settings.roi_size, shape))
        return roi, [plan_fixed_axis(n, r, settings.overlap) for n, r in zip(shape, roi)]
    budget = settings.window_voxels or (int(np.prod(patch_size)) * (8 if device.type == "cuda" else 3))
    options = [axis_plans(n, int(math.ceil(settings.overlap * p)), divisor,
                          min(_round_up(p, divisor), _round_up(n, divisor)))
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


def step_starts(size: int, tile: int, step: float) -> list[int]:
    """nnU-Net's window starts along one axis: as few as keep neighbours at most ``step``
    of a tile apart, spread evenly from 0 to ``size - tile`` (``size >= tile``)."""
    count = int(np.ceil((size - tile) / (tile * step))) + 1
    if count == 1:
        return [0]
    spacing = (size - tile) / (count - 1)
    return [int(np.round(spacing * i)) for i in range(count)]


def nnunet_importance(roi: tuple, sigma_scale: float = 0.125, device=None) -> torch.Tensor:
    """nnU-Net's Gaussian weights: an impulse at the centre voxel (``n // 2``) smoothed by
    scipy's Gaussian filter, peaking at 10 in float16, where the corners underflow to zero
    and are raised to the smallest non-zero weight (``compute_gaussian``). The peak stays 10:
    in a float16 blend a smaller scale would lose the corners' weights."""
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros(roi)
    impulse[tuple(n // 2 for n in roi)] = 1
    weights = gaussian_filter(impulse, [n * sigma_scale for n in roi], 0, mode="constant", cval=0)
    weights = (weights / (weights.max() / 10)).astype(np.float16)
    weights[weights == 0] = weights[weights > 0].min()
    return torch.from_numpy(weights.astype(np.float32)).to(device)


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


# -- predictors ------------------------------------------------------------------------

class NetworkPredictor:
    """Runs a network on a batch of windows and returns its outputs by name.

    ``output`` names what the network returns: ``logits``, or ``probabilities`` for
    networks that end in a softmax (deepbet's). With ``flips``, the outputs are the mean
    over mirrored passes; ``variance=True`` adds ``tta_variance``, the variance of the
    foreground probability across the passes (an uncertainty map).
    """

    def __init__(self, network: torch.nn.Module, output: str = "logits", amp: bool | None = None,
                 flips: tuple = ((),), variance: bool = False):
        self.network, self.output, self.amp = network, output, amp
        self.flips, self.variance = tuple(flips), variance
        self.device = torch.device("cpu")

    @property
    def divisor(self) -> int:
        return int(getattr(self.network, "divisor", 1))

    @property
    def memory_format(self):
        # Channels-last lets oneDNN and cuDNN skip the layout copies around every
        # convolution: about a fifth faster and a third less memory per window for the
        # attention U-Net on a CPU. Instance norm (deepbet's LinkNet3d) is faster without.
        prefers = getattr(self.network, "prefers_channels_last", True)
        return torch.channels_last_3d if prefers else torch.contiguous_format

    def to(self, device: torch.device) -> "NetworkPredictor":
        self.network = self.network.to(device=device, memory_format=self.memory_format).eval()
        self.device = device
        return self

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.amp):
            return self.network(windows).float()

    def probabilities_of(self, output: torch.Tensor) -> torch.Tensor:
        return output if self.output == "probabilities" else torch.softmax(output, 1)

    def __call__(self, windows: torch.Tensor) -> dict:
        total, probabilities = None, []
        for dims in self.flips:
            out = self.forward(windows.flip(dims) if dims else windows)
            out = out.flip(dims) if dims else out
            total = out if total is None else total + out
            if self.variance:
                probabilities.append(self.probabilities_of(out)[:, 1:].sum(1, keepdim=True))
        outputs = {self.output: total / len(self.flips) if len(self.flips) > 1 else total}
        if self.variance:
            outputs["tta_variance"] = torch.stack(probabilities).var(0, unbiased=False) \
                if len(probabilities) > 1 else torch.zeros_like(probabilities[0])
        return outputs


class _RetryOnCPU(Exception):
    pass


# -- the engine --------------------------------------------------------------------------

def sliding_window(image: torch.Tensor, predictor, patch_size: tuple, settings: InferenceSettings | None = None, *,
                   labels_from: str | None = "logits", threshold: float | None = None, keep: tuple = (),
                   progress: Progress | None = None) -> WindowResult:
    """Run ``predictor`` over a ``(D, H, W)`` or ``(C, D, H, W)`` CPU tensor.

    ``predictor(windows)`` returns a dict of ``(N, C_k, *window)`` tensors; a plain
    ``nn.Module`` is wrapped in a :class:`NetworkPredictor`. Each output is blended with
    Gaussian weights. Labels come from the output ``labels_from`` (the argmax, or class
    1 above ``threshold``); the outputs named in ``keep`` are returned whole, on the
    grid given, normalised by the blending weights. A CUDA out-of-memory error halves
    the window batch and retries; at batch 1 the run restarts on the CPU.
    """
    settings = settings or InferenceSettings()
    if isinstance(predictor, torch.nn.Module):
        predictor = NetworkPredictor(predictor, amp=settings.amp,
                                     flips=TTA_FLIPS if settings.tta else ((),))
    inside = None
    if settings.step is not None:
        image, inside = _pad_to_patch(image if image.ndim == 4 else image[None], tuple(patch_size),
                                      settings.pad_value)
    device = pick_device(settings.device)
    messages: list[str] = []
    while True:
        try:
            result = _sliding_window_on(image, predictor.to(device), tuple(patch_size), settings, device,
                                        labels_from, threshold, tuple(keep), progress, messages)
            result.info["messages"] = messages
            return _cropped(result, inside) if inside is not None else result
        except _RetryOnCPU:
            messages.append("the GPU ran out of memory even with one window at a time; "
                            "the run continued on the CPU")
            report(progress, 0.0, messages[-1])
            device = torch.device("cpu")


def _pad_to_patch(image: torch.Tensor, patch_size: tuple, value: float) -> tuple[torch.Tensor, tuple | None]:
    """nnU-Net's padding: a ``(C, D, H, W)`` grid smaller than the patch is padded, centred,
    with ``value``; returns it and the slices of the original inside it (None if unpadded)."""
    shape = tuple(image.shape[1:])
    below = [max(0, p - n) // 2 for n, p in zip(shape, patch_size)]
    above = [max(0, p - n) - b for n, p, b in zip(shape, patch_size, below)]
    if not any(below) and not any(above):
        return image, None
    pads = [v for axis in (2, 1, 0) for v in (below[axis], above[axis])]
    return torch.nn.functional.pad(image, pads, value=value), tuple(slice(b, b + n) for b, n in zip(below, shape))


def _cropped(result: WindowResult, inside: tuple) -> WindowResult:
    if result.labels is not None:
        result.labels = np.ascontiguousarray(result.labels[inside])
    result.maps = {name: value[(slice(None),) + inside].contiguous() for name, value in result.maps.items()}
    return result


def _sliding_window_on(image, predictor, patch_size, settings, device, labels_from, threshold, keep,
                       progress, messages) -> WindowResult:
    started = time.perf_counter()
    if image.ndim == 3:
        image = image[None]
    channels, *shape = image.shape
    roi, starts = plan_windows(tuple(shape), patch_size, predictor.divisor, settings, device)
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

    wanted = tuple(dict.fromkeys(((labels_from,) if labels_from else ()) + keep))
    # One window needs no blending, unless the card blends in float16 as nnU-Net does: its
    # Gaussian weighting rounds the window's edges, and reproducing nnU-Net means rounding too.
    rounds_like_nnunet = settings.step is not None and settings.blend_torch_dtype == torch.float16
    if len(starts[0]) * len(starts[1]) * len(starts[2]) == 1 and tuple(roi) == tuple(shape) \
            and not rounds_like_nnunet:
        return _one_window(image, predictor, device, settings, labels_from, threshold, keep, wanted, progress,
                           started, roi)
    weights = (nnunet_importance if settings.step is not None else gaussian_importance)(roi, device=device)
    batch = settings.sw_batch_size or (4 if device.type == "cuda" else 1)
    depth, height, width = shape
    labels = np.empty(shape, dtype=np.uint8) if labels_from else None
    maps: dict[str, torch.Tensor] = {}
    slabs: dict[str, torch.Tensor] = {}
    # Rolling slabs of blended outputs covering [base, base + roi[0]) along axis 0.
    # nnU-Net blends in float16 (half the memory); its cards ask for the same, to reproduce it.
    blend_dtype = settings.blend_torch_dtype
    weight_sum = torch.zeros((roi[0], padded[1], padded[2]), dtype=blend_dtype, device=device)
    planes = [(y, x) for y in starts[1] for x in starts[2]]
    total = len(starts[0]) * len(planes)
    done = 0
    base = 0

    def finish(stop: int) -> None:
        """Turn slab rows [base, stop) into labels and kept maps."""
        rows = min(stop, depth) - base
        if rows <= 0:
            return
        norm = weight_sum[:rows, :height, :width]
        norm = torch.where(norm > 0, norm, torch.ones_like(norm))  # float16 corners are subnormal: no clamp
        for name, slab in slabs.items():
            blended = slab[:, :rows, :height, :width] / norm
            if name in keep:
                maps[name][:, base:base + rows] = blended.cpu()
            if name == labels_from:
                labels[base:base + rows] = _labels_of(blended, threshold)

    grad_mode = torch.enable_grad() if getattr(predictor, "needs_gradients", False) else torch.inference_mode()
    with grad_mode:
        for z in starts[0]:
            finish(z)
            shift = z - base
            for tensor in [weight_sum, *slabs.values()]:
                view = tensor if tensor.ndim == 3 else tensor.transpose(0, 1)
                if shift >= roi[0]:
                    view.zero_()
                elif shift:
                    view[: roi[0] - shift] = view[shift:].clone()
                    view[roi[0] - shift:] = 0
            base = z
            index = 0
            while index < len(planes):
                chunk = planes[index:index + batch]
                windows = torch.stack([window(z, y, x) for y, x in chunk])
                try:
                    windows = windows.to(device, non_blocking=True).contiguous(
                        memory_format=getattr(predictor, "memory_format", torch.channels_last_3d))
                    outputs = predictor(windows)
                except torch.OutOfMemoryError:
                    del windows
                    outputs = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if batch > 1:
                        batch = max(1, batch // 2)
                        messages.append(f"GPU memory was short; retrying with {batch} window(s) at a time")
                        continue
                    if device.type == "cpu":
                        raise MedsegError("not enough memory for one window; pass a smaller ROI") from None
                    raise _RetryOnCPU() from None
                missing = [name for name in wanted if name not in outputs]
                if missing:
                    raise MedsegError(f"the predictor gave no '{missing[0]}' output")
                for name in wanted:
                    if name not in slabs:
                        n = outputs[name].shape[1]
                        slabs[name] = torch.zeros((n, roi[0], padded[1], padded[2]), dtype=blend_dtype,
                                                  device=device)
                        if name in keep:
                            maps[name] = torch.empty((n, *shape), dtype=torch.float32)
                for position, (y, x) in enumerate(chunk):
                    for name in wanted:
                        slabs[name][:, :, y:y + roi[1], x:x + roi[2]] += outputs[name][position].detach() * weights
                    weight_sum[:, y:y + roi[1], x:x + roi[2]] += weights
                del outputs
                index += len(chunk)
                done += len(chunk)
                report(progress, done / total, f"window {done} of {total}")
        finish(depth)
    info = {"device": str(device), "roi_size": list(roi), "windows": total, "window_batch": batch,
            "amp": uses_amp(device, getattr(predictor, "amp", settings.amp)), "tta": settings.tta,
            "seconds": time.perf_counter() - started}
    return WindowResult(labels, maps, info)


def _labels_of(blended: torch.Tensor, threshold: float | None) -> np.ndarray:
    if threshold is not None and blended.shape[0] == 2:
        return (blended[1] > threshold).to(torch.uint8).cpu().numpy()
    return blended.argmax(0).to(torch.uint8).cpu().numpy()


def _one_window(image, predictor, device, settings, labels_from, threshold, keep, wanted, progress, started,
                roi) -> WindowResult:
    """A volume that is exactly one window: no blending, no slabs (a fixed-grid model such as deepbet's)."""
    grad_mode = torch.enable_grad() if getattr(predictor, "needs_gradients", False) else torch.inference_mode()
    with grad_mode:
        try:
            window = image[None].to(device).contiguous(memory_format=getattr(predictor, "memory_format",
                                                                               torch.channels_last_3d))
            outputs = predictor(window)
        except torch.OutOfMemoryError:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                raise _RetryOnCPU() from None
            raise MedsegError("not enough memory for one window; pass a smaller ROI") from None
        missing = [name for name in wanted if name not in outputs]
        if missing:
            raise MedsegError(f"the predictor gave no '{missing[0]}' output")
        labels = _labels_of(outputs[labels_from][0].float(), threshold) if labels_from else None
        maps = {name: outputs[name][0].detach().float().cpu() for name in keep}
    report(progress, 1.0, "window 1 of 1")
    info = {"device": str(device), "roi_size": list(roi), "windows": 1, "window_batch": 1,
            "amp": uses_amp(device, getattr(predictor, "amp", settings.amp)), "tta": settings.tta,
            "seconds": time.perf_counter() - started}
    return WindowResult(labels, maps, info)


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
    expected_ml: dict = field(default_factory=dict)    # label value -> (low, high) plausible mL
    uncertainty: np.ndarray | None = None    # normalised entropy (0..1), layer order, if asked for

    @property
    def warnings(self) -> list:
        return self.info.setdefault("warnings", [])

    def volumes(self) -> list[dict]:
        """Per-label voxel count and volume in mL (background excluded), flagged when implausible."""
        return label_volumes(self.labels, self.spacing, self.label_names, self.expected_ml)

    def volume_rows(self) -> list[dict]:
        """:meth:`volumes` as computed when the result was made (the labels may have changed since)."""
        return self.info.get("volumes") or self.volumes()


def label_volumes(labels: np.ndarray, spacing: tuple, names: dict | None = None,
                  expected_ml: dict | None = None) -> list[dict]:
    """Per-label voxel count and mL; a row outside its ``expected_ml`` range gets a ``warning``."""
    counts = np.bincount(np.asarray(labels).ravel(), minlength=max(names or {0: 0}) + 1)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    rows = []
    for value in range(1, len(counts)):
        if counts[value] == 0 and names is not None and value not in names:
            continue
        row = {"value": value, "name": (names or {}).get(value, f"label {value}"),
               "voxels": int(counts[value]), "ml": float(counts[value]) * voxel_ml}
        low_high = (expected_ml or {}).get(value)
        if low_high is not None and not low_high[0] <= row["ml"] <= low_high[1]:
            row["warning"] = (f"{row['ml']:.0f} mL is outside the {low_high[0]:.0f}-{low_high[1]:.0f} mL "
                              f"expected for {row['name']}")
        rows.append(row)
    return rows


def normalised_entropy(scores: torch.Tensor, output: str) -> torch.Tensor:
    """Per-voxel entropy of class scores ``(C, ...)``, divided by log C: 0 certain, 1 undecided."""
    if output == "logits":  # from log-softmax: three passes over the maps instead of seven
        log_p = torch.log_softmax(scores.float(), 0)
        return (log_p.exp() * log_p).sum(0).mul_(-1.0 / math.log(max(scores.shape[0], 2)))
    p = scores.clamp(min=0)
    p = p / p.sum(0, keepdim=True).clamp(min=1e-12)
    return -(p * torch.log(p.clamp(min=1e-12))).sum(0) / math.log(max(p.shape[0], 2))


def region_entropy(logits: torch.Tensor) -> torch.Tensor:
    """A region-based model's uncertainty: the highest binary entropy of its regions, in [0, 1]."""
    p = torch.sigmoid(logits.float()).clamp(1e-7, 1 - 1e-7)
    return (-(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))).amax(0)


def folds_blended_apart(image: torch.Tensor, model, settings: InferenceSettings, progress=None) -> WindowResult:
    """nnU-Net's fold average: each fold's logits blended on their own, then summed and divided
    in the blending precision (float16 for nnU-Net), so that the result is nnU-Net's own."""
    card = model.card
    folds = model.network.folds
    total, info = None, {}
    for index, fold in enumerate(folds):
        part = sliding_window(image, predictor_for(model, settings, network=fold), card.pipeline.patch_size,
                              settings, labels_from=None,
                              keep=(card.pipeline.output,),
                              progress=span(progress, index / len(folds), (index + 1) / len(folds)))
        logits = part.maps[card.pipeline.output].to(settings.blend_torch_dtype)
        total = logits if total is None else total.add_(logits)
        info = {**part.info, "windows": info.get("windows", 0) + part.info["windows"],
                "seconds": info.get("seconds", 0.0) + part.info["seconds"]}
    total = total.div_(len(folds)).float()
    return WindowResult(_labels_of(total, card.pipeline.threshold), {card.pipeline.output: total}, info)


def predictor_for(model, settings: InferenceSettings, variance: bool = False,
                  network: torch.nn.Module | None = None) -> NetworkPredictor:
    """The predictor that runs ``model``'s network (or one of its folds) as its card declares."""
    settings = settings.for_card(model.card)
    return NetworkPredictor(network if network is not None else model.network, output=model.card.pipeline.output,
                            amp=settings.network_amp,
                            flips=mirror_flips(model.card) if settings.tta else ((),), variance=variance)


def postprocess(labels: np.ndarray, image, steps: tuple) -> np.ndarray:
    """Model-declared clean-up on the scan grid (``card.pipeline.postprocessing``), in place.

    ``inside_body``: labels only inside the imaged body, so that noise in the air around
    a head is never labelled. ``largest_component``: each label's largest connected
    part. ``fill_holes``: enclosed background inside a label joins it. The work is done
    within the labels' bounding box plus one voxel, which gives the same result as the
    whole grid at a fraction of the cost.
    """
    from scipy import ndimage

    if "inside_body" in steps:
        labels[~body_mask(image)] = 0
    box = []
    for axis in range(3):
        present = np.flatnonzero(labels.any(axis=tuple(a for a in range(3) if a != axis)))
        if present.size == 0:
            return labels
        box.append(slice(max(0, int(present[0]) - 1), min(labels.shape[axis], int(present[-1]) + 2)))
    part = labels[tuple(box)]
    for value in [int(v) for v in np.unique(part) if v != 0]:
        mask = part == value
        if "largest_component" in steps:
            keep = largest_component(mask)
            part[mask & ~keep] = 0
            mask = keep
        if "fill_holes" in steps:
            filled = ndimage.binary_fill_holes(mask)
            part[filled & (part == 0)] = value
    return labels


def segment(layer_array: np.ndarray, layer_affine_ras: np.ndarray, model, settings: InferenceSettings | None = None,
            want_probabilities: bool = False, apply_postprocessing: bool = True,
            progress: Progress | None = None, want_uncertainty: bool = False, geometry=None) -> Segmentation:
    """Segment a layer-order scan with a loaded :class:`~napari_medseg.core.models.Model`.

    ``geometry`` (the scan's :class:`~.geometry.ScanGeometry`, optional) lets a MONAI
    bundle's model read the voxels in the file's own order, as its ``LoadImaged`` does.

    A model with several input channels takes ``(C, D, H, W)`` on one grid (see
    :func:`~.predict.stack_channels`).

    Steps: the card's pipeline onto the network grid (5 %), sliding window (85 %), back
    onto the scan grid and the declared post-processing (10 %). The result shares the
    scan's grid; implausible results carry warnings (see :mod:`.domain`).
    ``want_uncertainty`` adds the normalised entropy map from the same pass.
    """
    card = model.card
    settings = (settings or InferenceSettings()).for_card(card)
    if card.pipeline.kind == "monai_bundle":
        return _segment_with_bundle(layer_array, layer_affine_ras, model, settings, want_probabilities,
                                    want_uncertainty, progress, geometry)
    if card.pipeline.parts and want_probabilities:
        raise MedsegError(f"{model.title} runs in {len(card.pipeline.parts)} parts; it gives labels and "
                          "uncertainty, not one probability map per class")
    report(progress, 0.0, "preparing the scan")
    in_file_order = card.pipeline.file_order and geometry is not None and geometry.source_format != "napari"
    work, work_affine = stored_order(layer_array, geometry) if in_file_order else (layer_array, layer_affine_ras)
    prepared = prepare(work, work_affine, card, model.roi_network, pick_device(settings.device), settings.network_amp)
    if card.pipeline.parts:
        labels, probabilities, uncertainty, run_info = _parts_onto_scan(prepared, model, settings, want_probabilities,
                                                                        want_uncertainty, progress)
    else:
        labels, probabilities, uncertainty, run_info = _onto_scan(prepared, model, settings, want_probabilities,
                                                                  want_uncertainty, span(progress, 0.05, 0.9))
    if in_file_order:
        labels, probabilities, uncertainty = (None if x is None else from_stored_order(x, geometry)
                                              for x in (labels, probabilities, uncertainty))
    raw_labels = labels.copy() if apply_postprocessing and card.pipeline.postprocessing else labels
    first_channel = layer_array[0] if np.ndim(layer_array) == 4 else layer_array
    if apply_postprocessing and card.pipeline.postprocessing:
        postprocess(labels, first_channel, card.pipeline.postprocessing)
    info = dict(run_info, model_shape=list(prepared.model_shape), scan_shape=list(prepared.layer_shape),
                region=prepared.info.get("region"), postprocessed=bool(apply_postprocessing),
                first_stage_seconds=prepared.info.get("first_stage_seconds", 0.0))
    return _finished(labels, raw_labels, probabilities, uncertainty, info, first_channel, layer_affine_ras, model,
                     progress)


def stored_order(layer_array, geometry) -> tuple:
    """A layer-order scan (or ``(C, D, H, W)``) in the file's stored voxel order as SimpleITK
    reads it (``(k, j, i)``, as nnU-Net sees it), and the RAS affine of those indices."""
    def one(array):
        return np.ascontiguousarray(np.transpose(geometry.to_file(array), (2, 1, 0)))

    array = np.stack([one(c) for c in layer_array]) if np.ndim(layer_array) == 4 else one(layer_array)
    return array, np.asarray(geometry.affine_ras)[:, [2, 1, 0, 3]]


def from_stored_order(array: np.ndarray, geometry) -> np.ndarray:
    """The inverse of :func:`stored_order` for a result: ``(D, H, W)`` or ``(C, D, H, W)``."""
    def one(values):
        return np.ascontiguousarray(geometry.to_layer(np.transpose(values, (2, 1, 0))))

    return np.stack([one(c) for c in array]) if np.ndim(array) == 4 else one(array)


def _onto_scan(prepared, model, settings, want_probabilities, want_uncertainty, progress):
    """One network's windows over a prepared scan, and the labels (and maps) back on the scan grid."""
    card = model.card
    output = card.pipeline.output
    # Labels come from linearly resampled scores when the grid differs and the scores fit
    # in memory; otherwise they are streamed on the network grid and placed by nearest voxel.
    score_bytes = 4 * card.n_classes * int(np.prod(prepared.model_shape))
    # nnU-Net's way back ('spline' grids) resamples the logits, so they are always kept.
    smooth = (prepared.resampled and score_bytes <= KEEP_SCORES_BYTES) or prepared.interpolation == "spline"
    keep = (output,) if (smooth or want_probabilities or want_uncertainty) else ()
    if card.pipeline.windows.blend_folds_apart and settings.step is not None \
            and int(card.network.hparams.get("folds", 1)) > 1:
        result = folds_blended_apart(prepared.tensor, model, settings, span(progress, 0.0, 0.95))
    else:
        result = sliding_window(prepared.tensor, predictor_for(model, settings), card.pipeline.patch_size, settings,
                                labels_from=output, threshold=card.pipeline.threshold, keep=keep,
                                progress=span(progress, 0.0, 0.95))
    report(progress, 0.95, "mapping the result onto the scan grid")
    scores = result.maps.pop(output, None)
    probabilities = uncertainty = None
    regions = card.pipeline.regions
    if want_uncertainty:
        uncertainty = to_scan(region_entropy(scores) if regions else normalised_entropy(scores, output), prepared)
    if prepared.interpolation == "spline":
        # Rounded as nnU-Net stores its resampled logits (float16), to reproduce it.
        rounding = torch.float16 if settings.blend_dtype == "float16" else None
        if want_probabilities:
            probabilities = probabilities_to_scan(scores, prepared, output, rounding, regions)
        labels = labels_to_scan(scores, prepared, dtype=rounding, regions=regions)
    else:
        if regions:
            raise MedsegError(f"{card.title} is region-based; its way back is nnU-Net's ('spline' grids) only")
        if scores is not None and output == "logits":
            scores = torch.softmax(scores, 0)
        if want_probabilities:
            probabilities = probabilities_to_scan(scores, prepared, "probabilities")
        if smooth:
            binary = card.pipeline.threshold is not None and scores.shape[0] == 2
            # A binary model needs only its foreground channel: half the memory of the resampling.
            labels = labels_to_scan(scores[1:] if binary else scores, prepared, card.pipeline.threshold)
        else:
            labels = labels_to_scan_nearest(result.labels, prepared)
    return labels, probabilities, uncertainty, result.info


def _parts_onto_scan(prepared, model, settings, want_probabilities, want_uncertainty, progress):
    """A model in parts: each part on the same prepared scan in turn, its classes mapped onto the
    merged labels, a later part's labels written over an earlier one's, as TotalSegmentator merges them.
    The uncertainty is the highest of the parts' entropies."""
    from .nnunet import part_models

    parts = part_models(model)
    labels = uncertainty = None
    info = {"windows": 0, "seconds": 0.0, "parts": len(parts)}
    for index, (part, table) in enumerate(zip(parts, model.card.pipeline.parts)):
        report(progress, 0.05 + 0.85 * index / len(parts), f"part {index + 1} of {len(parts)}")
        part_labels, _, part_uncertainty, part_info = _onto_scan(
            prepared, part, settings, False, want_uncertainty,
            span(progress, 0.05 + 0.85 * index / len(parts), 0.05 + 0.85 * (index + 1) / len(parts)))
        lookup = np.zeros(len(table), dtype=np.uint16)
        for part_value, merged in table:
            lookup[part_value] = merged
        mapped = lookup[part_labels]
        if labels is None:
            labels = np.zeros(mapped.shape, dtype=np.uint8 if model.card.n_classes <= 256 else np.uint16)
        np.copyto(labels, mapped.astype(labels.dtype, copy=False), where=mapped != 0)
        if part_uncertainty is not None:
            uncertainty = part_uncertainty if uncertainty is None else np.maximum(uncertainty, part_uncertainty)
        info = dict(part_info, windows=info["windows"] + part_info.get("windows", 0),
                    seconds=info["seconds"] + part_info.get("seconds", 0.0), parts=len(parts))
    return labels, None, uncertainty, info


def _finished(labels, raw_labels, probabilities, uncertainty, info, layer_array, layer_affine_ras, model,
              progress) -> Segmentation:
    """The segmentation with its volumes and the card's plausibility warnings."""
    from .domain import result_warnings

    card = model.card
    info = dict(info, model=model.title, model_sha256=card.content_sha256)
    segmentation = Segmentation(labels, probabilities, card.label_names, card.label_colors,
                                layer_spacing(layer_affine_ras), info,
                                {label.value: label.expected_ml for label in card.labels if label.expected_ml},
                                uncertainty)
    rows = segmentation.volumes()
    segmentation.info["volumes"] = rows
    segmentation.warnings.extend(result_warnings(segmentation, raw_labels, layer_array, card, rows))
    report(progress, 1.0, "done")
    return segmentation


def _segment_with_bundle(layer_array, layer_affine_ras, model, settings, want_probabilities, want_uncertainty,
                         progress, geometry=None) -> Segmentation:
    """A MONAI bundle's model: its own transforms, inferer and inverse, on our device and predictor."""
    from .bundle import bundle_prediction

    labels, probabilities, info = bundle_prediction(
        layer_array, layer_affine_ras, model.card, model.network, pick_device(settings.device), settings.amp,
        want_probabilities or want_uncertainty, progress, geometry)
    uncertainty = None
    if want_uncertainty and probabilities is not None:
        # A bundle whose channels are regions (sigmoids) gives the highest binary entropy of them.
        regional = model.card.pipeline.bundle.get("label_values") is not None
        uncertainty = (region_entropy(torch.logit(probabilities.float().clamp(1e-6, 1 - 1e-6))) if regional
                       else normalised_entropy(probabilities, "probabilities")).numpy()
    probabilities = probabilities.float().numpy() if probabilities is not None else None
    info = dict(info, scan_shape=list(np.shape(layer_array)[-3:]), postprocessed=True)
    first_channel = layer_array[0] if np.ndim(layer_array) == 4 else layer_array
    return _finished(labels, labels, probabilities if want_probabilities else None, uncertainty, info,
                     first_channel, layer_affine_ras, model, progress)


def labels_to_scan_nearest(labels: np.ndarray, prepared: PreparedScan) -> np.ndarray:
    """Labels computed on the network grid, put back on the scan grid by nearest voxel."""
    from .pipeline import from_working

    from .pipeline import paste

    full = np.zeros(prepared.working_shape, dtype=np.uint8)
    if tuple(labels.shape) != prepared.region_shape:
        index = [np.minimum(((np.arange(m) + 0.5) * n / m).astype(np.intp), n - 1)
                 for n, m in zip(labels.shape, prepared.region_shape)]
        labels = labels[np.ix_(*index)]
    paste(full, labels, prepared.region)
    return np.ascontiguousarray(from_working(full, prepared.axis_order))
