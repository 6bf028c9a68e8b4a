"""The ``napari-medseg`` command line: every capability, headless.

Errors the user can fix print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from .core.errors import MedsegError, MultipleSeriesError, MultiVolumeError

EXIT_USER_ERROR = 2


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="INPUT", help="NIfTI, NRRD, MetaImage file or DICOM series folder")
    parser.add_argument("--volume", type=int, default=None, help="for 4D files: which volume (0-based)")
    parser.add_argument("--series", default=None, help="for folders with several DICOM series: index or UID")


def _cmd_info(args) -> int:
    from .core.io import read_volume

    volume = read_volume(args.input, volume_index=args.volume, series=args.series)
    summary = volume.describe()
    if args.json:
        print(json.dumps({**summary, "warnings": volume.warnings}, indent=2))
        return 0
    dims = " x ".join(str(n) for n in summary["dimensions"])
    spacing = " x ".join(f"{s:.4g}" for s in summary["spacing_mm"])
    bounds = summary["world_bounds_lps_mm"]
    lines = [
        f"name:         {summary['name']}",
        f"format:       {summary['format']}",
        f"kind:         {summary['kind']}",
        f"dimensions:   {dims} voxels (file axes i x j x k)",
        f"spacing:      {spacing} mm",
        f"orientation:  {summary['orientation']} (RAS+ codes of the file axes)"
        + (", oblique" if summary["oblique"] else ""),
        f"modality:     {summary['modality']}",
        f"data type:    {summary['dtype']}",
        f"value range:  {summary['value_range'][0]:g} .. {summary['value_range'][1]:g}",
        "world bounds: "
        + ", ".join(f"{axis} {lo:.2f}..{hi:.2f}" for axis, (lo, hi) in zip("xyz", bounds))
        + " mm (LPS, voxel centres)",
    ]
    if "volume" in summary:
        lines.insert(3, f"volume:       {summary['volume']}")
    print("\n".join(lines))
    for warning in volume.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-medseg",
        description="Headless tools of napari-medseg: scan info, segmentation, training.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"napari-medseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="print a scan's geometry and intensity summary (no patient data)")
    _add_input_options(info)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MultiVolumeError as exc:
        print(f"napari-medseg: error: {exc} (pass --volume N)", file=sys.stderr)
    except MultipleSeriesError as exc:
        print(f"napari-medseg: error: {exc} (pass --series N)", file=sys.stderr)
    except MedsegError as exc:
        print(f"napari-medseg: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("napari-medseg: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("napari-medseg: error: not enough memory for this volume", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
