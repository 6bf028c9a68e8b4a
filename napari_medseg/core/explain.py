"""Why the model decided, and where it is unsure: explanation maps in the scan's own geometry.

Every map is made by the same sliding-window engine and pipeline as a prediction
(:mod:`.inference`, :mod:`.pipeline`): a predictor returns an extra per-window output,
the engine blends it with the same Gaussian weights, and :func:`~.pipeline.to_scan`
brings it back onto the scan grid. Methods:

* ``attention``: the attention-gate coefficients of each gate (attention U-Net only);
* ``gradcam``: Grad-CAM (Selvaraju et al. 2017) for a segmentation target, as in
  Seg-Grad-CAM (Vinogradova et al. 2020): the target is the sum of class *c*'s logits
  over a region (the predicted mask, one of its connected parts, or a mask the user
  draws). Per window, the gradient of that target weights the chosen layer's channels
  (default: the last decoder block); the windows' maps are blended, then normalised
  once, over the whole volume. At a layer followed only by a 1x1 convolution (the
  attention U-Net's last block), the weights are the head's own, times a constant, so
  the region does not change the map; pick an earlier block to explain a region;
* ``entropy``: the predictive entropy of the blended class probabilities (it comes
  with the prediction: one pass);
* ``tta``: the variance of the foreground probability over mirrored passes;
* ``activation``: one channel of a chosen layer's output.

:func:`uncertain_regions` turns an uncertainty map into a list of connected doubtful
regions, largest or most uncertain first, with their volume and their centre in
patient millimetres.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .card import EXPLAIN_METHODS
from .errors import MedsegError
from .geometry import RAS_TO_LPS, voxel_spacing
from .inference import InferenceSettings, NetworkPredictor, mirror_flips, normalised_entropy, sliding_window
from .network import class_scores
from .pipeline import onto_grid_nearest, prepare, to_scan
from .progress import Progress, report, span

METHODS = EXPLAIN_METHODS  # the one list lives with the model card
# A cache of recent maps: the same scan, model, method and options are not recomputed.
CACHE_SIZE = 8
_cache: "OrderedDict[tuple, Explanation]" = OrderedDict()


@dataclass
class Explanation:
    """A map on the scan's grid (layer order), or several (channels first), and what it shows."""

    maps: np.ndarray                    # (D, H, W) or (C, D, H, W) float32, layer order
    method: str
    names: list                         # one name per map: "entropy", "gates.0", ...
    contrast_limits: tuple
    info: dict = field(default_factory=dict)

    @property
    def map(self) -> np.ndarray:
        return self.maps if self.maps.ndim == 3 else self.maps[0]


def layer_names(network: torch.nn.Module) -> list:
    """The named layers a user may pick for Grad-CAM or activations (containers with parameters)."""
    names = []
    for name, module in network.named_modules():
        if name and any(True for _ in module.parameters(recurse=True)) and name.count(".") <= 1:
            names.append(name)
    return names


# The default Grad-CAM layer of each architecture a card may name.
DEFAULT_LAYERS = {
    "AttentionUNet3D": lambda network: f"decoders.{len(network.decoders) - 1}",
    "LinkNet3d": lambda network: "tp_conv1",
    # An imported nnU-Net model: the first fold's last decoder stage.
    "NnUNetEnsemble": lambda network: f"folds.0.decoder.stages.{len(network.folds[0].decoder.stages) - 1}",
}


def default_layer(network: torch.nn.Module, architecture: str) -> str:
    """The last decoder block of the card's ``architecture``: semantic, and fine enough to
    localise. For the attention U-Net the last of ``decoders``; for LinkNet3d ``tp_conv1``,
    the transposed-convolution block that ends its decoder at full resolution (``conv`` and
    ``tp_conv2`` after it are the classifier). Measured on the MNI152 head: 82 % of its
    Grad-CAM mass lies within 5 mm of the predicted brain, against 65 % for ``up3``
    (benchmarks/bench_explain.py)."""
    if architecture not in DEFAULT_LAYERS:
        raise MedsegError(f"no default Grad-CAM layer for {architecture}; pass --layer")
    return DEFAULT_LAYERS[architecture](network)


def _module(network: torch.nn.Module, name: str) -> torch.nn.Module:
    modules = dict(network.named_modules())
    if name not in modules:
        raise MedsegError(f"the network has no layer '{name}' (choose one of: {', '.join(layer_names(network))})")
    return modules[name]


