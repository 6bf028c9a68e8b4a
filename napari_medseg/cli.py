"""The ``napari-medseg`` command line: every capability, headless.

Errors the user can fix print one line on stderr (``napari-medseg: error: ...``) and
exit with status 2; nothing else ever exits with a traceback. Output files are checked
before any work starts (see :mod:`napari_medseg.core.outputs`).
"""

from __future__ import annotations

import argparse
import json
import sys

from .core.errors import MedsegError, MultipleSeriesError, MultiVolumeError
from .core.privacy import install_log_filter, remember_paths, scrub

EXIT_USER_ERROR = 2


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (where it has one), and keeps descriptions as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _say(message: str, stream=None) -> None:
    print(scrub(message), file=stream or sys.stderr, flush=True)


def _warn(messages) -> None:
    for message in messages:
        _say(f"warning: {message}")


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="INPUT", help="NIfTI, NRRD or MetaImage file, or a DICOM folder")
    parser.add_argument("--volume", type=int, default=None,
                        help="for 4D files and multi-volume DICOM series: which volume (0-based)")
    parser.add_argument("--series", default=None,
                        help="for folders with several DICOM series: the series index or UID")


def _cmd_info(args) -> int:
    from pathlib import Path

    from .core.io import read_volume

    folder = Path(args.input).is_dir()
    try:
        volume = read_volume(args.input, volume_index=args.volume, series=args.series)
    except MultipleSeriesError as exc:
        # A study folder: the series list is the answer (choose one with --series N).
        listing = {"series": exc.series, "skipped": exc.skipped}
        if args.json:
            print(json.dumps(listing, indent=2))
        else:
            _print_series(listing["series"], listing["skipped"])
            print(f"{len(exc.series)} series; pass --series N for one series' details")
        return 0
    summary = volume.describe()
    if args.json:
        extra = {"series": volume.info["series_in_folder"], "skipped": volume.info["skipped"]} if folder else {}
        print(json.dumps({**summary, **extra, "warnings": volume.warnings}, indent=2))
        return 0
    if folder:
        _print_series(volume.info["series_in_folder"], [])
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
    _warn(volume.warnings)
    return 0


def _print_series(series: list, skipped: list) -> None:
    from .core.dicom import describe_series

    for entry in series:
        print(describe_series(entry))
        if len(entry["volumes"]) > 1:
            print("    volumes: " + "; ".join(f"{n}: {label}" for n, label in enumerate(entry["volumes"])))
        if entry["references"]:
            print("    segmentation of series " + ", ".join(
                str(next((s["index"] for s in series if s["uid"] == uid), uid)) for uid in entry["references"]))
        for warning in entry["warnings"]:
            print(f"    warning: {scrub(warning)}")
    for line in skipped:
        print(scrub(line))


def _stderr_progress(label: str, quiet: bool = False):
    """A progress callback that prints at most every 10 %, on stderr."""
    if quiet:
        return None
    state = {"last": -1}

    def report(fraction: float, message: str) -> None:
        tenth = int(fraction * 10)
        if tenth != state["last"]:
            state["last"] = tenth
            _say(f"{label}: {fraction:4.0%} {message}")

    return report


def _model_inputs(spec) -> list:
    """The model file a --model option reads, when it names a file."""
    from pathlib import Path

    return [spec] if spec is not None and Path(str(spec)).exists() else []


def _registry(args):
    from .core.models import ModelRegistry

    return ModelRegistry()


