#!/usr/bin/env bash
# Set up, then train the tiny offline Qwen2 model on the shipped Arabic sample set (CPU: 1-2 minutes on 2 cores once
# set up, measured with other work running; the first run also creates .venv and installs the packages).
# The training process picks its CPU thread count before training and says so in one log line ("Training on CPU
# with N threads ..."): the cores of this machine not busy with other work. OMP_NUM_THREADS=N overrides it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
start=$SECONDS
python train_sft.py --config configs/sft_demo.yaml "$@"
echo "demo: trained, evaluated and sampled in $((SECONDS - start)) s"
