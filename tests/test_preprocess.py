"""The fast preprocessing path (batched backend encoding, numpy assembly, Arrow, on-disk cache) gives exactly
what the original per-record code gave, and its cache is reused only when nothing that decides it changed."""

import json
import logging
import os
import random

import pytest
from datasets import Dataset

from src.data import cache as cache_module
from src.data.loading import load_records
from src.data.normalization import build_normalizer
from src.data.packing import pack_dataset, pack_examples
from src.data.preprocess import TokenizeReport, tokenize_records
from src.data.templates import get_prompt_format
from src.data.tokenization import IGNORE_INDEX, ExampleTokenizer, fast_backend
from tests.helpers import PAIRS, SHIPPED_DATA

REPORT_FIELDS = ("examples", "truncated", "dropped", "trained_tokens", "total_tokens")


# -- the reference: the original code, one record at a time, through tokenizer.__call__ --------------


def reference_assemble(et, segments, where):
    ids = list(et.prefix_ids)
    labels = [IGNORE_INDEX] * len(ids)
    for kind, tokens, trained in segments:
        if kind == "prompt":
            ids += tokens
            labels += [IGNORE_INDEX] * len(tokens)
        else:
            response = list(tokens) + [et.end_id]
            ids += response + et.suffix_ids
            labels += (response if trained else [IGNORE_INDEX] * len(response)) + [IGNORE_INDEX] * len(et.suffix_ids)
    if len(ids) <= et.max_seq_length:
        return ids, labels, "fits"
    if et.overlong_policy == "error":
        raise ValueError(f"{where} is {len(ids)} tokens long")
    ids, labels = ids[: et.max_seq_length], labels[: et.max_seq_length]
    if et.overlong_policy == "drop" or all(label == IGNORE_INDEX for label in labels[1:]):
        return [], [], "dropped"
    return ids, labels, "truncated"


def reference_tokenize(records, et, split):
    columns = {"input_ids": [], "labels": [], "length": []}
    counts = dict.fromkeys(REPORT_FIELDS, 0)
    for i, record in enumerate(records):
        segments = et.formatter.segments(record)
        encoded = [et.tokenizer(text, add_special_tokens=False)["input_ids"] for _, text, _ in segments]
        ids, labels, status = reference_assemble(et, [(k, e, t) for (k, _, t), e in zip(segments, encoded)], f"{split} row {i}")
        if status == "dropped":
            counts["dropped"] += 1
            continue
        counts["truncated"] += status == "truncated"
        columns["input_ids"].append(ids)
        columns["labels"].append(labels)
        columns["length"].append(len(ids))
        counts["trained_tokens"] += sum(1 for label in labels[1:] if label != IGNORE_INDEX)
        counts["total_tokens"] += len(ids)
    counts["examples"] = len(columns["input_ids"])
    return columns, counts


def reference_pack(columns, max_seq_length):
    bins = pack_examples([len(x) for x in columns["input_ids"]], max_seq_length)
    rows = {"input_ids": [], "labels": [], "position_ids": [], "length": [], "num_examples": []}
    for members in bins:
        ids, lab, pos = [], [], []
        for i in members:
            ids.extend(columns["input_ids"][i])
            example_labels = list(columns["labels"][i])
            example_labels[0] = IGNORE_INDEX
            lab.extend(example_labels)
            pos.extend(range(len(columns["input_ids"][i])))
        rows["input_ids"].append(ids)
        rows["labels"].append(lab)
        rows["position_ids"].append(pos)
        rows["length"].append(len(ids))
        rows["num_examples"].append(len(members))
    return rows


def report_counts(report, split="train"):
    return {name: getattr(report, name)[split] for name in REPORT_FIELDS}


def assert_same(records, et, packing, **kwargs):
    """The new path equals the reference: values, Arrow types, report counts."""
    columns, counts = reference_tokenize(records, et, "train")
    expected = Dataset.from_dict(reference_pack(columns, et.max_seq_length) if packing else columns)
    report = TokenizeReport()
    dataset = tokenize_records(records, et, "train", report, packing=packing, **kwargs)
    assert dataset.features == expected.features
    assert dataset.data.schema.remove_metadata() == expected.data.schema.remove_metadata()
    assert dataset.to_dict() == expected.to_dict()
    assert report_counts(report) == counts
    return dataset, report


# -- data ---------------------------------------------------------------------------------------------

CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "أنت مساعد مفيد."}, {"role": "user", "content": "ما عاصمة مصر؟"},
                  {"role": "assistant", "content": "القاهرة."}, {"role": "user", "content": "وعاصمة الأردن؟"},
                  {"role": "assistant", "content": "عمّان."}]},
    {"messages": [{"role": "user", "content": "اكتب بيتًا عن البحر"}, {"role": "assistant", "content": PAIRS[2]["response"]}]},
    {"messages": [{"role": "user", "content": "س١"}, {"role": "assistant", "content": "ج١"}, {"role": "user", "content": "س٢"},
                  {"role": "assistant", "content": "ج٢"}, {"role": "user", "content": "س٣"}, {"role": "assistant", "content": "ج٣"}]},
]
TEXTS = [
    {"text": "<|im_start|>user\nس<|im_end|>\n<|im_start|>assistant\nج<|im_end|>\n"},
    {"text": "<|im_start|>user\nما عاصمة مصر؟<|im_end|>\n<|im_start|>assistant\nالقاهرة"},
    {"text": "نص بلا قالب: يُدرَّب كله"},
    {"text": "### Instruction:\nس\n\n### Response:\nج<|endoftext|>"},
]
LONG = {"instruction": "س", "response": "الذكاء الاصطناعي فرع من علوم الحاسوب يبني أنظمة تتعلم. " * 4, "system": None}
LONG_PROMPT = {"instruction": "الذكاء الاصطناعي فرع من علوم الحاسوب يبني أنظمة تتعلم. " * 4, "response": "نعم", "system": None}


def shipped_records():
    records, _ = load_records(SHIPPED_DATA, validation_split_ratio=0)
    return records["train"]


def pair_records():
    return [{**p, "system": None} for p in PAIRS] + [{**PAIRS[0], "system": "أجب باختصار."}]


# -- exactness ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("template", ["chatml", "alpaca"])
def test_shipped_data_is_bit_identical(tiny_tokenizer, template, packing):
    et = ExampleTokenizer(tiny_tokenizer, get_prompt_format(template), 96)
    assert_same(shipped_records(), et, packing, batch_size=50, num_threads=3)  # several chunks, out-of-order threads


@pytest.mark.parametrize("packing", [False, True])
def test_shipped_data_with_the_real_qwen_tokenizer(qwen_tokenizer, packing):
    et = ExampleTokenizer(qwen_tokenizer, get_prompt_format("chatml", system_prompt="أنت مساعد مفيد."), 128,
                          normalize=build_normalizer("light"))
    assert fast_backend(qwen_tokenizer) is not None
    assert_same(shipped_records(), et, packing, batch_size=64)


@pytest.mark.parametrize("policy", ["truncate", "drop"])
@pytest.mark.parametrize("packing", [False, True])
def test_edge_cases_are_bit_identical(tiny_tokenizer, policy, packing):
    records = CONVERSATIONS + TEXTS + pair_records() + [LONG, LONG_PROMPT]  # one of every shape, mixed on purpose
    for last_only in (False, True):
        for fmt in (get_prompt_format("chatml", system_prompt="نظام"), get_prompt_format("custom", "السؤال: {instruction}\nالجواب: ")):
            et = ExampleTokenizer(tiny_tokenizer, fmt, 40, policy, normalize=build_normalizer("search"),
                                  train_on_last_turn_only=last_only)
            dataset, report = assert_same(records, et, packing, batch_size=3, num_threads=2)
            assert report.dropped["train"] >= 1  # LONG_PROMPT leaves no trained token in the window
    assert policy == "drop" or report.truncated["train"] >= 1


def test_overlong_error_names_the_first_row_over_the_limit(tiny_tokenizer):
    et = ExampleTokenizer(tiny_tokenizer, get_prompt_format("alpaca"), 40, overlong_policy="error")
    records = pair_records() * 3 + [LONG] + pair_records() + [LONG]
    with pytest.raises(ValueError, match=f"train row {len(pair_records()) * 3} is .* tokens long, over max_seq_length=40"):
        tokenize_records(records, et, "train", batch_size=4, num_threads=3)
    with pytest.raises(ValueError, match="validation row 0 is"):
        tokenize_records([LONG], et, "validation")


def test_nothing_left_is_an_error_and_still_counted(tiny_tokenizer):
    et = ExampleTokenizer(tiny_tokenizer, get_prompt_format("alpaca"), 12, overlong_policy="drop")
    report = TokenizeReport()
    with pytest.raises(ValueError, match=r"train: no examples left .* \(all 2 were over-long\)"):
        tokenize_records([LONG, LONG_PROMPT], et, "train", report)
    assert report.dropped["train"] == 2


