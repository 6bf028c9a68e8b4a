"""Inference speed and memory, side by side with the peers.

1. **The engine against MONAI's ``sliding_window_inference``**, same network and weights
   (brain-t1-attention, batch norm folded), same normalised volume, at the volume's own
   grid: a 1 mm T1 head (182 x 218 x 182) and a CT-sized 512 x 512 x 300 volume. MONAI
   runs at its usual settings (ROI = patch, overlap 0.25, Gaussian, fp32, batch 1), and
   once more with our engine's own window plan, which measures what our loop adds
   beyond the planner. Each run is its own process; peak memory is the rise of resident
   memory above the level before the engine starts (sampled every 5 ms; on a GPU, the
   CUDA allocator's peak).
2. **``napari-medseg predict`` against deepbet's own package**, each as a whole process
   on the same 1 mm head, as a user runs them: wall time and peak resident memory
   (``wait4``), median of three runs, and each one's network time.

    .venv/bin/python benchmarks/bench_inference.py [--device cpu|cuda] [--skip-ct]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHAPES = {"head_1mm": (182, 218, 182), "ct_512x512x300": (512, 512, 300)}
ENGINE_MODEL = "brain-t1-attention"


def make_volume(kind: str, folder: Path) -> Path:
    """Write the benchmark volume as NIfTI (so predict can be timed on it too)."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    from napari_medseg.viewer._sample import sample_path

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


def our_plan(shape, patch, divisor, device):
    from napari_medseg.core.inference import InferenceSettings, plan_windows

    return plan_windows(tuple(shape), tuple(patch), divisor, InferenceSettings(device=device.type), device)


def worker(engine: str, path: str, device: str) -> dict:
    """Run one engine once on one volume; report time, peak memory and the labels file."""
    import torch

    from napari_medseg.core.inference import InferenceSettings, sliding_window
    from napari_medseg.core.io import read_volume
    from napari_medseg.core.models import ModelRegistry
    from napari_medseg.core.pipeline import intensity_statistics, normalise

    model = ModelRegistry().load(ENGINE_MODEL)
    patch = tuple(model.card.pipeline.patch_size)
    volume = read_volume(path)
    data = np.ascontiguousarray(volume.layer_data(), dtype=np.float32)
    norm = model.card.pipeline.normalisation
    image = normalise(torch.from_numpy(data), norm, intensity_statistics(data[::2, ::2, ::2], norm))
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

        roi, overlap = patch, 0.25
        if engine == "monai-our-plan":
            roi, starts = our_plan(image.shape, patch, net.divisor, dev)
            margin = int(np.ceil(0.125 * min(patch)))
            overlap = min(margin / r for r in roi)
        with torch.inference_mode():
            x = image[None, None].to(dev)
            logits = sliding_window_inference(x, roi, 1, net, overlap=overlap, mode="gaussian")
            labels = logits[0].argmax(0).to(torch.uint8).cpu().numpy()
            del logits, x
    else:
        labels = sliding_window(image, net, patch, InferenceSettings(device=device)).labels
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev.type == "cuda" else sampler.stop()
    out = Path(path).with_suffix(f".{engine}.npy")
    np.save(out, labels)
    return {"seconds": seconds, "peak_mb": peak, "labels": str(out), "voxels": int(labels.size)}


def run_worker(engine: str, path: Path, device: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--worker", engine, str(path), "--device", device],
                            check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    from napari_medseg.core.metrics import dice as one_dice

    return one_dice(a, b)


def whole_process(command: list) -> tuple[float, float, str]:
    """(wall seconds, peak resident MB, stdout) of a child process, measured by wait4."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = child.stdout.read()
    _pid, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{command[0]} failed with status {child.returncode}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024, out


def predict_against_deepbet(head: Path, device: str, runs: int = 3) -> None:
    cli = Path(sys.executable).with_name("napari-medseg")
    deepbet = [sys.executable, str(HERE / "peers" / "deepbet_process.py")]
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(runs):  # interleaved, so drifts of the machine hit both alike
            seconds, peak, out = whole_process([str(cli), "predict", str(head), "-o", f"{tmp}/ours.nii.gz",
                                                "--device", device, "--json", "--quiet"])
            run = json.loads(out)["run"]
            ours.append((seconds, peak, run["seconds"] + run.get("first_stage_seconds", 0.0)))
            seconds, peak, out = whole_process(deepbet + [str(head), f"{tmp}/deepbet.nii.gz"])
            theirs.append((seconds, peak, json.loads(out)["network_seconds"]))
        agreement = dice(_mask(f"{tmp}/ours.nii.gz"), _mask(f"{tmp}/deepbet.nii.gz"))
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    print(f"\nbrain-t1 (deepbet's networks) on the 1 mm head, whole process, median of {runs} "
          f"(goal: ratio <= 1.0 in time and in memory):")
    print(f"{'':<26} {'wall s':>7} {'peak MB':>8} {'network s':>10}")
    print(f"{'napari-medseg predict':<26} {med(ours, 0):7.2f} {med(ours, 1):8.0f} {med(ours, 2):10.2f}")
    print(f"{'deepbet 1.0.2 package':<26} {med(theirs, 0):7.2f} {med(theirs, 1):8.0f} {med(theirs, 2):10.2f}")
    print(f"{'ratio ours / deepbet':<26} {med(ours, 0) / med(theirs, 0):7.2f} {med(ours, 1) / med(theirs, 1):8.2f} "
          f"{med(ours, 2) / med(theirs, 2):10.2f}")
    print(f"Dice of the two masks: {agreement:.4f}")


def _mask(path: str) -> np.ndarray:
    import nibabel as nib

    return (np.asarray(nib.load(path).dataobj) > 0).astype(np.uint8)


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
    print(f"device: {args.device}, {machine}; torch {torch.__version__}; engine model {ENGINE_MODEL}")
    print(f"{'volume':<16} {'engine':<16} {'s':>7} {'MB':>7} {'time ratio':>10} {'mem ratio':>9} {'Dice':>7}")
    for kind in kinds:
        path = make_volume(kind, folder)
        theirs = run_worker("monai", path, args.device)
        reference = np.load(theirs["labels"])
        print(f"{kind:<16} {'MONAI':<16} {theirs['seconds']:7.2f} {theirs['peak_mb']:7.0f}", flush=True)
        for engine in ("ours", "monai-our-plan"):
            other = run_worker(engine, path, args.device)
            print(f"{'':<16} {engine:<16} {other['seconds']:7.2f} {other['peak_mb']:7.0f} "
                  f"{other['seconds'] / theirs['seconds']:10.2f} {other['peak_mb'] / max(theirs['peak_mb'], 1e-6):9.2f} "
                  f"{dice(reference, np.load(other['labels'])):7.4f}", flush=True)
    predict_against_deepbet(make_volume("head_1mm", folder), args.device)


if __name__ == "__main__":
    main()
