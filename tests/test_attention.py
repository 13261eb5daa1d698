"""Attention for packed rows: the fastest exact implementation is measured and chosen (src/training/attention.py)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from src.config import SFTConfig
from src.training.attention import (
    attention_module_class,
    candidate_implementations,
    choose_for_packed_rows,
    measure_packed_attention,
)
from src.training.sft_trainer import SFTTrainer
from tests.helpers import make_config

# Three documents in the first row, two in the second: what a packed batch looks like.
POSITION_IDS = torch.tensor([list(range(20)) + list(range(30)) + list(range(14)),
                             list(range(40)) + list(range(24))])


def _model(tiny_model_dir, attn="eager"):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, dtype=torch.float32)


def test_the_faster_exact_candidate_is_chosen_and_the_model_switched(tiny_model_dir):
    model = _model(tiny_model_dir, "eager")
    choice = choose_for_packed_rows(model, POSITION_IDS, torch.device("cpu"), torch.float32, ["sdpa", "eager"])
    assert choice.measured and set(choice.step_ms) == {"sdpa", "eager"} and not choice.excluded
    assert all(ms > 0 for ms in choice.step_ms.values())
    assert choice.implementation == min(choice.step_ms, key=choice.step_ms.get)
    assert model.config._attn_implementation == choice.implementation
    meta = choice.as_metadata()
    assert meta["implementation"] == choice.implementation and set(meta["estimated_attention_ms_per_step"]) == {"sdpa", "eager"}


def _mask_ignoring_attention(module, query, key, value, attention_mask, **kwargs):
    """A real, fast, wrong implementation: plain causal attention over the whole row, packing ignored."""
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


def test_a_candidate_that_ignores_the_documents_is_left_out_however_fast(tiny_model_dir):
    AttentionInterface.register("causal_only_test", _mask_ignoring_attention)
    AttentionMaskInterface.register("causal_only_test", sdpa_mask)
    model = _model(tiny_model_dir, "sdpa")
    choice = measure_packed_attention(model.config, attention_module_class(model), POSITION_IDS, torch.device("cpu"),
                                      torch.float32, ["sdpa", "causal_only_test"])
    assert choice.implementation == "sdpa" and "causal_only_test" not in choice.step_ms
    assert "not exact" in choice.excluded["causal_only_test"]
    # The same implementation on rows of one document each is exact, so it is not excluded there.
    single = torch.arange(64).repeat(2, 1)
    choice = measure_packed_attention(model.config, attention_module_class(model), single, torch.device("cpu"),
                                      torch.float32, ["sdpa", "causal_only_test"])
    assert set(choice.step_ms) == {"sdpa", "causal_only_test"}


class _SlowStart:
    """An exact implementation with a one-off cost on its first two calls, as compiled kernels have (flex attention
    compiles for the first length, then once more for dynamic shapes)."""

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, 0

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.calls += 1
        if self.calls <= 2:
            time.sleep(self.seconds)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def test_a_one_off_setup_cost_counts_once_over_the_planned_passes(tiny_model_dir):
    AttentionInterface.register("slow_start_test", _SlowStart(0.4))
    AttentionMaskInterface.register("slow_start_test", sdpa_mask)
    model = _model(tiny_model_dir, "sdpa")
    choice = measure_packed_attention(model.config, attention_module_class(model), POSITION_IDS, torch.device("cpu"),
                                      torch.float32, ["sdpa", "slow_start_test"], planned_passes=1)
    assert set(choice.step_ms) == {"sdpa", "slow_start_test"}  # exact, so measured
    assert choice.setup_ms["slow_start_test"] >= 600 and choice.setup_ms["slow_start_test"] > choice.setup_ms["sdpa"] + 500
    assert choice.setup_ms["slow_start_test"] < 5000  # the timed passes came after it: not counted per pass
    assert choice.implementation == "sdpa"  # one pass does not pay 0.8 s of setup back
    assert choice.pick(10**9) == min(choice.step_ms, key=choice.step_ms.get)  # a long run goes by the cost per pass
    assert choice.as_metadata()["planned_passes"] == 1


def test_a_candidate_that_cannot_run_is_left_out_with_its_error(tiny_model_dir):
    model = _model(tiny_model_dir, "sdpa")
    choice = measure_packed_attention(model.config, attention_module_class(model), POSITION_IDS, torch.device("cpu"),
                                      torch.float32, ["sdpa", "no_such_kernel"])
    assert choice.implementation == "sdpa" and "KeyError" in choice.excluded["no_such_kernel"]


def test_cpu_runs_keep_sdpa_without_measuring_and_record_it(tiny_model_dir, pairs_file, tmp_path):
    assert candidate_implementations(torch.device("cpu")) == ["sdpa"]
    out = tmp_path / "o"
    trainer = SFTTrainer(make_config(tiny_model_dir, pairs_file, out, max_steps=1, packing=True,
                                     attn_implementation="auto"))
    trainer.train()
    trainer.save_model()
    metadata = json.loads((out / "sft_metadata.json").read_text(encoding="utf-8"))
    assert metadata["attention"] == {"implementation": "sdpa", "measured": False, "estimated_attention_ms_per_step": {},
                                     "setup_ms": {}, "planned_passes": None, "excluded": {}}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without a GPU")
def test_flex_attention_training_on_cpu_is_refused_with_the_reason(tiny_model_dir, pairs_file, tmp_path):
    assert SFTConfig(attn_implementation="flex_attention").attn_implementation == "flex_attention"
    with pytest.raises(ValueError, match="SFTConfig.attn_implementation='flash' is invalid"):
        SFTConfig(attn_implementation="flash")
    trainer = SFTTrainer(make_config(tiny_model_dir, pairs_file, tmp_path / "o", max_steps=1,
                                     attn_implementation="flex_attention"))
    with pytest.raises(ValueError, match="flex_attention' trains only on a CUDA GPU"):
        trainer.train()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures the GPU kernels (sdpa, flex, flash); no GPU here")
def test_on_a_gpu_the_choice_trains_to_the_same_losses_as_sdpa(tiny_model_dir, pairs_file, tmp_path):
    losses = {}
    for attn in ("auto", "sdpa"):
        trainer = SFTTrainer(make_config(tiny_model_dir, pairs_file, tmp_path / attn, max_steps=3, packing=True,
                                         logging_steps=1, attn_implementation=attn, bf16=False))
        trainer.train()
        losses[attn] = [h["loss"] for h in trainer.trainer.state.log_history if "loss" in h]
        if attn == "auto":
            assert trainer.attention.measured and trainer.attention.implementation in trainer.attention.step_ms
    assert losses["auto"] == pytest.approx(losses["sdpa"], rel=1e-3)


def test_planned_passes_follow_the_steps_or_the_epochs(tmp_path):
    from transformers import TrainingArguments

    def args(**kw):
        return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, report_to="none", **kw)

    rows = list(range(10))
    assert SFTTrainer._planned_passes(rows, args(max_steps=5, gradient_accumulation_steps=2)) == 10
    assert SFTTrainer._planned_passes(rows, args(num_train_epochs=2)) == 6  # ceil(10 / 4) x 2
    assert SFTTrainer._planned_passes(rows, args(num_train_epochs=1.5)) == 6  # a started epoch counts whole
