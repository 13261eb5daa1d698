"""instruction_template="tokenizer": every Qwen generation's own chat template, token-exact, turn by turn.

Tokenizers are built from the real Qwen2.5 files plus, for the Qwen3 family, the four tokens its published
tokenizer_config.json adds (../shared/qwen-chat-templates/SOURCE.txt); the templates are read from the shared
folder, never copied. Expected trained text is written out by hand per template family.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest

from src.data.chat_templates import ChatTemplateError, TokenizerChatFormat, split_reasoning
from src.data.loading import DatasetError, load_records
from src.data.templates import get_prompt_format
from src.data.tokenization import IGNORE_INDEX, ExampleTokenizer
from tests.helpers import QWEN_TOKENIZER_DIR, ROOT, need_shared, write_jsonl

TEMPLATES_DIR = os.path.join(ROOT, "..", "shared", "qwen-chat-templates")
TEMPLATES = ["qwen2_5", "qwen3", "qwen3_instruct_2507", "qwen3_5_think", "qwen3_5_nothink", "qwen3_6", "qwen3_8"]
QWEN3_ADDED = ["<tool_response>", "</tool_response>", "<think>", "</think>"]  # ids 151665-151668, not special
_TOKENIZERS: dict = {}


def qwen_tokenizer_for(name: str):
    for folder, what in ((QWEN_TOKENIZER_DIR, "vocab.json"), (TEMPLATES_DIR, f"{name}.jinja")):
        need_shared(os.path.join(folder, what))
    if name not in _TOKENIZERS:
        from tokenizers import AddedToken
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(QWEN_TOKENIZER_DIR)
        if name != "qwen2_5":
            tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_ADDED])
            assert tokenizer.convert_tokens_to_ids(QWEN3_ADDED) == [151665, 151666, 151667, 151668]
        with open(os.path.join(TEMPLATES_DIR, f"{name}.jinja"), encoding="utf-8") as fh:
            tokenizer.chat_template = fh.read()
        _TOKENIZERS[name] = tokenizer
    return _TOKENIZERS[name]


SYSTEM = "أنت مساعد عربي دقيق، أجب بالفصحى."
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "حالة الطقس في مدينة",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "اسم المدينة"}},
                   "required": ["city"]}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "القاهرة"}}}
CONVERSATIONS = {
    "single": [{"role": "user", "content": "ما عاصمة مصر؟"}, {"role": "assistant", "content": "القاهرة."}],
    "system_multi": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "اكتبْ جملةً مُشكَّلةً عن العِلمِ"},
        {"role": "assistant", "content": "العِلْمُ نُورٌ."},
        {"role": "user", "content": "ما الفرق بين CPU و GPU؟"},
        {"role": "assistant", "content": "الـ GPU يُسرّع العمليات المتوازية."},
    ],
    "thinking": [
        {"role": "user", "content": "كم مجموع ٢ و٣؟"},
        {"role": "assistant", "reasoning_content": "٢ + ٣ = ٥", "content": "المجموع ٥."},
        {"role": "user", "content": "وضعف ذلك؟"},
        {"role": "assistant", "reasoning_content": "٥ × ٢ = ١٠", "content": "الضعف ١٠."},
    ],
    "tools": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "ما الطقس في القاهرة؟"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": '{"temp": 30}'},
        {"role": "assistant", "content": "الحرارة ٣٠ درجة."},
    ],
}
JSON_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "القاهرة"}}\n</tool_call>'
XML_CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nالقاهرة\n</parameter>\n</function>\n</tool_call>"
END = "<|im_end|>"


def folded(reasoning, answer):
    return f"<think>\n{reasoning}\n</think>\n\n{answer}"


# What each assistant turn trains, by template (the rules in src/data/chat_templates.py, written out), with the
# default ignore_empty_think=True: an empty thinking block the template writes for a turn without reasoning is masked.
EXPECTED = {
    "qwen2_5": {  # no thinking markup: reasoning goes in front of the answer, trained
        "single": ["القاهرة."],
        "system_multi": ["العِلْمُ نُورٌ.", "الـ GPU يُسرّع العمليات المتوازية."],
        "thinking": [folded("٢ + ٣ = ٥", "المجموع ٥."), folded("٥ × ٢ = ١٠", "الضعف ١٠.")],
        "tools": [JSON_CALL, "الحرارة ٣٠ درجة."],
    },
    "qwen3": {  # hybrid: the turn after the last user query carries its thinking (masked when empty), earlier turns lose it
        "single": ["القاهرة."],
        "system_multi": ["العِلْمُ نُورٌ.", "الـ GPU يُسرّع العمليات المتوازية."],
        "thinking": ["المجموع ٥.", folded("٥ × ٢ = ١٠", "الضعف ١٠.")],
        "tools": [JSON_CALL, "الحرارة ٣٠ درجة."],
    },
    "qwen3_5_think": {  # "<think>\n" is the generation prompt: masked; reasoning after it is trained, an empty block is not
        "single": ["القاهرة."],
        "system_multi": ["العِلْمُ نُورٌ.", "الـ GPU يُسرّع العمليات المتوازية."],
        "thinking": ["المجموع ٥.", "٥ × ٢ = ١٠\n</think>\n\nالضعف ١٠."],
        "tools": [XML_CALL, "الحرارة ٣٠ درجة."],
    },
    "qwen3_5_nothink": {  # the empty block is the generation prompt: masked
        "single": ["القاهرة."],
        "system_multi": ["العِلْمُ نُورٌ.", "الـ GPU يُسرّع العمليات المتوازية."],
        "thinking": ["المجموع ٥.", folded("٥ × ٢ = ١٠", "الضعف ١٠.")],
        "tools": [XML_CALL, "الحرارة ٣٠ درجة."],
    },
    "qwen3_8": {  # thinking preserved in every turn
        "single": ["القاهرة."],
        "system_multi": ["العِلْمُ نُورٌ.", "الـ GPU يُسرّع العمليات المتوازية."],
        "thinking": ["٢ + ٣ = ٥\n</think>\n\nالمجموع ٥.", "٥ × ٢ = ١٠\n</think>\n\nالضعف ١٠."],
        "tools": [XML_CALL, "الحرارة ٣٠ درجة."],
    },
}
# The same with ignore_empty_think=False, for the thinking templates: the empty block (the rest of it after a
# "<think>\n" generation prompt) is trained.
EXPECTED_EMPTY_THINK_TRAINED = {
    "qwen3": {
        "single": ["<think>\n\n</think>\n\nالقاهرة."],
        "system_multi": ["العِلْمُ نُورٌ.", "<think>\n\n</think>\n\nالـ GPU يُسرّع العمليات المتوازية."],
        "thinking": EXPECTED["qwen3"]["thinking"],
        "tools": [JSON_CALL, "<think>\n\n</think>\n\nالحرارة ٣٠ درجة."],
    },
    "qwen3_5_think": {
        "single": ["\n</think>\n\nالقاهرة."],
        "system_multi": ["العِلْمُ نُورٌ.", "\n</think>\n\nالـ GPU يُسرّع العمليات المتوازية."],
        "thinking": EXPECTED["qwen3_5_think"]["thinking"],
        "tools": ["\n</think>\n\n" + XML_CALL, "\n</think>\n\nالحرارة ٣٠ درجة."],
    },
    "qwen3_8": {
        "single": ["\n</think>\n\nالقاهرة."],
        "system_multi": ["\n</think>\n\nالعِلْمُ نُورٌ.", "\n</think>\n\nالـ GPU يُسرّع العمليات المتوازية."],
        "thinking": EXPECTED["qwen3_8"]["thinking"],
        "tools": ["\n</think>\n\n" + XML_CALL, "\n</think>\n\nالحرارة ٣٠ درجة."],
    },
}
EXPECTED["qwen3_instruct_2507"] = EXPECTED["qwen2_5"]
EXPECTED["qwen3_6"] = EXPECTED["qwen3_5_think"]
EXPECTED_EMPTY_THINK_TRAINED["qwen3_6"] = EXPECTED_EMPTY_THINK_TRAINED["qwen3_5_think"]
THINKING_TEMPLATES = ["qwen3", "qwen3_5_think", "qwen3_6", "qwen3_8"]


def et_for(name, max_seq_length=4096, **kw):
    tokenizer = qwen_tokenizer_for(name)
    template_kwargs = kw.pop("template_kwargs", None)
    system_prompt = kw.pop("system_prompt", None)
    ignore_empty_think = kw.pop("ignore_empty_think", True)
    fmt = get_prompt_format("tokenizer", system_prompt=system_prompt,
                            chat=TokenizerChatFormat.from_tokenizer(tokenizer, template_kwargs, ignore_empty_think))
    return ExampleTokenizer(tokenizer, fmt, max_seq_length, **kw)


def reference_ids(tokenizer, messages, tools=None, **kw):
    return list(tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False, **kw))


def split_at_generation_prompt(tokenizer, ids):
    """apply_chat_template's ids with the one documented difference: after a ``<think>\\n`` generation prompt, an
    empty thinking block's ``"\\n\\n"`` (one token, 271) is the prompt's ``"\\n"`` and the answer's ``"\\n"`` (198, 198),
    so that training ids start with exactly the ids generation is prompted with."""
    think, close = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    newline, two = tokenizer("\n")["input_ids"] + tokenizer("\n\n")["input_ids"]
    out = []
    for i, token in enumerate(ids):
        if token == two and 0 < i < len(ids) - 1 and ids[i - 1] == think and ids[i + 1] == close:
            out += [newline, newline]
        else:
            out.append(token)
    return out


def reference_messages(messages, reads_reasoning):
    """What transformers is given for the same conversation: for templates that ignore reasoning_content,
    the reasoning written into the answer as we write it."""
    if reads_reasoning:
        return messages
    return [{**{k: v for k, v in m.items() if k != "reasoning_content"}, "content": folded(m["reasoning_content"], m["content"])}
            if m.get("reasoning_content") else m for m in messages]


def trained_spans(tokenizer, labels):
    spans, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", TEMPLATES)
def test_ids_equal_apply_chat_template_and_each_assistant_turn_trains_what_the_model_generates(name, conversation):
    et = et_for(name)
    messages = CONVERSATIONS[conversation]
    tools = TOOLS if conversation == "tools" else None
    record = {"messages": messages, **({"tools": tools} if tools else {})}
    ids, labels, status = et.tokenize_batch([record])[0]
    reference = reference_messages(messages, et.fmt.chat.reads_reasoning)
    expected = reference_ids(et.tokenizer, reference, tools)
    if et.fmt.chat.generation_opening == "<think>\n":
        expected = split_at_generation_prompt(et.tokenizer, expected)
    assert ids == expected
    assert et.tokenizer.decode(ids) == et.tokenizer.decode(reference_ids(et.tokenizer, reference, tools))
    assert trained_spans(et.tokenizer, labels) == [text + END for text in EXPECTED[name][conversation]]
    # the vectorized path (what training uses) gives the same ids and labels
    chunk = next(et.tokenize_chunks([record], "train"))
    assert chunk.input_ids.tolist() == ids and chunk.labels.tolist() == labels
    # generation prompts for the last assistant turn are apply_chat_template(add_generation_prompt=True)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = et.encode_conversation_prompt(messages[:last]) if not tools else None
    if prompt is not None:
        assert prompt == reference_ids(et.tokenizer, reference[:last], add_generation_prompt=True)


@pytest.mark.parametrize("name", TEMPLATES)
def test_instruction_rows_render_as_a_user_and_an_assistant_turn(name):
    et = et_for(name, system_prompt=SYSTEM)
    record = {"instruction": "ما عاصمة مصر؟", "response": "القاهرة.", "system": None}
    ids, labels, _ = et.tokenize_batch([record])[0]
    messages = [{"role": "system", "content": SYSTEM}] + CONVERSATIONS["single"]
    expected = reference_ids(et.tokenizer, messages)
    assert ids == (split_at_generation_prompt(et.tokenizer, expected) if name in ("qwen3_5_think", "qwen3_6", "qwen3_8")
                   else expected)
    assert trained_spans(et.tokenizer, labels) == [EXPECTED[name]["single"][0] + END]
    assert et.encode_prompt("ما عاصمة مصر؟") == reference_ids(et.tokenizer, messages[:1 + 1], add_generation_prompt=True)


def test_thinking_inside_the_answer_is_the_same_as_reasoning_content():
    for name in ("qwen3", "qwen3_5_think", "qwen3_8"):
        et = et_for(name)
        as_field = et.tokenize_batch([{"messages": CONVERSATIONS["thinking"]}])[0]
        inline = [dict(m) for m in CONVERSATIONS["thinking"]]
        for m in inline:
            if m.get("reasoning_content"):
                m["content"] = f"<think>\n{m.pop('reasoning_content')}\n</think>\n\n{m['content']}"
        assert et.tokenize_batch([{"messages": inline}])[0] == as_field, name


def test_enable_thinking_and_reasoning_effort_reach_the_template():
    et = et_for("qwen3", template_kwargs={"enable_thinking": False})
    ids, labels, _ = et.tokenize_batch([{"messages": CONVERSATIONS["single"]}])[0]
    assert ids == reference_ids(et.tokenizer, CONVERSATIONS["single"], enable_thinking=False)
    # the empty thinking block is now part of the generation prompt: given, not trained
    assert trained_spans(et.tokenizer, labels) == ["القاهرة." + END]
    assert et.encode_prompt("ما عاصمة مصر؟")[-6:] == et.tokenizer("<|im_start|>assistant\n<think>\n\n</think>\n\n")["input_ids"][-6:]

    low = et_for("qwen3_8", template_kwargs={"reasoning_effort": "low"})
    ids, _, _ = low.tokenize_batch([{"messages": CONVERSATIONS["single"]}])[0]
    assert ids == split_at_generation_prompt(low.tokenizer, reference_ids(low.tokenizer, CONVERSATIONS["single"],
                                                                          reasoning_effort="low"))
    assert "Reasoning effort is set to low" in low.tokenizer.decode(ids)
    with pytest.raises(ChatTemplateError, match="Unexpected reasoning effort"):
        et_for("qwen3_8", template_kwargs={"reasoning_effort": "extreme"}).tokenize_batch([{"messages": CONVERSATIONS["single"]}])


def test_train_on_last_turn_only_with_tools():
    et = et_for("qwen3_6", train_on_last_turn_only=True)
    _, labels, _ = et.tokenize_batch([{"messages": CONVERSATIONS["tools"], "tools": TOOLS}])[0]
    assert trained_spans(et.tokenizer, labels) == ["الحرارة ٣٠ درجة." + END]  # its empty thinking block is masked


# -- thinking-mode controls: the empty thinking block (ignore_empty_think), per-row chat_template_kwargs -----------

QUESTION, ANSWER = "ما عاصمة مصر؟", "القاهرة."
NO_REASONING = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]


def expected_ids(et, messages, tools=None, **template_kwargs):
    """apply_chat_template's ids under ``template_kwargs`` (the run's and the row's, merged), with the documented
    token split after a ``<think>\n`` generation prompt."""
    ids = reference_ids(et.tokenizer, messages, tools, **template_kwargs)
    return split_at_generation_prompt(et.tokenizer, ids) if et.fmt.chat.opening_for(template_kwargs) == "<think>\n" else ids


@pytest.mark.parametrize("name", THINKING_TEMPLATES)
def test_an_empty_thinking_block_is_masked_by_default_and_trained_with_ignore_empty_think_false(name):
    masked, trained = et_for(name), et_for(name, ignore_empty_think=False)
    tokenizer = masked.tokenizer
    # the part of the block that follows the generation prompt: all of it for Qwen3, "\n</think>\n\n" after "<think>\n"
    rest_of_block = "<think>\n\n</think>\n\n" if name == "qwen3" else "\n</think>\n\n"
    for record in ({"messages": NO_REASONING}, {"instruction": QUESTION, "response": ANSWER, "system": None}):
        ids, labels, _ = masked.tokenize_batch([record])[0]
        ids_trained, labels_trained, _ = trained.tokenize_batch([record])[0]
        assert ids == ids_trained == expected_ids(masked, NO_REASONING)  # only the labels change
        assert tokenizer.decode(ids) == tokenizer.decode(reference_ids(tokenizer, NO_REASONING))
        assert trained_spans(tokenizer, labels) == [ANSWER + END]
        assert trained_spans(tokenizer, labels_trained) == [rest_of_block + ANSWER + END]
        differ = [i for i, (a, b) in enumerate(zip(labels, labels_trained)) if a != b]
        assert differ == list(range(differ[0], differ[-1] + 1)) and all(labels[i] == IGNORE_INDEX for i in differ)
        assert tokenizer.decode([ids[i] for i in differ]) == rest_of_block
        prompt = masked.encode_prompt(QUESTION)  # generation is prompted with the ids training starts with
        assert prompt == trained.encode_prompt(QUESTION) == ids[:len(prompt)]
        for et, expected_labels in ((masked, labels), (trained, labels_trained)):  # the vectorized path agrees
            chunk = next(et.tokenize_chunks([record], "train"))
            assert chunk.input_ids.tolist() == ids and chunk.labels.tolist() == expected_labels
    # every turn of every conversation: ignore_empty_think=False trains the empty blocks as the template writes them
    for conversation, messages in CONVERSATIONS.items():
        tools = TOOLS if conversation == "tools" else None
        record = {"messages": messages, **({"tools": tools} if tools else {})}
        ids, labels, _ = trained.tokenize_batch([record])[0]
        assert ids == masked.tokenize_batch([record])[0][0] == expected_ids(trained, messages, tools)
        assert trained_spans(tokenizer, labels) == [text + END for text in EXPECTED_EMPTY_THINK_TRAINED[name][conversation]]
    # the setting is part of the format, so of the tokenized-data cache key
    assert dataclasses.asdict(masked.fmt) != dataclasses.asdict(trained.fmt)


@pytest.mark.parametrize("name", THINKING_TEMPLATES)
def test_reasoning_is_trained_whatever_ignore_empty_think_says(name):
    records = [{"messages": CONVERSATIONS["thinking"]},
               {"instruction": QUESTION, "response": ANSWER, "reasoning_content": "مصر عاصمتها القاهرة", "system": None}]
    masked, trained = et_for(name), et_for(name, ignore_empty_think=False)
    results = masked.tokenize_batch(records)
    assert results == trained.tokenize_batch(records)
    (ids, labels, _), (instruction_ids, instruction_labels, _) = results
    assert ids == expected_ids(masked, CONVERSATIONS["thinking"])
    assert trained_spans(masked.tokenizer, labels) == [text + END for text in EXPECTED[name]["thinking"]]
    block = "مصر عاصمتها القاهرة\n</think>\n\n" + ANSWER
    assert trained_spans(masked.tokenizer, instruction_labels) == [("<think>\n" if name == "qwen3" else "") + block + END]


def test_with_thinking_off_the_generation_prompt_holds_the_whole_empty_block_and_nothing_changes():
    for name in THINKING_TEMPLATES:
        masked = et_for(name, template_kwargs={"enable_thinking": False})
        trained = et_for(name, template_kwargs={"enable_thinking": False}, ignore_empty_think=False)
        ids, labels, _ = masked.tokenize_batch([{"messages": NO_REASONING}])[0]
        assert (ids, labels) == tuple(trained.tokenize_batch([{"messages": NO_REASONING}])[0][:2]), name
        assert ids == reference_ids(masked.tokenizer, NO_REASONING, enable_thinking=False), name
        assert trained_spans(masked.tokenizer, labels) == [ANSWER + END], name


def test_an_answer_starting_with_a_line_break_keeps_the_ids_exact():
    """Qwen3 strips only newlines off an answer; " \nx" after the block's "\n\n" may be one token: not cut there."""
    et = et_for("qwen3")
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": " \n" + ANSWER}]
    ids, labels, _ = et.tokenize_batch([{"messages": messages}])[0]
    assert ids == reference_ids(et.tokenizer, messages)
    assert trained_spans(et.tokenizer, labels) == ["<think>\n\n</think>\n\n \n" + ANSWER + END]


