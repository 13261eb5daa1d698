"""Loading instruction data from files or ``datasets`` objects into validated records.

Accepted sources: JSONL, CSV (RFC 4180 quoting: commas, quotes and newlines inside quoted fields;
UTF-8 with or without BOM; LF or CRLF), a JSON file holding ``{"train": [...], "validation": [...]}``
(or a plain list of rows, taken as the training split), and a ``datasets.Dataset`` /
``DatasetDict`` / ``dict`` of splits passed in directly.

Accepted row shapes (first match wins), documented here because users come from other trainers:

- ``instruction`` + ``response`` (the specification's names);
- Alpaca: ``instruction`` + ``input`` + ``output``; a non-empty ``input`` is appended to the
  instruction after a blank line, so it is part of the (untrained) prompt;
- aliases: ``prompt``/``question``/``query`` for the instruction, ``output``/``completion``/``answer``
  for the response;
- optional ``system`` (a per-row system prompt);
- ``text``: an already formatted example (see ``src.data.tokenization``);
- conversations: ``messages`` (``[{"role": "system"|"user"|"assistant", "content": ...}]``) or
  ShareGPT's ``conversations`` (``[{"from": "system"|"human"|"gpt", "value": ...}]``);
- thinking and tools (OpenAI/transformers layout): ``reasoning_content`` on assistant turns (and on
  instruction rows), assistant ``tool_calls``, ``role: tool`` turns and a row-level ``tools`` list of JSON
  schemas; they need ``instruction_template="tokenizer"`` to be rendered with tool markup, except
  reasoning, which the other formats write as ``<think>...</think>`` before the answer;
- optional ``chat_template_kwargs`` on instruction and conversation rows (an object, or JSON text of one, e.g.
  ``{"enable_thinking": false}``): the row's own chat template variables, over the run's
  ``chat_template_kwargs`` (``instruction_template="tokenizer"`` only), so thinking and non-thinking rows
  mix in one run. A null value counts as absent (Arrow gives every row the other rows' keys as nulls).

Every record is checked: a missing, non-string or empty field raises :class:`DatasetError` naming the
file, the line (or row index) and the field. With ``skip_invalid_rows`` the row is skipped instead,
and :class:`LoadReport` counts it by reason; nothing is dropped silently. Hostile input is refused the same way:

- a value is *empty* when nothing is left after removing whitespace, direction marks, zero-width characters
  (U+FEFF included), every other character that shows nothing (Unicode's default-ignorable and format characters:
  ``INVISIBLE_RANGES``) and tatweel (:func:`is_blank`, whatever the run's normalization preset): "empty value";
- control characters other than tab, newline, carriage return and NEL, and lone surrogates: "control
  character" / "invalid Unicode";
- a JSON object holding a key twice (a row, or a turn inside it): "duplicate key";
- a UTF-16 or UTF-32 file (by its BOM, or the NUL bytes of its first characters) is refused as a whole:
  "FILE: the file is UTF-16 (LE) encoded; save it as UTF-8".
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

logger = logging.getLogger(__name__)

INSTRUCTION_KEYS = ("instruction", "prompt", "question", "query")
RESPONSE_KEYS = ("response", "output", "completion", "answer")
SPLIT_NAMES = ("train", "validation")
REPLACEMENT_CHAR = "\ufffd"
# Characters that show nothing, as ranges of code points: every Default_Ignorable_Code_Point of Unicode
# (DerivedCoreProperties.txt: direction marks and embeddings/isolates, zero-width characters, U+FEFF/BOM, the soft
# hyphen, the combining grapheme joiner U+034F, the Hangul fillers U+115F, U+1160, U+3164 and U+FFA0, variation
# selectors, tags, invisible operators and the code points Unicode reserves as ignorable), the other format
# characters (category Cf) but the prepended concatenation marks (U+0600-U+0605, U+06DD, ..., which show a sign),
# the Braille blank U+2800 and tatweel. A value holding only these and whitespace is empty, whatever normalization
# preset a run uses. tests/test_edges_config.py checks the table against unicodedata's Cf and the regex module's
# Default_Ignorable_Code_Point.
INVISIBLE_RANGES = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x0640, 0x0640), (0x115F, 0x1160), (0x17B4, 0x17B5),
    (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x2800, 0x2800), (0x3164, 0x3164),
    (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFFB), (0x13430, 0x1343F), (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)
INVISIBLE_CHARS = "".join(chr(c) for first, last in INVISIBLE_RANGES for c in range(first, last + 1))
_INVISIBLE_CLASS = "".join(chr(a) if a == b else f"{chr(a)}-{chr(b)}" for a, b in INVISIBLE_RANGES)
_INVISIBLE_RE = re.compile(f"[{_INVISIBLE_CLASS}]+")
# The first character that shows something (``\s`` is ``str.isspace``, as in ``str.split``).
_VISIBLE_RE = re.compile(f"[^\\s{_INVISIBLE_CLASS}]")
# C0 and C1 control characters (and DEL), except the line breaks: tab, newline, carriage return and NEL
# (U+0085, a Unicode line separator that JSON strings may hold, like U+2028/U+2029).
CONTROL_CHARS = "\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f"
CONTROL_CHAR_RE = re.compile(f"[{CONTROL_CHARS}]")
# Control characters or lone surrogates (what a broken \\uD800-style escape in JSON gives): one search per field.
_BAD_CHAR_RE = re.compile(f"[{CONTROL_CHARS}\ud800-\udfff]")


class DatasetError(ValueError):
    """Bad input data: the message names the file, the line or row, and the field.

    ``reason`` is a short category ("missing field", "empty value", ...) used to count skipped rows.
    """

    def __init__(self, message: str, reason: str = "invalid row"):
        super().__init__(message)
        self.reason = reason


def visible_text(value: str) -> str:
    """``value`` without whitespace and the characters that show nothing (direction marks, zero-width characters,
    tatweel ...: ``INVISIBLE_RANGES``)."""
    return "".join(_INVISIBLE_RE.sub("", value).split())


def is_blank(value: str) -> bool:
    """True when nothing visible is left in ``value`` (``visible_text(value) == ""``): the one definition of an
    empty field. A search for the first visible character: it stops at once for ordinary text."""
    return _VISIBLE_RE.search(value) is None


def _check_characters(value: str, where: str, name: str) -> None:
    """Reject control characters (all but tab, newline, carriage return) and lone surrogates in a field."""
    match = _BAD_CHAR_RE.search(value)
    if match is None:
        return
    if CONTROL_CHAR_RE.match(match.group()):
        raise DatasetError(f"{where}, field {name!r}: control character U+{ord(match.group()):04X} at position "
                           f"{match.start()}; remove it (of the control characters only tab, newline and carriage "
                           "return are allowed)", "control character")
    raise DatasetError(f"{where}, field {name!r}: lone surrogate U+{ord(match.group()):04X} at position "
                       f"{match.start()} (a broken \\u escape); it is not a character", "invalid Unicode")


class _DuplicateKeys(dict):
    """A JSON object that held a key twice (``key``), or holds such an object somewhere inside (``own`` False)."""

    key: str = ""
    own: bool = True


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict:
    """``object_pairs_hook`` for ``json.loads``: mark objects with a repeated key instead of keeping the last value.

    The mark is carried up to every enclosing object (through lists), so a row knows about a duplicate in a turn.
    """
    values = dict(pairs)
    if len(values) != len(pairs):
        seen: set[str] = set()
        marked = _DuplicateKeys(values)
        marked.key = next(k for k, _ in pairs if k in seen or seen.add(k))
        return marked
    for value in values.values():
        inner = value if isinstance(value, _DuplicateKeys) else None
        if inner is None and type(value) is list:
            inner = next((v for v in value if isinstance(v, _DuplicateKeys)), None)
        if inner is not None:
            marked = _DuplicateKeys(values)
            marked.key, marked.own = inner.key, False
            return marked
    return values


class _HasDuplicateKey(Exception):
    pass


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    values = dict(pairs)
    if len(values) != len(pairs):
        raise _HasDuplicateKey
    return values


# Built once (``json.loads`` with options builds a decoder per call). Raw control characters in strings are
# let through (``strict=False``) so that the field check names the field that holds them.
_FAST_DECODER = json.JSONDecoder(object_pairs_hook=_refuse_duplicates, strict=False)
_MARKING_DECODER = json.JSONDecoder(object_pairs_hook=_object_pairs, strict=False)


def _json_loads(text: str) -> Any:
    """Parse JSON, marking objects with duplicate keys (see :func:`_object_pairs`).

    The common case (no duplicate anywhere) takes the cheap hook; a text with a duplicate is parsed again
    with the marking one, so that the row holding it is the one reported.
    """
    if text.startswith("\ufeff"):  # as json.loads: a BOM is an error, not whitespace
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    try:
        return _FAST_DECODER.decode(text)
    except _HasDuplicateKey:
        return _MARKING_DECODER.decode(text)


@dataclass
class LoadReport:
    """What loading did: rows read and kept per split, rows skipped by reason."""

    rows_read: Counter = field(default_factory=Counter)
    rows_kept: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)
    held_out_validation: int = 0

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        if len(self.skipped_examples) < 20:
            self.skipped_examples.append(f"{where}: {reason}")

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        parts = [f"{split}: {self.rows_kept[split]} rows" for split in self.rows_kept]
        if self.held_out_validation:
            parts.append(f"{self.held_out_validation} held out for validation")
        if self.total_skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
            parts.append(f"skipped {self.total_skipped} invalid rows ({reasons})")
        return "; ".join(parts)


@dataclass
class RawRow:
    """One row as read, with where it came from (for error messages)."""

    values: Any
    where: str


@dataclass
class ParsedRows:
    """A split whose rows were validated while being read (JSONL files, ``datasets`` objects).

    Reading and validating row by row keeps only the records in memory, never every raw row next to them.
    Validation failures are kept in row order, and reported by :func:`validate_rows` exactly as if the
    rows had been read first and validated afterwards: reading errors anywhere (also in a later file) come
    first, then the first invalid row; skipped rows are counted in the same order.
    """

    records: list[dict] = field(default_factory=list)
    rows_read: int = 0
    failures: list[tuple[DatasetError, str]] = field(default_factory=list)

    def add(self, values: Any, where: str) -> None:
        self.rows_read += 1
        try:
            self.records.append(parse_record(values, where))
        except DatasetError as exc:
            self.failures.append((exc, where))

    def __len__(self) -> int:
        return self.rows_read


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------


_UNICODE_BOMS = (  # UTF-32 first: its LE BOM starts with the UTF-16 LE one
    (b"\xff\xfe\x00\x00", "UTF-32 (LE)"), (b"\x00\x00\xfe\xff", "UTF-32 (BE)"),
    (b"\xff\xfe", "UTF-16 (LE)"), (b"\xfe\xff", "UTF-16 (BE)"),
)


def _wide_encoding(head: bytes) -> str | None:
    """Name the UTF-16/UTF-32 encoding of a file from its first bytes (a BOM, or the NUL-byte patterns of
    RFC 4627, section 3: text starting with an ASCII character), or None."""
    for bom, name in _UNICODE_BOMS:
        if head.startswith(bom):
            return name
    if len(head) >= 4:
        zero = [b == 0 for b in head[:4]]
        if zero == [True, True, True, False]:
            return "UTF-32 (BE)"
        if zero == [False, True, True, True]:
            return "UTF-32 (LE)"
        if zero == [True, False, True, False]:
            return "UTF-16 (BE)"
        if zero == [False, True, False, True]:
            return "UTF-16 (LE)"
    elif len(head) == 2 and (head[0] == 0) != (head[1] == 0):
        return "UTF-16 (BE)" if head[0] == 0 else "UTF-16 (LE)"
    return None


def _check_utf8_file(path: str, head: bytes) -> None:
    """Refuse a UTF-16/UTF-32 file with a message saying so (instead of a JSON or CSV error about its bytes)."""
    encoding = _wide_encoding(head)
    if encoding:
        raise DatasetError(f"{path}: the file is {encoding} encoded; save it as UTF-8", "wrong encoding")


def _decode(path: str, data: bytes) -> tuple[str, set[int]]:
    """Decode UTF-8 (BOM allowed); return the text and the 1-based line numbers holding invalid bytes.

    Lines are decoded one by one: a UTF-8 multi-byte sequence never contains the newline byte, so a
    line-wise decode finds exactly the lines with invalid bytes. Those bytes become U+FFFD so the rest
    of the file can still be read; the rows on those lines are then reported as invalid. UTF-16 and
    UTF-32 files are refused (:func:`_check_utf8_file`).
    """
    _check_utf8_file(path, data[:4])
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8"), set()
    except UnicodeDecodeError:
        pass
    bad: set[int] = set()
    for number, line in enumerate(data.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad.add(number)
    return data.decode("utf-8", errors="replace"), bad


def _keep_row(rows: list, values: Any, where: str, has_invalid_bytes: bool, report: LoadReport, skip: bool) -> None:
    """Append a parsed row, unless its line held invalid UTF-8 (then skip and count it, or raise)."""
    if not has_invalid_bytes:
        rows.append(RawRow(values, where))
    elif skip:
        report.skip("invalid UTF-8", where)
    else:
        raise DatasetError(_utf8_error(where, values))


def _utf8_error(where: str, values: Any) -> str:
    field_name = None
    if isinstance(values, dict):
        field_name = next((k for k, v in values.items() if isinstance(v, str) and REPLACEMENT_CHAR in v), None)
    field_part = f", field {field_name!r}" if field_name else ""
    return f"{where}{field_part}: invalid UTF-8 bytes; re-save the file as UTF-8"


def _read_jsonl(path: str, report: LoadReport, skip: bool) -> ParsedRows:
    """Read and validate a JSONL file line by line (see :class:`ParsedRows` and :func:`iter_jsonl`)."""
    parsed = ParsedRows()
    for values, where, _ in iter_jsonl(path, report, skip):
        parsed.add(values, where)
    return parsed


def iter_jsonl(path: str, report: LoadReport, skip: bool, sizes: bool = False) -> Iterator[tuple]:
    """The JSON value of every non-blank line of a JSONL file, with its location (``"FILE, line N"``) and line
    number N (and, with ``sizes``, the line's length in characters), one at a time.

    Lines are split at ``b"\n"`` only (``str.splitlines()`` also breaks at U+2028/U+2029/U+0085, which
    JSON strings may hold) and decoded one by one: a UTF-8 multi-byte sequence never contains the newline
    byte, so this finds exactly the lines with invalid bytes, as a whole-file decode would (see ``_decode``).
    Lines that are not JSON (or not UTF-8) raise :class:`DatasetError`, or are skipped and counted with ``skip``.
    """
    any_text = False
    with open(path, "rb") as fh:
        _check_utf8_file(path, fh.read(4))
        fh.seek(0)
        for number, raw in enumerate(fh, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line, bad = raw.decode("utf-8"), False
            except UnicodeDecodeError:
                line, bad = raw.decode("utf-8", errors="replace"), True
            line = line.removesuffix("\n").removesuffix("\r")
            if not line.strip():
                continue
            any_text = True
            where = f"{path}, line {number}"
            try:
                values = _json_loads(line)
            except RecursionError:
                message = f"{where}: invalid JSON (nested too deeply); each line must be one JSON object"
                if skip:
                    report.skip("invalid JSON", where)
                    continue
                raise DatasetError(message, "invalid JSON") from None
            except json.JSONDecodeError as exc:
                message = f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object"
                if bad:
                    message = _utf8_error(where, None)
                if skip:
                    report.skip("invalid JSON" if not bad else "invalid UTF-8", where)
                    continue
                raise DatasetError(message) from None
            if bad:
                if skip:
                    report.skip("invalid UTF-8", where)
                    continue
                raise DatasetError(_utf8_error(where, values))
            yield (values, where, number, len(line)) if sizes else (values, where, number)
    if not any_text:
        raise DatasetError(f"{path}: the file is empty; expected instruction/response rows")


def _read_csv(path: str, text: str, bad_lines: set[int], report: LoadReport, skip: bool) -> list[RawRow]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as exc:
        raise DatasetError(f"{path}, line 1: invalid CSV header ({exc})", "invalid CSV") from None
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        raise DatasetError(f"{path}, line 1: duplicate column names in CSV header {header}")
    rows = []
    start = reader.line_num + 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:  # e.g. a field over the csv module's size limit
            raise DatasetError(f"{path}, line {start}: invalid CSV ({exc})", "invalid CSV") from None
        end = reader.line_num
        where = f"{path}, line {start}" if start == end else f"{path}, lines {start}-{end}"
        line_span = range(start, end + 1)
        start = end + 1
        if not record or all(not cell.strip() for cell in record):
            continue
        if len(record) != len(header):
            message = f"{where}: expected {len(header)} CSV fields ({', '.join(header)}), found {len(record)}; quote fields that contain commas"
            if skip:
                report.skip("wrong number of CSV fields", where)
                continue
            raise DatasetError(message)
        values = dict(zip(header, record))
        _keep_row(rows, values, where, any(n in bad_lines for n in line_span), report, skip)
    return rows


def _read_json(path: str, text: str, bad_lines: set[int]) -> dict[str, list[RawRow]]:
    if bad_lines:
        raise DatasetError(f"{path}, line {min(bad_lines)}: invalid UTF-8 bytes; re-save the file as UTF-8")
    try:
        data = _json_loads(text)
    except RecursionError:
        raise DatasetError(f"{path}: invalid JSON (nested too deeply)", "invalid JSON") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, _DuplicateKeys) and data.own:
        raise DatasetError(f"{path}: duplicate key {data.key!r} in the top-level JSON object", "duplicate key")
    if isinstance(data, list):
        data = {"train": data}
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with a 'train' list (and optional 'validation'), got {type(data).__name__}")
    if "train" not in data:
        raise DatasetError(
            f"{path}: the JSON object has no 'train' key (found keys {sorted(data)}); expected "
            "{\"train\": [...], \"validation\": [...]}"
        )
    unknown = sorted(set(data) - set(SPLIT_NAMES))
    if unknown:
        raise DatasetError(f"{path}: unknown split key(s) {unknown}; expected 'train' and optional 'validation'")
    splits = {}
    for split, rows in data.items():
        if not isinstance(rows, list):
            raise DatasetError(f"{path}: split {split!r} must be a list of rows, got {type(rows).__name__}")
        splits[split] = [RawRow(values, f"{path}, split {split!r}, row {i}") for i, values in enumerate(rows)]
    return splits


def read_data_file(path: str, report: LoadReport, skip_invalid: bool = False) -> dict[str, Any]:
    """Read one data file into raw rows per split (``train`` only, unless it is a JSON split file).

    JSONL files come back as :class:`ParsedRows` (validated while read), other files as lists of :class:`RawRow`.
    """
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: data file does not exist")
    lower = path.lower()
    if lower.endswith(".jsonl"):  # streamed: never the whole text, the raw rows and the records at once
        splits: dict[str, Any] = {"train": _read_jsonl(path, report, skip_invalid)}
        if not any(splits.values()) and not report.total_skipped:
            raise DatasetError(f"{path}: no rows found; expected instruction/response rows")  # pragma: no cover
        return splits
    with open(path, "rb") as fh:
        data = fh.read()
    text, bad_lines = _decode(path, data)
    del data
    if not text.strip():
        raise DatasetError(f"{path}: the file is empty; expected instruction/response rows")
    if lower.endswith(".csv"):
        splits = {"train": _read_csv(path, text, bad_lines, report, skip_invalid)}
    elif lower.endswith(".json"):
        splits = _read_json(path, text, bad_lines)
    else:
        raise DatasetError(f"{path}: unsupported file type; expected .jsonl, .csv or .json")
    if not any(splits.values()) and not report.total_skipped:
        raise DatasetError(f"{path}: no rows found; expected instruction/response rows")
    return splits


# --------------------------------------------------------------------------------------------------
# Validating rows
# --------------------------------------------------------------------------------------------------


def _pick(values: dict, keys: Iterable[str]) -> str | None:
    return next((k for k in keys if k in values), None)


def _check_text(values: dict, key: str, where: str, field_name: str | None = None) -> str:
    value = values.get(key)
    name = field_name or key
    if value is None:
        raise DatasetError(f"{where}, field {name!r}: value is missing (null)", "missing field")
    if not isinstance(value, str):
        raise DatasetError(
            f"{where}, field {name!r}: expected a string, got {type(value).__name__} ({value!r:.40})", "non-string value"
        )
    if is_blank(value):
        raise DatasetError(f"{where}, field {name!r}: value is empty{_invisible_note(value)}", "empty value")
    _check_characters(value, where, name)
    return value


def _invisible_note(value: str) -> str:
    """For a value that is not plain whitespace: which invisible characters it holds, e.g. " (only U+200F, U+0640)"."""
    shown = sorted(set("".join(_INVISIBLE_RE.findall(value))))
    if not shown:
        return ""
    names = [f"U+{ord(c):04X}" for c in shown[:8]] + ([f"... ({len(shown)} different)"] if len(shown) > 8 else [])
    return f" (only whitespace and invisible characters: {', '.join(names)})"


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "model": "assistant", "bot": "assistant", "system": "system"}


def parse_conversation(turns: Any, key: str, where: str) -> list[dict[str, Any]]:
    """Validate a ``messages`` (role/content) or ShareGPT ``conversations`` (from/value) list.

    After an optional leading system message the conversation starts with a user turn and ends with an
    assistant turn (the last thing trained). A user turn is answered by an assistant turn; an assistant turn
    with ``tool_calls`` may be followed by ``role: tool`` turns (the results), which are followed by more tool
    turns or the next assistant turn. Assistant turns may carry ``reasoning_content`` (their thinking) and
    may have empty ``content`` when they only call tools. Tool-call ``arguments`` given as JSON text (the
    OpenAI layout) are parsed into objects, so every Qwen template renders them as it renders objects.
    """
    sharegpt = key == "conversations"
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{where}, field {key!r}: expected a non-empty list of turns", "invalid conversation")
    messages = []
    for n, turn in enumerate(turns):
        field_name = f"{key}[{n}]"
        if not isinstance(turn, dict):
            raise DatasetError(f"{where}, field {field_name!r}: expected an object with {role_key!r} and {content_key!r}",
                               "invalid conversation")
        role = turn.get(role_key)
        if sharegpt and isinstance(role, str):
            role = SHAREGPT_ROLES.get(role, role)
        if not isinstance(role, str) or role not in ("system", "user", "assistant", "tool"):
            raise DatasetError(f"{where}, field '{field_name}.{role_key}': unknown role {turn.get(role_key)!r}; expected "
                               f"system, user, assistant or tool", "invalid conversation")
        message: dict[str, Any] = {"role": role}
        tool_calls = turn.get("tool_calls") if role == "assistant" else None
        if tool_calls is not None:
            message["tool_calls"] = _parse_tool_calls(tool_calls, where, f"{field_name}.tool_calls")
        if tool_calls and turn.get(content_key) in (None, ""):
            message["content"] = ""  # a turn that only calls tools
        else:
            message["content"] = _check_text(turn, content_key, where, f"{field_name}.{content_key}")
        reasoning = turn.get("reasoning_content") if role == "assistant" else None
        if reasoning is not None and reasoning != "":  # "" (no thinking, as exports write it) is no reasoning
            message["reasoning_content"] = _check_text(turn, "reasoning_content", where, f"{field_name}.reasoning_content")
        if role == "tool":
            for extra in ("name", "tool_call_id"):
                if isinstance(turn.get(extra), str):
                    message[extra] = turn[extra]
        messages.append(message)
    body = messages[1:] if messages[0]["role"] == "system" else messages
    offset = len(messages) - len(body)
    previous = None
    for n, message in enumerate(body):
        expected = _turns_allowed_after(previous)
        if message["role"] not in expected:
            hint = ("turns alternate user/assistant after an optional first system turn; tool turns follow an "
                    "assistant turn with tool_calls")
            raise DatasetError(f"{where}, field '{key}[{n + offset}]': expected a {' or '.join(expected)} turn, got "
                               f"{message['role']} ({hint})", "invalid conversation")
        previous = message
    if not body or body[-1]["role"] != "assistant":
        raise DatasetError(f"{where}, field {key!r}: the conversation must end with an assistant turn", "invalid conversation")
    return messages


def _turns_allowed_after(previous: dict | None) -> tuple[str, ...]:
    if previous is None:
        return ("user",)
    if previous["role"] == "user":
        return ("assistant",)
    if previous["role"] == "tool":
        return ("tool", "assistant")
    return ("user", "tool") if previous.get("tool_calls") else ("user",)


def _json_value(value: Any, where: str, name: str, kind: type) -> Any:
    """``value``, or JSON text of it (how Parquet and CSV files hold nested data), checked to be a ``kind``."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}, field {name!r}: not valid JSON ({exc.msg})", "invalid tools") from None
    if not isinstance(value, kind):
        raise DatasetError(f"{where}, field {name!r}: expected {'a list' if kind is list else 'an object'}, got "
                           f"{type(value).__name__}", "invalid tools")
    return value


