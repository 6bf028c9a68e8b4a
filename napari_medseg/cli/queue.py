"""``queue`` and ``finetune``: corrections into the workspace, and a model version learned from them."""

from __future__ import annotations


from ..core.defaults import (DEVICE_HELP, DEVICES, FINETUNE_LEARNING_RATE, FINETUNE_REPLAY, FINETUNE_STEPS,
                             FINETUNE_TOLERANCE)
from ._common import (Formatter, add_volume_options, open_workspace, printed_json_or_empty, say,
                      stderr_progress)


def add_parsers(sub) -> None:
    queue = sub.add_parser("queue", formatter_class=Formatter, help="submit corrections to a workspace, list them")
    queue_sub = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    submit = queue_sub.add_parser("submit", formatter_class=Formatter,
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
    add_volume_options(submit)
    submit.set_defaults(func=cmd_queue_submit)
    queue_list = queue_sub.add_parser("list", formatter_class=Formatter, help="list the queued corrections")
    queue_list.add_argument("--workspace", required=True, metavar="W", help="workspace folder")
    queue_list.add_argument("--json", action="store_true", help="machine-readable output")
    queue_list.set_defaults(func=cmd_queue_list)
    reject = queue_sub.add_parser("reject", formatter_class=Formatter,
                                  help="keep items out of fine-tuning (a correction that should not teach)")
    reject.add_argument("items", nargs="+", metavar="ID", help="item ids (a unique start is enough)")
    reject.add_argument("--workspace", required=True, metavar="W", help="workspace folder")
    reject.add_argument("--restore", action="store_true", help="put rejected items back in the queue")
    reject.set_defaults(func=cmd_queue_reject)

    finetune = sub.add_parser("finetune", formatter_class=Formatter,
                              help="learn a new model version from the queued corrections",
                              description="Fine-tune the workspace's current model on its queued corrections (plus "
                                          "a replay of earlier ones). The new version is promoted only if its Dice "
                                          "on the workspace's validation items does not fall by more than the "
                                          "tolerance. Runs under torchrun too (PyTorch DDP, gloo on the CPU, NCCL "
                                          "on GPUs).")
    finetune.add_argument("--workspace", required=True, metavar="W", help="workspace folder")
    finetune.add_argument("--steps", type=int, default=FINETUNE_STEPS, help="training steps")
    finetune.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    finetune.add_argument("--tolerance", type=float, default=FINETUNE_TOLERANCE,
                          help="the largest drop of validation Dice that still promotes the new version")
    finetune.add_argument("--replay", type=int, default=FINETUNE_REPLAY, help="earlier accepted corrections replayed")
    finetune.add_argument("--lr", type=float, default=FINETUNE_LEARNING_RATE, help="learning rate (Adam)")
    finetune.add_argument("--batch-size", type=int, default=1, help="crops per step (over all processes)")
    finetune.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                          help="training crop (default: the card's patch, at most 128 a side)")
    finetune.add_argument("--seed", type=int, default=0, help="random seed")
    finetune.add_argument("--base", default=None, metavar="NAME|PATH",
                          help="the model a new workspace starts from (default: brain-t1)")
    finetune.add_argument("--progress", choices=["text", "json"], default="text",
                          help="json: one JSON line per progress report on stdout (for the widget)")
    finetune.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    finetune.set_defaults(func=cmd_finetune)


def cmd_queue_submit(args) -> int:
    from ..core.io import read_volume
    from ..core.workspace import submit_correction

    scan = read_volume(args.image, volume_index=args.volume, series=args.series)
    label = read_volume(args.label)
    prediction = read_volume(args.prediction) if args.prediction else None
    workspace = open_workspace(args)
    item = submit_correction(workspace, scan.layer_data(), scan.geometry, label, prediction,
                             model=args.model_version or "", reviewer=args.reviewer, note=args.note, split=args.split)
    print(f"queued {item.id[:12]} ({item.split}, {item.edited_voxels} edited voxels) in "
          f"workspace '{workspace.folder.name}'")
    return 0


def cmd_queue_list(args) -> int:
    items = open_workspace(args, create=False).items()
    if printed_json_or_empty(args, items, lambda row: row.summary(), "the queue is empty"):
        return 0
    print(f"{'id':<14} {'created':<26} {'status':<9} {'split':<11} {'edited':>8}  reviewer / note")
    for item in items:
        print(f"{item.id[:12]:<14} {item.created:<26} {item.status:<9} {item.split:<11} {item.edited_voxels:>8}  "
              f"{item.reviewer}{' / ' + item.note if item.note else ''}")
    return 0


def cmd_queue_reject(args) -> int:
    workspace = open_workspace(args, create=False)
    items = [workspace.item(item_id) for item_id in args.items]
    workspace.set_status([item.id for item in items], "queued" if args.restore else "rejected")
    print(f"{len(items)} item(s) {'back in the queue' if args.restore else 'rejected: never trained on'}")
    return 0


def cmd_finetune(args) -> int:
    from ..core.finetune import fine_tune
    from ..core.progress import progress_line, result_line

    workspace = open_workspace(args, create=False)
    if args.progress == "json":
        def progress(fraction: float, message: str) -> None:
            print(progress_line(fraction, message), flush=True)
    else:
        progress = stderr_progress("finetune", args.quiet)
    result = fine_tune(workspace, steps=args.steps, device=args.device, tolerance=args.tolerance,
                       replay=args.replay, learning_rate=args.lr, batch_size=args.batch_size,
                       patch_size=tuple(args.patch_size) if args.patch_size else None, seed=args.seed,
                       base=args.base, progress=progress, log=None if args.quiet else say)
    if not result.version:  # a helper process under torchrun
        return 0
    if args.progress == "json":
        print(result_line(result.summary()), flush=True)
    else:
        print(f"{result.version}: {'promoted' if result.promoted else 'kept out'}; {result.reason}")
    return 0