@pytest.mark.parametrize("name", THINKING_TEMPLATES)
def test_rows_with_their_own_chat_template_kwargs_mix_thinking_and_non_thinking_data(name, tmp_path):
    reasoning_row = [{"role": "user", "content": "كم ٢+٣؟"}, {"role": "assistant", "content": "٥", "reasoning_content": "٢+٣=٥"}]
    rows = [{"messages": NO_REASONING, "chat_template_kwargs": {"enable_thinking": False}},
            {"messages": NO_REASONING},
            {"instruction": "كم ٢+٣؟", "response": "٥", "reasoning_content": "٢+٣=٥",
             "chat_template_kwargs": '{"enable_thinking": true}'}]  # JSON text, as Parquet/CSV (and the trainer) hold it
    records = load_records(write_jsonl(tmp_path / "mixed.jsonl", rows), validation_split_ratio=0.0)[0]["train"]
    assert [r.get("chat_template_kwargs") for r in records] == [{"enable_thinking": False}, None, {"enable_thinking": True}]
    messages = [NO_REASONING, NO_REASONING, reasoning_row]
    for run_kwargs in ({}, {"enable_thinking": False}):
        et = et_for(name, template_kwargs=run_kwargs)
        results = et.tokenize_batch(records)
        chunk = next(et.tokenize_chunks(records, "train"))
        assert chunk.input_ids.tolist() == [i for ids, _, _ in results for i in ids]
        assert chunk.labels.tolist() == [label for _, labels, _ in results for label in labels]
        for record, conversation, (ids, labels, _) in zip(records, messages, results):
            merged = {**run_kwargs, **(record.get("chat_template_kwargs") or {})}  # the row's own win
            assert ids == expected_ids(et, conversation, **merged), (run_kwargs, record)
            reasoning = record.get("reasoning_content")
            answer = conversation[-1]["content"]
            expected = (("<think>\n" if name == "qwen3" else "") + reasoning + "\n</think>\n\n" + answer) if reasoning \
                else answer
            assert trained_spans(et.tokenizer, labels) == [expected + END], (run_kwargs, record)
        texts = [et.tokenizer.decode(ids) for ids, _, _ in results[:2]]
        if name == "qwen3_8" and not run_kwargs:  # Qwen3.8 writes reasoning instructions when thinking is on
            assert "Reasoning effort" in texts[1] and "Reasoning effort" not in texts[0]
        else:  # the same empty block in both rows' turn; only the generation prompt (what is given) differs
            assert texts[0] == texts[1]
        # generation prompts under a row's variables are apply_chat_template's
        for row_kwargs in ({"enable_thinking": False}, {"enable_thinking": True}):
            assert et.encode_conversation_prompt(NO_REASONING[:1], template_kwargs=row_kwargs) == reference_ids(
                et.tokenizer, NO_REASONING[:1], add_generation_prompt=True, **{**run_kwargs, **row_kwargs})
    # with ignore_empty_think=False the row's variables decide whether its empty block is given or trained
    trained = et_for(name, ignore_empty_think=False)
    (_, given, _), (_, generated, _) = trained.tokenize_batch(records[:2])
    assert trained_spans(trained.tokenizer, given) == [ANSWER + END]
    assert trained_spans(trained.tokenizer, generated) == [EXPECTED_EMPTY_THINK_TRAINED[name]["single"][0] + END]
    # the generation opening is found once per set of variables
    chat = et_for(name).fmt.chat
    assert chat.opening_for({"enable_thinking": False}) == "<think>\n\n</think>\n\n"
    assert chat.opening_for(None) == chat.generation_opening == ("" if name == "qwen3" else "<think>\n")


