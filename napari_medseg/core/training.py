"""Training and fine-tuning: one data path, one loop, for ``train``, ``finetune`` and the widgets.

Every training case goes through the model card's own prediction pipeline
(:func:`napari_medseg.core.pipeline.prepare`): the same axis order, region of
interest, grid and normalisation as at inference. Its label (and, for fine-tuning, the
map of voxels a reviewer changed) is carried onto the same grid by nearest voxel.
Training samples are random crops of that grid with random rotation, scale, mirror
and intensity changes; optionally (``synthesis_probability``, after SynthStrip, Hoopes
et al. 2022) every tissue class gets a random intensity, so a model learns shape
rather than one contrast.

Each sample draws its randomness from its own generator, seeded by ``(seed, step,
sample)``. So a run that resumes from a checkpoint reaches the same weights as one
that never stopped, and under ``torchrun`` (PyTorch DDP: gloo on the CPU, NCCL on
GPUs) each process computes its share of the same global batch: two processes give
the same model as one.

Datasets are Medical Segmentation Decathlon or nnU-Net v2 folders: ``dataset.json``
plus ``imagesTr/`` and ``labelsTr/`` (``"training": [{"image": ..., "label": ...}]``
with labels ``{"0": "background"}``, or ``imagesTr/CASE_0000.nii.gz`` with labels
``{"background": 0}``).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .card import ModelCard, explain_methods_for
from .errors import MedsegError
from .io import read_volume
from .devices import autocast
from .metrics import mean_dice
from .network import class_scores
from .pipeline import intensity_statistics, normalise, onto_grid_nearest, prepare, working_axis
from .card import default_color
from .progress import Progress, report, span

TISSUES_PER_LABEL = 3
class DatasetError(MedsegError):
    """A dataset with faults; ``faults`` holds one line per fault, each naming its file."""

    def __init__(self, faults: list[str]):
        super().__init__(f"the dataset has {len(faults)} fault(s): " + "; ".join(faults))
        self.faults = [str(MedsegError(f)) for f in faults]


# -- reading a dataset -------------------------------------------------------------------

@dataclass
class ScanCase:
    """One scan with its label in layer order (S, P, L), before any model's pipeline."""

    name: str
    image: np.ndarray            # float32
    label: np.ndarray            # uint8
    layer_affine_ras: np.ndarray
    changed: np.ndarray | None = None   # bool: voxels a reviewer changed (fine-tuning)


@dataclass
class Dataset:
    cases: list
    label_names: list
    modality: str


def _label_names(meta: dict, faults: list) -> list:
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        faults.append("dataset.json: 'labels' must be an object such as {\"0\": \"background\", \"1\": \"brain\"} "
                      "or {\"background\": 0, \"brain\": 1}")
        return []
    try:
        if all(str(k).isdigit() for k in labels):
            pairs = sorted((int(k), str(v)) for k, v in labels.items())
        else:
            pairs = sorted((int(v), str(k)) for k, v in labels.items())
    except (TypeError, ValueError):
        faults.append("dataset.json: every label needs a whole-number value")
        return []
    if [value for value, _ in pairs] != list(range(len(pairs))):
        faults.append(f"dataset.json: label values must be 0..N-1, got {[value for value, _ in pairs]}")
        return []
    if len(pairs) < 2:
        faults.append("dataset.json must name at least two labels (background and one structure)")
    return [name for _, name in pairs]


def _entries(data_dir: Path, meta: dict, faults: list) -> list[tuple[Path, Path]]:
    training = meta.get("training")
    if training is not None:
        if not isinstance(training, list):
            faults.append("dataset.json: 'training' must be a list of {\"image\": ..., \"label\": ...} entries")
            return []
        pairs = []
        for index, item in enumerate(training):
            if not isinstance(item, dict):
                faults.append(f"dataset.json: training entry {index} is not an object")
                continue
            missing = [key for key in ("image", "label") if not isinstance(item.get(key), str)]
            if missing:
                faults.append(f"dataset.json: training entry {index} has no '{missing[0]}' key")
                continue
            pairs.append((data_dir / item["image"], data_dir / item["label"]))
        if pairs or faults:
            return pairs
    pairs = []
    for label in sorted((data_dir / "labelsTr").glob("*")):
        if label.name.startswith("."):
            continue
        stem = label.name.split(".")[0]
        suffix = label.name[len(stem):]
        candidates = [data_dir / "imagesTr" / f"{stem}_0000{suffix}", data_dir / "imagesTr" / label.name]
        image = next((c for c in candidates if c.exists()), None)
        if image is None:
            faults.append(f"{label.name}: no image for this label in imagesTr/")
        else:
            pairs.append((image, label))
    return pairs


