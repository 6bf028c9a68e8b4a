"""The review worklist: cases in the workspace index, predicted ahead, most doubtful first.

A case is one scan: a NIfTI/NRRD/MetaImage file, or one DICOM series (one volume of
it). Cases are added from folders (searched recursively), MSD/nnU-Net ``dataset.json``
files, or CSV files of paths. Each has a status (:data:`STATUSES`); a case that cannot
be read is ``failed`` with its one-line reason and never stops the others.

:func:`run_worklist` predicts every ``new`` case with the model loaded once. The next
scan is read in a background thread while the network runs on the current one, and the
labels and the uncertainty (normalised entropy) come from one network pass. Each case is
stored atomically (files written, fsynced and renamed, then its row committed in one
transaction), so a killed run loses at most the case in progress, and running again
continues with the cases still ``new``. Under ``torchrun`` rank 0 reads the index,
broadcasts the pending cases and the model file, each rank predicts its shard, and rank
0 gathers the results through ``torch.distributed`` and alone writes the workspace.

**Privacy.** Nothing read from a DICOM header enters the workspace except the series
UID (to find the series again); masks and maps are written into fresh NIfTI headers. The
patient and study attributes that a DICOM SEG needs are copied from the source files by
:func:`export_worklist` straight into the exported file.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import Cancelled, MedsegError
from .io import SCAN_SUFFIXES, suffix_of
from .outputs import fsync_path, sha256_of_file, staging_folder, sweep_staging, utc_timestamp
from .progress import Progress, report
from .workspace import Workspace, deidentified_geometry

STATUSES = ("new", "predicted", "in review", "accepted", "corrected", "skipped", "failed")
ORDERS = ("uncertainty", "name", "date")
# Cases whose prediction is stored (and so can be opened at once, and exported).
HAS_MASK = ("predicted", "in review", "accepted", "corrected")
BOUNDARY_BAND_VOXELS = 2


@dataclass
class Case:
    id: str
    added: str
    name: str
    source: str
    series: str
    volume: int
    date: str
    status: str
    reason: str
    model: str
    score: float | None
    warnings: list
    volumes: list
    reviewer: str
    item: str
    files: dict
    updated: str

    def summary(self) -> dict:
        """The case as the CLI's ``--json`` and the export table show it (no source path)."""
        return {"id": self.id, "name": self.name, "status": self.status, "reason": self.reason,
                "model": self.model, "uncertainty": self.score, "warnings": self.warnings, "volumes": self.volumes,
                "reviewer": self.reviewer, "date": self.date, "queue_item": self.item}

    @property
    def sources(self) -> list:
        """The scan's files: one, or one per input channel (a CSV with a column per channel)."""
        return json.loads(self.source) if self.source.startswith("[") else [self.source]

    def volume_text(self) -> str:
        return ", ".join(f"{row['name']} {row['ml']:.1f} mL" for row in self.volumes)


@dataclass
class Found:
    """A scan found while adding: where it is, or why it cannot be a case."""

    name: str
    source: str
    series: str = ""
    volume: int = -1
    date: str = ""
    reason: str = ""


# -- finding scans -----------------------------------------------------------------------

def _mtime_date(path: Path) -> str:
    try:
        return datetime.datetime.fromtimestamp(path.stat().st_mtime).date().isoformat()
    except OSError:
        return ""


def _probe_file(path: Path) -> tuple[int, str]:
    """``(number of volumes, reason)`` from the file's header only; reason '' when it is usable."""
    from .io import NIFTI_SUFFIXES
    from .privacy import library_warnings_silenced

    try:
        with library_warnings_silenced():
            if suffix_of(path) in NIFTI_SUFFIXES:
                import nibabel as nib

                shape = tuple(nib.load(str(path)).shape)
            else:
                import SimpleITK as sitk

                reader = sitk.ImageFileReader()
                reader.SetFileName(str(path))
                reader.ReadImageInformation()
                shape = tuple(reader.GetSize()) + ((reader.GetNumberOfComponents(),)
                                                   if reader.GetNumberOfComponents() > 1 else ())
    except Exception as exc:  # noqa: BLE001 - any reader fault is the file's
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return 0, f"'{path.name}' cannot be read: {text[:160]}"
    shape = tuple(n for n in shape if n != 1) if len(shape) > 3 else shape
    if len(shape) < 3 or min(shape[:3]) < 2:
        return 0, f"'{path.name}' is not a 3D scan (shape {shape})"
    if len(shape) > 4:
        return 0, f"'{path.name}' has {len(shape)} dimensions; a scan has 3 (or 4 for a series of volumes)"
    return (shape[3] if len(shape) == 4 else 1), ""