def _cmd_predict(args) -> int:
    from pathlib import Path

    from .core.domain import scan_problems
    from .core.inference import InferenceSettings, segment
    from .core.io import MASK_SUFFIXES, NIFTI_SUFFIXES, map_file, mask_file, read_volume
    from .core.outputs import check_outputs, write_files

    if not args.output.lower().endswith(MASK_SUFFIXES):
        raise MedsegError(f"cannot write '{args.output}': use .nii.gz, .nii, .nrrd or .mha")
    if args.probabilities and not args.probabilities.lower().endswith(NIFTI_SUFFIXES):
        raise MedsegError(f"cannot write probabilities to '{args.probabilities}': use .nii.gz or .nii")
    check_outputs({"-o": args.output, "--probabilities": args.probabilities},
                  [args.input] + _model_inputs(args.model))
    settings = InferenceSettings(device=args.device, overlap=args.overlap, tta=args.tta)
    model = _load_model(args)
    volume = read_volume(args.input, volume_index=args.volume, series=args.series)
    if volume.is_label_map:
        raise MedsegError(f"'{volume.name}' looks like a label map, not an image to segment")
    image = volume.layer_data()
    problems = scan_problems(image, volume.geometry.layer_spacing, model.card, volume.modality,
                             volume.modality_guessed, volume.info.get("dicom", {}).get("BodyPartExamined"))
    if problems and not args.force:
        raise MedsegError(f"{problems[0]}; pass --force to segment it anyway")
    result = segment(image, volume.geometry.layer_affine_ras, model, settings,
                     want_probabilities=args.probabilities is not None,
                     progress=_stderr_progress("predict", args.quiet))
    outputs = [mask_file(args.output, result.labels, volume.geometry)]
    if args.probabilities:
        outputs.append(map_file(args.probabilities, result.probabilities, volume.geometry))
    write_files(outputs)
    warnings = volume.warnings + problems + result.info.get("messages", []) + result.warnings
    _warn(warnings)
    rows = result.volume_rows()
    if args.json:
        print(json.dumps({"output": Path(args.output).name, "model": model.title, "volumes": rows,
                          "warnings": warnings,
                          "run": {k: v for k, v in result.info.items()
                                  if k not in ("messages", "warnings", "volumes")}},
                         indent=2))
    else:
        print(f"wrote {Path(args.output).name} ({model.title}, {result.info['device']}, "
              f"{result.info['seconds']:.1f} s network time)")
        for row in rows:
            flag = f"  WARNING: {row['warning']}" if "warning" in row else ""
            print(f"  {row['value']:>3}  {row['name']:<20} {row['ml']:10.1f} mL  {row['voxels']:>10} voxels{flag}")
    return 0


def _load_model(args):
    return _registry(args).load(args.model)


def _cmd_explain(args) -> int:
    from pathlib import Path

    import numpy as np

    from .core.domain import scan_problems
    from .core.explain import explain, uncertain_regions
    from .core.inference import InferenceSettings
    from .core.io import NIFTI_SUFFIXES, map_file, read_volume
    from .core.outputs import check_outputs, write_files

    if not args.output.lower().endswith(NIFTI_SUFFIXES):
        raise MedsegError(f"cannot write maps to '{args.output}': use .nii.gz or .nii")
    if args.regions and not args.regions.lower().endswith(".json"):
        raise MedsegError(f"cannot write regions to '{args.regions}': use .json")
    check_outputs({"-o": args.output, "--regions": args.regions},
                  [args.input, args.region] + _model_inputs(args.model))
    settings = InferenceSettings(device=args.device)
    model = _load_model(args)
    volume = read_volume(args.input, volume_index=args.volume, series=args.series)
    if volume.is_label_map:
        raise MedsegError(f"'{volume.name}' looks like a label map, not an image to explain")
    image = volume.layer_data()
    problems = scan_problems(image, volume.geometry.layer_spacing, model.card, volume.modality,
                             volume.modality_guessed, volume.info.get("dicom", {}).get("BodyPartExamined"))
    if problems and not args.force:
        raise MedsegError(f"{problems[0]}; pass --force to explain it anyway")
    region = None
    if args.region:
        mask = read_volume(args.region)
        if mask.geometry.file_shape != volume.geometry.file_shape:
            raise MedsegError(f"the region '{Path(args.region).name}' has shape {mask.geometry.file_shape}, but "
                              f"the scan has {volume.geometry.file_shape}")
        region = volume.geometry.to_layer(mask.data) > 0
    result = explain(image, volume.geometry.layer_affine_ras, model, args.method, target=args.target,
                     layer=args.layer, channel=args.channel, region=region, settings=settings,
                     progress=_stderr_progress("explain", args.quiet))
    outputs = [map_file(args.output, result.maps, volume.geometry)]
    regions = uncertain_regions(result.map, volume.geometry.layer_affine_ras)
    inverse = np.linalg.inv(volume.geometry.affine_ras)
    for entry in regions:  # the centre as a voxel of the input file, too
        entry["centre_file_voxel"] = [round(float(v), 2) for v in (inverse @ np.r_[entry["centre_ras_mm"], 1])[:3]]
    if args.regions:
        text = json.dumps({"method": args.method, "map": result.names, "model": model.title, "regions": regions},
                          indent=2)
        outputs.append((Path(args.regions), lambda tmp: Path(tmp).write_text(text), ".json"))
    write_files(outputs)
    _warn(volume.warnings + problems)
    print(f"wrote {Path(args.output).name} ({', '.join(result.names)}; {model.title}; values "
          f"{float(result.maps.min()):.3g} to {float(result.maps.max()):.3g})")
    if args.regions:
        print(f"wrote {Path(args.regions).name} ({len(regions)} regions)")
    return 0


