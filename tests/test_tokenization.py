import pytest

from src.data.packing import SFTDataCollator
from src.data.preprocess import TokenizeReport, tokenize_records
from src.data.templates import ALPACA_TEMPLATE, CHATML_TEMPLATE, get_prompt_format
from src.data.tokenization import IGNORE_INDEX, ExampleTokenizer, TokenizerMismatchError

RECORD = {"instruction": "ما عاصمة مصر؟", "response": "عاصمة مصر هي القاهرة.", "system": None}


def test_templates_are_the_specification_strings():
    assert ALPACA_TEMPLATE == "### Instruction:\n{instruction}\n\n### Response:\n"
    assert CHATML_TEMPLATE == "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
    custom = get_prompt_format("custom", "User: {instruction}\nAssistant: ")
    assert custom.format_prompt("مرحبا") == "User: مرحبا\nAssistant: "
    assert get_prompt_format("alpaca").format_prompt("س") == "### Instruction:\nس\n\n### Response:\n"


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("tokenizer_fixture", ["tiny_tokenizer", "qwen_tokenizer"])
@pytest.mark.parametrize("template", ["alpaca", "chatml", "custom"])
def test_labels_mask_exactly_the_prompt_and_train_the_end_token(request, tokenizer_fixture, template):
    tiny_tokenizer = request.getfixturevalue(tokenizer_fixture)  # the real Qwen2.5 one skips where absent
    fmt = get_prompt_format(template, "السؤال: {instruction}\nالجواب: " if template == "custom" else None)
    et = ExampleTokenizer(tiny_tokenizer, fmt, max_seq_length=256)
    ids, labels, _ = et.tokenize_batch([RECORD])[0]
    prompt_ids = _encode(tiny_tokenizer, fmt.format_prompt(RECORD["instruction"]))
    response_ids = _encode(tiny_tokenizer, RECORD["response"])
    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") if template == "chatml" else tiny_tokenizer.eos_token_id
    suffix = _encode(tiny_tokenizer, "\n") if template == "chatml" else []
    assert ids == prompt_ids + response_ids + [end] + suffix
    assert labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [end] + [IGNORE_INDEX] * len(suffix)
    # the trained span decodes to exactly the response
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert tiny_tokenizer.decode(trained[:-1]) == RECORD["response"]


def test_eos_stays_trained_when_pad_equals_eos(tiny_tokenizer):
    assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id  # the trap: pad == eos
    et = ExampleTokenizer(tiny_tokenizer, get_prompt_format("alpaca"), max_seq_length=256)
    short, long_ = et.tokenize_batch([{"instruction": "a", "response": "b"}, RECORD])
    batch = SFTDataCollator(pad_token_id=tiny_tokenizer.pad_token_id)(
        [{"input_ids": short[0], "labels": short[1]}, {"input_ids": long_[0], "labels": long_[1]}]
    )
    eos = tiny_tokenizer.eos_token_id
    n = len(short[0])
    assert batch["labels"][0, n - 1].item() == eos  # trained EOS survives collation
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()  # padding is masked by position
    assert (batch["input_ids"][0, n:] == eos).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)


def test_prompt_and_response_are_tokenized_separately(tiny_tokenizer):
    # "### Response:\n" followed by text that could merge with the newline when tokenized together
    et = ExampleTokenizer(tiny_tokenizer, get_prompt_format("alpaca"), max_seq_length=256)
    record = {"instruction": "x", "response": "\n\nmerged", "system": None}
    ids, labels, _ = et.tokenize_batch([record])[0]
    prompt_len = len(_encode(tiny_tokenizer, get_prompt_format("alpaca").format_prompt("x")))
    assert all(label == IGNORE_INDEX for label in labels[:prompt_len])
    assert labels[prompt_len:] == ids[prompt_len:]


def test_text_column_trains_after_response_template_only(tiny_tokenizer):
    fmt = get_prompt_format("custom", "السؤال: {instruction}\nالجواب: ")
    et = ExampleTokenizer(tiny_tokenizer, fmt, max_seq_length=256)
    text = "السؤال: ما عاصمة مصر؟\nالجواب: القاهرة"
    ids, labels, _ = et.tokenize_batch([{"text": text}])[0]
    prompt = _encode(tiny_tokenizer, "السؤال: ما عاصمة مصر؟\nالجواب: ")
    response = _encode(tiny_tokenizer, "القاهرة") + [tiny_tokenizer.eos_token_id]
    assert ids == prompt + response
    assert labels == [IGNORE_INDEX] * len(prompt) + response
    # without the response template in the text, the whole text is trained
    et_alpaca = ExampleTokenizer(tiny_tokenizer, get_prompt_format("alpaca"), max_seq_length=256)
    ids, labels, _ = et_alpaca.tokenize_batch([{"text": text}])[0]
    assert labels == ids


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_overlong_policy_is_applied_and_counted(tiny_tokenizer, policy, caplog):
    et = ExampleTokenizer(tiny_tokenizer, get_prompt_format("alpaca"), max_seq_length=24, overlong_policy=policy)
    long_record = {"instruction": "س", "response": "الذكاء الاصطناعي فرع من علوم الحاسوب يبني أنظمة تتعلم. " * 3, "system": None}
    short_record = {"instruction": "a", "response": "b", "system": None}
    report = TokenizeReport()
    ds = tokenize_records([long_record, short_record], et, "train", report)
    if policy == "truncate":
        assert len(ds) == 2 and report.truncated["train"] == 1 and report.dropped["train"] == 0
        ids, labels = ds[0]["input_ids"], ds[0]["labels"]
        assert len(ids) == 24
        assert tiny_tokenizer.eos_token_id not in labels  # a cut answer does not teach stopping
        prompt_len = len(_encode(tiny_tokenizer, get_prompt_format("alpaca").format_prompt("س")))
        assert labels[prompt_len:] == ids[prompt_len:]
    else:
        assert len(ds) == 1 and report.dropped["train"] == 1
    assert "longer than max_seq_length=24" in caplog.text