def read_dataset(data_dir: str | Path, progress: Progress | None = None) -> Dataset:
    """Read and check every case of an MSD / nnU-Net folder; all faults are reported together."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "dataset.json"
    if not meta_path.is_file():
        raise MedsegError(f"'{data_dir.name}' has no dataset.json (expected the MSD / nnU-Net layout)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedsegError(f"dataset.json in '{data_dir.name}' is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DatasetError([f"dataset.json must be an object with 'labels' and 'training', not a {type(meta).__name__}"])
    faults: list[str] = []
    names = _label_names(meta, faults)
    modality_map = meta.get("modality") or meta.get("channel_names") or {"0": "MR"}
    first = next(iter(modality_map.values()), "MR") if isinstance(modality_map, dict) else "MR"
    modality = "CT" if "CT" in str(first).upper() else "MR"
    pairs = _entries(data_dir, meta, faults)
    if not pairs and not faults:
        faults.append(f"no training cases found in '{data_dir.name}' (imagesTr/ and labelsTr/)")
    cases = []
    for index, (image_path, label_path) in enumerate(pairs):
        case = _read_case(image_path, label_path, len(names), faults)
        if case is not None:
            cases.append(case)
        report(progress, (index + 1) / len(pairs), f"read case {index + 1} of {len(pairs)}")
    if faults:
        raise DatasetError(faults)
    return Dataset(cases, names, modality)


def _naming(path: Path, exc: Exception) -> str:
    """A fault line that names its file once."""
    return str(exc) if path.name in str(exc) else f"{path.name}: {exc}"


def _read_case(image_path: Path, label_path: Path, n_labels: int, faults: list) -> ScanCase | None:
    try:
        image = read_volume(image_path)
    except MedsegError as exc:
        faults.append(_naming(image_path, exc))
        return None
    try:
        label = read_volume(label_path)
    except MedsegError as exc:
        faults.append(_naming(label_path, exc))
        return None
    if label.geometry.file_shape != image.geometry.file_shape:
        faults.append(f"{label_path.name}: shape {label.geometry.file_shape} does not match its image "
                      f"{image_path.name} {image.geometry.file_shape}")
        return None
    if not np.allclose(label.geometry.affine_ras, image.geometry.affine_ras, atol=1e-3):
        faults.append(f"{label_path.name}: its voxels are not placed like those of {image_path.name}")
        return None
    data = np.asarray(label.data)
    if not (np.issubdtype(data.dtype, np.integer) or np.allclose(data, np.round(data))):
        faults.append(f"{label_path.name}: a label map must hold whole numbers")
        return None
    layer_label = np.asarray(image.geometry.to_layer(data))
    if n_labels and (layer_label.min() < 0 or layer_label.max() >= n_labels):
        faults.append(f"{label_path.name}: holds values outside 0..{n_labels - 1}")
        return None
    return ScanCase(name=label_path.name.split(".")[0],  # nnU-Net images carry a _0000 channel suffix
                    image=np.ascontiguousarray(image.layer_data(), dtype=np.float32),
                    label=np.ascontiguousarray(layer_label, dtype=np.uint8),
                    layer_affine_ras=image.geometry.layer_affine_ras)


# -- cases on the network grid ------------------------------------------------------------

@dataclass
class GridCase:
    """A case on its model's network grid: the same preparation as at inference."""

    name: str
    image: torch.Tensor          # (D, H, W) float32, normalised
    label: torch.Tensor          # (D, H, W) uint8
    weight: torch.Tensor         # (D, H, W) float32 loss weight per voxel
    tissue: torch.Tensor         # (D, H, W) uint8 tissue classes, for synthesis
    statistics: dict = field(default_factory=dict)
    centre: np.ndarray | None = None                                      # the labelled structure's centre
    changed_voxels: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int32))


