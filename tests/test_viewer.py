"""The token-level example viewer (src/data/viewer.py): token texts, trained spans, seams, bidi isolates."""

from src.data.viewer import (
    CLOSE,
    FSI,
    OPEN,
    PDI,
    describe_row,
    documents,
    isolate_rtl,
    render_row,
    render_text,
    token_texts,
    trained_spans,
)


def test_token_texts_put_each_character_on_the_token_that_completes_it(qwen_tokenizer):
    text = "<|im_start|>user\nما عاصمة مصر؟ 你好<|im_end|>\n"
    ids = qwen_tokenizer(text, add_special_tokens=False)["input_ids"]
    texts = token_texts(qwen_tokenizer, ids)
    assert len(texts) == len(ids)
    assert "".join(texts) == qwen_tokenizer.decode(ids, skip_special_tokens=False) == text
    assert not any("\ufffd" in t for t in texts)


def test_spans_documents_and_isolates():
    assert trained_spans([-100, 5, 6, -100, 7, -100]) == [(1, 3), (4, 5)]
    assert trained_spans([1, 2]) == [(0, 2)] and trained_spans([-100]) == []
    assert documents([0, 1, 2, 0, 1, 0], 6) == [0, 0, 0, 1, 1, 2] and documents(None, 3) == [0, 0, 0]
    assert isolate_rtl("answer: مرحبا بكم! ok") == f"answer: {FSI}مرحبا بكم{PDI}! ok"
    assert isolate_rtl("plain") == "plain"


def test_a_packed_row_shows_its_seams_and_trained_parts(qwen_tokenizer):
    first = qwen_tokenizer("سؤال جواب", add_special_tokens=False)["input_ids"]
    second = qwen_tokenizer(" ثاني نعم", add_special_tokens=False)["input_ids"]
    ids = first + second
    labels = [-100] * (len(first) - 1) + [first[-1]] + [-100] * (len(second) - 1) + [second[-1]]
    row = {"input_ids": ids, "labels": labels, "position_ids": list(range(len(first))) + list(range(len(second)))}
    described = describe_row(qwen_tokenizer, row, 0)
    assert described["documents"] == 2 and described["packed"]
    assert described["tokens_trained"] == 2 and len(described["trained_spans"]) == 2
    text = render_text(described, color=False)
    assert "║ doc 1 ║" in text and text.count(OPEN) == 2 and text.count(CLOSE) == 2
    assert text.index(OPEN) < text.index("║ doc 1 ║") < text.rindex(OPEN)  # one trained span on each side
    assert "\033[" not in render_row(described, color=False)
    assert "\033[32m" in render_row(described, color=True)
