"""Batch generation from a JSONL file (``train_sft.py generate``), resumable.

Input rows are JSON objects with ``instruction`` (and optionally ``system`` and ``id``; without ``id`` a
row's id is its 1-based line number). Each output line is ``{"id", "instruction", "response"}`` (plus
``"reasoning"`` when a thinking model wrote ``...</think>`` before its answer), written
and flushed batch by batch in input order, so an interrupted run keeps every finished row. Prompts are
formatted exactly as in training (``ExampleTokenizer.encode_prompt``); decoding is greedy unless sampling
flags are given (``src.training.generation``).

Resuming (running again with the same output) checks the output against the input before anything is
generated or changed (:func:`check_output`):

- every kept output row must be the input's row with that id: same id *and* same instruction. Otherwise the
  output was written for other input (with line-number ids, a row inserted or removed above shifts every id)
  and the run is refused, naming both files and lines: resuming would skip questions and repeat answers;
- a last line cut off mid-write (no newline, not valid JSON, or not valid UTF-8 because the file ends inside a
  multi-byte character) is cut from the file (truncated, never rewritten) and that row is generated again; any
  other line that is not a generated row (not UTF-8, not JSON, not ``{"id", "instruction", "response"}``, an
  id twice) is an error naming the file and line;
- the output may not be the input file itself (same path, a symbolic or a hard link).

Every row to generate is formatted and measured against the model's context before the first one is generated
(:func:`encode_rows`): a row that cannot be is an error naming the input file and line. Ctrl-C raises
:class:`GenerationInterrupted` (a ``KeyboardInterrupt``) saying how many rows are in the file.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from src.data.chat_templates import split_reasoning
from src.data.language import answer_language, language_summary
from src.training.generation import check_prompt_lengths

logger = logging.getLogger(__name__)

HOW_TO_START_OVER = "to start over, choose a new --output or delete {output}"


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`generate_file`: ``done`` of ``total`` input rows are in ``output`` (complete lines)."""

    def __init__(self, output: str, done: int, total: int):
        self.output, self.done, self.total = output, done, total
        super().__init__(f"{done} of {total} rows are in {output}")


def _bad_utf8(text: str) -> Optional[str]:
    """Where ``text`` (decoded with ``errors="surrogateescape"``) was not valid UTF-8, else None."""
    for index, char in enumerate(text):
        if "\udc80" <= char <= "\udcff":
            return f"not valid UTF-8 (byte 0x{ord(char) - 0xDC00:02x} at character {index + 1})"
    return None


def _unpaired_surrogate(value: Any) -> bool:
    """A JSON ``\\udXXX`` escape without its pair: such a string cannot be written as UTF-8."""
    return isinstance(value, str) and any("\ud800" <= c <= "\udfff" for c in value)


def read_input_rows(path: str) -> list[dict]:
    """The input rows ``{"id", "instruction", "system", "line"}``; a bad row is an error naming its line and field."""
    rows = []
    try:
        fh = open(path, encoding="utf-8-sig", errors="surrogateescape")  # a leading BOM is not part of row 1
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such input file") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the input file ({exc.strerror or exc})") from None
    with fh:
        for number, line in enumerate(fh, start=1):
            bad = _bad_utf8(line)
            if bad:
                raise ValueError(f"{path}, line {number}: {bad}; save the file as UTF-8")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {number}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
                raise ValueError(f"{path}, line {number}: expected an object with a non-empty 'instruction' string")
            if row.get("system") is not None and not isinstance(row["system"], str):
                raise ValueError(f"{path}, line {number}, field 'system': expected a string")
            for key in ("instruction", "system", "id"):
                if _unpaired_surrogate(row.get(key)):
                    raise ValueError(f"{path}, line {number}, field '{key}': an unpaired \\ud800-\\udfff escape "
                                     "(not a character; it cannot be written as UTF-8)")
            rows.append({"id": row.get("id", number), "instruction": row["instruction"], "system": row.get("system"),
                         "line": number})
    seen: dict[str, int] = {}
    for row in rows:
        key = json.dumps(row["id"])
        if key in seen:
            raise ValueError(f"{path}, lines {seen[key]} and {row['line']}: id {key} is repeated; ids must be unique "
                             "(a repeated id would be skipped as already generated)")
        seen[key] = row["line"]
    return rows


def check_not_input(input_path: str, output: str) -> None:
    """Refuse an ``output`` that is the input file itself (same path once resolved, a symbolic or a hard link)."""
    same = os.path.realpath(input_path) == os.path.realpath(output)
    if not same and os.path.exists(input_path) and os.path.exists(output):
        try:
            same = os.path.samefile(input_path, output)
        except OSError:
            same = False
    if same:
        raise ValueError(f"--output {output} is the --input file {input_path}: generating would append answers to the "
                         "questions (and skip them as already answered); choose another --output")
    if os.path.isdir(output):
        raise ValueError(f"--output {output} is a directory; give a file name")


