"""The review worklist: adding cases, statuses and order, the batch run (resumable, torchrun), export."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from conftest import sphere_case, write_dicom_series, write_nifti, write_sphere_scans
from napari_medseg.core.io import read_volume
from napari_medseg.core.worklist import Worklist, boundary_uncertainty, export_worklist, run_worklist
from napari_medseg.core.workspace import Workspace

PATIENT_STRINGS = (b"DOE^JANE", b"PID-12345", b"19610203")
DICOM_SERIES_UID = "1.2.826.0.1.3680043.2.1125.77"


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "napari_medseg.cli", *map(str, args)], capture_output=True,
                          text=True, **kwargs)


def mixed_folder(root: Path) -> Path:
    """Two NIfTI files (one in a subfolder), an NRRD file, a DICOM series folder and a corrupt file."""
    import SimpleITK as sitk

    (root / "sub").mkdir(parents=True)
    for seed, path in ((0, root / "a.nii.gz"), (1, root / "sub" / "b.nii")):
        image, _, affine = sphere_case(seed)
        write_nifti(path, image, affine)
    image, _, _ = sphere_case(2)
    nrrd = sitk.GetImageFromArray(np.ascontiguousarray(image.transpose(2, 1, 0)))
    nrrd.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(nrrd, str(root / "c.nrrd"))
    image, _, _ = sphere_case(3)
    write_dicom_series(root / "dicom" / "study", (image.transpose(2, 1, 0) + 1024).astype(np.int16), (0, 0, 0),
                       (2.0, 2.0, 2.0), np.eye(3), series_uid=DICOM_SERIES_UID, patient_name="DOE^JANE",
                       modality="MR")
    for path in (root / "dicom" / "study").iterdir():  # GDCM writes MR slices as one-frame Enhanced MR:
        ds = pydicom.dcmread(str(path))                  # (sometimes) make them classic MR images
        if "SharedFunctionalGroupsSequence" in ds:
            shared, frame = ds.SharedFunctionalGroupsSequence[0], ds.PerFrameFunctionalGroupsSequence[0]
            ds.ImageOrientationPatient = shared.PlaneOrientationSequence[0].ImageOrientationPatient
            ds.PixelSpacing = shared.PixelMeasuresSequence[0].PixelSpacing
            ds.SliceThickness = shared.PixelMeasuresSequence[0].SpacingBetweenSlices
            ds.RescaleIntercept = shared.PixelValueTransformationSequence[0].RescaleIntercept
            ds.RescaleSlope = shared.PixelValueTransformationSequence[0].RescaleSlope
            ds.ImagePositionPatient = frame.PlanePositionSequence[0].ImagePositionPatient
            for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
                delattr(ds, keyword)
        if "NumberOfFrames" in ds:
            del ds.NumberOfFrames
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.2.1125.78"
        ds.save_as(str(path))
    (root / "broken.nii.gz").write_bytes(b"this is not a NIfTI file" * 20)
    (root / "notes.txt").write_text("not a scan")
    return root


@pytest.fixture
def predicted(tmp_path, sphere_model):
    """A workspace whose worklist holds the mixed folder, predicted with the sphere model."""
    from napari_medseg.core.models import load_model

    workspace = Workspace(tmp_path / "ws")
    worklist = Worklist(workspace)
    worklist.add([mixed_folder(tmp_path / "scans")])
    summary = run_worklist(workspace, load_model(sphere_model))
    return workspace, worklist, summary


def test_a_mixed_folder_becomes_cases_and_the_corrupt_file_fails_with_its_reason(tmp_path):
    worklist = Worklist(Workspace(tmp_path / "ws"))
    added, known = worklist.add([mixed_folder(tmp_path / "scans")])
    by_name = {case.name: case for case in added}
    assert sorted(by_name) == ["a", "broken", "c", "dicom/study MR series 3", "sub/b"]
    assert by_name["broken"].status == "failed" and "broken.nii.gz" in by_name["broken"].reason
    assert {case.status for name, case in by_name.items() if name != "broken"} == {"new"}
    assert by_name["dicom/study MR series 3"].series == DICOM_SERIES_UID
    again, known = worklist.add([tmp_path / "scans"])  # adding the folder again adds nothing
    assert again == [] and len(known) == 5


def test_dataset_json_and_csv_lists(tmp_path):
    root = tmp_path / "Task01"
    (root / "imagesTr").mkdir(parents=True)
    (root / "imagesTs").mkdir()
    for seed, name in ((0, "imagesTr/x_001.nii.gz"), (1, "imagesTs/x_002.nii.gz")):
        image, _, affine = sphere_case(seed)
        write_nifti(root / name, image, affine)
    (root / "labelsTr").mkdir()
    write_nifti(root / "labelsTr" / "x_001.nii.gz", sphere_case(0)[1], sphere_case(0)[2])
    (root / "dataset.json").write_text(json.dumps({
        "training": [{"image": "./imagesTr/x_001.nii.gz", "label": "./labelsTr/x_001.nii.gz"}],
        "test": ["./imagesTs/x_002.nii.gz", "./imagesTs/missing.nii.gz"]}))
    worklist = Worklist(Workspace(tmp_path / "ws"))
    added, _ = worklist.add([root])  # the folder's dataset.json decides: labels are not cases
    assert sorted((c.name, c.status) for c in added) == [
        ("imagesTr/x_001", "new"), ("imagesTs/missing", "failed"), ("imagesTs/x_002", "new")]
    listing = tmp_path / "cases.csv"
    listing.write_text("path,site\nTask01/imagesTr/x_001.nii.gz,a\nTask01/labelsTr/x_001.nii.gz,b\n")
    other = Worklist(Workspace(tmp_path / "ws2"))
    added, _ = other.add([listing])
    assert sorted(c.name for c in added) == ["x_001", "x_001"] and len({c.source for c in added}) == 2


def test_run_stores_each_case_and_orders_by_uncertainty(predicted):
    workspace, worklist, summary = predicted
    assert (summary.predicted, summary.failed, summary.remaining) == (4, 0, 0)
    cases = worklist.cases()
    assert [c.status for c in cases].count("predicted") == 4
    scores = [c.score for c in cases if c.score is not None]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert cases[-1].status == "failed"  # no score: last
    names = [c.name for c in worklist.cases(order="name")]
    assert names == sorted(names, key=str.lower)
    for case in cases[:4]:
        result = worklist.load_result(case)
        scan = nib.load(case.source) if case.source.endswith(".nii.gz") else None
        assert result["labels"].shape == result["uncertainty"].shape
        assert result["labels"].max() == 1 and case.volumes[0]["ml"] > 0
        # The stored score is the boundary band's mean entropy of the stored maps.
        assert case.score == pytest.approx(boundary_uncertainty(result["labels"], result["uncertainty"]), abs=1e-6)
        if scan is not None:
            stored = nib.load(worklist.path(case, "mask"))
            assert np.allclose(stored.affine, scan.affine) and stored.shape == scan.shape
    # Status changes are kept, with reviewer and reason.
    first, second = cases[0], cases[1]
    worklist.set_status(first, "in review", reviewer="dr. a")
    worklist.set_status(second, "skipped", reason="motion artefacts")
    assert worklist.case(first.id).status == "in review" and worklist.case(first.id).reviewer == "dr. a"
    assert worklist.case(second.id).reason == "motion artefacts"
    assert worklist.counts() == {"in review": 1, "skipped": 1, "predicted": 2, "failed": 1}
    assert run_worklist(workspace, None, model_spec=None, limit=None).predicted == 0  # nothing left to do


def test_a_case_that_fails_while_running_does_not_stop_the_others(tmp_path, sphere_model):
    image, _, affine = sphere_case(0)
    write_nifti(tmp_path / "good.nii.gz", image, affine)
    write_nifti(tmp_path / "truncated.nii.gz", image, affine)
    data = (tmp_path / "truncated.nii.gz").read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(data[: len(data) // 2])  # the header reads; the voxels do not
    write_nifti(tmp_path / "z_last.nii.gz", image, affine)
    result = cli("worklist", "add", tmp_path / "good.nii.gz", tmp_path / "truncated.nii.gz",
                 tmp_path / "z_last.nii.gz", "--workspace", tmp_path / "ws")
    assert result.returncode == 0, result.stderr
    result = cli("worklist", "run", "--workspace", tmp_path / "ws", "--model", sphere_model, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "predicted 2 case(s), 1 failed" in result.stdout
    assert "truncated" in result.stderr and str(tmp_path) not in result.stderr
    listing = json.loads(cli("worklist", "list", "--workspace", tmp_path / "ws", "--json").stdout)
    assert {(c["name"], c["status"]) for c in listing} == {("good", "predicted"), ("truncated", "failed"),
                                                          ("z_last", "predicted")}


def test_an_implausible_result_comes_first_with_its_warning(tmp_path):
    """The default model on a real breast MR (pyradiomics) and on the real MNI head: the
    breast's 'brain' volume is implausible, so it leads the list whatever its entropy."""
    import shutil

    from dicom_factory import pyradiomics_scan

    from napari_medseg.viewer._sample import sample_path

    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copyfile(pyradiomics_scan("breast1"), scans / "breast.nrrd")
    shutil.copyfile(sample_path(), scans / "head.nii.gz")
    workspace = Workspace(tmp_path / "ws")
    worklist = Worklist(workspace)
    worklist.add([scans])
    assert run_worklist(workspace, None).predicted == 2
    first, second = worklist.cases()
    assert first.name == "breast" and any("expected for brain" in text for text in first.warnings)
    assert second.name == "head" and second.warnings == []
    listing = cli("worklist", "list", "--workspace", tmp_path / "ws")
    assert "expected for brain" in listing.stdout


