#!/usr/bin/env bash
# Installs everything the tests need (system X/GL libraries, venv, packages) and runs
# pytest on a virtual display. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# QT_API=pyqt6 or pyside6 runs the same suite on a Qt6 binding.
export QT_API="${QT_API:-pyqt5}"
export PYTEST_QT_API="$QT_API"
MEDSEG_EXTRAS="${MEDSEG_EXTRAS:-$QT_API,testing}" bash scripts/setup_env.sh
# Two workers: CI has two cores, and the suite takes about twice as long serially.
exec xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/pytest -n "${MEDSEG_TEST_WORKERS:-2}" "$@"
