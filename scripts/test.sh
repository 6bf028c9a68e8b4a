#!/usr/bin/env bash
# Installs everything the tests need (system X/GL libraries, venv, packages) and runs
# pytest on a virtual display. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
MEDSEG_EXTRAS="${MEDSEG_EXTRAS:-pyqt5,testing}" bash scripts/setup_env.sh
export QT_API="${QT_API:-pyqt5}"
exec xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/pytest "$@"
