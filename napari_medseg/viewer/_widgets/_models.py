"""The model drop-down that Segment and Explain share: the viewer's workspace versions first."""

from __future__ import annotations

from ...core.models import model_choices
from .._workspace import open_workspace


def model_choices_of(viewer) -> tuple[list, str | None]:
    """``(choices, the default path)``: the workspace's versions (promoted one the default), then
    the bundled and user models (see :func:`napari_medseg.core.models.model_choices`)."""
    workspace = open_workspace(viewer)
    try:
        return model_choices(workspace)
    finally:
        if workspace is not None:
            workspace.close()


def select_default_model(combo, viewer) -> None:
    """Refresh a model drop-down and select the default: a workspace's promoted version."""
    _choices, default = model_choices_of(viewer)
    combo.reset_choices()
    if default is not None:
        combo.value = default