def test_a_rows_reasoning_effort_and_a_bad_value_naming_the_row():
    et = et_for("qwen3_8")
    records = [{"messages": NO_REASONING, "chat_template_kwargs": {"reasoning_effort": "low"}}, {"messages": NO_REASONING}]
    (low, _, _), (default, _, _) = et.tokenize_batch(records)
    assert low == expected_ids(et, NO_REASONING, reasoning_effort="low")
    assert "Reasoning effort is set to low" in et.tokenizer.decode(low)
    assert "Reasoning effort is set to xhigh" in et.tokenizer.decode(default)
    bad = records + [{"messages": NO_REASONING, "chat_template_kwargs": {"reasoning_effort": "extreme"}}]
    with pytest.raises(ChatTemplateError, match=r"train row 2: .*Unexpected reasoning effort"):
        list(et.tokenize_chunks(bad, "train"))


def test_row_chat_template_kwargs_need_the_tokenizer_template(qwen_tokenizer):
    et = ExampleTokenizer(qwen_tokenizer, get_prompt_format("chatml"), 512)
    records = [{"messages": NO_REASONING},
               {"instruction": QUESTION, "response": ANSWER, "system": None, "chat_template_kwargs": {"enable_thinking": False}}]
    with pytest.raises(ValueError, match=r"train row 1: the row's chat_template_kwargs need instruction_template='tokenizer'"):
        next(et.tokenize_chunks(records, "train"))


