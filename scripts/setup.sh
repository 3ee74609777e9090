#!/usr/bin/env bash
# Create .venv (if needed) and install msxai with its pinned dependencies. Idempotent: a second run with unchanged
# requirements.txt / pyproject.toml does nothing. Used by scripts/run.sh, scripts/test.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MSXAI_VENV:-.venv}
stamp="$VENV/.msxai-installed"
want=$(cat requirements.txt constraints.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import msxai, torch, monai" 2>/dev/null; then
  exit 0
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt -c constraints.lock 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import msxai, torch, monai, monailabel, torchvision" 
echo "$want" > "$stamp"
echo "msxai: environment ready in $VENV ($(( $(date +%s) - start )) s)"
