"""Series -> stacks -> volumes.

A series is grouped by SeriesInstanceUID over the whole tree (CD exports split one
series over several folders). Its images are split into *stacks* by orientation and
matrix size, and a stack whose slice positions repeat into *volumes* by the first tag
that separates them: echo number, temporal position, trigger time, diffusion b-value
and gradient, acquisition number, image type. True duplicates (the same image twice:
the same SOP instance, or the same position and the same pixels) are dropped, with one
line that says so. Localizers are listed but never chosen by default; segmentation
objects (SEG) are offered as segmentations of the series they reference.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from .discovery import Discovery, Instance, normal_of

# Tags that make separate volumes of one stack, in the order they are tried.
VOLUME_TAGS = (
    ("echo_number", "echo"), ("temporal_position", "time point"), ("trigger_time", "trigger time"),
    ("b_value", "b-value"), ("gradient", "gradient"), ("acquisition_number", "acquisition"),
    ("image_type", "image type"), ("echo_time", "TE"),
)
POSITION_DECIMALS = 2   # slice positions closer than 0.01 mm are the same position


@dataclass
class StackVolume:
    """One 3D volume: its slices (not yet sorted) and what distinguishes it from its siblings."""

    instances: list
    label: str = ""


@dataclass
class Stack:
    orientation: tuple
    rows: int
    columns: int
    volumes: list = field(default_factory=list)
    multiframe: bool = False


@dataclass
class Series:
    uid: str
    instances: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    stacks: list = field(default_factory=list)
    index: int = -1

    @property
    def first(self) -> Instance:
        return self.instances[0]

    @property
    def is_segmentation(self) -> bool:
        return all(i.is_segmentation for i in self.instances)

    @property
    def is_localizer(self) -> bool:
        return all(i.is_localizer for i in self.instances)

    @property
    def volumes(self) -> list:
        """Every selectable 3D volume, over all stacks (single slices are not volumes)."""
        return [volume for stack in self.stacks for volume in stack.volumes
                if stack.multiframe or len(volume.instances) > 1]

    def summary(self) -> dict:
        """The patient-free listing of this series for ``info``, the Scan widget and ``--json``."""
        first = self.first
        return {
            "index": self.index,
            "uid": self.uid,
            "modality": first.modality or "unknown",
            "series_number": first.series_number,
            "description": first.series_description,
            "images": len(self.instances),
            "stacks": len(self.stacks),
            "volumes": [volume.label or f"volume {n}" for n, volume in enumerate(self.volumes)],
            "localizer": self.is_localizer,
            "segmentation": self.is_segmentation,
            "references": sorted({uid for i in self.instances for uid in i.referenced_series}),
            "warnings": list(self.warnings),
        }


def describe(entry: dict) -> str:
    """One line for a series summary: ``#0 CT series 3 'AX' 120 images, 2 volumes``."""
    parts = [f"#{entry['index']}", entry["modality"]]
    if entry["series_number"]:
        parts.append(f"series {entry['series_number']}")
    if entry["description"]:
        parts.append(f"'{entry['description']}'")
    parts.append(f"{entry['images']} image{'s' if entry['images'] != 1 else ''}")
    if len(entry["volumes"]) > 1:
        parts.append(f"{len(entry['volumes'])} volumes")
    if entry["localizer"]:
        parts.append("(localizer)")
    if entry["segmentation"]:
        parts.append("(segmentation)")
    return " ".join(parts)


def _position_key(instance: Instance) -> float | None:
    if instance.position is None or instance.orientation is None:
        return None
    normal = normal_of(instance.orientation)
    return round(sum(p * n for p, n in zip(instance.position, normal)), POSITION_DECIMALS)


def _pixel_digest(instance: Instance) -> str:
    digest = hashlib.sha1()
    with open(instance.path, "rb") as handle:
        if instance.pixel_offset is not None:
            handle.seek(instance.pixel_offset)
            digest.update(handle.read(instance.pixel_length or -1))
        else:
            digest.update(handle.read())
    return digest.hexdigest()


def _drop_duplicates(instances: list, warnings: list) -> list:
    """Remove the same image stored twice (same SOP instance, or same position and same pixels)."""
    seen_uid: dict = {}
    unique = []
    dropped = 0
    for instance in instances:
        if instance.sop_uid and instance.sop_uid in seen_uid:
            dropped += 1
            continue
        seen_uid[instance.sop_uid] = instance
        unique.append(instance)
    by_position = defaultdict(list)
    for instance in unique:
        # Images that differ in a volume tag (another echo, time point...) are never duplicates.
        tags = tuple(getattr(instance, attribute) for attribute, _word in VOLUME_TAGS)
        by_position[(_position_key(instance), tags)].append(instance)
    kept = []
    for (position, _tags), group in by_position.items():
        if len(group) == 1 or position is None:
            kept.extend(group)
            continue
        digests = {}
        for instance in group:
            try:
                digest = _pixel_digest(instance)
            except OSError:
                digest = id(instance)
            if digest in digests:
                dropped += 1
            else:
                digests[digest] = instance
                kept.append(instance)
    if dropped:
        warnings.append(f"dropped {dropped} duplicate image{'s' if dropped > 1 else ''} "
                        "(the same position and the same pixels, or the same image stored twice)")
    order = {id(i): n for n, i in enumerate(instances)}
    return sorted(kept, key=lambda i: order[id(i)])