@pytest.mark.parametrize("row, message", [
    ({"messages": NO_REASONING, "chat_template_kwargs": '{"enable_thinking": false'}, r"not valid JSON"),
    ({"messages": NO_REASONING, "chat_template_kwargs": [True]}, r"expected a mapping of template variable names"),
    ({"messages": NO_REASONING, "chat_template_kwargs": {"add_generation_prompt": True}},
     r"\['add_generation_prompt'\] are set by the trainer"),
    ({"instruction": QUESTION, "response": ANSWER, "chat_template_kwargs": {"enable-thinking": False}},
     r"\['enable-thinking'\] cannot be template variable names"),
    ({"instruction": QUESTION, "response": ANSWER, "chat_template_kwargs": "true"}, r"expected a mapping"),
    ({"text": "<|im_start|>user\nس<|im_end|>\n", "chat_template_kwargs": {"enable_thinking": False}},
     r"a pre-formatted 'text' row is not rendered by a chat template"),
])
def test_a_bad_row_chat_template_kwargs_names_the_file_line_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": QUESTION, "response": ANSWER}, row])
    with pytest.raises(DatasetError, match=re.escape(path) + r", line 2, field 'chat_template_kwargs': " + message):
        load_records(path)
    records, report = load_records(path, validation_split_ratio=0.0, skip_invalid=True)
    assert len(records["train"]) == 1 and dict(report.skipped) == {"invalid chat_template_kwargs": 1}