@dataclass
class OutputState:
    """What :func:`read_output` found in an output file."""

    rows: list[dict] = field(default_factory=list)  # {"id", "instruction", "line"} of each complete row
    keep_bytes: Optional[int] = None  # a cut-off last line starts here: truncate the file to this size
    add_newline: bool = False  # the last row is complete but its newline was not written
    dropped_line: Optional[int] = None  # the number of the cut-off last line


def _parse_output_line(raw: bytes) -> tuple[Optional[dict], Optional[str]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line)"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON ({exc.msg})"
    if (not isinstance(row, dict) or "id" not in row or not isinstance(row.get("instruction"), str)
            or not isinstance(row.get("response"), str)):
        return None, 'not a generated row (expected {"id", "instruction", "response"})'
    return row, None


def read_output(output: str) -> OutputState:
    """Read the rows already in ``output`` without changing it; a bad line other than the last is an error."""
    state = OutputState()
    if not os.path.exists(output):
        return state
    if os.path.isdir(output):
        raise ValueError(f"--output {output} is a directory; give a file name")
    offset, pending = 0, None  # pending: (line, reason) of an unreadable line, an error unless it is the last one
    try:
        fh = open(output, "rb")
    except OSError as exc:
        raise ValueError(f"{output}: cannot read the output file ({exc.strerror or exc})") from None
    with fh:
        for number, raw in enumerate(fh, start=1):
            if pending is not None:
                raise ValueError(f"{output}, line {pending[0]}: {pending[1]}; it is damaged or was not written by "
                                 f"generate ({HOW_TO_START_OVER.format(output=output)})")
            if not raw.strip():
                offset += len(raw)
                continue
            row, reason = _parse_output_line(raw)
            if reason is not None:
                pending = (number, reason)
                # a cut-off write is dropped (and redone) if it is the last line; anything else is never cut
                state.keep_bytes, state.dropped_line = (offset, number) if _cut_off(raw, reason) else (None, None)
            else:
                state.rows.append({"id": row["id"], "instruction": row["instruction"], "line": number})
                state.add_newline = not raw.endswith(b"\n")
            offset += len(raw)
    if pending is not None and state.keep_bytes is None:
        raise ValueError(f"{output}, line {pending[0]}: {pending[1]}; it is damaged or was not written by generate "
                         f"({HOW_TO_START_OVER.format(output=output)})")
    if pending is None:
        state.keep_bytes = state.dropped_line = None
    else:
        state.add_newline = False
    return state


def _cut_off(raw: bytes, reason: str) -> bool:
    """A line a killed ``generate`` can leave: the start of one of its rows (``{"id": ...``), without its newline or
    ending inside a multi-byte character. Anything else (another program's file) is never cut."""
    start = b'{"id": '
    ours = raw.startswith(start) or start.startswith(raw)
    return ours and (not raw.endswith(b"\n") or reason.startswith("not valid UTF-8"))


def check_output(rows: list[dict], input_path: str, output: str) -> OutputState:
    """The rows already in ``output``, each checked against the input row with its id (module docstring).
    Changes nothing on disk; raises ValueError naming the first row that does not belong to this input."""
    check_not_input(input_path, output)
    state = read_output(output)
    by_id = {json.dumps(r["id"]): r for r in rows}
    seen: dict[str, int] = {}
    start_over = HOW_TO_START_OVER.format(output=output)
    for done in state.rows:
        key = json.dumps(done["id"])
        if key in seen:
            raise ValueError(f"{output}, lines {seen[key]} and {done['line']}: id {key} appears twice; {start_over}")
        seen[key] = done["line"]
        source = by_id.get(key)
        if source is None:
            raise ValueError(f"{output}, line {done['line']}: id {key} is not in {input_path}: this output was written "
                             f"for other input; {start_over}")
        if source["instruction"] != done["instruction"]:
            numbered = " (rows without 'id' are numbered by line: give each row an 'id' to add or remove rows between " \
                       "runs)" if "line" in source and source["id"] == source["line"] else ""
            raise ValueError(f"{output}, line {done['line']} and {input_path}, line {source.get('line', '?')}: id {key} "
                             f"has another instruction in each ({_quote(done['instruction'])} vs "
                             f"{_quote(source['instruction'])}): this output was written for other input{numbered}; "
                             f"{start_over}")
    return state


def _quote(text: str, limit: int = 40) -> str:
    return json.dumps(text if len(text) <= limit else text[:limit] + "…", ensure_ascii=False)