def _snapshot(folder: Path) -> dict:
    with sqlite3.connect(str(folder / "index.sqlite")) as db:
        rows = db.execute("SELECT id, status, files, updated, score FROM cases").fetchall()
    return {row[0]: row[1:] for row in rows}


def test_a_killed_run_loses_nothing_and_predicts_nothing_twice(tmp_path, sphere_model):
    """SIGKILL at random moments, 20 times; each run continues with the cases still new
    (and when none are left, a new batch of scans is added)."""
    scans = tmp_path / "scans"

    def add_batch(number: int) -> None:
        folder = write_sphere_scans(scans / f"batch{number}", 10)
        assert cli("worklist", "add", folder, "--workspace", tmp_path / "ws").returncode == 0

    command = [sys.executable, "-m", "napari_medseg.cli", "worklist", "run", "--workspace", str(tmp_path / "ws"),
               "--model", str(sphere_model), "--device", "cpu", "--quiet"]
    rng = np.random.default_rng(7)
    first_seen: dict = {}
    kills = batches = 0
    while kills < 20:
        if all(row[0] == "predicted" for row in _snapshot_or_empty(tmp_path / "ws").values()):
            add_batch(batches)
            batches += 1
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(float(rng.uniform(1.0, 3.5)))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        for case_id, row in _snapshot(tmp_path / "ws").items():
            if row[0] == "predicted":
                for name in json.loads(row[1]):  # every committed case is complete on disk
                    assert (tmp_path / "ws" / "cases" / case_id / f"{name}.nii.gz").exists()
                first_seen.setdefault(case_id, row)
                assert first_seen[case_id] == row  # committed once, never redone
    subprocess.run(command, check=True, capture_output=True)
    final = _snapshot(tmp_path / "ws")
    assert len(final) == 10 * batches and all(row[0] == "predicted" for row in final.values())
    assert all(first_seen.get(case_id, row) == row for case_id, row in final.items())
    assert Workspace(tmp_path / "ws").verify() == []
    leftovers = [p.name for p in (tmp_path / "ws" / "cases").iterdir()]
    assert sorted(leftovers) == sorted(final)  # no staging folder of a killed run is left behind


