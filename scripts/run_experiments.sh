#!/usr/bin/env bash
# Reproduce the paper's experiments and write the report (thin wrapper around `msxai experiments`).
#
#   scripts/run_experiments.sh              # the runs behind docs/experiments/report.html (below), then the report
#   scripts/run_experiments.sh ARGS...      # one `msxai experiments ARGS...` (see `msxai experiments --help`)
#
# With no arguments: four runs of `msxai experiments` (1 torch thread each, in parallel) on the test split of
# $COHORT (default data/synth_v4 = `msxai synth --out data/synth_v4 --n 24 --seed 0`) plus the shared real patient, each pickling its results under out/experiments/,
# then one report from those results into docs/experiments/, which also installs the U-Net's fitted error flag as
# bundles/msxai_unet/models/error_flag.json. Sized for 2 CPU cores shared with other jobs, where Eq. 3 costs ~1-2 s
# per lesion voxel, covering 96^3 window and noise copy, and a forward pass of one window ~1-4 s:
#   A   U-Net bulk maps + experiments 1-3 + error flag: Eq. 3, N = 2, <= 20 domains per class costing <= 48
#       voxel-windows (bulk maps stop after $BULK_MINUTES = 25 min, classes taken in turn), a large TP <= 100 voxel-windows for
#       experiment 1, TN balls of 7 mm^3
#   A2  U-Net experiments 4, 5 and the randomisation check (same N, one TP within the cost cap)
#   B   U-Net context dilation: the cheapest true lesion of 90-120 mm^3, radii 0-8 mm in 1 mm steps, then 10-35 mm
#   C   DynUNet and Swin UNETR context dilation, the same true lesion (picked from the truth alone)
# The report merges the runs of one model into one section and prints each run's command line.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
if [ "$#" -gt 0 ]; then
  exec "$PY" -m msxai experiments "$@"
fi
COHORT="${COHORT:-data/synth_v4}"
R=out/experiments
CASES=(--cohort "$COHORT" --split test --real-patient --seed 0 --threads 1)
CTX=(--context-lesions 1 --context-radii 0,1,2,3,4,5,6,7,8,10,12,15,20,25,35)
mkdir -p "$R"
run() { local name=$1; shift; "$PY" -m msxai experiments "$@" --out "$R/$name" --results-dir "$R/$name/pkl" \
          > "$R/$name.log" 2>&1 && echo "run $name done" || { echo "run $name failed, see $R/$name.log"; exit 1; }; }

run A --bundle unet "${CASES[@]}" --samples 2 --aggregation max --max-lesions-per-class 20 --max-domain-cost 48 \
  --bulk-minutes "${BULK_MINUTES:-25}" --exp1-max-cost 100 --tn-mm3 7 --skip exp4 --skip exp5 --skip randomization --skip exp6 \
  --n-boot 2000 &
run A2 --bundle unet "${CASES[@]}" --samples 2 --aggregation max --max-lesions-per-class 1 --classes TP \
  --max-domain-cost 48 --bulk-minutes 0.01 --tn-mm3 7 --transplant-lesions 1 --randomization-lesions 1 --skip exp1 \
  --skip exp6 --n-boot 2000 &
run B --context-only-bundle unet "${CASES[@]}" "${CTX[@]}" &
run C --context-only-bundle dynunet --context-only-bundle swinunetr "${CASES[@]}" "${CTX[@]}" &
wait
INC=()
for f in "$R/A/pkl/results_msxai_unet.pkl" "$R/A2/pkl/results_msxai_unet.pkl" "$R/B/pkl/results_msxai_unet.pkl" \
         "$R/C/pkl/results_msxai_dynunet.pkl" "$R/C/pkl/results_msxai_swinunetr.pkl"; do
  [ -f "$f" ] && INC+=(--include-results "$f")
done
exec "$PY" -m msxai experiments --out docs/experiments --ship-error-flag "${INC[@]}"