def test_pack_dataset_equals_the_reference_on_any_labels_and_row_order():
    rng = random.Random(0)
    rows = []
    for _ in range(300):
        n = rng.randint(1, 60)
        ids = [rng.randrange(0, 50_000) for _ in range(n)]
        rows.append({"input_ids": ids, "labels": [t if rng.random() < 0.5 else IGNORE_INDEX for t in ids]})
    dataset = Dataset.from_list(rows).shuffle(seed=1).select(range(250))  # an indices mapping: logical order counts
    columns = {"input_ids": dataset["input_ids"][:], "labels": dataset["labels"][:]}
    expected = Dataset.from_dict(reference_pack(columns, 128))
    packed = pack_dataset(dataset, 128)
    assert packed.features == expected.features and packed.to_dict() == expected.to_dict()


def test_fast_backend_gives_the_ids_of_the_tokenizer_call(tiny_tokenizer, qwen_tokenizer):
    texts = ["", " ", "\n\n", "<|im_start|>user\nمرحبا<|im_end|>\n", "  spaces  and\ttabs ", "٣ + ٤ = ٧", "<|endoftext|>",
             "ﻻ ﷲ presentation forms", "emoji 🙂 and \u200f bidi"]
    for tokenizer in (tiny_tokenizer, qwen_tokenizer):
        et = ExampleTokenizer(tokenizer, get_prompt_format("chatml"), 64)
        assert et.encoder.ready() is not None  # the fast path is the one taken
        assert et.encode_texts(texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]