def _snapshot_or_empty(folder: Path) -> dict:
    return _snapshot(folder) if (folder / "index.sqlite").exists() else {}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_torchrun_processes_give_the_results_of_one(tmp_path, sphere_model):
    scans = write_sphere_scans(tmp_path / "scans", 5)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("one", "two"):
        assert cli("worklist", "add", scans, "--workspace", tmp_path / name).returncode == 0
    one = cli("worklist", "run", "--workspace", tmp_path / "one", "--model", sphere_model, "--device", "cpu",
              "--quiet", env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "-m", "napari_medseg.cli", "worklist", "run",
                          "--workspace", str(tmp_path / "two"), "--model", str(sphere_model), "--device", "cpu",
                          "--quiet"], capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 process(es)" in two.stdout
    a = {c.name: c for c in Worklist(Workspace(tmp_path / "one")).cases()}
    b = {c.name: c for c in Worklist(Workspace(tmp_path / "two")).cases()}
    assert sorted(a) == sorted(b) and all(c.status == "predicted" for c in b.values())
    for name in a:
        left, right = Worklist(Workspace(tmp_path / "one")), Worklist(Workspace(tmp_path / "two"))
        x, y = left.load_result(a[name]), right.load_result(b[name])
        assert np.array_equal(x["labels"], y["labels"])
        assert np.allclose(x["uncertainty"], y["uncertainty"], atol=1e-5)
        assert a[name].score == pytest.approx(b[name].score, abs=1e-6)


