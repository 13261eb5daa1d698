"""Per-message loss control: an assistant turn's "loss": false (or "train": false) masks it; train_on_prompt trains the
prompts' message texts (markup masked) or, with train_on_prompt_markup, every prompt token. For every template:
Alpaca, ChatML and each Qwen generation's own template, on multi-turn and tool rows."""

import copy
import json

import pytest

from src.data.loading import load_records
from src.data.records import DatasetError
from src.data.templates import get_prompt_format
from src.data.tokenization import IGNORE_INDEX, ExampleTokenizer
from src.data.viewer import describe_row
from tests.helpers import write_jsonl
from tests.test_chat_templates import CONVERSATIONS, END, EXPECTED, TEMPLATES, TOOLS, et_for


def spans(et, ids, labels):
    return [s["text"] for s in describe_row(et.tokenizer, {"input_ids": ids, "labels": labels}, 0)["trained_spans"]]


def record_of(conversation, masked=(), key="loss"):
    messages = copy.deepcopy(CONVERSATIONS[conversation])
    assistant = [m for m in messages if m["role"] == "assistant"]
    for i in masked:
        assistant[i][key] = False
    return {"messages": messages, **({"tools": TOOLS} if conversation == "tools" else {})}


def parsed(record, tmp_path):
    """The record as loading validates it (the loss flag is kept only where it masks)."""
    path = write_jsonl(tmp_path / "rows.jsonl", [record])
    return load_records(path, validation_split_ratio=0.0)[0]["train"][0]


def tiny_et(tokenizer, template, **kw):
    return ExampleTokenizer(tokenizer, get_prompt_format(template), 512, **kw)


TINY = {"messages": [{"role": "system", "content": "أجب باختصار."},
                     {"role": "user", "content": "ما عاصمة مصر؟"}, {"role": "assistant", "content": "القاهرة."},
                     {"role": "user", "content": "وعاصمة تونس؟"}, {"role": "assistant", "content": "تونس."}]}


@pytest.mark.parametrize("conversation", ["system_multi", "thinking", "tools"])
@pytest.mark.parametrize("name", TEMPLATES)
def test_a_masked_assistant_turn_is_left_out_for_every_qwen_template(name, conversation, tmp_path):
    et = et_for(name)
    expected = EXPECTED[name][conversation]
    plain_ids, plain_labels, _ = et.tokenize_batch([parsed(record_of(conversation), tmp_path)])[0]
    for key in ("loss", "train"):
        record = parsed(record_of(conversation, masked=(0,), key=key), tmp_path)
        ids, labels, _ = et.tokenize_batch([record])[0]
        assert ids == plain_ids  # the flag is ours: the template never sees it
        assert spans(et, ids, labels) == [text + END for text in expected[1:]]
        assert all(a == b or b == IGNORE_INDEX for a, b in zip(plain_labels, labels))  # only masking, nothing new
    last_masked = et.tokenize_batch([parsed(record_of(conversation, masked=(1,)), tmp_path)])[0]
    assert spans(et, last_masked[0], last_masked[1]) == [expected[0] + END]


@pytest.mark.parametrize("template", ["alpaca", "chatml"])
def test_a_masked_assistant_turn_is_left_out_for_alpaca_and_chatml(template, tiny_tokenizer, tmp_path):
    et = tiny_et(tiny_tokenizer, template)
    end = tiny_tokenizer.convert_ids_to_tokens(et.end_id)
    record = copy.deepcopy(TINY)
    record["messages"][2]["loss"] = False
    ids, labels, _ = et.tokenize_batch([parsed(record, tmp_path)])[0]
    assert ids == et.tokenize_batch([parsed(TINY, tmp_path)])[0][0]
    assert spans(et, ids, labels) == ["تونس." + end]


def test_bad_loss_flags_name_the_file_line_and_field(tmp_path):
    rows = [
        ({"messages": [{"role": "user", "content": "س", "loss": False}, {"role": "assistant", "content": "ج"}]},
         r"line 1, field 'messages\[0\].loss': only assistant turns take 'loss'"),
        ({"messages": [{"role": "user", "content": "س"}, {"role": "assistant", "content": "ج", "loss": "no"}]},
         r"line 1, field 'messages\[1\].loss': expected true or false, got 'no'"),
        ({"messages": [{"role": "user", "content": "س"}, {"role": "assistant", "content": "ج", "loss": False,
                                                           "train": True}]},
         r"line 1, field 'messages\[1\]': 'loss' and 'train' disagree"),
    ]
    for row, message in rows:
        path = write_jsonl(tmp_path / "bad.jsonl", [row])
        with pytest.raises(DatasetError, match=message):
            load_records(path, validation_split_ratio=0.0)
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"conversations": [{"from": "human", "value": "س"},
                                                                {"from": "gpt", "value": "ج", "loss": False}]}])
    assert load_records(ok, validation_split_ratio=0.0)[0]["train"][0]["messages"][1]["loss"] is False


def _prompt_texts(messages, system_prompt=None):
    texts = [m["content"] for m in messages if m["role"] != "assistant" and m.get("content")]
    if system_prompt and messages[0]["role"] != "system":
        texts.insert(0, system_prompt)
    return texts