def test_a_tokenizer_class_with_its_own_encoding_keeps_the_ordinary_call(tiny_tokenizer):
    class Custom(type(tiny_tokenizer)):
        def _encode_plus(self, *args, **kwargs):
            return super()._encode_plus(*args, **kwargs)

    custom = Custom(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    assert fast_backend(custom) is None
    et = ExampleTokenizer(custom, get_prompt_format("alpaca"), 64)
    assert_same(pair_records(), et, packing=True)


def test_lengths_use_the_arithmetic_of_assemble(tiny_tokenizer):
    records = CONVERSATIONS + TEXTS + pair_records() + [LONG]
    for fmt in (get_prompt_format("chatml"), get_prompt_format("alpaca")):
        et = ExampleTokenizer(tiny_tokenizer, fmt, 10_000)
        lengths = et.lengths(records, batch_size=4)
        for record, (prompt, response) in zip(records, lengths):
            segments = et.formatter.segments(record)
            tokens = [et.tokenizer(text, add_special_tokens=False)["input_ids"] for _, text, _ in segments]
            ids, _, _ = reference_assemble(et, [(k, t, tr) for (k, _, tr), t in zip(segments, tokens)], "")
            assert prompt + response == len(ids)
            assert prompt == len(et.prefix_ids) + sum(len(t) for (k, _, _), t in zip(segments, tokens) if k == "prompt")


# -- the cache ----------------------------------------------------------------------------------------


@pytest.fixture
def encode_calls(monkeypatch):
    calls = []
    original = ExampleTokenizer.encode_texts

    def counting(self, texts):
        calls.append(len(texts))
        return original(self, texts)

    monkeypatch.setattr(ExampleTokenizer, "encode_texts", counting)
    return calls


def entries(cache_dir):
    return sorted(n for n in os.listdir(cache_dir) if n.startswith(cache_module.ENTRY_PREFIX))


@pytest.mark.parametrize("packing", [False, True])
def test_cache_hit_skips_the_tokenizer_and_restores_everything(tiny_tokenizer, tmp_path, encode_calls, caplog, packing):
    records = pair_records() + [LONG, LONG_PROMPT] + CONVERSATIONS
    et = ExampleTokenizer(tiny_tokenizer, get_prompt_format("chatml"), 40)
    caplog.set_level(logging.INFO, logger="src.data.cache")
    first_report = TokenizeReport()
    first = tokenize_records(records, et, "train", first_report, packing=packing, cache_dir=tmp_path)
    assert encode_calls and "dataset cache miss" in caplog.text
    assert first_report.truncated["train"] and first_report.dropped["train"]
    encode_calls.clear()
    caplog.clear()
    again_report = TokenizeReport()
    again = tokenize_records(records, ExampleTokenizer(tiny_tokenizer, get_prompt_format("chatml"), 40), "train",
                             again_report, packing=packing, cache_dir=tmp_path)
    assert encode_calls == []  # the tokenizer was not called
    assert "dataset cache hit" in caplog.text
    truncated, dropped = first_report.truncated["train"], first_report.dropped["train"]
    assert f"{truncated} examples longer than max_seq_length=40 were truncated and {dropped} dropped" in caplog.text
    assert again.to_dict() == first.to_dict() and again.features == first.features
    assert report_counts(again_report) == report_counts(first_report)
    assert again.cache_files  # memory-mapped from the entry, not copied into memory
    assert len(entries(tmp_path)) == 1
    assert_same(records, et, packing)  # and both equal the reference


CHANGES = {
    "template": lambda tok: ExampleTokenizer(tok, get_prompt_format("alpaca"), 48),
    "system prompt": lambda tok: ExampleTokenizer(tok, get_prompt_format("chatml", system_prompt="نظام"), 48),
    "max_seq_length": lambda tok: ExampleTokenizer(tok, get_prompt_format("chatml"), 47),
    "overlong_policy": lambda tok: ExampleTokenizer(tok, get_prompt_format("chatml"), 48, "drop"),
    "normalization": lambda tok: ExampleTokenizer(tok, get_prompt_format("chatml"), 48, normalize=build_normalizer("light")),
    "normalization switch": lambda tok: ExampleTokenizer(tok, get_prompt_format("chatml"), 48,
                                                         normalize=build_normalizer("light", remove_diacritics=True)),
    "train_on_last_turn_only": lambda tok: ExampleTokenizer(tok, get_prompt_format("chatml"), 48, train_on_last_turn_only=True),
}


def test_any_changed_setting_misses(tiny_tokenizer, tmp_path, encode_calls):
    records = pair_records() + CONVERSATIONS
    base = ExampleTokenizer(tiny_tokenizer, get_prompt_format("chatml"), 48)
    tokenize_records(records, base, "train", cache_dir=tmp_path)
    seen = 1
    for name, make in CHANGES.items():
        encode_calls.clear()
        dataset = tokenize_records(records, make(tiny_tokenizer), "train", cache_dir=tmp_path)
        seen += 1
        assert encode_calls, name
        assert len(entries(tmp_path)) == seen, name
        assert dataset.to_dict() == tokenize_records(records, make(tiny_tokenizer), "train").to_dict()
    for name, changed in (("packing", dict(packing=True)),):
        encode_calls.clear()
        tokenize_records(records, base, "train", cache_dir=tmp_path, **changed)
        assert encode_calls, name
    # the data: one character of one record, or one record less
    edited = [dict(r) for r in records]
    edited[0]["response"] += "!"
    for data in (edited, records[:-1]):
        encode_calls.clear()
        tokenize_records(data, base, "train", cache_dir=tmp_path)
        assert encode_calls
    # and nothing changed: a hit
    encode_calls.clear()
    tokenize_records(records, base, "train", cache_dir=tmp_path)
    assert encode_calls == []


def test_a_changed_tokenizer_misses(tiny_tokenizer, tmp_path, encode_calls):
    import copy

    records = pair_records()
    tokenize_records(records, ExampleTokenizer(tiny_tokenizer, get_prompt_format("chatml"), 48), "train", cache_dir=tmp_path)
    other = copy.deepcopy(tiny_tokenizer)
    other.add_tokens(["مصر"])  # one added token: different ids for the same text
    encode_calls.clear()
    changed = tokenize_records(records, ExampleTokenizer(other, get_prompt_format("chatml"), 48), "train", cache_dir=tmp_path)
    assert encode_calls and len(entries(tmp_path)) == 2
    assert other.convert_tokens_to_ids("مصر") in sum(changed["input_ids"], [])
    fingerprints = {cache_module.tokenizer_fingerprint(t) for t in (tiny_tokenizer, other)}
    assert len(fingerprints) == 2


@pytest.mark.parametrize("damage", ["truncated data", "no metadata", "other key", "garbage metadata", "size mismatch"])
def test_a_damaged_entry_is_ignored_and_rebuilt(tiny_tokenizer, tmp_path, encode_calls, caplog, damage):
    records = pair_records() + CONVERSATIONS
    et = ExampleTokenizer(tiny_tokenizer, get_prompt_format("chatml"), 48)
    expected = tokenize_records(records, et, "train", packing=True, cache_dir=tmp_path).to_dict()
    (entry,) = entries(tmp_path)
    data, meta = tmp_path / entry / cache_module.DATA_FILE, tmp_path / entry / cache_module.META_FILE
    if damage == "truncated data":  # and the metadata updated to match: only the Arrow reader can tell
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        fields = json.loads(meta.read_text())
        meta.write_text(json.dumps({**fields, "data_bytes": data.stat().st_size}))
    elif damage == "no metadata":
        meta.unlink()
    elif damage == "other key":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "key": "0" * 40}))
    elif damage == "garbage metadata":
        meta.write_text("{not json")
    else:
        data.write_bytes(data.read_bytes() + b"\0")
    encode_calls.clear()
    caplog.set_level(logging.WARNING)
    report = TokenizeReport()
    rebuilt = tokenize_records(records, et, "train", report, packing=True, cache_dir=tmp_path)
    assert encode_calls and "ignoring dataset cache entry" in caplog.text
    assert rebuilt.to_dict() == expected and report.examples["train"] == len(records)
    assert entries(tmp_path) == [entry]
    encode_calls.clear()
    assert tokenize_records(records, et, "train", packing=True, cache_dir=tmp_path).to_dict() == expected
    assert encode_calls == []  # the rebuilt entry is used again


