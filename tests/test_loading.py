import json

import pytest
from datasets import Dataset, DatasetDict

from src.data.loading import DatasetError, hold_out, load_records
from tests.helpers import PAIRS, write_jsonl


def test_jsonl_rows_are_read_and_a_validation_split_is_held_out_deterministically(pairs_file):
    records, report = load_records(pairs_file, validation_split_ratio=0.25, seed=3)
    assert len(records["train"]) == 6 and len(records["validation"]) == 2
    again, _ = load_records(pairs_file, validation_split_ratio=0.25, seed=3)
    assert again == records
    other, _ = load_records(pairs_file, validation_split_ratio=0.25, seed=4)
    assert other["validation"] != records["validation"]
    everything = records["train"] + records["validation"]
    assert sorted(r["instruction"] for r in everything) == sorted(p["instruction"] for p in PAIRS)
    assert report.held_out_validation == 2


def test_csv_with_quotes_commas_newlines_bom_and_crlf(tmp_path):
    text = (
        '\ufeffinstruction,response\r\n'
        '"ما هو الذكاء الاصطناعي؟","الذكاء الاصطناعي، باختصار، هو ""تعلم"" الآلة."\r\n'
        '"اكتب قصيدة عن الربيع","في فصل الربيع\r\nتتفتح الأزهار"\r\n'
    )
    path = tmp_path / "data.csv"
    path.write_bytes(text.encode("utf-8"))
    records, _ = load_records(str(path), validation_split_ratio=0)
    assert records["train"][0] == {
        "instruction": "ما هو الذكاء الاصطناعي؟",
        "response": 'الذكاء الاصطناعي، باختصار، هو "تعلم" الآلة.',
        "system": None,
    }
    assert records["train"][1]["response"] == "في فصل الربيع\r\nتتفتح الأزهار"


def test_json_split_file(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": PAIRS[:5], "validation": PAIRS[5:]}, ensure_ascii=False), encoding="utf-8")
    records, report = load_records(str(path))
    assert len(records["train"]) == 5 and len(records["validation"]) == 3
    assert report.held_out_validation == 0


def test_datasets_objects_and_alpaca_fields():
    alpaca = Dataset.from_list([
        {"instruction": "لخص النص التالي", "input": "النص طويل جدا", "output": "نص طويل."},
        {"instruction": "ما عاصمة مصر؟", "input": "", "output": "القاهرة"},
    ])
    records, _ = load_records(DatasetDict({"train": alpaca, "validation": alpaca}))
    assert records["train"][0]["instruction"] == "لخص النص التالي\n\nالنص طويل جدا"
    assert records["train"][0]["response"] == "نص طويل."
    assert records["train"][1]["instruction"] == "ما عاصمة مصر؟"
    records, _ = load_records({"train": Dataset.from_list([{"prompt": "a?", "completion": "b."}])}, validation_split_ratio=0)
    assert records["train"] == [{"instruction": "a?", "response": "b.", "system": None}]


def test_text_rows_are_accepted():
    records, _ = load_records({"train": [{"text": "السؤال: س\nالجواب: ج"}]})
    assert records["train"] == [{"text": "السؤال: س\nالجواب: ج"}]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"instruction": "a", "response": ', r"bad\.jsonl, line 2: invalid JSON"),
        ('{"instruction": "a"}', r"bad\.jsonl, line 2, field 'response': missing"),
        ('{"response": "a"}', r"bad\.jsonl, line 2, field 'instruction': missing"),
        ('{"instruction": "a", "response": 5}', r"bad\.jsonl, line 2, field 'response': expected a string, got int"),
        ('{"instruction": "  ", "response": "b"}', r"bad\.jsonl, line 2, field 'instruction': value is empty"),
        ('{"instruction": null, "response": "b"}', r"bad\.jsonl, line 2, field 'instruction': value is missing"),
        ('["a", "b"]', r"bad\.jsonl, line 2: expected an object"),
    ],
)
def test_bad_jsonl_rows_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PAIRS[0], ensure_ascii=False) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=message):
        load_records(str(path))


