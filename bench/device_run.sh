#!/usr/bin/env bash
# The one command for the GPU machine: ours against TRL 1.16 (bench/train_vs_trl.py), bounded to ~6 minutes.
#
#   bash bench/device_run.sh            # needs .whl/ (wheels) and .devshared/qwen2.5-tokenizer carried along
#
# That machine has torch/transformers/peft/accelerate/pyarrow but not datasets or trl and no internet, so the
# wheels in .whl/ are installed into /tmp/site first (skipped when .whl/ has none or SKIP_WHEELS=1). Results:
# "$OUT"/train_vs_trl.json (rewritten after every run), "$OUT"/train_vs_trl.log and one log per run.
# Overrides (env): COMBOS (setup:data,...), or SETUPS and DATA; WARMUP, STEPS, BUDGET_S, BENCH_ARGS (extra flags).
# Local dry run on a CPU: SKIP_WHEELS=1 SETUPS=cpu-small-lora WARMUP=1 STEPS=2 bash bench/device_run.sh
cd "$(dirname "$0")/.." || exit 1
if [ "${SKIP_WHEELS:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  echo "wheels: not installed (SKIP_WHEELS=${SKIP_WHEELS:-0}, $(ls .whl/*.whl 2>/dev/null | wc -l) wheels in .whl/)"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
OUT="${OUT:-./bench_out}"
mkdir -p "$OUT" || exit 1
PY="${PYTHON:-python3}"

{ nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>/dev/null || echo "nvidia-smi: none"
  $PY - <<'EOF'
import importlib, sys
out = [f"python {sys.version.split()[0]}"]
for name in ("torch", "transformers", "trl", "datasets", "peft", "accelerate", "huggingface_hub", "tokenizers", "pandas", "pyarrow"):
    try:
        module = importlib.import_module(name)
        out.append(f"{name} {module.__version__} ({module.__file__.rsplit('/', 2)[0]})" if name in ("trl", "transformers", "datasets") else f"{name} {module.__version__}")
    except Exception as exc:  # report, the bench says what it can still run
        out.append(f"{name} MISSING ({type(exc).__name__}: {exc})")
import torch
out.append(f"cuda {torch.cuda.is_available()} {torch.version.cuda}")
print("; ".join(out))
EOF
} 2>&1 | tee "$OUT/versions.txt"

if [ -n "${SETUPS:-}" ]; then
  WHAT=(--setups "$SETUPS" --data "${DATA:-prompt-heavy}")
else
  WHAT=(--combos "${COMBOS:-0.5b-full:prompt-heavy,1.5b-lora:prompt-heavy,0.5b-full:response-heavy}")
fi
# shellcheck disable=SC2086
$PY bench/train_vs_trl.py "${WHAT[@]}" --ours-loss-types trained_tokens,full_logits \
  --warmup "${WARMUP:-3}" --steps "${STEPS:-10}" --budget-s "${BUDGET_S:-300}" --run-timeout-s "${RUN_TIMEOUT_S:-240}" \
  --out-dir "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/train_vs_trl.log"
