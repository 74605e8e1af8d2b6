#!/usr/bin/env bash
# Installing fed-distill into an environment that already holds another torch 2.x must keep that
# torch (issue 20). This makes a throwaway venv holding a stand-in "torch 2.5.0" (its package
# metadata only: pip decides from metadata, and a real second torch build is a multi-GB
# download), runs `pip install -e .` there as a user would, and fails unless torch is still
# 2.5.0 afterwards. Needs the package index (or this machine's wheel cache); a few minutes.
# Usage: scripts/check_torch_kept.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
site=$("$tmp/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p "$site/torch-2.5.0.dist-info"
printf 'Metadata-Version: 2.1\nName: torch\nVersion: 2.5.0\n' >"$site/torch-2.5.0.dist-info/METADATA"
printf 'pip\n' >"$site/torch-2.5.0.dist-info/INSTALLER"
: >"$site/torch-2.5.0.dist-info/RECORD"
before=$("$tmp/venv/bin/pip" show torch 2>/dev/null | sed -n 's/^Version: //p')
echo "check_torch_kept: torch $before in a fresh venv; pip install -e . ..."
"$tmp/venv/bin/pip" install --quiet --disable-pip-version-check -e . >"$tmp/pip.log" 2>&1 \
  || { tail -n 5 "$tmp/pip.log"; echo "check_torch_kept: FAIL: pip install -e . failed"; exit 1; }
after=$("$tmp/venv/bin/pip" show torch 2>/dev/null | sed -n 's/^Version: //p')
"$tmp/venv/bin/pip" show fed-distill >/dev/null || { echo "check_torch_kept: FAIL: fed-distill not installed"; exit 1; }
if [ "$after" != "2.5.0" ]; then
  echo "check_torch_kept: FAIL: pip replaced torch 2.5.0 with torch $after"
  exit 1
fi
echo "check_torch_kept: PASS: fed-distill installed, torch is still $after"