def test_row_chat_template_kwargs_survive_the_trainers_arrow_round_trip(tiny_model_dir, tmp_path):
    """Arrow merges the kwargs objects of all rows into one struct (other rows' keys as nulls): read back, nulls
    count as absent, so every row keeps exactly its own variables."""
    from src.training.sft_trainer import SFTTrainer
    from tests.helpers import make_config

    rows = [{"instruction": "س١", "response": "ج١", "chat_template_kwargs": {"enable_thinking": False}},
            {"instruction": "س٢", "response": "ج٢", "chat_template_kwargs": {"reasoning_effort": "low"}},
            {"messages": NO_REASONING, "chat_template_kwargs": '{"enable_thinking": true}'},
            {"instruction": "س٣", "response": "ج٣"}]
    path = write_jsonl(tmp_path / "kwargs.jsonl", rows)
    direct, _ = load_records(path, validation_split_ratio=0.0)
    assert [r.get("chat_template_kwargs") for r in direct["train"]] == [
        {"enable_thinking": False}, {"reasoning_effort": "low"}, {"enable_thinking": True}, None]
    trainer = SFTTrainer(make_config(tiny_model_dir, path, tmp_path / "o", instruction_template="tokenizer"))
    through_arrow, _ = load_records(trainer.load_dataset(), validation_split_ratio=0.0)
    assert through_arrow["train"] == direct["train"]


