"""Several datasets mixed with weights: exact shares, deterministic, mixed row shapes, max_samples."""

import pytest
import yaml

from src.cli.args import parse_config
from src.config import SFTConfig
from src.data.mixing import cap_rows, mix_records, parse_mixture
from src.training.sft_trainer import SFTTrainer
from tests.helpers import PAIRS, write_jsonl


def _rows(tag, n):
    return [{"instruction": f"{tag} {i}", "response": "جواب"} for i in range(n)]


def test_a_70_30_mix_is_70_30_and_deterministic():
    a, b = _rows("a", 600), _rows("b", 400)
    mixed, counts = mix_records([(a, 0.7), (b, 0.3)], seed=1)
    assert counts == [700, 300] and len(mixed) == 1000
    share_a = sum(r["instruction"].startswith("a ") for r in mixed) / len(mixed)
    assert share_a == pytest.approx(0.7, abs=0.01)
    assert mix_records([(a, 0.7), (b, 0.3)], seed=1)[0] == mixed  # same seed, same mixture
    assert mix_records([(a, 0.7), (b, 0.3)], seed=2)[0] != mixed
    assert len({r["instruction"] for r in mixed if r["instruction"].startswith("b ")}) == 300  # no repeats needed
    assert len({r["instruction"] for r in mixed if r["instruction"].startswith("a ")}) == 600  # all of a, 100 again


def test_max_samples_and_bad_entries():
    rows = _rows("a", 50)
    capped = cap_rows(rows, 10, seed=0)
    assert len(capped) == 10 and capped == sorted(capped, key=rows.index) and cap_rows(rows, 10, seed=0) == capped
    for bad, message in [([{"path": "a.jsonl", "weight": -1}], "weight=-1"),
                         ([{"path": "a.jsonl", "weight": 1, "fraction": 1}], "not both"),
                         ([{"path": "a.jsonl", "colour": "red"}], "unknown key"),
                         ("not json", "not a JSON list"), ([], "non-empty list")]:
        with pytest.raises(ValueError, match=message):
            parse_mixture(bad)


def test_a_yaml_mixture_of_instruction_rows_and_conversations_trains(tmp_path, tiny_model_dir):
    plain = write_jsonl(tmp_path / "plain.jsonl", PAIRS)
    conversations = [{"messages": [{"role": "user", "content": p["instruction"]},
                                   {"role": "assistant", "content": p["response"]}]} for p in PAIRS]
    chats = write_jsonl(tmp_path / "chats.jsonl", conversations)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({
        "model_name": tiny_model_dir, "output_dir": str(tmp_path / "o"), "use_lora": False, "max_steps": 2,
        "datasets": [{"path": plain, "weight": 3}, {"path": chats, "fraction": 1, "max_samples": 4}],
        "validation_split_ratio": 0.0, "evaluation_strategy": "no", "gradient_checkpointing": False,
        "dataloader_pin_memory": False, "instruction_template": "chatml",
    }, allow_unicode=True), encoding="utf-8")
    config = parse_config(SFTConfig, ["--config", str(config_file)])
    trainer = SFTTrainer(config)
    trainer.train()
    train = trainer.dataset["train"]
    assert len(train) == 12  # 8 + 4 rows available, shared 3:1
    assert sum(m is not None for m in train["messages"]) == 3
    with pytest.raises(ValueError, match="SFTConfig.datasets"):
        SFTConfig(dataset_path=plain, datasets=[{"path": chats}])
    with pytest.raises(ValueError, match="SFTConfig.datasets"):
        SFTConfig(datasets=[{"path": str(tmp_path / "missing.jsonl")}])
