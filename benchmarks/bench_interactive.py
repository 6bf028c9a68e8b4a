"""A simulated user segments real lesions by clicks: our prompts against scikit-image's
random walker on the same regions and clicks, and napari painting (one stroke a slice).

The protocol of the interactive segmentation literature: the first click at the centre
of the target, each next one at the point of the largest error region farthest from its
boundary, positive or negative as the error is. Targets: the lesion label maps that
pyradiomics 3.0.1 ships (lung CT nodules, brain and breast MR tumours), from nothing, and
the brain of the MNI152 head, from brain-t1's mask with a hole and a leak
(``brain-damaged``; the first click then goes at the largest error).

    python benchmarks/bench_interactive.py [--targets lung1 brain1 ...] [--clicks 20]

Prints Dice after 1, 3, 5 and 10 clicks, NoC@85 and NoC@90 (capped at 20), seconds per
click, and the ratio of our seconds to the random walker's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

TARGETS = ["lung1", "lung2", "brain1", "brain2", "breast1", "brain-damaged"]
CAP = 20


def dice(a, b) -> float:
    return 2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def next_click(prediction: np.ndarray, truth: np.ndarray, spacing: tuple):
    """The voxel of the largest error region farthest from its boundary, and its sign."""
    from scipy import ndimage

    best = None
    for error, positive in ((truth & ~prediction, True), (prediction & ~truth, False)):
        parts, count = ndimage.label(error)
        if not count:
            continue
        sizes = ndimage.sum_labels(error, parts, index=np.arange(1, count + 1))
        largest = parts == (int(np.argmax(sizes)) + 1)
        if best is None or sizes.max() > best[0]:
            depth = ndimage.distance_transform_edt(np.pad(largest, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
            best = (sizes.max(), np.unravel_index(int(np.argmax(depth)), depth.shape), positive)
    return None if best is None else (best[1], best[2])


def centre_click(truth: np.ndarray, spacing: tuple):
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(np.pad(truth, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    return np.unravel_index(int(np.argmax(depth)), depth.shape), True


def random_walker_region(image, region, clicks, labels_before):
    """scikit-image's random walker on ``region``: the clicks, and the region's border as
    the current mask, are its seeds; it re-decides the whole region."""
    from skimage.segmentation import random_walker

    from napari_medseg.core.prompts import region_border

    crop = image[region].astype(np.float64)
    crop = (crop - crop.mean()) / (crop.std() + 1e-6)
    seeds = np.zeros(crop.shape, np.int32)
    border = region_border(crop.shape)
    seeds[border] = np.where(labels_before[region][border], 1, 2)
    origin = np.array([s.start for s in region])
    for index, positive in clicks:
        inside = np.asarray(index) - origin
        if np.all(inside >= 0) and np.all(inside < crop.shape):
            seeds[tuple(inside)] = 1 if positive else 2
    result = labels_before.copy()
    result[region] = random_walker(crop, seeds, beta=130, mode="cg_j") == 1
    return result


def lesion_target(name: str) -> tuple:
    """A pyradiomics scan and its lesion, from nothing: ``(image, truth, spacing, start)``."""
    from dicom_factory import pyradiomics_scan

    from napari_medseg.core.io import read_volume

    scan = read_volume(pyradiomics_scan(name))
    label_path = Path(str(pyradiomics_scan(name)).replace("_image.nrrd", "_label.nrrd"))
    truth = scan.geometry.to_layer(read_volume(label_path).data) > 0
    return scan.layer_data().astype(np.float32), truth, scan.geometry.layer_spacing, None


def damaged_brain_target() -> tuple:
    """The MNI152 head with skull, brain-t1's own mask of it damaged by a 20 mm hole inside
    the brain and a 15 mm leak into the skull beside it; the truth is MNI152's brain mask."""
    import subprocess
    import tempfile

    from conftest import BRAIN_MASK
    from scipy import ndimage

    from napari_medseg.core.io import read_volume
    from napari_medseg.viewer._sample import sample_path

    scan = read_volume(sample_path())
    truth = scan.geometry.to_layer(read_volume(BRAIN_MASK).data) > 0
    spacing = np.asarray(scan.geometry.layer_spacing)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "brain.nii.gz"
        subprocess.run([sys.executable, "-m", "napari_medseg.cli", "predict", str(sample_path()), "-o", str(out),
                        "--quiet"], check=True)
        predicted = scan.geometry.to_layer(read_volume(out).data) > 0
    grid = np.indices(truth.shape).reshape(3, -1).T * spacing
    depth = ndimage.distance_transform_edt(truth, sampling=spacing)
    inner = np.argwhere(depth >= 25.0)
    hole_centre = inner[len(inner) // 3] * spacing            # deep in the brain, off its centre
    edge = np.argwhere(truth & (depth <= 2.5))
    leak_centre = edge[len(edge) // 2] * spacing               # on the brain's surface
    start = predicted.copy()
    start &= ~(np.linalg.norm(grid - hole_centre, axis=1) < 20.0).reshape(truth.shape)
    start |= (np.linalg.norm(grid - leak_centre, axis=1) < 15.0).reshape(truth.shape) & ~truth
    print(f"# brain-damaged: brain-t1's mask Dice {dice(predicted, truth):.3f}, damaged {dice(start, truth):.3f}",
          flush=True)
    return scan.layer_data().astype(np.float32), truth, tuple(spacing), start


def run_target(name: str, clicks: int) -> dict:
    from napari_medseg.core.prompts import PromptSession

    image, truth, spacing, start = damaged_brain_target() if name == "brain-damaged" else lesion_target(name)
    session = PromptSession(image, spacing, None if start is None else start.astype(np.uint8))
    walker = np.zeros(image.shape, bool) if start is None else start.copy()
    ours_dice, walker_dice, ours_s, walker_s, history = [], [], [], [], []
    before = [] if start is None else [dice(start, truth)]  # a click must not spoil the start either
    from_nothing = start is None  # then the first click goes at the target's centre

    for n in range(clicks):
        current = session.labels == 1
        click = centre_click(truth, spacing) if n == 0 and from_nothing else next_click(current, truth, spacing)
        if click is None:
            break
        history.append(click)
        update = session.add_point(click[0], click[1])
        ours_s.append(update.seconds)
        ours_dice.append(dice(session.labels == 1, truth))
        began = time.perf_counter()
        walker_click = centre_click(truth, spacing) if n == 0 and from_nothing else next_click(walker, truth, spacing)
        walker_history = history[:-1] + [walker_click] if walker_click else history
        walker = random_walker_region(image, update.region, walker_history, walker)
        walker_s.append(time.perf_counter() - began)
        walker_dice.append(dice(walker, truth))
    series = before + ours_dice
    painting = int(np.count_nonzero(truth.any(axis=(1, 2))))  # one stroke per axial slice, at least

    def noc(series, goal):
        reached = [n + 1 for n, d in enumerate(series) if d >= goal]
        return reached[0] if reached else CAP

    def at(series, k):
        return series[min(k, len(series)) - 1]

    return {"target": name, "voxels": int(truth.sum()),
            "ours": {k: at(ours_dice, k) for k in (1, 3, 5, 10)}, "walker": {k: at(walker_dice, k) for k in (1, 3, 5, 10)},
            "noc85": (noc(ours_dice, 0.85), noc(walker_dice, 0.85)), "noc90": (noc(ours_dice, 0.90), noc(walker_dice, 0.90)),
            "seconds": (float(np.median(ours_s)), float(np.median(walker_s))),
            "worst_drop": float(max([0.0] + [a - b for a, b in zip(series, series[1:])])),
            "painting_strokes": painting}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=TARGETS)
    parser.add_argument("--clicks", type=int, default=CAP)
    args = parser.parse_args()
    print("| target | voxels | Dice@1/3/5/10 ours | Dice@1/3/5/10 random walker | NoC@85 ours/walker | "
          "NoC@90 ours/walker | s per click ours/walker (ratio) | worst drop | painting strokes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.targets:
        r = run_target(name, args.clicks)
        ours = "/".join(f"{r['ours'][k]:.3f}" for k in (1, 3, 5, 10))
        walker = "/".join(f"{r['walker'][k]:.3f}" for k in (1, 3, 5, 10))
        s_ours, s_walker = r["seconds"]
        print(f"| {name} | {r['voxels']} | {ours} | {walker} | {r['noc85'][0]}/{r['noc85'][1]} | "
              f"{r['noc90'][0]}/{r['noc90'][1]} | {s_ours:.3f}/{s_walker:.3f} ({s_ours / s_walker:.2f}) | "
              f"{r['worst_drop']:.4f} | {r['painting_strokes']} |", flush=True)


if __name__ == "__main__":
    main()
