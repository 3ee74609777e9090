#!/usr/bin/env bash
# The README's test command: set up (if needed), then run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MSXAI_DEVICE=${MSXAI_DEVICE:-cpu}
exec .venv/bin/python -m pytest tests -q -ra "$@"
