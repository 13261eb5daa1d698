import json

import yaml

from src.cli.audit import run as audit_command
from src.config import SFTConfig
from src.data.audit import audit_records
from src.data.loading import load_records
from src.data.templates import get_prompt_format
from src.data.tokenization import ExampleTokenizer
from tests.helpers import PAIRS, SHIPPED_DATA


def test_audit_counts_duplicates_invalid_rows_and_lengths(tiny_tokenizer, tmp_path):
    rows = [json.dumps(p, ensure_ascii=False) for p in PAIRS]
    rows.append(json.dumps(PAIRS[0], ensure_ascii=False))  # exact duplicate
    rows.append(json.dumps({"instruction": "ما عَاصِمَةُ مِصْرَ؟", "response": "عاصمة مصر هي القاهرة."}, ensure_ascii=False))
    rows.append('{"instruction": "x"}')  # invalid: missing response
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    records, report = load_records(str(path), skip_invalid=True, validation_split_ratio=0)
    et = ExampleTokenizer(tiny_tokenizer, get_prompt_format("alpaca"), 40)
    result = audit_records(records, report, et, 40, SFTConfig().normalizer())
    assert result["rows"] == {"train": 10}
    assert result["invalid_rows"] == {"missing field": 1}
    assert result["duplicates"] == {"exact": 1, "normalized": 2}  # the diacritized copy is a normalized duplicate
    totals = [len(ids) for ids, _, _ in et.tokenize_batch(records["train"])]
    assert result["splits"]["train"]["total_tokens"]["p100"] == max(totals)
    assert result["splits"]["train"]["over_max_seq_length"] == sum(1 for n in totals if n > 40)
    assert 0 < result["rows_with_diacritics_share"] < 1
    assert result["fertility"]["arabic_tokens_per_word"] >= 1


def test_audit_command_on_the_shipped_data(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "audit.json"
    assert audit_command(["--model_name", tiny_model_dir, "--dataset_path", SHIPPED_DATA, "--output_dir", str(tmp_path),
                 "--audit_output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "Arabic-script share of letters" in table and "fertility, Arabic words" in table
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["rows"]["train"] + result["rows"]["validation"] >= 300
    assert result["invalid_rows"] == {}
    assert result["arabic_letter_share"] > 0.8
    assert 0.2 < result["rows_with_diacritics_share"] < 1


def test_audit_of_a_mixture_counts_every_source_and_the_totals(tmp_path, capsys, tiny_model_dir):
    """A ``datasets:`` mixture: each source's rows read, kept, invalid and mixed in, and totals over all of them
    (the audit used to report only the last source's counts)."""
    a_rows = [json.dumps(p, ensure_ascii=False) for p in PAIRS[:6]] + [
        '{"instruction": "x"}', json.dumps({"instruction": "  ", "response": "y"})]  # missing field, empty value
    b_rows = [json.dumps({"instruction": f"b {p['instruction']}", "response": p["response"]}, ensure_ascii=False)
              for p in PAIRS[:4]] + ['{"response": "z"}']  # missing field
    (tmp_path / "a.jsonl").write_text("\n".join(a_rows) + "\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(b_rows) + "\n", encoding="utf-8")
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model_name": tiny_model_dir, "output_dir": str(tmp_path / "o"),
                                      "validation_split_ratio": 0.2, "datasets": [{"path": a, "weight": 0.7},
                                                                                  {"path": b, "weight": 0.3}]}),
                      encoding="utf-8")
    out = tmp_path / "audit.json"
    assert audit_command(["--config", str(config), "--audit_output", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["sources"] == [
        {"path": a, "split": "train", "rows_read": 8, "rows_kept": 6, "invalid_rows": {"missing field": 1, "empty value": 1},
         "mixed_rows": 7},  # 70% of the 10 valid rows: its 6, one again
        {"path": b, "split": "train", "rows_read": 5, "rows_kept": 4, "invalid_rows": {"missing field": 1}, "mixed_rows": 3},
    ]
    assert result["rows_read"] == {"train": 13}
    assert result["invalid_rows"] == {"missing field": 2, "empty value": 1}
    assert result["rows"] == {"train": 8, "validation": 2} and result["held_out_validation"] == 2
    assert len(result["invalid_examples"]) == 3
    assert f"{a} (train): 8 read, 6 kept, 2 invalid, 7 in the mixture" in table
    assert f"{b} (train): 5 read, 4 kept, 1 invalid, 3 in the mixture" in table
