"""The workspace: a folder that holds the correction queue and the model versions learned from it.

Layout::

    WORKSPACE/
        index.sqlite                 SQLite in WAL mode: items, versions, settings
        items/<id>/scan.nii.gz       de-identified scan (voxels and geometry only)
        items/<id>/label.nii.gz      the reviewer's corrected label
        items/<id>/prediction.nii.gz the model's original prediction
        items/<id>/prompts.json      the accepted prompts (voxel indices, label, kind), if any
        items/<id>/strokes-K.nii.gz  the strokes of prompt session K (1 this label, 2 not)
        items/<id>/prompted.nii.gz   the mask the prompts produced (before later brush edits)
        models/<name>/vN.safetensors model versions (kept for rollback), CURRENT names the one in use

**Durability.** An item's files are written into a staging folder (temporary files,
fsync, rename), hashed, and only then, inside one SQLite write transaction, the folder
is renamed into place and the row inserted. A process killed at any point leaves either
a complete item in the index, or nothing in it: a staging folder of a dead process, or a
renamed folder whose row was never committed, is removed the next time the workspace is
opened, under the same write lock, so a live writer is never disturbed. Several
processes (two napari windows, a script) can submit at once: SQLite serialises the
short commit, and each item has its own random id.

**Privacy.** A scan enters the workspace as voxels and geometry only, written into a
fresh NIfTI header: no DICOM attribute, no source header, no file name. The reviewer's
name is stored because the user typed it; nothing else names a person.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MedsegError
from .outputs import fsync_path, sha256_of_file, staging_folder, sweep_staging, utc_timestamp
from .geometry import ScanGeometry
from .storage import SQLiteStore, StorageError

VALIDATION_EVERY = 5   # with split "auto", every fifth item joins the frozen validation set


def deidentified_geometry(geometry: ScanGeometry) -> ScanGeometry:
    """The same voxel grid, with nothing kept from the source file's header."""
    return ScanGeometry(affine_ras=geometry.affine_ras, file_shape=geometry.file_shape, source_format="nifti")


