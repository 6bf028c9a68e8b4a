"""The correction queue: durable under SIGKILL, shared by concurrent writers, clear on a full or
read-only disk, and free of patient identifiers. Real SQLite, real files, real processes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import sphere_case
from dicom_factory import PATIENT, Sampler, patient_strings_absent, write_series
from napari_medseg.viewer._sample import sample_path
from napari_medseg.core.errors import MedsegError
from napari_medseg.core.geometry import ScanGeometry
from napari_medseg.core.workspace import Workspace

SUBMITTER = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import sphere_case
    from napari_medseg.core.geometry import ScanGeometry
    from napari_medseg.core.workspace import Workspace
    workspace = Workspace({folder!r})
    image, label, affine = sphere_case(1, shape=(24, 24, 24))
    geometry = ScanGeometry(affine, image.shape)
    print("ready", flush=True)
    for n in range({count}):
        workspace.submit(image, geometry, label, label, reviewer="proc {name}", note=str(n))
    print("done", flush=True)
""")


def submitter(folder: Path, count: int, name: str = "a") -> list:
    code = SUBMITTER.format(tests=str(Path(__file__).parent), folder=str(folder), count=count, name=name)
    return [sys.executable, "-c", code]


def geometry_of(affine, shape):
    return ScanGeometry(affine, shape)


