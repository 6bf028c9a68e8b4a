#!/usr/bin/env bash
# Regenerates the README screenshots under Xvfb: docs/screenshot.png (the app on a 1920 x 1080
# screen, the sample segmented by the default model), docs/explain.png (an entropy map with the doubtful-region list) and
# docs/reading.png (the reading layout with a brain mask and the crosshair).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
xvfb-run -a -s "-screen 0 1920x1080x24" .venv/bin/python -m napari_medseg.app --demo segment --screenshot docs/screenshot.png "$@"
xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python -m napari_medseg.app --demo explain --screenshot docs/explain.png
xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python -m napari_medseg.app --demo reading --screenshot docs/reading.png
echo "wrote docs/screenshot.png, docs/explain.png and docs/reading.png"
