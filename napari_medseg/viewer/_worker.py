"""The one way widgets run core work: a napari thread worker with a progress bar.

Core functions take ``progress(fraction, message)``; this helper relays those calls
to the GUI thread through a Qt signal, drives a napari progress bar, and turns a
Cancel request into :class:`~napari_medseg.core.errors.Cancelled` raised inside the
worker at the next progress call.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from napari.qt.threading import thread_worker
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, Signal

from ..core.errors import Cancelled, MedsegError

log = logging.getLogger(__name__)
STEPS = 1000


class _Relay(QObject):
    progressed = Signal(float, str)


class _Outcome:
    """What a core call returned or raised, handed to the GUI thread as one value.

    Errors travel as values rather than through the worker's ``errored`` signal: napari
    connects that signal to a ``functools.partial`` that PySide6 calls with the
    exception as an extra argument, which raises a TypeError in the event loop.
    """

    def __init__(self, value=None, error: BaseException | None = None):
        self.value = value
        self.error = error


class BackgroundTask:
    """A running core call; ``cancel()`` stops it at its next progress report."""

    def __init__(self, function: Callable, *args, description: str,
                 on_done: Callable | None = None, on_error: Callable | None = None,
                 on_finish: Callable | None = None, **kwargs):
        self.description = description
        self._cancel = threading.Event()
        self._relay = _Relay()
        self._bar = napari_progress(total=STEPS, desc=description)
        self._last_step = 0
        self._relay.progressed.connect(self._show_progress)
        self.cancelled = False
        self.error: BaseException | None = None
        self.result = None
        self.finished = False

        def report(fraction: float, message: str = "") -> None:
            if self._cancel.is_set():
                raise Cancelled(f"{description} was cancelled")
            self._relay.progressed.emit(float(fraction), str(message))

        @thread_worker(start_thread=False, ignore_errors=True)
        def work():
            try:
                return _Outcome(function(*args, progress=report, **kwargs))
            except Exception as exc:  # noqa: BLE001 - every error is shown, see _errored
                return _Outcome(error=exc)

        self.worker = work()
        self.worker.returned.connect(self._settle)
        self.worker.finished.connect(self._finished)
        self._on_done, self._on_error, self._on_finish = on_done, on_error, on_finish
        self.worker.start()

    @property
    def running(self) -> bool:
        """False once the GUI thread has handled the result (or error)."""
        return not self.finished

    def cancel(self) -> None:
        self._cancel.set()

    def _show_progress(self, fraction: float, message: str) -> None:
        step = int(max(0.0, min(1.0, fraction)) * STEPS)
        if step > self._last_step:
            self._bar.update(step - self._last_step)
            self._last_step = step
        if message:
            self._bar.set_description(f"{self.description}: {message}")

    def _settle(self, outcome: _Outcome) -> None:
        if outcome.error is not None:
            self._errored(outcome.error)
        else:
            self._returned(outcome.value)

    def _returned(self, result) -> None:
        self.result = result
        if self._on_done:
            try:
                self._on_done(result)
            except MedsegError as exc:
                self.error = exc
                show_error(f"napari-medseg: {exc}")

    def _errored(self, exc: BaseException) -> None:
        self.error = exc
        if isinstance(exc, Cancelled):
            self.cancelled = True
            show_info(f"napari-medseg: {exc}")
        elif isinstance(exc, MedsegError):
            show_error(f"napari-medseg: {exc}")
        elif isinstance(exc, MemoryError):
            show_error(f"napari-medseg: not enough memory for {self.description}")
        else:
            log.error("%s failed", self.description, exc_info=exc)
            show_error(f"napari-medseg: {self.description} failed ({type(exc).__name__}: {exc})")
        if self._on_error:
            self._on_error(exc)

    def _finished(self) -> None:
        self.finished = True
        self._bar.close()
        if self._on_finish:
            self._on_finish()


def notify_warnings(name: str, warnings: list) -> None:
    for message in warnings:
        show_warning(f"napari-medseg: {name}: {message}")