def _cmd_train(args) -> int:
    from pathlib import Path

    from .core.devices import pick_device
    from .core.models import save_model
    from .core.network import AttentionUNet3D
    from .core.outputs import check_outputs
    from .core.training import (Augmentation, DatasetError, TrainingConfig, config_faults, evaluate, grid_case,
                                new_card, read_dataset, train)

    output = Path(args.output)
    if not output.is_dir():
        raise MedsegError(f"the output folder '{output.name}' does not exist (create it first)")
    target = output / f"{args.name}.safetensors"
    check_outputs({"-o": target}, [args.data, args.val_data, args.resume] + _model_inputs(args.init))
    config = TrainingConfig(steps=args.steps, batch_size=args.batch_size, patch_size=tuple(args.patch_size),
                            learning_rate=args.lr, seed=args.seed, device=args.device,
                            augmentation=Augmentation(max_rotation_deg=40.0, scale_range=(0.85, 1.2),
                                                      max_shift_mm=args.max_shift_mm,
                                                      synthesis_probability=args.synthesis_probability),
                            checkpoint=str(output / f"{args.name}.checkpoint.pt") if args.checkpoint_every else None,
                            checkpoint_every=args.checkpoint_every, resume=args.resume)
    if args.init:
        model = _registry(args).load(args.init, for_training=True)
        network, roi_network = model.network, model.roi_network
        card = model.card.replace(name=args.name, version=args.version)
        if args.postprocessing:
            card = card.replace(pipeline={**card.pipeline.to_dict(), "postprocessing": list(args.postprocessing)})
    else:
        if any(c <= 0 for c in args.channels) or len(args.channels) < 2:
            raise MedsegError(f"--channels needs two or more positive widths, got {args.channels}")
        network, roi_network, card = None, None, None
    divisor = int(getattr(network, "divisor", 2 ** (len(args.channels) - 1)))
    faults = config_faults(config, divisor, tuple(args.spacing))
    if faults:
        raise DatasetError(faults)
    pick_device(args.device)
    dataset = read_dataset(args.data, progress=_stderr_progress("read"))
    validation = read_dataset(args.val_data) if args.val_data else None
    if network is None:
        network = AttentionUNet3D(1, len(dataset.label_names), tuple(args.channels))
        card = new_card(args.name, args.version, network, dataset.label_names, dataset.modality,
                        tuple(args.spacing), tuple(args.patch_size), tuple(args.postprocessing))
    elif len(dataset.label_names) != card.n_classes:
        raise MedsegError(f"the dataset names {len(dataset.label_names)} labels but the model "
                          f"{card.title} has {card.n_classes}")
    cases = [grid_case(case, card, roi_network) for case in dataset.cases]
    summary = train(network, card, cases, config, log=lambda line: _say(line))
    provenance = dict(card.provenance, cases=[c.name for c in dataset.cases], training=summary,
                      data=args.data_description or f"dataset folder '{Path(args.data).name}'")
    if args.init:
        provenance["initialised_from"] = Path(str(args.init)).name
    card = card.replace(provenance=provenance)
    from .core.models import Model

    if validation is not None:
        metrics = evaluate(Model(network, card, None, roi_network), validation.cases)
        card = card.replace(metrics={"held_out": metrics})
        _say(f"held-out Dice: {json.dumps(metrics)}")
    path = save_model(target, network, card, roi_network)
    print(f"wrote {path.name} into {path.parent.name}/")
    return 0


