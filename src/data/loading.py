"""Data sources and splits: a file path, a ``datasets`` object or a dict of splits -> validated records per split.

Accepted sources: a data file (.jsonl, .csv, .json: :mod:`src.data.readers`), a .parquet file, a folder saved
by ``datasets`` (``save_to_disk``), a hub dataset id (``org/name``), and a ``datasets.Dataset`` /
``DatasetDict`` / ``dict`` of splits passed in directly. Every row is validated by :mod:`src.data.records`
(the accepted row shapes are listed there). Without validation data, a seeded share of the training rows
is held out (:func:`hold_out`). Several sources mixed with weights are :mod:`src.data.mixing`'s.
"""

from __future__ import annotations

import logging
import os
import random
import re
from typing import Any

import datasets
import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict

from src.data.readers import DATA_FILE_EXTENSIONS, SPLIT_NAMES, read_data_file
from src.data.records import DatasetError, LoadReport, ParsedRows, RawRow, validate_rows

logger = logging.getLogger(__name__)

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
    try:
        if os.path.isfile(path) and path.lower().endswith(".parquet"):
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

