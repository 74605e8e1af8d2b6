#!/usr/bin/env bash
# The CUDA path end to end, < 5 minutes on one GPU (docs/gpu.md): one-shot with ResNet-18
# teachers and student on CIFAR-10 (the real files if present, else small CIFAR-format files it
# writes) and one FedMD round, with device=cuda; prints per-stage times and fails with one line
# unless the work ran on the GPU (and in float16 where train.amp asks for it).
# Run it in an environment holding a CUDA build of torch and fed-distill (pip install -e ".[dev]"
# keeps that torch); not scripts/setup.sh, whose constraints install the CPU build.
# Usage: scripts/gpu_check.sh [--work DIR]      (PYTHON=... picks the interpreter)
#        scripts/gpu_check.sh --peers [ARGS...]
#   the peers' comparison on the GPU instead: benchmarks/peers.py --device cuda --alphas 0.5
#   (Fashion-MNIST, 5 clients: our default, DENSE, DENSE on class shares, Co-Boosting at their
#   published 200 rounds, on the same teachers) into runs/gpu_peers; later ARGS win
#   (e.g. --out DIR, --resume, --only dense); docs/gpu.md, docs/peers.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x "${FED_DISTILL_VENV:-.venv}/bin/python" ]; then
  PY="${FED_DISTILL_VENV:-.venv}/bin/python"
fi
export FED_DISTILL_NO_PROGRESS=1
if [ "${1:-}" = "--peers" ]; then
  shift
  exec "$PY" benchmarks/peers.py --device cuda --alphas 0.5 --out runs/gpu_peers \
    --figures runs/gpu_peers/figures "$@"
fi
exec "$PY" scripts/gpu_check.py "$@"