def test_export_writes_masks_tables_and_a_dicom_seg_on_the_source_series(predicted, tmp_path):
    import highdicom as hd
    import pydicom

    workspace, worklist, _ = predicted
    out = tmp_path / "export"
    out.mkdir()
    summary = export_worklist(workspace, out, dicom_seg=True)
    assert summary.masks == 4 and summary.segs == 1, summary.problems
    table = json.loads((out / "worklist.json").read_text())
    assert {row["status"] for row in table} == {"predicted", "failed"}
    csv_text = (out / "worklist.csv").read_text()
    assert "foreground mL" in csv_text.splitlines()[0] or " mL" in csv_text.splitlines()[0]
    # Masks in each scan's own geometry.
    case_a = next(c for c in worklist.cases() if c.name == "a")
    exported = nib.load(out / "a.nii.gz")
    assert np.allclose(exported.affine, nib.load(case_a.source).affine)
    # The SEG: references the source series, frames on the right slices, the segment equals the mask.
    case = next(c for c in worklist.cases() if c.series)
    seg = hd.seg.segread(str(out / f"{case.name.replace('/', '_').replace(' ', '_')}.seg.dcm"))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == DICOM_SERIES_UID
    sources = {}
    for path in (tmp_path / "scans" / "dicom" / "study").iterdir():
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        sources[ds.SOPInstanceUID] = ds
    stored = nib.load(worklist.path(case, "mask"))
    mask = np.asarray(stored.dataobj)  # file order: (i, j, k), k = the slice
    frames = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None]
    assert seg.PatientName == "DOE^JANE"  # copied at export time, for PACS
    checked = 0
    for n, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        source = sources[uid]
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, [float(v) for v in source.ImagePositionPatient], atol=1e-3)
        k = int(source.InstanceNumber) - 1
        # DICOM rows run along j, columns along i.
        assert np.array_equal(frames[n].astype(bool), mask[:, :, k].T.astype(bool)), f"frame {n}"
        checked += 1
    assert checked == int(mask.any(axis=(0, 1)).sum())  # one frame per source slice with mask voxels


def test_no_patient_identifier_of_a_dicom_input_enters_the_workspace(predicted, tmp_path):
    workspace, worklist, _ = predicted
    case = next(c for c in worklist.cases() if c.series)
    result = worklist.load_result(case)
    worklist.store_reviewed(case, result["labels"], read_volume(worklist.path(case, "mask")).geometry)
    workspace.close()
    found = []
    for path in (tmp_path / "ws").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if path.name.endswith(".gz"):
                data = gzip.decompress(data)
            if any(needle in data for needle in PATIENT_STRINGS):
                found.append(path.name)
    assert found == []
    listing = cli("worklist", "list", "--workspace", tmp_path / "ws", "--json")
    assert listing.returncode == 0 and not any(s.decode() in listing.stdout for s in PATIENT_STRINGS)


