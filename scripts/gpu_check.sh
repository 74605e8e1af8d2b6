#!/usr/bin/env bash
# The CUDA path end to end, < 5 minutes on one GPU (docs/gpu.md): one-shot with ResNet-18
# teachers and student on CIFAR-10 (the real files if present, else small CIFAR-format files it
# writes) and one FedMD round, with device=cuda; prints per-stage times and fails with one line
# unless the work ran on the GPU (and in float16 where train.amp asks for it).
# Run it in an environment holding a CUDA build of torch and fed-distill (pip install -e ".[dev]"
# keeps that torch); not scripts/setup.sh, whose constraints install the CPU build.
# Usage: scripts/gpu_check.sh [--work DIR]      (PYTHON=... picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x "${FED_DISTILL_VENV:-.venv}/bin/python" ]; then
  PY="${FED_DISTILL_VENV:-.venv}/bin/python"
fi
export FED_DISTILL_NO_PROGRESS=1
exec "$PY" scripts/gpu_check.py "$@"
