"""``train_sft.py generate``: one output row per input row, equal to generate_response, resumable."""

import json

import pytest

import train_sft
from src.training.sft_trainer import SFTTrainer
from tests.helpers import PAIRS, make_config, write_jsonl


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    data = write_jsonl(tmp / "d.jsonl", PAIRS[:4])
    out = tmp / "run"
    SFTTrainer(make_config(tiny_model_dir, data, out, max_steps=20, per_device_train_batch_size=4,
                           instruction_template="chatml")).train()
    return out


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_generate_writes_one_row_per_input_and_resumes(run_dir, tmp_path, capsys):
    inputs = [{"instruction": p["instruction"], **({"id": f"q{i}"} if i % 2 else {})} for i, p in enumerate(PAIRS[:5])]
    inputs[2]["system"] = "أجب باختصار."
    source = write_jsonl(tmp_path / "in.jsonl", inputs)
    output = tmp_path / "out.jsonl"
    args = ["generate", "--model", str(run_dir), "--input", source, "--output", str(output), "--batch_size", "2",
            "--max_length", "8"]
    assert train_sft.main(args) == 0
    assert "Generated 5 rows" in capsys.readouterr().out
    first = _rows(output)
    assert [r["id"] for r in first] == [1, "q1", 3, "q3", 5]  # given ids, else the line number
    reference = SFTTrainer(make_config(str(run_dir), None, tmp_path / "x"))
    reference.load_model(str(run_dir))
    et = reference.example_tokenizer()
    expected = reference.generate_from_prompts([et.encode_prompt(r["instruction"], r.get("system")) for r in inputs],
                                               max_length=8, batch_size=1)
    assert [r["response"] for r in first] == expected
    # interrupted after two rows, the third half written: the rerun keeps the two and redoes the rest
    lines = output.read_text(encoding="utf-8").splitlines(keepends=True)
    output.write_text("".join(lines[:2]) + lines[2][:10], encoding="utf-8")
    assert train_sft.main(args) == 0
    assert "Generated 3 rows into" in capsys.readouterr().out
    assert _rows(output) == first


def test_generate_names_the_line_of_a_bad_input_row(run_dir, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"instruction": "ما عاصمة مصر؟"}\n{"prompt": "x"}\n', encoding="utf-8")
    assert train_sft.main(["generate", "--model", str(run_dir), "--input", str(source), "--output",
                           str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{source}, line 2" in err[0] and "'instruction'" in err[0]