def _without_nulls(value: Any) -> Any:
    """``value`` without null-valued object keys, at any depth. Arrow (Parquet files, ``datasets`` objects) stores
    the objects of all rows as one struct type and gives each row the other rows' keys as nulls, which chat
    templates would render; a key whose value is null carries nothing a template should write."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _parse_tool_calls(value: Any, where: str, name: str) -> list[dict[str, Any]]:
    """Tool calls as ``[{"type": "function", "function": {"name", "arguments": {...}}}]`` (flat ``{name, arguments}``
    accepted too)."""
    calls = []
    for n, call in enumerate(_json_value(value, where, name, list)):
        if not isinstance(call, dict):
            raise DatasetError(f"{where}, field '{name}[{n}]': expected an object with 'function'", "invalid tools")
        function = call.get("function", call)
        fname = f"{name}[{n}].function" if "function" in call else f"{name}[{n}]"
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise DatasetError(f"{where}, field '{fname}.name': expected the tool's name", "invalid tools")
        key = "arguments" if "arguments" in function or "parameters" not in function else "parameters"  # Llama-3.1 style
        arguments = function.get(key, {})
        arguments = {} if arguments in (None, "") else _json_value(arguments, where, f"{fname}.{key}", dict)
        calls.append({"type": "function", "function": {"name": function["name"], "arguments": _without_nulls(arguments)}})
    return calls


def _row_template_kwargs(values: dict, where: str) -> dict[str, Any] | None:
    """A row's ``chat_template_kwargs`` (an object or JSON text of one) as a dict, None when absent or empty."""
    value = values.get("chat_template_kwargs")
    if value is None or (isinstance(value, str) and not value.strip()):  # an empty CSV cell: none
        return None
    name, reason = "chat_template_kwargs", "invalid chat_template_kwargs"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}, field {name!r}: not valid JSON ({exc.msg}); expected an object such as "
                               "{\"enable_thinking\": false}", reason) from None
    if isinstance(value, dict):
        value = _without_nulls(value)
    from src.data.chat_templates import jinja_literal, parse_template_kwargs

    try:
        kwargs = parse_template_kwargs(value)
        jinja_literal(kwargs)  # JSON data only
    except ValueError as exc:
        raise DatasetError(f"{where}, field {name!r}: {str(exc).removeprefix(name + ': ')}", reason) from None
    return kwargs or None


