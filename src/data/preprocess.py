"""Tokenize and cache: validated records -> a tokenized (and packed) ``datasets.Dataset``, once.

:func:`tokenize_records` is the pipeline training runs on every split: the records are tokenized in chunks
(:meth:`~src.data.tokenization.ExampleTokenizer.tokenize_chunks`), streamed as Arrow record batches
(:mod:`src.data.arrow`), packed when asked (:func:`~src.data.packing.packed_batches`), and counted into a
:class:`TokenizeReport`. With ``cache_dir`` the batches go to an Arrow file in a cache entry keyed by
everything that decides the result (:mod:`src.data.cache`), and a second run with the same data, tokenizer
and settings memory-maps it instead of tokenizing. Without it, or when the cache cannot be used (no
``tokenizers`` backend, an undescribable normalizer, a folder that cannot be written), the result is an
in-memory Arrow table: the one fallback, :func:`_tokenize_in_memory`.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset

from src.data.arrow import IGNORE_INDEX, ArrowSink, unpacked_batch
from src.data.cache import (
    DATA_FILE,
    DatasetCacheError,
    Lookup,
    cache_writes,
    commit_entry,
    look_up,
    new_entry_dir,
    warn_unusable,
)
from src.data.mixing import SOURCE_KEY
from src.data.packing import packed_batches
from src.data.tokenization import DROPPED, ExampleTokenizer, _Chunk, drop_reason

logger = logging.getLogger(__name__)


@dataclass
class TokenizeReport:
    """Counts of what tokenization did to over-long examples, per split.

    Why an over-long example was dropped follows from the policy (:func:`~src.data.tokenization.drop_reason`):
    under ``"drop"`` every over-long example goes; under ``"truncate"`` only those with nothing left to train once
    cut to ``max_seq_length`` (the prompt, with any untrained earlier turns, fills it alone)."""

    examples: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    trained_tokens: Counter = field(default_factory=Counter)
    total_tokens: Counter = field(default_factory=Counter)
    overlong_policy: str | None = None  # of the splits counted (set by apply_counts)

    def summary(self) -> str:
        parts = []
        for split in self.examples:
            part = f"{split}: {self.examples[split]} examples, {self.total_tokens[split]} tokens ({self.trained_tokens[split]} trained)"
            if self.truncated[split] or self.dropped[split]:
                part += f", {self.truncated[split]} truncated"
                if self.dropped[split]:
                    part += f", {self.dropped[split]} dropped ({drop_reason(self.overlong_policy)})"
            parts.append(part)
        return "; ".join(parts)


def empty_counts() -> dict[str, int]:
    """The report counts of a split before any chunk (what ``TokenizeReport`` and cache entries record)."""
    return {"examples": 0, "truncated": 0, "dropped": 0, "trained_tokens": 0, "total_tokens": 0}


def apply_counts(report: TokenizeReport, split: str, counts: dict[str, int], example_tokenizer: ExampleTokenizer,
                 n_records: int) -> None:
    """Add a split's counts to ``report``, log over-long handling, refuse a split left empty."""
    for name in ("dropped", "truncated", "trained_tokens", "total_tokens"):
        if counts[name]:  # as the per-example loop did: a split with none gets no entry
            getattr(report, name)[split] += counts[name]
    report.examples[split] = counts["examples"]
    report.overlong_policy = example_tokenizer.overlong_policy
    truncated, dropped = report.truncated[split], report.dropped[split]
    if truncated or dropped:
        # Counted by reason: under "truncate" a row is dropped (not truncated) when its prompt alone fills the window.
        reason = f"; dropped: {dropped} because {drop_reason(example_tokenizer.overlong_policy)}" if dropped else ""
        logger.warning(
            "%s: %d examples longer than max_seq_length=%d were truncated and %d dropped (overlong_policy=%r)%s",
            split, truncated, example_tokenizer.max_seq_length, dropped, example_tokenizer.overlong_policy, reason,
        )
    if not counts["examples"]:
        raise ValueError(f"{split}: no examples left after applying overlong_policy (all {n_records} were over-long)")


