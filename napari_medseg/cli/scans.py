"""``info``, ``predict``, ``explain`` and ``recover``: one scan at a time."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.defaults import DEVICE_HELP, DEVICES
from ..core.errors import MedsegError, MultipleSeriesError, OutOfScope
from ..core.privacy import scrub
from ._common import (Formatter, add_inference_options, add_input_options, add_volume_options, inference_settings,
                      load_model_of, model_inputs, printed_json_or_empty, stderr_progress, warn)


def add_parsers(sub) -> None:
    info = sub.add_parser("info", formatter_class=Formatter,
                          help="print a scan's geometry and intensity summary (no patient data)")
    add_input_options(info)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)

    predict = sub.add_parser("predict", formatter_class=Formatter,
                             help="segment a scan; the mask is written in the scan's geometry")
    predict.add_argument("input", metavar="INPUT", nargs="+",
                         help="NIfTI, NRRD or MetaImage file, or a DICOM folder; a model of several input "
                              "sequences takes one per channel, in the card's order (predict T1 T2 -o OUT); "
                              "the mask is on the first one's grid")
    add_volume_options(predict)
    predict.add_argument("-o", "--output", required=True, metavar="OUT.nii.gz",
                         help="label mask to write (.nii.gz, .nii, .nrrd, .mha); its folder must exist")
    predict.add_argument("--model", default=None, metavar="NAME|PATH",
                         help="model name (NAME or NAME@VERSION) or model file; default: brain-t1")
    add_inference_options(predict)
    predict.add_argument("--probabilities", default=None, metavar="OUT.nii.gz",
                         help="also write per-class probabilities (4D float, classes last)")
    predict.add_argument("--workspace", default=None, metavar="W",
                         help="use this workspace's promoted model version (unless --model names another)")
    predict.add_argument("--force", action="store_true",
                         help="segment a scan that the model card says is out of scope (another modality "
                              "or body part)")
    predict.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    predict.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    predict.set_defaults(func=cmd_predict)

    refine = sub.add_parser("refine", formatter_class=Formatter,
                            help="re-decide one label from clicks, strokes and a box (no model needed)")
    add_input_options(refine)
    refine.add_argument("--prompts", required=True, metavar="PROMPTS.json",
                        help='{"points": [{"ras": [x, y, z], "positive": true}, ...], "scribbles": "STROKES.nii.gz", '
                             '"box": {"ras_min": [...], "ras_max": [...]}}; points in RAS mm, in the order placed; '
                             "scribbles on the scan's grid, 1 = this label, 2 = not this label")
    refine.add_argument("--mask", default=None, metavar="CURRENT.nii.gz",
                        help="the mask before the prompts (default: nothing yet)")
    refine.add_argument("--label", type=int, default=1, metavar="N", help="the label the prompts decide")
    refine.add_argument("-o", "--output", required=True, metavar="OUT.nii.gz",
                        help="the mask with label N re-decided, on the input's grid")
    refine.add_argument("--force", action="store_true",
                        help="let the prompts take voxels of other labels (by default they are barriers)")
    refine.add_argument("--json", action="store_true", help="seconds spent and voxels changed, as JSON")
    refine.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    refine.set_defaults(func=cmd_refine)

    explain = sub.add_parser("explain", formatter_class=Formatter,
                             help="an explanation or uncertainty map, in the scan's geometry",
                             description="Write a float map in the input's geometry that shows why the model "
                                         "decided (attention gates, Grad-CAM, a layer's activation) or where it is "
                                         "unsure (entropy, TTA variance); --regions lists the connected "
                                         "high-value regions with their centres in patient mm.")
    from ..core.card import EXPLAIN_METHODS as METHODS  # not core.explain: the parser must not import torch

    add_input_options(explain)
    explain.add_argument("--method", required=True, choices=list(METHODS), help="what to map")
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
    explain.add_argument("--workspace", default=None, metavar="W",
                         help="use this workspace's promoted model version (unless --model names another)")
    explain.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    explain.add_argument("-o", "--output", required=True, metavar="MAP.nii.gz", help="the map to write")
    explain.add_argument("--regions", default=None, metavar="OUT.json",
                         help="also write the connected high-value regions (volume, centre in mm) as JSON")
    explain.add_argument("--force", action="store_true", help="explain a scan outside the model's scope")
    explain.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    explain.set_defaults(func=cmd_explain)

    recover = sub.add_parser(
        "recover", formatter_class=Formatter, help="list or restore masks autosaved by the viewer",
        description="Masks edited in the viewer are autosaved to the workspace within 2 s of each change. "
                    "After napari ends without a clean close, list them and write one back as a mask in its "
                    "scan's geometry.")
    recover.add_argument("id", nargs="?", metavar="ID", help="the autosave to restore (its id, or the start of it)")
    recover.add_argument("-o", "--output", metavar="MASK", help="where to write the restored mask (.nii.gz, .nrrd, ...)")
    recover.add_argument("--list", action="store_true", help="list the autosaves")
    recover.add_argument("--json", action="store_true", help="with --list: JSON")
    recover.add_argument("--workspace", metavar="W", default=None,
                         help="workspace folder (default: the one the viewer uses)")
    recover.set_defaults(func=cmd_recover)


def cmd_info(args) -> int:
    from ..core.io import read_volume

    folder = Path(args.input).is_dir()
    try:
        volume = read_volume(args.input, volume_index=args.volume, series=args.series)
    except MultipleSeriesError as exc:
        # A study folder: the series list is the answer (choose one with --series N).
        listing = {"series": exc.series, "skipped": exc.skipped}
        if args.json:
            print(json.dumps(listing, indent=2))
        else:
            print_series(listing["series"], listing["skipped"])
            print(f"{len(exc.series)} series; pass --series N for one series' details")
        return 0
    summary = volume.describe()
    if args.json:
        extra = {"series": volume.info["series_in_folder"], "skipped": volume.info["skipped"]} if folder else {}
        print(json.dumps({**summary, **extra, "warnings": volume.warnings}, indent=2))
        return 0
    if folder:
        print_series(volume.info["series_in_folder"], [])
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
    warn(volume.warnings)
    return 0


def print_series(series: list, skipped: list) -> None:
    from ..core.dicom import describe_series

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


def _read_scan(args, action: str, path=None):
    from ..core.io import read_volume
    from ..core.predict import ScanImage

    volume = read_volume(path or args.input, volume_index=args.volume, series=args.series)
    return volume, ScanImage.from_volume(volume, action)


def cmd_predict(args) -> int:
    from ..core.io import MASK_SUFFIXES, NIFTI_SUFFIXES, map_file, mask_file
    from ..core.outputs import check_outputs, write_files
    from ..core.predict import predict_scan, stack_channels

    if not args.output.lower().endswith(MASK_SUFFIXES):
        raise MedsegError(f"cannot write '{args.output}': use .nii.gz, .nii, .nrrd or .mha")
    if args.probabilities and not args.probabilities.lower().endswith(NIFTI_SUFFIXES):
        raise MedsegError(f"cannot write probabilities to '{args.probabilities}': use .nii.gz or .nii")
    check_outputs({"-o": args.output, "--probabilities": args.probabilities},
                  list(args.input) + model_inputs(args.model))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        # The first scan is read while torch and the model load: its decompression overlaps them.
        first = pool.submit(_read_scan, args, "segment", args.input[0])
        settings = inference_settings(args)
        model = load_model_of(args)
        mismatch = model.card.channel_mismatch(len(args.input))
        if mismatch:  # before reading the others
            raise MedsegError(mismatch)
        read = [first.result()] + [_read_scan(args, "segment", path) for path in args.input[1:]]
    volume = read[0][0]
    scan = read[0][1] if len(read) == 1 else stack_channels([s for _v, s in read], model.card.channels)
    try:
        prediction = predict_scan(scan, model, settings, force=args.force,
                                  want_probabilities=args.probabilities is not None,
                                  progress=stderr_progress("predict", args.quiet))
    except OutOfScope as exc:
        raise MedsegError(f"{exc}; pass --force to segment it anyway") from None
    result = prediction.segmentation
    outputs = [mask_file(args.output, result.labels, volume.geometry)]
    if args.probabilities:
        outputs.append(map_file(args.probabilities, result.probabilities, volume.geometry))
    write_files(outputs)
    warn(prediction.warnings)
    rows = result.volume_rows()
    if args.json:
        print(json.dumps({"output": Path(args.output).name, "model": model.title, "volumes": rows,
                          "warnings": prediction.warnings,
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


def cmd_refine(args) -> int:
    import time

    import numpy as np

    from ..core.io import MASK_SUFFIXES, mask_file, read_volume
    from ..core.outputs import check_outputs, write_files
    from ..core.prompts import read_prompts, refine

    if not args.output.lower().endswith(MASK_SUFFIXES):
        raise MedsegError(f"cannot write '{args.output}': use .nii.gz, .nii, .nrrd or .mha")
    check_outputs({"-o": args.output}, [args.input, args.prompts, args.mask])
    began = time.perf_counter()
    volume = read_volume(args.input, volume_index=args.volume, series=args.series)
    geometry = volume.geometry
    prompts = read_prompts(args.prompts, geometry)
    mask = None
    if args.mask:
        current = read_volume(args.mask)
        if tuple(current.geometry.file_shape) != tuple(geometry.file_shape):
            raise MedsegError(f"the mask '{Path(args.mask).name}' has shape {tuple(current.geometry.file_shape)}, "
                              f"but the scan has {tuple(geometry.file_shape)}")
        mask = geometry.to_layer(np.rint(current.data).astype(np.int32))
        if mask.min() < 0 or mask.max() > 65535:
            raise MedsegError(f"the mask '{Path(args.mask).name}' holds values outside 0..65535")
    before = mask if mask is not None else np.zeros(geometry.layer_shape, np.uint16)
    labels, updates = refine(volume.layer_data(), geometry.layer_spacing, prompts.points, mask=mask,
                             label=args.label, strokes=prompts.strokes, box=prompts.box,
                             other_labels_fixed=not args.force, progress=stderr_progress("refine", args.quiet))
    write_files([mask_file(args.output, labels, geometry)])
    changed = int(np.count_nonzero(labels != before))
    seconds = time.perf_counter() - began
    if args.json:
        print(json.dumps({"output": Path(args.output).name, "label": args.label, "prompts": len(updates),
                          "voxels_changed": changed, "seconds": round(seconds, 3),
                          "seconds_per_prompt": [round(u.seconds, 4) for u in updates],
                          "label_voxels": int(np.count_nonzero(labels == args.label))}, indent=2))
    else:
        print(f"wrote {Path(args.output).name} (label {args.label}: {len(updates)} prompts, {changed} voxels "
              f"changed, {seconds:.2f} s)")
    return 0


def cmd_explain(args) -> int:
    import numpy as np

    from ..core.explain import explain, uncertain_regions
    from ..core.inference import InferenceSettings
    from ..core.io import NIFTI_SUFFIXES, map_file, read_volume
    from ..core.outputs import check_outputs, write_files
    from ..core.predict import scope_problems

    if not args.output.lower().endswith(NIFTI_SUFFIXES):
        raise MedsegError(f"cannot write maps to '{args.output}': use .nii.gz or .nii")
    if args.regions and not args.regions.lower().endswith(".json"):
        raise MedsegError(f"cannot write regions to '{args.regions}': use .json")
    check_outputs({"-o": args.output, "--regions": args.regions},
                  [args.input, args.region] + model_inputs(args.model))
    settings = InferenceSettings(device=args.device)
    model = load_model_of(args)
    volume, scan = _read_scan(args, "explain")
    problems = scope_problems(scan, model.card)
    if problems and not args.force:
        raise MedsegError(f"{problems[0]}; pass --force to explain it anyway")
    region = None
    if args.region:
        mask = read_volume(args.region)
        if mask.geometry.file_shape != volume.geometry.file_shape:
            raise MedsegError(f"the region '{Path(args.region).name}' has shape {mask.geometry.file_shape}, but "
                              f"the scan has {volume.geometry.file_shape}")
        region = volume.geometry.to_layer(mask.data) > 0
    result = explain(scan.data, volume.geometry.layer_affine_ras, model, args.method, target=args.target,
                     layer=args.layer, channel=args.channel, region=region, settings=settings,
                     progress=stderr_progress("explain", args.quiet))
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
    warn(volume.warnings + problems)
    print(f"wrote {Path(args.output).name} ({', '.join(result.names)}; {model.title}; values "
          f"{float(result.maps.min()):.3g} to {float(result.maps.max()):.3g})")
    if args.regions:
        print(f"wrote {Path(args.regions).name} ({len(regions)} regions)")
    return 0


def cmd_recover(args) -> int:
    from ..core import autosave
    from ..core.outputs import check_outputs

    root = autosave.root_of(args.workspace)
    if args.list:
        sessions = autosave.list_sessions(root)
        if printed_json_or_empty(args, sessions, lambda row: row.to_dict(), "no autosaved edits to recover"):
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
    recovered = autosave.recover_session(root, args.id, output=outputs["-o"])
    session = recovered.session
    print(f"wrote {outputs['-o'].name}: the autosave of {session.updated} ({session.edited_voxels} edited voxels)")
    return 0
