#!/usr/bin/env bash
# Set up, then run the test suite (offline, CPU, tiny models).
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_DEEPSPEED=1 bash scripts/setup.sh
. .venv/bin/activate
python -m pytest "$@"
