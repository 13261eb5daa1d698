import json

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