def _file_cases(path: Path, name: str) -> list[Found]:
    count, reason = _probe_file(path)
    date = _mtime_date(path)
    if reason:
        return [Found(name, str(path), date=date, reason=reason)]
    if count == 1:
        return [Found(name, str(path), date=date)]
    return [Found(f"{name} (volume {n})", str(path), volume=n, date=date) for n in range(count)]


def _relative_name(path: Path, root: Path) -> str:
    try:
        text = str(path.relative_to(root)) if path != root else path.name
    except ValueError:
        text = path.name
    lower = text.lower()
    for suffix in SCAN_SUFFIXES:
        if lower.endswith(suffix):
            return text[: -len(suffix)]
    return text


def _dicom_cases(folder: Path, root: Path) -> list[Found]:
    """One case per volume of every image series below ``folder`` (localizers and SEG left out)."""
    from .dicom.discovery import scan_folder
    from .dicom.stacks import group_series

    series_list, _ = group_series(scan_folder(folder))
    found = []
    for series in series_list:
        if series.is_segmentation or series.is_localizer:
            continue
        paths = [Path(i.path) for i in series.instances]
        where = Path(os.path.commonpath([str(p.parent) for p in paths]))
        label = f"{series.first.modality or 'DICOM'} series {series.first.series_number or series.index}"
        name = f"{_relative_name(where, root)} {label}".strip() if where != root else label
        date = _mtime_date(paths[0])
        volumes = series.volumes
        if not volumes:
            found.append(Found(name, str(where), series.uid, date=date,
                               reason=f"{label} holds only single 2D images, no volume"))
        elif len(volumes) == 1:
            found.append(Found(name, str(where), series.uid, date=date))
        else:
            found.extend(Found(f"{name} ({v.label or f'volume {n}'})", str(where), series.uid, n, date)
                         for n, v in enumerate(volumes))
    return found


def _folder_cases(folder: Path) -> list[Found]:
    if (folder / "dataset.json").is_file():
        return _dataset_cases(folder / "dataset.json")
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts) \
                and suffix_of(path) in SCAN_SUFFIXES:
            found.extend(_file_cases(path, _relative_name(path, folder)))
    return found + _dicom_cases(folder, folder)


