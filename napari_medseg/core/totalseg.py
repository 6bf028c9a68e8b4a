"""TotalSegmentator's nnU-Net folders as models, with its own class names and licences.

TotalSegmentator keeps nnU-Net v2 results folders under ``~/.totalsegmentator/nnunet/results``
(``TOTALSEG_WEIGHTS_PATH``, or ``TOTALSEG_HOME_DIR``/nnunet/results). Its class names,
which datasets make up a task and which tasks need a licence live in its Python package
(``map_to_binary.py``, ``map_tasks_config.py``). Those files are read here as data, with
``ast.literal_eval`` on their literal tables: the package is never imported, so none of its
code runs, and nothing of it is copied into this project.

A task that TotalSegmentator splits over several datasets (``total``: 291-295) imports as
one model in parts (:class:`~.nnunet.NnUNetParts`): the parts run in turn on one prepared
input and their labels merge as TotalSegmentator merges them (a later part over an earlier
one), into one labels layer with all the task's names.
"""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .card import default_color
from .errors import MedsegError
from .progress import Progress, report, span

PACKAGE = "totalsegmentator"
INSTALL_HINT = "pip install --no-deps totalsegmentator"
DATASET_ID = re.compile(r"^Dataset(\d+)_")
# Which part tables a split task uses: TotalSegmentator pairs them in its code (nnunet.py),
# not in a table. total_v3's part table is built in code, so it cannot be read as data.
SPLIT_TASK_TABLES = {
    "total": ("class_map_5_parts", "map_taskid_to_partname_ct"),
    "total_mr": ("class_map_parts_mr", "map_taskid_to_partname_mr"),
    "headneck_muscles": ("class_map_parts_headneck_muscles", "map_taskid_to_partname_headneck_muscles"),
}
# TotalSegmentator tiles these tasks with a step of 0.8 of a patch, not nnU-Net's 0.5 (nnunet.py).
STEP_08_TASKS = {"total", "total_v3", "total_mr"}
LICENCE_URL = "https://backend.totalsegmentator.com/license-academic/"
CITATION = ("Wasserthal J. et al. TotalSegmentator: Robust Segmentation of 104 Anatomic Structures in CT Images. "
            "Radiology: Artificial Intelligence 2023;5(5):e230024")
# TotalSegmentator turns every scan to RAS (nibabel's as_closest_canonical) before nnU-Net
# reads it with SimpleITK, whose array of a RAS image runs S, A, R.
TOTALSEG_READ_ORDER = "SAR"
_NOT_LITERAL = object()


def weights_folder() -> Path:
    """Where TotalSegmentator keeps its nnU-Net results folders, by its own rules."""
    if os.environ.get("TOTALSEG_WEIGHTS_PATH"):
        return Path(os.environ["TOTALSEG_WEIGHTS_PATH"])
    home = Path(os.environ["TOTALSEG_HOME_DIR"]) if os.environ.get("TOTALSEG_HOME_DIR") \
        else Path.home() / ".totalsegmentator"
    return home / "nnunet" / "results"


def _literal(node):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_LITERAL


