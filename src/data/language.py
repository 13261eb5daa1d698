"""Arabic language consistency of generated text: does an answer stay in Arabic?

Qwen models are known to drift into another script mid-answer (most often Chinese: QwenLM/Qwen3 #361, #1420,
QwenLM/QwQ #29). This module measures it on plain text, with no model and no library beyond ``unicodedata``:

- Only letters count (Unicode categories L*): digits (Arabic-Indic ``٣`` as much as ``3``), punctuation,
  diacritics (harakat are marks, Mn) and the tatweel (``ـ``, a modifier letter of the Arabic block: counted as
  Arabic) never make a text foreign.
- A letter's script is the first word of its Unicode name (``ARABIC``, ``LATIN``, ``CJK``, ``HIRAGANA``,
  ``HANGUL``, ``CYRILLIC``, ...); Hiragana, Katakana and CJK ideographs are one script (``CJK``) for this purpose.
- Code is not language: fenced blocks (```...```) and inline spans (`...`) are left out before counting.
- A *foreign-script run* is a maximal stretch of letters of one non-Arabic script (spaces and punctuation between
  them do not break it: "你好，世界" is one run). Latin is allowed where it is a technical term: a Latin run whose
  every word is in the allow-list (``ALLOWED_LATIN_TERMS``, case-insensitive, plus the caller's) is not foreign;
  any other Latin run is (an Arabic answer that switches to an English sentence has drifted too).
- A text *is Arabic* when at least half of its letters are Arabic (``ARABIC_MAJORITY``); a prompt with no letters is
  not judged.

Per text (``language_stats``): ``arabic_share`` (Arabic letters / letters; None with no letters),
``foreign_runs`` (the runs, with their script), ``foreign_share`` (letters in foreign runs / letters) and
``flagged`` (at least one foreign run). For a set of answers (``language_summary``): the mean Arabic share,
``foreign_script_rate`` (the share of answers with at least one foreign-script run: the figure the optional gate
``max_foreign_script_rate`` compares), the foreign runs per script, and ``answered_in_arabic`` (of the answers to
Arabic prompts, the share that are Arabic; None where no prompt was Arabic).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable, Optional

# Latin words that may appear in an Arabic answer without counting as drift: programming and computing terms that
# Arabic technical writing leaves in Latin letters. Matched case-insensitively, word by word.
ALLOWED_LATIN_TERMS = frozenset("""
ai api apis app cpu css csv gpu html http https id ide ios json javascript js linux llm ml macos nlp pdf python
qwen sql ssh svg tcp ip url usb utf xml yaml windows excel word google git github docker java kotlin php ruby rust
go c cpp c++ c# sdk ui ux wifi bluetooth gps dna rna covid html5 css3 ram rom os
""".split())
ARABIC_MAJORITY = 0.5
# Scripts whose letters count as one: Japanese kana beside CJK ideographs.
SCRIPT_ALIASES = {"HIRAGANA": "CJK", "KATAKANA": "CJK", "HALFWIDTH": "CJK", "BOPOMOFO": "CJK"}

_CODE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`", re.DOTALL)
_WORD = re.compile(r"[^\W\d_]+")


def script_of(char: str) -> Optional[str]:
    """The script of a letter (``ARABIC``, ``LATIN``, ``CJK``, ``HANGUL``, ``CYRILLIC``, ...); None for anything
    that is not a letter (digits, punctuation, spaces, combining marks such as harakat)."""
    if not unicodedata.category(char).startswith("L"):
        return None
    name = unicodedata.name(char, "")
    if not name:
        return "UNKNOWN"
    first = name.split(" ", 1)[0]
    if first.startswith("CJK") or first == "IDEOGRAPHIC":
        return "CJK"
    if name.startswith("FULLWIDTH LATIN"):
        return "LATIN"
    return SCRIPT_ALIASES.get(first, first)


def strip_code(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans (each replaced by a space)."""
    return _CODE.sub(" ", text)


def _runs(text: str) -> list[tuple[str, str]]:
    """Maximal runs of letters of one script, as (script, the text from the run's first to its last letter)."""
    runs: list[tuple[str, int, int]] = []
    for i, char in enumerate(text):
        script = script_of(char)
        if script is None:
            continue
        if runs and runs[-1][0] == script:
            runs[-1] = (script, runs[-1][1], i + 1)
        else:
            runs.append((script, i, i + 1))
    return [(script, text[start:end]) for script, start, end in runs]