def test_invalid_utf8_names_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(PAIRS[0], ensure_ascii=False).encode()
    bad = b'{"instruction": "ok", "response": "caf\xe9 \xff"}'
    path.write_bytes(good + b"\n" + good + b"\n" + bad + b"\n")
    with pytest.raises(DatasetError, match=r"bad\.jsonl, line 3, field 'response': invalid UTF-8"):
        load_records(str(path))
    records, report = load_records(str(path), skip_invalid=True, validation_split_ratio=0)
    assert len(records["train"]) == 2 and report.skipped["invalid UTF-8"] == 1


def test_invalid_utf8_in_csv(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"instruction,response\na,b\n\xff\xfe,c\n")
    with pytest.raises(DatasetError, match=r"bad\.csv, line 3, field 'instruction': invalid UTF-8"):
        load_records(str(path))


def test_csv_with_wrong_field_count(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("instruction,response\nأ,ب,ج\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad\.csv, line 2: expected 2 CSV fields"):
        load_records(str(path))


def test_empty_file_and_json_without_train(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"empty\.jsonl: the file is empty"):
        load_records(str(empty))
    no_train = tmp_path / "split.json"
    no_train.write_text(json.dumps({"validation": PAIRS}), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"split\.json: the JSON object has no 'train' key \(found keys \['validation'\]\)"):
        load_records(str(no_train))
    header_only = tmp_path / "h.csv"
    header_only.write_text("instruction,response\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"h\.csv: no rows found"):
        load_records(str(header_only))


def test_json_split_row_errors_name_split_and_row(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": PAIRS[:2], "validation": [{"instruction": "x", "response": ""}]}), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"split 'validation', row 0, field 'response': value is empty"):
        load_records(str(path))


def test_skip_invalid_rows_counts_every_skip(tmp_path):
    rows = [json.dumps(p, ensure_ascii=False) for p in PAIRS[:4]] + [
        '{"instruction": "a"}', '{"instruction": 1, "response": "b"}', "{not json", '{"instruction": "x", "response": ""}'
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    records, report = load_records(str(path), skip_invalid=True, validation_split_ratio=0)
    assert len(records["train"]) == 4
    assert report.total_skipped == 4
    assert dict(report.skipped) == {"missing field": 1, "non-string value": 1, "invalid JSON": 1, "empty value": 1}
    assert "skipped 4 invalid rows" in report.summary()


def test_hold_out_keeps_every_row_once():
    rows = [{"i": i} for i in range(101)]
    train, val = hold_out(rows, 0.1, seed=0)
    assert len(val) == 10 and len(train) == 91
    assert sorted(r["i"] for r in train + val) == list(range(101))


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    rows = [{"instruction": "سطر\u2028ثان", "response": "فقرة\u2029أخرى\u0085"}, PAIRS[0]]
    path = tmp_path / "sep.jsonl"
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n", encoding="utf-8")
    records, _ = load_records(str(path), validation_split_ratio=0)
    assert [r["instruction"] for r in records["train"]] == ["سطر\u2028ثان", PAIRS[0]["instruction"]]


def test_conversation_rows_row_level_system_and_bad_roles(tmp_path):
    turns = [{"from": "human", "value": "سؤال"}, {"from": "gpt", "value": "جواب"}]
    records, _ = load_records({"train": [{"system": "أنت مساعد", "conversations": turns}]}, validation_split_ratio=0)
    assert records["train"][0]["messages"][0] == {"role": "system", "content": "أنت مساعد"}
    rows = [{"conversations": turns}, {"conversations": [{"from": ["human"], "value": "x"}, turns[1]]},
            {"messages": [{"role": "assistant", "content": "a"}]}]
    path = write_jsonl(tmp_path / "conv.jsonl", rows)
    with pytest.raises(DatasetError, match=r"conv\.jsonl, line 2, field 'conversations\[0\]\.from': unknown role"):
        load_records(path)
    records, report = load_records(path, skip_invalid=True, validation_split_ratio=0)
    assert len(records["train"]) == 1 and report.skipped["invalid conversation"] == 2
