#!/usr/bin/env bash
# Create .venv with the pinned CPU build of PyTorch first (an unpinned torch pulls gigabytes of CUDA wheels),
# then ckptbridge with its test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
