import random

import pytest
import torch
from datasets import Dataset

from src.config import SFTConfig
from src.data.arrow import IGNORE_INDEX
from src.data.packing import SFTDataCollator, best_fit_decreasing, pack_dataset, padding_efficiency
from src.training.losses import token_loss_sum
from src.training.sft_trainer import create_sft_trainer
from tests.helpers import PAIRS, write_jsonl


def test_best_fit_decreasing_places_every_example_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 128)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    lower_bound = -(-sum(lengths) // 128)
    assert len(bins) <= lower_bound * 1.05 + 1  # near-optimal
    assert best_fit_decreasing(lengths, 128) == bins  # deterministic
    with pytest.raises(ValueError, match="more than the row capacity"):
        best_fit_decreasing([10, 200], 128)


def test_best_fit_chooses_the_tightest_bin():
    # 6 and 5 open two bins (free 4 and 5); 4 must go to the bin with exactly 4 free, leaving room for a 5.
    assert best_fit_decreasing([6, 5, 5, 4], 10) == [[0, 3], [1, 2]]


def _packed_dataset(n=6, seed=0, vocab=500):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(5, 30)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2:]
        rows.append({"input_ids": ids, "labels": labels})
    return Dataset.from_list(rows)


def test_packed_rows_restart_positions_and_mask_the_seam():
    ds = _packed_dataset()
    packed = pack_dataset(ds, 64)
    assert sum(packed["num_examples"]) == len(ds)
    for row in packed:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert len(starts) == row["num_examples"]
        for s in starts:
            assert row["labels"][s] == IGNORE_INDEX  # nothing is trained across a seam
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= 64


def _model(tiny_model_dir, attn):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, dtype=torch.float32).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager", pytest.param("flex_attention", marks=pytest.mark.slow)])
def test_packed_examples_see_only_themselves(tiny_model_dir, attn):
    model = _model(tiny_model_dir, attn)
    ds = _packed_dataset(n=8, vocab=model.config.vocab_size)
    packed = pack_dataset(ds, 80)
    collator = SFTDataCollator(pad_token_id=0)
    batch = collator(list(packed))  # several packed rows, padded: padding is one more isolated sequence
    assert "attention_mask" not in batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits
    worst = worst_leaky = 0.0
    for r, row in enumerate(packed):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for s, e in zip(starts, starts[1:]):
            ids = torch.tensor([row["input_ids"][s:e]])
            with torch.no_grad():
                alone = model(input_ids=ids, use_cache=False).logits[0]
            scale = alone.abs().max()
            worst = max(worst, ((logits[r, s:e] - alone).abs().max() / scale).item())
            worst_leaky = max(worst_leaky, ((leaky[r, s:e] - alone).abs().max() / scale).item())
    assert worst < 1e-5
    assert worst_leaky > 1e-2  # with isolation removed (a 2-D all-ones mask) the same check fails


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_unpacked_per_token_loss_are_equal(tiny_model_dir, attn):
    model = _model(tiny_model_dir, attn)
    ds = _packed_dataset(n=8, vocab=model.config.vocab_size)
    collator = SFTDataCollator(pad_token_id=0)
    with torch.no_grad():
        plain = collator(list(ds))
        s1, n1 = token_loss_sum(model(**{k: v for k, v in plain.items() if k != "labels"}).logits, plain["labels"])
        packed = collator(list(pack_dataset(ds, 80)))
        s2, n2 = token_loss_sum(model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                                      use_cache=False).logits, packed["labels"])
    assert n1 == n2
    assert (s1 / n1).item() == pytest.approx((s2 / n2).item(), rel=1e-5)


