#!/usr/bin/env bash
# The main job: set up (or reuse) the environment, then split Fashion-MNIST among 5 clients
# (Dirichlet alpha=0.5) and train their teachers. Extra arguments are passed as overrides,
# e.g. `scripts/run.sh train.epochs=5 run_dir=runs/try`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${FED_DISTILL_VENV:-.venv}
RUN_DIR=runs/fashion_mnist_dir0.5
for a in "$@"; do case $a in run_dir=*) RUN_DIR=${a#run_dir=} ;; esac; done
"$VENV/bin/fed-distill" split dataset=fashion_mnist split=dirichlet split.alpha=0.5 split.num_clients=5 seed=0 run_dir="$RUN_DIR" "$@"
"$VENV/bin/fed-distill" train-teachers run_dir="$RUN_DIR" "$@"