def test_a_run_killed_mid_write_leaves_nothing_that_is_read(tiny_tokenizer, tmp_path, encode_calls, monkeypatch):
    import src.data.tokenization as tokenization

    records = pair_records() * 3
    et = ExampleTokenizer(tiny_tokenizer, get_prompt_format("chatml"), 48)
    # A partial entry as a killed process leaves it: a temporary directory with half a file, no metadata.
    partial = tmp_path / (cache_module.TMP_PREFIX + "deadbeef-x")
    partial.mkdir()
    (partial / cache_module.DATA_FILE).write_bytes(b"ARROW1 partial")
    # An exception mid-write (here: the tokenizer failing on the second chunk) leaves no entry either.
    original = tokenization.ExampleTokenizer._tokenize_plan

    def failing(self, plan, split):
        if plan.start > 0:
            raise KeyboardInterrupt
        return original(self, plan, split)

    monkeypatch.setattr(tokenization.ExampleTokenizer, "_tokenize_plan", failing)
    with pytest.raises(KeyboardInterrupt):
        tokenize_records(records, et, "train", cache_dir=tmp_path, batch_size=4, num_threads=1)
    assert entries(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == [partial.name]  # its own temporary directory is gone
    monkeypatch.setattr(tokenization.ExampleTokenizer, "_tokenize_plan", original)
    encode_calls.clear()
    dataset = tokenize_records(records, et, "train", cache_dir=tmp_path)
    assert encode_calls and len(dataset) == len(records) and len(entries(tmp_path)) == 1


def test_an_undescribable_normalizer_turns_the_cache_off(tiny_tokenizer, tmp_path, caplog):
    et = ExampleTokenizer(tiny_tokenizer, get_prompt_format("chatml"), 48, normalize=str.strip)
    dataset = tokenize_records(pair_records(), et, "train", cache_dir=tmp_path)
    assert len(dataset) == len(pair_records()) and "dataset cache not used" in caplog.text
    assert not os.path.exists(tmp_path) or entries(tmp_path) == []


# -- loading JSONL row by row keeps the order of errors and skips ---------------------------------------


def test_streamed_jsonl_reports_errors_and_skips_in_the_original_order(tmp_path):
    """Reading errors (any file) come before validation errors; skipped rows are listed reading errors first."""
    from src.data.loading import DatasetError

    train = tmp_path / "train.jsonl"
    lines = [json.dumps(PAIRS[0], ensure_ascii=False), '{"instruction": "x"}', "{not json", json.dumps(PAIRS[1])]
    train.write_bytes(("\n".join(lines) + "\n").encode() + b'{"instruction": "caf\xe9", "response": "b"}\n')
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text(json.dumps(PAIRS[2], ensure_ascii=False) + "\n[oops\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"train\.jsonl, line 3: invalid JSON"):
        load_records(str(train))
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(lines[:2]) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"eval\.jsonl, line 2: invalid JSON"):  # before good.jsonl's bad field
        load_records(str(good), str(evaluation))
    with pytest.raises(DatasetError, match=r"good\.jsonl, line 2, field 'response': missing"):
        load_records(str(good))
    records, report = load_records(str(train), skip_invalid=True, validation_split_ratio=0)
    assert [r["instruction"] for r in records["train"]] == [PAIRS[0]["instruction"], PAIRS[1]["instruction"]]
    assert report.skipped_examples == [f"{train}, line 3: invalid JSON", f"{train}, line 5: invalid UTF-8",
                                       f"{train}, line 2: missing field"]
    assert report.rows_read["train"] == 3


def test_dataset_sources_are_validated_while_read():
    rows = [dict(PAIRS[0]), {"instruction": "x", "response": ""}, dict(PAIRS[1])]
    records, report = load_records({"train": Dataset.from_list(rows)}, skip_invalid=True, validation_split_ratio=0)
    assert records["train"] == [{**PAIRS[0], "system": None}, {**PAIRS[1], "system": None}]
    assert report.skipped_examples == ["dataset split 'train', row 1: empty value"]
