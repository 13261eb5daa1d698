"""The token-level example viewer of ``train_sft.py audit --show N``: what the model is trained on, token by token.

A tokenized training row (``input_ids``, ``labels``, and ``position_ids`` for packed rows) is shown as

1. its text, decoded token by token, with the trained spans marked: green on a terminal, ``[[...]]`` otherwise
   (``--color always|never|auto``);
2. a table of every token: index, id, the token's text (``repr``-escaped for control characters), ``T`` for trained
   or ``.`` for masked, and for packed rows the position id and the document it belongs to.

Arabic is written right to left, and a terminal's bidi reordering moves neutral characters (brackets, spaces,
digits) across an Arabic run: "where the trained part starts" could be shown in the wrong place. Every run of
right-to-left text is therefore wrapped in Unicode bidi isolates (FIRST STRONG ISOLATE U+2068 ... POP DIRECTIONAL
ISOLATE U+2069), so the marks and table columns stay where they are in logical order.

Packed rows show their seams: a ``║ doc k ║`` marker where a new document starts (its ``position_ids`` restart at
0), and the table's ``doc`` column. ``--json`` gives the same content as one JSON object per row (token texts not
isolated: JSON readers do their own layout).
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from src.data.preprocess import TokenizeReport, tokenize_records
from src.data.tokenization import DROPPED

IGNORE_INDEX = -100
FSI, PDI = "\u2068", "\u2069"
GREEN, DIM, RESET = "\033[32m", "\033[2m", "\033[0m"
OPEN, CLOSE = "[[", "]]"
# Right-to-left letters and the marks between them: Hebrew, Arabic (with Syriac, Thaana, NKo), and their
# presentation forms. Spaces and punctuation inside a run stay inside its isolate.
_RTL_RUN = re.compile(r"[\u0590-\u08ff\ufb1d-\ufdff\ufe70-\ufefc](?:[\u0590-\u08ff\ufb1d-\ufdff\ufe70-\ufefc\s\u060c\u061b"
                      r"\u061f.,:;!?\-\u0640\u064b-\u065f]*[\u0590-\u08ff\ufb1d-\ufdff\ufe70-\ufefc])?")


def isolate_rtl(text: str) -> str:
    """``text`` with each right-to-left run wrapped in FSI ... PDI (bidi isolates)."""
    return _RTL_RUN.sub(lambda m: f"{FSI}{m.group(0)}{PDI}", text)


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's own text. Byte-level BPE splits a multi-byte character (an Arabic letter is 2 bytes) over two
    tokens; such a token decodes alone to U+FFFD, so the pending tokens are decoded together once the character is
    complete: the character is shown on the token that completes it, and ``""`` on the ones before."""
    texts: list[str] = []
    start = 0
    for end in range(1, len(ids) + 1):
        decoded = tokenizer.decode(ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if decoded.endswith("\ufffd") and end < len(ids) and end - start < 4:  # at most 4 bytes per character
            texts.append("")
            continue
        texts.append(decoded)
        start = end
    return texts


def documents(position_ids: Optional[list[int]], n: int) -> list[int]:
    """The document index (from 0) of each token: a new document starts where ``position_ids`` restart at 0."""
    if position_ids is None:
        return [0] * n
    doc, out = -1, []
    for i, position in enumerate(position_ids):
        if position == 0 or i == 0:
            doc += 1
        out.append(doc)
    return out


def trained_spans(labels: list[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of each maximal run of trained tokens (label not -100)."""
    spans, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def describe_row(tokenizer: Any, row: dict, index: int, split: str = "train") -> dict:
    """One row as plain data: its tokens (id, text, trained, position id, document), trained spans and counts."""
    ids = [int(t) for t in row["input_ids"]]
    labels = [int(t) for t in row["labels"]]
    position_ids = [int(p) for p in row["position_ids"]] if row.get("position_ids") is not None else None
    texts = token_texts(tokenizer, ids)
    docs = documents(position_ids, len(ids))
    tokens = [{"index": i, "id": ids[i], "text": texts[i], "trained": labels[i] != IGNORE_INDEX, "document": docs[i],
               **({"position_id": position_ids[i]} if position_ids is not None else {})} for i in range(len(ids))]
    spans = trained_spans(labels)
    return {
        "row": index, "split": split, "tokens_total": len(ids), "tokens_trained": sum(t["trained"] for t in tokens),
        "documents": (docs[-1] + 1) if docs else 0, "packed": position_ids is not None,
        "trained_spans": [{"start": s, "end": e, "text": "".join(texts[s:e])} for s, e in spans],
        "tokens": tokens,
    }


def render_text(described: dict, color: bool) -> str:
    """The decoded row with trained spans marked and packed documents' seams shown."""
    parts: list[str] = []
    trained = False
    document = 0
    for token in described["tokens"]:
        if described["packed"] and token["document"] != document:
            if trained:
                parts.append(RESET if color else CLOSE)
                trained = False
            document = token["document"]
            parts.append(f"\n║ doc {document} ║\n")
        if token["trained"] != trained:
            trained = token["trained"]
            parts.append((GREEN if trained else RESET) if color else (OPEN if trained else CLOSE))
        parts.append(token["text"])
    if trained:
        parts.append(RESET if color else CLOSE)
    # isolates around whole runs (a word split over tokens stays one run); a mark ends a run where it stands
    return isolate_rtl("".join(parts))


def render_table(described: dict, color: bool) -> str:
    """One line per token: index, id, text, T/., and (packed) position id and document."""
    packed = described["packed"]
    header = f"{'#':>5} {'id':>7}  {'T':1}  " + (f"{'pos':>5} {'doc':>3}  " if packed else "") + "token"
    lines = [header]
    for token in described["tokens"]:
        mark = "T" if token["trained"] else "."
        shown = isolate_rtl(repr(token["text"])[1:-1]) if token["text"] else "(part of the next character)"
        line = f"{token['index']:>5} {token['id']:>7}  {mark}  " + (
            f"{token['position_id']:>5} {token['document']:>3}  " if packed else "") + shown
        if color:
            line = (GREEN if token["trained"] else DIM) + line + RESET
        lines.append(line)
    return "\n".join(lines)


def render_row(described: dict, color: bool) -> str:
    """The text, then the token table, under a header naming the row and its counts."""
    head = (f"── {described['split']} row {described['row']}: {described['tokens_total']} tokens, "
            f"{described['tokens_trained']} trained" + (f", {described['documents']} documents packed"
                                                         if described["packed"] else "") + " ──")
    legend = "(trained tokens in green)" if color else f"(trained tokens between {OPEN} and {CLOSE})"
    return "\n".join([head, legend, render_text(described, color), "", render_table(described, color), ""])


def training_rows(records: list[dict], example_tokenizer: Any, count: int = 1, rows: Optional[list[int]] = None,
                  packed: bool = False) -> list[tuple[int, Optional[dict]]]:
    """The rows to show, as training builds them: ``(index, row)`` for the first ``count`` training records (or those
    at the 0-based ``rows``), each tokenized by ``example_tokenizer`` (row None: dropped by the over-long policy), or
    with ``packed`` the first ``count`` packed rows of the whole split (packing as training packs)."""
    if packed:
        if rows is not None:
            raise ValueError("--rows picks training examples; with --packed give --show N (the first N packed rows)")
        dataset = tokenize_records(records, example_tokenizer, "train", TokenizeReport(), packing=True)
        return [(i, dataset[i]) for i in range(min(max(count, 1), len(dataset)))]
    if rows is not None:
        outside = [i for i in rows if not 0 <= i < len(records)]
        if outside:
            raise ValueError(f"--rows {outside}: the training split has rows 0 to {len(records) - 1}")
        indices = list(rows)
    else:
        indices = list(range(min(max(count, 1), len(records))))
    tokenized = example_tokenizer.tokenize_batch([records[i] for i in indices], "train") if indices else []
    return [(i, None if status == DROPPED else {"input_ids": ids, "labels": labels})
            for i, (ids, labels, status) in zip(indices, tokenized)]


def show_rows(records: list[dict], example_tokenizer: Any, count: int = 1, rows: Optional[list[int]] = None,
              packed: bool = False, color: bool = False, as_json: bool = False, drop_note: str = "") -> str:
    """``training_rows`` rendered: each row's text and token table (``render_row``), or one JSON object per line."""
    out = []
    for index, row in training_rows(records, example_tokenizer, count, rows, packed):
        if row is None:
            out.append(f"── train row {index}: dropped by the over-long policy{drop_note} ──\n")
            continue
        described = describe_row(example_tokenizer.tokenizer, row, index)
        out.append(json.dumps(described, ensure_ascii=False) if as_json else render_row(described, color))
    return "\n".join(out)
