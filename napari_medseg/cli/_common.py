"""What every command group shares: one-line messages, progress on stderr, input options."""

from __future__ import annotations

import argparse
import json
import sys

from ..core.defaults import DEFAULT_OVERLAP, DEVICE_HELP, DEVICES, WINDOW_CHOICES
from ..core.privacy import scrub

EXIT_USER_ERROR = 2


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (where it has one), and keeps descriptions as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


def say(message: str, stream=None) -> None:
    print(scrub(message), file=stream or sys.stderr, flush=True)


def warn(messages) -> None:
    for message in messages:
        say(f"warning: {message}")


def printed_json_or_empty(args, rows: list, to_dict, empty: str) -> bool:
    """For a listing: the rows as JSON with ``--json``, or ``empty`` when there are none.
    True when that was all there is to print."""
    if args.json:
        print(json.dumps([to_dict(row) for row in rows], indent=2))
        return True
    if not rows:
        print(empty)
        return True
    return False


def add_inference_options(parser: argparse.ArgumentParser) -> None:
    """--device, --overlap and --tta: how a segmentation runs (``predict``, ``worklist run``)."""
    parser.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    parser.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP, metavar="F",
                        help="minimum overlap between windows, 0 <= F < 1")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="test-time augmentation by mirroring (4x time; an imported nnU-Net model mirrors "
                             "over its allowed axes, 8x, and does so by default, as nnUNetv2_predict does)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision; by default on CUDA, and in bf16 on a CPU that computes bf16 natively "
                             "(AVX-512 BF16, AMX) for this project's own models (imported ones keep float32, as "
                             "their tools run them); --no-amp runs float32 everywhere")
    parser.add_argument("--windows", choices=WINDOW_CHOICES, default="card",
                        help="card: tile as the model declares (nnU-Net's fixed step for an imported nnU-Net "
                             "model); ours: our engine's window plan, fewer voxels")


def inference_settings(args):
    """The InferenceSettings that --device, --overlap, --tta, --amp and --windows ask for."""
    from ..core.inference import InferenceSettings

    return InferenceSettings(device=args.device, overlap=args.overlap, tta=args.tta, windows=args.windows,
                             amp=args.amp)


def add_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="INPUT", help="NIfTI, NRRD or MetaImage file, or a DICOM folder")
    add_volume_options(parser)


def add_volume_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--volume", type=int, default=None,
                        help="for 4D files and multi-volume DICOM series: which volume (0-based)")
    parser.add_argument("--series", default=None,
                        help="for folders with several DICOM series: the series index or UID")


def stderr_progress(label: str, quiet: bool = False):
    """A progress callback that prints at most every 10 %, on stderr."""
    if quiet:
        return None
    state = {"last": -1}

    def report(fraction: float, message: str) -> None:
        tenth = int(fraction * 10)
        if tenth != state["last"]:
            state["last"] = tenth
            say(f"{label}: {fraction:4.0%} {message}")

    return report


def model_inputs(spec) -> list:
    """The model file a --model option reads, when it names a file (never written over)."""
    from pathlib import Path

    return [spec] if spec is not None and Path(str(spec)).exists() else []


def open_workspace(args, create: bool = True):
    """The workspace ``--workspace`` names, or None when the command has none."""
    from ..core.workspace import Workspace

    return Workspace(args.workspace, create=create) if getattr(args, "workspace", None) else None


def load_model_of(args, for_training: bool = False):
    """The model ``--model`` and ``--workspace`` choose (see :func:`~napari_medseg.core.models.resolve_model`)."""
    from ..core.models import load_model, resolve_model

    return load_model(resolve_model(args.model, open_workspace(args, create=False)), for_training=for_training)
