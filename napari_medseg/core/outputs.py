"""Safe output files: checked before any work starts, written all together or not at all.

Every command that writes (``predict``, ``train``, ``explain``, ``recover``, the worklist
export, the writers behind the widgets) goes through these two functions:

* :func:`check_outputs` refuses, before the work starts, an output that is one of the
  inputs (symbolic and hard links included) or a file inside an input folder, two
  outputs at the same path, a missing or unwritable folder, and a folder in place of
  a file name. A missing folder is never created: a typo must not make folders.
* :func:`write_files` writes each output to a temporary file beside its target, flushes
  it to disk, and only when every one is complete renames them into place. A failure
  (a full disk, a read-only file system) leaves no new file behind and every earlier
  file as it was.
"""

from __future__ import annotations

import datetime
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .errors import MedsegError

Writer = Callable[[str], None]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: Path, folder: Path) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, base]) == base


def check_outputs(outputs: dict, inputs: Iterable = ()) -> dict:
    """Refuse unsafe outputs; returns ``{option: Path}`` for the outputs given.

    ``outputs`` maps an option name (``"-o"``, ``"--probabilities"``) to a path or
    ``None``; ``inputs`` are the files and folders the command reads.
    """
    inputs = [Path(p) for p in inputs if p is not None]
    checked: dict = {}
    for option, value in outputs.items():
        if value is None:
            continue
        path = Path(value)
        name = path.name or str(value)
        if path.is_dir():
            raise MedsegError(f"{option} '{name}' is a folder; give the name of a file to write")
        for source in inputs:
            if source.is_dir():
                if path.exists() and _inside(path, source):
                    raise MedsegError(f"refusing to write {option} '{name}': it is a file inside the input "
                                      f"folder '{source.name}', which this command reads")
            elif path.exists() and source.exists() and _same_file(path, source):
                raise MedsegError(f"refusing to write {option} '{name}': it is the input file "
                                  f"'{source.name}' (or a link to it), which would be destroyed")
        for other_option, other in checked.items():
            if os.path.realpath(other) == os.path.realpath(path):
                raise MedsegError(f"{option} and {other_option} name the same file '{name}'")
        folder = path.parent
        if not folder.exists():
            raise MedsegError(f"cannot write {option} '{name}': its folder '{folder.name}' does not exist "
                              "(create it first)")
        if not folder.is_dir():
            raise MedsegError(f"cannot write {option} '{name}': '{folder.name}' is not a folder")
        _probe_writable(folder, option, name)
        checked[option] = path
    return checked


def _probe_writable(folder: Path, option: str, name: str) -> None:
    """Create and delete a file in ``folder``: the only test that every file system answers truly."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".medseg-probe-", dir=folder)
    except OSError as exc:
        raise MedsegError(f"cannot write {option} '{name}' into folder '{folder.name}': "
                          f"{exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def sha256_of_file(path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path, directory: bool = False) -> None:
    """Flush a file (or, with ``directory``, a folder's entries) to disk; errors are ignored."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    # Read once: os.umask can only be read by setting it, and a write from another
    # thread (autosave) in between would create a file with the wrong permissions.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def utc_timestamp() -> str:
    """Now, in UTC to the second (ISO 8601): the time stamp of every record we write."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _remove_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_files(items: Sequence[tuple], *, error: type = MedsegError) -> list:
    """Write several files so that either all of them are in place or none changed.

    ``items``: ``(path, write, suffix[, label])`` where ``write(tmp_path)`` writes the
    whole file and ``suffix`` is the temporary file's ending (writers pick the format
    from it). The folders must exist. An ``OSError`` becomes ``error`` with a one-line
    message naming the file by ``label`` (default: its base name).
    """
    staged: list[tuple[Path, str, str]] = []
    try:
        for item in items:
            path, write, suffix = Path(item[0]), item[1], item[2]
            label = item[3] if len(item) > 3 else repr(path.name)
            try:
                fd, tmp = tempfile.mkstemp(prefix=".medseg-", suffix=suffix, dir=path.parent)
            except OSError as exc:
                raise error(f"could not write {label}: {exc.strerror or exc}; no file was changed") from None
            os.close(fd)
            staged.append((path, tmp, label))
            try:
                write(tmp)
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files
                fsync_path(tmp)
            except OSError as exc:
                raise error(f"could not write {label}: {exc.strerror or exc}; no file was changed") from None
        _commit(staged, error)
    except BaseException:
        for _path, tmp, _label in staged:
            _remove_quietly(tmp)
        raise
    return [path for path, _tmp, _label in staged]


def _commit(staged: list, error: type) -> None:
    """Rename staged files into place; on failure put every earlier file back."""
    done: list[tuple[Path, str | None]] = []
    label = ""
    try:
        for path, tmp, label in staged:
            backup = None
            if len(staged) > 1 and os.path.lexists(path):
                # A hard link keeps the old file reachable while the new one replaces it.
                backup = f"{tmp}.previous"
                try:
                    os.link(path, backup)
                except OSError:
                    import shutil

                    shutil.copy2(path, backup)
            try:
                os.replace(tmp, path)
            except OSError:
                if backup is not None:
                    _remove_quietly(backup)
                raise
            done.append((path, backup))
    except OSError as exc:
        for path, backup in reversed(done):
            if backup is not None:
                os.replace(backup, path)
            else:
                _remove_quietly(path)
        raise error(f"could not write {label}: {exc.strerror or exc}; no file was changed") from None
    for folder in {str(path.parent) for path, _tmp, _label in staged}:
        fsync_path(folder, directory=True)
    for _path, backup in done:
        if backup is not None:
            _remove_quietly(backup)


def save_atomically(path, write: Writer, suffix: str = "", *, error: type = MedsegError,
                    label: str | None = None) -> Path:
    """Write one file through a temporary file and a rename (see :func:`write_files`)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise error(f"could not write {label or repr(path.name)}: the folder '{path.parent.name}' "
                    "does not exist; no file was changed")
    return write_files([(path, write, suffix, label or repr(path.name))], error=error)[0]


# -- staging folders: a record's files are written into one, then renamed into place ------------

def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_folder(parent: Path, key: str) -> Path:
    """A new hidden folder in ``parent`` for this process's files of ``key``, before they are renamed into place."""
    folder = Path(parent) / f".staging-{os.getpid()}-{key}"
    folder.mkdir()
    return folder


def sweep_staging(parent: Path, committed: set) -> None:
    """Remove what a killed writer left in ``parent``: staging folders of dead processes, and
    folders that no committed record names (the caller holds the index's write lock)."""
    for entry in Path(parent).iterdir():
        if entry.name.startswith(".staging-"):
            pid = entry.name.split("-")[1]
            if pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
        elif not entry.name.startswith(".") and entry.name not in committed:
            shutil.rmtree(entry, ignore_errors=True)