def test_normalization_touches_content_not_markup_nor_tool_arguments():
    from src.data.normalization import build_normalizer

    normalize = build_normalizer("search")  # removes diacritics, unifies alef, Western digits
    et = et_for("qwen3_5_nothink", normalize=normalize)
    messages = [{"role": "system", "content": "أنتَ مساعدٌ"}, {"role": "user", "content": "ما الطقسُ في أسوان؟"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "أسوانُ"}}}]},
                {"role": "tool", "content": "الحرارةُ ٤٠"}, {"role": "assistant", "content": "الحرارةُ ٤٠ درجةً."}]
    ids, labels, _ = et.tokenize_batch([{"messages": messages, "tools": TOOLS}])[0]
    expected = [{**m, "content": normalize(m["content"])} for m in messages]
    assert ids == reference_ids(et.tokenizer, expected, TOOLS)
    text = et.tokenizer.decode(ids)
    assert "أسوانُ" in text  # the tool argument as given
    assert "الحراره 40 درجه" in text and "الحرارةُ" not in text  # content normalized
    assert "اسم المدينة" in text  # tool definitions as given


def test_a_template_that_is_not_chatml_framed_is_refused(qwen_tokenizer):
    tokenizer = qwen_tokenizer.__class__.from_pretrained(QWEN_TOKENIZER_DIR)
    tokenizer.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    with pytest.raises(ChatTemplateError, match="ChatML-framed"):
        TokenizerChatFormat.from_tokenizer(tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ChatTemplateError, match="has none"):
        TokenizerChatFormat.from_tokenizer(tokenizer)


def test_saved_template_renders_training_prompts_with_the_runs_settings():
    et = et_for("qwen3", template_kwargs={"enable_thinking": False}, system_prompt=SYSTEM)
    saved = et.fmt.chat.saved_template(SYSTEM)
    assert et.fmt.chat.__class__(saved, et.fmt.chat.kwargs).saved_template(SYSTEM) == saved  # idempotent
    tokenizer = qwen_tokenizer_for("qwen3")
    user = [{"role": "user", "content": "ما عاصمة مصر؟"}]
    plain = list(tokenizer.apply_chat_template(user, tokenize=True, return_dict=False, add_generation_prompt=True,
                                               chat_template=saved))
    assert plain == et.encode_prompt("ما عاصمة مصر؟")
    # an explicit variable and system message still win
    thinking = list(tokenizer.apply_chat_template([{"role": "system", "content": "س"}] + user, tokenize=True,
                                                  return_dict=False, add_generation_prompt=True, chat_template=saved,
                                                  enable_thinking=True))
    assert thinking == reference_ids(tokenizer, [{"role": "system", "content": "س"}] + user, add_generation_prompt=True)


def test_split_reasoning():
    assert split_reasoning("<think>\nفكرة\n</think>\n\nالجواب") == ("فكرة", "الجواب")
    assert split_reasoning("فكرة\n</think>\n\nالجواب") == ("فكرة", "الجواب")
    assert split_reasoning("الجواب فقط") == ("", "الجواب فقط")


# -- loading rows with tools and reasoning -----------------------------------------------------------------