def _dataset_cases(path: Path) -> list[Found]:
    """The images of an MSD (``training``/``test`` lists) or nnU-Net v2 (``file_ending``) dataset."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MedsegError(f"'{path.name}' is not a readable dataset.json: {exc}") from None
    root = path.parent
    images = []
    for entry in list(meta.get("training") or []) + list(meta.get("test") or []):
        image = entry.get("image") if isinstance(entry, dict) else entry
        if isinstance(image, str):
            images.append(root / image)
    if not images and meta.get("file_ending"):
        ending = meta["file_ending"]
        for folder in ("imagesTr", "imagesTs"):
            images.extend(sorted((root / folder).glob(f"*{ending}")))
    if not images:
        raise MedsegError(f"'{path.name}' lists no images (neither MSD 'training'/'test' nor nnU-Net 'file_ending')")
    found = []
    for image in images:
        name = _relative_name(image, root)
        # nnU-Net splits channels into NAME_0000.nii.gz: the first channel stands for the case.
        candidates = (image, Path(str(image) + ".nii.gz"), image.parent / (image.name.split(".")[0] + "_0000.nii.gz"))
        existing = next((path for path in candidates if path.exists()), None)
        if existing is not None:
            found.extend(_file_cases(existing, name))
        else:
            found.append(Found(name, str(image), reason=f"'{image.name}' is listed in {path.name} but does not exist"))
    return found


def _csv_cases(path: Path) -> list[Found]:
    """Paths from the first column (or a column named path, image, scan or file), relative to the CSV."""
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MedsegError(f"'{path.name}' is not a readable CSV file: {exc}") from None
    rows = [row for row in rows if row and any(cell.strip() for cell in row)]
    if not rows:
        raise MedsegError(f"'{path.name}' lists no scans")
    column = 0
    header = [cell.strip().lower() for cell in rows[0]]
    named = [i for i, cell in enumerate(header) if cell in ("path", "image", "scan", "file")]
    channels = [i for i, cell in enumerate(header) if cell not in ("name", "case", "id")]
    if not named and len(channels) > 1 and len(rows) > 1 and all(
            (path.parent / rows[1][i].strip()).expanduser().exists() for i in channels if i < len(rows[1])):
        return _channel_cases(path, rows, channels)
    if named or not (path.parent / rows[0][0].strip()).exists():
        column = named[0] if named else 0
        rows = rows[1:]
    found = []
    for row in rows:
        if column >= len(row) or not row[column].strip():
            continue
        target = Path(row[column].strip()).expanduser()
        target = target if target.is_absolute() else path.parent / target
        found.extend(find_scans([target]))
    return found


def _channel_cases(path: Path, rows: list, channels: list) -> list[Found]:
    """A CSV with one column per input channel (``name,T1,T2``): one case per row, its files in
    the header's order, which must be the model card's."""
    header = [cell.strip() for cell in rows[0]]
    name_column = next((i for i, cell in enumerate(header) if cell.lower() in ("name", "case", "id")), None)
    found = []
    for number, row in enumerate(rows[1:], start=2):
        cells = [row[i].strip() if i < len(row) else "" for i in channels]
        targets = [Path(c).expanduser() for c in cells]
        targets = [t if t.is_absolute() else path.parent / t for t in targets]
        name = row[name_column].strip() if name_column is not None and name_column < len(row) else ""
        name = name or (_relative_name(targets[0], path.parent) if cells[0] else f"row {number}")
        missing = [header[i] for i, cell, t in zip(channels, cells, targets) if not cell or not t.exists()]
        source = json.dumps([str(t.resolve()) if t.exists() else str(t) for t in targets])
        found.append(Found(name, source, reason=f"row {number} of '{path.name}' has no readable "
                                                f"{', '.join(missing)} file" if missing else ""))
    return found


def find_scans(paths) -> list[Found]:
    """Every scan below ``paths`` (folders, files, ``dataset.json``, CSV), each a :class:`Found`."""
    found = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            found.append(Found(path.name or str(path), str(path), reason=f"'{path.name}' does not exist"))
        elif path.is_dir():
            found.extend(_folder_cases(path))
        elif path.name.lower().endswith(".json"):
            found.extend(_dataset_cases(path))
        elif path.suffix.lower() == ".csv":
            found.extend(_csv_cases(path))
        elif suffix_of(path) in SCAN_SUFFIXES:
            found.extend(_file_cases(path, _relative_name(path, path.parent)))
        else:
            from .dicom.discovery import looks_like_dicom_file

            if looks_like_dicom_file(path):
                found.extend(_dicom_cases(path.parent, path.parent))
            else:
                found.append(Found(path.name, str(path), reason=f"'{path.name}' is not a scan, folder, "
                                                                  "dataset.json or CSV file"))
    return found


# -- the worklist in the workspace index ----------------------------------------------------

class Worklist:
    """The cases of a workspace (the ``cases`` table of its index)."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.folder = workspace.folder / "cases"
        try:
            self.folder.mkdir(exist_ok=True)
        except OSError as exc:
            raise MedsegError(f"cannot use workspace '{workspace.folder.name}': {exc.strerror or exc}") from None
        self._clean_up()

    def _clean_up(self) -> None:
        """Staging folders of dead processes, and case folders without a committed result."""
        with self.workspace.store.transaction() as tx:
            sweep_staging(self.folder, tx.committed_case_ids())

    # -- reading -------------------------------------------------------------------------
    def cases(self, order: str = "uncertainty", status: str | tuple | None = None) -> list[Case]:
        """Cases in ``order``: ``uncertainty`` (results that look implausible first, then the
        most doubtful, then cases without a score in the order added), ``name``, or ``date``
        (newest first)."""
        if order not in ORDERS:
            raise MedsegError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
        wanted = () if not status else (status,) if isinstance(status, str) else tuple(status)
        return [Case(**row) for row in self.workspace.store.cases(order, wanted)]

    def case(self, case_id: str) -> Case:
        rows = self.workspace.store.cases_matching(case_id)
        if len(rows) != 1:
            raise MedsegError(f"workspace '{self.workspace.folder.name}' has no case '{case_id}'" if not rows else
                              f"'{case_id}' names several cases; give more of the id")
        return Case(**rows[0])

    def pending(self) -> list[Case]:
        """The cases still to predict, in the order they were added."""
        return [Case(**row) for row in self.workspace.store.cases("added", ("new",))]

    def counts(self) -> dict:
        return self.workspace.store.case_counts()

    def path(self, case: Case, name: str) -> Path:
        return self.folder / case.id / f"{name}.nii.gz"

    # -- adding and status ----------------------------------------------------------------------
    def add(self, paths, progress: Progress | None = None) -> tuple[list[Case], list[str]]:
        """Add every scan below ``paths``: ``(new cases, lines about those already listed)``."""
        report(progress, 0.0, "looking for scans")
        found = find_scans(paths)
        added, known = [], []
        with self.workspace.store.transaction() as tx:
            for entry in found:
                source = entry.source  # a channel case's JSON list holds resolved paths already
                if not source.startswith("[") and Path(source).exists():
                    source = str(Path(source).resolve())
                case_id = uuid.uuid4().hex[:16]
                if tx.add_case(id=case_id, added=utc_timestamp(), name=entry.name, source=source,
                               series=entry.series, volume=entry.volume, date=entry.date,
                               status="failed" if entry.reason else "new", reason=entry.reason,
                               updated=utc_timestamp()):
                    added.append(case_id)
                else:
                    known.append(f"{entry.name} is already in the worklist")
        report(progress, 1.0, f"{len(added)} case(s) added")
        return [self.case(case_id) for case_id in added], known

    def set_status(self, case: Case | str, status: str, reason: str = "", reviewer: str | None = None,
                   item: str | None = None) -> Case:
        if status not in STATUSES:
            raise MedsegError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
        case_id = case.id if isinstance(case, Case) else case
        given = {key: value for key, value in (("reviewer", reviewer), ("item", item)) if value is not None}
        with self.workspace.store.transaction() as tx:
            tx.update_case(case_id, status=status, reason=reason, updated=utc_timestamp(), **given)
        return self.case(case_id)

    # -- results ----------------------------------------------------------------------------------
    def store_result(self, case: Case, result: "CaseResult") -> Case:
        """Write the case's mask and uncertainty map, then commit its row (see the module docstring)."""
        from .io import map_file, mask_file
        from .outputs import write_files

        clean = deidentified_geometry(result.geometry)
        staging = None
        try:
            staging = staging_folder(self.folder, f"{case.id}-{uuid.uuid4().hex[:8]}")
            write_files([mask_file(staging / "mask.nii.gz", result.labels, clean),
                         map_file(staging / "uncertainty.nii.gz", result.uncertainty, clean)])
            hashes = {name: sha256_of_file(staging / f"{name}.nii.gz") for name in ("mask", "uncertainty")}
            fsync_path(staging, directory=True)
            target = self.folder / case.id
            with self.workspace.store.transaction() as tx:
                if target.exists():  # a result whose row a killed run never committed
                    shutil.rmtree(target)
                os.rename(staging, target)
                fsync_path(self.folder, directory=True)
                tx.update_case(case.id, status="predicted", reason="", model=result.model, score=result.score,
                               warnings=result.warnings, volumes=result.volumes, files=hashes,
                               updated=utc_timestamp())
        except OSError as exc:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise MedsegError(f"could not store case '{case.name}' in workspace '{self.workspace.folder.name}': "
                              f"{exc.strerror or exc}") from None
        return self.case(case.id)

    def store_failure(self, case: Case, reason: str) -> Case:
        return self.set_status(case, "failed", reason=reason)

    def store_reviewed(self, case: Case, labels: np.ndarray, geometry) -> Case:
        """The reviewer's mask (layer order) as the case's final mask, beside the prediction."""
        from .io import mask_file
        from .outputs import write_files

        folder = self.folder / case.id
        if not folder.is_dir():
            raise MedsegError(f"case '{case.name}' has no stored prediction to review")
        write_files([mask_file(folder / "reviewed.nii.gz", labels, deidentified_geometry(geometry))])
        files = dict(case.files, reviewed=sha256_of_file(folder / "reviewed.nii.gz"))
        with self.workspace.store.transaction() as tx:
            tx.update_case(case.id, files=files, updated=utc_timestamp())
        return self.case(case.id)

    def load_result(self, case: Case, reviewed: bool = True) -> dict:
        """The stored mask (the reviewed one if there is one) and uncertainty, in layer order."""
        from .io import read_volume

        out = {}
        mask_name = "reviewed" if reviewed and "reviewed" in case.files else "mask"
        for key, name in (("labels", mask_name), ("prediction", "mask"), ("uncertainty", "uncertainty")):
            path = self.path(case, name)
            if not path.exists():
                raise MedsegError(f"case '{case.name}' has no stored {name}")
            volume = read_volume(path)
            out[key] = np.asarray(volume.layer_data())
        out["labels"] = out["labels"].astype(np.uint8, copy=False)
        out["prediction"] = out["prediction"].astype(np.uint8, copy=False)
        return out