def parse_record(values: Any, where: str) -> dict[str, Any]:
    """Validate one raw row and return ``{"instruction", "response", "system"}``, ``{"text"}`` or ``{"messages"}``.

    Raises :class:`DatasetError` naming ``where`` and the field.
    """
    if not isinstance(values, dict):
        raise DatasetError(f"{where}: expected an object with 'instruction' and 'response' fields, got {type(values).__name__}", "not an object")
    if isinstance(values, _DuplicateKeys):
        inside = "" if values.own else " in an object inside the row"
        raise DatasetError(f"{where}: duplicate key {values.key!r}{inside}; a JSON object may hold each key once",
                           "duplicate key")
    for key in ("messages", "conversations"):
        if values.get(key) is not None:
            messages = parse_conversation(values[key], key, where)
            system = values.get("system")  # a row-level system prompt (LLaMA-Factory's ShareGPT layout)
            if system is not None:
                system = _check_text(values, "system", where)
                if messages[0]["role"] == "system":
                    raise DatasetError(f"{where}, field 'system': the row has a system field and a system turn; keep one",
                                       "invalid conversation")
                messages = [{"role": "system", "content": system}] + messages
            record: dict[str, Any] = {"messages": messages}
            if values.get("tools") is not None:
                tools = _json_value(values["tools"], where, "tools", list)
                for n, tool in enumerate(tools):
                    if not isinstance(tool, dict):
                        raise DatasetError(f"{where}, field 'tools[{n}]': expected an object (a JSON schema)", "invalid tools")
                record["tools"] = _without_nulls(tools)
            template_kwargs = _row_template_kwargs(values, where)
            if template_kwargs:
                record["chat_template_kwargs"] = template_kwargs
            return record
    instruction_key = _pick(values, INSTRUCTION_KEYS)
    if instruction_key is None and "text" in values:
        if _row_template_kwargs(values, where):
            raise DatasetError(f"{where}, field 'chat_template_kwargs': a pre-formatted 'text' row is not rendered by a "
                               "chat template; give the row as instruction/response or messages", "invalid chat_template_kwargs")
        return {"text": _check_text(values, "text", where)}
    if instruction_key is None:
        raise DatasetError(
            f"{where}, field 'instruction': missing (found fields {sorted(values)}); expected 'instruction' "
            f"(or one of {INSTRUCTION_KEYS[1:]}) and 'response' (or one of {RESPONSE_KEYS[1:]}), or 'text'",
            "missing field",
        )
    response_key = _pick(values, RESPONSE_KEYS)
    if response_key is None:
        raise DatasetError(
            f"{where}, field 'response': missing (found fields {sorted(values)}); expected 'response' "
            f"(or one of {RESPONSE_KEYS[1:]})",
            "missing field",
        )
    instruction = _check_text(values, instruction_key, where)
    response = _check_text(values, response_key, where)
    extra_input = values.get("input")
    if extra_input is not None and not isinstance(extra_input, str):
        raise DatasetError(f"{where}, field 'input': expected a string, got {type(extra_input).__name__}", "non-string value")
    if extra_input:
        _check_characters(extra_input, where, "input")
    if extra_input and not is_blank(extra_input):
        instruction = f"{instruction}\n\n{extra_input}"
    system = values.get("system")
    if system is not None and not isinstance(system, str):
        raise DatasetError(f"{where}, field 'system': expected a string, got {type(system).__name__}", "non-string value")
    if system:
        _check_characters(system, where, "system")
    record = {"instruction": instruction, "response": response, "system": system or None}
    if values.get("reasoning_content") not in (None, ""):  # "" (no thinking, as exports write it) is no reasoning
        record["reasoning_content"] = _check_text(values, "reasoning_content", where)
    template_kwargs = _row_template_kwargs(values, where)
    if template_kwargs:
        record["chat_template_kwargs"] = template_kwargs
    return record


