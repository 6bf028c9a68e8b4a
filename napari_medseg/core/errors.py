"""Errors that reach users as one clear sentence instead of a traceback."""


class MedsegError(Exception):
    """A problem the user can act on; ``str(error)`` is shown as-is."""


class UnreadableScanError(MedsegError):
    """The file or folder is not a scan we can read (corrupt, truncated, wrong type)."""


class NotAVolumeError(MedsegError):
    """The data are readable but not a 3D volume (2D, empty axis, singular geometry)."""


class MultiVolumeError(NotAVolumeError):
    """A 4D file: the caller must choose one volume (``volume_index``)."""

    def __init__(self, message: str, n_volumes: int):
        super().__init__(message)
        self.n_volumes = n_volumes


class MultipleSeriesError(MedsegError):
    """A DICOM folder with several series: the caller must choose one (``series``)."""

    def __init__(self, message: str, series: list):
        super().__init__(message)
        self.series = series


class GeometryMismatchError(MedsegError):
    """A mask does not fit the scan it is meant to belong to."""


class Cancelled(MedsegError):
    """The user cancelled a long-running operation."""
