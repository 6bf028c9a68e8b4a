#!/usr/bin/env bash
# A virtual environment with deepbet 1.0.2 (MIT) for benchmarks/eval_brain_model.py --peer.
# Usage: bash benchmarks/peers/setup_deepbet.sh   -> .cache/peer-deepbet/bin/python
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.cache/peer-deepbet
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0 nibabel fill_voids connected-components-3d pandas tqdm
# --no-deps: deepbet also asks for its GUI toolkit (customtkinter), which masks do not need.
"$VENV/bin/pip" install -q --no-deps deepbet==1.0.2
"$VENV/bin/python" -c "import deepbet" && echo "$VENV/bin/python"