def test_tool_and_reasoning_rows_load_from_jsonl(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "ما الطقس؟"},
                      {"role": "assistant", "content": None, "tool_calls": [
                          {"id": "c1", "type": "function",
                           "function": {"name": "get_weather", "arguments": json.dumps({"city": "القاهرة"})}}]},
                      {"role": "tool", "content": "30", "tool_call_id": "c1"},
                      {"role": "assistant", "content": "٣٠ درجة", "reasoning_content": "قرأت النتيجة"}],
         "tools": json.dumps(TOOLS, ensure_ascii=False)},
        {"instruction": "كم ٢+٢؟", "response": "٤", "reasoning_content": "٢+٢=٤"},
    ]
    records, _ = load_records(write_jsonl(tmp_path / "t.jsonl", rows), validation_split_ratio=0.0)
    conversation, instruction = records["train"]
    assert conversation["tools"] == TOOLS
    call = conversation["messages"][1]
    assert call["content"] == "" and call["tool_calls"][0]["function"]["arguments"] == {"city": "القاهرة"}
    assert conversation["messages"][2] == {"role": "tool", "content": "30", "tool_call_id": "c1"}
    assert conversation["messages"][3]["reasoning_content"] == "قرأت النتيجة"
    assert instruction["reasoning_content"] == "٢+٢=٤"


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "س"}, {"role": "tool", "content": "x"}, {"role": "assistant", "content": "ج"}],
     r"line 1, field 'messages\[1\]': expected a assistant turn, got tool"),
    ([{"role": "user", "content": "س"}, {"role": "assistant", "content": "ج"}, {"role": "tool", "content": "x"}],
     r"line 1, field 'messages\[2\]': expected a user turn, got tool"),
    ([{"role": "user", "content": "س"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
      {"role": "tool", "content": "x"}, {"role": "assistant", "content": "ج"}],
     r"line 1, field 'messages\[1\].tool_calls\[0\].function.arguments': not valid JSON"),
    ([{"role": "user", "content": "س"}, {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]},
      {"role": "tool", "content": "x"}, {"role": "assistant", "content": "ج"}],
     r"field 'messages\[1\].tool_calls\[0\].function.name': expected the tool's name"),
    ([{"role": "user", "content": "س"}, {"role": "assistant", "content": "ج", "reasoning_content": "  "}],
     r"field 'messages\[1\].reasoning_content': value is empty"),
])
def test_malformed_tool_rows_name_the_line_and_field(tmp_path, messages, message):
    with pytest.raises(DatasetError, match=message):
        load_records(write_jsonl(tmp_path / "bad.jsonl", [{"messages": messages}]))


def test_other_templates_refuse_tool_rows_and_write_reasoning_before_the_answer(qwen_tokenizer):
    et = ExampleTokenizer(qwen_tokenizer, get_prompt_format("chatml"), 512)
    with pytest.raises(ValueError, match=r"train row 1: tool definitions, tool calls and tool turns need "
                                         r"instruction_template='tokenizer'"):
        next(et.tokenize_chunks([{"messages": CONVERSATIONS["single"]}, {"messages": CONVERSATIONS["tools"]}], "train"))
    _, labels, _ = et.tokenize_batch([{"instruction": "كم ٢+٣؟", "response": "٥", "reasoning_content": "٢+٣=٥",
                                       "system": None}])[0]
    assert trained_spans(qwen_tokenizer, labels) == [folded("٢+٣=٥", "٥") + END]


# -- end to end: train with the model's own template, serve with plain transformers ----------------------


@pytest.fixture(scope="module")
def thinking_tiny_model(tmp_path_factory):
    """The tiny Qwen2 model with a Qwen3-family tokenizer: Qwen3's template and its added tokens."""
    template = os.path.join(TEMPLATES_DIR, "qwen3.jinja")
    need_shared(template)
    from tokenizers import AddedToken

    from src.models.tiny import build_tiny_qwen2
    from tests.helpers import CORPUS

    model, tokenizer = build_tiny_qwen2(CORPUS, None, vocab_size=600, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, seed=0)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t in QWEN3_ADDED + ["<tool_call>", "</tool_call>"]])
    with open(template, encoding="utf-8") as fh:
        tokenizer.chat_template = fh.read()
    model.resize_token_embeddings(len(tokenizer))
    path = str(tmp_path_factory.mktemp("tiny_qwen3_tokenizer"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow  # trains 80 steps on rows of up to 2,048 tokens
def test_training_with_the_models_template_round_trips_to_plain_transformers(thinking_tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from src.training.sft_trainer import SFTTrainer
    from tests.helpers import make_config

    rows = [{"messages": CONVERSATIONS["thinking"]}, {"messages": CONVERSATIONS["tools"], "tools": TOOLS},
            {"instruction": "ما عاصمة مصر؟", "response": "القاهرة.", "reasoning_content": "مصر عاصمتها القاهرة"}] * 3
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "run"
    config = make_config(thinking_tiny_model, data, out, instruction_template="tokenizer", max_seq_length=2048, learning_rate=1e-2,
                         chat_template_kwargs={"enable_thinking": False}, system_prompt=SYSTEM, max_steps=80)
    trainer = SFTTrainer(config)
    trainer.train()
    assert trainer.tokenize_report.trained_tokens["train"] > 0
    trainer.save_model()
    metadata = json.loads((out / "sft_metadata.json").read_text(encoding="utf-8"))
    assert metadata["instruction_template"] == "tokenizer"
    assert metadata["chat_template_kwargs"] == {"enable_thinking": False}

    # plain transformers: the saved template renders the training prompt (system prompt and enable_thinking=False
    # included) and greedy generation gives what generate_response gives
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    question = "ما عاصمة مصر؟"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    assert list(prompt) == trainer.example_tokenizer().encode_prompt(question)
    assert tokenizer.decode(prompt).startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>")
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with torch.no_grad():
        generated = model.generate(torch.tensor([list(prompt)]), max_new_tokens=12, do_sample=False)
    plain = tokenizer.decode(generated[0, len(prompt):], skip_special_tokens=True).strip()
    ours = trainer.generate_response(question, max_length=12, include_reasoning=True)
    assert ours == plain and plain, plain

    loaded = SFTTrainer(make_config(thinking_tiny_model, data, tmp_path / "unused"))
    loaded.load_model(str(out))
    assert loaded.config.instruction_template == "tokenizer"
    assert loaded.example_tokenizer().encode_prompt(question) == list(prompt)
    assert loaded.generate_response(question, max_length=12, include_reasoning=True) == ours


def test_chat_template_kwargs_from_the_command_line_and_yaml(tmp_path):
    from src.cli.args import parse_config
    from src.config import SFTConfig
    from tests.helpers import SHIPPED_DATA

    flags = parse_config(SFTConfig, ["--instruction_template", "tokenizer", "--dataset_path", SHIPPED_DATA,
                                     "--chat_template_kwargs", '{"enable_thinking": false}'])
    assert flags.chat_template_kwargs == {"enable_thinking": False}
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"instruction_template: tokenizer\ndataset_path: {SHIPPED_DATA}\nchat_template_kwargs:\n"
                           "  enable_thinking: false\n  reasoning_effort: low\n", encoding="utf-8")
    assert parse_config(SFTConfig, ["--config", str(config_file)]).chat_template_kwargs == \
        {"enable_thinking": False, "reasoning_effort": "low"}
    with pytest.raises(ValueError, match="chat_template_kwargs: applies to instruction_template='tokenizer' only"):
        SFTConfig(chat_template_kwargs={"enable_thinking": False})
    with pytest.raises(ValueError, match="chat_template_kwargs: not a JSON object"):
        SFTConfig(instruction_template="tokenizer", chat_template_kwargs="{bad")
    with pytest.raises(ValueError, match=r"\['add_generation_prompt'\] are set by the trainer"):
        SFTConfig(instruction_template="tokenizer", chat_template_kwargs={"add_generation_prompt": True})


def test_tool_rows_survive_the_trainers_arrow_round_trip_unchanged(tiny_model_dir, tmp_path):
    """Arrow would merge the argument objects of all rows into one struct and give each row the others' keys
    as nulls, which templates render ("None"): tool data goes through the trainer's dataset as JSON text."""
    from src.training.sft_trainer import SFTTrainer
    from tests.helpers import make_config

    other_tool = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer"}}}}}
    rows = [{"messages": CONVERSATIONS["tools"], "tools": TOOLS},
            {"messages": [{"role": "user", "content": "ابحث عن الخوارزمي"},
                          {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                              "name": "search", "arguments": {"query": "الخوارزمي", "limit": 3}}}]},
                          {"role": "tool", "content": "عالم رياضيات"}, {"role": "assistant", "content": "عالم رياضيات."}],
             "tools": [other_tool]}]
    path = write_jsonl(tmp_path / "tools.jsonl", rows)
    direct, _ = load_records(path, validation_split_ratio=0.0)
    trainer = SFTTrainer(make_config(tiny_model_dir, path, tmp_path / "o", instruction_template="tokenizer"))
    through_arrow, _ = load_records(trainer.load_dataset(), validation_split_ratio=0.0)
    assert through_arrow["train"] == direct["train"]


