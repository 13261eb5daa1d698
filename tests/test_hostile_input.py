"""Hostile input: nothing lost, nothing silent (the data side).

Values that are empty once invisible characters are removed, control characters, duplicate JSON keys and
UTF-16/UTF-32 files are errors naming the file, the line and the field (or counted when skipping), through
the Python API and through the command line (exit 2, one line on stderr, no traceback).
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import train_sft
from src.data.loading import DatasetError, load_records
from src.data.normalization import PRESETS
from src.data.records import INVISIBLE_CHARS, is_blank, visible_text
from tests.helpers import PAIRS

GOOD = json.dumps(PAIRS[0], ensure_ascii=False)
GOOD_CSV = f"{PAIRS[0]['instruction']},{PAIRS[1]['response']}"
INVISIBLE = "\u200e\u200f\u061c\u202a\u202e\u2066\u2069\u200b\u200c\u200d\u2060\ufeff\u0640"


def jsonl(*lines: str) -> bytes:
    return ("\n".join([GOOD, *lines]) + "\n").encode("utf-8")


def conversation(content: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": "س"}, {"role": "assistant", "content": content}]})


# name, file name, bytes, message (regex), skip reason (None: the whole file is refused, even when skipping)
ROW_CASES = [
    ("invisible instruction", "d.jsonl", jsonl(json.dumps({"instruction": INVISIBLE + " \t", "response": "ب"})),
     r"d\.jsonl, line 2, field 'instruction': value is empty", "empty value"),
    ("bidi-only response", "d.jsonl", jsonl(json.dumps({"instruction": "أ", "response": "\u200f\u200e\u061c"})),
     r"d\.jsonl, line 2, field 'response': value is empty", "empty value"),
    ("tatweel-only response", "d.jsonl", jsonl(json.dumps({"instruction": "أ", "response": "ـــ"}, ensure_ascii=False)),
     r"d\.jsonl, line 2, field 'response': value is empty", "empty value"),
    ("BOM/zero-width message content", "d.jsonl", jsonl(conversation("\ufeff\u200b\u200d")),
     r"d\.jsonl, line 2, field 'messages\[1\]\.content': value is empty", "empty value"),
    ("invisible CSV cell", "d.csv", f"instruction,response\n{GOOD_CSV}\n\u200f\u0640,ب\n".encode("utf-8"),
     r"d\.csv, line 3, field 'instruction': value is empty", "empty value"),
    ("NUL escape", "d.jsonl", jsonl('{"instruction": "a\\u0000b", "response": "b"}'),
     r"d\.jsonl, line 2, field 'instruction': control character U\+0000", "control character"),
    ("raw control character", "d.jsonl", jsonl('{"instruction": "a", "response": "b\x07"}'),
     r"d\.jsonl, line 2, field 'response': control character U\+0007", "control character"),
    ("NUL-only value", "d.jsonl", jsonl('{"instruction": "\\u0000", "response": "b"}'),
     r"d\.jsonl, line 2, field 'instruction': control character U\+0000", "control character"),
    ("C1 control in CSV", "d.csv", f"instruction,response\n{GOOD_CSV}\nأ\u009b,ب\n".encode("utf-8"),
     r"d\.csv, line 3, field 'instruction': control character U\+009B", "control character"),
    ("control character in a turn", "d.jsonl", jsonl(conversation("x\x1by")),
     r"d\.jsonl, line 2, field 'messages\[1\]\.content': control character U\+001B", "control character"),
    ("lone surrogate", "d.jsonl", jsonl('{"instruction": "a\\ud800", "response": "b"}'),
     r"d\.jsonl, line 2, field 'instruction': lone surrogate U\+D800", "invalid Unicode"),
    ("deeply nested line", "d.jsonl", jsonl("[" * 100_000),
     r"d\.jsonl, line 2: invalid JSON \(nested too deeply\)", "invalid JSON"),
    ("duplicate key", "d.jsonl", jsonl('{"instruction": "a", "response": "b", "instruction": "c"}'),
     r"d\.jsonl, line 2: duplicate key 'instruction'", "duplicate key"),
    ("duplicate key in a turn", "d.jsonl",
     jsonl('{"messages": [{"role": "user", "content": "a", "content": "b"}, {"role": "assistant", "content": "c"}]}'),
     r"d\.jsonl, line 2: duplicate key 'content' in an object inside the row", "duplicate key"),
    ("duplicate key in a .json row", "d.json",
     json.dumps({"train": [PAIRS[0], "ROW"]}).replace('"ROW"', '{"instruction": "a", "response": "b", "response": "c"}').encode(),
     r"d\.json, split 'train', row 1: duplicate key 'response'", "duplicate key"),
]

FILE_CASES = [
    ("UTF-16 LE with BOM", "d.jsonl", (GOOD + "\n").encode("utf-16"), r"d\.jsonl: the file is UTF-16 \(LE\) encoded; save it as UTF-8"),
    ("UTF-16 BE without BOM", "d.jsonl", (GOOD + "\n").encode("utf-16-be"), r"d\.jsonl: the file is UTF-16 \(BE\) encoded"),
    ("UTF-16 LE CSV without BOM", "d.csv", f"instruction,response\n{GOOD_CSV}\n".encode("utf-16-le"),
     r"d\.csv: the file is UTF-16 \(LE\) encoded"),
    ("UTF-32 JSON with BOM", "d.json", json.dumps({"train": PAIRS}).encode("utf-32"), r"d\.json: the file is UTF-32 \(LE\) encoded"),
    ("UTF-32 BE without BOM", "d.jsonl", (GOOD + "\n").encode("utf-32-be"), r"d\.jsonl: the file is UTF-32 \(BE\) encoded"),
    ("oversized CSV field", "d.csv", b'instruction,response\n"' + b"a" * 200_000 + b'",b\n',
     r"d\.csv, line 2: invalid CSV \(field larger than field limit"),
    ("deeply nested JSON", "d.json", b"[" * 100_000, r"d\.json: invalid JSON \(nested too deeply\)"),
    ("duplicate split key", "d.json", b'{"train": [], "train": []}', r"d\.json: duplicate key 'train'"),
]

ALL_CASES = [(name, fname, data, message) for name, fname, data, message, _ in ROW_CASES] + FILE_CASES


def write(tmp_path, fname: str, data: bytes) -> str:
    path = tmp_path / fname
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("name, fname, data, message, reason", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_bad_rows_are_errors_or_counted_when_skipping(tmp_path, name, fname, data, message, reason):
    path = write(tmp_path, fname, data)
    with pytest.raises(DatasetError, match=message) as info:
        load_records(path)
    assert info.value.reason == reason and "\n" not in str(info.value)
    records, report = load_records(path, skip_invalid=True, validation_split_ratio=0)
    assert len(records["train"]) == 1 and report.skipped == {reason: 1}
    where = str(info.value).split(": ")[0].split(", field")[0]
    assert report.skipped_examples == [f"{where}: {reason}"] and where.startswith(path)


@pytest.mark.parametrize("name, fname, data, message", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_files_are_refused_even_when_skipping(tmp_path, name, fname, data, message):
    path = write(tmp_path, fname, data)
    for skip in (False, True):
        with pytest.raises(DatasetError, match=message):
            load_records(path, skip_invalid=skip)


def test_the_same_rows_from_a_dict_of_splits():
    rows = [PAIRS[0], {"instruction": "\u200f", "response": "ب"}, {"instruction": "أ", "response": "x\x00"},
            {"system": "s\x85\x9f", "instruction": "أ", "response": "ب"}]
    with pytest.raises(DatasetError, match=r"row 1, field 'instruction': value is empty \(only whitespace and invisible "
                                           r"characters: U\+200F\)"):
        load_records({"train": rows})
    _, report = load_records({"train": rows}, skip_invalid=True)
    assert report.skipped == {"empty value": 1, "control character": 2}


def test_tabs_newlines_and_visible_text_around_marks_are_kept(tmp_path):
    row = {"instruction": "\u200fسؤال\tمع\r\nفراغ\u200f", "response": "جـــواب\u0085", "input": "\u200b"}
    records, report = load_records({"train": [row]}, validation_split_ratio=0)
    assert records["train"] == [{"instruction": row["instruction"], "response": row["response"], "system": None}]
    assert not report.total_skipped
    assert visible_text(" \u200fأ\u0640ب\u200b ") == "أب" and is_blank("\ufeff \u2060\u3000")


@pytest.mark.parametrize("name, fname, data, message", ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_command_line_exits_2_with_one_line_naming_the_file(tmp_path, capsys, tiny_model_dir, name, fname, data, message):
    path = write(tmp_path, fname, data)
    out = tmp_path / "out"
    code = train_sft.main(["--model_name", tiny_model_dir, "--dataset_path", path, "--output_dir", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and path in lines[0] and "Traceback" not in captured.err, captured.err
    assert re.search(message, lines[0])


def test_command_line_writes_nothing_into_the_output_dir_on_bad_data(tmp_path, capsys, tiny_model_dir):
    path = write(tmp_path, "d.jsonl", ROW_CASES[0][2])
    out = tmp_path / "out"
    assert train_sft.main(["--model_name", tiny_model_dir, "--dataset_path", path, "--output_dir", str(out)]) == 2
    capsys.readouterr()
    assert not out.exists() or not os.listdir(out), os.listdir(out)


# -- properties -------------------------------------------------------------------------------------------------------

blank_text = st.text(alphabet=INVISIBLE_CHARS + " \t\r\n\u00a0\u2003\u3000", max_size=12)


@settings(max_examples=100, deadline=None)
@given(value=blank_text, field=st.sampled_from(["instruction", "response"]))
def test_any_invisible_value_is_rejected_or_skipped(value, field):
    row = {**PAIRS[1], field: value}
    rows = [PAIRS[0], row, PAIRS[2]]
    with pytest.raises(DatasetError, match=rf"row 1, field '{field}': value is empty"):
        load_records({"train": rows})
    records, report = load_records({"train": rows}, skip_invalid=True, validation_split_ratio=0)
    assert len(records["train"]) == 2 and report.skipped == {"empty value": 1}
    for preset in PRESETS.values():  # empty whatever the run's normalization
        assert is_blank(preset(value))


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.one_of(st.sampled_from(INVISIBLE_CHARS + " \t\n\u2028\u3000"), st.characters()), max_size=10))
def test_is_blank_is_visible_text_being_empty(text):
    assert is_blank(text) == (visible_text(text) == "")


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8),
              st.sampled_from(["user", "assistant", "system", "human", "gpt"])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["role", "content", "from", "value"]),
                                                                inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(line=st.one_of(st.binary(max_size=60), st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
                      st.dictionaries(st.sampled_from(["instruction", "response", "text", "system", "input", "messages"]),
                                      json_values,
                                      max_size=4).map(lambda d: json.dumps(d).encode())),
       first=st.booleans(), skip=st.booleans(), suffix=st.sampled_from([".jsonl", ".csv", ".json"]))
@example(line=b'{"text": "!"}', first=False, skip=False, suffix=".jsonl")  # mixed shapes: the message names the file
@example(line=b"[" * 100_000, first=True, skip=False, suffix=".jsonl")
@example(line=b'"' + b"a" * 200_000, first=False, skip=True, suffix=".csv")
def test_any_line_gives_records_or_a_dataset_error_naming_the_file(line, first, skip, suffix):
    good = GOOD_CSV.encode() if suffix == ".csv" else GOOD.encode()
    head = b"instruction,response\n" if suffix == ".csv" else b""
    body = [line, good] if first else [good, line]
    data = head + b"\n".join(body) + b"\n"
    if suffix == ".json":
        data = line
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "random" + suffix)
        with open(path, "wb") as fh:
            fh.write(data)
        try:
            records, _ = load_records(path, skip_invalid=skip, validation_split_ratio=0, log=False)
        except DatasetError as exc:
            assert path in str(exc)
        else:
            assert records["train"]