def tokenize_records(
    records: list[dict], example_tokenizer: ExampleTokenizer, split: str, report: TokenizeReport | None = None,
    batch_size: int = 1000, *, packing: bool = False, cache_dir: str | os.PathLike | None = None,
    num_threads: int | None = None, source_names: list[str] | None = None,
) -> Dataset:
    """Tokenize validated records into a ``datasets.Dataset`` with ``input_ids``, ``labels``, ``length``.

    Over-long examples follow the configured policy; truncated/dropped counts go to ``report`` and the log.

    ``packing=True`` also packs the examples (exactly :func:`src.data.packing.pack_dataset`, which then must
    not be applied again) and returns the packed rows with ``position_ids`` and ``num_examples``.

    ``cache_dir`` (None: no cache) keeps the result on disk, keyed by the records' content, the tokenizer,
    the template, normalization, ``max_seq_length``, ``overlong_policy``, ``train_on_last_turn_only``,
    ``packing`` and the code version (:mod:`src.data.cache`); an unchanged second run memory-maps it and
    restores ``report`` exactly, without tokenizing. Without ``cache_dir`` the result is an in-memory
    Arrow table. ``num_threads``: tokenizer threads (None: CPU count, at most 4).

    ``source_names`` (a mixture, :mod:`src.data.mixing`): every record names its source under ``_source``; the rows
    get a ``sources`` column (each document's index in ``source_names``) and the cache key both the names and, through
    the records, the tagging. None (every run without a mixture): no such column, the key as before.
    """
    report = report if report is not None else TokenizeReport()
    options = {"packing": packing, "batch_size": batch_size, "num_threads": num_threads,
               "sources": record_sources(records, source_names, split) if source_names is not None else None}
    if cache_dir is not None:
        dataset = _tokenize_cached(records, example_tokenizer, split, report, os.fspath(cache_dir), source_names,
                                   **options)
        if dataset is not None:
            return dataset
    return _tokenize_in_memory(records, example_tokenizer, split, report, **options)


def record_sources(records: list[dict], source_names: list[str], split: str) -> np.ndarray:
    """The index in ``source_names`` of every record's ``_source`` (int32); a record without one is an error."""
    index = {name: i for i, name in enumerate(source_names)}
    out = np.empty(len(records), dtype=np.int32)
    for i, record in enumerate(records):
        name = record.get(SOURCE_KEY)
        if name not in index:
            raise ValueError(f"{split} row {i}: its source {name!r} is not one of the mixture's sources {source_names}")
        out[i] = index[name]
    return out


def _tokenize_in_memory(records: list[dict], example_tokenizer: ExampleTokenizer, split: str, report: TokenizeReport,
                        **options: Any) -> Dataset:
    sink = ArrowSink(None, packed=options["packing"], sources=options["sources"] is not None)
    counts = write_tokenized(records, example_tokenizer, split, sink, **options)
    apply_counts(report, split, counts, example_tokenizer, len(records))
    return sink.dataset()


def write_tokenized(records: list[dict], example_tokenizer: ExampleTokenizer, split: str, sink: ArrowSink, *,
                    packing: bool, batch_size: int = 1000, num_threads: int | None = None,
                    sources: np.ndarray | None = None) -> dict[str, int]:
    """Tokenize ``records`` into ``sink`` (packed or not); return the report counts of this split. ``sources``: the
    source id of every record (a mixture), written as the rows' ``sources`` column."""
    counts = empty_counts()
    pending = _PackingBuffer(len(records)) if packing else None
    kept_sources: list[np.ndarray] = []
    first = 0  # the chunk's first record
    for chunk in example_tokenizer.tokenize_chunks(records, split, batch_size, num_threads, progress=len(records) > 5000):
        chunk.count_into(counts)
        chunk_sources = None
        if sources is not None:
            chunk_sources = sources[first : first + len(chunk.status)][chunk.status != DROPPED]
        first += len(chunk.status)
        if not len(chunk.lengths):
            continue
        if pending is not None:
            pending.add(chunk)
            if chunk_sources is not None:
                kept_sources.append(chunk_sources)
        else:
            sink.write(unpacked_batch(chunk.input_ids, chunk.labels, chunk.lengths, chunk_sources))
    if pending is not None and counts["examples"]:
        input_ids, trained, lengths = pending.arrays()
        del pending
        example_sources = np.concatenate(kept_sources) if sources is not None else None
        for batch in packed_batches(input_ids, None, lengths, example_tokenizer.max_seq_length, trained=trained,
                                    sources=example_sources):
            sink.write(batch)
    return counts


