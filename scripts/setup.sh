#!/usr/bin/env bash
# Create .venv (once) and install the project with its test and eval extras.
# torch==2.13.0 goes first: on the project's machines that pin is a CPU build already on disk; any other
# spec would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch, transformers, peft, datasets, accelerate, sacrebleu, matplotlib, pytest, hypothesis, src" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
    # (the filter drops pip's notes about this machine's unused local package folders)
    quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
    quiet python -m pip install -q --upgrade pip
    quiet python -m pip install -q torch==2.13.0
    quiet python -m pip install -q -e ".[eval,test]"
    touch .venv/.installed
fi
