"""Fine-tuning from the correction queue, with a regression gate, versions and rollback.

:func:`fine_tune` starts from the workspace's current model version and trains on the
queued corrections plus a replay of earlier accepted ones (against forgetting). The loss
gives extra weight to the voxels the reviewer changed. It uses the same case
preparation and training loop as ``train`` (:mod:`.training`), so the pipeline a model
is trained through is the one it predicts through. Batch norm is frozen (batches of one
or two crops carry no useful statistics), and under ``torchrun`` the processes share
each batch through PyTorch DDP.

The new version is promoted only if its Dice on the workspace's frozen validation items
does not fall by more than ``tolerance`` below the current version's. Otherwise the
current version stays, and the workspace records why. Every promoted version keeps its
metrics and its lineage (the items that trained it); ``rollback`` restores any of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .errors import MedsegError
from .progress import Progress, report, span
from .workspace import Workspace, prompt_seeds

from .defaults import FINETUNE_LEARNING_RATE, FINETUNE_REPLAY, FINETUNE_STEPS, FINETUNE_TOLERANCE


@dataclass
class FineTuneResult:
    version: str
    promoted: bool
    reason: str
    metrics: dict = field(default_factory=dict)
    items: list = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"version": self.version, "promoted": self.promoted, "reason": self.reason, "metrics": self.metrics,
                "items": self.items, "seconds": round(self.seconds, 1)}


def _scan_case(workspace: Workspace, item):
    from .training import ScanCase

    loaded = workspace.load_item(item)
    scan = loaded["scan"]
    label = loaded["label"].astype(np.uint8)
    prediction = loaded.get("prediction")
    changed = (prediction != label) if prediction is not None else None
    if loaded.get("prompts"):  # the voxels the reviewer clicked or stroked weigh as changed ones
        seeds = prompt_seeds(loaded["prompts"], label.shape)
        changed = seeds if changed is None else changed | seeds
    return ScanCase(name=item.id[:8], image=np.ascontiguousarray(scan.layer_data(), dtype=np.float32), label=label,
                    layer_affine_ras=scan.geometry.layer_affine_ras, changed=changed)


def training_patch(card, network) -> tuple:
    """The fine-tuning crop: the card's patch, at most 128 voxels a side (a multiple of the
    network's divisor), so a step fits a CPU's time and memory."""
    divisor = int(getattr(network, "divisor", 1))
    return tuple(max(divisor, min(int(p), 128) // divisor * divisor) for p in card.pipeline.patch_size)


def fine_tune(workspace: Workspace, steps: int = FINETUNE_STEPS, device: str = "auto",
              tolerance: float = FINETUNE_TOLERANCE, replay: int = FINETUNE_REPLAY, changed_weight: float = 2.0,
              learning_rate: float = FINETUNE_LEARNING_RATE,
              batch_size: int = 1, patch_size: tuple | None = None, seed: int = 0, base: str | None = None,
              progress: Progress | None = None, log=None) -> FineTuneResult:
    """Train a new version on the queue; promote it only if validation Dice does not regress."""
    from .devices import pick_device
    from .inference import InferenceSettings
    from .models import load_model
    from .training import Augmentation, TrainingConfig, config_faults, distributed_context, evaluate, grid_case, train

    started = time.perf_counter()
    if steps <= 0:
        raise MedsegError(f"--steps must be positive, got {steps}")
    if tolerance < 0:
        raise MedsegError(f"--tolerance cannot be negative, got {tolerance}")
    rank, world = distributed_context(pick_device(device))
    if rank == 0:
        workspace.ensure_model(base)
    if world > 1:  # the other processes wait until the first version exists
        import torch.distributed as dist

        dist.barrier()
    queued = workspace.items(status="queued", split="train")
    if not queued:
        raise MedsegError(f"workspace '{workspace.folder.name}' has no queued corrections to learn from")
    validation = workspace.items(split="validation")
    if not validation:
        raise MedsegError(f"workspace '{workspace.folder.name}' has no validation items, so a new version cannot "
                          "be checked; submit some with '--split validation'")
    earlier = workspace.items(status="used", split="train")
    rng = np.random.default_rng(seed)
    replayed = [earlier[i] for i in sorted(rng.choice(len(earlier), min(replay, len(earlier)), replace=False))] \
        if earlier else []
    parent = workspace.current_version()
    model = workspace.load_model(for_training=True)
    card, network = model.card, model.network
    config = TrainingConfig(steps=steps, batch_size=batch_size, patch_size=tuple(patch_size or
                                                                                 training_patch(card, network)),
                            learning_rate=learning_rate, seed=seed, device=device, augmentation=Augmentation(),
                            changed_weight=changed_weight, freeze_batch_norm=True, schedule="constant")
    faults = config_faults(config, int(getattr(network, "divisor", 1)))
    if faults:
        raise MedsegError("; ".join(faults))
    report(progress, 0.0, f"reading {len(queued) + len(replayed)} corrections")
    cases = [grid_case(_scan_case(workspace, item), card, model.roi_network, changed_weight)
             for item in queued + replayed]
    validation_cases = [_scan_case(workspace, item) for item in validation]
    before = None
    settings = InferenceSettings(device=device)  # validation runs where the training runs
    if rank == 0:
        current = load_model(workspace.registry.resolve(workspace.model_name))
        before = evaluate(current, validation_cases, settings)
        report(progress, 0.1, f"validation Dice of {parent}: {before['mean_dice']:.4f}")
    summary = train(network, card, cases, config, progress=span(progress, 0.1, 0.75), log=log)
    if rank != 0:
        _wait_for_the_writer(world)
        return FineTuneResult("", False, "not the writing process", {}, [], time.perf_counter() - started)
    try:
        return _validate_and_record(workspace, network, card, model, validation_cases, before, queued, replayed,
                                    parent, summary, tolerance, progress, started, settings)
    finally:
        _wait_for_the_writer(world)


def _wait_for_the_writer(world: int) -> None:
    """Every process leaves together, once rank 0 has written: a process that left the
    group while rank 0 still validated made gloo abort the run."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _validate_and_record(workspace, network, card, model, validation_cases, before, queued, replayed, parent,
                         summary, tolerance, progress, started, settings) -> FineTuneResult:
    from .models import Model
    from .training import evaluate

    report(progress, 0.85, "validating the new version")
    candidate = Model(network.eval(), card, None, model.roi_network)
    after = evaluate(candidate, validation_cases, settings)
    version = workspace.next_version()
    trained_on = [item.id for item in queued]
    metrics = {"validation_dice_before": before["mean_dice"], "validation_dice_after": after["mean_dice"],
               "validation": after["dice"], "validation_device": after["device"], "tolerance": tolerance, "training": summary,
               "replayed": [item.id for item in replayed]}
    promoted = after["mean_dice"] >= before["mean_dice"] - tolerance
    if promoted:
        reason = (f"validation Dice {before['mean_dice']:.4f} -> {after['mean_dice']:.4f} "
                  f"(tolerance {tolerance:g})")
        new_card = card.replace(version=version, provenance={**card.provenance, "fine_tuned_from": parent,
                                                             "fine_tuned_on": trained_on},
                                metrics={**card.metrics, "workspace_validation": after})
        entry = workspace.registry.add_version(network, new_card, make_current=True, roi_network=model.roi_network)
        workspace.record_version(version, parent or "", "promoted", reason, metrics, trained_on,
                                 entry.card.content_sha256 or "")
        workspace.set_status(trained_on, "used", used_by=version)
    else:
        reason = (f"not promoted: validation Dice fell from {before['mean_dice']:.4f} to "
                  f"{after['mean_dice']:.4f}, more than the tolerance {tolerance:g}; {parent} stays in use")
        workspace.record_version(version, parent or "", "rejected", reason, metrics, trained_on)
    report(progress, 1.0, reason)
    return FineTuneResult(version, promoted, reason, metrics, trained_on, time.perf_counter() - started)
