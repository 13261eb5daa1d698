"""Dataset audit: what training would see, before spending GPU hours on it.

    python train_sft.py audit --config configs/sft_demo.yaml [--audit_output audit.json]   (src/cli/audit.py)

Reads the data exactly as training does (same loader, same hold-out, same normalization and template,
with invalid rows counted instead of raised) and reports: rows per split, invalid rows by reason,
exact and normalized duplicates, token-length percentiles of prompt and response, rows over
``max_seq_length``, the share of Arabic-script letters, the share of rows with diacritics, and the
tokenizer's fertility (tokens per whitespace word) for Arabic and for non-Arabic words; for a mixture
(``datasets:``), each source's rows read, kept, invalid and mixed in, next to the totals. Prints a table
and writes JSON (default ``<output_dir>/audit.json``).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from src.data.formatting import record_texts
from src.data.normalization import ARABIC_LETTER_RE, HAS_DIACRITIC_RE, PRESETS, is_arabic_word

PERCENTILES = (50, 90, 95, 99, 100)


def _percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank percentiles (the smallest value with at least p% of the values at or below it)."""
    if not values:
        return {f"p{p}": 0 for p in PERCENTILES}
    found = np.percentile(np.asarray(values, dtype=np.int64), PERCENTILES, method="inverted_cdf")
    return {f"p{p}": int(v) for p, v in zip(PERCENTILES, found)}


def _fertility(tokenizer: Any, words: list[str]) -> float | None:
    if not words:
        return None
    # Each word is tokenized as it appears mid-sentence (with its leading space), as in running text.
    ids = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    return sum(len(i) for i in ids) / len(words)


def audit_records(records: dict[str, list[dict]], load_report: Any, example_tokenizer: Any, max_seq_length: int,
                  normalizer: Any) -> dict[str, Any]:
    """Compute the audit figures for validated records (see module docstring)."""
    tokenizer = example_tokenizer.tokenizer
    search = PRESETS["search"]
    result: dict[str, Any] = {
        "rows": {split: len(rows) for split, rows in records.items()},
        "rows_read": dict(load_report.rows_read),
        "invalid_rows": dict(load_report.skipped),
        "invalid_examples": load_report.skipped_examples,
        "held_out_validation": load_report.held_out_validation,
        **({"sources": load_report.sources} if load_report.sources else {}),
        "max_seq_length": max_seq_length,
        "normalization": normalizer.to_dict(),
    }
    all_rows = [r for rows in records.values() for r in rows]
    exact = Counter(json.dumps(r, ensure_ascii=False, sort_keys=True) for r in all_rows)
    normalized = Counter(" ".join(search(" ".join(record_texts(r))).split()) for r in all_rows)
    result["duplicates"] = {
        "exact": sum(n - 1 for n in exact.values() if n > 1),
        "normalized": sum(n - 1 for n in normalized.values() if n > 1),
    }
    per_split = {}
    arabic_letters = letters = rows_with_diacritics = 0
    arabic_words: list[str] = []
    other_words: list[str] = []
    for split, rows in records.items():
        # Token counts from training's own assembly (src.data.tokenization.assemble), before any over-long policy.
        lengths = example_tokenizer.lengths(rows)
        prompt_lengths = [prompt for prompt, _ in lengths]
        response_lengths = [response for _, response in lengths]
        total_lengths = [prompt + response for prompt, response in lengths]
        per_split[split] = {
            "prompt_tokens": _percentiles(prompt_lengths),
            "response_tokens": _percentiles(response_lengths),
            "total_tokens": _percentiles(total_lengths),
            "over_max_seq_length": sum(1 for n in total_lengths if n > max_seq_length),
            "tokens": sum(total_lengths),
            # assistant turns a row leaves out of the loss ("loss": false / "train": false)
            "masked_turns": sum(1 for r in rows for m in (r.get("messages") or []) if m.get("loss") is False),
        }
        for r in rows:
            text = normalizer(" ".join(record_texts(r)))
            arabic_letters += len(ARABIC_LETTER_RE.findall(text))
            letters += sum(1 for ch in text if ch.isalpha())
            rows_with_diacritics += bool(HAS_DIACRITIC_RE.search(text))
            for word in text.split():
                (arabic_words if is_arabic_word(word) else other_words).append(word)
    result["splits"] = per_split
    result["arabic_letter_share"] = arabic_letters / letters if letters else 0.0
    result["rows_with_diacritics_share"] = rows_with_diacritics / len(all_rows) if all_rows else 0.0
    result["fertility"] = {
        "arabic_tokens_per_word": _fertility(tokenizer, arabic_words),
        "non_arabic_tokens_per_word": _fertility(tokenizer, [w for w in other_words if any(c.isalpha() for c in w)]),
        "arabic_words": len(arabic_words),
        "non_arabic_words": len(other_words),
    }
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = ["Dataset audit", "=" * 64]
    for split, n in result["rows"].items():
        lines.append(f"{split + ' rows':34s} {n}")
    invalid = result["invalid_rows"]
    lines.append(f"{'invalid rows':34s} {sum(invalid.values())}" + (f"  ({', '.join(f'{k}: {v}' for k, v in invalid.items())})" if invalid else ""))
    for source in result.get("sources", []):
        lines.append(f"  {source['path']} ({source['split']}): {source['rows_read']} read, {source['rows_kept']} kept, "
                     f"{sum(source['invalid_rows'].values())} invalid, {source['mixed_rows']} in the mixture")
    lines.append(f"{'exact duplicates':34s} {result['duplicates']['exact']}")
    lines.append(f"{'normalized duplicates':34s} {result['duplicates']['normalized']}")
    lines.append(f"{'Arabic-script share of letters':34s} {result['arabic_letter_share']:.1%}")
    lines.append(f"{'rows with diacritics':34s} {result['rows_with_diacritics_share']:.1%}")
    fert = result["fertility"]
    for key, label in (("arabic_tokens_per_word", "fertility, Arabic words"), ("non_arabic_tokens_per_word", "fertility, other words")):
        value = fert[key]
        lines.append(f"{label:34s} {'n/a' if value is None else f'{value:.2f} tokens/word'}")
    lines.append("-" * 64)
    header = f"{'tokens':18s}" + "".join(f"{'p' + str(p) if p < 100 else 'max':>8s}" for p in PERCENTILES)
    for split, stats in result["splits"].items():
        masked = f", {stats['masked_turns']} assistant turns masked by their row" if stats.get("masked_turns") else ""
        lines.append(f"{split} (max_seq_length={result['max_seq_length']}: {stats['over_max_seq_length']} rows over{masked})")
        lines.append(header)
        for key in ("prompt_tokens", "response_tokens", "total_tokens"):
            lines.append(f"  {key.split('_')[0]:16s}" + "".join(f"{v:8d}" for v in stats[key].values()))
    return "\n".join(lines)
