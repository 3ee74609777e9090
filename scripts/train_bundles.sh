#!/usr/bin/env bash
# Train, evaluate and benchmark the three msxai bundles on this machine (CPU), as recorded in bundles/*/docs/README.md.
#
#   scripts/train_bundles.sh                 # everything, sequentially
#   BUNDLES="msxai_unet" scripts/train_bundles.sh
#
# Steps: (1) the synthetic cohort (skipped when data/synth/dataset.json exists), (2) `msxai train` per bundle
# (configs/train.json: best model by validation Dice -> bundles/<b>/models/model.pt, record -> runs/<b>/training.json,
# log -> runs/<b>/train.log), (3) evaluate.json on the synthetic test split and on the real patient26 (metrics ->
# bundles/<b>/eval/metrics_{test,patient26}.json), (4) scripts/bench_inference.py (-> runs/bench_inference.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MSXAI=${MSXAI:-.venv/bin/msxai}
BUNDLES=${BUNDLES:-"msxai_unet msxai_dynunet msxai_swinunetr"}
THREADS=${THREADS:-1}
COHORT=${COHORT:-data/synth}
mkdir -p runs

if [ ! -f "$COHORT/dataset.json" ]; then
  "$MSXAI" synth --out "$COHORT" --n 24 --seed 0 --workers 2 --no-progress
fi

for b in $BUNDLES; do
  mkdir -p "runs/$b"
  echo "== train $b ($(date -u +%H:%M:%S) UTC)"
  "$MSXAI" train --bundle "bundles/$b" --cohort "$COHORT" --threads "$THREADS" 2>&1 | tee "runs/$b/train.log"
done

for b in $BUNDLES; do
  echo "== evaluate $b"
  "$PY" -c "import sys, torch; torch.set_num_threads($THREADS); from msxai.bundle import evaluate_bundle; \
evaluate_bundle('bundles/$b', '$COHORT', split='test'); evaluate_bundle('bundles/$b', 'patient26')"
done

"$PY" scripts/bench_inference.py --bundles $BUNDLES --threads "$THREADS" --json runs/bench_inference.json