def literal_tables(path: Path, names: set) -> dict:
    """The module-level tables ``names`` of a Python file, as far as they are literal data.

    Besides ``NAME = literal``, the file's own edits are followed when they are data:
    ``NAME[key] = literal``, ``NAME[key] = NAME[other].copy()`` and ``NAME[key][k] = literal``
    (``class_map["total_v3"]`` is built that way). A dict whose entries are partly literal
    keeps its literal entries and those that name an entry read before. Nothing else is evaluated."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target = node.targets[0]
        if isinstance(target, ast.Name) and target.id in names:
            value = _literal(node.value)
            if value is _NOT_LITERAL and isinstance(node.value, ast.Dict):
                value = {}
                for key_node, value_node in zip(node.value.keys, node.value.values):
                    key = _literal(key_node) if key_node is not None else _NOT_LITERAL
                    item = _literal(value_node)
                    if item is _NOT_LITERAL:       # an entry of a table read before, such as class_map["test"]
                        item = copy.deepcopy(_item(found, value_node))
                    if key is not _NOT_LITERAL and item is not _NOT_LITERAL:
                        value[key] = item
            if value is not _NOT_LITERAL:
                found[target.id] = value
        elif isinstance(target, ast.Subscript):
            _edit(found, target, node.value)
    return found


def _item(found: dict, node):
    """The table entry a subscript chain names (``NAME[a][b]``), or _NOT_LITERAL."""
    if isinstance(node, ast.Name):
        return found.get(node.id, _NOT_LITERAL)
    if isinstance(node, ast.Subscript):
        container, key = _item(found, node.value), _literal(node.slice)
        if isinstance(container, dict) and key is not _NOT_LITERAL and key in container:
            return container[key]
    return _NOT_LITERAL


def _edit(found: dict, target: ast.Subscript, value_node) -> None:
    container, key = _item(found, target.value), _literal(target.slice)
    if not isinstance(container, dict) or key is _NOT_LITERAL:
        return
    value = _literal(value_node)
    if value is _NOT_LITERAL and isinstance(value_node, ast.Call) and not value_node.args \
            and not value_node.keywords and isinstance(value_node.func, ast.Attribute) \
            and value_node.func.attr == "copy":
        value = _item(found, value_node.func.value)
    if value is not _NOT_LITERAL:
        container[key] = copy.deepcopy(value)


@dataclass(frozen=True)
class Task:
    """One TotalSegmentator task as its package describes it."""

    name: str                  # "total", "total_fast", "lung_vessels", ...
    class_map: str             # the key of its names in class_map ("total" for total_fast)
    datasets: tuple            # nnU-Net dataset ids, in the order TotalSegmentator runs them
    trainer: str
    configuration: str
    folds: tuple
    commercial: bool

    @property
    def step(self) -> float:
        return 0.8 if self.class_map in STEP_08_TASKS else 0.5


@dataclass
class Tables:
    """TotalSegmentator's tables, read from its installed package."""

    version: str
    class_map: dict            # task -> {value: name}
    part_maps: dict            # task -> {dataset id: {value: name}} for split tasks
    tasks: dict                # task name -> Task

    def task_of(self, dataset_id: int) -> Task | None:
        owners = [task for task in self.tasks.values() if dataset_id in task.datasets]
        return owners[0] if owners else None


def package_folder() -> Path | None:
    """The installed ``totalsegmentator`` package's folder, found without importing it."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def read_tables(folder: Path | None = None) -> Tables:
    """Class names, tasks and licences from TotalSegmentator's package files, read as data."""
    folder = folder or package_folder()
    if folder is None or not (folder / "map_to_binary.py").is_file():
        raise MedsegError(f"TotalSegmentator's class names come from its package, which is not installed: "
                          f"{INSTALL_HINT}")
    wanted = {"class_map", "commercial_models"} | {name for pair in SPLIT_TASK_TABLES.values() for name in pair}
    maps = literal_tables(folder / "map_to_binary.py", wanted)
    config = literal_tables(folder / "map_tasks_config.py", {"TASK_CONFIGS", "DEFAULT_CONFIG"}) \
        if (folder / "map_tasks_config.py").is_file() else {}
    if not isinstance(maps.get("class_map"), dict):
        raise MedsegError(f"cannot read the class names in {folder.name}/map_to_binary.py")
    part_maps = {}
    for task, (parts_name, ids_name) in SPLIT_TASK_TABLES.items():
        parts, ids = maps.get(parts_name) or {}, maps.get(ids_name) or {}
        part_maps[task] = {int(dataset): dict(parts[part]) for dataset, part in ids.items() if part in parts}
    commercial = set((maps.get("commercial_models") or {}).keys())
    tasks = _tasks(config.get("TASK_CONFIGS") or {}, config.get("DEFAULT_CONFIG") or {}, commercial)
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return Tables(version, maps["class_map"], part_maps, tasks)


