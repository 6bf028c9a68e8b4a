"""DICOM folders shaped as PACS and CD exports deliver them, written with pydicom from real scans.

The voxels come from real clinical scans shipped in PyPI packages (pyradiomics' lung CT
and brain MR, fetched once into ``.cache/test-data``), or from the bundled MNI152 head.
Every series carries a patient name, ID and birth date, so tests can check that none
of them ever leaves the reader.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "test-data"
PATIENT = {"PatientName": "SMITH^JOHN^Q", "PatientID": "MRN998877", "PatientBirthDate": "19450312"}
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def pyradiomics_scan(name: str = "lung1") -> Path:
    """A real clinical scan from pyradiomics 3.0.1's source distribution (BSD-3): ``{name}_image.nrrd``."""
    target = CACHE / f"{name}_image.nrrd"
    if not target.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        archive = CACHE / "pyradiomics-3.0.1.tar.gz"
        if not archive.exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "--no-build-isolation", "-q", "pyradiomics==3.0.1", "-d", str(CACHE)], check=True)
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.name.startswith("pyradiomics-3.0.1/data/") and member.name.endswith(".nrrd"):
                    member.name = Path(member.name).name
                    tar.extract(member, CACHE)
    return target


class Sampler:
    """Trilinear samples of a real volume at patient positions (LPS mm); air outside."""

    def __init__(self, path: Path):
        from napari_medseg.core.geometry import RAS_TO_LPS
        from napari_medseg.core.io import read_volume

        volume = read_volume(path)
        self.data = np.asarray(volume.data, dtype=np.float32)
        self.inverse = np.linalg.inv(RAS_TO_LPS @ volume.geometry.affine_ras)
        self.air = float(self.data.min())
        lps = RAS_TO_LPS @ volume.geometry.affine_ras
        self.centre = lps[:3, :3] @ ((np.array(self.data.shape) - 1) / 2) + lps[:3, 3]

    def __call__(self, points: np.ndarray) -> np.ndarray:
        from scipy import ndimage

        index = points @ self.inverse[:3, :3].T + self.inverse[:3, 3]
        return ndimage.map_coordinates(self.data, index.T, order=1, mode="constant", cval=self.air)


def slice_points(origin, row_direction, column_direction, spacing, rows, columns) -> np.ndarray:
    """Patient positions of every pixel of a slice, by PS3.3 C.7.6.2.1.1, shape (rows * columns, 3)."""
    j, i = np.mgrid[:rows, :columns]
    return (np.asarray(origin, float) + i.reshape(-1, 1) * spacing[1] * np.asarray(row_direction, float)
            + j.reshape(-1, 1) * spacing[0] * np.asarray(column_direction, float))


def write_image(path: Path, pixels: np.ndarray, *, position, orientation, spacing, series_uid, study_uid,
                frame_uid, modality="CT", number=1, series_number=3, description="AX SERIES", extra=None,
                image_type=("ORIGINAL", "PRIMARY", "AXIAL"), slope=1.0, intercept=-1024.0) -> Path:
    """One single-frame image file with real header fields and a patient's identity."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_STORAGE if modality == "CT" else MR_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    for key, value in PATIENT.items():
        setattr(ds, key, value)
    ds.PatientSex = "M"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20240101", "101010", "ACC4711", ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.StudyID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "1", modality, series_number, number
    ds.SeriesDescription, ds.Manufacturer = description, "TESTCO"
    ds.ImageType = list(image_type)
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
    ds.PixelSpacing = [f"{spacing[0]:.6f}", f"{spacing[1]:.6f}"]
    ds.SliceThickness = "1"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    if modality == "CT":
        ds.KVP = "120"
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    stored = np.round((np.asarray(pixels, float) - intercept) / slope).astype(np.int16)
    ds.PixelData = stored.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def stored_values(pixels: np.ndarray, slope=1.0, intercept=-1024.0) -> np.ndarray:
    """What a reader must return for ``pixels`` written by :func:`write_image` (the stored rounding)."""
    return np.round((np.asarray(pixels, float) - intercept) / slope) * slope + intercept


def write_series(folder: Path, sampler: Sampler, *, shape=(48, 40, 20), spacing=(1.5, 1.5), gaps=None, tilt_deg=0.0,
                 centre=None, modality="CT", series_uid=None, study_uid=None, frame_uid=None, series_number=3,
                 subfolders=1, name="IM{:04d}", extra=None, file_suffix="") -> dict:
    """An axial series sampled from ``sampler``. ``gaps``: the table steps between slices in mm
    (default 5 mm each); ``tilt_deg``: gantry tilt about the left-right axis; ``subfolders``:
    the slices dealt round-robin into that many folders. Returns what was written, for checks."""
    rows, columns, count = shape
    gaps = [5.0] * (count - 1) if gaps is None else list(gaps)
    count = len(gaps) + 1
    theta = np.radians(tilt_deg)
    row_direction = np.array([1.0, 0.0, 0.0])
    column_direction = np.array([0.0, np.cos(theta), np.sin(theta)])
    centre = sampler.centre if centre is None else np.asarray(centre, float)
    table = np.concatenate([[0.0], np.cumsum(gaps)])
    table -= table[-1] / 2
    start = centre - (columns - 1) / 2 * spacing[1] * row_direction - (rows - 1) / 2 * spacing[0] * column_direction
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    written = {"paths": [], "pixels": [], "positions": [], "orientation": (*row_direction, *column_direction),
               "spacing": spacing, "series_uid": series_uid, "study_uid": study_uid, "frame_uid": frame_uid}
    for k in range(count):
        # A tilted gantry: the table moves along z, the image plane is tilted about x.
        position = start + np.array([0.0, 0.0, table[k]])
        pixels = sampler(slice_points(position, row_direction, column_direction, spacing, rows, columns))
        pixels = pixels.reshape(rows, columns)
        target = folder / (f"part{k % subfolders}" if subfolders > 1 else "")
        target.mkdir(parents=True, exist_ok=True)
        path = write_image(target / (name.format(k + 1) + file_suffix), pixels, position=position,
                           orientation=written["orientation"], spacing=spacing, series_uid=series_uid,
                           study_uid=study_uid, frame_uid=frame_uid, modality=modality, number=k + 1,
                           series_number=series_number, extra=(extra(k) if callable(extra) else extra))
        written["paths"].append(path)
        written["pixels"].append(stored_values(pixels))
        written["positions"].append(position)
    return written


def bilinear(pixels: np.ndarray, row: float, column: float, fill: float) -> float:
    """A slice's value at a fractional (row, column), as the judge of resampled grids."""
    from scipy import ndimage

    return float(ndimage.map_coordinates(np.asarray(pixels, float), [[row], [column]], order=1, mode="grid-constant",
                                         cval=fill)[0])


def patient_strings_absent(root: Path) -> list:
    """Every file below ``root`` that contains the test patient's name, ID or birth date."""
    needles = [value.encode() for value in PATIENT.values()] + [b"SMITH", b"998877"]
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if any(needle in data for needle in needles):
                found.append(path)
    return found


def read_back(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(str(path))
