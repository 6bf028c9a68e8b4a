"""The ``napari-medseg`` command line: every capability, headless.

Each command group lives in its own module (``scans``, ``queue``, ``worklist``,
``models``) and is thin over one core function. Errors the user can fix print one line
on stderr (``napari-medseg: error: ...``) and exit with status 2; nothing else ever exits
with a traceback. Output files are checked before any work starts (see
:mod:`napari_medseg.core.outputs`).
"""

from __future__ import annotations

import argparse
import sys

from ..core.errors import MedsegError, MultipleSeriesError, MultiVolumeError
from ..core.privacy import install_log_filter, remember_paths
from ._common import EXIT_USER_ERROR, Formatter, say

__all__ = ["build_parser", "main", "EXIT_USER_ERROR"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from . import models, queue, scans, worklist

    parser = argparse.ArgumentParser(
        prog="napari-medseg", formatter_class=Formatter,
        description="Headless tools of napari-medseg: scan info, segmentation, training, models.",
    )
    parser.add_argument("--version", action="version", version=f"napari-medseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (scans, queue, worklist, models):
        group.add_parsers(sub)
    return parser


def _input_error(exc) -> str:
    if isinstance(exc, MultiVolumeError):
        return f"{exc} (pass --volume N)"
    if isinstance(exc, MultipleSeriesError):
        return f"{exc} (pass --series N)"
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    import warnings

    install_log_filter()
    # Library warnings can quote full paths; what matters reaches the user as our own lines.
    warnings.simplefilter("ignore")
    parser = build_parser()
    args = parser.parse_args(argv)
    remember_paths(*[value for value in vars(args).values() if isinstance(value, str)])
    try:
        return args.func(args)
    except MedsegError as exc:
        for line in getattr(exc, "faults", None) or [_input_error(exc)]:
            say(f"napari-medseg: error: {line}")
    except KeyboardInterrupt:
        say("napari-medseg: interrupted")
        return 130
    except BrokenPipeError:  # the reader of our output went away (e.g. `| head`): not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MemoryError:
        say("napari-medseg: error: not enough memory for this volume")
    except OSError as exc:
        say(f"napari-medseg: error: {exc.strerror or exc}")
    finally:
        _leave_process_group()
    return EXIT_USER_ERROR


def _leave_process_group() -> None:
    """Under torchrun, leave the process group cleanly (gloo aborts a process that does not)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