def _tasks(configs: dict, defaults: dict, commercial: set) -> dict:
    tasks = {}
    for base, config in configs.items():
        modes = config.get("sub_modes") if isinstance(config.get("sub_modes"), dict) else {"default": config}
        for mode, settings in modes.items():
            ids = settings.get("task_id")
            if ids is None:
                continue
            merged = {**defaults, **config, **settings}
            name = base if mode == "default" else f"{base}_{mode}"
            tasks[name] = Task(name=name, class_map=base, datasets=tuple(int(i) for i in (
                ids if isinstance(ids, (list, tuple)) else [ids])), trainer=str(merged.get("trainer") or "nnUNetTrainer"),
                configuration=str(merged.get("model") or "3d_fullres"),
                folds=tuple(str(f) for f in merged.get("folds") or [0]), commercial=base in commercial)
    return tasks


def looks_like_totalsegmentator(path: Path) -> bool:
    """A dataset or results folder that TotalSegmentator wrote: by its name or where it lies."""
    path = Path(path).resolve()
    names = [path.name] + ([child.name for child in path.iterdir() if child.is_dir()] if path.is_dir() else [])
    if any("TotalSegmentator" in name for name in names):
        return True
    try:
        home = weights_folder().resolve()
    except OSError:
        home = None
    return ".totalsegmentator" in path.parts or (home is not None and (path == home or home in path.parents))


def _datasets(root: Path) -> dict:
    """{dataset id: folder} of the nnU-Net dataset folders in a results root."""
    out = {}
    for child in sorted(root.iterdir()) if root.is_dir() else ():
        match = DATASET_ID.match(child.name)
        if child.is_dir() and match:
            out.setdefault(int(match.group(1)), child)
    return out


def choose_task(path: Path, tables: Tables, task: str | None = None) -> tuple[Task, list]:
    """The task to import from ``path`` and its dataset folders, in TotalSegmentator's order.

    ``path``: TotalSegmentator's results folder (then ``task`` picks among the complete tasks
    in it), one of its dataset folders, or a trained configuration folder inside one. A
    dataset of a split task brings its sibling parts."""
    path = Path(path)
    while path.name and not DATASET_ID.match(path.name) and (path / "plans.json").is_file():
        path = path.parent          # a trained configuration folder: its dataset folder
    match = DATASET_ID.match(path.name)
    root = path.parent if match else path
    present = _datasets(root)
    if task is not None:
        if task not in tables.tasks:
            raise MedsegError(f"TotalSegmentator {tables.version} has no task '{task}'")
        chosen = tables.tasks[task]
    elif match:
        chosen = tables.task_of(int(match.group(1)))
        if chosen is None:
            raise MedsegError(f"'{path.name}' is not one of TotalSegmentator {tables.version}'s tasks")
    else:
        complete = [t for t in tables.tasks.values() if t.datasets and all(d in present for d in t.datasets)]
        if not complete:
            raise MedsegError(f"'{path.name}' holds no complete TotalSegmentator task (datasets found: "
                              f"{', '.join(map(str, present)) or 'none'})")
        if len(complete) > 1:
            raise MedsegError(f"'{path.name}' holds {len(complete)} TotalSegmentator tasks "
                              f"({', '.join(t.name for t in complete)}); pick one with --task")
        chosen = complete[0]
    missing = [d for d in chosen.datasets if d not in present]
    if missing:
        raise MedsegError(f"TotalSegmentator's task '{chosen.name}' is datasets "
                          f"{', '.join(map(str, chosen.datasets))}; {', '.join(map(str, missing))} "
                          f"{'is' if len(missing) == 1 else 'are'} missing from '{root.name}' "
                          f"(totalseg_download_weights -t {chosen.class_map} fetches them)")
    if len(chosen.datasets) > 1 and chosen.class_map not in tables.part_maps:
        raise MedsegError(f"TotalSegmentator builds the part names of '{chosen.name}' in code, not in a table; "
                          "importing it is not supported")
    return chosen, [present[d] for d in chosen.datasets]


def _configuration_folder(dataset_folder: Path, task: Task) -> Path:
    """The trained configuration TotalSegmentator runs for the task, or the only one present."""
    expected = dataset_folder / f"{task.trainer}__nnUNetPlans__{task.configuration}"
    return expected if expected.is_dir() else dataset_folder