def _to_window(maps: torch.Tensor, shape: tuple) -> torch.Tensor:
    return maps if tuple(maps.shape[2:]) == tuple(shape) else \
        F.interpolate(maps, size=tuple(shape), mode="trilinear", align_corners=False)


class _AttentionPredictor(NetworkPredictor):
    def __call__(self, windows: torch.Tensor) -> dict:
        self.network.record_attention = True
        try:
            logits = self.forward(windows)
            gates = self.network.attention_maps
            stacked = torch.cat([_to_window(gates[name].float(), windows.shape[2:]) for name in sorted(gates)], 1)
        finally:
            self.network.record_attention = False
        return {"logits": logits, "attention": stacked}


class _ActivationPredictor(NetworkPredictor):
    def __init__(self, network, layer: str, channel: int, **kwargs):
        super().__init__(network, **kwargs)
        self.layer, self.channel = layer, channel

    def __call__(self, windows: torch.Tensor) -> dict:
        seen = {}
        handle = _module(self.network, self.layer).register_forward_hook(
            lambda module, inputs, output: seen.update(out=output))
        try:
            output = self.forward(windows)
        finally:
            handle.remove()
        activation = seen["out"]
        if not 0 <= self.channel < activation.shape[1]:
            raise MedsegError(f"layer '{self.layer}' has channels 0 to {activation.shape[1] - 1}; "
                              f"channel {self.channel} does not exist")
        return {self.output: output, "activation": _to_window(activation[:, self.channel:self.channel + 1].float(),
                                                              windows.shape[2:])}


class GradCamPredictor(NetworkPredictor):
    """Grad-CAM per window for a segmentation target: class ``target`` summed over a region.

    A given region travels as the window's second channel (so every window sees its own
    part of it); without one, the region is the window's own prediction of the class,
    which costs no second pass. Gradients flow only from the output back to the chosen
    layer: the layer's output becomes a leaf that requires grad, and nothing before it
    builds a graph.
    """

    needs_gradients = True

    def __init__(self, network, layer: str, target: int, **kwargs):
        super().__init__(network, **kwargs)
        self.layer, self.target = layer, target

    def __call__(self, windows: torch.Tensor) -> dict:
        image, region = windows[:, :1], (windows[:, 1:2] if windows.shape[1] > 1 else None)
        captured = {}

        def hook(module, inputs, output):
            leaf = output.detach().requires_grad_(True)
            captured["activation"] = leaf
            return leaf

        handle = _module(self.network, self.layer).register_forward_hook(hook)
        try:
            with torch.enable_grad():
                logits = class_scores(self.network, image, self.output)
                if region is None:
                    region = (logits.detach().argmax(1, keepdim=True) == self.target).to(logits.dtype)
                score = (logits[:, self.target] * region[:, 0]).sum()
                activation = captured["activation"]
                if score.requires_grad:
                    gradient, = torch.autograd.grad(score, activation)
                else:  # an empty region: no evidence
                    gradient = torch.zeros_like(activation)
        finally:
            handle.remove()
        weights = gradient.mean(dim=(2, 3, 4), keepdim=True)
        cam = F.relu((weights * activation).sum(1, keepdim=True)).detach()
        probabilities = torch.softmax(logits.detach().float(), 1)
        return {"probabilities": probabilities, "gradcam": _to_window(cam.float(), image.shape[2:])}


def _target_index(model, target) -> int:
    names = model.card.label_names
    if target is None:
        return 1
    if isinstance(target, (int, np.integer)) or str(target).isdigit():
        value = int(target)
        if value not in names:
            raise MedsegError(f"class {value} does not exist (the model's labels are {names})")
        return value
    for value, name in names.items():
        if name.lower() == str(target).lower():
            return value
    raise MedsegError(f"the model has no class '{target}' (its labels: {', '.join(names.values())})")


def _weights_fingerprint(network: torch.nn.Module) -> str:
    """A cheap fingerprint of the weights themselves (a card alone does not identify a network)."""
    digest = hashlib.sha1()
    with torch.no_grad():
        for name, parameter in network.state_dict().items():
            digest.update(name.encode())
            digest.update(np.float64(parameter.double().sum()).tobytes())
    return digest.hexdigest()


