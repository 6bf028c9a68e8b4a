"""Crash-safe autosave of edited label masks: a journal of changed voxels, compacted into snapshots.

Each edited mask gets a session folder under ``<workspace>/autosave/<id>/``:

* ``meta.json``: the scan it belongs to, by content hash (SHA-256 of the voxel values)
  and de-identified geometry (affine and shape only), the label names, times, the
  edited-voxel count and a state (``open``, ``saved``, ``submitted``, ``discarded``,
  ``recovered``). Never a name or a path: paths name patients.
* ``snapshot-<g>.bin``: the whole mask, zlib-compressed, written to a temporary file,
  fsynced and renamed, so a snapshot is complete or absent.
* ``journal-<g>.log``: records of changed voxels since snapshot ``g`` (indices and new
  values), each with its length and CRC-32 and fsynced; a record cut short by a crash
  fails its check and is ignored, so a recovery is always the last complete autosave.
  When the journal passes :data:`JOURNAL_LIMIT` bytes a new snapshot replaces it.
* ``lock``: held (``flock``) by the process that edits the mask. A session whose lock
  can be taken belongs to a process that ended; if it did not close cleanly its edits
  are listed for recovery.

:class:`MaskAutosave` keeps one mask's session current from whatever thread calls
:meth:`MaskAutosave.update` with the live array: it compares the array with the last
saved copy slab by slab (numpy releases the GIL there, so a GUI thread is not held up)
and stores what changed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import MedsegError
from .geometry import ScanGeometry
from .outputs import fsync_path, save_atomically, utc_timestamp

AUTOSAVE_FOLDER = "autosave"
JOURNAL_LIMIT = 16 << 20         # bytes of journal before a new snapshot replaces it
RETENTION_DAYS = 30              # unrecovered autosaves of crashed sessions are removed after this
SLAB_VOXELS = 1 << 22            # voxels compared per step while looking for changes
CHUNK_BYTES = 4 << 20            # bytes hashed or compressed per step in the background
RECORD = struct.Struct("<4sIIQB8sdQ")   # magic, payload bytes, crc32, count, index bytes, value dtype, time, edited
RECORD_MAGIC = b"MSJ1"
SNAPSHOT_MAGIC = b"MSS1\n"
STATES = ("open", "saved", "submitted", "discarded", "recovered")

try:  # pragma: no cover - the import is platform-dependent
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def default_root() -> Path:
    """Where the viewer autosaves when the user never chose a workspace."""
    from .models import user_home

    return user_home() / "workspace" / AUTOSAVE_FOLDER


def root_of(workspace: str | os.PathLike | None) -> Path:
    """The autosave folder of a workspace folder (``None``: the viewer's default)."""
    return default_root() if workspace is None else Path(workspace) / AUTOSAVE_FOLDER


def scan_identity(scan: np.ndarray | None, geometry: ScanGeometry | None, pause: float = 0.0) -> dict:
    """How an autosave names its scan: the voxel values' SHA-256, the shape and the spacing.

    ``pause``: seconds to sleep after each 4 MB, so a background thread leaves the CPU
    and memory bandwidth to the GUI while it hashes a large scan.
    """
    identity: dict = {}
    if scan is not None:
        data = np.ascontiguousarray(scan)
        digest = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode())
        flat = data.reshape(-1).view(np.uint8)
        step = CHUNK_BYTES
        for start in range(0, flat.size, step):
            digest.update(flat[start:start + step])
            if pause:
                time.sleep(pause)
        identity["sha256"] = digest.hexdigest()
        identity["shape"] = list(data.shape)
    if geometry is not None:
        identity["spacing_mm"] = [round(float(s), 4) for s in geometry.layer_spacing]
        identity.setdefault("shape", list(geometry.layer_shape))
    return identity


