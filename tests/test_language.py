"""Arabic language consistency (src/data/language.py) on crafted strings: the drift into Chinese that Qwen models are
known for, Arabic with code and technical terms, Arabic-Indic digits, diacritics."""

import pytest

from src.data.language import (
    answer_language,
    check_foreign_script_rate,
    is_arabic,
    language_stats,
    language_summary,
    script_of,
)


def test_scripts_of_letters_and_non_letters():
    assert script_of("ب") == "ARABIC" and script_of("ی") == "ARABIC" and script_of("ﻻ") == "ARABIC"
    assert script_of("你") == "CJK" and script_of("ひ") == "CJK" and script_of("カ") == "CJK"
    assert script_of("한") == "HANGUL" and script_of("Ж") == "CYRILLIC" and script_of("a") == "LATIN"
    for neutral in ("٣", "3", "\u064e", " ", "،", "?", "\u0651"):  # digit, fatha, shadda, punctuation
        assert script_of(neutral) is None, neutral


def test_pure_arabic_with_diacritics_and_arabic_indic_digits_is_arabic_and_not_flagged():
    stats = language_stats("الْعَرَبِيَّةُ لُغَةٌ جَمِيلَةٌ، وعدد حروفها ٢٨ حرفًا.")
    assert stats["arabic_share"] == 1.0 and stats["foreign_share"] == 0.0
    assert stats["foreign_runs"] == [] and not stats["flagged"]


def test_drift_into_chinese_mid_answer_is_one_flagged_run_with_its_share():
    text = "عاصمة مصر هي القاهرة، 这是一个非常大的城市。"
    stats = language_stats(text)
    assert stats["flagged"]
    assert stats["foreign_runs"] == [{"script": "CJK", "text": "这是一个非常大的城市"}]
    arabic_letters = sum(1 for c in "عاصمةمصرهيالقاهرة")
    assert stats["arabic_share"] == pytest.approx(arabic_letters / (arabic_letters + 10))
    assert stats["foreign_share"] == pytest.approx(10 / (arabic_letters + 10))


def test_code_and_allowed_technical_terms_are_not_drift_but_an_english_sentence_is():
    with_code = "لطباعة النص استخدم الدالة `print` في Python:\n```python\nprint('hello world')\n```\nثم شغّل الملف."
    stats = language_stats(with_code)
    assert not stats["flagged"] and stats["arabic_share"] < 1.0  # "Python" counts as a letter, neither side
    english = "هذا سؤال جيد. The capital of Egypt is Cairo."
    runs = language_stats(english)["foreign_runs"]
    assert [r["script"] for r in runs] == ["LATIN"] and runs[0]["text"].startswith("The capital")
    assert language_stats("استخدم Kubernetes للنشر")["flagged"]  # not in the allow-list ...
    assert not language_stats("استخدم Kubernetes للنشر", allowed_terms=["kubernetes"])["flagged"]  # ... unless added


def test_several_scripts_each_count_as_runs():
    stats = language_stats("مرحبا 안녕하세요 ثم Привет ثم こんにちは")
    assert [r["script"] for r in stats["foreign_runs"]] == ["HANGUL", "CYRILLIC", "CJK"]


def test_arabic_prompt_answered_in_arabic_or_not():
    assert is_arabic("ما عاصمة مصر؟") is True and is_arabic("What is the capital?") is False and is_arabic("123") is None
    good = answer_language("ما عاصمة مصر؟", "القاهرة.")
    assert good["arabic_prompt"] and good["answered_in_arabic"] is True
    bad = answer_language("ما عاصمة مصر؟", "开罗是埃及的首都。")
    assert bad["answered_in_arabic"] is False and bad["flagged"]
    english_prompt = answer_language("Translate to Arabic: cat", "قطة")
    assert english_prompt["arabic_prompt"] is False and english_prompt["answered_in_arabic"] is None
    empty = answer_language("ما عاصمة مصر؟", "")
    assert empty["arabic_share"] is None and empty["answered_in_arabic"] is False and not empty["flagged"]


def test_summary_and_gate():
    rows = [answer_language("ما عاصمة مصر؟", a) for a in ("القاهرة.", "القاهرة 是首都", "Cairo is the capital", "نعم")]
    summary = language_summary(rows)
    assert summary["answers"] == 4 and summary["flagged"] == 2 and summary["foreign_script_rate"] == 0.5
    assert summary["foreign_runs_by_script"] == {"CJK": 1, "LATIN": 1}
    assert summary["arabic_prompts"] == 4 and summary["answered_in_arabic"] == 0.75
    check_foreign_script_rate(summary, None, "eval")
    check_foreign_script_rate(summary, 0.5, "eval")
    with pytest.raises(ValueError, match=r"eval: 2 of 4 answers \(50.0%\) contain foreign-script runs \(CJK 1, LATIN 1\)"):
        check_foreign_script_rate(summary, 0.25, "eval")


