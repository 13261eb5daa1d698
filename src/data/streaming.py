"""Data larger than memory (``SFTConfig.stream_data``): a JSONL file read in a stream, tokenized into the cache.

The in-memory path (:func:`src.data.loading.load_records`, then :func:`src.data.preprocess.tokenize_records`)
holds every validated record, and before packing every token id, in memory. This path holds neither:

1. A first pass counts the non-blank lines and draws the held-out validation lines (``validation_split_ratio``
   of them, seeded; the draw is over lines, so a held-out line that turns out invalid is skipped like any
   other). Memory: one byte per line, for that moment.
2. A second pass reads, validates (exactly :func:`~src.data.records.parse_record`, same errors and skips),
   formats and tokenizes the rows ``chunk_rows`` at a time, and writes them straight to disk: unpacked rows
   into the Arrow file of a cache entry, or, for packing, the token ids and trained-token flags into raw files
   (5 bytes per token) while only the example lengths stay in memory.
3. Packing is planned from the lengths alone (:func:`~src.data.packing.pack_examples`) and the rows are built
   by gathering from the memory-mapped raw files, a few hundred rows at a time, into the entry's Arrow file.

Entries are the tokenized-data cache's (:mod:`src.data.cache`): keyed by the file's content hash, how it is
split, the tokenizer, the template and every setting; memory-mapped by ``datasets``; built once (under
``torchrun`` the main process builds, the other ranks read, and each rank's sampler reads only its rows) and
reused by the next run when nothing changed. Rows are tokenized on one thread, in file order. The rows exist
nowhere but in the cache, so a cache folder that cannot be written (a full disk, read-only, a file) is a
:class:`~src.data.cache.DatasetCacheError` naming the folder, the reason and the settings to change, and the
half-written entries are removed; the in-memory path falls back to memory instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from src.data.arrow import IGNORE_INDEX, ArrowSink, unpacked_batch
from src.data.cache import (
    DATA_FILE,
    ENTRY_PREFIX,
    DatasetCacheError,
    cache_key,
    cache_settings,
    commit_entry,
    load_entry,
    new_entry_dir,
)
from src.data.packing import packed_batches
from src.data.preprocess import TokenizeReport, apply_counts, empty_counts
from src.data.readers import iter_jsonl
from src.data.records import DatasetError, LoadReport, parse_record

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation")
STREAM_ADVICE = ("set dataset_cache_dir (or $ARABIC_QWEN_SFT_CACHE, when it is 'auto') to a writable folder with room for "
                 "the tokenized data, or turn stream_data off to tokenize in memory")


def file_fingerprint(path: str) -> str:
    """BLAKE2b of the file's bytes (read 1 MiB at a time) and its size."""
    digest = hashlib.blake2b(digest_size=20)
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return f"{digest.hexdigest()}-{size}"


def held_out_lines(path: str, ratio: float, seed: int) -> np.ndarray | None:
    """A boolean per line of ``path`` (index = line number - 1): True for the lines held out as validation."""
    with open(path, "rb") as fh:
        nonblank = np.fromiter((bool(line.strip()) for line in fh), dtype=bool)
    candidates = np.flatnonzero(nonblank)
    if ratio <= 0 or len(candidates) < 2:
        return None
    n_val = max(1, round(len(candidates) * ratio))
    held = np.zeros(len(nonblank), dtype=bool)
    held[np.random.default_rng(seed).choice(candidates, n_val, replace=False)] = True
    return held


@dataclass
class StreamedData:
    """The tokenized splits of a streamed source (what ``SFTTrainer.load_dataset`` returns with ``stream_data``)."""

    splits: dict[str, Any]
    load_report: LoadReport

    def __getitem__(self, split: str) -> Any:
        return self.splits[split]

    def get(self, split: str, default: Any = None) -> Any:
        return self.splits.get(split, default)