def _cmd_models_list(args) -> int:
    entries = _registry(args).entries()
    if args.json:
        print(json.dumps([e.summary() for e in entries], indent=2))
        return 0
    if not entries:
        print("no models installed")
        return 0
    print(f"{'name':<20} {'version':<10} {'source':<8} {'modality':<8} {'labels':<22} held-out Dice (model card)")
    for entry in entries:
        summary = entry.summary()
        mark = "*" if entry.current else " "
        print(f"{entry.name:<20} {entry.version + mark:<10} {entry.source:<8} {summary['modality'] or '':<8} "
              f"{', '.join(summary['labels']):<22} {_dice_summary(entry.card.metrics)}")
    print("* = the version used when only the name is given")
    return 0


def _dice_summary(metrics: dict) -> str:
    """The card's held-out figures in one line: each is stored once, in the card."""
    rows = metrics.get("evaluation") or []
    if rows:
        values = [row["dice"] for row in rows if "dice" in row]
        return f"{min(values):.3f}-{max(values):.3f} on {len(values)} rows ({metrics.get('date', 'undated')})"
    held_out = metrics.get("held_out") or metrics
    mean = held_out.get("mean_dice") if isinstance(held_out, dict) else None
    return f"{mean:.3f} mean" if isinstance(mean, (int, float)) else "-"


def _cmd_models_show(args) -> int:
    model_path = _registry(args).resolve(args.model)
    from .core.models import read_model_file

    _state, card = read_model_file(model_path)
    print(json.dumps(card.to_dict(), indent=2))
    return 0


def _cmd_models_import(args) -> int:
    entry, added = _registry(args).import_model(args.path)
    if added:
        print(f"imported {entry.name} v{entry.version} into {entry.path.parent.name}/")
    else:
        print(f"{entry.name} v{entry.version} is already installed ({entry.source}, same content hash); "
              "nothing was imported")
    return 0


def _cmd_models_convert(args) -> int:
    from pathlib import Path

    from .core.convert import convert_deepbet

    registry = _registry(args)
    for entry in registry.entries():
        if entry.name == args.name and entry.version == args.version:
            raise MedsegError(f"{args.name} {args.version} is already installed ({entry.source}); "
                              "pass --name or --version to add another copy")
    target = registry.user_dir / args.name / f"{args.version}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    card = convert_deepbet(target, source=args.source, name=args.name, version=args.version,
                           half_precision=True)
    print(f"converted {card.provenance['source']} into {card.title} ({Path(target).parent.name}/{target.name})")
    return 0


