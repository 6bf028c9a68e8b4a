"""``models`` and ``train``: the models a user has, and new ones."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.defaults import DEVICE_HELP, DEVICES
from ..core.errors import MedsegError
from ._common import Formatter, open_workspace, printed_json_or_empty, say, stderr_progress


def add_parsers(sub) -> None:
    train = sub.add_parser("train", formatter_class=Formatter,
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
    train.set_defaults(func=cmd_train)

    models = sub.add_parser("models", formatter_class=Formatter, help="list, show, import or convert models")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = models_sub.add_parser("list", formatter_class=Formatter,
                                    help="list the available models and versions")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument("--workspace", default=None, metavar="W", help="list a workspace's versions instead")
    listing.set_defaults(func=cmd_list)
    rollback = models_sub.add_parser("rollback", formatter_class=Formatter,
                                     help="make an earlier version of a workspace's model the one in use")
    rollback.add_argument("--workspace", required=True, metavar="W", help="workspace folder")
    rollback.add_argument("--to", required=True, metavar="vN", help="the version to use")
    rollback.set_defaults(func=cmd_rollback)
    show = models_sub.add_parser("show", formatter_class=Formatter,
                                 help="print a model's card: intended use, training data, licence, citation, "
                                      "evaluation, where it loses")
    show.add_argument("model", metavar="NAME|PATH", help="model name, NAME@VERSION or model file")
    show.add_argument("--workspace", default=None, metavar="W", help="a workspace whose versions (vN) to look in")
    show.add_argument("--json", action="store_true", help="the whole card as JSON (pipeline, provenance, metrics)")
    show.set_defaults(func=cmd_show)
    importing = models_sub.add_parser(
        "import", formatter_class=Formatter,
        help="verify a model file and add it to your models",
        description="Verify a model file (safetensors, or a weights-only .pt with a card) and copy it into "
                    "your model folder as a new version, made current. A file whose content is already "
                    "installed is not imported twice.")
    importing.add_argument("path", metavar="FILE", help="the model file to import")
    importing.set_defaults(func=cmd_import)
    nnunet = models_sub.add_parser(
        "import-nnunet", formatter_class=Formatter,
        help="import a trained nnU-Net v2 results folder as a model",
        description="Import a trained nnU-Net v2 configuration (TRAINER__PLANS__CONFIG/ with dataset.json, "
                    "plans.json and fold_*/checkpoint_*.pth), or the dataset folder above it. The network is "
                    "built from plans.json with nnU-Net's own network package; the checkpoints are read "
                    "without running pickled code; the card declares nnU-Net's pipeline, so that predictions "
                    "reproduce nnUNetv2_predict's. The model becomes the current version of its name. "
                    "TotalSegmentator's folders (~/.totalsegmentator/nnunet/results, or one dataset in it) "
                    "import as its task, with the class names and licence its package gives (install it with "
                    "'pip install --no-deps totalsegmentator'); a task split over several datasets, such as "
                    "'total' (291-295), becomes one model whose parts' labels merge.")
    nnunet.add_argument("folder", metavar="DIR", help="the trained configuration folder, or its dataset folder, "
                                                      "or TotalSegmentator's results folder")
    nnunet.add_argument("--task", default=None, metavar="TASK",
                        help="the TotalSegmentator task to import from DIR, such as total or total_fast "
                             "(needed when DIR holds several)")
    nnunet.add_argument("--folds", nargs="+", default=None, metavar="F",
                        help="folds to average, such as 0 1 (all: the folder's fold_all); "
                             "default: every numbered fold present, as nnUNetv2_predict does")
    nnunet.add_argument("--checkpoint", choices=("final", "best"), default="final",
                        help="which checkpoint of each fold")
    nnunet.add_argument("--name", default=None, help="model name (default: DatasetNNN_Name-CONFIGURATION)")
    nnunet.add_argument("--version", default=None, help="model version (default: 1.0.0)")
    nnunet.set_defaults(func=cmd_import_nnunet)
    bundle = models_sub.add_parser(
        "import-bundle", formatter_class=Formatter,
        help="import a MONAI bundle (configs/inference.json, configs/metadata.json, models/model.pt) as a model",
        description="Import a MONAI bundle. The config is read as data and never run: the network, transforms "
                    "and inferer are built only from allow-listed MONAI classes with literal arguments, and a "
                    "$-expression is refused. models/model.pt is read as a plain state dict "
                    "(weights_only=True). Predictions run through the bundle's own MONAI transforms and inferer. "
                    "The model becomes the current version of its name.")
    bundle.add_argument("folder", metavar="DIR", help="the bundle folder")
    bundle.add_argument("--name", default=None, help="model name (default: the bundle folder's name)")
    bundle.add_argument("--version", default=None, help="model version (default: the version in metadata.json)")
    bundle.set_defaults(func=cmd_import_bundle)
    convert = models_sub.add_parser(
        "convert", formatter_class=Formatter,
        help="convert a published network into a model (deepbet)",
        description="Convert deepbet's two brain-extraction networks (Fisch et al. 2024, MIT) into one model "
                    "file in your model folder. Only weights whose SHA-256 matches a known deepbet release "
                    "are converted.")
    convert.add_argument("source_package", choices=["deepbet"], help="the published network to convert")
    convert.add_argument("--source", default=None, metavar="DIR",
                         help="folder with bbox_model.pt and model.pt; default: the installed deepbet package")
    convert.add_argument("--name", default="brain-t1", help="name of the new model")
    convert.add_argument("--version", default="2.0.0", help="version of the new model")
    convert.set_defaults(func=cmd_convert)


def cmd_train(args) -> int:
    from ..core.training import train_model

    path = train_model(args.data, args.output, name=args.name, version=args.version, steps=args.steps,
                       batch_size=args.batch_size, patch_size=tuple(args.patch_size), spacing=tuple(args.spacing),
                       channels=tuple(args.channels), learning_rate=args.lr, seed=args.seed, device=args.device,
                       max_shift_mm=args.max_shift_mm, synthesis_probability=args.synthesis_probability,
                       postprocessing=tuple(args.postprocessing), val_data=args.val_data, init=args.init,
                       checkpoint_every=args.checkpoint_every, resume=args.resume,
                       data_description=args.data_description, progress=stderr_progress("train"), log=say)
    print(f"wrote {path.name} into {path.parent.name}/")
    return 0


def cmd_list(args) -> int:
    from ..core.models import ModelRegistry

    workspace = open_workspace(args, create=False)
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
    entries = ModelRegistry().entries()
    if printed_json_or_empty(args, entries, lambda row: row.summary(), "no models installed"):
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


def cmd_show(args) -> int:
    from ..core.card import card_text
    from ..core.models import read_model_file, resolve_model

    _state, card = read_model_file(resolve_model(args.model, open_workspace(args, create=False)))
    print(json.dumps(card.to_dict(), indent=2) if args.json else card_text(card))
    return 0


def cmd_import(args) -> int:
    from ..core.models import ModelRegistry

    entry, added = ModelRegistry().import_model(args.path)
    if added:
        print(f"imported {entry.name} v{entry.version} into {entry.path.parent.name}/")
    else:
        print(f"{entry.name} v{entry.version} is already installed ({entry.source}, same content hash); "
              "nothing was imported")
    return 0


def cmd_import_nnunet(args) -> int:
    from ..core.nnunet import import_nnunet

    entry = import_nnunet(args.folder, folds=args.folds, checkpoint=args.checkpoint, name=args.name,
                          version=args.version, progress=stderr_progress("import"), task=args.task)
    card = entry.card
    parts = f" in {len(card.pipeline.parts)} parts" if card.pipeline.parts else ""
    print(f"imported {card.title}{parts}: {len(card.provenance.get('folds', []))} fold(s), {card.n_classes - 1} "
          f"classes ({', '.join(label.name for label in card.labels[1:6])}"
          f"{', ...' if card.n_classes > 6 else ''}), {card.modality}, into {entry.path.parent.name}/")
    return 0


def cmd_import_bundle(args) -> int:
    from ..core.bundle import import_bundle

    entry = import_bundle(args.folder, name=args.name, version=args.version, progress=stderr_progress("import"))
    card = entry.card
    print(f"imported {card.title}: {card.n_classes - 1} classes ({', '.join(l.name for l in card.labels[1:6])}"
          f"{', ...' if card.n_classes > 6 else ''}), {card.modality}, into {entry.path.parent.name}/")
    return 0


def cmd_rollback(args) -> int:
    workspace = open_workspace(args, create=False)
    workspace.rollback(args.to)
    print(f"workspace '{workspace.folder.name}' now uses {workspace.model_name} {args.to}")
    return 0


def cmd_convert(args) -> int:
    from ..core.convert import convert_deepbet
    from ..core.models import ModelRegistry

    registry = ModelRegistry()
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