def licence_of(task: Task, tables: Tables) -> str:
    if task.commercial:
        return (f"TotalSegmentator task '{task.name}' needs a TotalSegmentator licence: free for non-commercial "
                f"use ({LICENCE_URL}); commercial use by agreement with its author")
    return (f"TotalSegmentator task '{task.name}' is one of its open tasks: the package "
            f"(totalsegmentator {tables.version}) is Apache-2.0; the downloaded weights carry the terms "
            "of TotalSegmentator's release (github.com/wasserth/TotalSegmentator)")


def model_from_totalsegmentator(path, task: str | None = None, folds=None, checkpoint: str = "final",
                                name: str | None = None, version: str | None = None,
                                tables: Tables | None = None, progress: Progress | None = None):
    """``(network, card)`` for a TotalSegmentator task found at ``path`` (see :func:`choose_task`)."""
    from .nnunet import NnUNetParts, configuration_card, find_results_folder, read_configuration

    tables = tables or read_tables()
    chosen, dataset_folders = choose_task(path, tables, task)
    names = {int(k): str(v) for k, v in (tables.class_map.get(chosen.class_map) or {}).items()}
    if not names:
        raise MedsegError(f"TotalSegmentator {tables.version} has no class names for '{chosen.class_map}'")
    folds = folds or list(chosen.folds)
    trained = []
    for index, folder in enumerate(dataset_folders):
        results = find_results_folder(_configuration_folder(folder, chosen))
        trained.append(read_configuration(results, folds, checkpoint, TOTALSEG_READ_ORDER, progress=span(
            progress, index / len(dataset_folders), (index + 1) / len(dataset_folders))))
    labels = [{"value": 0, "name": "background", "color": default_color(0)}] + [
        {"value": v, "name": n, "color": default_color(v)} for v, n in sorted(names.items()) if v != 0]
    first = trained[0]
    windows = dict(first.pipeline["windows"], step=chosen.step)
    common = {
        "name": name or f"totalseg-{chosen.name}".replace(" ", "_"), "version": version or tables.version,
        "labels": labels,
        "domain": {"modality": "MR" if chosen.class_map.endswith("_mr") else "CT", "contrast": None,
                   "body_part": None,
                   "description": f"TotalSegmentator {tables.version}, task '{chosen.name}' "
                                  f"({len(labels) - 1} classes)"},
        "licence": licence_of(chosen, tables), "citation": CITATION,
    }
    provenance = {**first.provenance(), "kind": "totalsegmentator", "task": chosen.name,
                  "datasets": [t.dataset_name for t in trained], "totalsegmentator": tables.version,
                  "source": f"TotalSegmentator {tables.version} task '{chosen.name}' "
                            f"({', '.join(t.dataset_name for t in trained)})"}
    if len(trained) == 1:
        renamed = [{"value": v, "name": names.get(v, n) if v else "background", "color": default_color(v)}
                   for v, n in first.label_names.items()]
        card = configuration_card(first, **common, labels=renamed, provenance=provenance,
                                  pipeline=dict(first.pipeline, windows=windows))
        report(progress, 1.0, f"read task '{chosen.name}'")
        return first.network, card
    different = [t.dataset_name for t in trained[1:] if {k: v for k, v in t.pipeline.items() if k != "windows"}
                 != {k: v for k, v in first.pipeline.items() if k != "windows"}]
    if different:
        raise MedsegError(f"the parts of '{chosen.name}' prepare their input differently "
                          f"({', '.join(different)} against {first.dataset_name}); they cannot share one input")
    by_name = {n: v for v, n in names.items()}
    tables_per_part = []
    for dataset_id, part in zip(chosen.datasets, trained):
        part_names = tables.part_maps[chosen.class_map].get(dataset_id, {})
        # A class the package does not name is left out of the merge, as TotalSegmentator leaves it.
        tables_per_part.append([[value, 0 if value == 0 else by_name.get(part_names.get(value), 0)]
                                for value in part.label_names])
    network = NnUNetParts.of([part.network for part in trained], out_channels=len(labels))
    card = configuration_card(first, **common, provenance=provenance,
                              network={"architecture": "NnUNetParts", "hparams": network.hparams},
                              pipeline=dict(first.pipeline, windows=windows, parts=tables_per_part), explain=[])
    report(progress, 1.0, f"read task '{chosen.name}' in {len(trained)} parts")
    return network, card
