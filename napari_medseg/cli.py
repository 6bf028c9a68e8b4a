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


def _workspace(args, create: bool = True):
    from .core.workspace import Workspace

    return Workspace(args.workspace, create=create) if getattr(args, "workspace", None) else None


def _registry(args):
    from .core.models import ModelRegistry

    workspace = _workspace(args, create=False)
    return workspace.registry if workspace is not None else ModelRegistry()


def _cmd_predict(args) -> int:
    from pathlib import Path

    from .core.domain import image_for_model
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
    image, problems = image_for_model(volume, model.card, "segment")
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
    from .core.models import ModelRegistry

    workspace = _workspace(args, create=False)
    if workspace is not None and args.model is None:
        return workspace.load_model()  # the workspace's promoted version
    return ModelRegistry().load(args.model)


def _cmd_explain(args) -> int:
    from pathlib import Path

    import numpy as np

    from .core.domain import image_for_model
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
    image, problems = image_for_model(volume, model.card, "explain")
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


def _cmd_queue_submit(args) -> int:
    from pathlib import Path

    from .core.io import read_volume

    import numpy as np

    scan = read_volume(args.image, volume_index=args.volume, series=args.series)
    masks = {}
    for option, path in (("LABEL", args.label), ("--prediction", args.prediction)):
        if path is None:
            continue
        mask = read_volume(path)
        # Both must lie on the scan's grid: the same voxels in patient space, in layer order.
        if mask.geometry.layer_shape != scan.geometry.layer_shape or \
                not np.allclose(mask.geometry.world_affine, scan.geometry.world_affine, atol=1e-3):
            raise MedsegError(f"{option} '{Path(path).name}' is not on the scan's grid (shape "
                              f"{mask.geometry.file_shape}, the scan's {scan.geometry.file_shape})")
        values = np.asarray(mask.layer_data())
        if not np.issubdtype(values.dtype, np.integer):
            if not np.allclose(values, np.round(values)):
                raise MedsegError(f"{option} '{Path(path).name}' holds fractions; a label map holds whole numbers")
            values = np.round(values).astype(np.int16)
        masks[option] = values
    workspace = _workspace(args)
    item = workspace.submit(scan.layer_data(), scan.geometry, masks["LABEL"], masks.get("--prediction"),
                            model=args.model_version or "", reviewer=args.reviewer, note=args.note, split=args.split)
    print(f"queued {item.id[:12]} ({item.split}, {item.edited_voxels} edited voxels) in "
          f"workspace '{workspace.folder.name}'")
    return 0


def _cmd_queue_list(args) -> int:
    workspace = _workspace(args, create=False)
    items = workspace.items()
    if args.json:
        print(json.dumps([item.summary() for item in items], indent=2))
        return 0
    if not items:
        print("the queue is empty")
        return 0
    print(f"{'id':<14} {'created':<26} {'status':<9} {'split':<11} {'edited':>8}  reviewer / note")
    for item in items:
        print(f"{item.id[:12]:<14} {item.created:<26} {item.status:<9} {item.split:<11} {item.edited_voxels:>8}  "
              f"{item.reviewer}{' / ' + item.note if item.note else ''}")
    return 0


def _cmd_queue_reject(args) -> int:
    workspace = _workspace(args, create=False)
    items = [workspace.item(item_id) for item_id in args.items]
    workspace.set_status([item.id for item in items], "queued" if args.restore else "rejected")
    print(f"{len(items)} item(s) {'back in the queue' if args.restore else 'rejected: never trained on'}")
    return 0


def _cmd_recover(args) -> int:
    from .core import autosave
    from .core.io import write_mask
    from .core.outputs import check_outputs

    root = autosave.root_of(args.workspace)
    if args.list:
        sessions = autosave.list_sessions(root)
        if args.json:
            print(json.dumps([session.to_dict() for session in sessions], indent=2))
            return 0
        if not sessions:
            print("no autosaved edits to recover")
            return 0
        print(f"{'id':<26} {'last autosave':<26} {'state':<10} {'edited':>8}  scan")
        for session in sessions:
            scan = session.scan
            state = "in use" if session.owner_alive else session.state
            print(f"{session.id:<26} {session.updated:<26} {state:<10} {session.edited_voxels:>8}  "
                  f"{scan.get('sha256', '?')[:12]} {'x'.join(map(str, session.shape))} voxels, "
                  f"{' x '.join(f'{s:g}' for s in scan.get('spacing_mm', []))} mm")
        return 0
    if not args.id or not args.output:
        raise MedsegError("give an autosave ID and -o MASK (or --list to see them)")
    outputs = check_outputs({"-o": args.output})
    session = autosave.find_session(root, args.id)
    mask, meta = autosave.load_session(session.folder)
    geometry = autosave.session_geometry(meta)
    if geometry is None:
        raise MedsegError(f"autosave '{session.id}' did not record its scan's geometry")
    write_mask(outputs["-o"], mask, geometry)
    print(f"wrote {outputs['-o'].name}: the autosave of {session.updated} ({session.edited_voxels} edited voxels)")
    return 0


