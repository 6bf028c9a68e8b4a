"""The one place that keeps patient identifiers out of messages, logs and stored data.

Folder names often name patients (``Smith^John_MRN998877/``), and libraries quote full
paths in their errors and warnings. Everything the user sees passes :func:`scrub`,
which keeps only the base name of any path. Native libraries (ITK, GDCM) print to the
process's stderr directly; :func:`native_messages` captures that output around a call
and hands back scrubbed lines, so no raw library text reaches the user.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading

# A quoted path (may contain spaces), or an unquoted token with a slash in it.
_QUOTED_PATH = re.compile(r"""(["'])((?:[A-Za-z]:)?[^"'\n]*[/\\][^"'\n]*)\1""")
_BARE_PATH = re.compile(r"""(?<![\w.])(?:[A-Za-z]:)?(?:~|\.{1,2})?(?:[/\\][^\s/\\"':,;()]+)+[/\\]?""")
# A relative path: two or more slashes, or one slash and a file extension.
_RELATIVE_PATH = re.compile(
    r"""(?<![\w./\\])[^\s/\\"':,;()]+(?:(?:[/\\][^\s/\\"':,;()]+){2,}|[/\\][^\s/\\"':,;()]*\.[A-Za-z][\w.]*)""")
# ITK's own warning header lines: "WARNING: In /path/itkFile.cxx, line 502"
_ITK_LOCATION = re.compile(r"^(?:WARNING|ERROR|Warning|Error):? In .*(?:\.cxx|\.hxx|\.h|\.txx)(?:, line \d+)?\s*$")
_ITK_OBJECT = re.compile(r"^\w+ \(0x[0-9a-fA-F]+\): ")

# DICOM attributes that identify a patient (PS3.15 Annex E basic profile, the ones a
# scan header commonly carries). They never enter the workspace, a log or the CLI.
PATIENT_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientAge",
    "OtherPatientIDs", "OtherPatientNames", "PatientAddress", "PatientTelephoneNumbers",
    "PatientMotherBirthName", "MilitaryRank", "EthnicGroup", "PatientComments",
    "AccessionNumber", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "StudyID", "StudyDate", "SeriesDate",
    "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime",
    "StationName", "DeviceSerialNumber", "RequestingPhysician", "PhysiciansOfRecord",
)


def _base(path: str) -> str:
    trimmed = path.rstrip("/\\")
    return re.split(r"[/\\]", trimmed)[-1] or trimmed


def scrub(text: str) -> str:
    """``text`` with every path reduced to its base name (``/a/Smith^John/x.mha`` -> ``x.mha``)."""
    if not text:
        return text
    for folder in sorted(_known_folders, key=len, reverse=True):
        text = text.replace(folder, "")
    text = _QUOTED_PATH.sub(lambda m: f"{m.group(1)}{_base(m.group(2))}{m.group(1)}", text)
    text = _BARE_PATH.sub(lambda m: _base(m.group(0)), text)
    return _RELATIVE_PATH.sub(lambda m: _base(m.group(0)), text)


_known_folders: set[str] = set()


def remember_paths(*paths) -> None:
    """Register paths the user gave, so their folders are removed from any text exactly,
    whatever form (relative, absolute, resolved) a library quotes them in."""
    for path in paths:
        if path is None:
            continue
        path = os.fspath(path)
        for form in {path, os.path.abspath(path), os.path.realpath(path)}:
            folder = os.path.dirname(form.rstrip("/\\"))
            if folder and folder not in ("/", "."):
                _known_folders.add(folder + os.sep)


def library_lines(raw: str) -> list[str]:
    """The useful, scrubbed lines of a native library's output (ITK headers dropped)."""
    lines = []
    for line in raw.splitlines():
        line = line.strip()
        if not line or _ITK_LOCATION.match(line):
            continue
        lines.append(scrub(_ITK_OBJECT.sub("", line)))
    return lines


_native_lock = threading.Lock()


@contextlib.contextmanager
def native_messages():
    """Capture what native code writes to stderr (file descriptor 2) during the block.

    Yields a list that is filled, after the block, with the scrubbed lines. Nested or
    concurrent uses are serialised, because file descriptor 2 belongs to the process.
    """
    captured: list[str] = []
    with _native_lock:
        try:
            sys.stderr.flush()
        except (AttributeError, ValueError, OSError):
            pass
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all (some GUI launchers): nothing to capture
            yield captured
            return
        with tempfile.TemporaryFile(mode="w+b") as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield captured
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                captured.extend(library_lines(sink.read().decode("utf-8", "replace")))


@contextlib.contextmanager
def library_warnings_silenced():
    """Python warnings raised inside a library call are dropped: they may quote full paths,
    and whatever matters in them reaches the user as our own one-line message."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def quiet_simpleitk():
    """SimpleITK with ITK's global warning display off (its warnings carry full paths)."""
    import SimpleITK as sitk

    if not getattr(quiet_simpleitk, "_done", False):
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        quiet_simpleitk._done = True
    return sitk


class ScrubFilter(logging.Filter):
    """A logging filter that reduces paths in every record to base names."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record still gets logged, scrubbed
            message = str(record.msg)
        record.msg, record.args = scrub(message), ()
        if record.exc_info and record.exc_info[1] is not None:
            # Tracebacks name source files only; the exception text may carry a path.
            exc = record.exc_info[1]
            record.exc_text = None
            record.exc_info = (record.exc_info[0], type(exc)(scrub(str(exc))) if _rebuildable(exc) else exc,
                               record.exc_info[2])
        return True


def _rebuildable(exc: BaseException) -> bool:
    try:
        type(exc)(str(exc))
        return True
    except Exception:  # noqa: BLE001 - exceptions with other signatures keep their text
        return False


def install_log_filter(logger_name: str = "napari_medseg") -> None:
    """Scrub every log record of ``logger_name`` (and its children)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, ScrubFilter) for f in logger.filters):
        logger.addFilter(ScrubFilter())
