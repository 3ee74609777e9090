#!/usr/bin/env bash
# The OHIF web viewer path on this machine, loopback only (see docs/ohif.md):
#   scripts/ohif_stack.sh up [--flair F --t1 T] [--port 8000] [--orthanc-port 8042] [--models unet]
#   scripts/ohif_stack.sh status | down
#   scripts/ohif_stack.sh load --flair F.nii.gz --t1 T.nii.gz   (another study into the running Orthanc)
# `up` starts Orthanc (DICOMweb, authentication, own network namespace), stores a FLAIR/T1 study (default: the
# synthetic subject of `msxai synth --n 1 --seed 7`) and starts the msxai MONAI Label app on Orthanc's DICOMweb;
# then open http://127.0.0.1:8000/ohif/ . Needs: Debian packages orthanc orthanc-dicomweb (scripts/install_ohif_deps.sh)
# and root (or CAP_SYS_ADMIN) for the network namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export PYTHONPATH="$PWD/apps/msxai${PYTHONPATH:+:$PYTHONPATH}"   # the app's deploy package
exec .venv/bin/python -m deploy.ohif_stack "$@"