def test_cli_errors_are_one_line(tmp_path):
    missing = cli("worklist", "list", "--workspace", tmp_path / "none")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
    Workspace(tmp_path / "ws").close()
    # -o creates its folder (with its parents), as TotalSegmentator's does.
    made = cli("worklist", "export", "--workspace", tmp_path / "ws", "-o", tmp_path / "new" / "export")
    assert made.returncode == 0 and (tmp_path / "new" / "export" / "worklist.csv").is_file()
    bad = cli("worklist", "add", tmp_path / "ws" / "index.sqlite", "--workspace", tmp_path / "ws")
    assert bad.returncode == 0 and "not a scan" in bad.stderr


def test_a_three_class_model_runs_through_the_worklist_into_a_seg_with_every_segment_named(tmp_path):
    """The genuine nnU-Net model (body, bone) on its held-out real CT, written as a DICOM
    series; the SEG read back with highdicom has both segments by name, on the right slices."""
    import highdicom as hd
    import SimpleITK as sitk
    from dicom_factory import write_image
    from nnunet_factory import build
    from pydicom.uid import generate_uid

    from napari_medseg.core.models import load_model
    from napari_medseg.core.nnunet import import_nnunet

    genuine = build()
    model = load_model(import_nnunet(genuine["folder"], folds=["0"], name="lung-ct-seg").path)
    image = sitk.ReadImage(str(genuine["held_out"]))
    assert image.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    pixels = sitk.GetArrayFromImage(image)                      # (k, row, column)
    series = tmp_path / "scans" / "ct"
    series.mkdir(parents=True)
    uids = {"series_uid": generate_uid(), "study_uid": generate_uid(), "frame_uid": generate_uid()}
    for k in range(pixels.shape[0]):
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        write_image(series / f"IM{k + 1:04d}.dcm", pixels[k], position=position, orientation=(1, 0, 0, 0, 1, 0),
                    spacing=(image.GetSpacing()[1], image.GetSpacing()[0]), number=k + 1,
                    extra={"SliceThickness": f"{image.GetSpacing()[2]:g}"}, **uids)
    workspace = Workspace(tmp_path / "ws")
    worklist = Worklist(workspace)
    worklist.add([series])
    from napari_medseg.core.inference import InferenceSettings

    summary = run_worklist(workspace, model, settings=InferenceSettings(device="cpu", tta=False))
    assert summary.predicted == 1, summary
    out = tmp_path / "export"
    out.mkdir()
    exported = export_worklist(workspace, out, dicom_seg=True)
    assert exported.segs == 1, exported.problems
    (case,) = worklist.cases()
    table = json.loads((out / "worklist.json").read_text())
    assert [(v["value"], v["name"]) for v in table[0]["volumes"]] == [(1, "body"), (2, "bone")]
    assert (out / "worklist.csv").read_text().splitlines()[0].endswith("body mL,bone mL")
    seg = hd.seg.segread(str(next(out.glob("*.seg.dcm"))))
    labels = {d.SegmentNumber: d.SegmentLabel for d in seg.SegmentSequence}
    assert sorted(labels.values()) == ["body", "bone"]
    mask = np.asarray(nib.load(worklist.path(case, "mask")).dataobj)       # (i, j, k)
    by_uid = {pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID: int(p.stem[2:]) - 1
              for p in series.iterdir()}
    number_of = {name: number for number, name in labels.items()}
    frames = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None]
    seen = set()
    for n, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        value = {number_of["body"]: 1, number_of["bone"]: 2}[number]
        k = by_uid[uid]
        assert np.array_equal(frames[n].astype(bool), (mask[:, :, k] == value).T), f"frame {n}"
        seen.add((value, k))
    assert seen == {(v, k) for v in (1, 2) for k in range(mask.shape[2]) if (mask[:, :, k] == v).any()}
    assert any(v == 2 for v, _ in seen)