def _tissue_classes(image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Every label split into intensity tertiles; the darkest background (air) is class 0."""
    values_all = image.numpy()
    labels = label.numpy()
    tissue = np.zeros(labels.shape, dtype=np.uint8)
    low = float(np.percentile(values_all, 1))
    high = float(np.percentile(values_all, 99))
    next_id = 1
    for value in np.unique(labels):
        inside = labels == value
        if value == 0:
            inside &= values_all > low + 0.1 * (high - low)
        values = values_all[inside]
        if values.size == 0:
            continue
        edges = np.percentile(values, np.linspace(0, 100, TISSUES_PER_LABEL + 1)[1:-1])
        tissue[inside] = next_id + np.digitize(values, edges).astype(np.uint8)
        next_id += TISSUES_PER_LABEL
    return torch.from_numpy(tissue)


def grid_case(case: ScanCase, card: ModelCard, roi_network=None, changed_weight: float = 0.0) -> GridCase:
    """Prepare one case for training with ``card``'s pipeline."""
    prepared = prepare(case.image, case.layer_affine_ras, card, roi_network)
    label = onto_grid_nearest(case.label, prepared).to(torch.uint8)
    weight = torch.ones(prepared.model_shape, dtype=torch.float32)
    if case.changed is not None and changed_weight > 0:
        weight += changed_weight * onto_grid_nearest(case.changed.astype(np.uint8), prepared)
    foreground = torch.nonzero(label > 0).float()
    changed = torch.nonzero(weight > 1).numpy().astype(np.int32)
    return GridCase(case.name, prepared.tensor, label, weight, _tissue_classes(prepared.tensor, label),
                    prepared.info.get("statistics", {}),
                    foreground.mean(0).numpy() if len(foreground) else None, changed)


# -- augmentation -----------------------------------------------------------------------------

@dataclass
class Augmentation:
    """Strength of the random transforms. The defaults suit fine-tuning; ``train`` asks for more."""

    max_rotation_deg: float = 10.0
    scale_range: tuple = (0.9, 1.1)
    max_shift_mm: float = 20.0
    flip_probability: float = 0.5          # mirrored left-right (brains are near-symmetric)
    synthesis_probability: float = 0.0
    gamma_std: float = 0.2
    bias_strength: float = 0.3
    noise_max: float = 0.05
    blur_probability: float = 0.2


def _rotation(angles: np.ndarray) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_field(shape: tuple, generator: torch.Generator, control: int = 4) -> torch.Tensor:
    coarse = torch.randn((1, 1, control, control, control), generator=generator)
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


def random_crop(case: GridCase, patch: tuple, spacing_mm: tuple, lr_axis: int, rng: np.random.Generator,
                aug: Augmentation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A randomly rotated, scaled, mirrored and shifted patch of a grid case.

    Returns image (trilinear), label, weight and tissue (nearest), each ``patch``-shaped.
    The patch centre lies near the labelled structure, within ``max_shift_mm``; for a
    corrected case, half the patches are centred on a voxel the reviewer changed, so the
    network sees its mistakes even where they lie far from the structure (a neck).
    """
    shape = np.array(case.image.shape, dtype=float)
    changed = case.changed_voxels
    if len(changed) and rng.random() < 0.5:
        centre = changed[int(rng.integers(len(changed)))].astype(float)
    else:
        centre = case.centre if case.centre is not None else (shape - 1) / 2
    centre = centre + rng.uniform(-aug.max_shift_mm, aug.max_shift_mm, 3) / np.asarray(spacing_mm)
    half = (np.asarray(patch) - 1) / 2
    centre = np.clip(centre, np.minimum(half, (shape - 1) / 2), np.maximum(shape - 1 - half, (shape - 1) / 2))
    matrix = _rotation(np.deg2rad(rng.uniform(-aug.max_rotation_deg, aug.max_rotation_deg, 3)))
    matrix = matrix @ np.diag(rng.uniform(*aug.scale_range, 3))
    if rng.random() < aug.flip_probability:
        flip = np.ones(3)
        flip[lr_axis] = -1
        matrix = matrix @ np.diag(flip)
    # Work in millimetres so rotations are true rotations on anisotropic grids.
    spacing = np.asarray(spacing_mm, dtype=float)
    out = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(patch, spacing)],
                               indexing="ij"), axis=-1).reshape(-1, 3)
    source = (out @ matrix.T) / spacing + centre
    norm = (2 * source + 1) / shape - 1
    grid = torch.from_numpy(norm[:, ::-1].copy()).float().view(1, *patch, 3)
    air = float(case.image.min())
    image = F.grid_sample((case.image - air)[None, None], grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)[0, 0] + air
    stacked = torch.stack([case.label.float(), case.weight, case.tissue.float()])[None]
    nearest = F.grid_sample(stacked, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
    weight = nearest[1].clamp(min=1.0)
    return image, nearest[0].to(torch.uint8), weight, nearest[2].to(torch.uint8)


def augment_intensity(image: torch.Tensor, tissue: torch.Tensor, card: ModelCard, rng: np.random.Generator,
                      generator: torch.Generator, aug: Augmentation) -> torch.Tensor:
    """Random contrast, bias, blur and noise on a normalised patch. A synthetic-contrast
    patch is normalised as inference would; a real one keeps its own scale."""
    if rng.random() < aug.synthesis_probability:
        n = int(tissue.max()) + 1
        means = torch.from_numpy(rng.uniform(0, 1, n)).float()
        means[0] = float(rng.uniform(0, 0.15))  # air stays dark, as in every MR and CT
        stds = torch.from_numpy(rng.uniform(0, 0.08, n)).float()
        noise = torch.randn(image.shape, generator=generator)
        raw = means[tissue.long()] + stds[tissue.long()] * noise
        raw = _blur(raw, float(rng.uniform(0.3, 1.2)))
        raw = _bias_and_noise(raw, rng, generator, aug).clamp(min=0)
        if card.pipeline.normalisation.kind == "ct":
            return raw * 2 - 1
        return normalise(raw, card.pipeline.normalisation, intensity_statistics(raw.numpy(),
                                                                                card.pipeline.normalisation))
    # A real image is already normalised the way inference normalises it (statistics from
    # its region): the changes are made on its own scale, which is then kept.
    low, high = float(image.min()), float(image.max())
    raw = ((image - low) / max(high - low, 1e-6)).clamp(0, 1)
    raw = raw ** float(np.exp(rng.normal(0, aug.gamma_std)))
    if rng.random() < aug.blur_probability:
        raw = _blur(raw, float(rng.uniform(0.3, 1.0)))
    raw = _bias_and_noise(raw, rng, generator, aug).clamp(0, 1.5)
    return raw * (high - low) + low


def _bias_and_noise(raw: torch.Tensor, rng: np.random.Generator, generator: torch.Generator,
                    aug: Augmentation) -> torch.Tensor:
    if rng.random() < 0.8:
        raw = raw * torch.exp(aug.bias_strength * float(rng.uniform(0, 1)) * _smooth_field(tuple(raw.shape), generator))
    return raw + float(rng.uniform(0, aug.noise_max)) * torch.randn(raw.shape, generator=generator)


# -- the loop ------------------------------------------------------------------------------------

@dataclass
class TrainingConfig:
    """What to train and how. ``patch_size`` is the training crop on the network grid."""

    steps: int = 1000
    batch_size: int = 1
    patch_size: tuple = (80, 96, 80)
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    augmentation: Augmentation = field(default_factory=Augmentation)
    changed_weight: float = 0.0       # extra loss weight on voxels a reviewer changed
    freeze_batch_norm: bool = False   # keep batch-norm statistics fixed (fine-tuning)
    schedule: str = "onecycle"        # or "constant"
    checkpoint: str | None = None     # where to write checkpoints
    checkpoint_every: int = 0         # steps between checkpoints (0: none)
    resume: str | None = None         # a checkpoint to continue from


def config_faults(config: TrainingConfig, divisor: int, grid_spacing: tuple | None = None) -> list[str]:
    """Every fault of a training configuration, one line each."""
    faults = []
    if not isinstance(config.steps, int) or config.steps <= 0:
        faults.append(f"--steps must be a positive whole number, got {config.steps}")
    if config.batch_size <= 0:
        faults.append(f"--batch-size must be positive, got {config.batch_size}")
    patch = tuple(config.patch_size)
    if len(patch) != 3 or any(int(p) <= 0 for p in patch):
        faults.append(f"--patch-size must be three positive numbers, got {list(patch)}")
    elif any(int(p) % divisor for p in patch):
        faults.append(f"--patch-size {list(patch)}: each side must be a multiple of {divisor}, "
                      f"which the network's depth needs")
    if grid_spacing is not None and (len(grid_spacing) != 3 or any(not (float(s) > 0) for s in grid_spacing)):
        faults.append(f"--spacing must be three positive voxel sizes in mm, got {list(grid_spacing)}")
    if not config.learning_rate > 0:
        faults.append(f"--lr must be positive, got {config.learning_rate}")
    if config.checkpoint_every < 0:
        faults.append(f"--checkpoint-every cannot be negative, got {config.checkpoint_every}")
    return faults


class SegmentationLoss(torch.nn.Module):
    """Cross-entropy weighted per voxel plus soft Dice (MONAI's ``DiceLoss``), per sample."""

    def __init__(self):
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=False)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, labels[:, 0].long(), reduction="none")
        ce = (ce * weights[:, 0]).flatten(1).sum(1) / weights[:, 0].flatten(1).sum(1)
        return ce.mean() + self.dice(logits, labels)


def distributed_context(device: torch.device) -> tuple[int, int]:
    """``(rank, world size)``; under torchrun this joins the process group (gloo or NCCL)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def sample_generators(seed: int, step: int, index: int) -> tuple[np.random.Generator, torch.Generator]:
    """The random streams of one sample of one step: the same in any process and after a resume."""
    rng = np.random.default_rng([seed, step, index])
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return rng, generator


def make_batch(cases: list, card: ModelCard, config: TrainingConfig, step: int, indices: range):
    """The samples ``indices`` of global step ``step`` (a process may take a share of them)."""
    spacing = _grid_spacing(card)
    lr_axis = working_axis(card.pipeline.axis_order, 2)
    images, labels, weights = [], [], []
    for index in indices:
        rng, generator = sample_generators(config.seed, step, index)
        case = cases[int(rng.integers(len(cases)))]
        image, label, weight, tissue = random_crop(case, tuple(config.patch_size), spacing, lr_axis, rng,
                                                   config.augmentation)
        images.append(augment_intensity(image, tissue, card, rng, generator, config.augmentation))
        labels.append(label)
        weights.append(weight)
    return torch.stack(images)[:, None], torch.stack(labels)[:, None], torch.stack(weights)[:, None]


def _grid_spacing(card: ModelCard) -> tuple:
    grid = card.pipeline.grid
    return tuple(grid.spacing) if grid.kind == "spacing" else (1.0, 1.0, 1.0)


def _freeze_batch_norm(network: torch.nn.Module) -> None:
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
            for parameter in module.parameters():
                parameter.requires_grad_(False)


def train(network: torch.nn.Module, card: ModelCard, cases: list, config: TrainingConfig,
          progress: Progress | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Train ``network`` in place on grid cases; returns a summary (steps, loss, seconds).

    ``progress(fraction, message)`` may raise Cancelled to stop between steps. Under
    torchrun each process must call this with the same cases; only rank 0 writes
    checkpoints.
    """
    from .devices import pick_device

    device = pick_device(config.device)
    rank, world = distributed_context(device)
    if config.batch_size % world:
        raise MedsegError(f"the batch size {config.batch_size} must be divisible by the {world} processes")
    torch.manual_seed(config.seed)
    network.to(device).train()
    if config.freeze_batch_norm:
        _freeze_batch_norm(network)
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.schedule == "onecycle" and config.steps > 1:
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.learning_rate,
                                                       total_steps=config.steps, pct_start=0.1)
    else:
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda _step: 1.0)
    model = network
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = SegmentationLoss()
    start_step, running = 0, None
    if config.resume:
        state = load_checkpoint(config.resume)
        network.load_state_dict(state["network"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        start_step, running = int(state["step"]), state.get("running")
        if log:
            log(f"resumed from step {start_step}")
    share = config.batch_size // world
    started = time.perf_counter()
    for step in range(start_step, config.steps):
        images, labels, weights = make_batch(cases, card, config, step, range(rank * share, (rank + 1) * share))
        images, labels, weights = images.to(device), labels.to(device), weights.to(device)
        with autocast(device, None, training=True):
            logits = class_scores(model, images, card.pipeline.output)
        loss = loss_fn(logits.float(), labels, weights)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        value = _global_mean(loss.detach(), world)
        running = value if running is None else 0.95 * running + 0.05 * value
        if log and (step % 25 == 0 or step == config.steps - 1) and rank == 0:
            log(f"step {step + 1}/{config.steps} loss {running:.4f} ({time.perf_counter() - started:.0f} s)")
        if config.checkpoint and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 \
                and step + 1 < config.steps and rank == 0:
            save_checkpoint(config.checkpoint, network, optimiser, schedule, step + 1, running)
        report(progress, (step + 1) / config.steps, f"step {step + 1} of {config.steps}, loss {running:.3f}")
    network.eval().cpu()
    return {"steps": config.steps, "final_loss": running, "seconds": round(time.perf_counter() - started, 1),
            "processes": world}


def _global_mean(value: torch.Tensor, world: int) -> float:
    if world > 1:
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return float(value)


def save_checkpoint(path, network, optimiser, schedule, step: int, running) -> None:
    from .outputs import save_atomically

    state = {"network": network.state_dict(), "optimiser": optimiser.state_dict(),
             "schedule": schedule.state_dict(), "step": step, "running": running}
    save_atomically(Path(path), lambda tmp: torch.save(state, tmp), ".pt", label="the training checkpoint")


def load_checkpoint(path) -> dict:
    """A checkpoint written by :func:`save_checkpoint`, read without unpickling code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MedsegError(f"checkpoint '{Path(path).name}' does not exist") from None
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file
        raise MedsegError(f"'{Path(path).name}' is not a training checkpoint ({str(exc).splitlines()[0][:100]})") \
            from None


def evaluate(model, cases: list, settings=None) -> dict:
    """Mean foreground Dice per case through the full predict pipeline (as ``predict`` runs it)."""
    from .inference import segment

    per_case, device = {}, None
    for case in cases:
        result = segment(case.image, case.layer_affine_ras, model, settings)
        per_case[case.name] = round(mean_dice(result.labels, case.label, model.card.n_classes), 4)
        device = result.info.get("device")
    return {"dice": per_case, "mean_dice": round(float(np.mean(list(per_case.values()))), 4) if per_case else None,
            "device": device}


def new_card(name: str, version: str, network: torch.nn.Module, label_names: list, modality: str,
             spacing: tuple, patch_size: tuple, postprocessing: tuple = ()) -> ModelCard:
    """The card of a model trained from scratch by ``train``: body region, a voxel-size grid."""
    from .card import parse_card

    architecture = type(network).__name__
    normalisation = {"kind": "ct", "window": [-1000, 1000]} if modality == "CT" else {"kind": "mr_robust_zscore"}
    return parse_card({
        "format": "napari-medseg-model", "format_version": 2, "name": name, "version": version,
        "network": {"architecture": architecture, "hparams": dict(network.hparams)},
        "labels": [{"value": i, "name": n, "color": default_color(i)} for i, n in enumerate(label_names)],
        "domain": {"modality": modality},
        "pipeline": {"axis_order": "SPL", "roi": {"kind": "body", "margin_mm": 10.0},
                     "grid": {"kind": "spacing", "spacing": list(spacing), "interpolation": "area"},
                     "normalisation": {**normalisation, "statistics": "region"},
                     "patch_size": list(patch_size), "output": "logits", "postprocessing": list(postprocessing)},
        "explain": explain_methods_for(architecture),
    }, name)


def config_summary(config: TrainingConfig) -> dict:
    out = asdict(config)
    out.pop("checkpoint", None)
    out.pop("resume", None)
    out["patch_size"] = list(config.patch_size)
    return out


def train_model(data, output, *, name: str = "model", version: str = "1.0.0", steps: int = 1000,
                batch_size: int = 1, patch_size: tuple = (80, 96, 80), spacing: tuple = (2.0, 2.0, 2.0),
                channels: tuple = (8, 16, 32, 64), learning_rate: float = 3e-3, seed: int = 0, device: str = "auto",
                max_shift_mm: float = 25.0, synthesis_probability: float = 0.4, postprocessing: tuple = (),
                val_data=None, init=None, checkpoint_every: int = 0, resume=None, data_description: str | None = None,
                progress: Progress | None = None, log=None) -> Path:
    """Train a model on an MSD / nnU-Net dataset folder and write ``output/NAME.safetensors``.

    Every argument and the whole dataset are checked before training starts (each fault on
    its own line, as :class:`DatasetError`). ``init`` starts from a model's weights,
    architecture and pipeline; ``val_data`` adds held-out Dice to the card.
    """
    from .devices import pick_device
    from .inference import InferenceSettings
    from .models import Model, ModelRegistry, save_model
    from .network import AttentionUNet3D
    from .outputs import check_outputs

    output = Path(output)
    if not output.is_dir():
        raise MedsegError(f"the output folder '{output.name}' does not exist (create it first)")
    target = output / f"{name}.safetensors"
    init_inputs = [init] if init is not None and Path(str(init)).exists() else []
    check_outputs({"-o": target}, [data, val_data, resume] + init_inputs)
    config = TrainingConfig(steps=steps, batch_size=batch_size, patch_size=tuple(patch_size),
                            learning_rate=learning_rate, seed=seed, device=device,
                            augmentation=Augmentation(max_rotation_deg=40.0, scale_range=(0.85, 1.2),
                                                      max_shift_mm=max_shift_mm,
                                                      synthesis_probability=synthesis_probability),
                            checkpoint=str(output / f"{name}.checkpoint.pt") if checkpoint_every else None,
                            checkpoint_every=checkpoint_every, resume=resume)
    if init:
        model = ModelRegistry().load(init, for_training=True)
        network, roi_network = model.network, model.roi_network
        card = model.card.replace(name=name, version=version)
        if postprocessing:
            card = card.replace(pipeline={**card.pipeline.to_dict(), "postprocessing": list(postprocessing)})
    else:
        if any(c <= 0 for c in channels) or len(channels) < 2:
            raise MedsegError(f"--channels needs two or more positive widths, got {list(channels)}")
        network, roi_network, card = None, None, None
    divisor = int(getattr(network, "divisor", 2 ** (len(channels) - 1)))
    faults = config_faults(config, divisor, tuple(spacing))
    if faults:
        raise DatasetError(faults)
    pick_device(device)
    dataset = read_dataset(data, progress=span(progress, 0.0, 0.05))
    validation = read_dataset(val_data) if val_data else None
    if network is None:
        network = AttentionUNet3D(1, len(dataset.label_names), tuple(channels))
        card = new_card(name, version, network, dataset.label_names, dataset.modality, tuple(spacing),
                        tuple(patch_size), tuple(postprocessing))
    elif len(dataset.label_names) != card.n_classes:
        raise MedsegError(f"the dataset names {len(dataset.label_names)} labels but the model "
                          f"{card.title} has {card.n_classes}")
    cases = [grid_case(case, card, roi_network) for case in dataset.cases]
    summary = train(network, card, cases, config, progress=span(progress, 0.05, 0.9), log=log)
    provenance = dict(card.provenance, cases=[c.name for c in dataset.cases], training=summary,
                      data=data_description or f"dataset folder '{Path(data).name}'")
    if init:
        provenance["initialised_from"] = Path(str(init)).name
    card = card.replace(provenance=provenance)
    if validation is not None:
        report(progress, 0.95, "held-out Dice")
        metrics = evaluate(Model(network, card, None, roi_network), validation.cases, InferenceSettings(device=device))
        card = card.replace(metrics={"held_out": metrics})
        if log:
            log(f"held-out Dice: {json.dumps(metrics)}")
    path = save_model(target, network, card, roi_network)
    report(progress, 1.0, f"wrote {path.name}")
    return path
