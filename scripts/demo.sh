#!/usr/bin/env bash
# Set up, then train the tiny offline Qwen2 model on the shipped Arabic sample set (CPU, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python train_sft.py --config configs/sft_demo.yaml "$@"
