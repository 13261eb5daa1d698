#!/usr/bin/env bash
# The GPU checks still pending (issues #9 and #11), as one bounded script for a lent GPU machine (~8 minutes):
#
#   bash bench/device_pending.sh       # carry .whl/ (datasets, dill, multiprocess, fsspec, trl 1.16.0, transformers
#                                      # 5.24.0, pytest, liger-kernel, bitsandbytes wheels) and .devshared/qwen2.5-tokenizer
#
# 1. bench/attention_packed.py: sdpa / flex_attention / flash_attention_2 on packed rows (what "auto" picks);
#    bench/loss_gpu_steps.py: the loss alone, prompt-heavy and response-heavy trained shares.
# 2. Ours against TRL, defaults against defaults (fused AdamW both), 0.5B full, prompt-heavy, with per-step
#    allocator counters (allocator_per_step in the JSON) to find the slow steps' cause; then one profiled rerun
#    of ours over the timed steps (profile_top_ops in its JSON).
# 3. QLoRA: Qwen2.5-7B shape (random init), 4-bit NF4 base, LoRA r16 on all seven projections, gradient
#    checkpointing (the specification's default; without it 4 x 2048 tokens of 7B activations may not fit), 10 steps.
# 4. use_liger_kernel=true against off (ours, 0.5B full), where liger-kernel is installed.
# 5. The GPU-only tests (attention choice, Liger, QLoRA, FSDP2).
# 6. Hybrid linear attention with packing (issue #18): whether flash-linear-attention and causal-conv1d import here
#    (carry their wheels in .whl/: pip download --no-deps -d .whl flash-linear-attention fla-core; causal-conv1d has no CUDA wheel on PyPI and builds from source only with nvcc), then
#    tests/test_gpu_hybrid.py: packed Qwen3.5 rows flattened with their document boundaries are exact (it skips, with
#    the reason, when a kernel is missing: the run then trains unpacked, as on a CPU).
# 7. Loss per data source (issue #23) on the GPU's loss paths (fused head, chunks, bf16): tests/test_per_source_loss.py
#    runs its tiny models on the GPU when one is there (recombination into eval_loss, the four loss paths agree).
# Results under "$OUT" (attention.json, defaults/, profiled/, qlora/, liger/, pytest.log).
# CPU dry run of the wiring: SKIP_WHEELS=1 DRY=1 bash bench/device_pending.sh
cd "$(dirname "$0")/.." || exit 1
if [ "${SKIP_WHEELS:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
OUT="${OUT:-./bench_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
if [ "${DRY:-0}" = 1 ]; then  # tiny settings, same code paths, for a CPU machine
  SHAPE=(--shape cpu-small); FULL=cpu-small-lora; QLORA=cpu-small-lora; STEPS=(--warmup 1 --steps 2); QEXTRA=""
else
  SHAPE=(); FULL=0.5b-full; QLORA=7b-lora; STEPS=(--warmup 3 --steps 10); QEXTRA="load_in_4bit=true"
fi
run() { echo "== $*"; timeout "${STEP_TIMEOUT_S:-240}" "$@" 2>&1 | tail -40; }
# PARTS picks and orders the parts (the whole list takes about 10 minutes on an H100: split it over two calls).
PARTS="${PARTS:-attention loss defaults qlora tests liger profiled hybrid per_source}"
want() { [[ " $PARTS " == *" $1 "* ]]; }

want attention && run $PY bench/attention_packed.py "${SHAPE[@]}" --json "$OUT/attention.json"
# the loss alone (0.5B shape, bf16, AdamW): fused step against full logits and the previous checkpointed chunks
want loss && [ "${DRY:-0}" != 1 ] && { run $PY bench/loss_gpu_steps.py; run $PY bench/loss_gpu_steps.py --trained 7400; }
want defaults && run $PY bench/train_vs_trl.py --combos "$FULL:prompt-heavy" --ours-loss-types trained_tokens "${STEPS[@]}" \
  --ours-extra 'optim="adamw_torch_fused"' --trl-extra 'optim="adamw_torch_fused"' --out-dir "$OUT/defaults" --budget-s 150
want profiled && PROFILE_STEPS=$(seq -s, 4 13) run $PY bench/train_vs_trl.py --combos "$FULL:prompt-heavy" --frameworks ours \
  --ours-loss-types trained_tokens "${STEPS[@]}" --out-dir "$OUT/profiled" --no-loss-check
want qlora && STEP_TIMEOUT_S=330 run $PY bench/train_vs_trl.py --combos "$QLORA:prompt-heavy" --frameworks ours --ours-loss-types trained_tokens \
  "${STEPS[@]}" ${QEXTRA:+--ours-extra "$QEXTRA"} --gradient-checkpointing --out-dir "$OUT/qlora" --run-timeout-s 300
if ! want liger; then :
elif $PY -c "import liger_kernel" 2>/dev/null; then
  run $PY bench/train_vs_trl.py --combos "$FULL:prompt-heavy" --frameworks ours --ours-loss-types trained_tokens \
    "${STEPS[@]}" --ours-extra 'use_liger_kernel=true' --out-dir "$OUT/liger"
else
  echo "== liger: liger_kernel not importable, skipped"
fi
want tests && run $PY -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_kernels.py \
  "tests/test_lora_options.py::test_qlora_trains_adapters_on_a_4bit_base_and_saves_only_them" \
  tests/distributed/test_sharded.py -k "gpu or qlora or liger or attention" 2>&1 | tee "$OUT/pytest.log" | tail -15
if want hybrid; then
  for pkg in fla causal_conv1d; do $PY -c "import $pkg; print('$pkg', getattr($pkg, '__version__', '?'))" 2>&1 | tail -1; done \
    | tee "$OUT/hybrid_kernels.txt"
  run $PY -m pytest -q -p no:cacheprovider -rs tests/test_gpu_hybrid.py 2>&1 | tee "$OUT/hybrid.log" | tail -15
fi
want per_source && run $PY -m pytest -q -p no:cacheprovider -m "not slow" tests/test_per_source_loss.py 2>&1 \
  | tee "$OUT/per_source.log" | tail -15