def _input_error(exc) -> str:
    if isinstance(exc, MultiVolumeError):
        return f"{exc} (pass --volume N)"
    if isinstance(exc, MultipleSeriesError):
        return f"{exc} (pass --series N)"
    return str(exc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-medseg", formatter_class=_Formatter,
        description="Headless tools of napari-medseg: scan info, segmentation, training, models.",
    )
    from . import __version__
    from .core.defaults import DEFAULT_OVERLAP, DEVICE_HELP, DEVICES

    parser.add_argument("--version", action="version", version=f"napari-medseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", formatter_class=_Formatter,
                          help="print a scan's geometry and intensity summary (no patient data)")
    _add_input_options(info)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)

    predict = sub.add_parser("predict", formatter_class=_Formatter,
                             help="segment a scan; the mask is written in the scan's geometry")
    _add_input_options(predict)
    predict.add_argument("-o", "--output", required=True, metavar="OUT.nii.gz",
                         help="label mask to write (.nii.gz, .nii, .nrrd, .mha); its folder must exist")
    predict.add_argument("--model", default=None, metavar="NAME|PATH",
                         help="model name (NAME or NAME@VERSION) or model file; default: brain-t1")
    predict.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    predict.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP, metavar="F",
                         help="minimum overlap between windows, 0 <= F < 1")
    predict.add_argument("--tta", action="store_true", help="test-time augmentation by mirroring (4x time)")
    predict.add_argument("--probabilities", default=None, metavar="OUT.nii.gz",
                         help="also write per-class probabilities (4D float, classes last)")
    predict.add_argument("--force", action="store_true",
                         help="segment a scan that the model card says is out of scope (another modality "
                              "or body part)")
    predict.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    predict.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    predict.set_defaults(func=_cmd_predict)

    explain = sub.add_parser("explain", formatter_class=_Formatter,
                             help="an explanation or uncertainty map, in the scan's geometry",
                             description="Write a float map in the input's geometry that shows why the model "
                                         "decided (attention gates, Grad-CAM, a layer's activation) or where it is "
                                         "unsure (entropy, TTA variance); --regions lists the connected "
                                         "high-value regions with their centres in patient mm.")
    _add_input_options(explain)
    explain.add_argument("--method", required=True, choices=["attention", "gradcam", "entropy", "tta", "activation"],
                         help="what to map")
    explain.add_argument("--class", dest="target", default=None, metavar="NAME",
                         help="Grad-CAM's target class, by name or value (default: the first foreground class)")
    explain.add_argument("--layer", default=None, metavar="NAME",
                         help="Grad-CAM or activation layer (default: the last decoder block); for attention, one gate "
                              "(default: every gate, as a 4D map)")
    explain.add_argument("--channel", type=int, default=0, metavar="N", help="the activation's channel")
    explain.add_argument("--region", default=None, metavar="MASK",
                         help="a mask on the scan's grid restricting Grad-CAM's target (default: the predicted mask)")
    explain.add_argument("--model", default=None, metavar="NAME|PATH",
                         help="model name (NAME or NAME@VERSION) or model file; default: brain-t1")
    explain.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    explain.add_argument("-o", "--output", required=True, metavar="MAP.nii.gz", help="the map to write")
    explain.add_argument("--regions", default=None, metavar="OUT.json",
                         help="also write the connected high-value regions (volume, centre in mm) as JSON")
    explain.add_argument("--force", action="store_true", help="explain a scan outside the model's scope")
    explain.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    explain.set_defaults(func=_cmd_explain)

    train = sub.add_parser("train", formatter_class=_Formatter,
                           help="train a model on an MSD / nnU-Net dataset folder",
                           description="Train a segmentation model. Every argument and the whole dataset are "
                                       "checked before training starts; each fault is reported on its own line.")
    train.add_argument("--data", required=True, metavar="DIR", help="folder with dataset.json, imagesTr/, labelsTr/")
    train.add_argument("-o", "--output", required=True, metavar="MODEL_DIR",
                       help="existing folder for NAME.safetensors (and checkpoints)")
    train.add_argument("--name", default="model", help="model name (letters, digits, - _ .)")
    train.add_argument("--version", default="1.0.0", help="model version written into the card")
    train.add_argument("--steps", type=int, default=1000, help="training steps (each one batch)")
    train.add_argument("--batch-size", type=int, default=1, help="crops per step")
    train.add_argument("--patch-size", type=int, nargs=3, default=[80, 96, 80], metavar=("D", "H", "W"),
                       help="training crop in voxels of the network grid; each a multiple of the network's "
                            "divisor (8 for the default four levels)")
    train.add_argument("--spacing", type=float, nargs=3, default=[2.0, 2.0, 2.0], metavar=("MM", "MM", "MM"),
                       help="voxel size the model works at (a new model only)")
    train.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32, 64],
                       help="feature widths per level of a new attention U-Net, finest first")
    train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle schedule)")
    train.add_argument("--seed", type=int, default=0, help="random seed (training is reproducible)")
    train.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    train.add_argument("--max-shift-mm", type=float, default=25.0,
                       help="random shift of the training crops from the labelled structure's centre")
    train.add_argument("--synthesis-probability", type=float, default=0.4,
                       help="share of samples with random tissue intensities (SynthStrip-style)")
    train.add_argument("--postprocessing", nargs="*", default=[],
                       choices=["inside_body", "largest_component", "fill_holes"],
                       help="clean-up steps recorded in the model card and applied at every prediction")
    train.add_argument("--val-data", default=None, metavar="DIR", help="held-out cases (same layout) for Dice")
    train.add_argument("--init", default=None, metavar="NAME|PATH",
                       help="start from this model's weights, architecture and pipeline")
    train.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                       help="write MODEL_DIR/NAME.checkpoint.pt every N steps (0: never)")
    train.add_argument("--resume", default=None, metavar="CHECKPOINT",
                       help="continue an interrupted run from its checkpoint (same arguments otherwise)")
    train.add_argument("--data-description", default=None, help="provenance text stored in the model card")
    train.set_defaults(func=_cmd_train)

    models = sub.add_parser("models", formatter_class=_Formatter, help="list, show, import or convert models")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = models_sub.add_parser("list", formatter_class=_Formatter,
                                    help="list the available models and versions")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=_cmd_models_list)
    show = models_sub.add_parser("show", formatter_class=_Formatter,
                                 help="print a model's card (pipeline, provenance, metrics) as JSON")
    show.add_argument("model", metavar="NAME|PATH", help="model name, NAME@VERSION or model file")
    show.set_defaults(func=_cmd_models_show)
    importing = models_sub.add_parser(
        "import", formatter_class=_Formatter,
        help="verify a model file and add it to your models",
        description="Verify a model file (safetensors, or a weights-only .pt with a card) and copy it into "
                    "your model folder as a new version, made current. A file whose content is already "
                    "installed is not imported twice.")
    importing.add_argument("path", metavar="FILE", help="the model file to import")
    importing.set_defaults(func=_cmd_models_import)
    convert = models_sub.add_parser(
        "convert", formatter_class=_Formatter,
        help="convert a published network into a model (deepbet)",
        description="Convert deepbet's two brain-extraction networks (Fisch et al. 2024, MIT) into one model "
                    "file in your model folder. Only weights whose SHA-256 matches a known deepbet release "
                    "are converted.")
    convert.add_argument("source_package", choices=["deepbet"], help="the published network to convert")
    convert.add_argument("--source", default=None, metavar="DIR",
                         help="folder with bbox_model.pt and model.pt; default: the installed deepbet package")
    convert.add_argument("--name", default="brain-t1", help="name of the new model")
    convert.add_argument("--version", default="2.0.0", help="version of the new model")
    convert.set_defaults(func=_cmd_models_convert)
    return parser


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
            _say(f"napari-medseg: error: {line}")
    except KeyboardInterrupt:
        _say("napari-medseg: interrupted")
        return 130
    except BrokenPipeError:  # the reader of our output went away (e.g. `| head`): not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MemoryError:
        _say("napari-medseg: error: not enough memory for this volume")
    except OSError as exc:
        _say(f"napari-medseg: error: {exc.strerror or exc}")
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
