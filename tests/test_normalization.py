import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from src.config import SFTConfig
from src.data.normalization import PRESETS, ArabicNormalizer, build_normalizer

ALL_OFF = PRESETS["none"]


@pytest.mark.parametrize(
    "switches, text, expected",
    [
        ({"remove_diacritics": True}, "العِلْمُ نُورٌ", "العلم نور"),
        ({"remove_diacritics": True}, "مُدَرِّسَةٌ ٱلْقُرْآنِ", "مدرسة ٱلقرآن"),  # shadda, tanween, sukun; letters stay
        ({"remove_diacritics": True}, "رَحْمٰن", "رحمن"),  # superscript alef U+0670
        ({"remove_tatweel": True}, "جـــميل", "جميل"),
        ({"remove_bidi_controls": True}, "\u200fمرحبا\u200e \u202bنص\u202c \u2067x\u2069\u061c", "مرحبا نص x"),
        ({"normalize_alef": True}, "أحمد إيمان آمال ٱلكتاب", "احمد ايمان امال الكتاب"),
        ({"normalize_alef": True, "nfc": True}, "أ\u0655ب", "اب"),  # a stray hamza mark cannot recompose an alef
        ({"normalize_alef_maqsura": True}, "مستشفى على", "مستشفي علي"),
        ({"normalize_taa_marbuta": True}, "مدرسة جميلة", "مدرسه جميله"),
        ({"digits": "western"}, "سنة ٢٠٢٤ و۱۴۴۵", "سنة 2024 و1445"),
        ({"digits": "arabic-indic"}, "2024 و۱۴۴۵", "٢٠٢٤ و١٤٤٥"),
        ({"presentation_forms": True}, "\ufeb3\ufefc\ufee1", "سلام"),  # seen/lam-alef ligature/meem forms
        ({"presentation_forms": True}, "\ufdfa", "صلى الله عليه وسلم"),
        ({"presentation_forms": True}, "ب\ufe77", "بَ"),  # medial fatha form -> the combining mark, no tatweel
        ({"presentation_forms": True}, "ب\ufe70", "بً"),  # isolated fathatan form -> the mark, no space
        ({"presentation_forms": True}, "\ufeffنص", "نص"),
        ({"presentation_forms": True}, "ب\ufc5e", "بٌّ"),  # shadda-with-dammatan ligature: marks only, no space
    ],
)
def test_each_rule(switches, text, expected):
    normalizer = ArabicNormalizer(**{**ALL_OFF.to_dict(), **switches})
    assert normalizer(text) == expected
    assert ALL_OFF(text) == text  # the rule is what changed the text


def test_presets():
    text = "\u200fأَهْلًا بِكُمْ فِي مَدْرَسَتِنَا ـ ٢٠٢٤ \ufefb"
    assert PRESETS["none"](text) == text
    assert PRESETS["light"](text) == "أَهْلًا بِكُمْ فِي مَدْرَسَتِنَا  ٢٠٢٤ لا"  # diacritics and letters kept
    assert PRESETS["search"](text) == "اهلا بكم في مدرستنا  2024 لا"
    assert build_normalizer("light", remove_diacritics=True)("مُعَلِّم") == "معلم"
    with pytest.raises(ValueError, match="preset"):
        build_normalizer("heavy")


arabic_text = st.text(
    alphabet=st.sampled_from(list("ابتثجحخدذرسشصضطظعغفقكلمنهويءأإآٱىةـ٠١٢٣۴۵0123 \n")
                             + ["\u064b", "\u064e", "\u0650", "\u0651", "\u0652", "\u0670", "\u200f", "\u202b",
                                "\ufefb", "\ufe77", "\ufdfa", "\ufeff", "a", "Z"]),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(arabic_text, st.sampled_from(sorted(PRESETS)), st.sampled_from(["keep", "western", "arabic-indic"]))
def test_normalization_is_idempotent(text, preset, digits):
    normalizer = build_normalizer(preset, digits=digits)
    once = normalizer(text)
    assert normalizer(once) == once


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="normalization"):
        SFTConfig(normalization="heavy")
    with pytest.raises(ValueError, match="arabic_digits"):
        SFTConfig(arabic_digits="roman")
    assert SFTConfig(normalization="search", arabic_remove_diacritics=False).normalizer().remove_diacritics is False


@settings(max_examples=200, deadline=None)
@given(arabic_text, st.fixed_dictionaries({k: st.booleans() for k in ("nfc", "presentation_forms", "remove_bidi_controls",
                                                                       "remove_tatweel", "remove_diacritics", "normalize_alef",
                                                                       "normalize_alef_maqsura", "normalize_taa_marbuta")}))
def test_every_switch_combination_is_idempotent(text, switches):
    normalizer = ArabicNormalizer(**switches)
    once = normalizer(text + "أ\u0655\u0654ا\u0653أ\u064e\u0654آ\u0651\u0653")
    assert normalizer(once) == once


def test_same_normalization_for_training_generation_and_after_load(tiny_model_dir, tmp_path):
    from src.data.tokenization import IGNORE_INDEX
    from src.training.sft_trainer import SFTTrainer
    from tests.helpers import write_jsonl

    instruction = "مَا عَاصِمَةُ مِصْرَ؟ ـ"
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": instruction, "response": "القَاهِرَةُ"}] * 2)
    config = SFTConfig(model_name=tiny_model_dir, dataset_path=data, output_dir=str(tmp_path / "o"), use_lora=False,
                       normalization="search", validation_split_ratio=0, evaluation_strategy="no",
                       per_device_train_batch_size=1, dataloader_pin_memory=False)
    trainer = SFTTrainer(config)
    trainer.prepare()
    row = trainer.trainer.train_dataset[0]
    prompt_ids = [t for t, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX]
    assert trainer.example_tokenizer().encode_prompt(instruction) == prompt_ids
    trained = [label for label in row["labels"] if label != IGNORE_INDEX]
    assert trainer.tokenizer.decode(trained[:-1]) == "القاهره"  # the target is normalized too
    trainer.save_model()
    restored = SFTTrainer(SFTConfig())  # default "light" preset: load_model must bring back "search"
    restored.load_model(str(tmp_path / "o"))
    assert restored.config.normalizer() == config.normalizer()
    assert restored.example_tokenizer().encode_prompt(instruction) == prompt_ids
    # a run saved before normalization existed trained on untouched text: restore "none", not today's default
    import json

    meta_path = tmp_path / "o" / "sft_metadata.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    del meta["normalization"]
    del meta["config"]["normalization"]
    meta_path.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    old = SFTTrainer(SFTConfig())
    old.load_model(str(tmp_path / "o"))
    assert old.config.normalizer().is_identity


def test_decomposed_and_composed_input_agree():
    import unicodedata

    text = "مسؤول سائل أحمد آمال"
    for preset in ("light", "search"):
        normalizer = PRESETS[preset]
        assert normalizer(unicodedata.normalize("NFD", text)) == normalizer(text)
    assert PRESETS["search"](unicodedata.normalize("NFD", text)) == "مسؤول سائل احمد امال"
