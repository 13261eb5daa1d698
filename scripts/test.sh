#!/usr/bin/env bash
# Set up, then run the test suite (offline, CPU, tiny models).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest "$@"
