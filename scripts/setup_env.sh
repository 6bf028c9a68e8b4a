#!/usr/bin/env bash
# Prepares a fresh Debian/Ubuntu machine for napari-medseg: system X/GL libraries,
# a virtual environment in .venv (or $MEDSEG_VENV) and the package with its extras.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${MEDSEG_VENV:-.venv}"
EXTRAS="${MEDSEG_EXTRAS:-pyqt5}"
# Which PyTorch build (see the README, "Which PyTorch you get"):
#   unset -> torch==2.13.0 through pip's own configuration: on machines with a local wheel
#            store (like our CI) that is the CPU build; from PyPI on Linux it is the CUDA
#            build (several GB), which also runs on a CPU.
#   cpu   -> the CPU-only build from PyTorch's own index (about 200 MB).
#   cuda  -> PyPI's default build (CUDA on Linux).
#   else  -> any pip requirement, e.g. "torch==2.9.1".
case "${MEDSEG_TORCH:-}" in
  "") TORCH_ARGS=("torch==2.13.0") ;;
  cpu) TORCH_ARGS=("torch" "--index-url" "https://download.pytorch.org/whl/cpu") ;;
  cuda) TORCH_ARGS=("torch") ;;
  *) TORCH_ARGS=("$MEDSEG_TORCH") ;;
esac

apt_packages=(xvfb xauth libgl1 libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4
  libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0
  libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1)
if ! python3 -c "import venv, ensurepip" 2>/dev/null; then
  apt_packages+=(python3-venv)
fi

if command -v dpkg-query >/dev/null; then
  missing=()
  for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    echo "[setup] installing system packages: ${missing[*]}"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
      command -v sudo >/dev/null || { echo "[setup] error: need root or sudo to install ${missing[*]}" >&2; exit 1; }
      SUDO="sudo"
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
else
  echo "[setup] warning: not a Debian-based system; install Xvfb and Mesa GL yourself" >&2
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"

pip_install() {  # pip, quiet unless it fails
  local log
  log=$(mktemp)
  if ! "$PY" -m pip install -q "$@" >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; return 1
  fi
  grep -v "is ignored: it is neither a file nor a directory" "$log" || true
  rm -f "$log"
}

pip_install --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing ${TORCH_ARGS[*]}"
  pip_install "${TORCH_ARGS[@]}"
fi
echo "[setup] installing napari-medseg[$EXTRAS]"
# Keep the torch installed above: a dependency (timm's torchvision) must not pull another build.
TORCH_PIN="torch==$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
pip_install -e ".[$EXTRAS]" "$TORCH_PIN"
if [[ ",$EXTRAS," == *",testing,"* ]] && ! "$PY" -c "import totalsegmentator" 2>/dev/null; then
  # TotalSegmentator's class tables, which the import reads as data. Its own dependencies
  # (vtk, dipy, ...) are not needed for that, so it comes without them.
  echo "[setup] installing totalsegmentator (its tables only, --no-deps)"
  pip_install --no-deps "totalsegmentator==2.18.0"
fi
