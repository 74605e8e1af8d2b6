#!/usr/bin/env bash
# The test command: set up (or reuse) the environment, lint, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${FED_DISTILL_VENV:-.venv}
export FED_DISTILL_NO_PROGRESS=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
"$VENV/bin/ruff" check src tests benchmarks
"$VENV/bin/python" -m pytest -q "$@"