def test_a_submitted_item_comes_back_exactly(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    image, label, affine = sphere_case(0)
    prediction = np.zeros_like(label)
    item = workspace.submit(image, geometry_of(affine, image.shape), label, prediction, model="spheres v1",
                            reviewer="Dr Who", note="tumour edge", split="validation", label_names={1: "sphere"})
    assert item.status == "queued" and item.split == "validation" and item.edited_voxels == int(label.sum())
    loaded = workspace.load_item(item)
    np.testing.assert_array_equal(loaded["scan"].layer_data(), image)
    np.testing.assert_array_equal(loaded["label"], label)
    np.testing.assert_array_equal(loaded["prediction"], prediction)
    np.testing.assert_allclose(loaded["scan"].geometry.affine_ras, affine)
    assert workspace.verify() == [] and workspace.items()[0].note == "tumour edge"
    workspace.set_status([item.id], "rejected")
    assert workspace.items(status="rejected")[0].id == item.id


def test_every_fifth_item_joins_the_frozen_validation_set(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    image, label, affine = sphere_case(0, shape=(16, 16, 16))
    splits = [workspace.submit(image, geometry_of(affine, image.shape), label).split for _ in range(10)]
    assert splits == ["train"] * 4 + ["validation"] + ["train"] * 4 + ["validation"]


def test_sigkill_at_random_moments_never_leaves_the_index_and_files_disagreeing(tmp_path):
    folder = tmp_path / "ws"
    Workspace(folder).close()
    rng = random.Random(0)
    committed = 0
    for run in range(50):
        child = subprocess.Popen(submitter(folder, 1000), stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.25))  # somewhere inside a submit: writing, hashing, renaming, committing
        child.send_signal(signal.SIGKILL)
        child.wait()
        workspace = Workspace(folder)  # opening cleans up what the dead writer left
        problems = workspace.verify()
        count = len(workspace.items())
        workspace.close()
        assert problems == [], f"run {run}: {problems}"
        assert count >= committed
        committed = count
        leftovers = [p.name for p in (folder / "items").iterdir() if p.name.startswith(".")]
        assert leftovers == [], f"run {run}: {leftovers}"
    assert committed > 0


def test_two_processes_submit_to_one_workspace_at_once(tmp_path):
    folder = tmp_path / "ws"
    Workspace(folder).close()
    children = [subprocess.Popen(submitter(folder, 8, name), stdout=subprocess.PIPE, text=True) for name in "ab"]
    for child in children:
        output, _ = child.communicate(timeout=300)
        assert child.returncode == 0 and "done" in output
    workspace = Workspace(folder)
    items = workspace.items()
    assert len(items) == 16 and workspace.verify() == []
    assert sorted({i.reviewer for i in items}) == ["proc a", "proc b"]


def test_a_full_disk_is_a_clear_error_that_stores_nothing(tmp_path):
    folder = tmp_path / "ws"
    Workspace(folder).close()
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import sphere_case
        from napari_medseg.core.errors import MedsegError
        from napari_medseg.core.geometry import ScanGeometry
        from napari_medseg.core.workspace import Workspace
        workspace = Workspace({str(folder)!r})
        image, label, affine = sphere_case(0, shape=(48, 48, 48))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        try:
            workspace.submit(image, ScanGeometry(affine, image.shape), label)
        except MedsegError as exc:
            print("ERROR", exc)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.startswith("ERROR could not store the correction"), result.stdout + result.stderr
    assert "File too large" in result.stdout and "try again" in result.stdout
    workspace = Workspace(folder)
    assert workspace.items() == [] and workspace.verify() == []
    assert [p.name for p in (folder / "items").iterdir()] == []


def test_a_read_only_workspace_is_a_clear_error(tmp_path):
    folder = tmp_path / "ws"
    Workspace(folder).close()
    (folder / "items").chmod(0o500)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import sphere_case
        from napari_medseg.core.errors import MedsegError
        from napari_medseg.core.geometry import ScanGeometry
        from napari_medseg.core.workspace import Workspace
        image, label, affine = sphere_case(0, shape=(16, 16, 16))
        try:
            Workspace({str(folder)!r}).submit(image, ScanGeometry(affine, image.shape), label)
        except MedsegError as exc:
            print("ERROR", exc)
    """)
    command = [sys.executable, "-c", script]
    if os.geteuid() == 0:
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
                   "-dac_override,-dac_read_search", "--", *command]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    finally:
        (folder / "items").chmod(0o700)
    assert result.stdout.startswith("ERROR could not store the correction"), result.stdout + result.stderr
    assert "Permission denied" in result.stdout


def test_a_dicom_series_leaves_no_patient_identifier_in_the_workspace(tmp_path):
    series = tmp_path / "dicom"
    written = write_series(series, Sampler(Path(sample_path())), shape=(24, 24, 6), modality="MR")
    assert written["paths"]
    label = tmp_path / "label.nii.gz"
    from napari_medseg.core.io import read_volume, write_mask

    volume = read_volume(series)
    write_mask(label, (volume.layer_data() > np.median(volume.layer_data())).astype(np.uint8), volume.geometry)
    workspace = tmp_path / "ws"
    result = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "queue", "submit", str(series), str(label),
                             "--workspace", str(workspace), "--reviewer", "Dr Reader"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    listing = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "queue", "list", "--workspace",
                              str(workspace), "--json"], capture_output=True, text=True)
    assert "Dr Reader" in listing.stdout
    assert patient_strings_absent(workspace) == []
    assert not any(value in listing.stdout + result.stdout for value in PATIENT.values())
    stored = nib.load(next((workspace / "items").rglob("scan.nii.gz")))
    assert stored.header["descrip"].tobytes().strip(b"\0") == b"" and stored.header["db_name"].tobytes().strip(
        b"\0") == b""


def test_cli_errors_for_a_missing_workspace_and_a_bad_label(tmp_path):
    result = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "queue", "list", "--workspace",
                             str(tmp_path / "none")], capture_output=True, text=True)
    assert result.returncode == 2 and "workspace 'none' does not exist" in result.stderr
    image = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.float32) + np.arange(10), np.eye(4)), image)
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), other)
    result = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "queue", "submit", str(image), str(other),
                             "--workspace", str(tmp_path / "ws")], capture_output=True, text=True)
    assert result.returncode == 2 and "is not on the scan's grid" in result.stderr
    assert not (tmp_path / "ws").exists() or Workspace(tmp_path / "ws").items() == []


def test_submit_refuses_a_label_of_another_shape(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    image, label, affine = sphere_case(0)
    with pytest.raises(MedsegError, match="shape"):
        workspace.submit(image, geometry_of(affine, image.shape), label[:-1])


def test_prompts_are_stored_with_the_correction_and_fine_tuning_weighs_their_voxels(tmp_path):
    """The accepted prompts (a real PromptSession's record) and their mask come back exactly;
    fine-tuning counts the clicked and stroked voxels as changed ones."""
    from napari_medseg.core.finetune import _scan_case
    from napari_medseg.core.prompts import PromptSession

    image, label, affine = sphere_case(4)
    geometry = ScanGeometry(affine, image.shape)
    session = PromptSession(image, geometry.layer_spacing, label, 1)
    centre = tuple(int(c) for c in np.argwhere(label).mean(0).round())
    strokes = np.zeros(label.shape, np.uint8)
    strokes[centre[0], :3, :3] = 2
    session.add_point(centre, positive=True)
    session.add_strokes(strokes)
    prompted = session.labels.astype(np.uint8)
    workspace = Workspace(tmp_path / "ws")
    item = workspace.submit(image, geometry, prompted, label, prompts=[session.record()], prompted=prompted)
    assert {"prompts.json", "strokes-1", "prompted"} <= set(item.files) and workspace.verify() == []
    loaded = workspace.load_item(item)
    np.testing.assert_array_equal(loaded["prompted"], prompted)
    [stored] = loaded["prompts"]
    assert stored["label"] == 1 and stored["points"] == [{"index": list(centre), "positive": True}]
    np.testing.assert_array_equal(stored["strokes"], strokes)
    case = _scan_case(workspace, item)
    seeds = strokes > 0
    seeds[centre] = True
    np.testing.assert_array_equal(case.changed, (label != prompted) | seeds)
    workspace.close()
