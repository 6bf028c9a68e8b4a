"""Training a segmentation model from a Medical Segmentation Decathlon / nnU-Net folder.

Layout read: ``dataset.json`` plus ``imagesTr/`` and ``labelsTr/``. Both the MSD
form (``"training": [{"image": ..., "label": ...}]``, labels ``{"0": "background"}``)
and the nnU-Net v2 form (``imagesTr/CASE_0000.nii.gz``, labels ``{"background": 0}``)
are accepted. Images are read with :func:`napari_medseg.core.io.read_volume`, so any
supported format and orientation works.

Robustness comes from augmentation done on the fly, on the model grid:

* **spatial**: random rotation (any axis), anisotropic scale, shift and crop, so the
  model sees heads in any position and field of view;
* **intensity**: gamma, bias field, noise, blur, low resolution along one axis
  (thick slices);
* **synthesis** (after SynthStrip, Hoopes et al. 2022): each label is split into
  intensity tissue classes and, for a share of the samples, every class gets a random
  intensity, so the model learns shape rather than one contrast.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MedsegError
from .geometry import LAYER_AXCODES
from .io import read_volume
from .preprocess import intensity_parameters, layer_spacing

Progress = Callable[[float, str], None]
TISSUES_PER_LABEL = 3


@dataclass
class TrainingCase:
    name: str
    image: torch.Tensor      # (D, H, W) float32, layer order
    label: torch.Tensor      # (D, H, W) uint8
    tissue: torch.Tensor     # (D, H, W) uint8 tissue classes for synthesis
    spacing: tuple
    layer_affine_ras: np.ndarray


@dataclass
class Dataset:
    cases: list
    label_names: list
    modality: str


def _tissue_classes(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Split every label into intensity tertiles; dark background (air) is its own class."""
    tissue = np.zeros(label.shape, dtype=np.uint8)
    high = float(np.percentile(image, 99))
    next_id = 1
    for value in np.unique(label):
        inside = label == value
        values = image[inside]
        if value == 0:
            air = inside & (image < 0.1 * high)
            inside = inside & ~air
            values = image[inside]
            next_id += 1  # class 0 stays "air"
        if values.size == 0:
            continue
        edges = np.percentile(values, np.linspace(0, 100, TISSUES_PER_LABEL + 1)[1:-1])
        tissue[inside] = next_id + np.digitize(values, edges).astype(np.uint8)
        next_id += TISSUES_PER_LABEL
    return tissue


def _entries(data_dir: Path, meta: dict) -> list[tuple[Path, Path]]:
    pairs = []
    for item in meta.get("training", []):
        if isinstance(item, dict) and "image" in item and "label" in item:
            pairs.append((data_dir / item["image"], data_dir / item["label"]))
    if pairs:
        return pairs
    for label in sorted((data_dir / "labelsTr").glob("*")):
        if label.name.startswith("."):
            continue
        stem = label.name.split(".")[0]
        suffix = label.name[len(stem):]
        candidates = [data_dir / "imagesTr" / f"{stem}_0000{suffix}", data_dir / "imagesTr" / label.name]
        image = next((c for c in candidates if c.exists()), None)
        if image is not None:
            pairs.append((image, label))
    return pairs