def _cmd_worklist_add(args) -> int:
    from .core.worklist import Worklist

    worklist = Worklist(_workspace(args))
    added, known = worklist.add(args.paths)
    failed = [case for case in added if case.status == "failed"]
    for line in known:
        _say(f"note: {line}")
    for case in failed:
        _say(f"warning: {case.name}: {case.reason}")
    if args.json:
        print(json.dumps([case.summary() for case in added], indent=2))
    else:
        print(f"added {len(added)} case(s) to workspace '{worklist.workspace.folder.name}'"
              + (f", {len(failed)} of them failed (see above)" if failed else ""))
    return 0


def _cmd_worklist_run(args) -> int:
    import os

    from .core.inference import InferenceSettings
    from .core.worklist import load_worklist_model, run_worklist

    settings = InferenceSettings(device=args.device, overlap=args.overlap, tta=args.tta)
    # Under torchrun only rank 0 opens the workspace: its SQLite index is never shared across machines.
    writer = os.environ.get("RANK", "0") == "0"
    workspace = _workspace(args, create=False) if writer else None
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    model = None if distributed else load_worklist_model(workspace, args.model)
    summary = run_worklist(workspace, model, model_spec=args.model, settings=settings, limit=args.limit,
                           progress=_stderr_progress("worklist run", args.quiet or not writer))
    if not writer:
        return 0
    for name, reason in summary.failures:
        _say(f"warning: {name} failed: {reason}")
    print(f"predicted {summary.predicted} case(s), {summary.failed} failed, {summary.remaining} still new "
          f"({summary.seconds:.1f} s, {summary.world} process(es))")
    return 0


def _cmd_worklist_list(args) -> int:
    from .core.worklist import Worklist

    worklist = Worklist(_workspace(args, create=False))
    cases = worklist.cases(order=args.order, status=args.status)
    if args.json:
        print(json.dumps([case.summary() for case in cases], indent=2))
        return 0
    if not cases:
        print("the worklist is empty")
        return 0
    print(f"{'id':<18} {'status':<10} {'uncertainty':>11}  {'model':<22} name / volumes / reason")
    for case in cases:
        score = f"{case.score:.4f}" if case.score is not None else "-"
        detail = case.reason or "; ".join(filter(None, [case.volume_text()] + case.warnings))
        print(f"{case.id:<18} {case.status:<10} {score:>11}  {case.model[:22]:<22} {case.name}"
              + (f"  ({detail})" if detail else ""))
    return 0


def _cmd_worklist_export(args) -> int:
    from .core.worklist import export_worklist

    summary = export_worklist(_workspace(args, create=False), args.output, dicom_seg=args.dicom_seg,
                              progress=_stderr_progress("worklist export", args.quiet))
    _warn(summary.problems)
    print(f"exported {summary.masks} mask(s)" + (f" and {summary.segs} DICOM SEG object(s)" if args.dicom_seg else "")
          + f", worklist.csv and worklist.json for {len(summary.table)} case(s)")
    return 0


def _cmd_finetune(args) -> int:
    from .core.finetune import fine_tune

    workspace = _workspace(args, create=False)
    progress = _json_progress() if args.progress == "json" else _stderr_progress("finetune", args.quiet)
    result = fine_tune(workspace, steps=args.steps, device=args.device, tolerance=args.tolerance,
                       replay=args.replay, learning_rate=args.lr, batch_size=args.batch_size,
                       patch_size=tuple(args.patch_size) if args.patch_size else None, seed=args.seed,
                       base=args.base, progress=progress, log=None if args.quiet else _say)
    if not result.version:  # a helper process under torchrun
        return 0
    if args.progress == "json":
        print(json.dumps({"result": result.summary()}), flush=True)
    else:
        print(f"{result.version}: {'promoted' if result.promoted else 'kept out'}; {result.reason}")
    return 0


def _json_progress():
    def report(fraction: float, message: str) -> None:
        print(json.dumps({"progress": round(float(fraction), 4), "message": scrub(message)}), flush=True)

    return report


