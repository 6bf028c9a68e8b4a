"""Errors that reach users as one clear sentence instead of a traceback."""

from .privacy import scrub


class MedsegError(Exception):
    """A problem the user can act on; ``str(error)`` is shown as-is.

    The message is scrubbed on construction: any path in it, whether our own code or a
    library put it there, is reduced to its base name (folders can name patients).
    """

    def __init__(self, message: str = "", *args):
        super().__init__(scrub(" ".join(str(message).split("\n")).strip()), *args)


class UnreadableScanError(MedsegError):
    """The file or folder is not a scan we can read (corrupt, truncated, wrong type)."""


class NotAVolumeError(MedsegError):
    """The data are readable but not a 3D volume (2D, empty axis, singular geometry)."""


class MultiVolumeError(NotAVolumeError):
    """A 4D file: the caller must choose one volume (``volume_index``)."""

    def __init__(self, message: str, n_volumes: int, labels: list | None = None):
        super().__init__(message)
        self.n_volumes = n_volumes
        self.labels = list(labels) if labels else [f"volume {n}" for n in range(n_volumes)]


class MultipleSeriesError(MedsegError):
    """A DICOM folder with several series: the caller must choose one (``series``)."""

    def __init__(self, message: str, series: list, skipped: list | None = None):
        super().__init__(message)
        self.series = series
        self.skipped = list(skipped or [])


class GeometryMismatchError(MedsegError):
    """A mask does not fit the scan it is meant to belong to."""


class Cancelled(MedsegError):
    """The user cancelled a long-running operation."""


class OutOfScope(MedsegError):
    """The scan lies outside the model card's domain (another modality or body part)."""

    def __init__(self, problems: list):
        super().__init__(problems[0])
        self.problems = list(problems)
