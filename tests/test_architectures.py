"""Every Qwen architecture family trains exactly (src/models/architectures.py): Qwen2, Qwen3, Qwen3-MoE, and the
hybrid linear-attention Qwen3.5 and Qwen3.5-MoE, each a tiny random-init model built with its own config class.

The matrix: family x {full fine-tuning, LoRA} x {packing on, off} x gradient checkpointing. Each run asserts that
packed documents train exactly as alone (logits 1e-5) or that the run did not pack them (hybrid models on a CPU:
their linear-attention layers leak across documents without the GPU kernels), that the trained-tokens loss equals
the full-logits loss and the model's own loss with labels (MoE: its router loss included) with the same gradients,
and that gradient checkpointing changes nothing. Then save -> load -> export (merge) -> greedy generation, cached
and uncached, equal everywhere.
"""

import json
import logging
import os

import pytest
import torch

from src.models.architectures import FAMILIES
from src.training.losses import FullLogitsLoss, TrainedTokensLoss
from src.training.sft_trainer import SFTTrainer
from tests.helpers import PAIRS, make_config, write_jsonl

FAMILY_NAMES = ["qwen2", "qwen3", "qwen3-moe", "qwen3.5", "qwen3.5-moe"]
HYBRID = {"qwen3.5", "qwen3.5-moe"}
MOE = {"qwen3-moe", "qwen3.5-moe"}
# The matrices below train every family; the quick loop (-m "not slow") keeps the default family, Qwen2.
FAMILY_PARAMS = [family if family == "qwen2" else pytest.param(family, marks=pytest.mark.slow) for family in FAMILY_NAMES]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("arch") / "d.jsonl", PAIRS * 2)


def run_config(model_dir, data, out, lora, packing, checkpointing, **overrides):
    extra = dict(use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["all-linear"]) if lora else {}
    settings = dict(max_steps=3, logging_steps=1, per_device_train_batch_size=2, seed=0, **extra)
    return make_config(model_dir, data, out, packing=packing, gradient_checkpointing=checkpointing,
                       **{**settings, **overrides})


def batch_of(trainer, n=2):
    dataset = trainer.trainer.train_dataset
    rows = [dataset[i] for i in range(min(n, len(dataset)))]
    keys = [k for k in ("input_ids", "labels", "position_ids") if k in dataset.column_names]
    return trainer.trainer.data_collator([{k: row[k] for k in keys} for row in rows])