# -- predicting one case ----------------------------------------------------------------------

@dataclass
class CaseResult:
    labels: np.ndarray          # uint8, layer order
    uncertainty: np.ndarray     # float32 0..1, layer order
    geometry: object
    score: float
    volumes: list
    model: str
    warnings: list = field(default_factory=list)


def read_case(case: Case):
    """The case's scan as a :class:`~napari_medseg.core.io.Volume`, or a list of them, one per
    input channel (errors as :class:`MedsegError`)."""
    from .io import read_volume

    volumes = [read_volume(source, series=case.series or None, volume_index=case.volume if case.volume >= 0 else None)
               for source in case.sources]
    return volumes[0] if len(volumes) == 1 else volumes


def first_volume(volume):
    """The volume that a case is shown and stored on: its first channel's."""
    return volume[0] if isinstance(volume, list) else volume


def boundary_uncertainty(labels: np.ndarray, uncertainty: np.ndarray, width: int = BOUNDARY_BAND_VOXELS) -> float:
    """Mean uncertainty in the band of ``width`` voxels either side of every label's boundary,
    where a wrong mask shows first. A case where nothing was found scores 1 (most doubtful)."""
    from scipy import ndimage

    foreground = labels > 0
    if not foreground.any():
        return 1.0
    box = []
    for axis in range(3):
        present = np.flatnonzero(foreground.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(0, int(present[0]) - width - 1), min(labels.shape[axis], int(present[-1]) + width + 2)))
    box = tuple(box)
    part = labels[box]
    band = np.zeros(part.shape, dtype=bool)
    for value in np.unique(part[part > 0]):
        mask = part == value
        band |= ndimage.binary_dilation(mask, iterations=width) & ~ndimage.binary_erosion(mask, iterations=width)
    return float(np.asarray(uncertainty[box], dtype=np.float64)[band].mean())