def repair_output(output: str, state: OutputState) -> None:
    """Cut a cut-off last line from ``output`` (truncate: the rows before it are never rewritten), or end a complete
    last row with its newline."""
    if state.keep_bytes is not None:
        logger.warning("%s, line %d: dropping a cut-off last line (an interrupted write); that row is generated again",
                       output, state.dropped_line)
        os.truncate(output, state.keep_bytes)
    elif state.add_newline:
        with open(output, "ab") as fh:
            fh.write(b"\n")


def encode_rows(trainer: Any, rows: list[dict], input_path: str, max_length: int) -> list[list[int]]:
    """Prompt ids of every row, each formatted as in training and checked against the model's context (as
    ``generation.check_prompt_lengths`` checks it); the first row that fails is an error naming its line."""
    example_tokenizer = trainer.example_tokenizer()
    model = getattr(trainer, "model", None)
    prompts = []
    for row in rows:
        where = f"{input_path}, line {row.get('line', '?')}"
        if row["id"] != row.get("line"):
            where += f" (id {json.dumps(row['id'], ensure_ascii=False)})"
        try:
            ids = example_tokenizer.encode_prompt(row["instruction"], row["system"])
        except ValueError as exc:
            raise ValueError(f"{where}: cannot format the prompt: {exc}") from None
        try:
            check_prompt_lengths(model, [ids], max_length)
        except ValueError as exc:
            message = str(exc)
            message = message.replace("prompt 0 is", "its prompt is", 1) if message.startswith("prompt 0 is") else message
            raise ValueError(f"{where}: {message}") from None
        prompts.append(ids)
    return prompts


def output_language(output: str) -> dict:
    """The Arabic language consistency (``src.data.language.language_summary``) of every row in ``output``, those of
    earlier runs included (rows written before the language figures existed are measured from their text)."""
    read_output(output)  # a damaged file is an error naming its line, as for resuming
    measured = []
    with open(output, "rb") as fh:
        for raw in fh:
            row, reason = _parse_output_line(raw) if raw.strip() else (None, "empty")
            if row is not None:
                measured.append(row.get("language") or answer_language(row["instruction"], row["response"]))
    return language_summary(measured)


def generate_file(trainer: Any, input_path: str, output: str, *, batch_size: int = 8, max_length: int = 256,
                  seed: Optional[int] = None, rows: Optional[list[dict]] = None, **generation_kwargs: Any) -> dict[str, int]:
    """Generate a response for every input row not yet in ``output``; returns counts (generated, skipped).
    ``rows``: the input already read with :func:`read_input_rows` (checked before a model is loaded)."""
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"--batch_size and --max_length must be at least 1 (got {batch_size} and {max_length})")
    rows = rows if rows is not None else read_input_rows(input_path)
    state = check_output(rows, input_path, output)
    done = {json.dumps(r["id"]) for r in state.rows}
    todo = [r for r in rows if json.dumps(r["id"]) not in done]
    prompts = encode_rows(trainer, todo, input_path, max_length)  # every row, before the first is generated
    if len(todo) < len(rows):
        logger.info("%s: %d of %d rows already generated; generating the other %d", output, len(rows) - len(todo),
                    len(rows), len(todo))
    if not todo:
        repair_output(output, state)
        return {"generated": 0, "skipped": len(rows)}
    if seed is not None:
        torch.manual_seed(seed)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    written = 0
    try:
        repair_output(output, state)
        with open(output, "a", encoding="utf-8") as fh, tqdm(total=len(todo), desc="Generating", unit="row") as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                responses = trainer.generate_from_prompts(prompts[start:start + batch_size], max_length=max_length,
                                                          batch_size=batch_size, **generation_kwargs)
                lines = []
                for row, text in zip(chunk, responses):
                    reasoning, response = split_reasoning(text)  # a thinking model's reasoning is kept beside its answer
                    out = {"id": row["id"], "instruction": row["instruction"], "response": response}
                    if reasoning:
                        out["reasoning"] = reasoning
                    out["language"] = answer_language(row["instruction"], response)  # src.data.language
                    lines.append(json.dumps(out, ensure_ascii=False) + "\n")
                fh.write("".join(lines))  # one write per batch, flushed; a row cut by a kill is redone on resume
                fh.flush()
                written += len(chunk)
                bar.update(len(chunk))
    except KeyboardInterrupt:
        try:  # count what reached the file: the batch being written when Ctrl-C came may be in part
            kept = len(read_output(output).rows)
        except (OSError, ValueError):
            kept = len(rows) - len(todo) + written
        raise GenerationInterrupted(output, kept, len(rows)) from None
    return {"generated": len(todo), "skipped": len(rows) - len(todo)}
