"""No patient identifier and no raw library text reaches the user: every error path, in a folder
named like a patient, on the command line, in the napari reader and in the widgets."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import AFFINES, random_volume, write_nifti
from dicom_factory import PATIENT, Sampler, write_series
from napari_medseg.viewer._sample import sample_path
from napari_medseg.core.privacy import ScrubFilter, native_messages, scrub

NAMES = ("Smith", "John", "MRN998877", "SMITH", "19450312")


def leaks(text: str) -> list:
    return [name for name in NAMES if name in text]


@pytest.fixture
def patient_folder(tmp_path):
    folder = tmp_path / "Smith^John_MRN998877" / "study 2024"
    folder.mkdir(parents=True)
    return folder


def _broken_mha(folder):
    path = folder / "scan.mha"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\n"
                    "ElementDataFile = missing.raw\n")
    return path


def _unreadable_mha(folder):
    path = folder / "junk.mha"
    path.write_bytes(b"\x00\x01garbage" * 50)
    return path


def _broken_dcm(folder):
    path = folder / "IM0001.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 20)
    return path


def _truncated_nifti(folder):
    full = write_nifti(folder / "full.nii.gz", random_volume((40, 40, 30)), AFFINES["ras"])
    path = folder / "truncated.nii.gz"
    path.write_bytes(full.read_bytes()[:2000])
    full.unlink()
    return path


def _two_d(folder):
    return write_nifti(folder / "slice.nii.gz", random_volume((32, 32)), AFFINES["ras"])


def _dicom_series(folder, damage):
    series = folder / "series"
    written = write_series(series, Sampler(Path(sample_path())), shape=(24, 24, 8), modality="MR")
    if damage == "truncated":
        raw = written["paths"][3].read_bytes()
        written["paths"][3].write_bytes(raw[: len(raw) - 300])
    elif damage == "duplicate":
        shutil.copy(written["paths"][3], series / "IM0004_copy")
    return series


CASES = {
    "mha pointing at a missing raw file": _broken_mha,
    "unreadable mha": _unreadable_mha,
    "broken dcm": _broken_dcm,
    "truncated nifti": _truncated_nifti,
    "2D nifti": _two_d,
    "DICOM series with a truncated slice": lambda f: _dicom_series(f, "truncated"),
    "DICOM series with a duplicate slice": lambda f: _dicom_series(f, "duplicate"),
}


@pytest.mark.parametrize("command", ["info", "predict"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_never_shows_a_patient_folder_or_a_traceback(patient_folder, case, command):
    path = CASES[case](patient_folder)
    args = [sys.executable, "-m", "napari_medseg.cli", command, str(path)]
    if command == "predict":
        args += ["-o", str(patient_folder / "mask.nii.gz"), "--quiet", "--model", "brain-t1-attention", "--force"]
    result = subprocess.run(args, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode in (0, 2), output
    assert "Traceback" not in output and not leaks(output), output
    assert "WARNING: In" not in output and ".cxx" not in output and ".hxx" not in output, output
    if result.returncode == 2:
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("napari-medseg: error:")


def test_a_truncated_slice_is_named_in_the_cli_and_in_info_json(patient_folder):
    import json

    series = _dicom_series(patient_folder, "truncated")
    result = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "info", str(series), "--json"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert any("skipped IM0004" in w and "truncated" in w for w in summary["warnings"])
    assert summary["dimensions"][2] == 8  # the gap it leaves is interpolated, and the user is told
    assert any("1 slice is missing" in w for w in summary["warnings"])


def test_a_duplicate_slice_is_dropped_and_the_spacing_comes_from_the_rest(patient_folder):
    from napari_medseg.core.io import read_volume

    volume = read_volume(_dicom_series(patient_folder, "duplicate"))
    assert volume.data.shape[2] == 8 and volume.geometry.spacing[2] == pytest.approx(5.0)
    assert any("dropped 1 duplicate image" in w for w in volume.warnings)


@pytest.mark.parametrize("case", sorted(CASES))
def test_napari_reader_notifications_name_only_the_file(patient_folder, case):
    from napari.utils.notifications import notification_manager

    from napari_medseg.viewer._reader import napari_get_reader

    path = CASES[case](patient_folder)
    before = len(notification_manager.records)
    reader = napari_get_reader(str(path))
    assert reader is not None
    reader(str(path))
    messages = [str(n.message) for n in notification_manager.records[before:]]
    assert messages and not any(leaks(m) for m in messages), messages


def test_scan_widget_notifications_name_only_the_file(qtbot, make_napari_viewer, patient_folder):
    from napari.utils.notifications import notification_manager

    from napari_medseg.viewer._widgets.scan import ScanWidget

    viewer = make_napari_viewer()
    widget = ScanWidget(viewer)
    for case in sorted(CASES):
        before = len(notification_manager.records)
        widget.open(CASES[case](patient_folder))
        qtbot.waitUntil(lambda: not widget.task.running, timeout=30000)
        messages = [str(n.message) for n in notification_manager.records[before:]]
        assert messages and not any(leaks(m) for m in messages), (case, messages)


def test_no_dicom_patient_attribute_reaches_a_layer(tmp_path):
    from napari_medseg.viewer._reader import read_scan

    layers = read_scan(str(_dicom_series(tmp_path, None)))  # the header holds the patient, the path does not
    assert layers and layers[0][0] is not None
    text = repr([kwargs for _data, kwargs, _kind in layers])
    assert not leaks(text) and not any(value in text for value in PATIENT.values())


def test_scrub_keeps_base_names_only():
    text = ('Exception thrown in SimpleITK ImageFileReader_Execute: /work/src/sitkImageReaderBase.cxx:99:\n'
            'sitk::ERROR: Unable to determine ImageIO reader for "/data/Smith^John_MRN998877/scan.mha"')
    assert "Smith" not in scrub(text) and '"scan.mha"' in scrub(text)
    assert scrub("could not read Smith^John/dicom/IM0001") == "could not read IM0001"
    assert scrub("spacing 0.78/0.78 mm and/or 1/2") == "spacing 0.78/0.78 mm and/or 1/2"
    assert scrub("'/tmp/Smith John/x y.nii'") == "'x y.nii'"


def test_native_library_output_is_captured_and_scrubbed():
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(True)
    try:
        with native_messages() as lines:
            try:
                sitk.ReadImage("/nonexistent/Smith^John_MRN998877/scan.nrrd")
            except RuntimeError:
                pass
            import os
            os.write(2, b"WARNING: In /build/itkGDCMSeriesFileNames.cxx, line 100\n"
                        b"GDCMSeriesFileNames (0x55d): /data/Smith^John_MRN998877/IM1 is a duplicate\n")
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
    assert lines and not any(leaks(line) for line in lines) and not any(".cxx" in line for line in lines)
    assert "IM1 is a duplicate" in lines


def test_log_records_are_scrubbed(caplog):
    logger = logging.getLogger("napari_medseg.test")
    logger.addFilter(ScrubFilter())
    with caplog.at_level(logging.INFO, logger="napari_medseg.test"):
        logger.info("opened %s", "/data/Smith^John_MRN998877/scan.nii.gz")
    assert caplog.messages == ["opened scan.nii.gz"]