def predict_case(volume, model, settings=None, progress: Progress | None = None) -> CaseResult:
    """Labels, uncertainty and score of one scan, from one pass of the network."""
    from .predict import ScanImage, predict_scan, stack_channels
    from .privacy import scrub

    scan = ScanImage.from_volume(volume) if not isinstance(volume, list) else \
        stack_channels([ScanImage.from_volume(v) for v in volume], getattr(getattr(model, "card", None), "channels", None))
    prediction = predict_scan(scan, model, settings, want_uncertainty=True, progress=progress)
    result = prediction.segmentation
    rows = [{key: row[key] for key in ("value", "name", "ml")} for row in result.volume_rows()]
    return CaseResult(result.labels, result.uncertainty, first_volume(volume).geometry,
                      boundary_uncertainty(result.labels, result.uncertainty), rows, prediction.model.title,
                      [scrub(text) for text in result.warnings])


@dataclass
class OpenedCase:
    """Everything needed to show a case, read off the GUI thread."""

    case: Case
    volume: object
    labels: np.ndarray
    prediction: np.ndarray
    uncertainty: np.ndarray


def open_case(folder, case_id: str, model_spec=None, progress: Progress | None = None) -> OpenedCase:
    """A case's scan and stored results, for review; predicted (and stored) first if still new.

    Opens its own connection to the workspace, so it may run in any thread.
    """
    workspace = Workspace(folder, create=False)
    try:
        worklist = Worklist(workspace)
        case = worklist.case(case_id)
        if case.status in ("failed", "skipped") and not case.files:
            raise MedsegError(f"case '{case.name}' has no prediction ({case.status}: {case.reason or 'no reason'})")
        volume = read_case(case)
        if not case.files:
            report(progress, 0.1, f"predicting {case.name}")
            case = worklist.store_result(case, predict_case(volume, load_worklist_model(workspace, model_spec)))
        stored = worklist.load_result(case)
        return OpenedCase(case, first_volume(volume), stored["labels"], stored["prediction"], stored["uncertainty"])
    finally:
        workspace.close()


