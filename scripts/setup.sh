#!/usr/bin/env bash
# Create .venv (once) and install the project with its test and eval extras (WITH_DEEPSPEED=1: DeepSpeed too,
# built against the installed torch, for the sharded-training tests).
# torch==2.13.0 goes first: on the project's machines that pin is a CPU build already on disk; any other
# spec would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
# Installed? Each package is looked up, not imported (importing them all took 12 s of every test or demo start);
# an install that stopped halfway leaves no .venv/.installed, and pyproject.toml newer than it reinstalls.
NEEDED="torch transformers peft datasets accelerate sacrebleu matplotlib pytest xdist hypothesis src"
if [ "${WITH_DEEPSPEED:-0}" = 1 ]; then NEEDED="$NEEDED deepspeed"; fi
CHECK="import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))"
if [ ! -f .venv/.installed ] || ! python -c "$CHECK" $NEEDED 2>/dev/null || [ pyproject.toml -nt .venv/.installed ]; then
    # (the filter drops pip's notes about this machine's unused local package folders)
    quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
    quiet python -m pip install -q --upgrade pip
    quiet python -m pip install -q torch==2.13.0
    quiet python -m pip install -q -e ".[eval,test]"
    if [ "${WITH_DEEPSPEED:-0}" = 1 ]; then
        quiet python -m pip install -q setuptools wheel
        quiet python -m pip install -q --no-build-isolation "deepspeed==0.19.8"
    fi
    touch .venv/.installed
fi
