"""The tokenized-row format every data stage shares, and the one place Arrow batches are built and written.

A leaf module (it imports nothing of the project), so tokenization, packing, the preprocessing pipeline, the
cache and the models layer can all use it without importing each other:

- ``IGNORE_INDEX``: the label of a position that is not trained;
- the columns of tokenized rows, unpacked (``input_ids``, ``labels``, ``length``) and packed (plus
  ``position_ids`` and ``num_examples``), with their Arrow types (:func:`features`); rows of a mixture also have
  ``sources`` (:data:`SOURCES_COLUMN`: the source id of each document of the row, in order);
- Arrow record batches of unpacked and packed rows from flat numpy arrays, and :class:`ArrowSink`, which
  collects them into an Arrow stream file (a cache entry) or into memory (:func:`dataset_from_batches`);
- :func:`flattens_packed_batches`: which attention implementations need a batch of packed rows as one row.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, List, Value
from datasets.fingerprint import generate_random_fingerprint
from datasets.table import InMemoryTable

IGNORE_INDEX = -100

# Column types exactly as ``Dataset.from_dict`` infers them from Python lists (``input_ids`` is narrowed
# to int32 by ``datasets``, the rest stay int64), so the Arrow-built datasets equal the list-built ones.
UNPACKED_COLUMNS = ("input_ids", "labels", "length")
PACKED_COLUMNS = ("input_ids", "labels", "position_ids", "length", "num_examples")
# Rows of a mixture (src.data.mixing): the source id of each document of the row (one for an unpacked row), which
# the collator spreads over the document's tokens (``source_ids``) for the loss per source. Absent otherwise.
SOURCES_COLUMN = "sources"


def column_names(packed: bool, sources: bool = False) -> tuple[str, ...]:
    """The column names of tokenized rows, unpacked or packed, with or without :data:`SOURCES_COLUMN`."""
    return (PACKED_COLUMNS if packed else UNPACKED_COLUMNS) + ((SOURCES_COLUMN,) if sources else ())


def features(packed: bool, sources: bool = False) -> Features:
    """The ``datasets`` features of tokenized rows, unpacked or packed (with ``sources`` for a mixture's rows)."""
    columns = {"input_ids": List(Value("int32")), "labels": List(Value("int64"))}
    if packed:
        columns["position_ids"] = List(Value("int64"))
    columns["length"] = Value("int64")
    if packed:
        columns["num_examples"] = Value("int64")
    if sources:
        columns[SOURCES_COLUMN] = List(Value("int32"))
    return Features(columns)


def flattens_packed_batches(attn_implementation: str | None) -> bool:
    """Whether packed batches must be one flattened row for this attention implementation.

    transformers' FlashAttention paths detect packed sequences from ``position_ids`` only when the
    batch has a single row (``_is_packed_sequence`` in ``modeling_flash_attention_utils``): with several
    packed rows they silently attend across examples. SDPA and eager isolate per row, where keeping
    rows of ``max_seq_length`` is also cheaper (no attention over the whole batch at once).
    """
    return "flash" in (attn_implementation or "")


def _list_array(values: np.ndarray, lengths: np.ndarray, dtype: Any) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:  # pragma: no cover - a batch is at most a thousand rows
        raise ValueError("an Arrow batch of more than 2**31 tokens; lower the batch size")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32), type=pa.int32()), pa.array(values, type=dtype))


def _int32_ids(values: np.ndarray) -> np.ndarray:
    if len(values) and (values.min() < -(2**31) or values.max() >= 2**31):
        raise ValueError("token ids do not fit in int32")
    return values.astype(np.int32, copy=False)


def _sources_array(sources: np.ndarray | None, per_row: np.ndarray) -> list:
    """The ``sources`` column (``per_row`` documents' source ids each), or nothing without sources."""
    return [] if sources is None else [_list_array(sources.astype(np.int32, copy=False), per_row, pa.int32())]


def unpacked_batch(input_ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray,
                   sources: np.ndarray | None = None) -> pa.RecordBatch:
    """One Arrow record batch of unpacked examples from flat ids/labels and example lengths (and, for a mixture,
    each example's source id)."""
    return pa.RecordBatch.from_arrays(
        [_list_array(_int32_ids(input_ids), lengths, pa.int32()),
         _list_array(labels.astype(np.int64, copy=False), lengths, pa.int64()),
         pa.array(lengths.astype(np.int64, copy=False), type=pa.int64()),
         *_sources_array(sources, np.ones(len(lengths), dtype=np.int64))],
        schema=features(False, sources is not None).arrow_schema)


def packed_batch(input_ids: np.ndarray, labels: np.ndarray, position_ids: np.ndarray, row_lengths: np.ndarray,
                 examples_per_row: np.ndarray, sources: np.ndarray | None = None) -> pa.RecordBatch:
    """One Arrow record batch of packed rows from flat ids/labels/positions, row lengths and examples per row (and,
    for a mixture, the source id of every example, in row order)."""
    return pa.RecordBatch.from_arrays(
        [_list_array(_int32_ids(input_ids), row_lengths, pa.int32()), _list_array(labels, row_lengths, pa.int64()),
         _list_array(position_ids, row_lengths, pa.int64()), pa.array(row_lengths, type=pa.int64()),
         pa.array(examples_per_row, type=pa.int64()), *_sources_array(sources, examples_per_row)],
        schema=features(True, sources is not None).arrow_schema)


def dataset_from_batches(batches: list, packed: bool, sources: bool = False) -> Dataset:
    """An in-memory ``datasets.Dataset`` over Arrow record batches (types of :func:`features`)."""
    table = pa.Table.from_batches(batches, schema=features(packed, sources).arrow_schema)
    # An explicit fingerprint: deriving one would pickle and hash the whole table (a full copy in memory).
    return Dataset(InMemoryTable(table), fingerprint=generate_random_fingerprint())


class ArrowSink:
    """Collects Arrow record batches: into an Arrow stream file (``path``) or in memory (``path=None``)."""

    def __init__(self, path: str | None, packed: bool, sources: bool = False):
        self.path = path
        self.packed = packed
        self.sources = sources
        self.schema = features(packed, sources).arrow_schema
        self.batches: list = []
        self.num_rows = 0
        self._file = open(path, "wb") if path else None
        try:
            self._writer = pa.ipc.new_stream(self._file, self.schema) if path else None
        except BaseException:
            self._file.close()
            raise

    def write(self, batch: Any) -> None:
        self.num_rows += batch.num_rows
        if self._writer is not None:
            self._writer.write_batch(batch)
        else:
            self.batches.append(batch)

    def close(self) -> None:
        """Finish the stream and put it on disk (``fsync``): a full disk shows here at the latest."""
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        try:
            writer.close()
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def abandon(self) -> None:
        """Close without caring whether the end of the stream reaches the disk (the file is about to be removed)."""
        writer, self._writer = self._writer, None
        for close in ((writer.close,) if writer is not None else ()) + ((self._file.close,) if self._file else ()):
            try:
                close()
            except Exception:  # noqa: BLE001 - a full disk again, most likely; the error that matters is raised
                pass

    def dataset(self) -> Dataset:
        """The batches collected in memory as a ``datasets.Dataset``."""
        return dataset_from_batches(self.batches, self.packed, self.sources)