# -- the batch run ----------------------------------------------------------------------------

@dataclass
class RunSummary:
    predicted: int = 0
    failed: int = 0
    remaining: int = 0
    seconds: float = 0.0
    rank: int = 0
    world: int = 1
    failures: list = field(default_factory=list)   # (case name, reason)


def _shared_model(workspace: Workspace | None, model_spec, rank: int):
    """Rank 0 resolves the model and sends its file to the other ranks (which may not see the workspace)."""
    import tempfile

    import torch.distributed as dist

    from .models import load_model, resolve_model

    payload = [None]
    if rank == 0:
        path = resolve_model(model_spec, workspace)
        payload = [(path.read_bytes(), path.name)]
    dist.broadcast_object_list(payload, src=0)
    data, name = payload[0]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        return load_model(path)


def load_worklist_model(workspace: Workspace, model_spec=None):
    """``--model`` if given, else the workspace's promoted version, else the default model."""
    from .models import load_model, resolve_model

    return load_model(resolve_model(model_spec, workspace))


def run_worklist(workspace: Workspace | None, model=None, *, model_spec=None, settings=None,
                 progress: Progress | None = None, limit: int | None = None) -> RunSummary:
    """Predict every ``new`` case (see the module docstring). ``workspace`` is ``None`` on
    ranks other than 0 under ``torchrun``; ``model`` a loaded model (else ``model_spec``)."""
    import torch

    from .devices import pick_device
    from .inference import InferenceSettings
    from .training import distributed_context

    settings = settings or InferenceSettings()
    started = time.perf_counter()
    rank, world = distributed_context(pick_device(settings.device))
    worklist = Worklist(workspace) if rank == 0 else None
    pending = [worklist.pending()[:limit] if rank == 0 else None]
    if world > 1:
        torch.distributed.broadcast_object_list(pending, src=0)
        model = _shared_model(workspace, model_spec, rank)
    elif model is None:
        model = load_worklist_model(workspace, model_spec)
    cases = pending[0]
    mine = cases[rank::world]
    rounds = -(-len(cases) // world)
    summary = RunSummary(rank=rank, world=world)
    report(progress, 0.0, f"{len(cases)} case(s) to predict with {model.title}")
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="worklist-io") as pool:
        reads = [pool.submit(read_case, case) for case in mine[:1]]
        writing = None
        for index in range(rounds):
            if index + 1 < len(mine):  # read the next scan while the network runs on this one
                reads.append(pool.submit(read_case, mine[index + 1]))
            outcome = None
            if index < len(mine):
                outcome = _predict_one(mine[index], reads[index], model, settings)
                reads[index] = None
            outcomes = _gather(outcome, world)
            if rank == 0:
                if writing is not None:
                    writing.result()  # commits stay in order, and a full disk stops the run here
                writing = pool.submit(_store_all, worklist, outcomes, summary)
                done = min(len(cases), (index + 1) * world)
                report(progress, done / max(len(cases), 1), f"{done} of {len(cases)} case(s)")
        if writing is not None:
            writing.result()
    if rank == 0:
        summary.remaining = len(worklist.cases(status="new"))
    summary.seconds = time.perf_counter() - started
    return summary


