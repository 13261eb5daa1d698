"""Data larger than memory (stream_data): the same tokenized rows as the in-memory path, cached, under a memory cap."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from src.data.loading import DatasetError, load_records
from src.data.preprocess import TokenizeReport, tokenize_records
from src.data.streaming import held_out_lines, stream_splits
from src.data.templates import get_prompt_format
from src.data.tokenization import ExampleTokenizer
from tests.helpers import PAIRS, ROOT, write_jsonl


def rows(n):
    return [{"instruction": p["instruction"] + f" ({i})", "response": p["response"] * (1 + i % 4)}
            for i, p in ((i, PAIRS[i % len(PAIRS)]) for i in range(n))]


@pytest.fixture
def example_tokenizer(tiny_tokenizer):
    return ExampleTokenizer(tiny_tokenizer, get_prompt_format("alpaca"), 96)


def columns(dataset):
    return {name: dataset[name] for name in dataset.column_names}


@pytest.mark.parametrize("packing", [False, True])
def test_streamed_splits_equal_the_in_memory_tokenization_of_the_same_rows(example_tokenizer, tmp_path, packing, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", rows(230))
    report = TokenizeReport()
    # small chunks: many chunks per split, as with a large file
    streamed = stream_splits(path, example_tokenizer, str(tmp_path / "cache"), packing=packing, validation_split_ratio=0.1,
                             seed=3, report=report, chunk_rows=17)
    held = held_out_lines(path, 0.1, 3)
    assert held.sum() == 23
    records, _ = load_records(path, validation_split_ratio=0.0)
    expected = {
        "train": [r for r, h in zip(records["train"], held) if not h],
        "validation": [r for r, h in zip(records["train"], held) if h],
    }
    for split, split_records in expected.items():
        in_memory = tokenize_records(split_records, example_tokenizer, split, packing=packing)
        assert columns(streamed[split]) == columns(in_memory), split
    assert report.examples == {"train": 207, "validation": 23}
    assert streamed.load_report.rows_kept == {"train": 207, "validation": 23}
    assert streamed.load_report.held_out_validation == 23

    # an unchanged second run reads the cache: nothing is tokenized again
    caplog.clear()
    with caplog.at_level("INFO", logger="src.data.streaming"):
        again = stream_splits(path, example_tokenizer, str(tmp_path / "cache"), packing=packing,
                              validation_split_ratio=0.1, seed=3, report=TokenizeReport())
    assert "dataset cache hit (streamed)" in caplog.text and "streaming and tokenizing" not in caplog.text
    assert columns(again["train"]) == columns(streamed["train"])
    assert again.load_report.rows_kept == streamed.load_report.rows_kept
    # another seed is another split: not the cached one
    other = stream_splits(path, example_tokenizer, str(tmp_path / "cache"), packing=packing, validation_split_ratio=0.1,
                          seed=4, report=TokenizeReport())
    assert columns(other["validation"]) != columns(streamed["validation"])


def test_streamed_rows_are_validated_like_loaded_ones(example_tokenizer, tmp_path):
    data = rows(20)
    data[7] = {"instruction": "بلا جواب"}
    path = write_jsonl(tmp_path / "d.jsonl", data)
    with pytest.raises(DatasetError, match=r"d.jsonl, line 8, field 'response': missing"):
        stream_splits(path, example_tokenizer, str(tmp_path / "c"), packing=False, validation_split_ratio=0.0, seed=0)
    streamed = stream_splits(path, example_tokenizer, str(tmp_path / "c"), packing=False, validation_split_ratio=0.0,
                             seed=0, skip_invalid=True)
    assert len(streamed["train"]) == 19 and streamed.get("validation") is None
    assert streamed.load_report.skipped == {"missing field": 1}
    evaluation = write_jsonl(tmp_path / "e.jsonl", rows(5))
    with_eval = stream_splits(path, example_tokenizer, str(tmp_path / "c"), packing=False, validation_split_ratio=0.1,
                              seed=0, skip_invalid=True, eval_path=evaluation)
    assert len(with_eval["train"]) == 19 and len(with_eval["validation"]) == 5  # the eval file, nothing held out


def test_stream_data_settings_are_checked(tiny_model_dir, tmp_path):
    from tests.helpers import make_config

    csv = tmp_path / "d.csv"
    csv.write_text("instruction,response\nس,ج\n", encoding="utf-8")
    with pytest.raises(ValueError, match="SFTConfig.stream_data: needs dataset_path to be a .jsonl file"):
        make_config(tiny_model_dir, str(csv), tmp_path / "o", stream_data=True)
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows(4))
    with pytest.raises(ValueError, match="SFTConfig.stream_data: needs dataset_cache_dir"):
        make_config(tiny_model_dir, jsonl, tmp_path / "o", stream_data=True, dataset_cache_dir=None)


def test_a_streamed_run_trains_like_an_in_memory_run(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from src.training.sft_trainer import SFTTrainer
    from tests.helpers import make_config

    train = write_jsonl(tmp_path / "train.jsonl", rows(40))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", rows(6))
    results = {}
    for stream in (False, True):
        out = tmp_path / f"run{int(stream)}"
        trainer = SFTTrainer(make_config(tiny_model_dir, train, out, eval_dataset_path=evaluation, max_steps=4,
                                         packing=True, stream_data=stream, dataset_cache_dir=str(tmp_path / "cache"),
                                         evaluation_strategy="steps", eval_steps=2))
        trainer.train()
        results[stream] = trainer.final_metrics, load_file(str(out / "model.safetensors"))
    (m0, w0), (m1, w1) = results[False], results[True]
    assert m1["eval_loss"] == pytest.approx(m0["eval_loss"], rel=1e-6) and m1["eval_tokens"] == m0["eval_tokens"]
    assert all(np.allclose(w0[k].numpy(), w1[k].numpy(), rtol=0, atol=1e-6) for k in w0)


ROWS = 150_000


@pytest.mark.slow
def test_a_file_three_times_larger_than_the_memory_cap_still_trains(tiny_model_dir, tmp_path):
    """RLIMIT_DATA caps the process's private memory (heap, arrays; not memory-mapped files) at what it uses after
    loading the model plus 48 MiB; the JSONL file is over three times that (165 MB). Streamed, it trains; loaded, it
    cannot. (The cap and the file are sized together: a larger pair proves nothing more and costs minutes.)"""
    rng = random.Random(0)
    path = tmp_path / "large.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(ROWS):
            pair = PAIRS[i % len(PAIRS)]
            response = " ".join(rng.choice(PAIRS)["response"] for _ in range(24))
            fh.write(json.dumps({"instruction": f"{pair['instruction']} ({i})", "response": response},
                                ensure_ascii=False) + "\n")
    budget_mib = 48
    assert os.path.getsize(path) > 3 * budget_mib * 2**20
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    script = os.path.join(ROOT, "tests", "bounded_memory_run.py")

    def run(stream):
        return subprocess.run([sys.executable, script, tiny_model_dir, str(path), str(tmp_path / f"out{stream}"),
                               str(tmp_path / f"cache{stream}"), str(budget_mib), str(stream)],
                              env=env, capture_output=True, text=True, timeout=900)

    loaded = run(0)
    assert loaded.returncode != 0 and "out of memory" in loaded.stdout, loaded.stdout[-2000:] + loaded.stderr[-2000:]
    streamed = run(1)
    assert streamed.returncode == 0, streamed.stdout[-2000:] + streamed.stderr[-3000:]
    assert "trained" in streamed.stdout
    assert os.path.isfile(tmp_path / "out1" / "model.safetensors")
    metadata = json.loads((tmp_path / "out1" / "sft_metadata.json").read_text(encoding="utf-8"))
    assert metadata["examples"]["train"] + metadata["examples"].get("validation", 0) == ROWS