class _PackingBuffer:
    """Examples waiting to be packed, 5 bytes per token: ids (int32) and whether each is trained.

    Labels are the id or -100 (see ``src.data.tokenization.assemble``), so the mask holds them exactly. The
    buffers are sized from the first chunk's tokens per record and grown when needed, so no list of chunk copies
    and no final concatenation (twice the memory at once) is needed.
    """

    def __init__(self, n_records: int):
        self.n_records = n_records
        self.records_seen = 0
        self.size = 0
        self.ids = np.empty(0, dtype=np.int32)
        self.trained = np.empty(0, dtype=bool)
        self.lengths: list[np.ndarray] = []

    def add(self, chunk: _Chunk) -> None:
        n = len(chunk.input_ids)
        self.records_seen += len(chunk.lengths) + chunk.dropped
        if self.size + n > len(self.ids):
            per_record = (self.size + n) / max(1, self.records_seen)
            capacity = max(self.size + n, int(per_record * self.n_records * 1.05) + 1024, int(len(self.ids) * 1.25))
            self.ids = np.resize(self.ids, capacity)  # copies once per growth; rare after the first estimate
            self.trained = np.resize(self.trained, capacity)
        self.ids[self.size : self.size + n] = chunk.input_ids
        self.trained[self.size : self.size + n] = chunk.labels != IGNORE_INDEX
        self.size += n
        self.lengths.append(chunk.lengths)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.ids[: self.size], self.trained[: self.size], np.concatenate(self.lengths)


# -- the cached path ---------------------------------------------------------------------------------


def _tokenize_cached(records: list[dict], example_tokenizer: ExampleTokenizer, split: str, report: TokenizeReport,
                     cache_dir: str, source_names: list[str] | None, **options: Any) -> Dataset | None:
    """Memory-map a verified entry, or build one atomically; None (after a warning) when the cache cannot be used."""
    lookup = look_up(records, example_tokenizer, split, cache_dir, options["packing"], source_names)
    if lookup is None:
        return None
    if lookup.found is not None:
        dataset, meta = lookup.found
        apply_counts(report, split, meta["counts"], example_tokenizer, len(records))
        return dataset
    try:
        with cache_writes(cache_dir):
            dataset, counts = _build_entry(records, example_tokenizer, split, report, cache_dir, lookup, **options)
    except DatasetCacheError as exc:  # a full disk, a read-only folder, a file: the cache is lost, not the run
        warn_unusable(exc, split)
        return None
    apply_counts(report, split, counts, example_tokenizer, len(records))
    return dataset


def _build_entry(records: list[dict], example_tokenizer: ExampleTokenizer, split: str, report: TokenizeReport,
                 cache_dir: str, lookup: Lookup, **options: Any) -> tuple[Dataset, dict]:
    """Tokenize into a temporary folder and commit it as ``entry``: the memory-mapped dataset and the report counts
    (not yet added to ``report``). Any ``OSError`` is the cache folder's; nothing of the attempt is left behind."""
    packing = options["packing"]
    tmp = new_entry_dir(cache_dir, lookup.key)
    try:
        sink = ArrowSink(os.path.join(tmp, DATA_FILE), packed=packing, sources=options["sources"] is not None)
        try:
            counts = write_tokenized(records, example_tokenizer, split, sink, **options)
        except BaseException:
            sink.abandon()
            raise
        sink.close()
        if not counts["examples"]:
            apply_counts(report, split, counts, example_tokenizer, len(records))  # raises: an empty split, nothing kept
        dataset = commit_entry(tmp, lookup.entry, lookup.key, packing, split=split, num_rows=sink.num_rows,
                               counts=counts, settings=lookup.settings, tokenizer=example_tokenizer.tokenizer)[0]
        return dataset, counts
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was renamed into place
