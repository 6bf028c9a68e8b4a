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


# -- progress between processes --------------------------------------------------------
# ``napari-medseg finetune --progress json`` prints one JSON object per line on stdout:
# {"progress": fraction, "message": text} while it runs and {"result": {...}} at the end.
# The Correct widget reads the same lines from its fine-tuning process.

def progress_line(fraction: float, message: str) -> str:
    import json

    from .privacy import scrub

    return json.dumps({"progress": round(float(fraction), 4), "message": scrub(message)})


def result_line(result: dict) -> str:
    import json

    return json.dumps({"result": result})


def read_progress_line(line: str) -> dict | None:
    """``{"progress": f, "message": m}``, ``{"result": {...}}``, or None for any other line."""
    import json

    try:
        message = json.loads(line)
    except (json.JSONDecodeError, ValueError):
        return None
    return message if isinstance(message, dict) and ("progress" in message or "result" in message) else None
