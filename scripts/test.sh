#!/usr/bin/env bash
# Set up, then run the test suite (offline, CPU, tiny models).
# The tests run on every core (pytest-xdist, one worker per core (nproc); a test module stays on one worker, so its
# module-scoped fixtures, trained runs most of them, are built once): each test process uses one CPU thread
# (tests/conftest.py), so a 2-core machine runs two tests at a time.
# TEST_WORKERS=0 runs them in this one process (a debugger, or timing one test alone); TEST_WORKERS=N sets the count.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_DEEPSPEED=1 bash scripts/setup.sh
. .venv/bin/activate
WORKERS=${TEST_WORKERS:-$(nproc)}
if [ "$WORKERS" = 0 ]; then
    exec python -m pytest "$@"
fi
exec python -m pytest -n "$WORKERS" --dist loadscope --no-loadscope-reorder "$@"
