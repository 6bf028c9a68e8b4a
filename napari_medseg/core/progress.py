"""The progress-and-cancel contract shared by every long core function.

A core function takes ``progress(fraction, message)``. The caller (the CLI, a widget's
worker) may raise :class:`~napari_medseg.core.errors.Cancelled` from inside that call
to stop the work; core functions call it often enough (between windows, steps, cases)
for Cancel to feel immediate.
"""

from __future__ import annotations

from typing import Callable, Optional

Progress = Callable[[float, str], None]


def report(progress: Optional[Progress], fraction: float, message: str) -> None:
    """Call ``progress`` if there is one."""
    if progress is not None:
        progress(float(fraction), message)


def span(progress: Optional[Progress], start: float, width: float) -> Optional[Progress]:
    """A progress callback for a sub-task that maps its 0..1 onto ``start..start+width``."""
    if progress is None:
        return None
    return lambda fraction, message: progress(start + width * min(max(float(fraction), 0.0), 1.0), message)
