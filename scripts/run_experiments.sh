#!/usr/bin/env bash
# Reproduce the paper's experiments and write the report (thin wrapper around `msxai experiments`).
# Usage: scripts/run_experiments.sh [--bundle B ...] [--cohort DIR] [--out DIR] [other msxai experiments options]
# Defaults: the U-Net bundle on the test split of data/synth (msxai synth --out data/synth --n 24 --seed 0), report in docs/experiments/, N = 8, <= 6 lesions/class.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
args=("$@")
has() { local f; for f in "${args[@]}"; do [ "$f" = "$1" ] && return 0; done; return 1; }
has --bundle || args+=(--bundle unet)
has --cohort || has --real-patient || args+=(--cohort data/synth)
has --out || args+=(--out docs/experiments)
exec "$PY" -m msxai experiments "${args[@]}"
