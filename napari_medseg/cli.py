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


def _stderr_progress(label: str):
    """A progress callback that prints at most every 10 %, on stderr."""
    state = {"last": -1}

    def report(fraction: float, message: str) -> None:
        tenth = int(fraction * 10)
        if tenth != state["last"]:
            state["last"] = tenth
            print(f"{label}: {fraction:4.0%} {message}", file=sys.stderr, flush=True)

    return report


def _cmd_predict(args) -> int:
    from .core.inference import InferenceSettings, segment
    from .core.io import MASK_SUFFIXES, NIFTI_SUFFIXES, read_volume, write_mask, write_map
    from .core.models import ModelRegistry

    # Check the outputs before the (long) prediction, with the writers' own rules.
    if not args.output.lower().endswith(MASK_SUFFIXES):
        raise MedsegError(f"cannot write '{args.output}': use .nii.gz, .nii, .nrrd or .mha")
    if args.probabilities and not args.probabilities.lower().endswith(NIFTI_SUFFIXES):
        raise MedsegError(f"cannot write probabilities to '{args.probabilities}': use .nii.gz or .nii")
    settings = InferenceSettings(device=args.device, overlap=args.overlap, tta=args.tta)
    model = ModelRegistry().load(args.model)
    volume = read_volume(args.input, volume_index=args.volume, series=args.series)
    if volume.is_label_map:
        raise MedsegError(f"'{volume.name}' looks like a label map, not an image to segment")
    result = segment(volume.layer_data(), volume.geometry.layer_affine_ras, model, settings,
                     want_probabilities=args.probabilities is not None,
                     progress=None if args.quiet else _stderr_progress("predict"))
    write_mask(args.output, result.labels, volume.geometry)
    if args.probabilities:
        write_map(args.probabilities, result.probabilities, volume.geometry)
    for message in volume.warnings + result.info.get("messages", []):
        print(f"warning: {message}", file=sys.stderr)
    rows = result.volumes()
    if args.json:
        print(json.dumps({"output": str(args.output), "model": model.title, "volumes": rows,
                          "run": {k: v for k, v in result.info.items() if k != "messages"}}, indent=2))
    else:
        print(f"wrote {args.output} ({model.title}, {result.info['device']}, "
              f"{result.info['seconds']:.1f} s network time)")
        for row in rows:
            print(f"  {row['value']:>3}  {row['name']:<20} {row['ml']:10.1f} mL  {row['voxels']:>10} voxels")
    return 0


def _cmd_train(args) -> int:
    from .core.models import ModelRegistry, save_model
    from .core.training import Augmentation, TrainingConfig, evaluate, read_dataset, train

    dataset = read_dataset(args.data, progress=_stderr_progress("read"))
    initial = None
    if args.init:
        initial = ModelRegistry().load(args.init, for_training=True).network.state_dict()
    config = TrainingConfig(name=args.name, version=args.version, steps=args.steps,
                            batch_size=args.batch_size, patch_size=tuple(args.patch_size),
                            target_spacing=tuple(args.spacing), channels=tuple(args.channels),
                            learning_rate=args.lr, seed=args.seed, device=args.device,
                            augmentation=Augmentation(max_shift_mm=args.max_shift_mm,
                                                      synthesis_probability=args.synthesis_probability))
    network, card = train(dataset, config, log=lambda line: print(line, file=sys.stderr, flush=True),
                          initial_state=initial)
    card["postprocessing"] = {step: True for step in args.postprocessing}
    if args.init:
        card["provenance"]["initialised_from"] = str(args.init).rsplit("/", 1)[-1]
    card["provenance"]["data"] = args.data_description or f"dataset folder '{args.data.rstrip('/').split('/')[-1]}'"
    if args.val_data:
        card["metrics"] = evaluate(network, card, read_dataset(args.val_data))
        print(f"held-out Dice: {json.dumps(card['metrics'])}", file=sys.stderr)
    path = save_model(f"{args.output}/{args.name}.safetensors", network, card)
    print(f"wrote {path}")
    return 0


