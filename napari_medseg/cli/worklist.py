"""``worklist``: add cases, predict them ahead, list them most doubtful first, export."""

from __future__ import annotations

import json

from ._common import (Formatter, add_inference_options, inference_settings, open_workspace, printed_json_or_empty,
                      say,                       stderr_progress, warn)


def add_parsers(sub) -> None:
    from ..core.worklist import ORDERS, STATUSES

    worklist = sub.add_parser("worklist", formatter_class=Formatter,
                              help="a review worklist: add cases, predict them ahead, list, export",
                              description="Cases live in the workspace's index. 'run' predicts every new case with "
                                          "the model loaded once (resumable; under torchrun each process takes a "
                                          "shard and rank 0 writes); 'list' orders them most doubtful first.")
    worklist_sub = worklist.add_subparsers(dest="worklist_command", required=True, metavar="ACTION")
    adding = worklist_sub.add_parser("add", formatter_class=Formatter,
                                     help="add scans: folders (searched recursively), dataset.json, CSV, files")
    adding.add_argument("paths", nargs="+", metavar="PATH")
    adding.add_argument("--workspace", required=True, metavar="W", help="workspace folder (created if needed)")
    adding.add_argument("--json", action="store_true", help="the added cases as JSON")
    adding.set_defaults(func=cmd_add)
    running = worklist_sub.add_parser("run", formatter_class=Formatter, help="predict every new case")
    running.add_argument("--workspace", required=True, metavar="W", help="workspace folder")
    running.add_argument("--model", default=None, metavar="NAME|PATH",
                         help="model name or file (default: the workspace's promoted version, else brain-t1)")
    add_inference_options(running)
    running.add_argument("--limit", type=int, default=None, metavar="N", help="predict at most N cases")
    running.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    running.set_defaults(func=cmd_run)
    listing = worklist_sub.add_parser("list", formatter_class=Formatter, help="list the cases")
    listing.add_argument("--workspace", required=True, metavar="W", help="workspace folder")
    listing.add_argument("--order", default="uncertainty", choices=list(ORDERS),
                         help="most doubtful first, by name, or newest scan file first")
    listing.add_argument("--status", default=None, choices=list(STATUSES), help="only cases with this status")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=cmd_list)
    exporting = worklist_sub.add_parser("export", formatter_class=Formatter,
                                        help="masks in each scan's geometry, a CSV/JSON table, DICOM SEG")
    exporting.add_argument("--workspace", required=True, metavar="W", help="workspace folder")
    exporting.add_argument("-o", "--output", required=True, metavar="DIR",
                           help="the export folder (created if needed; existing files are never overwritten)")
    exporting.add_argument("--dicom-seg", action="store_true",
                           help="also a DICOM SEG object for each DICOM case, referencing its source series")
    exporting.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    exporting.set_defaults(func=cmd_export)


def cmd_add(args) -> int:
    from ..core.worklist import Worklist

    worklist = Worklist(open_workspace(args))
    added, known = worklist.add(args.paths)
    failed = [case for case in added if case.status == "failed"]
    for line in known:
        say(f"note: {line}")
    for case in failed:
        say(f"warning: {case.name}: {case.reason}")
    if args.json:
        print(json.dumps([case.summary() for case in added], indent=2))
    else:
        print(f"added {len(added)} case(s) to workspace '{worklist.workspace.folder.name}'"
              + (f", {len(failed)} of them failed (see above)" if failed else ""))
    return 0


def cmd_run(args) -> int:
    import os

    from ..core.worklist import load_worklist_model, run_worklist

    settings = inference_settings(args)
    # Under torchrun only rank 0 opens the workspace: its SQLite index is never shared across machines.
    writer = os.environ.get("RANK", "0") == "0"
    workspace = open_workspace(args, create=False) if writer else None
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    model = None if distributed else load_worklist_model(workspace, args.model)
    summary = run_worklist(workspace, model, model_spec=args.model, settings=settings, limit=args.limit,
                           progress=stderr_progress("worklist run", args.quiet or not writer))
    if not writer:
        return 0
    for name, reason in summary.failures:
        say(f"warning: {name} failed: {reason}")
    print(f"predicted {summary.predicted} case(s), {summary.failed} failed, {summary.remaining} still new "
          f"({summary.seconds:.1f} s, {summary.world} process(es))")
    return 0


def cmd_list(args) -> int:
    from ..core.worklist import Worklist

    cases = Worklist(open_workspace(args, create=False)).cases(order=args.order, status=args.status)
    if printed_json_or_empty(args, cases, lambda row: row.summary(), "the worklist is empty"):
        return 0
    print(f"{'id':<18} {'status':<10} {'uncertainty':>11}  {'model':<22} name / volumes / reason")
    for case in cases:
        score = f"{case.score:.4f}" if case.score is not None else "-"
        detail = case.reason or "; ".join(filter(None, [case.volume_text()] + case.warnings))
        print(f"{case.id:<18} {case.status:<10} {score:>11}  {case.model[:22]:<22} {case.name}"
              + (f"  ({detail})" if detail else ""))
    return 0


def cmd_export(args) -> int:
    from ..core.worklist import export_worklist

    summary = export_worklist(open_workspace(args, create=False), args.output, dicom_seg=args.dicom_seg,
                              progress=stderr_progress("worklist export", args.quiet))
    warn(summary.problems)
    print(f"exported {summary.masks} mask(s)" + (f" and {summary.segs} DICOM SEG object(s)" if args.dicom_seg else "")
          + f", worklist.csv and worklist.json for {len(summary.table)} case(s)")
    return 0