def _write_atomically(path: Path, chunks: list) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)

    save_atomically(path, write, error=OSError)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class _Lock:
    """An exclusive lock on a file, released by the OS when its process ends (even by SIGKILL)."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = None

    def acquire(self) -> bool:
        handle = open(self.path, "a+b")
        try:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:  # pragma: no cover - Windows
                import msvcrt

                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            handle.close()
            return False
        self.handle = handle
        return True

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing drops the lock
            self.handle = None


def _owner_alive(folder: Path) -> bool:
    probe = _Lock(folder / "lock")
    if not (folder / "lock").exists():
        return False
    if probe.acquire():
        probe.release()
        return False
    return True


# -- one session -----------------------------------------------------------------------------------
class AutosaveSession:
    """One mask's autosave folder, written by the process that holds its lock."""

    def __init__(self, root: Path, meta: dict):
        self.folder = Path(root) / meta["id"]
        self.meta = meta
        self.generation = -1
        self.journal = None
        self.journal_bytes = 0
        self._lock = _Lock(self.folder / "lock")

    @classmethod
    def create(cls, root: str | os.PathLike, *, scan: dict, geometry: ScanGeometry | None, shape: tuple,
               dtype, label_names: dict | None = None, model: str = "") -> "AutosaveSession":
        root = Path(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            session_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
            meta = {
                "id": session_id, "format": 1, "created": utc_timestamp(), "updated": utc_timestamp(), "state": "open",
                "scan": scan, "shape": list(shape), "dtype": np.dtype(dtype).str,
                "geometry": _clean_geometry(geometry), "label_names": label_names or {}, "model": model,
                "edited_voxels": 0, "pid": os.getpid(),
            }
            session = cls(root, meta)
            session.folder.mkdir()
            if not session._lock.acquire():
                raise OSError("the session is locked by another process")
            session._write_meta()
        except OSError as exc:
            raise MedsegError(f"cannot autosave to '{root.name}': {exc.strerror or exc}") from None
        return session

    def _write_meta(self) -> None:
        self.meta["updated"] = utc_timestamp()
        _write_atomically(self.folder / "meta.json", [json.dumps(self.meta, indent=1).encode()])

    def set_state(self, state: str, **extra) -> None:
        if state not in STATES:
            raise ValueError(state)
        self.meta.update(state=state, **extra)
        self._write_meta()

    def write_snapshot(self, mask: np.ndarray | None, edited: int, packed: tuple | None = None) -> None:
        """Store the whole mask as a new generation, then drop the older one.

        ``packed`` is :func:`pack_mask` of the mask, made earlier off the critical path.
        """
        info, body = packed if packed is not None else pack_mask(mask)
        header = json.dumps({**info, "edited_voxels": int(edited), "time": time.time()}).encode() + b"\n"
        generation = self.generation + 1
        _write_atomically(self.folder / f"snapshot-{generation}.bin", [SNAPSHOT_MAGIC, header, body])
        journal = open(self.folder / f"journal-{generation}.log", "ab")
        fsync_path(self.folder, directory=True)
        if self.journal is not None:
            self.journal.close()
        self.journal, self.journal_bytes = journal, 0
        for old in range(max(self.generation, 0), generation):
            (self.folder / f"snapshot-{old}.bin").unlink(missing_ok=True)
            (self.folder / f"journal-{old}.log").unlink(missing_ok=True)
        self.generation = generation
        self.meta["edited_voxels"] = int(edited)
        self._write_meta()

    def append(self, flat_indices: np.ndarray, values: np.ndarray, edited: int) -> None:
        """Store one change (flat indices into the mask and their new values) durably."""
        index_dtype = np.uint32 if self.meta["shape"] and np.prod(self.meta["shape"]) < 2 ** 32 else np.uint64
        indices = np.ascontiguousarray(flat_indices, dtype=index_dtype)
        values = np.ascontiguousarray(values, dtype=np.dtype(self.meta["dtype"]))
        payload = zlib.compress(indices.tobytes() + values.tobytes(), 1)
        header = RECORD.pack(RECORD_MAGIC, len(payload), zlib.crc32(payload), indices.size, indices.itemsize,
                             values.dtype.str.encode().ljust(8), time.time(), int(edited))
        self.journal.write(header + payload)
        self.journal.flush()
        os.fsync(self.journal.fileno())
        self.journal_bytes += len(header) + len(payload)
        self.meta["edited_voxels"] = int(edited)

    def close(self, delete: bool = False) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        if delete:
            shutil.rmtree(self.folder, ignore_errors=True)
        self._lock.release()


def pack_mask(mask: np.ndarray, pause: float = 0.0) -> tuple[dict, bytes]:
    """A mask compressed for a snapshot: ``(info, body)``; ``pause`` as in :func:`scan_identity`."""
    raw = np.ascontiguousarray(mask)
    flat = raw.reshape(-1).view(np.uint8)
    compressor = zlib.compressobj(1)
    parts = []
    for start in range(0, flat.size, CHUNK_BYTES):
        parts.append(compressor.compress(flat[start:start + CHUNK_BYTES]))
        if pause:
            time.sleep(pause)
    parts.append(compressor.flush())
    body = b"".join(parts)
    return {"shape": list(raw.shape), "dtype": raw.dtype.str, "crc32": zlib.crc32(body)}, body


def _clean_geometry(geometry: ScanGeometry | None) -> dict | None:
    if geometry is None:
        return None
    # Affine and shape only: headers can carry descriptions that name a patient.
    return {"affine_ras": np.asarray(geometry.affine_ras).tolist(), "file_shape": list(geometry.file_shape)}


def session_geometry(meta: dict) -> ScanGeometry | None:
    info = meta.get("geometry")
    if not info:
        return None
    return ScanGeometry(affine_ras=np.asarray(info["affine_ras"], dtype=float), file_shape=tuple(info["file_shape"]),
                        source_format="nifti")


# -- reading sessions back -------------------------------------------------------------------------------
@dataclass
class Recoverable:
    """An autosave as the recovery list shows it."""

    id: str
    created: str
    updated: str
    state: str
    scan: dict
    shape: tuple
    edited_voxels: int
    owner_alive: bool
    folder: Path = field(repr=False)
    model: str = ""

    @property
    def crashed(self) -> bool:
        """Left by a process that ended without a clean close."""
        return not self.owner_alive and self.state == "open"

    def to_dict(self) -> dict:
        return {"id": self.id, "created": self.created, "updated": self.updated, "state": self.state,
                "scan": self.scan, "shape": list(self.shape), "edited_voxels": self.edited_voxels,
                "model": self.model, "in_use": self.owner_alive}


def _generations(folder: Path) -> list[int]:
    found = []
    for path in folder.glob("snapshot-*.bin"):
        number = path.stem.split("-", 1)[1]
        if number.isdigit():
            found.append(int(number))
    return sorted(found)


def _read_snapshot(path: Path) -> tuple[np.ndarray, dict]:
    with open(path, "rb") as handle:
        if handle.read(len(SNAPSHOT_MAGIC)) != SNAPSHOT_MAGIC:
            raise MedsegError(f"autosave snapshot '{path.name}' is not readable")
        header = json.loads(handle.readline())
        body = handle.read()
    if zlib.crc32(body) != header["crc32"]:
        raise MedsegError(f"autosave snapshot '{path.name}' is damaged")
    mask = np.frombuffer(zlib.decompress(body), dtype=np.dtype(header["dtype"])).reshape(header["shape"]).copy()
    return mask, header


def _read_journal(path: Path):
    """Yield ``(indices, values, edited, time)`` for each complete record, stopping at the first bad one."""
    try:
        data = path.read_bytes()
    except OSError:
        return
    offset = 0
    while offset + RECORD.size <= len(data):
        magic, size, crc, count, index_bytes, value_dtype, stamp, edited = RECORD.unpack_from(data, offset)
        start = offset + RECORD.size
        payload = data[start:start + size]
        if magic != RECORD_MAGIC or len(payload) != size or zlib.crc32(payload) != crc:
            return  # a record cut short by a crash: everything before it is the last complete autosave
        raw = zlib.decompress(payload)
        index_dtype = np.uint32 if index_bytes == 4 else np.uint64
        indices = np.frombuffer(raw, dtype=index_dtype, count=count)
        values = np.frombuffer(raw, dtype=np.dtype(value_dtype.rstrip(b" \0").decode()), offset=count * index_bytes,
                               count=count)
        yield indices, values, edited, stamp
        offset = start + size


def list_sessions(root: str | os.PathLike | None = None) -> list[Recoverable]:
    """Every autosave under ``root`` that holds a mask, newest first."""
    root = default_root() if root is None else Path(root)
    found = []
    if not root.is_dir():
        return found
    for folder in root.iterdir():
        meta = _read_json(folder / "meta.json") if folder.is_dir() else None
        if not meta or not _generations(folder):
            continue
        edited, updated = meta.get("edited_voxels", 0), meta.get("updated", "")
        for *_rest, record_edited, stamp in _read_journal(folder / f"journal-{_generations(folder)[-1]}.log"):
            edited = record_edited
            updated = datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).isoformat(timespec="seconds")
        found.append(Recoverable(meta["id"], meta.get("created", ""), updated, meta.get("state", "open"),
                                 meta.get("scan") or {}, tuple(meta.get("shape", ())), int(edited),
                                 _owner_alive(folder), folder, meta.get("model", "")))
    return sorted(found, key=lambda r: r.updated, reverse=True)


