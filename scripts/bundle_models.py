"""Write the two models bundled in the wheel (napari_medseg/models/).

* ``brain-t1`` 2.0.0: deepbet 1.0.2's networks (Fisch et al. 2024, MIT), converted by
  ``napari-medseg models convert deepbet`` from the installed deepbet package
  (``pip install --no-deps deepbet==1.0.2``), weights stored as float16 (its masks are
  unchanged: see benchmarks/eval_brain_model.py).
* ``brain-t1-attention`` 1.1.0: the attention U-Net that was ``brain-t1`` 1.0.0
  (weights trained by scripts/train_brain_model.sh of napari-medseg 0.1.0), with its card
  moved to model format 2: the imaged head's extent plus 10 mm as its region, and the
  intensity statistics taken there.

    .venv/bin/python scripts/bundle_models.py OLD_BRAIN_T1_1.0.0.safetensors
"""

import sys
from pathlib import Path

from napari_medseg.core.card import parse_card
from napari_medseg.core.convert import convert_deepbet
from napari_medseg.core.models import networks_from_state, read_model_file, save_model

BUNDLED = Path(__file__).resolve().parents[1] / "napari_medseg" / "models"


def attention_card(old):
    data = old.to_dict()
    data.pop("content_sha256", None)
    data["name"], data["version"] = "brain-t1-attention", "1.1.0"
    data["labels"][1]["expected_ml"] = [800, 2300]
    data["domain"] = {"modality": "MR", "contrast": "T1", "body_part": "head",
                      "description": "brain extraction on T1-weighted head MRI of adults (a demonstration model)"}
    pipeline = data["pipeline"]
    pipeline["roi"] = {"kind": "body", "margin_mm": 10.0}
    pipeline["normalisation"]["statistics"] = "region"
    data["checks"] = {"max_foreground_ml": 2500, "max_body_fraction": 0.95}
    data["provenance"] = {**data["provenance"],
                          "weights": "napari-medseg 0.1.0 brain-t1 1.0.0, trained by scripts/train_brain_model.sh "
                                     "of that version (three stages, CPU)",
                          "card": "moved to model format 2 in napari-medseg 0.2.0: body region plus 10 mm, "
                                  "intensity statistics from that region"}
    data["metrics"] = {}
    data["licence"] = "BSD-3-Clause (napari-medseg); trained on the MNI152 template (MNI notice in data/NOTICE.md)"
    return parse_card(data, "brain-t1-attention")


def main(old_attention: str) -> None:
    state, old = read_model_file(old_attention)
    network, _ = networks_from_state(state, old, Path(old_attention).name)
    save_model(BUNDLED / "brain-t1-attention.safetensors", network, attention_card(old))
    convert_deepbet(BUNDLED / "brain-t1.safetensors", half_precision=True)
    print("wrote", *sorted(p.name for p in BUNDLED.glob("*.safetensors")))


if __name__ == "__main__":
    main(sys.argv[1])