def _cmd_models_list(args) -> int:
    from .core.models import ModelRegistry

    entries = ModelRegistry().entries()
    if args.json:
        print(json.dumps([e.summary() for e in entries], indent=2))
        return 0
    if not entries:
        print("no models installed")
        return 0
    print(f"{'name':<16} {'version':<10} {'source':<8} {'modality':<8} labels")
    for entry in entries:
        summary = entry.summary()
        mark = "*" if entry.current else " "
        print(f"{entry.name:<16} {entry.version + mark:<10} {entry.source:<8} {summary['modality'] or '':<8} "
              f"{', '.join(summary['labels'])}")
    print("* = the version used when only the name is given")
    return 0


def _cmd_models_import(args) -> int:
    from .core.models import ModelRegistry

    entry = ModelRegistry().import_model(args.path)
    print(f"imported {entry.name} v{entry.version} into {entry.path.parent}")
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

    predict = sub.add_parser("predict", help="segment a scan; the mask is written in the scan's geometry")
    _add_input_options(predict)
    predict.add_argument("-o", "--output", required=True, metavar="OUT.nii.gz", help="label mask to write")
    predict.add_argument("--model", default=None, metavar="NAME|PATH",
                         help="model name (NAME or NAME@VERSION) or model file; default: brain-t1")
    predict.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    predict.add_argument("--overlap", type=float, default=0.125, metavar="F",
                         help="minimum overlap between windows, 0 <= F < 1 (default 0.125)")
    predict.add_argument("--tta", action="store_true", help="test-time augmentation by mirroring (4x time)")
    predict.add_argument("--probabilities", default=None, metavar="OUT.nii.gz",
                         help="also write per-class probabilities (4D float, classes last)")
    predict.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    predict.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    predict.set_defaults(func=_cmd_predict)

    train = sub.add_parser("train", help="train a model on an MSD / nnU-Net dataset folder")
    train.add_argument("--data", required=True, metavar="DIR", help="folder with dataset.json, imagesTr/, labelsTr/")
    train.add_argument("-o", "--output", required=True, metavar="MODEL_DIR", help="folder for NAME.safetensors")
    train.add_argument("--name", default="model", help="model name (letters, digits, - _ .)")
    train.add_argument("--version", default="1.0.0")
    train.add_argument("--steps", type=int, default=1000)
    train.add_argument("--batch-size", type=int, default=1)
    train.add_argument("--patch-size", type=int, nargs=3, default=[80, 96, 80], metavar=("D", "H", "W"))
    train.add_argument("--spacing", type=float, nargs=3, default=[2.0, 2.0, 2.0], metavar=("MM", "MM", "MM"),
                       help="voxel size the model works at")
    train.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32, 64])
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    train.add_argument("--max-shift-mm", type=float, default=25.0,
                       help="random shift of the training views; larger shows more surroundings")
    train.add_argument("--synthesis-probability", type=float, default=0.4,
                       help="share of samples with random tissue intensities (SynthStrip-style)")
    train.add_argument("--postprocessing", nargs="*", default=[], choices=["inside_body", "largest_component"],
                       help="clean-up steps recorded in the model card and applied at every prediction")
    train.add_argument("--val-data", default=None, metavar="DIR", help="held-out cases (same layout) for Dice")
    train.add_argument("--init", default=None, metavar="NAME|PATH", help="start from this model's weights")
    train.add_argument("--data-description", default=None, help="provenance text stored in the model card")
    train.set_defaults(func=_cmd_train)

    models = sub.add_parser("models", help="list or import models")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = models_sub.add_parser("list", help="list the available models and versions")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_cmd_models_list)
    importing = models_sub.add_parser("import", help="verify a model file and add it to your models")
    importing.add_argument("path", metavar="FILE")
    importing.set_defaults(func=_cmd_models_import)
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