def _key(layer_array, affine, model, method, options) -> tuple:
    values = np.ascontiguousarray(layer_array)
    digest = hashlib.sha1(values[::3, ::3, ::3].tobytes()).hexdigest()
    return (digest, values.shape, str(values.dtype), tuple(np.round(np.asarray(affine), 4).ravel()),
            _weights_fingerprint(model.network), method, tuple(sorted(options.items())))


def explain(layer_array: np.ndarray, layer_affine_ras: np.ndarray, model, method: str, *, target=None,
            layer: str | None = None, channel: int = 0, region: np.ndarray | None = None,
            settings: InferenceSettings | None = None, progress: Progress | None = None) -> Explanation:
    """One explanation map of ``model`` on a layer-order scan, on the scan's own grid.

    ``target``: class value or name (Grad-CAM; default the first foreground class).
    ``layer``/``channel``: for Grad-CAM and activations. ``region``: a layer-order mask
    restricting Grad-CAM's target (default: the predicted mask of the target class).
    """
    if method not in METHODS:
        raise MedsegError(f"unknown method '{method}' (use one of: {', '.join(METHODS)})")
    if method not in model.card.explain:
        offers = ', '.join(model.card.explain) or 'none'
        raise MedsegError(f"{model.title} does not offer {method} maps (it offers: {offers})")
    settings = settings or InferenceSettings()
    options = {"target": str(target), "layer": str(layer), "channel": channel, "tta": settings.tta,
               "region": hashlib.sha1(np.ascontiguousarray(region).tobytes()).hexdigest() if region is not None else ""}
    key = _key(layer_array, layer_affine_ras, model, method, options)
    if key in _cache:
        _cache.move_to_end(key)
        report(progress, 1.0, "done (computed before)")
        return _cache[key]
    result = _explain(layer_array, layer_affine_ras, model, method, target, layer, channel, region, settings, progress)
    _cache[key] = result
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return result


def _explain(layer_array, affine, model, method, target, layer, channel, region, settings, progress) -> Explanation:
    card = model.card
    settings = settings.for_card(card)
    report(progress, 0.0, "preparing the scan")
    from .devices import pick_device

    prepared = prepare(layer_array, affine, card, model.roi_network, pick_device(settings.device))
    flips = mirror_flips(card) if settings.tta else ((),)
    common = {"output": card.pipeline.output, "amp": settings.amp, "flips": flips}
    output = card.pipeline.output
    patch = card.pipeline.patch_size
    info = {"model": model.title, "method": method}
    if method in ("entropy", "tta"):
        predictor = NetworkPredictor(model.network, output=output, amp=settings.amp,
                                     flips=mirror_flips(card) if method == "tta" else flips, variance=method == "tta")
        keep = ("tta_variance",) if method == "tta" else (output,)
        result = sliding_window(prepared.tensor, predictor, patch, settings, labels_from=None, keep=keep,
                                progress=span(progress, 0.05, 0.85))
        if method == "entropy":
            grid_map = normalised_entropy(result.maps[output], output)
            names, limits = ["entropy"], (0.0, 1.0)
        else:
            grid_map = result.maps["tta_variance"][0]
            names, limits = ["tta variance"], (0.0, 0.25)
        maps = to_scan(grid_map, prepared)
    elif method == "attention":
        if not hasattr(model.network, "attention_maps"):
            raise MedsegError(f"{model.title} has no attention gates")
        predictor = _AttentionPredictor(model.network, **common)
        result = sliding_window(prepared.tensor, predictor, patch, settings, labels_from=None,
                                keep=("attention",), progress=span(progress, 0.05, 0.85))
        gates = sorted(model.network.attention_maps) or [f"gates.{i}" for i in range(result.maps["attention"].shape[0])]
        chosen = list(range(len(gates)))
        if layer is not None:
            if layer not in gates:
                raise MedsegError(f"no attention gate '{layer}' (the gates are: {', '.join(gates)})")
            chosen = [gates.index(layer)]
        maps = to_scan(result.maps["attention"][chosen], prepared)
        names, limits = [gates[i] for i in chosen], (0.0, 1.0)
        if len(chosen) == 1:
            maps = maps[0]
    elif method == "activation":
        layer = layer or default_layer(model.network, model.card.network.architecture)
        predictor = _ActivationPredictor(model.network, layer, int(channel), **common)
        result = sliding_window(prepared.tensor, predictor, patch, settings, labels_from=None,
                                keep=("activation",), progress=span(progress, 0.05, 0.85))
        maps = to_scan(result.maps["activation"][0], prepared)
        high = float(np.percentile(np.abs(maps), 99.5)) or 1.0
        names, limits = [f"{layer} channel {channel}"], (-high, high) if maps.min() < 0 else (0.0, high)
        info.update(layer=layer, channel=int(channel))
    else:  # gradcam
        layer = layer or default_layer(model.network, model.card.network.architecture)
        value = _target_index(model, target)
        if region is None:
            stacked = prepared.tensor  # the region is each window's own prediction of the class
            info["region"] = "the predicted mask"
        else:
            region = np.asarray(region) > 0
            if region.shape != np.shape(layer_array):
                raise MedsegError(f"the region has shape {region.shape}, but the scan {np.shape(layer_array)}")
            info.update(region="a given mask", region_voxels=int(region.sum()))
            stacked = torch.stack([prepared.tensor, onto_grid_nearest(region.astype(np.uint8), prepared)])
        predictor = GradCamPredictor(model.network, layer, value, **common)
        result = sliding_window(stacked, predictor, patch, settings, labels_from=None, keep=("gradcam",),
                                progress=span(progress, 0.05, 0.85))
        maps = to_scan(result.maps["gradcam"][0], prepared)
        peak = float(maps.max())
        maps = maps / peak if peak > 0 else maps  # one normalisation, over the whole volume
        names, limits = [f"Grad-CAM {model.card.label_names[value]} at {layer}"], (0.0, 1.0)
        info.update(layer=layer, target=model.card.label_names[value], windows=result.info["windows"])
    report(progress, 1.0, "done")
    return Explanation(np.ascontiguousarray(maps, dtype=np.float32), method, names, limits, info)