def _prompt_parts(folder: Path, prompts: list | None, prompted, shape: tuple, geometry: ScanGeometry) -> list:
    """The files of accepted prompts: ``prompts.json``, one strokes volume per session that has
    strokes, and the mask the prompts produced."""
    import json

    from .io import mask_file

    if not prompts:
        return []
    sessions, parts = [], []
    for k, record in enumerate(prompts, start=1):
        strokes = record.get("strokes")
        entry = {"label": int(record["label"]),
                 "points": [{"index": [int(i) for i in p["index"]], "positive": bool(p["positive"])}
                            for p in record.get("points", [])],
                 "boxes": [{"index_min": [int(i) for i in b["index_min"]],
                            "index_max": [int(i) for i in b["index_max"]]} for b in record.get("boxes", [])],
                 "strokes": None}
        if strokes is not None:
            if np.shape(strokes) != shape:
                raise MedsegError(f"prompt strokes have shape {np.shape(strokes)}, the label {shape}")
            entry["strokes"] = f"strokes-{k}"
            parts.append(mask_file(folder / f"strokes-{k}.nii.gz", np.asarray(strokes, np.uint8), geometry))
        sessions.append(entry)
    text = json.dumps({"sessions": sessions}, indent=1)
    parts.append((folder / "prompts.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), ".json"))
    if prompted is not None:
        if np.shape(prompted) != shape:
            raise MedsegError(f"the prompted mask has shape {np.shape(prompted)}, the label {shape}")
        parts.append(mask_file(folder / "prompted.nii.gz", np.asarray(prompted), geometry))
    return parts


def prompt_seeds(sessions: list, shape: tuple) -> np.ndarray:
    """The voxels a reviewer marked with prompts (clicks and strokes) in stored sessions."""
    seeds = np.zeros(shape, bool)
    for session in sessions:
        for point in session["points"]:
            seeds[tuple(point["index"])] = True
        if session.get("strokes") is not None:
            seeds |= np.asarray(session["strokes"]) > 0
    return seeds


@dataclass
class Item:
    id: str
    created: str
    status: str
    split: str
    reviewer: str
    note: str
    model: str
    edited_voxels: int
    label_names: dict
    files: dict
    used_by: str
    origin: str

    def summary(self) -> dict:
        return {key: getattr(self, key) for key in ("id", "created", "status", "split", "reviewer", "note", "model",
                                                    "edited_voxels", "used_by", "origin")}


class Workspace:
    """A workspace folder (created on first use)."""

    def __init__(self, folder: str | os.PathLike, create: bool = True):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            if not create:
                raise MedsegError(f"workspace '{self.folder.name}' does not exist")
            if not self.folder.parent.is_dir():
                raise MedsegError(f"cannot create workspace '{self.folder.name}': its folder "
                                  f"'{self.folder.parent.name}' does not exist")
            try:
                self.folder.mkdir()
            except OSError as exc:
                raise MedsegError(f"cannot create workspace '{self.folder.name}': {exc.strerror or exc}") from None
        self.items_dir = self.folder / "items"
        try:
            self.items_dir.mkdir(exist_ok=True)
            self.store = SQLiteStore(self.folder / "index.sqlite")
        except (OSError, StorageError) as exc:
            raise MedsegError(f"cannot open workspace '{self.folder.name}': {exc}") from None
        self._clean_up()

    @classmethod
    def default(cls) -> "Workspace":
        """The workspace the viewer uses when the user never chose one."""
        from .models import user_home

        home = user_home()
        home.mkdir(parents=True, exist_ok=True)
        return cls(home / "workspace")

    def close(self) -> None:
        self.store.close()

    def _clean_up(self) -> None:
        """Remove what a killed writer left: staging folders of dead processes, and item
        folders whose row was never committed (checked under the write lock)."""
        with self.store.transaction() as tx:
            sweep_staging(self.items_dir, tx.item_ids())

    # -- settings ----------------------------------------------------------------------------
    def setting(self, key: str, default=None):
        return self.store.setting(key, default)

    def set_setting(self, key: str, value) -> None:
        with self.store.transaction() as tx:
            tx.set_setting(key, value)

    # -- the queue ------------------------------------------------------------------------------
    def submit(self, scan: np.ndarray, geometry: ScanGeometry, label: np.ndarray, prediction: np.ndarray | None = None,
               *, model: str = "", reviewer: str = "", note: str = "", split: str = "auto",
               label_names: dict | None = None, origin: str = "", prompts: list | None = None,
               prompted: np.ndarray | None = None) -> Item:
        """Store a correction durably (see the module docstring); all arrays in layer order.

        ``prompts`` are :meth:`~napari_medseg.core.prompts.PromptSession.record` dicts of the
        accepted prompt sessions, ``prompted`` the mask they produced.
        """
        from .editing import edited_voxels
        from .io import mask_file, scan_file
        from .outputs import write_files

        if split not in ("auto", "train", "validation"):
            raise MedsegError(f"split must be auto, train or validation, not {split!r}")
        label = np.asarray(label)
        if label.shape != geometry.layer_shape or np.shape(scan) != geometry.layer_shape:
            raise MedsegError(f"the label has shape {label.shape}, but the scan {geometry.layer_shape}")
        if prediction is not None and np.shape(prediction) != label.shape:
            raise MedsegError(f"the prediction has shape {np.shape(prediction)}, the label {label.shape}")
        clean = deidentified_geometry(geometry)
        item_id = uuid.uuid4().hex
        try:
            staging = staging_folder(self.items_dir, item_id)
        except OSError as exc:
            raise MedsegError(f"could not store the correction in workspace '{self.folder.name}': "
                              f"{exc.strerror or exc}; it is still open, try again") from None
        try:
            parts = [scan_file(staging / "scan.nii.gz", scan, clean), mask_file(staging / "label.nii.gz", label, clean)]
            if prediction is not None:
                parts.append(mask_file(staging / "prediction.nii.gz", prediction, clean))
            parts += _prompt_parts(staging, prompts, prompted, label.shape, clean)
            write_files(parts)
            hashes = {path.name.removesuffix(".nii.gz"): sha256_of_file(path) for path in sorted(staging.iterdir())}
            fsync_path(staging, directory=True)
        except MedsegError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise MedsegError(f"could not store the correction in workspace '{self.folder.name}' ({exc}); "
                              "it is still open, try again") from None
        changed = edited_voxels(prediction, label) if prediction is not None else 0
        try:
            with self.store.transaction() as tx:
                if split == "auto":
                    count = tx.count_items()
                    split = "validation" if count % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"
                os.rename(staging, self.items_dir / item_id)
                fsync_path(self.items_dir, directory=True)
                tx.insert_item(id=item_id, created=utc_timestamp(), status="queued", split=split, reviewer=reviewer,
                               note=note, model=model, edited_voxels=changed,
                               label_names={str(k): v for k, v in (label_names or {}).items()}, files=hashes,
                               origin=origin)
        except (OSError, StorageError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise MedsegError(f"could not store the correction in workspace '{self.folder.name}': "
                              f"{getattr(exc, 'strerror', None) or exc}; it is still open, try again") from None
        return self.item(item_id)

    def items(self, status: str | None = None, split: str | None = None) -> list:
        """The queue's items in submission order."""
        return [Item(**row) for row in self.store.items(status, split)]

    def item(self, item_id: str) -> Item:
        found = [i for i in self.items() if i.id == item_id or i.id.startswith(item_id)]
        if len(found) != 1:
            raise MedsegError(f"workspace '{self.folder.name}' has no item '{item_id}'" if not found else
                              f"'{item_id}' names several items; give more of the id")
        return found[0]

    def item_path(self, item: Item, name: str) -> Path:
        return self.items_dir / item.id / (name if name.endswith(".json") else f"{name}.nii.gz")

    def load_item(self, item: Item) -> dict:
        """The item's scan (a Volume) and its label and prediction (layer order, on the scan's grid)."""
        from .io import read_volume

        scan = read_volume(self.item_path(item, "scan"))
        out = {"scan": scan}
        for name in ("label", "prediction", "prompted"):
            path = self.item_path(item, name)
            if path.exists():
                out[name] = np.asarray(scan.geometry.to_layer(read_volume(path).data))
        prompts_path = self.item_path(item, "prompts.json")
        if prompts_path.exists():
            import json

            sessions = json.loads(prompts_path.read_text(encoding="utf-8"))["sessions"]
            for session in sessions:
                if session.get("strokes"):
                    strokes = read_volume(self.item_path(item, session["strokes"])).data
                    session["strokes"] = np.asarray(scan.geometry.to_layer(strokes))
            out["prompts"] = sessions
        return out

    def set_status(self, ids: list, status: str, used_by: str = "") -> None:
        if status not in ("queued", "used", "rejected"):
            raise MedsegError(f"status must be queued, used or rejected, not {status!r}")
        with self.store.transaction() as tx:
            for item_id in ids:
                tx.set_item_status(item_id, status, used_by)

    def verify(self) -> list:
        """Problems between the index and the files (an empty list when they agree)."""
        problems = []
        known = set()
        for item in self.items():
            known.add(item.id)
            for name, expected in item.files.items():
                path = self.item_path(item, name)
                if not path.exists():
                    problems.append(f"item {item.id}: {name} is missing")
                elif sha256_of_file(path) != expected:
                    problems.append(f"item {item.id}: {name} does not match its hash")
        for entry in self.items_dir.iterdir():
            if not entry.name.startswith(".") and entry.name not in known:
                problems.append(f"folder {entry.name} is not in the index")
        return problems

    # -- model versions ---------------------------------------------------------------------------
    @property
    def registry(self):
        from .models import BUNDLED_DIR, ModelRegistry

        return ModelRegistry(home=self.folder, bundled_dir=BUNDLED_DIR.parent / "no-bundled-models")

    @property
    def model_name(self) -> str | None:
        return self.setting("model_name")

    def ensure_model(self, base: str | None = None) -> str:
        """Make the workspace's first version, v1, a copy of ``base`` (default: brain-t1)."""
        if self.model_name:
            return self.model_name
        from .models import ModelRegistry, networks_from_state, read_model_file

        path = ModelRegistry().resolve(base)
        state, card = read_model_file(path)
        network, roi_network = networks_from_state(state, card, path.name)
        first = card.replace(version="v1", provenance={**card.provenance, "workspace_base": card.title})
        self.registry.add_version(network, first, make_current=True, roi_network=roi_network)
        with self.store.transaction() as tx:
            tx.set_setting("model_name", card.name)
            tx.record_version(version="v1", model=card.name, created=utc_timestamp(), status="base",
                              reason=f"a copy of {card.title}", sha256=card.content_sha256 or "")
        return card.name

    def current_version(self) -> str | None:
        name = self.model_name
        if not name:
            return None
        return next((e.version for e in self.registry.entries() if e.name == name and e.current), None)

    def load_model(self, for_training: bool = False):
        if not self.model_name:
            raise MedsegError(f"workspace '{self.folder.name}' has no model yet; submit a correction or run "
                              "'napari-medseg finetune' first")
        return self.registry.load(self.model_name, for_training=for_training)

    def versions(self) -> list:
        from .models import version_key

        current = self.current_version()
        out = [{**row, "current": row["version"] == current} for row in self.store.versions()]
        return sorted(out, key=lambda v: version_key(v["version"]))

    def next_version(self) -> str:
        numbers = [int(v["version"][1:]) for v in self.versions() if v["version"][1:].isdigit()]
        return f"v{max(numbers, default=0) + 1}"

    def record_version(self, version: str, parent: str, status: str, reason: str, metrics: dict, lineage: list,
                       sha256: str = "") -> None:
        with self.store.transaction() as tx:
            tx.record_version(version=version, model=self.model_name, created=utc_timestamp(), parent=parent,
                              status=status, reason=reason, metrics=metrics, lineage=lineage, sha256=sha256)

    def rollback(self, version: str) -> None:
        """Make an earlier (kept) version the one in use."""
        known = {v["version"]: v for v in self.versions()}
        if version not in known:
            raise MedsegError(f"workspace '{self.folder.name}' has no version '{version}' "
                              f"(it has: {', '.join(known) or 'none'})")
        if known[version]["status"] == "rejected":
            raise MedsegError(f"version {version} was rejected by the regression check and was not kept")
        self.registry.set_current(self.model_name, version)


def _on_grid(mask, geometry: ScanGeometry, what: str) -> np.ndarray:
    """A label map in layer order on ``geometry``'s grid: an array as it is, or a read
    :class:`~napari_medseg.core.io.Volume` checked to lie on the same voxels in patient space."""
    if mask is None:
        return None
    if hasattr(mask, "geometry"):  # read from a file: it must cover the scan's voxels exactly
        if mask.geometry.layer_shape != geometry.layer_shape or \
                not np.allclose(mask.geometry.world_affine, geometry.world_affine, atol=1e-3):
            raise MedsegError(f"{what} '{mask.name}' is not on the scan's grid (shape "
                              f"{mask.geometry.file_shape}, the scan's {geometry.file_shape})")
        values = np.asarray(mask.layer_data())
        name = mask.name
    else:
        values, name = np.asarray(mask), what
    if not np.issubdtype(values.dtype, np.integer) and values.dtype != bool:
        if not np.allclose(values, np.round(values)):
            raise MedsegError(f"{what} '{name}' holds fractions; a label map holds whole numbers")
        values = np.round(values).astype(np.int16)
    return values


def submit_correction(workspace: "Workspace | str | os.PathLike", scan: np.ndarray, geometry: ScanGeometry, label,
                      prediction=None, *, model: str = "", reviewer: str = "", note: str = "", split: str = "auto",
                      origin: str = "", prompts: list | None = None, prompted=None, progress=None) -> Item:
    """Store one correction in the queue; the one way the CLI, the widgets and autosave submit.

    ``label`` and ``prediction`` are arrays in layer order or volumes read from files (checked
    to lie on the scan's grid, and to hold whole numbers). The reviewer's name is remembered
    as the workspace's default. ``workspace`` may be a folder: it is opened and closed here,
    so the call may run in any thread.
    """
    from .progress import report

    report(progress, 0.1, "storing the correction")
    label_values = _on_grid(label, geometry, "LABEL")
    prediction_values = _on_grid(prediction, geometry, "--prediction")
    own = not isinstance(workspace, Workspace)
    store = Workspace(workspace) if own else workspace
    try:
        item = store.submit(scan, geometry, label_values, prediction_values, model=model, reviewer=reviewer,
                            note=note, split=split, origin=origin, prompts=prompts,
                            prompted=_on_grid(prompted, geometry, "the prompted mask"))
        if reviewer:
            store.set_setting("reviewer", reviewer)
        report(progress, 1.0, f"stored as item {item.id[:12]}")
        return item
    finally:
        if own:
            store.close()