def read_dataset(data_dir: str | Path, progress: Progress | None = None) -> Dataset:
    """Read every training case of an MSD / nnU-Net folder into memory (layer order)."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "dataset.json"
    if not meta_path.is_file():
        raise MedsegError(f"'{data_dir.name}' has no dataset.json (expected the MSD / nnU-Net layout)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MedsegError(f"dataset.json in '{data_dir.name}' is not valid JSON ({exc})") from None
    labels = meta.get("labels") or {}
    if labels and all(str(k).isdigit() for k in labels):
        names = [labels[k] for k in sorted(labels, key=int)]
    else:
        names = [name for name, _ in sorted(labels.items(), key=lambda kv: int(kv[1]))]
    if len(names) < 2:
        raise MedsegError("dataset.json must name at least two labels (background and one structure)")
    modality_map = meta.get("modality") or meta.get("channel_names") or {"0": "MR"}
    modality = str(next(iter(modality_map.values()))).upper()
    modality = "CT" if "CT" in modality else "MR"
    pairs = _entries(data_dir, meta)
    if not pairs:
        raise MedsegError(f"no training cases found in '{data_dir.name}' (imagesTr/ and labelsTr/)")
    cases = []
    for index, (image_path, label_path) in enumerate(pairs):
        image = read_volume(image_path)
        label = read_volume(label_path)
        if label.geometry.file_shape != image.geometry.file_shape:
            raise MedsegError(f"label '{label_path.name}' has shape {label.geometry.file_shape} but its "
                              f"image has {image.geometry.file_shape}")
        image_layer = np.asarray(image.layer_data(), dtype=np.float32)
        label_layer = np.asarray(image.geometry.to_layer(np.asarray(label.data)), dtype=np.int64)
        if label_layer.min() < 0 or label_layer.max() >= len(names):
            raise MedsegError(f"label '{label_path.name}' holds values outside 0..{len(names) - 1}")
        label_layer = label_layer.astype(np.uint8)
        cases.append(TrainingCase(
            name=label_path.name.split(".")[0],  # nnU-Net images carry a _0000 channel suffix
            image=torch.from_numpy(np.ascontiguousarray(image_layer)),
            label=torch.from_numpy(np.ascontiguousarray(label_layer)),
            tissue=torch.from_numpy(_tissue_classes(image_layer, label_layer)),
            spacing=layer_spacing(image.geometry.layer_affine_ras),
            layer_affine_ras=image.geometry.layer_affine_ras,
        ))
        if progress:
            progress((index + 1) / len(pairs), f"read case {index + 1} of {len(pairs)}")
    return Dataset(cases, names, modality)


# -- augmentation ----------------------------------------------------------------------

def _rotation(angles: np.ndarray) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class Augmentation:
    """Strength of the random transforms (the defaults are the brain model's)."""

    max_rotation_deg: float = 40.0
    scale_range: tuple = (0.85, 1.2)
    max_shift_mm: float = 25.0
    synthesis_probability: float = 0.4
    thick_slice_probability: float = 0.3
    bias_strength: float = 0.5
    noise_max: float = 0.06
    gamma_std: float = 0.3
    flip_probability: float = 0.5


def random_view(case: TrainingCase, shape: tuple, spacing: tuple, rng: np.random.Generator,
                aug: Augmentation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resample a randomly rotated, scaled and shifted view of ``case`` onto a model-grid patch.

    Returns image (trilinear), label and tissue (nearest), each ``(D, H, W)``.
    """
    src_shape = np.array(case.image.shape, dtype=float)
    src_spacing = np.array(case.spacing, dtype=float)
    # Work in the case's layer-axis millimetres, centred on the labelled structure.
    foreground = torch.nonzero(case.label[::4, ::4, ::4] > 0).float().numpy() * 4
    centre_vox = foreground.mean(axis=0) if len(foreground) else (src_shape - 1) / 2
    angles = np.deg2rad(rng.uniform(-aug.max_rotation_deg, aug.max_rotation_deg, 3))
    scale = rng.uniform(*aug.scale_range, 3)
    matrix = _rotation(angles) @ np.diag(scale)
    if rng.random() < aug.flip_probability:
        matrix = matrix @ np.diag([1.0, 1.0, -1.0])  # left-right mirror: brains are near-symmetric
    shift = rng.uniform(-aug.max_shift_mm, aug.max_shift_mm, 3)
    out = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)],
                               indexing="ij"), axis=-1).reshape(-1, 3)
    src_mm = out @ matrix.T + shift + centre_vox * src_spacing
    src_vox = src_mm / src_spacing
    # grid_sample wants (x, y, z) = (W, H, D) normalised with align_corners=False.
    norm = (2 * src_vox + 1) / src_shape - 1
    grid = torch.from_numpy(norm[:, ::-1].copy()).float().view(1, *shape, 3)
    image = F.grid_sample(case.image[None, None], grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)[0, 0]
    stacked = torch.stack([case.label, case.tissue]).float()[None]
    nearest = F.grid_sample(stacked, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
    return image, nearest[0].to(torch.uint8), nearest[1].to(torch.uint8)


def _smooth_field(shape: tuple, rng: np.random.Generator, control: int = 4) -> torch.Tensor:
    coarse = torch.from_numpy(rng.standard_normal((1, 1, control, control, control))).float()
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0, 0]


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma < 0.3:
        return image
    radius = int(math.ceil(2.5 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = image[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(kernel)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out[0, 0]


def augment_intensity(image: torch.Tensor, tissue: torch.Tensor, rng: np.random.Generator,
                      aug: Augmentation) -> torch.Tensor:
    """Random contrast, bias, blur, resolution and noise; returns a new tensor."""
    if rng.random() < aug.synthesis_probability:
        n = int(tissue.max()) + 1
        means = torch.from_numpy(rng.uniform(0, 1, n)).float()
        means[0] = rng.uniform(0, 0.15)  # air stays dark-ish, as in every MR and CT
        stds = torch.from_numpy(rng.uniform(0, 0.08, n)).float()
        image = means[tissue.long()] + stds[tissue.long()] * torch.randn(image.shape)
        image = _blur(image, rng.uniform(0.3, 1.2))
    else:
        low, high = float(image.min()), float(np.percentile(image[::2, ::2, ::2].numpy(), 99.5))
        image = ((image - low) / max(high - low, 1e-6)).clamp_(0, 1.5)
        image = image.clamp(min=0) ** float(np.exp(rng.normal(0, aug.gamma_std)))
        if rng.random() < 0.3:
            image = _blur(image, rng.uniform(0.3, 1.0))
    if rng.random() < 0.8:
        image = image * torch.exp(aug.bias_strength * rng.uniform(0, 1) * _smooth_field(tuple(image.shape), rng))
    if rng.random() < aug.thick_slice_probability:
        axis = int(rng.integers(3))
        factor = int(rng.integers(2, 5))
        size = list(image.shape)
        kernel = [1, 1, 1]
        kernel[axis] = factor
        low_res = F.avg_pool3d(image[None, None], kernel, kernel, ceil_mode=True)
        image = F.interpolate(low_res, size=size, mode="trilinear", align_corners=False)[0, 0]
    image = image + float(rng.uniform(0, aug.noise_max)) * float(image.max()) * torch.randn(image.shape)
    return image.clamp_(min=0)


def normalise_tensor(image: torch.Tensor, normalisation: dict) -> torch.Tensor:
    low, high, offset, scale = intensity_parameters(image.numpy(), normalisation)
    return (image.clamp(low, high) - offset) / scale


# -- training loop -----------------------------------------------------------------------

@dataclass
class TrainingConfig:
    name: str = "model"
    version: str = "1.0.0"
    target_spacing: tuple = (2.0, 2.0, 2.0)
    patch_size: tuple = (80, 96, 80)
    channels: tuple = (8, 16, 32, 64)
    steps: int = 1000
    batch_size: int = 1
    learning_rate: float = 3e-3
    seed: int = 0
    device: str = "auto"
    normalisation: dict | None = None
    augmentation: Augmentation | None = None


def make_batch(dataset: Dataset, config: TrainingConfig, rng: np.random.Generator):
    aug = config.augmentation or Augmentation()
    images, labels = [], []
    for _ in range(config.batch_size):
        case = dataset.cases[int(rng.integers(len(dataset.cases)))]
        # The random shift makes each view a random crop of the structure's surroundings.
        image, label, tissue = random_view(case, config.patch_size, config.target_spacing, rng, aug)
        image = augment_intensity(image, tissue, rng, aug)
        image = normalise_tensor(image, config.normalisation)
        images.append(image)
        labels.append(label)
    return torch.stack(images)[:, None], torch.stack(labels)[:, None].long()


def train(dataset: Dataset, config: TrainingConfig, progress: Progress | None = None,
          log: Callable[[str], None] | None = None, initial_state: dict | None = None):
    """Train an :class:`AttentionUNet3D` and return ``(network, card)``."""
    from monai.losses import DiceCELoss

    from .inference import pick_device
    from .network import AttentionUNet3D

    if config.normalisation is None:
        config.normalisation = {"kind": "ct", "window": [-1000, 1000]} if dataset.modality == "CT" \
            else {"kind": "mr_robust_zscore"}
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = pick_device(config.device)
    n_classes = len(dataset.label_names)
    network = AttentionUNet3D(1, n_classes, tuple(config.channels))
    divisor = network.divisor
    if any(p % divisor for p in config.patch_size):
        raise MedsegError(f"patch size {config.patch_size} must be divisible by {divisor}")
    if initial_state is not None:
        network.load_state_dict(initial_state)
    network.to(device).train()
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.learning_rate,
                                                   total_steps=config.steps, pct_start=0.1)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    started = time.perf_counter()
    running = None
    for step in range(config.steps):
        images, labels = make_batch(dataset, config, rng)
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = network(images)
        loss = loss_fn(logits.float(), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        value = loss.item()
        running = value if running is None else 0.95 * running + 0.05 * value
        if log and (step % 25 == 0 or step == config.steps - 1):
            log(f"step {step + 1}/{config.steps} loss {running:.4f} "
                f"({time.perf_counter() - started:.0f} s)")
        if progress:
            progress((step + 1) / config.steps, f"step {step + 1} of {config.steps}, loss {running:.3f}")
    network.eval().cpu()
    card = {
        "name": config.name,
        "version": config.version,
        "architecture": "AttentionUNet3D",
        "hparams": dict(network.hparams),
        "labels": [{"value": i, "name": name, "color": default_color(i)}
                   for i, name in enumerate(dataset.label_names)],
        "modality": dataset.modality,
        "target_spacing": list(config.target_spacing),
        "orientation": "".join(LAYER_AXCODES),
        "normalisation": config.normalisation,
        "patch_size": list(config.patch_size),
        "provenance": {
            "cases": [case.name for case in dataset.cases],
            "steps": config.steps, "batch_size": config.batch_size,
            "learning_rate": config.learning_rate, "seed": config.seed,
            "augmentation": vars(config.augmentation or Augmentation()),
            "training_seconds": round(time.perf_counter() - started, 1),
            "final_loss": running,
        },
        "metrics": {},
    }
    return network, card


PALETTE = [(0, 0, 0, 0), (0.95, 0.35, 0.2, 1), (0.2, 0.6, 1.0, 1), (0.3, 0.85, 0.3, 1),
           (0.95, 0.8, 0.2, 1), (0.7, 0.4, 0.9, 1), (0.2, 0.85, 0.85, 1), (0.95, 0.5, 0.75, 1)]


def default_color(value: int) -> list:
    if value < len(PALETTE):
        return list(PALETTE[value])
    rng = np.random.default_rng(value)
    return [*map(float, rng.uniform(0.3, 1.0, 3)), 1.0]


def dice(prediction: np.ndarray, reference: np.ndarray, value: int = 1) -> float:
    """Dice overlap of one label; 1.0 when both are empty."""
    a = np.asarray(prediction) == value
    b = np.asarray(reference) == value
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def evaluate(network: torch.nn.Module, card: dict, dataset: Dataset, settings=None) -> dict:
    """Mean Dice (foreground labels) per case, through the full predict pipeline."""
    from .inference import segment
    from .models import Model

    model = Model(network.eval(), card)
    per_case = {}
    for case in dataset.cases:
        result = segment(case.image.numpy(), case.layer_affine_ras, model, settings)
        scores = [dice(result.labels, case.label.numpy(), value) for value in range(1, len(card["labels"]))]
        per_case[case.name] = round(float(np.mean(scores)), 4)
    return {"dice": per_case, "mean_dice": round(float(np.mean(list(per_case.values()))), 4)}