def find_session(root: str | os.PathLike | None, session_id: str) -> Recoverable:
    """The session whose id is (or starts with) ``session_id``."""
    matches = [r for r in list_sessions(root) if r.id == session_id or r.id.startswith(session_id)]
    if not matches:
        raise MedsegError(f"no autosave '{session_id}' (napari-medseg recover --list shows them)")
    if len(matches) > 1 and not any(r.id == session_id for r in matches):
        raise MedsegError(f"'{session_id}' names {len(matches)} autosaves; give more of the id")
    return next((r for r in matches if r.id == session_id), matches[0])


def load_session(folder: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """The mask of the last complete autosave (layer order) and the session's metadata."""
    folder = Path(folder)
    meta = _read_json(folder / "meta.json")
    generations = _generations(folder)
    if meta is None or not generations:
        raise MedsegError(f"autosave '{folder.name}' holds no mask")
    mask, _header = _read_snapshot(folder / f"snapshot-{generations[-1]}.bin")
    flat = mask.reshape(-1)
    for indices, values, _edited, _stamp in _read_journal(folder / f"journal-{generations[-1]}.log"):
        flat[indices] = values
    return mask, meta


def mark_state(folder: str | os.PathLike, state: str) -> None:
    """Set a session's state from another process (recovered, discarded)."""
    folder = Path(folder)
    meta = _read_json(folder / "meta.json")
    if meta is None:
        return
    meta.update(state=state, updated=utc_timestamp())
    _write_atomically(folder / "meta.json", [json.dumps(meta, indent=1).encode()])


def clean_up(root: str | os.PathLike | None = None, keep: set = frozenset()) -> list[str]:
    """What a clean close does: remove sessions that are no longer needed; returns their ids.

    Removed: sessions of ended processes that were saved, submitted, discarded or
    recovered (a discard is kept until this next clean close), folders without a mask,
    and crashed sessions older than :data:`RETENTION_DAYS`. ``keep`` names sessions to
    leave (the ones discarded during this close).
    """
    root = default_root() if root is None else Path(root)
    removed = []
    if not root.is_dir():
        return removed
    cutoff = time.time() - RETENTION_DAYS * 86400
    for folder in root.iterdir():
        if not folder.is_dir() or folder.name in keep or _owner_alive(folder):
            continue
        meta = _read_json(folder / "meta.json") or {}
        stale = folder.stat().st_mtime < cutoff
        if meta.get("state", "open") != "open" or not _generations(folder) or stale:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def _merge_regions(regions: list, shape: tuple) -> list:
    """Clip regions to the mask; many small ones become their bounding box (one pass is cheaper)."""
    clipped = []
    for region in regions:
        box = tuple(slice(max(0, r.start or 0), min(n, n if r.stop is None else r.stop)) for r, n in zip(region, shape))
        if all(b.stop > b.start for b in box):
            clipped.append(box)
    if len(clipped) > 8:
        starts = np.min([[b.start for b in box] for box in clipped], axis=0)
        stops = np.max([[b.stop for b in box] for box in clipped], axis=0)
        clipped = [tuple(slice(int(a), int(b)) for a, b in zip(starts, stops))]
    return clipped


# -- keeping one mask's autosave current ---------------------------------------------------------------
class MaskAutosave:
    """The autosave of one mask: call :meth:`update` with the live array after it changes.

    Nothing is written until the first change; the first write is a full snapshot,
    later ones journal records, with a new snapshot whenever the journal grows past
    :data:`JOURNAL_LIMIT`. ``scan_identity`` is called once, on the first write, so the
    scan is hashed off the caller's critical path.
    """

    def __init__(self, root: str | os.PathLike, mask: np.ndarray, *, scan: Callable[[], dict] | dict | None = None,
                 geometry: ScanGeometry | None = None, label_names: dict | None = None, model: str = "",
                 origin: np.ndarray | None = None):
        self.root = Path(root)
        self.baseline = np.array(mask, copy=True)
        self.origin = self.baseline.copy() if origin is None else np.array(origin, copy=True)
        self.edited = int(np.count_nonzero(self.origin != self.baseline)) if origin is not None else 0
        self._scan = scan
        self.geometry = geometry
        self.label_names = label_names
        self.model = model
        self.session: AutosaveSession | None = None
        self.changes = 0          # updates that found a change
        self.clean_at = 0         # ``changes`` when the mask was last saved or submitted
        self.lock = threading.Lock()
        self._packed: tuple | None = None

    @property
    def unsaved(self) -> bool:
        return self.changes > self.clean_at

    def prepare(self, pause: float = 0.0) -> None:
        """Hash the scan and pack the starting mask now (a background thread calls this when a
        layer is first followed), so the first stroke only has to write."""
        if self.session is not None or self._packed is not None:
            return
        if callable(self._scan):
            self._scan = self._scan(pause)
        packed = pack_mask(self.baseline, pause)
        with self.lock:
            if self.session is None and self.changes == 0:
                self._packed = packed

    def _resolve_scan(self) -> dict:
        if callable(self._scan):
            self._scan = self._scan(0.0)
        return self._scan or {}

    def update(self, current: np.ndarray, regions: list | None = None) -> int:
        """Store what changed since the last call; returns the number of voxels stored.

        ``regions`` (tuples of slices) limit the search to where the change happened
        (napari's paint events say where); ``None`` compares the whole mask.
        """
        with self.lock:
            current = np.asarray(current)
            if current.shape != self.baseline.shape:
                return self._restart(current)
            indices, values = self._changes(current, regions)
            if indices.size == 0:
                return 0
            flat_origin = self.origin.reshape(-1)
            flat_base = self.baseline.reshape(-1)
            edited_before = self.edited
            self.edited += int(np.count_nonzero(values != flat_origin[indices])
                               - np.count_nonzero(flat_base[indices] != flat_origin[indices]))
            self.changes += 1
            if self.session is not None and self.session.meta["state"] != "open":
                self.session.set_state("open")  # edited again after a save or submit
            if self.session is None:
                self._open_session()
                if self._packed is not None:  # the mask before this change, packed in advance
                    self.session.write_snapshot(None, edited_before, packed=self._packed)
                    self._packed = None
                else:
                    flat_base[indices] = values
                    self.session.write_snapshot(self.baseline, self.edited)
                    return int(indices.size)
            flat_base[indices] = values
            self.session.append(indices, values, self.edited)
            if self.session.journal_bytes > JOURNAL_LIMIT:
                self.session.write_snapshot(self.baseline, self.edited)
            return int(indices.size)

    def _changes(self, current: np.ndarray, regions: list | None) -> tuple[np.ndarray, np.ndarray]:
        if regions is None:
            return self._changes_everywhere(current)
        found_indices, found_values = [], []
        for region in _merge_regions(regions, self.baseline.shape):
            live = current[region]
            changed = np.nonzero(live != self.baseline[region])
            if changed[0].size:
                found_values.append(live[changed])  # read once: the journal and the baseline get the same values
                offsets = [axis + (r.start or 0) for axis, r in zip(changed, region)]
                found_indices.append(np.ravel_multi_index(offsets, self.baseline.shape))
        if not found_indices:
            return np.empty(0, np.int64), np.empty(0, self.baseline.dtype)
        indices, first = np.unique(np.concatenate(found_indices), return_index=True)
        return indices, np.concatenate(found_values)[first].astype(self.baseline.dtype, copy=False)

    def _changes_everywhere(self, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not current.flags.c_contiguous:
            current = np.ascontiguousarray(current)
        flat_current, flat_base = current.reshape(-1), self.baseline.reshape(-1)
        found_indices, found_values = [], []
        for start in range(0, flat_base.size, SLAB_VOXELS):
            stop = min(start + SLAB_VOXELS, flat_base.size)
            live = flat_current[start:stop]
            changed = np.flatnonzero(live != flat_base[start:stop])
            if changed.size:
                found_values.append(live[changed])
                found_indices.append(changed + start)
        if not found_indices:
            return np.empty(0, np.int64), np.empty(0, self.baseline.dtype)
        return np.concatenate(found_indices), np.concatenate(found_values).astype(self.baseline.dtype, copy=False)

    def _open_session(self) -> None:
        self.session = AutosaveSession.create(self.root, scan=self._resolve_scan(), geometry=self.geometry,
                                              shape=self.baseline.shape, dtype=self.baseline.dtype,
                                              label_names=self.label_names, model=self.model)

    def _restart(self, current: np.ndarray) -> int:
        """The layer got new data of another shape: start a new session from it."""
        if self.session is not None:
            self.session.set_state("discarded")
            self.session.close()
        self.session = None
        self._packed = None
        self.baseline = np.array(current, copy=True)
        self.origin = self.baseline.copy()
        self.edited = 0
        self.changes += 1
        self._open_session()
        self.session.write_snapshot(self.baseline, 0)
        return int(self.baseline.size)

    def mark_clean(self, state: str) -> None:
        """The mask was saved or submitted (``state``): nothing of it is at risk now."""
        with self.lock:
            self.clean_at = self.changes
            if self.session is not None:
                self.session.set_state(state)

    def finish(self, state: str | None = None, delete: bool = False) -> None:
        with self.lock:
            if self.session is not None:
                if state is not None:
                    self.session.set_state(state)
                self.session.close(delete=delete)
                self.session = None


@dataclass
class RecoveredMask:
    session: Recoverable
    mask: np.ndarray                      # layer order
    geometry: ScanGeometry | None         # the scan's grid, when the session recorded it
    label_names: dict                     # {value: name}
    model: str


def recover_session(root: str | os.PathLike | None, session: "Recoverable | str", scan: np.ndarray | None = None,
                    output=None) -> RecoveredMask:
    """The last complete autosave of a session: the one way the CLI and the Recover widget restore.

    ``session`` is a :class:`Recoverable` or its id (a unique start is enough). With ``scan``
    (layer order), the scan is checked to be the one the edits were made on. With ``output``,
    the mask is written there in the scan's geometry (the session must have recorded it),
    and the session is marked recovered.
    """
    from .io import write_mask

    found = session if isinstance(session, Recoverable) else find_session(root, session)
    mask, meta = load_session(found.folder)
    if scan is not None:
        wanted = found.scan.get("sha256")
        if list(np.shape(scan)) != list(found.shape) or \
                (wanted and scan_identity(np.asarray(scan), None)["sha256"] != wanted):
            raise MedsegError("that is not the scan these edits were made on (its voxels differ)")
    geometry = session_geometry(meta)
    names = {int(k): v for k, v in (meta.get("label_names") or {}).items()}
    recovered = RecoveredMask(found, mask, geometry, names, meta.get("model", ""))
    if output is not None:
        if geometry is None:
            raise MedsegError(f"autosave '{found.id}' did not record its scan's geometry")
        write_mask(output, mask, geometry)
    mark_state(found.folder, "recovered")  # kept until the next clean close
    return recovered
