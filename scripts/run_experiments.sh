#!/usr/bin/env bash
# Reproduce the paper's experiments and write the report (thin wrapper around `msxai experiments`).
#
#   scripts/run_experiments.sh                 # the settings of the checked-in report docs/experiments/report.html
#   scripts/run_experiments.sh --bundle unet --cohort data/synth --out out/experiments --samples 50 ...
#
# With no arguments it runs the settings used for docs/experiments/ (chosen to fit ~20 min on 2 busy CPU cores):
# the U-Net bundle in full, the DynUNet and Swin UNETR bundles for the context-dilation experiment only, on the test
# split of data/synth (msxai synth --out data/synth --n 24 --seed 0) plus the shared real patient, N = 4 noise
# samples, mean aggregation (Eq. 2) for the bulk maps and max (Eq. 3, N = 2, lesions <= 15 voxels) for experiment 1,
# <= 3 domains per class, lesions read by <= 4 sliding windows. Any argument replaces these defaults entirely
# (see `msxai experiments --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
if [ "$#" -eq 0 ]; then
  set -- --bundle unet --context-only-bundle dynunet --context-only-bundle swinunetr \
    --cohort data/synth --split test --real-patient --out docs/experiments \
    --samples 4 --aggregation mean --min-abs-relative 0.1 --max-lesions-per-class 3 \
    --exp1-samples 2 --exp1-max-voxels 15 --transplant-lesions 1 --context-lesions 1 \
    --context-max-mm 35 --context-step-mm 5 --randomization-lesions 1 --max-domain-windows 4 \
    --n-boot 2000 --seed 0
fi
exec "$PY" -m msxai experiments "$@"
