"""Arabic text normalization: configurable, recorded in the metadata, identical at training and generation.

Rules (each a switch of :class:`ArabicNormalizer`):

================================  ==============================================================
``nfc``                           Unicode NFC first (and last): composed and decomposed input agree
``presentation_forms``            Arabic presentation forms (U+FB50–U+FDFF, U+FE70–U+FEFF) to base
                                  letters (Unicode compatibility mapping); U+FEFF (BOM/ZWNBSP) removed
``remove_bidi_controls``          U+200E, U+200F, U+202A–U+202E, U+2066–U+2069 and U+061C removed
``remove_tatweel``                tatweel U+0640 (ـ) removed
``remove_diacritics``             tashkeel (U+064B–U+065F, U+0670) and Quranic marks removed
``normalize_alef``                أ إ آ ٱ → ا
``normalize_alef_maqsura``        ى → ي
``normalize_taa_marbuta``         ة → ه
``digits``                        "keep", "western" (0-9) or "arabic-indic" (٠-٩): Arabic-Indic and
                                  Eastern Arabic-Indic (۰-۹) digits mapped to one form
================================  ==============================================================

Presets: ``none`` (text untouched), ``light`` (the default: removes only what never carries meaning
— presentation forms, bidi controls, tatweel — and keeps diacritics and letters as written) and
``search`` (everything above, Western digits: for deduplication and lenient matching, not for
training targets you want to read).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, replace
from typing import Any

BIDI_CONTROLS = "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u061c"
TATWEEL = "\u0640"
DIACRITICS_RE = re.compile("[\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06dc\u06df-\u06e4\u06e7\u06e8\u06ea-\u06ed]")
PRESENTATION_RE = re.compile("[\ufb50-\ufdff\ufe70-\ufeff]")
# Bare alef, any harakat (which NFC orders first), then madda/hamza marks that NFC would compose back.
ALEF_WITH_MARK_RE = re.compile("\u0627([\u064b-\u0652\u0670]*)[\u0653-\u0655]+")
ALEF_FORMS = {"\u0623": "\u0627", "\u0625": "\u0627", "\u0622": "\u0627", "\u0671": "\u0627"}
ARABIC_INDIC = "٠١٢٣٤٥٦٧٨٩"
EASTERN_ARABIC_INDIC = "۰۱۲۳۴۵۶۷۸۹"
WESTERN = "0123456789"
DIGIT_FORMS = ("keep", "western", "arabic-indic")


def _presentation_to_base(match: re.Match) -> str:
    ch = match.group(0)
    if ch == "\ufeff":
        return ""
    mapped = unicodedata.normalize("NFKC", ch)
    # Isolated/medial forms of marks (U+FE70–U+FE7F, the shadda ligatures U+FC5E–U+FC63) map to
    # "space + mark(s)" or "tatweel + mark": keep just the marks, so no space splits the word.
    marks = mapped.lstrip(" " + TATWEEL)
    if marks and marks != mapped and all(unicodedata.combining(c) for c in marks):
        return marks
    return mapped


@dataclass(frozen=True)
class ArabicNormalizer:
    """A callable ``str -> str`` applying the enabled rules in a fixed order (see module docstring)."""

    nfc: bool = True
    presentation_forms: bool = True
    remove_bidi_controls: bool = True
    remove_tatweel: bool = True
    remove_diacritics: bool = False
    normalize_alef: bool = False
    normalize_alef_maqsura: bool = False
    normalize_taa_marbuta: bool = False
    digits: str = "keep"

    def __post_init__(self) -> None:
        if self.digits not in DIGIT_FORMS:
            raise ValueError(f"digits must be one of {DIGIT_FORMS}, got {self.digits!r}")

    @property
    def is_identity(self) -> bool:
        return self == PRESETS["none"]

    def __call__(self, text: str) -> str:
        if self.nfc:
            # Canonical composition first, so that decomposed input (alef + combining hamza) gives the same
            # result as composed input under every rule below.
            text = unicodedata.normalize("NFC", text)
        if self.presentation_forms:
            text = PRESENTATION_RE.sub(_presentation_to_base, text)
        table: dict[int, Any] = {}
        if self.remove_bidi_controls:
            table.update({ord(c): None for c in BIDI_CONTROLS})
        if self.remove_tatweel:
            table[ord(TATWEEL)] = None
        if self.normalize_alef:
            table.update({ord(k): v for k, v in ALEF_FORMS.items()})
        if self.normalize_alef_maqsura:
            table[ord("\u0649")] = "\u064a"
        if self.normalize_taa_marbuta:
            table[ord("\u0629")] = "\u0647"
        if self.digits == "western":
            table.update({ord(a): w for a, w in zip(ARABIC_INDIC + EASTERN_ARABIC_INDIC, WESTERN * 2)})
        elif self.digits == "arabic-indic":
            table.update({ord(a): w for a, w in zip(WESTERN + EASTERN_ARABIC_INDIC, ARABIC_INDIC * 2)})
        if table:
            text = text.translate(table)
        if self.normalize_alef:
            # A combining madda/hamza left after an alef would recompose into آ/أ/إ under NFC.
            text = ALEF_WITH_MARK_RE.sub("\u0627\\1", text)
        if self.remove_diacritics:
            text = DIACRITICS_RE.sub("", text)
        return unicodedata.normalize("NFC", text) if self.nfc else text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, ArabicNormalizer] = {
    "none": ArabicNormalizer(nfc=False, presentation_forms=False, remove_bidi_controls=False, remove_tatweel=False),
    "light": ArabicNormalizer(),
    "search": ArabicNormalizer(remove_diacritics=True, normalize_alef=True, normalize_alef_maqsura=True,
                               normalize_taa_marbuta=True, digits="western"),
}
SWITCHES = ("nfc", "presentation_forms", "remove_bidi_controls", "remove_tatweel", "remove_diacritics", "normalize_alef",
            "normalize_alef_maqsura", "normalize_taa_marbuta", "digits")


def build_normalizer(preset: str = "light", **overrides: Any) -> ArabicNormalizer:
    """A preset with individual switches overridden (``None`` values keep the preset's choice).

    Raises ``ValueError`` naming the setting (``normalization`` for the preset, ``arabic_<switch>`` for a
    switch, as ``SFTConfig`` spells them) when a value cannot work.
    """
    if preset not in PRESETS:
        raise ValueError(f"normalization={preset!r} is invalid: expected a preset, one of {sorted(PRESETS)}.")
    digits = overrides.get("digits")
    if digits is not None and digits not in DIGIT_FORMS:
        raise ValueError(f"arabic_digits={digits!r} is invalid: expected one of {DIGIT_FORMS}.")
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(changes) - set(SWITCHES)
    if unknown:
        raise ValueError(f"unknown normalization switch(es) {sorted(unknown)}; known: {SWITCHES}")
    return replace(PRESETS[preset], **changes)


ARABIC_LETTER_RE = re.compile("[\u0621-\u064a\u0671-\u06d3\u06fa-\u06ff\u0750-\u077f\ufb50-\ufdff\ufe70-\ufefc]")
HAS_DIACRITIC_RE = re.compile("[\u064b-\u0652]")


def is_arabic_word(word: str) -> bool:
    """A whitespace-delimited word whose letters are mostly Arabic script."""
    arabic = len(ARABIC_LETTER_RE.findall(word))
    letters = sum(1 for ch in word if ch.isalpha())
    return arabic > 0 and arabic * 2 >= letters


# -- the same normalization outside training: a filter for prompts sent to a serving stack --------------------------
METADATA_FILE = "sft_metadata.json"
TEXT_FIELDS = ("content", "instruction", "input", "prompt", "question", "query", "system", "reasoning_content")


def normalizer_for_run(run_dir: str) -> ArabicNormalizer:
    """The normalizer a saved run or export trained with (its ``sft_metadata.json``: the preset and every switch), as
    ``load_model`` restores it; a run saved before normalization existed trained on untouched text (``none``)."""
    import json
    import os

    path = os.path.join(run_dir, METADATA_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir} has no {METADATA_FILE}: not a run or export of this project (use --preset instead)")
    with open(path, encoding="utf-8") as fh:
        metadata = json.load(fh)
    saved = metadata.get("normalization") if isinstance(metadata, dict) else None
    if not isinstance(saved, dict):
        preset = (metadata.get("config") or {}).get("normalization", "none") if isinstance(metadata, dict) else "none"
        return build_normalizer(preset)
    return build_normalizer(saved.get("preset", "none"), **{k: saved[k] for k in SWITCHES if k in saved})


def normalize_record(value: Any, normalizer: ArabicNormalizer) -> Any:
    """A JSON record with the text of its message and prompt fields (:data:`TEXT_FIELDS`, at any depth, e.g. an
    OpenAI request's ``messages[*].content``) normalized; names, roles, tool calls and other fields kept."""
    if isinstance(value, list):
        return [normalize_record(v, normalizer) for v in value]
    if isinstance(value, dict):
        return {k: normalizer(v) if k in TEXT_FIELDS and isinstance(v, str) else normalize_record(v, normalizer)
                for k, v in value.items()}
    return value


def main(argv: list[str] | None = None) -> int:
    """``python -m src.data.normalization (--model RUN_DIR | --preset light) [--jsonl] < in > out``."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m src.data.normalization", allow_abbrev=False,
                                     description="Normalize text on stdin as a trained run normalized its training text "
                                                 "(serving stacks do not: their chat templates render text as given).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="RUN_DIR", help="a run or export folder: its sft_metadata.json's normalization")
    source.add_argument("--preset", help=f"a preset instead: one of {', '.join(PRESETS)}")
    parser.add_argument("--jsonl", action="store_true",
                        help=f"stdin is JSON lines: normalize the fields {', '.join(TEXT_FIELDS)} (at any depth), keep "
                             "the rest")
    args = parser.parse_args(argv)
    try:
        normalizer = normalizer_for_run(args.model) if args.model else build_normalizer(args.preset)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stdin = open(sys.stdin.fileno(), encoding="utf-8", errors="strict", newline="", closefd=False)
    stdout = open(sys.stdout.fileno(), "w", encoding="utf-8", newline="", closefd=False)
    try:
        if not args.jsonl:
            stdout.write(normalizer(stdin.read()))
            return 0
        for number, line in enumerate(stdin, 1):
            if not line.strip():
                stdout.write(line)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                print(f"error: stdin line {number} is not JSON ({exc.msg}); drop --jsonl for plain text", file=sys.stderr)
                return 2
            stdout.write(json.dumps(normalize_record(record, normalizer), ensure_ascii=False) + "\n")
    except UnicodeDecodeError as exc:
        print(f"error: stdin is not UTF-8 text ({exc.reason} at byte {exc.start})", file=sys.stderr)
        return 2
    finally:
        stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
