"""Token-exact Qwen chat formatting and conversation masks, against the real Qwen2.5 tokenizer."""

import pytest

from src.data.loading import load_records
from src.data.templates import QWEN_DEFAULT_SYSTEM_PROMPT, get_prompt_format
from src.data.tokenization import IGNORE_INDEX, ExampleTokenizer

ARABIC_DIACRITICS = "اكتبْ جملةً مُشكَّلةً عن العِلمِ"
MIXED = "ما الفرق بين CPU و GPU في تدريب النماذج؟"
CONVERSATION = [
    {"role": "user", "content": "السلام عليكم، كيف حالك؟"},
    {"role": "assistant", "content": "وعليكم السلام! أنا بخير، شكرًا لسؤالك."},
    {"role": "user", "content": ARABIC_DIACRITICS},
    {"role": "assistant", "content": "العِلْمُ نُورٌ يُضِيءُ الطَّرِيقَ."},
    {"role": "user", "content": MIXED},
    {"role": "assistant", "content": "الـ CPU معالج عام، أما الـ GPU فيُسرّع العمليات المتوازية مثل ضرب المصفوفات."},
]


def chat_ids(tokenizer, messages, **kw):
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


def ours(tokenizer, record, system_prompt=None, **kw):
    et = ExampleTokenizer(tokenizer, get_prompt_format("chatml", system_prompt=system_prompt), 4096, **kw)
    return et, et.tokenize_batch([record])[0]


@pytest.mark.parametrize("instruction", ["ما عاصمة مصر؟", ARABIC_DIACRITICS, MIXED])
@pytest.mark.parametrize("system", ["أنت مساعد عربي دقيق.", QWEN_DEFAULT_SYSTEM_PROMPT])
def test_single_turn_matches_apply_chat_template(qwen_tokenizer, instruction, system):
    response = "الجواب: " + instruction[::-1]
    messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
    et, (ids, labels, _) = ours(qwen_tokenizer, {"instruction": instruction, "response": response, "system": None}, system)
    reference_messages = [{"role": "system", "content": system}] + messages
    expected = chat_ids(qwen_tokenizer, reference_messages)
    assert ids == expected
    # the generation prompt is add_generation_prompt=True on the same messages
    assert et.encode_prompt(instruction) == chat_ids(qwen_tokenizer, reference_messages[:-1], add_generation_prompt=True)


def test_without_system_prompt_we_skip_qwens_default_system_block(qwen_tokenizer):
    messages = [{"role": "user", "content": "مرحبا"}, {"role": "assistant", "content": "أهلًا!"}]
    et, (ids, _, _) = ours(qwen_tokenizer, {"instruction": "مرحبا", "response": "أهلًا!", "system": None})
    qwen = chat_ids(qwen_tokenizer, messages)  # Qwen injects its English default system prompt here
    default_block = qwen_tokenizer(f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")["input_ids"]
    assert qwen == default_block + ids
    assert chat_ids(qwen_tokenizer, messages[:1], add_generation_prompt=True) == default_block + et.encode_prompt("مرحبا")


@pytest.mark.parametrize("with_system", [False, True])
def test_multi_turn_matches_and_trains_every_assistant_turn(qwen_tokenizer, with_system):
    messages = ([{"role": "system", "content": "أجب بالعربية الفصحى."}] if with_system else []) + CONVERSATION
    _, (ids, labels, _) = ours(qwen_tokenizer, {"messages": messages}, None if with_system else QWEN_DEFAULT_SYSTEM_PROMPT)
    assert ids == chat_ids(qwen_tokenizer, messages)
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    spans, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    if current:
        spans.append(current)
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [qwen_tokenizer.decode(span) for span in spans] == [a + "<|im_end|>" for a in assistant]
    assert all(span[-1] == im_end for span in spans)


def test_train_on_last_turn_only(qwen_tokenizer):
    _, (ids, labels, _) = ours(qwen_tokenizer, {"messages": CONVERSATION}, train_on_last_turn_only=True)
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert qwen_tokenizer.decode(trained) == CONVERSATION[-1]["content"] + "<|im_end|>"


def test_sharegpt_equals_messages(qwen_tokenizer):
    sharegpt = [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in CONVERSATION]
    records, _ = load_records({"train": [{"conversations": sharegpt}, {"messages": CONVERSATION}]}, validation_split_ratio=0)
    a, b = records["train"]
    assert a == b
    _, first = ours(qwen_tokenizer, a)
    _, second = ours(qwen_tokenizer, {"messages": CONVERSATION})
    assert first == second


@pytest.mark.parametrize("template,system", [("chatml", None), ("chatml", "أجب باختصار."), ("alpaca", None),
                                             ("alpaca", "أجب باختصار.")])
def test_saved_chat_template_renders_conversations_exactly_as_training(qwen_tokenizer, template, system):
    """apply_chat_template with the saved template gives the training ids before each answer (real Qwen vocabulary)."""
    import copy

    from src.data.templates import chat_template
    from src.data.tokenization import ExampleTokenizer

    tokenizer = copy.deepcopy(qwen_tokenizer)
    et = ExampleTokenizer(tokenizer, get_prompt_format(template, system_prompt=system), 1024)
    tokenizer.chat_template = chat_template(et.fmt, tokenizer.convert_ids_to_tokens(et.end_id))
    turns = [{"role": "user", "content": "ما عاصمة مصر؟"}, {"role": "assistant", "content": "القاهرة."},
             {"role": "user", "content": "وما عاصمة الأردن؟ What about Jordan?"}]
    for upto in (1, 3):
        rendered = tokenizer.apply_chat_template(turns[:upto], add_generation_prompt=True, tokenize=True)["input_ids"]
        assert rendered == et.encode_conversation_prompt(turns[:upto])