def test_overlong_error_policy_names_the_row(tiny_tokenizer):
    et = ExampleTokenizer(tiny_tokenizer, get_prompt_format("alpaca"), max_seq_length=16, overlong_policy="error")
    with pytest.raises(ValueError, match="train row 1 is .* tokens long"):
        tokenize_records([{"instruction": "a", "response": "b", "system": None}, {**RECORD, "response": RECORD["response"] * 5}],
                         et, "train")


def test_chatml_needs_the_special_tokens(tiny_tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    ExampleTokenizer(tiny_tokenizer, get_prompt_format("chatml"), 64)  # has <|im_start|>, <|im_end|>: fine
    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bare.train_from_iterator(["hello world"], trainer)
    no_chatml = PreTrainedTokenizerFast(tokenizer_object=bare, eos_token="<|endoftext|>")
    with pytest.raises(TokenizerMismatchError, match="<\\|im_start\\|>"):
        ExampleTokenizer(no_chatml, get_prompt_format("chatml"), 64)


# -- the real Qwen2.5 tokenizer ----------------------------------------------------------------------


def test_qwen_alpaca_labels(qwen_tokenizer):
    et = ExampleTokenizer(qwen_tokenizer, get_prompt_format("alpaca"), max_seq_length=256)
    assert et.prefix_ids == []  # Qwen2.5 has no BOS: none is invented
    ids, labels, _ = et.tokenize_batch([RECORD])[0]
    prompt = _encode(qwen_tokenizer, get_prompt_format("alpaca").format_prompt(RECORD["instruction"]))
    response = _encode(qwen_tokenizer, RECORD["response"])
    assert ids == prompt + response + [qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")]  # Qwen instruct EOS
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):]


def test_qwen_chatml_matches_apply_chat_template(qwen_tokenizer):
    fmt = get_prompt_format("chatml", system_prompt="أنت مساعد مفيد.")
    et = ExampleTokenizer(qwen_tokenizer, fmt, max_seq_length=512)
    ids, labels, _ = et.tokenize_batch([RECORD])[0]
    messages = [
        {"role": "system", "content": "أنت مساعد مفيد."},
        {"role": "user", "content": RECORD["instruction"]},
        {"role": "assistant", "content": RECORD["response"]},
    ]
    expected = qwen_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert ids == list(expected)
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert trained[-1] == im_end
    assert qwen_tokenizer.decode(trained[:-1]) == RECORD["response"]


def test_text_that_already_ends_with_the_end_token_gets_it_once(tiny_tokenizer):
    et = ExampleTokenizer(tiny_tokenizer, get_prompt_format("chatml"), max_seq_length=256)
    plain = et.tokenize_batch([{"text": "<|im_start|>user\nس<|im_end|>\n<|im_start|>assistant\nج"}])[0]
    templated = et.tokenize_batch([{"text": "<|im_start|>user\nس<|im_end|>\n<|im_start|>assistant\nج<|im_end|>\n"}])[0]
    assert templated == plain
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [t for t in templated[1] if t != IGNORE_INDEX].count(im_end) == 1
    alpaca = ExampleTokenizer(tiny_tokenizer, get_prompt_format("alpaca"), max_seq_length=256)
    with_eos = alpaca.tokenize_batch([{"text": "### Instruction:\nس\n\n### Response:\nج<|endoftext|>"}])[0]
    assert with_eos[0].count(tiny_tokenizer.eos_token_id) == 1


def test_text_split_finds_the_response_template_after_normalization(tiny_tokenizer):
    from src.data.normalization import build_normalizer

    fmt = get_prompt_format("custom", "السؤال: {instruction}\nالإجابة: ")
    et = ExampleTokenizer(tiny_tokenizer, fmt, 256, normalize=build_normalizer("light", normalize_alef=True))
    prompt, response = et.formatter.split_text("السؤال: ما عاصمة مصر؟\nالإجابة: القاهرة")
    assert prompt == "السؤال: ما عاصمة مصر؟\nالاجابة: " and response == "القاهرة"