@pytest.mark.parametrize("conversation", ["system_multi", "tools"])
@pytest.mark.parametrize("name", TEMPLATES)
def test_train_on_prompt_trains_the_message_texts_and_keeps_the_markup_masked_for_every_qwen_template(name, conversation,
                                                                                                    tmp_path):
    plain = et_for(name)
    on = et_for(name, train_on_prompt=True)
    record = parsed(record_of(conversation), tmp_path)
    ids, labels, _ = plain.tokenize_batch([record])[0]
    ids_on, labels_on, _ = on.tokenize_batch([record])[0]
    assert ids_on == ids  # the same tokens: only which are trained changes
    assert all(b != IGNORE_INDEX for a, b in zip(labels, labels_on) if a != IGNORE_INDEX)  # answers still trained
    new = [b if a == IGNORE_INDEX else IGNORE_INDEX for a, b in zip(labels, labels_on)]
    trained, texts = spans(plain, ids, new), _prompt_texts(CONVERSATIONS[conversation])
    # each message text, in order; a character that shares its token with the markup (the "." of ".\n\n# Tools",
    # the "}" of "}\n</tool_response>") stays masked, so that the ids are exactly those without train_on_prompt
    assert len(trained) == len(texts)
    for span, text in zip(trained, texts):
        assert span in text and len(span) >= len(text) - 1, (span, text)
    everything = et_for(name, train_on_prompt=True, train_on_prompt_markup=True, ignore_empty_think=False)
    ids_all, labels_all, _ = everything.tokenize_batch([record])[0]
    assert ids_all == ids
    masked = [i for i, lab in zip(ids_all, labels_all) if lab == IGNORE_INDEX]
    newline = everything.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert set(masked) <= set(newline)  # only the newline after each <|im_end|> (the format's suffix) stays masked


@pytest.mark.parametrize("template", ["alpaca", "chatml"])
def test_train_on_prompt_for_alpaca_and_chatml(template, tiny_tokenizer, tmp_path):
    record = parsed(TINY, tmp_path)
    plain = tiny_et(tiny_tokenizer, template)
    ids, labels, _ = plain.tokenize_batch([record])[0]
    on = tiny_et(tiny_tokenizer, template, train_on_prompt=True)
    ids_on, labels_on, _ = on.tokenize_batch([record])[0]
    assert ids_on == ids
    new = [b if a == IGNORE_INDEX else IGNORE_INDEX for a, b in zip(labels, labels_on)]
    texts = ["أجب باختصار.", "ما عاصمة مصر؟", "وعاصمة تونس؟"]
    if template == "chatml":  # every text ends before a special token: whole
        assert spans(plain, ids, new) == texts
    else:  # alpaca: the final "." / "؟" and the "\n\n" of the markup after it are one token: masked
        assert spans(plain, ids, new) == [text[:-1] for text in texts]
    markup = tiny_et(tiny_tokenizer, template, train_on_prompt=True, train_on_prompt_markup=True)
    _, labels_all, _ = markup.tokenize_batch([record])[0]
    assert sum(lab == IGNORE_INDEX for lab in labels_all) == 2 * len(markup.suffix_ids) + len(markup.prefix_ids)


def test_flags_enter_the_cache_key_and_the_audit_counts_masked_turns(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    import train_sft
    from src.data.cache import cache_key, cache_settings

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    masked = copy.deepcopy(TINY)
    masked["messages"][2]["loss"] = False
    rows = [parsed(TINY, tmp_path), parsed(masked, tmp_path)]
    keys = set()
    for on, markup in ((False, False), (True, False), (True, True)):
        et = tiny_et(tokenizer, "chatml", train_on_prompt=on, train_on_prompt_markup=markup)
        for row in rows:
            keys.add(cache_key(cache_settings([row], et, packing=False)[0]))
    assert len(keys) == 6
    data = write_jsonl(tmp_path / "rows.jsonl", [TINY, masked, masked])
    argv = ["audit", "--model_name", tiny_model_dir, "--dataset_path", data, "--output_dir", str(tmp_path / "o"),
            "--validation_split_ratio", "0", "--instruction_template", "chatml"]
    assert train_sft.main(argv) == 0
    assert "2 assistant turns masked by their row" in capsys.readouterr().out
    result = json.load(open(tmp_path / "o" / "audit.json", encoding="utf-8"))
    assert result["splits"]["train"]["masked_turns"] == 2
    # the command line and the viewer: the masked turn and the trained prompt texts, as trained
    assert train_sft.main(argv + ["--train_on_prompt", "true", "--show", "1", "--rows", "1", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [s["text"] for s in row["trained_spans"]] == ["أجب باختصار.", "ما عاصمة مصر؟", "وعاصمة تونس؟",
                                                          "تونس.<|im_end|>"]


def test_the_config_refuses_markup_without_train_on_prompt():
    from src.config import SFTConfig

    with pytest.raises(ValueError, match="train_on_prompt_markup=True needs train_on_prompt=True"):
        SFTConfig(train_on_prompt_markup=True)
    assert SFTConfig(train_on_prompt=True, train_on_prompt_markup=True).train_on_prompt_markup