def _cmd_models_rollback(args) -> int:
    workspace = _workspace(args, create=False)
    workspace.rollback(args.to)
    print(f"workspace '{workspace.folder.name}' now uses {workspace.model_name} {args.to}")
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
    workspace = _workspace(args, create=False)
    if workspace is not None:
        versions = workspace.versions()
        if args.json:
            print(json.dumps(versions, indent=2))
            return 0
        print(f"workspace '{workspace.folder.name}', model {workspace.model_name or '(none yet)'}")
        for v in versions:
            dice = v["metrics"].get("validation_dice_after", v["metrics"].get("validation_dice_before"))
            print(f"  {v['version']:<5}{'*' if v['current'] else ' '} {v['status']:<9} {v['created']}  "
                  f"{'validation Dice ' + format(dice, '.4f') if dice is not None else ''}  {v['reason']}")
        print("* = the version predictions use")
        return 0
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
    predict.add_argument("--workspace", default=None, metavar="W",
                         help="use this workspace's promoted model version (unless --model names another)")
    predict.add_argument("--force", action="store_true",
                         help="segment a scan that the model card says is out of scope (another modality "
                              "or body part)")
    predict.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    predict.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    predict.set_defaults(func=_cmd_predict)

    queue = sub.add_parser("queue", formatter_class=_Formatter, help="submit corrections to a workspace, list them")
    queue_sub = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    submit = queue_sub.add_parser("submit", formatter_class=_Formatter,
                                  help="store a corrected label (and its scan, de-identified) in the queue")
    submit.add_argument("image", metavar="IMAGE", help="the scan: any format the readers take, a DICOM folder too")
    submit.add_argument("label", metavar="LABEL", help="the corrected label on the scan's grid")
    submit.add_argument("--workspace", required=True, metavar="W", help="workspace folder (created if missing)")
    submit.add_argument("--prediction", default=None, metavar="P", help="the model's original prediction")
    submit.add_argument("--reviewer", default="", metavar="NAME", help="who corrected it")
    submit.add_argument("--note", default="", metavar="TEXT", help="a free-text note")
    submit.add_argument("--split", default="auto", choices=["auto", "train", "validation"],
                        help="validation items are never trained on; auto puts every fifth item there")
    submit.add_argument("--model-version", default=None, metavar="NAME",
                        help="the model whose prediction was corrected (recorded)")
    submit.add_argument("--volume", type=int, default=None, help="for 4D scans: which volume")
    submit.add_argument("--series", default=None, help="for folders with several DICOM series: which one")
    submit.set_defaults(func=_cmd_queue_submit)
    queue_list = queue_sub.add_parser("list", formatter_class=_Formatter, help="list the queued corrections")
    queue_list.add_argument("--workspace", required=True, metavar="W", help="workspace folder")
    queue_list.add_argument("--json", action="store_true", help="machine-readable output")
    queue_list.set_defaults(func=_cmd_queue_list)
    reject = queue_sub.add_parser("reject", formatter_class=_Formatter,
                                  help="keep items out of fine-tuning (a correction that should not teach)")
    reject.add_argument("items", nargs="+", metavar="ID", help="item ids (a unique start is enough)")
    reject.add_argument("--workspace", required=True, metavar="W", help="workspace folder")
    reject.add_argument("--restore", action="store_true", help="put rejected items back in the queue")
    reject.set_defaults(func=_cmd_queue_reject)

    finetune = sub.add_parser("finetune", formatter_class=_Formatter,
                              help="learn a new model version from the queued corrections",
                              description="Fine-tune the workspace's current model on its queued corrections (plus "
                                          "a replay of earlier ones). The new version is promoted only if its Dice "
                                          "on the workspace's validation items does not fall by more than the "
                                          "tolerance. Runs under torchrun too (PyTorch DDP, gloo on the CPU, NCCL "
                                          "on GPUs).")
    finetune.add_argument("--workspace", required=True, metavar="W", help="workspace folder")
    finetune.add_argument("--steps", type=int, default=50, help="training steps")
    finetune.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    finetune.add_argument("--tolerance", type=float, default=0.01,
                          help="the largest drop of validation Dice that still promotes the new version")
    finetune.add_argument("--replay", type=int, default=4, help="earlier accepted corrections replayed")
    finetune.add_argument("--lr", type=float, default=1e-5, help="learning rate (Adam)")
    finetune.add_argument("--batch-size", type=int, default=1, help="crops per step (over all processes)")
    finetune.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                          help="training crop (default: the card's patch, at most 128 a side)")
    finetune.add_argument("--seed", type=int, default=0, help="random seed")
    finetune.add_argument("--base", default=None, metavar="NAME|PATH",
                          help="the model a new workspace starts from (default: brain-t1)")
    finetune.add_argument("--progress", choices=["text", "json"], default="text",
                          help="json: one JSON line per progress report on stdout (for the widget)")
    finetune.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    finetune.set_defaults(func=_cmd_finetune)

    worklist = sub.add_parser("worklist", formatter_class=_Formatter,
                              help="a review worklist: add cases, predict them ahead, list, export",
                              description="Cases live in the workspace's index. 'run' predicts every new case with "
                                          "the model loaded once (resumable; under torchrun each process takes a "
                                          "shard and rank 0 writes); 'list' orders them most doubtful first.")
    worklist_sub = worklist.add_subparsers(dest="worklist_command", required=True, metavar="ACTION")
    adding = worklist_sub.add_parser("add", formatter_class=_Formatter,
                                     help="add scans: folders (searched recursively), dataset.json, CSV, files")
    adding.add_argument("paths", nargs="+", metavar="PATH")
    adding.add_argument("--workspace", required=True, metavar="W", help="workspace folder (created if needed)")
    adding.add_argument("--json", action="store_true", help="the added cases as JSON")
    adding.set_defaults(func=_cmd_worklist_add)
    running = worklist_sub.add_parser("run", formatter_class=_Formatter, help="predict every new case")
    running.add_argument("--workspace", required=True, metavar="W", help="workspace folder")
    running.add_argument("--model", default=None, metavar="NAME|PATH",
                         help="model name or file (default: the workspace's promoted version, else brain-t1)")
    running.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    running.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP, metavar="F",
                         help="minimum overlap between windows, 0 <= F < 1")
    running.add_argument("--tta", action="store_true", help="test-time augmentation by mirroring (4x time)")
    running.add_argument("--limit", type=int, default=None, metavar="N", help="predict at most N cases")
    running.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    running.set_defaults(func=_cmd_worklist_run)
    listing_cases = worklist_sub.add_parser("list", formatter_class=_Formatter, help="list the cases")
    listing_cases.add_argument("--workspace", required=True, metavar="W", help="workspace folder")
    listing_cases.add_argument("--order", default="uncertainty", choices=["uncertainty", "name", "date"],
                               help="most doubtful first, by name, or newest scan file first")
    listing_cases.add_argument("--status", default=None,
                               choices=["new", "predicted", "in review", "accepted", "corrected", "skipped", "failed"],
                               help="only cases with this status")
    listing_cases.add_argument("--json", action="store_true", help="machine-readable output")
    listing_cases.set_defaults(func=_cmd_worklist_list)
    exporting = worklist_sub.add_parser("export", formatter_class=_Formatter,
                                        help="masks in each scan's geometry, a CSV/JSON table, DICOM SEG")
    exporting.add_argument("--workspace", required=True, metavar="W", help="workspace folder")
    exporting.add_argument("-o", "--output", required=True, metavar="DIR", help="an existing folder")
    exporting.add_argument("--dicom-seg", action="store_true",
                           help="also a DICOM SEG object for each DICOM case, referencing its source series")
    exporting.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    exporting.set_defaults(func=_cmd_worklist_export)

    recover = sub.add_parser(
        "recover", formatter_class=_Formatter, help="list or restore masks autosaved by the viewer",
        description="Masks edited in the viewer are autosaved to the workspace within 2 s of each change. "
                    "After napari ends without a clean close, list them and write one back as a mask in its "
                    "scan's geometry.")
    recover.add_argument("id", nargs="?", metavar="ID", help="the autosave to restore (its id, or the start of it)")
    recover.add_argument("-o", "--output", metavar="MASK", help="where to write the restored mask (.nii.gz, .nrrd, ...)")
    recover.add_argument("--list", action="store_true", help="list the autosaves")
    recover.add_argument("--json", action="store_true", help="with --list: JSON")
    recover.add_argument("--workspace", metavar="W", default=None,
                         help="workspace folder (default: the one the viewer uses)")
    recover.set_defaults(func=_cmd_recover)

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
    listing.add_argument("--workspace", default=None, metavar="W", help="list a workspace's versions instead")
    listing.set_defaults(func=_cmd_models_list)
    rollback = models_sub.add_parser("rollback", formatter_class=_Formatter,
                                     help="make an earlier version of a workspace's model the one in use")
    rollback.add_argument("--workspace", required=True, metavar="W", help="workspace folder")
    rollback.add_argument("--to", required=True, metavar="vN", help="the version to use")
    rollback.set_defaults(func=_cmd_models_rollback)
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
    finally:
        _leave_process_group()
    return EXIT_USER_ERROR


def _leave_process_group() -> None:
    """Under torchrun, leave the process group cleanly (gloo aborts a process that does not)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
