"""``train_sft.py evaluate``: the local Arabic multiple-choice task through lm-evaluation-harness."""

import json
import os

import pytest

import train_sft
from src.training.sft_trainer import SFTTrainer
from tests.helpers import CORPUS, ROOT, make_config, write_jsonl

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[test]')")
# trains 150 steps and scores three times; an unknown task name is known only after indexing lm-eval's 14,683 tasks
pytestmark = pytest.mark.slow
QUESTIONS = [json.loads(line) for line in open(os.path.join(ROOT, "data", "arabic_mc_benchmark.jsonl"), encoding="utf-8")]


def _score(capsys, run_dir, *extra):
    assert train_sft.main(["evaluate", "--model", str(run_dir), "--tasks", "arabic_mc_sft", *extra]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("arabic_mc_sft:"))
    return float(line.split("acc ")[1].split(",")[0])


def test_the_task_scores_deterministically_and_training_on_its_answers_raises_the_score(tmp_path, capsys):
    from src.models.tiny import build_tiny_qwen2

    assert len(QUESTIONS) == 30 and all(0 <= q["answer"] < len(q["choices"]) == 4 for q in QUESTIONS)
    corpus = CORPUS + [q["question"] for q in QUESTIONS] + [c for q in QUESTIONS for c in q["choices"]]
    build_tiny_qwen2(corpus, str(tmp_path / "base"), vocab_size=800, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, seed=0)
    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": q["question"], "response": q["choices"][q["answer"]]}
                                               for q in QUESTIONS])
    before, after = tmp_path / "before", tmp_path / "after"
    SFTTrainer(make_config(str(tmp_path / "base"), data, before, max_steps=1, learning_rate=1e-9,
                           instruction_template="chatml")).train()
    SFTTrainer(make_config(str(tmp_path / "base"), data, after, max_steps=150, per_device_train_batch_size=8,
                           instruction_template="chatml")).train()
    first = _score(capsys, before, "--no_record")
    assert _score(capsys, before, "--no_record") == first  # deterministic
    trained = _score(capsys, after)
    assert trained > first + 0.3
    meta = json.loads((after / "sft_metadata.json").read_text(encoding="utf-8"))
    assert meta["benchmarks"]["arabic_mc_sft"]["acc"] == pytest.approx(trained, abs=1e-4)
    assert "arabic_mc_sft" in (after / "README.md").read_text(encoding="utf-8")


def test_an_unknown_task_is_a_one_line_error(capsys, tiny_full_run):
    capsys.readouterr()
    assert train_sft.main(["evaluate", "--model", str(tiny_full_run), "--tasks", "no_such_task_xyz", "--no_record"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_task_xyz" in err[-1]