def language_stats(text: str, allowed_terms: Iterable[str] = ()) -> dict:
    """How Arabic one text is (module docstring): ``arabic_share``, ``foreign_share``, ``foreign_runs``
    (``[{"script", "text"}]``) and ``flagged``."""
    allowed = ALLOWED_LATIN_TERMS | {t.lower() for t in allowed_terms}
    letters = arabic = foreign_letters = 0
    foreign: list[dict] = []
    for script, run in _runs(strip_code(text)):
        count = sum(1 for c in run if script_of(c) is not None)
        letters += count
        if script == "ARABIC":
            arabic += count
            continue
        if script == "LATIN" and all(w.lower() in allowed for w in _WORD.findall(run)):
            continue  # a technical term: allowed, and neither Arabic nor foreign
        foreign_letters += count
        foreign.append({"script": script, "text": run})
    return {
        "arabic_share": arabic / letters if letters else None,
        "foreign_share": foreign_letters / letters if letters else 0.0,
        "foreign_runs": foreign,
        "flagged": bool(foreign),
    }


def is_arabic(text: str) -> Optional[bool]:
    """Whether at least half of the letters of ``text`` (outside code) are Arabic; None for a text with no letters."""
    share = language_stats(text)["arabic_share"]
    return None if share is None else share >= ARABIC_MAJORITY


def answer_language(prompt: str, answer: str, allowed_terms: Iterable[str] = ()) -> dict:
    """``language_stats`` of ``answer`` plus ``arabic_prompt`` (is the prompt Arabic) and ``answered_in_arabic``
    (for an Arabic prompt: is the answer Arabic; None otherwise)."""
    stats = language_stats(answer, allowed_terms)
    arabic_prompt = is_arabic(prompt)
    share = stats["arabic_share"]
    stats["arabic_prompt"] = bool(arabic_prompt)
    stats["answered_in_arabic"] = (share is not None and share >= ARABIC_MAJORITY) if arabic_prompt else None
    return stats


def language_summary(rows: list[dict]) -> dict:
    """The figures of a set of ``answer_language`` results: ``answers``, ``arabic_share`` (mean over answers with
    letters), ``foreign_script_rate`` (share of answers with a foreign-script run), ``flagged`` (their number),
    ``foreign_runs_by_script`` and ``answered_in_arabic`` (share over Arabic prompts; None without one)."""
    shares = [r["arabic_share"] for r in rows if r["arabic_share"] is not None]
    by_script: dict[str, int] = {}
    for row in rows:
        for run in row["foreign_runs"]:
            by_script[run["script"]] = by_script.get(run["script"], 0) + 1
    judged = [r["answered_in_arabic"] for r in rows if r.get("answered_in_arabic") is not None]
    flagged = sum(1 for r in rows if r["flagged"])
    return {
        "answers": len(rows),
        "arabic_share": sum(shares) / len(shares) if shares else None,
        "foreign_script_rate": flagged / len(rows) if rows else 0.0,
        "flagged": flagged,
        "foreign_runs_by_script": dict(sorted(by_script.items())),
        "arabic_prompts": len(judged),
        "answered_in_arabic": sum(judged) / len(judged) if judged else None,
    }


def language_metrics(summary: dict, prefix: str = "eval_gen_") -> dict[str, float]:
    """The summary's figures as flat metrics (numbers only, for the Trainer's metrics, the model card and the
    loggers): ``<prefix>arabic_share``, ``<prefix>foreign_script_rate``, ``<prefix>answered_in_arabic``."""
    out = {f"{prefix}foreign_script_rate": float(summary["foreign_script_rate"])}
    for key in ("arabic_share", "answered_in_arabic"):
        if summary[key] is not None:
            out[f"{prefix}{key}"] = float(summary[key])
    return out


def describe_language(summary: dict) -> str:
    """One log line's worth: Arabic share, answers with foreign-script runs (by script), Arabic prompts answered in
    Arabic."""
    share = "n/a" if summary["arabic_share"] is None else f"{summary['arabic_share']:.1%}"
    scripts = ", ".join(f"{s} {n}" for s, n in summary["foreign_runs_by_script"].items())
    answered = ("" if summary["answered_in_arabic"] is None else
                f"; Arabic prompts answered in Arabic: {summary['answered_in_arabic']:.1%}")
    return (f"Arabic letters {share}; answers with foreign-script runs: {summary['flagged']} of {summary['answers']} "
            f"({summary['foreign_script_rate']:.1%}{', ' + scripts if scripts else ''}){answered}")


def check_foreign_script_rate(summary: dict, limit: Optional[float], where: str) -> None:
    """The gate: a ``ValueError`` when ``summary``'s foreign-script rate is above ``limit`` (None: no gate)."""
    if limit is not None and summary["foreign_script_rate"] > limit:
        scripts = ", ".join(f"{s} {n}" for s, n in summary["foreign_runs_by_script"].items())
        raise ValueError(f"{where}: {summary['flagged']} of {summary['answers']} answers "
                         f"({summary['foreign_script_rate']:.1%}) contain foreign-script runs ({scripts}), above "
                         f"max_foreign_script_rate={limit}; the flagged rows are marked in the generations file")