def test_review_fixes_for_tool_and_reasoning_rows(tmp_path):
    """Arrow-filled null keys are dropped, Llama-3.1 'parameters' are arguments, empty reasoning is no reasoning."""
    from datasets import Dataset

    rows = [{"messages": [{"role": "user", "content": "س"},
                          {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                              "name": "get_weather", "arguments": {"city": "القاهرة"}}}]},
                          {"role": "tool", "content": "30"}, {"role": "assistant", "content": "٣٠", "reasoning_content": ""}]},
            {"messages": [{"role": "user", "content": "ابحث"},
                          {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                              "name": "search", "arguments": {"query": "الخوارزمي", "limit": 3}}}]},
                          {"role": "tool", "content": "عالم"}, {"role": "assistant", "content": "عالم."}]}]
    records, _ = load_records(Dataset.from_list(rows), validation_split_ratio=0.0)  # Arrow structs: merged keys
    first, second = records["train"]
    assert first["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "القاهرة"}
    assert second["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"query": "الخوارزمي", "limit": 3}
    assert "reasoning_content" not in first["messages"][3]
    llama = [{"messages": [{"role": "user", "content": "س"},
                           {"role": "assistant", "tool_calls": [{"name": "get_weather", "parameters": {"city": "عمّان"}}]},
                           {"role": "tool", "content": "25"}, {"role": "assistant", "content": "٢٥"}]},
             {"instruction": "س", "response": "ج", "reasoning_content": ""}]
    records, _ = load_records(write_jsonl(tmp_path / "llama.jsonl", llama), validation_split_ratio=0.0)
    assert records["train"][0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "عمّان"}
    assert "reasoning_content" not in records["train"][1]
    with pytest.raises(ValueError, match=r"\['enable-thinking'\] cannot be template variable names"):
        from src.config import SFTConfig

        SFTConfig(instruction_template="tokenizer", chat_template_kwargs={"enable-thinking": False})


def test_the_run_system_prompt_is_the_same_in_training_generation_and_the_saved_template():
    from src.data.normalization import build_normalizer

    system = "أنت مساعد مـفيد"  # a tatweel, which the default 'light' normalization removes from row text
    et = et_for("qwen3", system_prompt=system, normalize=build_normalizer("light"))
    ids, labels, _ = et.tokenize_batch([{"instruction": "ما عاصمة مصر؟", "response": "القاهرة.", "system": None}])[0]
    prompt = et.encode_prompt("ما عاصمة مصر؟")
    assert ids[:len(prompt)] == prompt and all(label == IGNORE_INDEX for label in labels[:len(prompt)])
    saved = list(et.tokenizer.apply_chat_template([{"role": "user", "content": "ما عاصمة مصر؟"}], tokenize=True,
                                                  return_dict=False, add_generation_prompt=True,
                                                  chat_template=et.fmt.chat.saved_template(system)))
    assert saved == prompt