def own_loss(model, batch, moe):
    """transformers' own loss with labels (MoE: with its router loss, output_router_logits=True)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs, labels=batch["labels"], use_cache=False, **({"output_router_logits": True} if moe else {})).loss


def assert_losses_agree(trainer, batch, moe):
    """Trained-tokens loss == full-logits loss == the model's own loss, and the two losses' gradients agree."""
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for loss in (TrainedTokensLoss(chunk_size=16), FullLogitsLoss()):
        loss.router_aux_coef = trainer.loss.router_aux_coef
        model.zero_grad()
        value = loss(model, batch).loss
        value.backward()
        results[loss.name] = (value.item(), [p.grad.clone() for p in params])
    model.zero_grad()
    with torch.no_grad():
        own = own_loss(model, batch, moe).item()
    assert (trainer.loss.router_aux_coef > 0) == moe
    assert results["trained_tokens"][0] == pytest.approx(results["full_logits"][0], rel=1e-5)
    assert results["trained_tokens"][0] == pytest.approx(own, rel=1e-5)
    scale = max(g.abs().max().item() for g in results["full_logits"][1])
    for a, b in zip(results["trained_tokens"][1], results["full_logits"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


def assert_packed_rows_exact(trainer):
    """Each document of a packed row gets the logits it gets alone."""
    dataset = trainer.trainer.train_dataset
    row = next(dataset[i] for i in range(len(dataset)) if dataset[i]["num_examples"] > 1)
    ids, positions = torch.tensor([row["input_ids"]]), torch.tensor([row["position_ids"]])
    starts = (positions[0] == 0).nonzero().squeeze(1).tolist() + [ids.shape[1]]
    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        for start, end in zip(starts, starts[1:]):
            alone = model(input_ids=ids[:, start:end], use_cache=False).logits
            assert (packed[:, start:end] - alone).abs().max().item() < 1e-5
    model.train()


def train_run(model_dir, data, out, lora, packing, checkpointing):
    trainer = SFTTrainer(run_config(model_dir, data, out, lora, packing, checkpointing))
    trainer.train()
    return trainer, [h["loss"] for h in trainer.trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packing"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_every_family_trains_exactly(family, lora, packing, tiny_family_dir, data, tmp_path):
    model_dir = tiny_family_dir(family)
    runs = {gc: train_run(model_dir, data, tmp_path / f"gc{gc}", lora, packing, gc) for gc in (False, True)}
    trainer, losses = runs[False]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    # gradient checkpointing recomputes exactly what it dropped (hybrid and MoE layers included)
    assert runs[True][1] == pytest.approx(losses, rel=1e-5)
    metadata = json.loads((tmp_path / "gcFalse" / "sft_metadata.json").read_text(encoding="utf-8"))
    assert metadata["architecture"]["verified"] and metadata["architecture"]["moe"] == (family in MOE)
    assert metadata["architecture"]["hybrid_linear_attention"] == (family in HYBRID)
    layout = metadata["packed_layout"]["layout"]
    columns = trainer.trainer.train_dataset.column_names
    if not packing:
        assert layout == "unpacked" and "position_ids" not in columns
    elif family in HYBRID:  # no linear-attention kernels on a CPU: the run did not pack, and says so
        assert layout == "unpacked-fallback" and "linear-attention" in metadata["packed_layout"]["reason"]
        assert "position_ids" not in columns and "num_examples" not in columns
    else:
        assert layout == "rows" and "position_ids" in columns
        assert_packed_rows_exact(trainer)
    if family in MOE:
        aux = [h["aux_loss"] for h in trainer.trainer.state.log_history if "loss" in h]
        assert len(aux) == 3 and all(a > 0 for a in aux)
    assert_losses_agree(trainer, batch_of(trainer), family in MOE)


@pytest.mark.parametrize("family", sorted(HYBRID))
def test_hybrid_models_leak_across_packed_documents_without_their_kernels(family, tiny_family_dir):
    """Why the hybrid fallback exists: restarting positions isolate the full-attention layers only."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_family_dir(family)).eval()
    a, b = torch.arange(5, 25)[None], torch.arange(40, 55)[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat([a, b], 1), position_ids=torch.cat([torch.arange(20), torch.arange(15)])[None],
                       use_cache=False).logits
        first, second = model(input_ids=a, use_cache=False).logits, model(input_ids=b, use_cache=False).logits
    assert (packed[:, :20] - first).abs().max() < 1e-5
    assert (packed[:, 20:] - second).abs().max() > 1e-3  # the second document sees the first one


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_save_load_export_and_generate_alike(family, lora, tiny_family_dir, data, tmp_path):
    from transformers import AutoModelForCausalLM

    from src.training.export import export_run

    out = tmp_path / "run"
    trainer = SFTTrainer(run_config(tiny_family_dir(family), data, out, lora, False, True, max_steps=4,
                                    learning_rate=1e-2, instruction_template="chatml"))
    trainer.train()
    if lora and family in MOE:  # the experts' fused weights got adapters and trained; the routers stayed frozen
        trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert any("experts" in n and "lora_" in n for n in trained)
        assert not any(n.split(".")[-2] in ("gate", "shared_expert_gate") or ".gate." in n for n in trained)
    prompts = [p["instruction"] for p in PAIRS[:3]]
    expected = trainer.batch_generate(prompts, max_length=6, batch_size=3)
    assert expected == [trainer.generate_response(p, max_length=6) for p in prompts]  # left padding changes nothing
    restored = SFTTrainer(make_config(str(out), None, tmp_path / "unused"))
    restored.load_model(str(out))
    assert restored.batch_generate(prompts, max_length=6) == expected
    target = tmp_path / "exported"
    export_run(str(out), str(target))
    plain = AutoModelForCausalLM.from_pretrained(str(target)).eval()
    assert not hasattr(plain, "peft_config") and type(plain).__name__ == type(restored.model.get_base_model()
                                                                             if lora else restored.model).__name__
    for prompt, answer in zip(prompts, expected):
        ids = torch.tensor([trainer.example_tokenizer().encode_prompt(prompt)])
        with torch.no_grad():
            cached = plain.generate(ids, max_new_tokens=6, do_sample=False)
            uncached = plain.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
        assert cached.tolist() == uncached.tolist()  # the model's cache (the hybrid one too) is exact
        text = trainer.tokenizer.decode(cached[0, ids.shape[1]:], skip_special_tokens=True).strip()
        assert text == answer


