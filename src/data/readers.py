"""Reading data files: encodings and file formats -> raw rows with their locations.

JSONL (read line by line and validated while read: :class:`~src.data.records.ParsedRows`), CSV (RFC 4180
quoting: commas, quotes and newlines inside quoted fields; LF or CRLF) and JSON (``{"train": [...],
"validation": [...]}``, or a plain list of rows, taken as the training split). Every file is UTF-8, with or
without a BOM; a UTF-16 or UTF-32 file (by its BOM, from :mod:`codecs`, or the NUL bytes of its first
characters) is refused as a whole: "FILE: the file is UTF-16 (LE) encoded; save it as UTF-8". Lines with
invalid UTF-8 bytes are reported (or skipped and counted) by line. JSON objects that hold a key twice are
marked (:class:`~src.data.records.DuplicateKeys`), so that validation reports the row holding one.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from typing import Any, Iterator

from src.data.records import DatasetError, DuplicateKeys, LoadReport, ParsedRows, RawRow

SPLIT_NAMES = ("train", "validation")
REPLACEMENT_CHAR = "\ufffd"

DATA_FILE_EXTENSIONS = (".jsonl", ".json", ".csv")

def _object_pairs(pairs: list[tuple[str, Any]]) -> dict:
    """``object_pairs_hook`` for ``json.loads``: mark objects with a repeated key instead of keeping the last value.

    The mark is carried up to every enclosing object (through lists), so a row knows about a duplicate in a turn.
    """
    values = dict(pairs)
    if len(values) != len(pairs):
        seen: set[str] = set()
        marked = DuplicateKeys(values)
        marked.key = next(k for k, _ in pairs if k in seen or seen.add(k))
        return marked
    for value in values.values():
        inner = value if isinstance(value, DuplicateKeys) else None
        if inner is None and type(value) is list:
            inner = next((v for v in value if isinstance(v, DuplicateKeys)), None)
        if inner is not None:
            marked = DuplicateKeys(values)
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

_UNICODE_BOMS = (  # UTF-32 first: its LE BOM starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "UTF-32 (LE)"), (codecs.BOM_UTF32_BE, "UTF-32 (BE)"),
    (codecs.BOM_UTF16_LE, "UTF-16 (LE)"), (codecs.BOM_UTF16_BE, "UTF-16 (BE)"),
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
    if data.startswith(codecs.BOM_UTF8):
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
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
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
    if isinstance(data, DuplicateKeys) and data.own:
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

