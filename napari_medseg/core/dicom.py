"""DICOM series folders: discovery, slice ordering, spacing checks, reading.

Only an allow-list of technical tags is ever read into memory, so patient
identifiers (name, ID, birth date, accession number...) cannot reach a layer, a
log line, a notification or the fine-tuning queue.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import MultipleSeriesError, UnreadableScanError

SAFE_TAGS = {
    "0008|0060": "Modality",
    "0020|0011": "SeriesNumber",
    "0008|103e": "SeriesDescription",
    "0018|0015": "BodyPartExamined",
    "0008|0070": "Manufacturer",
    "0018|0050": "SliceThickness",
}
_IPP, _IOP = "0020|0032", "0020|0037"
# Slice gaps differing from the median by more than this fraction count as uneven.
SPACING_TOLERANCE = 0.01


def looks_like_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble."""
    try:
        if not Path(path).is_file():
            return False
        with open(path, "rb") as fh:
            head = fh.read(132)
        return head[128:132] == b"DICM"
    except OSError:
        return False


def _series_dirs(folder: Path):
    for root, _dirs, files in os.walk(folder):
        if files:
            yield root


def list_series(folder: str | os.PathLike) -> list[dict]:
    """All DICOM series below ``folder``, largest first, with patient-free details."""
    import SimpleITK as sitk

    folder = Path(folder)
    found = []
    for directory in _series_dirs(folder):
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(directory) or ():
            files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(directory, uid))
            tags = _safe_tags(files[0]) if files else {}
            found.append({
                "uid": uid,
                "directory": directory,
                "n_files": len(files),
                "modality": tags.get("Modality", "unknown"),
                "series_number": tags.get("SeriesNumber", ""),
                "description": tags.get("SeriesDescription", ""),
            })
    found.sort(key=lambda s: -s["n_files"])
    for index, entry in enumerate(found):
        entry["index"] = index
    return found


def describe_series(entry: dict) -> str:
    parts = [f"#{entry['index']}", entry["modality"]]
    if entry["series_number"]:
        parts.append(f"series {entry['series_number']}")
    if entry["description"]:
        parts.append(f"'{entry['description']}'")
    parts.append(f"{entry['n_files']} files")
    return " ".join(parts)


def _header_reader(filename: str):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(filename)
    reader.LoadPrivateTagsOff()
    reader.ReadImageInformation()
    return reader


def _safe_tags(filename: str) -> dict:
    try:
        reader = _header_reader(filename)
    except RuntimeError:
        return {}
    return {name: reader.GetMetaData(tag).strip()
            for tag, name in SAFE_TAGS.items() if reader.HasMetaDataKey(tag)}


def _floats(text: str) -> np.ndarray:
    return np.array([float(v) for v in text.replace(" ", "").split("\\") if v], dtype=float)


def order_slices(files: list[str], progress: Callable[[float, str], None] | None = None):
    """Sort files by ImagePositionPatient along the slice normal; report gaps.

    Returns ``(sorted_files, warnings)``.
    """
    positions, normal = [], None
    for n, filename in enumerate(files):
        reader = _header_reader(filename)
        if not (reader.HasMetaDataKey(_IPP) and reader.HasMetaDataKey(_IOP)):
            return files, ["slices carry no ImagePositionPatient; kept the order of the files"]
        if normal is None:
            iop = _floats(reader.GetMetaData(_IOP))
            normal = np.cross(iop[:3], iop[3:6])
        positions.append(float(_floats(reader.GetMetaData(_IPP)) @ normal))
        if progress and n % 16 == 0:
            progress(0.3 * n / len(files), f"reading slice headers {n}/{len(files)}")
    order = np.argsort(positions)
    sorted_positions = np.asarray(positions)[order]
    warnings = []
    gaps = np.diff(sorted_positions)
    if len(gaps):
        typical = float(np.median(gaps))
        if np.any(gaps < 1e-3 * max(typical, 1e-6)):
            warnings.append("some slices share the same position (duplicates)")
        elif typical > 0:
            missing = int(np.sum(np.round(gaps / typical) - 1, where=gaps > 1.5 * typical))
            if missing:
                warnings.append(
                    f"about {missing} slice(s) are missing: gaps of up to {gaps.max():.2f} mm "
                    f"where slices are {typical:.2f} mm apart; distances across the gap are wrong"
                )
            elif np.max(np.abs(gaps - typical)) > SPACING_TOLERANCE * typical:
                warnings.append(
                    f"slice spacing is uneven ({gaps.min():.3f} to {gaps.max():.3f} mm); "
                    f"the volume assumes {typical:.3f} mm"
                )
    return [files[i] for i in order], warnings


def read_series(folder: Path, *, series=None, progress=None, finish=None):
    """Read one DICOM series below ``folder`` into a Volume (see ``io.read_volume``)."""
    import SimpleITK as sitk

    all_series = list_series(folder)
    if not all_series:
        raise UnreadableScanError(f"no DICOM series found in folder '{Path(folder).name}'")
    if series is None:
        if len(all_series) > 1:
            listing = "; ".join(describe_series(s) for s in all_series)
            raise MultipleSeriesError(
                f"folder '{Path(folder).name}' holds {len(all_series)} DICOM series, choose one: {listing}",
                series=all_series,
            )
        chosen = all_series[0]
    else:
        chosen = _choose(all_series, series)
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(chosen["directory"], chosen["uid"]))
    files, warnings = order_slices(files, progress)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    if progress:
        reader.AddCommand(sitk.sitkProgressEvent,
                          lambda: progress(0.3 + 0.7 * reader.GetProgress(), "reading pixels"))
    try:
        # GDCM applies RescaleSlope/RescaleIntercept, so CT arrives in Hounsfield units.
        image = reader.Execute()
    except RuntimeError as exc:
        raise UnreadableScanError(f"the DICOM series could not be read ({str(exc).splitlines()[-1][:160]})") from None
    tags = _safe_tags(files[0])
    name = f"{chosen['modality']} series {chosen['series_number'] or chosen['index']}"
    volume = finish(image, name, name, None, fmt="DICOM series",
                    modality=tags.get("Modality") or None,
                    extra_info={"dicom": tags, "n_series_in_folder": len(all_series)})
    volume.warnings.extend(warnings)
    return volume


def _choose(all_series: list[dict], series) -> dict:
    for entry in all_series:
        if str(series) in (entry["uid"], str(entry["index"])):
            return entry
    raise UnreadableScanError(
        f"series '{series}' is not in this folder; available: "
        + "; ".join(describe_series(s) for s in all_series)
    )
