#!/usr/bin/env bash
# Create (or reuse) .venv and install fed-distill with what it needs, then make sure the
# Fashion-MNIST files are present. Safe to run again: it only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FED_DISTILL_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.fed-distill-installed"
# reinstall when the package's requirements or the tested versions change
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VENV/bin/python" -c "import fed_distill" 2>/dev/null; then
  echo "setup: installing fed-distill and its dependencies into $VENV"
  # constraints.txt: the exact versions tested here (torch is its CPU build, never the
  # multi-GB CUDA one); pyproject.toml itself only gives ranges.
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
  echo "$want" > "$stamp"
fi

# Fashion-MNIST: system location, $FED_DISTILL_DATA, the cache, or the Debian package.
if ! "$VENV/bin/python" -c "from fed_distill.data.sources import find_dataset_dir as f; import sys; sys.exit(0 if f('fashion_mnist') else 1)" 2>/dev/null; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }) \
      || echo "setup: apt could not install dataset-fashion-mnist"
  fi
  "$VENV/bin/python" -c "from fed_distill.data.sources import find_dataset_dir as f; import sys; sys.exit(0 if f('fashion_mnist') else 1)" 2>/dev/null \
    || "$VENV/bin/fed-distill" data fetch fashion_mnist \
    || echo "setup: Fashion-MNIST is missing; tests that need it will be skipped (see README: Data)"
fi