def validate_rows(rows: Iterable[RawRow] | ParsedRows, report: LoadReport, split: str, skip_invalid: bool,
                  source_name: str = "dataset") -> list[dict]:
    """Parse every row; raise on the first invalid one, or skip and count it. ``source_name`` (the file) starts
    the messages about the split as a whole."""
    if isinstance(rows, ParsedRows):
        report.rows_read[split] += rows.rows_read
        for exc, where in rows.failures:
            if not skip_invalid:
                raise exc
            report.skip(exc.reason, where)
        records = rows.records
    else:
        records = []
        for row in rows:
            report.rows_read[split] += 1
            try:
                records.append(parse_record(row.values, row.where))
            except DatasetError as exc:
                if not skip_invalid:
                    raise
                report.skip(exc.reason, row.where)
    report.rows_kept[split] += len(records)
    return records


def _parse_dataset_rows(dataset: Any, name: str, batch_size: int = 1000) -> ParsedRows:
    """Validate the rows of a ``datasets.Dataset`` while reading them, a batch at a time."""
    parsed = ParsedRows()
    columns = list(dataset.column_names)
    index = 0
    for batch in dataset.iter(batch_size=batch_size):
        for values in zip(*(batch[c] for c in columns)):
            # A column another row shape needs is null in this row (Arrow tables have one schema): absent here.
            parsed.add({c: v for c, v in zip(columns, values) if v is not None}, f"{name}, row {index}")
            index += 1
    return parsed


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def hold_out(records: list[dict], ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministically split off ``ratio`` of the rows (at least one) as validation."""
    if ratio <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(records) * ratio))
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    validation = [r for i, r in enumerate(records) if i in val_idx]
    return train, validation


def load_records(
    source: Any,
    eval_source: Any = None,
    *,
    validation_split_ratio: float = 0.1,
    seed: int = 42,
    skip_invalid: bool = False,
    log: bool = True,
) -> tuple[dict[str, list[dict]], LoadReport]:
    """Load and validate training (and validation) records.

    ``source`` is a file path, a ``datasets.Dataset``, a ``DatasetDict`` or a dict of splits.
    ``eval_source`` optionally gives the validation split separately. Without any validation data,
    ``validation_split_ratio`` of the training rows is held out, shuffled with ``seed``. ``log=False``
    leaves the summary line out (for records that were loaded, and logged, once already); skipped rows
    are always reported.
    """
    report = LoadReport()
    raw = _raw_splits(source, report, skip_invalid, "dataset")
    if eval_source is not None:
        eval_raw = _raw_splits(eval_source, report, skip_invalid, "eval dataset")
        raw["validation"] = eval_raw.get("validation") or eval_raw.get("train") or []
    names = {"train": _source_name(source, "dataset"), "validation": _source_name(eval_source, "eval dataset")
             if eval_source is not None else _source_name(source, "dataset")}
    records = {split: validate_rows(rows, report, split, skip_invalid, names[split]) for split, rows in raw.items()}
    if not records.get("train"):
        where = _source_name(source, "the training dataset")
        raise DatasetError(f"{where}: no valid training rows ({report.summary() or 'nothing read'})")
    if "validation" not in records:
        records["train"], validation = hold_out(records["train"], validation_split_ratio, seed)
        if validation:
            records["validation"] = validation
            report.held_out_validation = len(validation)
            report.rows_kept["train"] -= len(validation)
            report.rows_kept["validation"] += len(validation)
    if log:
        logger.info("Loaded data: %s", report.summary())
    if report.total_skipped:
        logger.warning("Skipped %d invalid rows: %s", report.total_skipped, dict(report.skipped))
    return records, report


def _source_name(source: Any, default: str) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else default


def _raw_splits(source: Any, report: LoadReport, skip_invalid: bool, name: str) -> dict[str, Any]:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if path.lower().endswith(DATA_FILE_EXTENSIONS) or (os.path.exists(path) and not os.path.isdir(path)
                                                           and not path.lower().endswith(".parquet")):
            return read_data_file(path, report, skip_invalid)
        source, name = open_dataset_source(path), path
    try:
        from datasets import Dataset, DatasetDict
    except ImportError:  # pragma: no cover - datasets is a hard dependency
        Dataset = DatasetDict = ()  # type: ignore
    if isinstance(source, Dataset):
        return {"train": _parse_dataset_rows(source, name)}
    if isinstance(source, (DatasetDict, dict)):
        if "train" not in source:
            raise DatasetError(f"{name}: expected a 'train' split, found {sorted(source)}")
        splits = {}
        for split, data in source.items():
            key = "validation" if split in ("validation", "eval", "valid") else split
            if key not in SPLIT_NAMES:
                raise DatasetError(f"{name}: unknown split {split!r}; expected 'train' and optional 'validation'")
            if isinstance(data, list):
                splits[key] = [RawRow(v, f"{name} split {split!r}, row {i}") for i, v in enumerate(data)]
            else:
                splits[key] = _parse_dataset_rows(data, f"{name} split {split!r}")
        return splits
    raise TypeError(f"{name}: expected a file path, datasets.Dataset, DatasetDict or dict of splits, got {type(source).__name__}")


DATA_FILE_EXTENSIONS = (".jsonl", ".json", ".csv")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SOURCES = ("a .jsonl, .json, .csv or .parquet file, a folder saved by datasets (save_to_disk), or a hub dataset id "
           "such as 'org/name'")


def _looks_like_hub_id(path: str) -> bool:
    return bool(HUB_ID_RE.match(path)) and not os.path.exists(path) and not os.path.isdir(path.split("/", 1)[0])


def check_data_path(path: Any) -> None:
    """Raise ``ValueError`` when ``path`` cannot be a data source this module reads: a data file (.jsonl,
    .json, .csv, .parquet), a folder saved by ``datasets`` (``save_to_disk``), or a hub dataset id."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{path!r} is invalid: expected {SOURCES}.")
    if os.path.isdir(path) or _looks_like_hub_id(path):
        return
    if not path.lower().endswith(DATA_FILE_EXTENSIONS + (".parquet",)):
        raise ValueError(f"{path!r} is invalid: expected {SOURCES}.")
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist (looked in {os.getcwd()}).")


def open_dataset_source(path: str) -> Any:
    """A ``datasets`` object for a .parquet file, a folder saved by ``save_to_disk``, or a hub dataset id; the
    error names the source and what went wrong (a hub id offline fails here, not later)."""
    import datasets

    try:
        if os.path.isfile(path) and path.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            return datasets.Dataset(pq.read_table(path))
        if os.path.isdir(path):
            return datasets.load_from_disk(path)
    except Exception as exc:  # pyarrow, datasets and OS errors of a damaged file or folder
        raise DatasetError(f"{path}: could not read it as {'parquet' if os.path.isfile(path) else 'a saved dataset folder'} "
                           f"({type(exc).__name__}: {exc})", "unreadable file") from None
    if not _looks_like_hub_id(path):
        raise DatasetError(f"{path}: not found; expected {SOURCES}", "unreadable file")
    try:
        return datasets.load_dataset(path)
    except Exception as exc:
        offline = " (offline: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" or \
            os.environ.get("HF_DATASETS_OFFLINE") == "1" else ""
        raise DatasetError(f"hub dataset {path!r} could not be loaded{offline}: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}", "unreadable file") from None