class _SplitWriter:
    """Tokenized rows of one split going to disk: the entry's Arrow file, or (packing) raw id and flag files."""

    def __init__(self, tmp: str, packing: bool):
        self.tmp, self.packing = tmp, packing
        self.sink = ArrowSink(os.path.join(tmp, DATA_FILE), packed=packing)
        self.ids = self.trained = None
        try:
            if packing:
                self.ids = open(os.path.join(tmp, "ids.int32"), "wb")
                self.trained = open(os.path.join(tmp, "trained.bool"), "wb")
        except BaseException:
            self.abandon()
            raise
        self.counts = empty_counts()
        self.records = 0
        self.buffer: list[dict] = []
        self.buffered_chars = 0
        self.lengths: list[np.ndarray] = []

    def add(self, chunk: Any) -> None:
        chunk.count_into(self.counts)
        if not len(chunk.lengths):
            return
        if self.packing:
            # file.write, not ndarray.tofile: a full disk then raises ENOSPC (tofile only says "n requested, m written")
            self.ids.write(np.ascontiguousarray(chunk.input_ids, dtype=np.int32).data)
            self.trained.write(np.ascontiguousarray(chunk.labels != IGNORE_INDEX).data)
            self.lengths.append(chunk.lengths.astype(np.int64))
        else:
            self.sink.write(unpacked_batch(chunk.input_ids, chunk.labels, chunk.lengths))

    def abandon(self) -> None:
        """Close every file without finishing it (after an error; the temporary folder is removed next)."""
        for raw in (self.ids, self.trained):
            if raw is not None:
                try:
                    raw.close()
                except OSError:  # its buffer did not reach a full disk: the file is removed anyway
                    pass
        self.sink.abandon()

    def discard(self) -> None:
        """Drop this split (it got no rows): its files go with the temporary folder, unfinished."""
        self.abandon()

    def finish(self, max_seq_length: int) -> None:
        if self.packing:
            self.ids.close()
            self.trained.close()
            total = self.counts["total_tokens"]
            if total:
                ids = np.memmap(self.ids.name, dtype=np.int32, mode="r", shape=(total,))
                trained = np.memmap(self.trained.name, dtype=bool, mode="r", shape=(total,))
                lengths = np.concatenate(self.lengths)
                rows = max(8, (1 << 17) // max_seq_length)  # ~130k tokens per Arrow batch: a few MB of gather arrays
                for batch in packed_batches(ids, None, lengths, max_seq_length, rows_per_batch=rows, trained=trained):
                    self.sink.write(batch)
                del ids, trained
            os.remove(self.ids.name)
            os.remove(self.trained.name)
        self.sink.close()


def stream_splits(path: str, example_tokenizer: Any, cache_dir: str, *, packing: bool, validation_split_ratio: float,
                  seed: int, skip_invalid: bool = False, eval_path: str | None = None,
                  report: TokenizeReport | None = None, chunk_rows: int = 1000, chunk_chars: int = 250_000) -> StreamedData:
    """Tokenized (and packed) ``train`` and ``validation`` datasets of the JSONL file ``path`` (see the module
    docstring), from the cache when ``path``, ``eval_path``, the tokenizer and the settings are unchanged.
    ``eval_path`` (a JSONL file) is the validation split instead of held-out lines. Rows are tokenized in chunks of
    ``chunk_rows`` rows or ``chunk_chars`` characters of JSON, whichever comes first (a chunk's token arrays take
    about 50 bytes per token while it is assembled)."""
    report = report if report is not None else TokenizeReport()
    source = {"streamed": True, "file": file_fingerprint(path),
              "eval_file": file_fingerprint(eval_path) if eval_path else None,
              "validation_split_ratio": None if eval_path else validation_split_ratio, "seed": seed,
              "skip_invalid": bool(skip_invalid)}
    keys, settings = {}, {}
    for split in SPLITS:
        settings[split], why_not = cache_settings([], example_tokenizer, packing, source={**source, "split": split})
        if settings[split] is None:
            raise ValueError(f"stream_data needs the tokenized-data cache, which cannot be used here: {why_not}")
        keys[split] = cache_key(settings[split])
    entries = {split: os.path.join(cache_dir, ENTRY_PREFIX + keys[split]) for split in SPLITS}

    cached = _from_cache(entries, keys, packing)
    if cached is not None:
        splits, metas = cached
        logger.info("%s: dataset cache hit (streamed): %s", path, ", ".join(f"{s} {len(d)} rows" for s, d in splits.items()))
        for split, meta in metas.items():
            apply_counts(report, split, meta["counts"], example_tokenizer, meta["counts"]["examples"])
        return StreamedData(splits, _load_report(metas["train"]["load_report"]))

    logger.info("%s: streaming and tokenizing into %s", path, cache_dir)
    load_report = LoadReport()
    tmps: dict[str, str] = {}
    writers: dict[str, _SplitWriter] = {}
    try:
        for split in SPLITS:
            tmps[split] = new_entry_dir(cache_dir, keys[split])
            writers[split] = _SplitWriter(tmps[split], packing)
        held = None if eval_path else held_out_lines(path, validation_split_ratio, seed)
        sources = [(path, held)] + ([(eval_path, "validation")] if eval_path else [])
        for source_path, routing in sources:
            for values, where, number, size in iter_jsonl(source_path, load_report, skip_invalid, sizes=True):
                split = routing if isinstance(routing, str) else (
                    "validation" if routing is not None and routing[number - 1] else "train")
                load_report.rows_read[split] += 1
                try:
                    record = parse_record(values, where)
                except DatasetError as exc:
                    if not skip_invalid:
                        raise
                    load_report.skip(exc.reason, where)
                    continue
                writer = writers[split]
                writer.buffer.append(record)
                writer.buffered_chars += size
                if len(writer.buffer) >= chunk_rows or writer.buffered_chars >= chunk_chars:
                    _flush(example_tokenizer, writer, split)
        for split, writer in writers.items():
            _flush(example_tokenizer, writer, split)
            load_report.rows_kept[split] = writer.records
        if not writers["train"].records:
            raise DatasetError(f"{path}: no valid training rows ({load_report.summary() or 'nothing read'})")
        has_validation = writers["validation"].records > 0
        if held is not None and has_validation:
            load_report.held_out_validation = writers["validation"].records
        extra = {"load_report": _load_report_dict(load_report), "has_validation": has_validation}
        splits = {}
        for split in SPLITS if has_validation else ("train",):
            writer = writers[split]
            writer.finish(example_tokenizer.max_seq_length)
            apply_counts(report, split, writer.counts, example_tokenizer, writer.records)
            splits[split] = commit_entry(tmps[split], entries[split], keys[split], packing, split=split,
                                         num_rows=writer.sink.num_rows, counts=writer.counts, settings=settings[split],
                                         tokenizer=example_tokenizer.tokenizer, extra=extra)[0]
        if not has_validation:
            writers["validation"].discard()
    except BaseException as exc:
        for writer in writers.values():
            writer.abandon()
        sources_read = {os.path.abspath(p) for p in (path, eval_path) if p}
        if isinstance(exc, OSError) and (exc.filename is None or os.path.abspath(os.fsdecode(exc.filename)) not in sources_read):
            # A full, read-only or misplaced cache folder. The tokenized rows exist only there (they may not fit in
            # memory): no in-memory fallback, one clear error (a ValueError).
            raise DatasetCacheError(cache_dir, exc, note=" (stream_data writes the tokenized rows there)",
                                    advice=STREAM_ADVICE) from exc
        raise
    finally:
        for tmp in tmps.values():
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when renamed into place
    logger.info("Loaded data (streamed): %s", load_report.summary())
    if load_report.total_skipped:
        logger.warning("Skipped %d invalid rows: %s", load_report.total_skipped, dict(load_report.skipped))
    return StreamedData(splits, load_report)


def _from_cache(entries: dict, keys: dict, packing: bool) -> tuple[dict, dict] | None:
    """The cached splits and their metadata, when every split the source has is in the cache."""
    train = load_entry(entries["train"], keys["train"], packing)
    if train is None:
        return None
    splits, metas = {"train": train[0]}, {"train": train[1]}
    if train[1].get("has_validation"):
        validation = load_entry(entries["validation"], keys["validation"], packing)
        if validation is None:
            return None
        splits["validation"], metas["validation"] = validation
    return splits, metas


def _flush(example_tokenizer: Any, writer: _SplitWriter, split: str) -> None:
    if not writer.buffer:
        return
    plan = example_tokenizer._plan(writer.buffer, writer.records, split)
    writer.add(example_tokenizer._tokenize_plan(plan, split))
    writer.records += len(writer.buffer)
    writer.buffer = []
    writer.buffered_chars = 0


def _load_report_dict(report: LoadReport) -> dict:
    return {"rows_read": dict(report.rows_read), "rows_kept": dict(report.rows_kept), "skipped": dict(report.skipped),
            "skipped_examples": report.skipped_examples, "held_out_validation": report.held_out_validation}


def _load_report(data: dict) -> LoadReport:
    return LoadReport(rows_read=Counter(data["rows_read"]), rows_kept=Counter(data["rows_kept"]),
                      skipped=Counter(data["skipped"]), skipped_examples=list(data["skipped_examples"]),
                      held_out_validation=int(data["held_out_validation"]))