# -- end to end: generation evaluation and the generate command -----------------------------------------------------
DRIFT = [
    {"instruction": "ما عاصمة مصر؟", "response": "عاصمة مصر هي القاهرة."},
    {"instruction": "ما عاصمة الصين؟", "response": "عاصمة الصين 北京 بكين."},  # drifts into Chinese
    {"instruction": "اطبع مرحبا", "response": "استخدم `print` في Python."},  # code and a technical term: not drift
    {"instruction": "ترجم: صباح الخير", "response": "Good morning"},  # an Arabic prompt answered in English
]


@pytest.fixture(scope="module")
def drifting_run(tiny_model_dir, tmp_path_factory):
    """A tiny model that memorised DRIFT, trained with a language gate it fails (2 of 4 answers flagged > 25%)."""
    from src.training.sft_trainer import create_sft_trainer
    from tests.helpers import make_config, write_jsonl

    tmp = tmp_path_factory.mktemp("drift")
    data = write_jsonl(tmp / "drift.jsonl", DRIFT)
    config = make_config(tiny_model_dir, data, tmp / "run", eval_dataset_path=data, max_steps=150,
                         per_device_train_batch_size=4, eval_generation_samples=4, eval_generation_max_length=40,
                         max_foreign_script_rate=0.25)
    trainer = create_sft_trainer(config)
    with pytest.raises(ValueError, match=r"generation eval \(final model\): 2 of 4 answers \(50.0%\) contain "
                                         r"foreign-script runs \(CJK 1, LATIN 1\), above max_foreign_script_rate=0.25"):
        trainer.train()
    return trainer, tmp


@pytest.mark.slow  # a 150-step memorising run
def test_generation_eval_measures_language_marks_rows_and_the_gate_fails_after_saving(drifting_run):
    import json
    import os

    trainer, _ = drifting_run
    out = trainer.config.output_dir
    rows = [json.loads(line) for line in open(os.path.join(out, "eval_generations.jsonl"), encoding="utf-8")]
    assert [r["prediction"] for r in rows] == [d["response"] for d in DRIFT]  # memorised: the figures are exact
    assert [r["flagged"] for r in rows] == [False, True, False, True]
    assert rows[1]["language"]["foreign_runs"] == [{"script": "CJK", "text": "北京"}]
    assert rows[3]["language"]["answered_in_arabic"] is False and rows[0]["language"]["answered_in_arabic"] is True
    meta = json.load(open(os.path.join(out, "sft_metadata.json"), encoding="utf-8"))  # saved before the gate failed
    language = meta["language_consistency"]
    assert language["foreign_script_rate"] == 0.5 and language["foreign_runs_by_script"] == {"CJK": 1, "LATIN": 1}
    assert language["answered_in_arabic"] == 0.75
    assert meta["final_metrics"]["eval_gen_foreign_script_rate"] == 0.5
    assert meta["final_metrics"]["eval_gen_answered_in_arabic"] == 0.75
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "## Arabic language consistency" in card and "answers with foreign-script runs: 2 of 4 (50.0%, CJK 1, LATIN 1)" in card
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


@pytest.mark.slow  # the memorising run
def test_generate_command_marks_each_answer_and_gates(drifting_run, capsys):
    import json

    import train_sft
    from tests.helpers import write_jsonl

    trainer, tmp = drifting_run
    inputs = write_jsonl(tmp / "in.jsonl", [{"instruction": d["instruction"]} for d in DRIFT])
    output = tmp / "out.jsonl"
    argv = ["generate", "--model", trainer.config.output_dir, "--input", inputs, "--output", str(output),
            "--max_length", "40"]
    assert train_sft.main(argv + ["--max_foreign_script_rate", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "Language of the 4 answers: " in printed and "2 of 4 (50.0%, CJK 1, LATIN 1)" in printed
    rows = [json.loads(line) for line in open(output, encoding="utf-8")]
    assert [r["language"]["flagged"] for r in rows] == [False, True, False, True]
    assert train_sft.main(argv + ["--max_foreign_script_rate", "0.25"]) == 1  # every row already there: re-measured
    assert "above max_foreign_script_rate=0.25" in capsys.readouterr().err
