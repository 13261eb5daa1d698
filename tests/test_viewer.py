"""The token-level example viewer (src/data/viewer.py): token texts, trained spans, seams, bidi isolates."""

import json

import pytest

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
from tests.helpers import PAIRS, write_jsonl
from tests.test_chat_templates import CONVERSATIONS, END, EXPECTED, TEMPLATES, TOOLS, et_for


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


# -- property: the viewer's trained spans are exactly what each template trains -------------------------------------
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", TEMPLATES)
def test_trained_spans_are_the_assistant_output_plus_the_end_token_for_every_qwen_template(name, conversation):
    """Answer, reasoning and tool calls where the template trains them, each followed by <|im_end|>: the viewer's
    spans, concatenated, are those texts and nothing else (the expected texts are written out per template in
    tests/test_chat_templates.py, independently of the viewer)."""
    et = et_for(name)
    messages = CONVERSATIONS[conversation]
    record = {"messages": messages, **({"tools": TOOLS} if conversation == "tools" else {})}
    ids, labels, _ = et.tokenize_batch([record])[0]
    described = describe_row(et.tokenizer, {"input_ids": ids, "labels": labels}, 0)
    assert [s["text"] for s in described["trained_spans"]] == [text + END for text in EXPECTED[name][conversation]]
    assert "".join(s["text"] for s in described["trained_spans"]) == "".join(t + END for t in EXPECTED[name][conversation])


@pytest.mark.parametrize("template", ["alpaca", "chatml"])
def test_trained_spans_of_instruction_rows_are_the_response_and_the_end_token(template, tiny_tokenizer):
    from src.data.templates import get_prompt_format
    from src.data.tokenization import ExampleTokenizer

    fmt = get_prompt_format(template)
    et = ExampleTokenizer(tiny_tokenizer, fmt, 256)
    end = tiny_tokenizer.convert_ids_to_tokens(et.end_id)
    rows = [{"instruction": p["instruction"], "response": p["response"], "system": None} for p in PAIRS]
    for (ids, labels, _), row in zip(et.tokenize_batch(rows), rows):
        spans = describe_row(tiny_tokenizer, {"input_ids": ids, "labels": labels}, 0)["trained_spans"]
        assert [s["text"] for s in spans] == [row["response"] + end]


# -- the command ---------------------------------------------------------------------------------------------------
def _audit(argv, capsys):
    import train_sft

    code = train_sft.main(["audit", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_audit_show_prints_an_arabic_row_with_its_trained_part_marked(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    base = ["--model_name", tiny_model_dir, "--dataset_path", data, "--output_dir", str(tmp_path / "o"),
            "--validation_split_ratio", "0", "--instruction_template", "chatml"]
    code, out, _ = _audit(base + ["--show", "2"], capsys)
    assert code == 0 and out.count("── train row ") == 2
    first = out.split("── train row 1")[0]
    # the answer (Arabic, isolated) and the end token are the one trained span; the question is not in it
    assert f"{OPEN}{FSI}عاصمة مصر هي القاهرة{PDI}.<|im_end|>{CLOSE}" in first
    text = first.split("\n", 2)[2]  # after the header and the legend
    assert f"{FSI}ما عاصمة مصر؟{PDI}" in text.split(OPEN)[0]
    assert "\033[" not in out  # not a terminal: brackets, no colour
    code, out, _ = _audit(base + ["--rows", "7", "--show", "1", "--color", "always"], capsys)
    assert "train row 7" in out and "\033[32m" in out and "Python" in out
    code, out, _ = _audit(base + ["--show", "1", "--json"], capsys)
    row = json.loads(out.strip().splitlines()[-1])
    assert row["trained_spans"][0]["text"] == PAIRS[0]["response"] + "<|im_end|>"
    assert all(t["trained"] == (row["trained_spans"][0]["start"] <= t["index"] < row["trained_spans"][0]["end"])
               for t in row["tokens"])
    code, out, _ = _audit(base + ["--show", "1", "--packed"], capsys)
    assert code == 0 and "documents packed" in out and "║ doc 1 ║" in out
    assert out.count(OPEN) - 1 == int(out.split("packed ──")[0].rsplit(", ", 1)[1].split()[0])  # a span per document
    code, _, err = _audit(base + ["--rows", "99", "--show", "1"], capsys)
    assert code == 2 and "audit: --rows [99]: the training split has rows 0 to 7" in err


def test_the_python_api_shows_the_same_rows_as_the_command(tiny_model_dir, tmp_path, capsys):
    from src.training.sft_trainer import SFTTrainer
    from tests.helpers import make_config

    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    trainer = SFTTrainer(make_config(tiny_model_dir, data, tmp_path / "o", instruction_template="chatml"))
    text = trainer.show_examples(2, as_json=True)
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["row"] for r in rows] == [0, 1]
    assert [s["text"] for s in rows[1]["trained_spans"]] == [PAIRS[1]["response"] + "<|im_end|>"]
    code, out, _ = _audit(["--model_name", tiny_model_dir, "--dataset_path", data, "--output_dir", str(tmp_path / "o"),
                           "--validation_split_ratio", "0", "--instruction_template", "chatml", "--show", "2", "--json"],
                          capsys)
    assert code == 0 and text in out
    packed = trainer.show_examples(1, packed=True)
    assert "║ doc 1 ║" in packed and "documents packed" in packed
