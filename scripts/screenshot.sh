#!/usr/bin/env bash
# Regenerates docs/screenshot.png: napari with the plugin docked, under Xvfb.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python -m napari_medseg.app --screenshot docs/screenshot.png "$@"
echo "wrote docs/screenshot.png"
