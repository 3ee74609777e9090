#!/usr/bin/env bash
# The README's main job: set up (if needed), then run `msxai demo` on the embedded default
# (a synthetic patient generated from a fixed seed). Extra arguments go to `msxai demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/msxai demo "$@"
