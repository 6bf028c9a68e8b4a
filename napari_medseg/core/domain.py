"""Is this scan what the model was made for, and does its result look plausible?

Before predicting, :func:`scan_problems` checks a scan against the model card's
domain: the modality (from DICOM, or from the intensities: CT in Hounsfield units has
air near -1000) and the body part (from DICOM's BodyPartExamined, or from the width
of the imaged body: a head is far narrower than a chest). The CLI refuses a mismatch
unless forced; the Segment widget asks first.

After predicting, :func:`result_warnings` flags what looks like a failure: a label's
volume outside its expected range, more foreground than the card allows (a brain
model that labels the whole head), or most of the imaged body labelled. The checks
run on the raw network output too, so post-processing never hides a failure.
"""

from __future__ import annotations

import numpy as np

from .card import ModelCard
from .sampling import looks_like_ct

# DICOM BodyPartExamined values that count as each body part of a model card.
BODY_PARTS = {
    "head": {"HEAD", "BRAIN", "SKULL", "HEADNECK", "HEAD NECK", "NEURO", "CRANIUM", "IAC", "ORBIT"},
    "chest": {"CHEST", "THORAX", "LUNG", "HEART", "BREAST"},
    "abdomen": {"ABDOMEN", "LIVER", "KIDNEY", "PANCREAS", "PELVIS", "ABDOMENPELVIS"},
}
# A typical axial slice of the imaged body wider than this is not a head (adult heads
# are 14-17 cm wide; a chest or abdomen is over 30 cm).
MAX_HEAD_WIDTH_MM = 240.0


def scan_modality(image, modality: str, guessed: bool) -> tuple[str, str]:
    """``(modality, how it was known)`` for a scan."""
    if not guessed and modality and modality != "unknown":
        return modality.upper(), "DICOM header"
    return ("CT" if looks_like_ct(image) else "MR"), "intensities"


def typical_body_width_mm(image, layer_spacing: tuple) -> float | None:
    """The median left-right width of the imaged body over its axial slices (layer order S, P, L)."""
    from .pipeline import body_mask

    mask, step = body_mask(image, coarse=True)
    widths = []
    for axial in mask:
        columns = np.flatnonzero(axial.any(axis=0))
        if columns.size:
            widths.append((columns[-1] - columns[0] + 1) * step * layer_spacing[2])
    return float(np.median(widths)) if widths else None


def image_for_model(volume, card: ModelCard, action: str = "segment") -> tuple[np.ndarray, list[str]]:
    """A scan's layer-order image for a model to work on, and why it lies outside the
    model's domain (see :func:`scan_problems`). A label map is refused: it is no image."""
    from .errors import MedsegError

    if volume.is_label_map:
        raise MedsegError(f"'{volume.name}' looks like a label map, not an image to {action}")
    image = volume.layer_data()
    problems = scan_problems(image, volume.geometry.layer_spacing, card, volume.modality, volume.modality_guessed,
                             volume.info.get("dicom", {}).get("BodyPartExamined"))
    return image, problems


def scan_problems(image, layer_spacing: tuple, card: ModelCard, modality: str = "unknown",
                  modality_guessed: bool = True, body_part: str | None = None) -> list[str]:
    """Why this scan is outside ``card``'s domain; an empty list when it fits."""
    problems = []
    domain = card.domain
    wanted = (domain.modality or "any").upper()
    if wanted != "ANY":
        found, how = scan_modality(image, modality, modality_guessed)
        if found != wanted:
            reason = " (air at about -1000 HU)" if found == "CT" and how == "intensities" else f" ({how})"
            problems.append(f"this scan is {found}{reason}, but {card.title} is made for "
                            f"{wanted}{' ' + domain.contrast if domain.contrast else ''} scans")
    part = (domain.body_part or "").lower()
    if part:
        if body_part:
            known = BODY_PARTS.get(part, {part.upper()})
            if body_part.strip().upper() not in known:
                problems.append(f"the DICOM header says the body part is {body_part.strip().upper()}, "
                                f"but {card.title} is made for the {part}")
        elif part == "head":
            width = typical_body_width_mm(image, layer_spacing)
            if width is not None and width > MAX_HEAD_WIDTH_MM:
                problems.append(f"the imaged body is about {width:.0f} mm wide, which is not a head; "
                                f"{card.title} is made for the head")
    return problems


def result_warnings(segmentation, raw_labels: np.ndarray, image, card: ModelCard, rows: list | None = None) -> list[str]:
    """Warnings about an implausible result (volumes, failure patterns), judged on the raw output too."""
    warnings = [row["warning"] for row in (rows if rows is not None else segmentation.volumes()) if "warning" in row]
    checks = card.checks
    voxel_ml = float(np.prod(segmentation.spacing)) / 1000.0
    raw_foreground = int(np.count_nonzero(raw_labels))
    if checks.max_foreground_ml is not None and raw_foreground * voxel_ml > checks.max_foreground_ml:
        warnings.append(f"the result looks like a failure: the network labelled {raw_foreground * voxel_ml:.0f} mL, "
                        f"more than the {checks.max_foreground_ml:.0f} mL this model ever should; check the scan "
                        "is in the model's domain")
    if checks.max_body_fraction is not None and raw_foreground:
        from .pipeline import body_mask

        body, step = body_mask(image, coarse=True)  # judged on the mask's own strided grid
        labelled = raw_labels[::step, ::step, ::step] != 0
        # Only what lies inside the body counts: labels outside it would make a share over 100%.
        share = np.count_nonzero(body & labelled) / max(np.count_nonzero(body), 1)
        if share > checks.max_body_fraction:
            names = ", ".join(label.name for label in card.labels[1:])
            warnings.append(f"the result looks like a failure: {share:.0%} of the imaged body was labelled "
                            f"{names} (more than {checks.max_body_fraction:.0%} is not plausible)")
    return warnings