# -- doubtful regions --------------------------------------------------------------------------

def uncertain_regions(uncertainty: np.ndarray, layer_affine_ras: np.ndarray, threshold: float | None = None,
                      min_voxels: int = 10, order: str = "size", limit: int = 50) -> list:
    """Connected regions of high uncertainty, largest (or most uncertain) first.

    ``threshold`` defaults to half of the map's 99.9th percentile. Each region gives its
    voxel count, volume in mL, mean and peak uncertainty, its centre as a layer index and
    in patient millimetres (RAS and LPS).
    """
    from scipy import ndimage

    values = np.asarray(uncertainty, dtype=np.float32)
    if threshold is None:
        top = float(np.percentile(values, 99.9))
        threshold = 0.5 * top if top > 0 else 1.0
    labels, count = ndimage.label(values > threshold)
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(np.ones_like(values), labels, index)
    means = ndimage.mean(values, labels, index)
    peaks = ndimage.maximum(values, labels, index)
    centres = ndimage.center_of_mass(values, labels, index)
    voxel_ml = float(np.prod(voxel_spacing(layer_affine_ras))) / 1000.0
    regions = []
    for n, size, mean, peak, centre in zip(index, sizes, means, peaks, centres):
        if size < min_voxels:
            continue
        ras = np.asarray(layer_affine_ras) @ np.r_[centre, 1.0]
        regions.append({"id": int(n), "voxels": int(size), "ml": round(float(size) * voxel_ml, 3),
                        "mean": round(float(mean), 4), "peak": round(float(peak), 4),
                        "centre_index": [round(float(c), 2) for c in centre],
                        "centre_ras_mm": [round(float(v), 2) for v in ras[:3]],
                        "centre_lps_mm": [round(float(v), 2) for v in (RAS_TO_LPS @ ras)[:3]]})
    key = (lambda r: -r["voxels"]) if order == "size" else (lambda r: -r["mean"])
    regions.sort(key=key)
    return regions[:limit]


def region_mask(labels: np.ndarray, value: int, component: int | None = None) -> np.ndarray:
    """The predicted mask of one class, or one connected part of it (1 = the largest)."""
    from scipy import ndimage

    mask = np.asarray(labels) == value
    if component is None:
        return mask
    parts, count = ndimage.label(mask)
    if not 1 <= component <= count:
        raise MedsegError(f"the mask has {count} connected part(s); part {component} does not exist")
    sizes = np.bincount(parts.ravel())[1:]
    order = np.argsort(-sizes) + 1
    return parts == order[component - 1]