def _value_label(attribute: str, word: str, value, instance: Instance) -> str:
    if attribute == "echo_number":
        te = f", TE {instance.echo_time:g} ms" if instance.echo_time is not None else ""
        return f"echo {value:g}{te}"
    if attribute == "image_type":
        return "\\".join(value)
    if attribute == "gradient":
        return "gradient " + ", ".join(f"{v:.3g}" for v in value)
    if attribute == "echo_time":
        return f"TE {value:g} ms"
    if attribute in ("trigger_time",):
        return f"{word} {value:g} ms"
    return f"{word} {value:g}"


def _split_volumes(instances: list, warnings: list) -> list:
    """One stack's images as one or more volumes."""
    counts = Counter(_position_key(i) for i in instances)
    if max(counts.values()) == 1:
        return [StackVolume(instances)]
    for attribute, word in VOLUME_TAGS:
        groups = defaultdict(list)
        for instance in instances:
            groups[getattr(instance, attribute)].append(instance)
        if len(groups) < 2 or None in groups:
            continue
        if all(max(Counter(_position_key(i) for i in group).values()) == 1 for group in groups.values()):
            ordered = sorted(groups.items(), key=lambda kv: kv[0])
            return [StackVolume(group, _value_label(attribute, word, value, group[0])) for value, group in ordered]
    repeats = set(counts.values())
    ordered = sorted(instances, key=lambda i: (i.instance_number if i.instance_number is not None else 0, str(i.path)))
    if len(repeats) == 1:
        n = repeats.pop()
        warnings.append(f"every slice position holds {n} different images and no tag tells them apart; "
                        "they were split into volumes by instance number")
        volumes = [[] for _ in range(n)]
        seen = Counter()
        for instance in ordered:
            key = _position_key(instance)
            volumes[seen[key]].append(instance)
            seen[key] += 1
        return [StackVolume(v, f"volume {k + 1} by instance number") for k, v in enumerate(volumes)]
    kept, seen = [], set()
    for instance in ordered:
        key = _position_key(instance)
        if key not in seen:
            seen.add(key)
            kept.append(instance)
    warnings.append(f"{len(instances) - len(kept)} images repeat slice positions irregularly; "
                    "the first image at each position was kept")
    return [StackVolume(kept)]


def _build_stacks(series: Series) -> None:
    images = [i for i in series.instances if not i.is_segmentation]
    singles = [i for i in images if i.frames <= 1]
    for instance in images:
        if instance.frames > 1:
            series.stacks.append(Stack(instance.orientation or (), instance.rows, instance.columns,
                                       [StackVolume([instance], f"multi-frame {instance.path.name}")],
                                       multiframe=True))
    singles = _drop_duplicates(singles, series.warnings)
    geometry = defaultdict(list)
    for instance in singles:
        orientation = tuple(np.round(instance.orientation, 3)) if instance.orientation else None
        geometry[(orientation, instance.rows, instance.columns)].append(instance)
    for (orientation, rows, columns), group in sorted(geometry.items(), key=lambda kv: -len(kv[1])):
        series.stacks.append(Stack(orientation or (), rows, columns, _split_volumes(group, series.warnings)))
    if len(series.stacks) > 1 and not series.is_localizer:
        series.warnings.append(f"the series holds {len(series.stacks)} stacks of different orientation or size")


def group_series(discovery: Discovery) -> tuple[list, list]:
    """``(series, skipped lines)``: images and segmentations by SeriesInstanceUID, largest first."""
    skipped = list(discovery.skipped)
    by_uid: dict[str, Series] = {}
    for instance in discovery.instances:
        kind = instance.non_image_kind
        if kind is not None:
            skipped.append(f"skipped {instance.path.name}: {kind}")
            continue
        if instance.samples != 1 and not instance.is_segmentation:
            skipped.append(f"skipped {instance.path.name}: a colour image (only greyscale scans are read)")
            continue
        by_uid.setdefault(instance.series_uid or f"no-uid:{instance.path.parent}", Series(
            instance.series_uid or f"no-uid:{instance.path.parent}")).instances.append(instance)
    series = list(by_uid.values())
    for entry in series:
        if not entry.is_segmentation:
            _build_stacks(entry)
    series.sort(key=lambda s: (s.is_segmentation, s.is_localizer, -len(s.instances)))
    for index, entry in enumerate(series):
        entry.index = index
    return series, skipped