def test_packed_evaluation_equals_unpacked_evaluation(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    results = {}
    for packing in (False, True):
        config = SFTConfig(model_name=tiny_model_dir, dataset_path=data, eval_dataset_path=data, output_dir=str(tmp_path / str(packing)),
                           use_lora=False, packing=packing, max_seq_length=64, per_device_eval_batch_size=3,
                           per_device_train_batch_size=1, evaluation_strategy="no", gradient_checkpointing=False,
                           dataloader_pin_memory=False)
        trainer = create_sft_trainer(config)
        trainer.prepare()
        results[packing] = trainer.evaluate_model()
        if packing:
            assert len(trainer.trainer.eval_dataset) < len(PAIRS)  # really packed
    assert results[True]["eval_loss"] == pytest.approx(results[False]["eval_loss"], rel=1e-5)
    assert results[True]["eval_tokens"] == results[False]["eval_tokens"]


def test_unpacked_batches_pad_to_longest_not_max_seq_length():
    collator = SFTDataCollator(pad_token_id=0, pad_to_multiple_of=8)
    batch = collator([{"input_ids": [5] * 3, "labels": [5] * 3}, {"input_ids": [6] * 10, "labels": [6] * 10}])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["labels"][0, 3:].eq(IGNORE_INDEX).all()
    assert padding_efficiency([[3, 10]], 8) == pytest.approx(13 / 32)
    assert padding_efficiency([[10, 10]]) == 1.0


def test_balanced_packing_evens_out_rows_within_capacity():
    from src.data.packing import pack_examples

    rng = random.Random(1)
    lengths = [rng.randint(30, 110) for _ in range(330)]
    rows = pack_examples(lengths, 512)
    assert sorted(i for r in rows for i in r) == list(range(330))
    loads = [sum(lengths[i] for i in r) for r in rows]
    assert max(loads) <= 512
    assert len(rows) == len(best_fit_decreasing(lengths, 512))  # no more rows than best-fit needs
    assert max(loads) - min(loads) <= 10  # nearly equal rows: batches carry almost no padding


def test_padding_efficiency_on_the_shipped_sample_set(tmp_path):
    """The figures bench/padding_efficiency.py reports, through the real training path."""
    import importlib.util
    import os

    from src.models.tiny import build_tiny_qwen2, corpus_texts
    from tests.helpers import ROOT, SHIPPED_DATA

    spec = importlib.util.spec_from_file_location("bench_padding", os.path.join(ROOT, "bench", "padding_efficiency.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    build_tiny_qwen2(corpus_texts(SHIPPED_DATA), str(tmp_path), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
    packed = bench.measure(str(tmp_path), packing=True, group_by_length=True, max_seq_length=512, batch_size=4)
    grouped = bench.measure(str(tmp_path), packing=False, group_by_length=True, max_seq_length=512, batch_size=4)
    assert packed["padding_efficiency"] >= 0.98
    assert grouped["padding_efficiency"] >= 0.90
    assert packed["tokens"] == grouped["tokens"]  # packing loses no token


def test_flash_attention_gets_one_flattened_row_and_it_is_exact(tiny_model_dir):
    """FlashAttention detects packing only in single-row batches: its batches are flattened. The flattened
    layout is checked here with SDPA (same position_ids mechanism), since FlashAttention needs a GPU."""
    from src.data.arrow import flattens_packed_batches

    assert flattens_packed_batches("flash_attention_2") and flattens_packed_batches("flash_attention_3")
    assert not flattens_packed_batches("sdpa") and not flattens_packed_batches("eager")
    model = _model(tiny_model_dir, "sdpa")
    packed = pack_dataset(_packed_dataset(n=8, vocab=model.config.vocab_size), 80)
    flat = SFTDataCollator(pad_token_id=0, flatten_packed=True)(list(packed))
    rows = SFTDataCollator(pad_token_id=0)(list(packed))
    assert flat["input_ids"].shape == (1, sum(packed["length"])) and "attention_mask" not in flat
    with torch.no_grad():
        flat_sum, flat_n = token_loss_sum(model(input_ids=flat["input_ids"], position_ids=flat["position_ids"],
                                                use_cache=False).logits, flat["labels"])
        row_sum, row_n = token_loss_sum(model(input_ids=rows["input_ids"], position_ids=rows["position_ids"],
                                              use_cache=False).logits, rows["labels"])
    assert flat_n == row_n
    assert flat_sum.item() == pytest.approx(row_sum.item(), rel=1e-5)
