import json
import os
import subprocess
import sys

import pytest
import yaml

import train_sft
from tests.helpers import PAIRS, ROOT, write_jsonl


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_sft.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_user_error_exits_2_with_one_line(tmp_path):
    result = run_cli("--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: config file") and "missing.yaml" in lines[-1]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_debug_flag_shows_the_traceback(tmp_path):
    result = run_cli("--config", str(tmp_path / "missing.yaml"), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_seq_length", "0"], "max_seq_length"),
        (["--model_name", "./no/such/model"], "does not exist"),
        (["--instruction_template", "custom"], "custom_template"),
    ],
)
def test_bad_values_are_user_errors(tmp_path, capsys, flags, message):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    code = train_sft.main(["--dataset_path", data, "--output_dir", str(tmp_path / "o"), *flags])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_bad_data_is_a_user_error(tmp_path, capsys, tiny_model_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a"}\n', encoding="utf-8")
    code = train_sft.main(["--model_name", tiny_model_dir, "--dataset_path", str(path), "--output_dir", str(tmp_path / "o")])
    assert code == 2
    assert "bad.jsonl, line 1, field 'response'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_trains_evaluates_saves_and_samples(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model_name": tiny_model_dir, "dataset_path": data, "eval_dataset_path": data, "output_dir": str(tmp_path / "out"),
        "use_lora": False, "max_steps": 3, "per_device_train_batch_size": 2, "gradient_checkpointing": False,
        "dataloader_pin_memory": False, "max_seq_length": 64,
    }), encoding="utf-8")
    assert train_sft.main(["--config", str(config), "--learning_rate", "1e-3"]) == 0
    out = capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "sft_metadata.json").read_text(encoding="utf-8"))
    assert meta["config"]["learning_rate"] == 1e-3 and meta["config"]["max_steps"] == 3
    # the summary prints the saved run's own numbers, and samples the first validation instructions
    lines = out.splitlines()
    loss_line = next(line for line in lines if line.startswith("Validation loss"))
    before, after = (float(x) for x in loss_line.split(":", 1)[1].split("->"))
    assert after == pytest.approx(meta["final_metrics"]["eval_loss"], abs=1e-4) and before != after
    assert [line[3:] for line in lines if line.startswith("Q: ")] == [p["instruction"] for p in PAIRS[:3]]
    assert sum(line.startswith("A: ") for line in lines) == 3


@pytest.mark.slow
def test_cli_with_conversation_data(tmp_path, tiny_model_dir, capsys):
    messages = [{"role": "user", "content": PAIRS[0]["instruction"]}, {"role": "assistant", "content": PAIRS[0]["response"]}]
    data = write_jsonl(tmp_path / "conv.jsonl", [{"messages": messages}] * 4)
    code = train_sft.main(["--model_name", tiny_model_dir, "--dataset_path", data, "--eval_dataset_path", data,
                           "--output_dir", str(tmp_path / "o"), "--max_steps", "2", "--use_lora", "false",
                           "--per_device_train_batch_size", "2", "--dataloader_pin_memory", "false"])
    assert code == 0
    assert "Validation perplexity" in capsys.readouterr().out