def _predict_one(case: Case, read, model, settings) -> tuple:
    try:
        volume = read.result()
        return case, predict_case(volume, model, settings), ""
    except Cancelled:
        raise
    except MedsegError as exc:
        return case, None, str(exc)
    except MemoryError:
        return case, None, "not enough memory for this volume"
    except Exception as exc:  # noqa: BLE001 - one bad case never stops the others
        return case, None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def _gather(outcome, world: int) -> list:
    if world == 1:
        return [outcome]
    import torch.distributed as dist

    gathered = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(outcome, gathered, dst=0)
    return gathered or []


def _store_all(worklist: Worklist, outcomes: list, summary: RunSummary) -> None:
    from .privacy import scrub

    for outcome in outcomes:
        if outcome is None:
            continue
        case, result, reason = outcome
        if result is not None:
            worklist.store_result(case, result)
            summary.predicted += 1
        else:
            reason = scrub(reason)
            worklist.store_failure(case, reason)
            summary.failed += 1
            summary.failures.append((case.name, reason))


# -- export -----------------------------------------------------------------------------------

@dataclass
class ExportSummary:
    masks: int = 0
    segs: int = 0
    table: list = field(default_factory=list)
    problems: list = field(default_factory=list)


def _file_name(name: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip("._")
    return keep or "case"


def export_worklist(workspace: Workspace, out_dir, dicom_seg: bool = False,
                    progress: Progress | None = None) -> ExportSummary:
    """Masks in each scan's geometry, a CSV and JSON table, and DICOM SEG for DICOM inputs."""
    from .io import read_volume
    from .outputs import write_files

    out = Path(out_dir)
    try:  # created as TotalSegmentator's -o is; files already there are never overwritten
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedsegError(f"cannot create the export folder '{out.name}': {exc.strerror or exc}") from None
    worklist = Worklist(workspace)
    cases = worklist.cases(order="name")
    summary = ExportSummary()
    used_names: set = set()
    for number, case in enumerate(cases):
        report(progress, number / max(len(cases), 1), f"exporting {case.name}")
        stem = _file_name(case.name)
        while stem in used_names:
            stem += "_"
        used_names.add(stem)
        row = {"file": "", "seg": "", **case.summary()}
        if case.status in HAS_MASK and "mask" in case.files:
            mask_name = "reviewed" if "reviewed" in case.files else "mask"
            target = out / f"{stem}.nii.gz"
            write_files([(target, lambda tmp, src=worklist.path(case, mask_name): shutil.copyfile(src, tmp),
                          ".nii.gz")])
            row["file"] = target.name
            summary.masks += 1
            if dicom_seg and case.series:
                try:
                    from .dicom.seg_export import write_segmentation

                    seg_path = out / f"{stem}.seg.dcm"
                    stored = read_volume(worklist.path(case, mask_name))  # only SEG needs the voxels
                    write_segmentation(seg_path, case, np.asarray(stored.data), stored.geometry, case.volumes,
                                       reviewed=case.status in ("accepted", "corrected"))
                    row["seg"] = seg_path.name
                    summary.segs += 1
                except MedsegError as exc:
                    summary.problems.append(f"{case.name}: no DICOM SEG: {exc}")
        summary.table.append(row)
    labels = sorted({r["name"] for row in summary.table for r in row["volumes"]})
    header = ["id", "name", "status", "reason", "model", "uncertainty", "reviewer", "date", "queue_item", "file",
              "seg", "warnings"] + [f"{label} mL" for label in labels]

    def write_csv(tmp):
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for row in summary.table:
                ml = {r["name"]: f"{r['ml']:.3f}" for r in row["volumes"]}
                writer.writerow([row[key] if row[key] is not None else "" for key in header[:11]]
                                + ["; ".join(row["warnings"])] + [ml.get(label, "") for label in labels])

    text = json.dumps(summary.table, indent=2)
    write_files([(out / "worklist.csv", write_csv, ".csv"),
                 (out / "worklist.json", lambda tmp: Path(tmp).write_text(text), ".json")])
    report(progress, 1.0, f"exported {summary.masks} mask(s)")
    return summary
