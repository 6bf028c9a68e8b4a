"""TotalSegmentator's folders: its class names read as data, split tasks run as one merged model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_medseg.core.errors import MedsegError
from napari_medseg.core.totalseg import INSTALL_HINT, package_folder, read_tables

pytest.importorskip("totalsegmentator.map_to_binary")


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "napari_medseg.cli", *map(str, args)], capture_output=True,
                          encoding="utf-8", errors="replace", **kwargs)


def test_the_tables_are_the_packages_own_and_reading_them_runs_none_of_its_code(tmp_path):
    from totalsegmentator import map_to_binary
    from totalsegmentator.map_tasks_config import TASK_CONFIGS

    tables = read_tables()
    assert tables.class_map == map_to_binary.class_map
    assert len(tables.class_map["total"]) == 117
    assert tables.part_maps["total"] == {d: map_to_binary.class_map_5_parts[p]
                                         for d, p in map_to_binary.map_taskid_to_partname_ct.items()
                                         if p in map_to_binary.class_map_5_parts}
    assert tables.tasks["total"].datasets == tuple(TASK_CONFIGS["total"]["sub_modes"]["default"]["task_id"])
    assert tables.tasks["total_fast"].datasets == (297,) and tables.tasks["total"].step == 0.8
    assert {t.class_map for t in tables.tasks.values() if t.commercial} <= set(map_to_binary.commercial_models)
    # A copy of the package's files with a line that would write a marker if it ran.
    marker = tmp_path / "ran"
    copy = tmp_path / "totalsegmentator"
    copy.mkdir()
    for name in ("map_to_binary.py", "map_tasks_config.py"):
        source = (package_folder() / name).read_text(encoding="utf-8")
        (copy / name).write_text(f"open({str(marker)!r}, 'w').close()\n" + source, encoding="utf-8")
    assert read_tables(copy).class_map == tables.class_map
    assert not marker.exists()


def test_without_the_package_the_import_says_how_to_install_it(tmp_path):
    with pytest.raises(MedsegError, match=INSTALL_HINT):
        read_tables(tmp_path)


@pytest.fixture(scope="module")
def total_folder(tmp_path_factory):
    from totalseg_factory import build_task

    root = tmp_path_factory.mktemp("home") / ".totalsegmentator" / "nnunet" / "results"
    return build_task(root, "total")


def test_the_total_task_imports_as_one_model_with_its_117_names_and_its_licence(total_folder, tmp_path):
    from totalsegmentator.map_to_binary import class_map

    from totalseg_factory import scan

    home = {"NAPARI_MEDSEG_HOME": str(tmp_path / "medseg")}
    env = {**os.environ, **home}
    done = cli("models", "import-nnunet", total_folder, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("imported totalseg-total v2.18.0 in 5 parts: 1 fold(s), 117 classes "
                                  "(spleen, kidney_right, kidney_left, gallbladder, liver, ...), CT"), done.stdout
    shown = cli("models", "show", "totalseg-total", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    card = json.loads(shown.stdout)
    assert {label["value"]: label["name"] for label in card["labels"][1:]} == class_map["total"]
    assert "open tasks" in card["licence"] and "Apache-2.0" in card["licence"]
    assert card["pipeline"]["windows"]["step"] == 0.8 and len(card["pipeline"]["parts"]) == 5
    ct = scan(tmp_path / "ct.nii.gz", "lung1", size=(80, 80, 16))
    predicted = cli("predict", ct, "-o", tmp_path / "seg.nii.gz", "--model", "totalseg-total", env=env)
    assert predicted.returncode == 0, predicted.stderr
    labels = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
    assert labels.shape == nib.load(ct).shape
    parts_seen = {part for part, table in enumerate(card["pipeline"]["parts"])
                  if np.isin(labels, [merged for _, merged in table[1:]]).any()}
    assert len(parts_seen) >= 3, parts_seen          # the merge keeps several parts' labels
    refused = cli("predict", ct, "-o", tmp_path / "p.nii.gz", "--probabilities", tmp_path / "pp.nii.gz",
                  "--model", "totalseg-total", env=env)
    assert refused.returncode != 0 and "runs in 5 parts" in refused.stderr
    assert len([line for line in refused.stderr.splitlines() if "error" in line]) == 1


def test_a_part_without_its_siblings_and_a_folder_of_several_tasks_are_each_one_line(total_folder, tmp_path):
    import shutil

    from totalseg_factory import build_task

    lone = tmp_path / ".totalsegmentator" / "nnunet" / "results"
    lone.mkdir(parents=True)
    shutil.copytree(next(total_folder.glob("Dataset291_*")), lone / "Dataset291_TotalSegmentator_part1_organs_1559subj")
    done = cli("models", "import-nnunet", lone / "Dataset291_TotalSegmentator_part1_organs_1559subj",
               env={**os.environ, "NAPARI_MEDSEG_HOME": str(tmp_path / "m")})
    assert done.returncode != 0
    assert "task 'total' is datasets 291, 292, 293, 294, 295; 292, 293, 294, 295 are missing" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    build_task(lone, "total_mr")
    for dataset in total_folder.glob("Dataset29[2-5]_*"):
        shutil.copytree(dataset, lone / dataset.name)
    several = cli("models", "import-nnunet", lone, env={**os.environ,
                                                        "NAPARI_MEDSEG_HOME": str(tmp_path / "m")})
    assert several.returncode != 0 and "pick one with --task" in several.stderr, several.stderr
    chosen = cli("models", "import-nnunet", lone, "--task", "total_mr",
                 env={**os.environ, "NAPARI_MEDSEG_HOME": str(tmp_path / "m")})
    assert chosen.returncode == 0 and "in 2 parts" in chosen.stdout and ", MR, " in chosen.stdout, chosen.stderr


def _nnunet_predict_part(results: Path, dataset_id: int, trainer: str, source: Path, out: Path) -> np.ndarray:
    inputs = out / f"in{dataset_id}"
    inputs.mkdir(parents=True)
    (inputs / "case_0000.nii.gz").write_bytes(source.read_bytes())
    env = {**os.environ, "nnUNet_results": str(results), "nnUNet_raw": str(out / "raw"),
           "nnUNet_preprocessed": str(out / "pre"), "nnUNet_compile": "false"}
    command = [str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(out / f"o{dataset_id}"),
               "-d", str(dataset_id), "-c", "3d_fullres", "-tr", trainer, "-f", "0", "-device", "cpu",
               "-step_size", "0.8", "--disable_tta"]
    done = subprocess.run(command, env=env, capture_output=True, encoding="utf-8", errors="replace")
    assert done.returncode == 0, done.stderr[-2000:]
    return np.asarray(nib.load(out / f"o{dataset_id}" / "case.nii.gz").dataobj)


def test_a_split_task_gives_nnunetv2_predicts_parts_merged_as_totalsegmentator_merges_them(tmp_path):
    """total_mr (datasets 850 and 851) on a real MR: each part run by nnUNetv2_predict at
    TotalSegmentator's settings (step 0.8, no mirroring), merged with TotalSegmentator's own
    tables, against our one model in parts."""
    from totalseg_factory import build_task, merge_like_totalsegmentator, scan, tables

    results = build_task(tmp_path / ".totalsegmentator" / "nnunet" / "results", "total_mr")
    mr = scan(tmp_path / "mr.nii.gz", "brain1", canonical=True)   # what TotalSegmentator hands to nnU-Net
    env = {**os.environ, "NAPARI_MEDSEG_HOME": str(tmp_path / "medseg")}
    imported = cli("models", "import-nnunet", results, env=env)
    assert imported.returncode == 0, imported.stderr
    ours_done = cli("predict", mr, "-o", tmp_path / "ours.nii.gz", "--model", "totalseg-total_mr", env=env)
    assert ours_done.returncode == 0, ours_done.stderr
    ours = np.asarray(nib.load(tmp_path / "ours.nii.gz").dataobj)
    ids, trainer, _ = tables("total_mr")
    theirs = merge_like_totalsegmentator(
        {d: _nnunet_predict_part(results, d, trainer, mr, tmp_path) for d in ids}, "total_mr")
    assert ours.shape == theirs.shape
    present = [int(v) for v in np.unique(theirs) if v]
    assert len(present) >= 5 and any(v > 29 for v in present), present   # both parts' classes survive
    scores = {v: 2 * float(((ours == v) & (theirs == v)).sum()) / float((ours == v).sum() + (theirs == v).sum())
              for v in present if (theirs == v).sum() >= 50}
    agreement = float((ours == theirs).mean())
    print(f"total_mr against nnUNetv2_predict's parts merged: {len(scores)} classes, Dice min "
          f"{min(scores.values()):.4f}, voxels equal {agreement:.4%}")
    assert min(scores.values()) >= 0.99, scores
    assert agreement >= 0.995
