"""Row parsing and validation: one raw row (a dict as read) -> one validated record, or a :class:`DatasetError`.

Accepted row shapes (first match wins), documented here because users come from other trainers; each source
schema has its own parser (:data:`ROW_SCHEMAS`), and each produces one of three record shapes, which
:mod:`src.data.formatting` turns into its one message shape:

- conversations: ``messages`` (``[{"role": "system"|"user"|"assistant", "content": ...}]``) or
  ShareGPT's ``conversations`` (``[{"from": "system"|"human"|"gpt", "value": ...}]``), an optional row-level
  ``system`` and ``tools`` -> ``{"messages", ["tools"], ["chat_template_kwargs"]}``;
- ``text``: an already formatted example (see :mod:`src.data.formatting`) -> ``{"text"}``;
- ``instruction`` + ``response`` (the specification's names); Alpaca: ``instruction`` + ``input`` + ``output``
  (a non-empty ``input`` is appended to the instruction after a blank line, so it is part of the untrained
  prompt); aliases: ``prompt``/``question``/``query`` for the instruction, ``output``/``completion``/``answer``
  for the response; optional ``system`` (a per-row system prompt) ->
  ``{"instruction", "response", "system", ["reasoning_content"], ["chat_template_kwargs"]}``;
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
- a JSON object holding a key twice (a row, or a turn inside it; :mod:`src.data.readers` marks it): "duplicate key".
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from src.data.chat_templates import jinja_literal, parse_template_kwargs

INSTRUCTION_KEYS = ("instruction", "prompt", "question", "query")
RESPONSE_KEYS = ("response", "output", "completion", "answer")

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


class DuplicateKeys(dict):
    """A JSON object that held a key twice (``key``), or holds such an object somewhere inside (``own`` False)."""

    key: str = ""
    own: bool = True


@dataclass
class LoadReport:
    """What loading did: rows read and kept per split, rows skipped by reason. For a mixture of sources
    (:func:`src.data.mixing.load_mixture`), the totals over every source and, in ``sources``, each one's counts."""

    rows_read: Counter = field(default_factory=Counter)
    rows_kept: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)
    held_out_validation: int = 0
    sources: list[dict] = field(default_factory=list)

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
        loss = _loss_flag(turn, role, where, field_name)
        if loss is False:
            message["loss"] = False  # kept only when it masks the turn: records without it stay as they were
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


LOSS_KEYS = ("loss", "train")  # ms-swift's key, and the other name users reach for


def _loss_flag(turn: dict, role: str, where: str, field_name: str) -> bool | None:
    """An assistant turn's ``"loss": false`` (or ``"train": false``): leave the turn out of the loss. True or absent:
    trained as usual. Given on another role, or not a boolean, or both keys disagreeing: an error naming the field."""
    given = {key: turn[key] for key in LOSS_KEYS if key in turn and turn[key] is not None}
    if not given:
        return None
    for key, value in given.items():
        if role != "assistant":
            raise DatasetError(f"{where}, field '{field_name}.{key}': only assistant turns take {key!r} (a {role} turn "
                               "is never trained; train_on_prompt trains prompts)", "invalid conversation")
        if not isinstance(value, bool):
            raise DatasetError(f"{where}, field '{field_name}.{key}': expected true or false, got {value!r}",
                               "invalid conversation")
    if len(set(given.values())) > 1:
        raise DatasetError(f"{where}, field '{field_name}': 'loss' and 'train' disagree ({given}); give one",
                           "invalid conversation")
    return next(iter(given.values()))


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
    try:
        kwargs = parse_template_kwargs(value)
        jinja_literal(kwargs)  # JSON data only
    except ValueError as exc:
        raise DatasetError(f"{where}, field {name!r}: {str(exc).removeprefix(name + ': ')}", reason) from None
    return kwargs or None


def _conversation_row(values: dict, where: str) -> dict[str, Any]:
    """``messages`` or ShareGPT ``conversations`` (with an optional row-level ``system`` and ``tools``)."""
    key = "messages" if values.get("messages") is not None else "conversations"
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


def _text_row(values: dict, where: str) -> dict[str, Any]:
    """A pre-formatted ``text`` row."""
    if _row_template_kwargs(values, where):
        raise DatasetError(f"{where}, field 'chat_template_kwargs': a pre-formatted 'text' row is not rendered by a "
                           "chat template; give the row as instruction/response or messages", "invalid chat_template_kwargs")
    return {"text": _check_text(values, "text", where)}


def _instruction_row(values: dict, where: str) -> dict[str, Any]:
    """``instruction``/``response`` (or their aliases), Alpaca's ``input``, optional ``system`` and reasoning."""
    instruction_key = _pick(values, INSTRUCTION_KEYS)
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


# Source schemas in the order they are tried: (does the row have this shape?, its parser). The last one takes every
# row left, so a row of no known shape is reported as missing the instruction.
ROW_SCHEMAS: tuple[tuple[Callable[[dict], bool], Callable[[dict, str], dict]], ...] = (
    (lambda values: values.get("messages") is not None or values.get("conversations") is not None, _conversation_row),
    (lambda values: _pick(values, INSTRUCTION_KEYS) is None and "text" in values, _text_row),
    (lambda values: True, _instruction_row),
)


def parse_record(values: Any, where: str) -> dict[str, Any]:
    """Validate one raw row with the parser of its schema (:data:`ROW_SCHEMAS`) and return the record.

    Raises :class:`DatasetError` naming ``where`` and the field.
    """
    if not isinstance(values, dict):
        raise DatasetError(f"{where}: expected an object with 'instruction' and 'response' fields, got {type(values).__name__}", "not an object")
    if isinstance(values, DuplicateKeys):
        inside = "" if values.own else " in an object inside the row"
        raise DatasetError(f"{where}: duplicate key {values.key!r}{inside}; a JSON object may hold each key once",
                           "duplicate key")
    parse = next(parser for matches, parser in ROW_SCHEMAS if matches(values))
    return parse(values, where)


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

