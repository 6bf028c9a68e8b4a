"""Our sliding-window engine against MONAI's ``sliding_window_inference``.

Both engines run the same network with the same weights (the bundled brain-t1 model,
batch norm folded) on the same normalised volume, at the volume's own grid:

* a 1 mm T1 head (the sample resampled to the MNI 1 mm grid, 182 x 218 x 182);
* a CT-sized 512 x 512 x 300 volume (the head resampled onto that grid).

MONAI runs at its usual settings: ROI = the model's patch size, overlap 0.25,
Gaussian blending, fp32, window batch 1. Ours runs with its defaults. Each engine
runs in its own process; peak memory is the rise of resident memory above the level
just before the engine starts (sampled every 5 ms; on a GPU, the CUDA allocator's
peak), so the shared input volume is not counted. Then ``napari-medseg predict`` is timed end to
end (process start, reading, prediction, writing) on the 1 mm head.

Agreement has a ceiling set by the model, not the engine: the script also prints
MONAI at overlap 0.5 against MONAI at 0.25, and our engine on MONAI's own windows
against MONAI.

    .venv/bin/python benchmarks/bench_inference.py [--device cpu|cuda] [--skip-ct]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHAPES = {"head_1mm": (182, 218, 182), "ct_512x512x300": (512, 512, 300)}


def make_volume(kind: str, folder: Path) -> Path:
    """Write the benchmark volume as NIfTI (so predict can be timed on it too)."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    from napari_medseg._sample import sample_path

    path = folder / f"{kind}.nii.gz"
    if path.exists():
        return path
    head = nib.load(sample_path())
    shape = SHAPES[kind]
    if kind == "head_1mm":
        affine = np.array([[-1, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]], dtype=float)
    else:
        # The head stretched over a CT-sized grid: 0.4 x 0.45 x 0.65 mm voxels.
        spacing = np.array([182 / 512, 218 / 512, 182 / 300])
        affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
        affine[:3, 3] = (90, -126, -72)
    image = resample_from_to(nib.Nifti1Image(np.asarray(head.dataobj, dtype=np.float32), head.affine),
                             (shape, affine), order=1)
    nib.save(nib.Nifti1Image(image.get_fdata().astype(np.float32), affine), path)
    return path


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRSS:
    """Samples this process's resident memory every 5 ms (ru_maxrss cannot be reset)."""

    def __init__(self):
        import threading

        self.base = rss_mb()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_mb()) - self.base


def worker(engine: str, path: str, device: str) -> dict:
    """Run one engine once on one volume; report time, peak memory and the labels file."""
    import torch

    from napari_medseg.core.inference import InferenceSettings, sliding_window
    from napari_medseg.core.io import read_volume
    from napari_medseg.core.models import ModelRegistry
    from napari_medseg.core.preprocess import normalise

    model = ModelRegistry().load("brain-t1")
    patch = tuple(model.card["patch_size"])
    volume = read_volume(path)
    image = normalise(volume.layer_data(), model.card["normalisation"])
    dev = torch.device(device)
    net = model.network.to(dev)
    with torch.inference_mode():  # warm-up (kernels, allocator) outside the timing
        net(torch.zeros((1, 1) + tuple(min(p, 32) for p in patch), device=dev))
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sampler = PeakRSS()
    started = time.perf_counter()
    if engine.startswith("monai"):
        from monai.inferers import sliding_window_inference

        overlap = 0.5 if engine == "monai-overlap-0.5" else 0.25
        with torch.inference_mode():
            x = image[None, None].to(dev)
            logits = sliding_window_inference(x, patch, 1, net, overlap=overlap, mode="gaussian")
            labels = logits[0].argmax(0).to(torch.uint8).cpu().numpy()
            del logits, x
    else:
        # "ours-monai-plan": our engine forced onto MONAI's windows, to show the two
        # blend identically and that any disagreement comes from the window plan.
        fixed = {"roi_size": patch, "overlap": 0.25} if engine == "ours-monai-plan" else {}
        labels = sliding_window(image, net, len(model.card["labels"]), patch,
                                InferenceSettings(device=device, **fixed)).labels
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = sampler.stop()
    out = Path(path).with_suffix(f".{engine}.npy")
    np.save(out, labels)
    return {"seconds": seconds, "peak_mb": peak, "labels": str(out), "voxels": int(labels.size)}


def run_worker(engine: str, path: Path, device: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--worker", engine, str(path), "--device", device],
                            check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a == 1, b == 1
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def time_predict(path: Path, device: str) -> float:
    cli = Path(sys.executable).with_name("napari-medseg")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        subprocess.run([str(cli), "predict", str(path), "-o", f"{tmp}/mask.nii.gz", "--device", device,
                        "--quiet"], check=True, capture_output=True)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-ct", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "PATH"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.device)))
        return
    import torch

    folder = HERE / ".data"
    folder.mkdir(exist_ok=True)
    kinds = ["head_1mm"] + ([] if args.skip_ct else ["ct_512x512x300"])
    machine = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"{torch.get_num_threads()}-thread CPU ({torch.backends.cpu.get_cpu_capability()})"
    print(f"device: {args.device}, {machine}; torch {torch.__version__}")
    print(f"{'volume':<16} {'MONAI s':>8} {'ours s':>8} {'time ratio':>10} {'MONAI MB':>9} {'ours MB':>8} "
          f"{'mem ratio':>9} {'Dice':>7} {'Mvox/s':>7}")
    monai_labels = {}
    for kind in kinds:
        path = make_volume(kind, folder)
        theirs = run_worker("monai", path, args.device)
        monai_labels[kind] = theirs["labels"]
        ours = run_worker("ours", path, args.device)
        agreement = dice(np.load(theirs["labels"]), np.load(ours["labels"]))
        print(f"{kind:<16} {theirs['seconds']:8.2f} {ours['seconds']:8.2f} "
              f"{ours['seconds'] / theirs['seconds']:10.2f} {theirs['peak_mb']:9.0f} {ours['peak_mb']:8.0f} "
              f"{ours['peak_mb'] / max(theirs['peak_mb'], 1e-6):9.2f} {agreement:7.4f} "
              f"{ours['voxels'] / ours['seconds'] / 1e6:7.2f}", flush=True)
    head = make_volume("head_1mm", folder)
    # How far apart can two reasonable window plans be with this model? MONAI against
    # itself at overlap 0.5 is the ceiling for the agreement of any other plan.
    reference = np.load(monai_labels["head_1mm"])
    for engine in ("monai-overlap-0.5", "ours-monai-plan"):
        other = np.load(run_worker(engine, head, args.device)["labels"])
        print(f"1 mm head, Dice of {engine} against MONAI at overlap 0.25: {dice(reference, other):.4f}")
    print(f"napari-medseg predict, 1 mm head, end to end: {time_predict(head, args.device):.2f} s")
    if not args.skip_ct and args.device == "cuda":
        print(f"napari-medseg predict, 512x512x300, end to end: "
              f"{time_predict(make_volume('ct_512x512x300', folder), args.device):.2f} s")


if __name__ == "__main__":
    main()