def test_moe_logged_loss_is_transformers_own_loss_with_the_router_loss(tiny_family_dir, tmp_path):
    """One step on one batch: the logged loss is the model's own loss with labels and output_router_logits=True;
    aux_loss is its router loss. Two micro-batches average the router loss instead of adding it twice."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_family_dir("qwen3-moe")
    rows = write_jsonl(tmp_path / "d.jsonl", PAIRS[:4])
    trainer = SFTTrainer(make_config(model_dir, rows, tmp_path / "one", max_steps=1, logging_steps=1, seed=0,
                                     per_device_train_batch_size=4, group_by_length=False))
    trainer.prepare()
    batch = trainer.trainer.data_collator([trainer.trainer.train_dataset[i] for i in range(4)])
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        outputs = reference(**batch, use_cache=False, output_router_logits=True)
        tokens_only = reference(**batch, use_cache=False).loss
    trainer.train()
    logged = next(h for h in trainer.trainer.state.log_history if "loss" in h)
    coef = reference.config.router_aux_loss_coef
    assert coef > 0 and outputs.loss > tokens_only
    assert logged["loss"] == pytest.approx(outputs.loss.item(), rel=1e-5)
    assert logged["aux_loss"] == pytest.approx(outputs.aux_loss.item(), rel=1e-5)

    # gradient accumulation: 2 micro-batches of 2 = token loss of all 4 + coef x the mean of their router losses
    trainer = SFTTrainer(make_config(model_dir, rows, tmp_path / "two", max_steps=1, logging_steps=1, seed=0,
                                     per_device_train_batch_size=2, gradient_accumulation_steps=2, group_by_length=False))
    trainer.prepare()
    dataset = trainer.trainer.train_dataset
    order = list(iter(trainer.trainer._get_train_sampler(dataset)))
    with torch.no_grad():
        parts = [reference(**trainer.trainer.data_collator([dataset[i] for i in order[s:s + 2]]), use_cache=False,
                           output_router_logits=True) for s in (0, 2)]
    labels = [trainer.trainer.data_collator([dataset[i] for i in order[s:s + 2]])["labels"] for s in (0, 2)]
    counts = [(lab[:, 1:] != -100).sum().item() for lab in labels]
    expected_tokens = sum((p.loss - coef * p.aux_loss).item() * n for p, n in zip(parts, counts)) / sum(counts)
    expected = expected_tokens + coef * sum(p.aux_loss.item() for p in parts) / 2
    trainer.train()
    logged = next(h for h in trainer.trainer.state.log_history if "loss" in h)
    assert logged["loss"] == pytest.approx(expected, rel=1e-5)
    assert logged["aux_loss"] == pytest.approx(sum(p.aux_loss.item() for p in parts) / 2, rel=1e-5)


def test_router_loss_can_be_turned_off(tiny_family_dir, data, tmp_path):
    trainer = SFTTrainer(run_config(tiny_family_dir("qwen3.5-moe"), data, tmp_path / "r", False, False, False,
                                    router_aux_loss_coef=0.0))
    trainer.train()
    assert trainer.loss.router_aux_coef == 0.0
    assert all("aux_loss" not in h for h in trainer.trainer.state.log_history)
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        make_config(tiny_family_dir("qwen3.5-moe"), data, tmp_path / "x", router_aux_loss_coef=-1.0)


def test_moe_lora_options(tiny_family_dir, data, tmp_path, caplog):
    model_dir = tiny_family_dir("qwen3-moe")
    # peft's expert adapters take no dropout: a clear error instead of a traceback deep in peft
    with pytest.raises(ValueError, match="lora_dropout=0.1.*expert"):
        SFTTrainer(run_config(model_dir, data, tmp_path / "a", True, False, False, lora_dropout=0.1)).setup_model()
    with caplog.at_level(logging.INFO, logger="src.models.loading"):
        trainer = SFTTrainer(run_config(model_dir, data, tmp_path / "b", True, False, False, lora_train_router=True,
                                        lora_target_modules=["q_proj", "v_proj", "experts"]))
        trainer.setup_model()
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any(n.endswith("mlp.gate.modules_to_save.default.weight") for n in trained)  # the router, in full
    assert any("experts" in n and "lora_A" in n for n in trained)
    assert not any("o_proj" in n for n in trained)
    assert "trainable parameters of" in caplog.text and "routers trained in full" in caplog.text
    with pytest.raises(ValueError, match="routers"):
        SFTTrainer(run_config(model_dir, data, tmp_path / "c", True, False, False, lora_target_modules=["gate"])).setup_model()
    with pytest.raises(ValueError, match="no MoE routers"):
        SFTTrainer(run_config(tiny_family_dir("qwen3"), data, tmp_path / "d", True, False, False,
                              lora_train_router=True)).setup_model()


def test_an_unverified_architecture_trains_after_a_one_line_warning(tiny_tokenizer, data, tmp_path, caplog):
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "llama"
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    with caplog.at_level(logging.WARNING, logger="src.models.architectures"):
        trainer = SFTTrainer(make_config(str(model_dir), data, tmp_path / "run", max_steps=1))
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "not one of the verified families" in r.getMessage()]
    assert len(warnings) == 1 and "'llama'" in warnings[0] and "\n" not in warnings[0]
    metadata = json.loads((tmp_path / "run" / "sft_metadata.json").read_text(encoding="utf-8"))
    assert metadata["architecture"] == {"model_type": "llama", "family": None, "verified": False,
                                        "hybrid_linear_attention": False, "moe": False}


def test_the_tiny_model_names_build_each_family(data, tmp_path):
    from src.models.loading import resolve_model_path
    from src.models.tiny import TINY_MODELS

    assert sorted(f.tiny for f in FAMILIES) == sorted(TINY_MODELS)
    path = resolve_model_path("local:tiny-qwen3.5-moe", str(tmp_path), data)
    assert json.load(open(os.path.join(path, "config.json")))["model_type"] == "qwen3_5_moe_text"
    # the same folder asked for another family is rebuilt as that family, not reused
    path = resolve_model_path("local:tiny-qwen3", str(tmp_path), data)
    assert json.load(open(os.path.join(path, "config.json")))["model_type"] == "qwen3"
    with pytest.raises(ValueError, match="local:tiny-qwen3.5-moe"):
        resolve_model_path("local:tiny-llama", str(tmp_path), data)


def test_hybrid_rows_on_a_gpu_carry_their_document_boundaries():
    """The collator side of the exact hybrid path (the GPU isolation test is in tests/test_gpu_hybrid.py)."""
    from src.data.packing import SFTDataCollator

    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "position_ids": [0, 1, 2, 0, 1]},
            {"input_ids": [3, 4, 5], "labels": [-100, 4, 5], "position_ids": [0, 1, 2]}]
    batch = SFTDataCollator(0, flatten_packed=True, boundaries=True)(rows)
    assert batch["input_ids"].shape == (1, 8)
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 8] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 3
    assert batch["seq_idx"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]] and batch["seq_idx"].dtype == torch.int32
