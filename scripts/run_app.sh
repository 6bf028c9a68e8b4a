#!/usr/bin/env bash
# Installs everything (first run only) and opens napari with napari-medseg's widgets
# docked and the sample T1 head loaded. Extra arguments: a scan to open instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if [ -z "${DISPLAY:-}" ] && [ -z "${WAYLAND_DISPLAY:-}" ]; then
  echo "[app] no display found; starting napari on a virtual display (xvfb-run)" >&2
  exec xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python -m napari_medseg.app "$@"
fi
exec .venv/bin/python -m napari_medseg.app "$@"
