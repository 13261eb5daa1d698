"""On-disk cache of tokenized (and packed) datasets, reused when nothing that decides them changed.

This module keeps the entries: their key, where they live, how they are verified, written and committed.
The pipeline that fills them (tokenize, pack, write, or fall back to memory) is :mod:`src.data.preprocess`.

``tokenize_records(..., cache_dir=DIR)`` stores its result in ``DIR/tokenized-<key>/`` (``data.arrow``, an
Arrow stream that ``datasets`` memory-maps, and ``meta.json``). The key is a BLAKE2b hash of:

- the records themselves (canonical JSON of every validated record, in order): what is tokenized.
  Hashing content rather than file path + size + mtime means an edited file never hits (even when its
  size and mtime are unchanged), a copied or moved file still hits, and the loading choices that change
  the records (hold-out ratio and seed, ``skip_invalid_rows``, the eval file) are covered without being
  listed. It costs about 0.3 s per 100,000 short rows, a small part of tokenizing them;
- the tokenizer: its full ``tokenizers`` serialization (vocabulary, merges, added and special tokens,
  normalizer, pre-tokenizer), class, special tokens map, added vocabulary, ``split_special_tokens`` and
  chat template, plus the prefix, end and suffix ids it gives for the template;
- the prompt format (template, response template, end token and suffix, system prompt), the
  normalization settings, ``max_seq_length``, ``overlong_policy``, ``train_on_last_turn_only``, ``train_on_prompt``
  (and its markup choice), ``packing``; per-message ``loss: false`` flags through the records; for a mixture, the
  names of its sources (whose ids the ``sources`` column holds) and, through the records, each row's source;
- ``CACHE_VERSION`` (bump it whenever the output of ``src/data`` tokenization, packing or loading
  changes) and the ``tokenizers``/``transformers`` versions.

A hit is verified before use: ``meta.json`` must carry the same key and version and a checksum of every data
file of the entry, each file its recorded size and checksum (xxHash XXH3-128 when ``xxhash`` is installed, as
``datasets`` requires, else BLAKE2b; the whole file is read, 8 MiB at a time, on every hit: about 0.1 s per GB
from the page cache), and the memory-mapped table the recorded columns, row count and token and example sums.
``meta.json`` also holds the ``TokenizeReport`` counts, which a hit restores exactly. An entry is written into a
temporary directory next to it, its metadata last (checksums of the finished data files, written to a temporary
name and renamed), and the directory renamed into place only when complete, so a run killed mid-write leaves a
``.tmp-*`` directory that is never read (and is removed a day later); an entry that fails verification (edited,
truncated, written by an older version without checksums) is ignored with a warning naming it and what is
wrong, rebuilt and replaced. Every lookup logs one line: hit or miss.

A cache folder that cannot be written (a full disk, a read-only folder, a file where the folder should be)
costs the cache, not the run: the split is tokenized in memory as without ``cache_dir``, with one warning per
folder and reason that names the folder, the reason and the setting to change; whatever was half-written is
removed. Entries already in a read-only folder are still read. Under ``torchrun`` every rank that finds no
entry does the same, so every rank trains on the same rows. Only :mod:`src.data.streaming`, whose rows exist
nowhere but in the cache, raises :class:`DatasetCacheError` (a ``ValueError``) instead.

With a tokenizer that has no ``tokenizers`` backend, or a ``normalize`` function that cannot describe
itself (only ``ArabicNormalizer``-like objects with ``to_dict`` can), the cache is skipped with a
warning and the data is tokenized as without ``cache_dir``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc
from datasets import Dataset

from src.data.arrow import column_names, features

logger = logging.getLogger(__name__)

# Bump whenever tokenization, packing or loading would produce different datasets for the same inputs.
CACHE_VERSION = 1
DATA_FILE = "data.arrow"
META_FILE = "meta.json"
ENTRY_PREFIX = "tokenized-"
TMP_PREFIX = ".tmp-" + ENTRY_PREFIX
STALE_TMP_SECONDS = 24 * 3600
RECORDS_PER_HASH_CHUNK = 10_000
COUNT_KEYS = ("examples", "truncated", "dropped", "trained_tokens", "total_tokens")
CHECKSUM_CHUNK_BYTES = 8 << 20  # read (and hashed) this much of an entry's data file at a time
SETTING_ADVICE = ("set dataset_cache_dir (or $ARABIC_QWEN_SFT_CACHE, when it is 'auto') to a writable folder with "
                  "free space, or to None to keep everything in memory")
_warned: set[tuple[str, str]] = set()  # (folder, reason) pairs this process already warned about


class DatasetCacheError(ValueError):
    """The dataset cache folder cannot be written: it is full, read-only, or a file. Names the folder, the reason and
    the setting to change (a ``ValueError``: one line, exit 2, from the command line)."""

    def __init__(self, cache_dir: str, error: OSError, note: str = "", advice: str = SETTING_ADVICE):
        self.cache_dir, self.error, self.reason = cache_dir, error, unusable_reason(cache_dir, error)
        super().__init__(f"dataset cache folder {cache_dir} cannot be used: {self.reason}{note}; {advice}")


def unusable_reason(cache_dir: str, error: OSError) -> str:
    """Why writing into ``cache_dir`` failed with ``error``, in words."""
    detail = error.strerror or str(error)
    if os.path.lexists(cache_dir) and not os.path.isdir(cache_dir):
        return "it is a file, not a folder"
    if isinstance(error, NotADirectoryError) or error.errno == errno.ENOTDIR:
        return f"part of its path is a file, not a folder ({detail})"
    if error.errno == errno.ENOSPC:
        return f"the disk is full ({detail})"
    if error.errno == getattr(errno, "EDQUOT", None):
        return f"the disk quota is used up ({detail})"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"it is not writable ({detail})"
    return f"it cannot be written ({type(error).__name__}: {detail})"


@contextlib.contextmanager
def cache_writes(cache_dir: str, note: str = ""):
    """Turn an ``OSError`` of the block (the cache's own writing) into :class:`DatasetCacheError`."""
    try:
        yield
    except OSError as exc:
        raise DatasetCacheError(cache_dir, exc, note) from exc


def warn_unusable(error: DatasetCacheError, split: str) -> None:
    """One warning per folder and reason; the later splits of the run only say so at INFO."""
    seen = (os.path.abspath(error.cache_dir), error.reason.split(" (")[0])
    if seen in _warned:
        logger.info("%s: dataset cache folder %s cannot be used (%s): tokenizing in memory", split, error.cache_dir,
                    error.reason)
        return
    _warned.add(seen)
    logger.warning("%s: dataset cache folder %s cannot be used: %s; tokenizing in memory instead, nothing is cached "
                   "(training goes on). To cache, %s", split, error.cache_dir, error.reason, SETTING_ADVICE)


# -- checksums ---------------------------------------------------------------------------------------


def checksum_algorithm() -> str:
    """The checksum new entries get: XXH3-128 (about 9 GB/s here) with ``xxhash``, else BLAKE2b (about 0.6 GB/s)."""
    try:
        import xxhash  # noqa: F401 - a dependency of datasets
    except ImportError:  # pragma: no cover
        return "blake2b"
    return "xxh3_128"


def _new_digest(algorithm: Any) -> Any:
    if algorithm == "xxh3_128":
        try:
            import xxhash
        except ImportError:  # pragma: no cover
            return None
        return xxhash.xxh3_128()
    if algorithm == "blake2b":
        return hashlib.blake2b(digest_size=20)
    return None


def file_checksum(path: str, algorithm: str) -> str:
    """The ``algorithm`` checksum of the whole file, read ``CHECKSUM_CHUNK_BYTES`` at a time into one buffer."""
    digest = _new_digest(algorithm)
    if digest is None:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}")
    buffer = bytearray(CHECKSUM_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while size := fh.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def _data_files(folder: str) -> list[str]:
    """The data files of an entry folder: every file but the metadata."""
    return sorted(name for name in os.listdir(folder)
                  if name != META_FILE and os.path.isfile(os.path.join(folder, name)))


def _files_problem(entry: str, meta: dict) -> str | None:
    """What is wrong with the entry's data files against the sizes and checksums of its metadata (None: nothing).
    Files the metadata does not list are not read and not checked."""
    files, algorithm = meta.get("files"), meta.get("checksum")
    if not isinstance(files, dict) or DATA_FILE not in files or not algorithm:
        return "its metadata has no checksums of its data files (an entry of an older version, or incomplete)"
    if _new_digest(algorithm) is None:
        return f"its checksums are {algorithm!r}, which this installation cannot compute"
    for name, recorded in files.items():  # the cheap checks first
        path = os.path.join(entry, name)
        if not isinstance(recorded, dict) or not isinstance(recorded.get(algorithm), str) or \
                not isinstance(recorded.get("bytes"), int) or name != os.path.basename(name) or name == META_FILE:
            return f"its metadata lists {name!r} without a valid size and checksum"
        if not os.path.isfile(path):
            return f"{name}, listed in its metadata, is missing"
        if os.path.getsize(path) != recorded["bytes"]:
            return f"{name} has {os.path.getsize(path)} bytes, the metadata says {recorded['bytes']}"
    for name, recorded in files.items():
        actual = file_checksum(os.path.join(entry, name), algorithm)
        if actual != recorded[algorithm]:
            return (f"{name} fails its {algorithm} checksum ({actual[:16]}..., the metadata says "
                    f"{recorded[algorithm][:16]}...): it changed after it was written")
    return None


# -- fingerprints ------------------------------------------------------------------------------------


def records_fingerprint(records: list[dict]) -> str:
    """BLAKE2b of the records' canonical JSON, in order (chunked: no full copy in memory)."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{len(records)} records\n".encode())
    for start in range(0, len(records), RECORDS_PER_HASH_CHUNK):
        chunk = records[start : start + RECORDS_PER_HASH_CHUNK]
        text = json.dumps(chunk, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=repr)
        digest.update(text.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """BLAKE2b of everything about ``tokenizer`` that decides ids; None without a ``tokenizers`` backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    digest = hashlib.blake2b(digest_size=20)
    digest.update(backend.to_str().encode("utf-8"))
    extra = {
        "class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "special_tokens": {key: str(value) for key, value in sorted(tokenizer.special_tokens_map.items())},
        "added_vocab": sorted(tokenizer.get_added_vocab().items()),
        "split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False)),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id],
    }
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode("utf-8"))
    return digest.hexdigest()


def normalization_description(normalize: Any) -> dict | None:
    """What ``normalize`` does, as data; None for a function that cannot say (no ``to_dict``)."""
    if normalize is None:
        return {"type": None}
    to_dict = getattr(normalize, "to_dict", None)
    if not callable(to_dict):
        return None
    return {"type": f"{type(normalize).__module__}.{type(normalize).__qualname__}", **to_dict()}


def cache_settings(records: list[dict], example_tokenizer: Any, packing: bool, source: dict | None = None,
                   source_names: list[str] | None = None) -> tuple[dict | None, str]:
    """The key's inputs as a dict, or (None, why the cache cannot be used). ``source`` describes records that are
    read while tokenizing (a streamed file: its fingerprint and how it is split) instead of ``records``.
    ``source_names``: a mixture's sources, in the order of the ids of the ``sources`` column (None: no mixture)."""
    import tokenizers
    import transformers

    et = example_tokenizer
    et.encoder.ready()  # the tokenizer's padding/truncation state as __call__ leaves it, before serializing it
    tokenizer = tokenizer_fingerprint(et.tokenizer)
    if tokenizer is None:
        return None, f"{type(et.tokenizer).__name__} has no tokenizers backend to fingerprint"
    normalization = normalization_description(et.normalize_spec)
    if normalization is None:
        return None, f"the normalize function {et.normalize_spec!r} cannot be fingerprinted (it has no to_dict)"
    return {
        "cache_version": CACHE_VERSION,
        "records": records_fingerprint(records) if source is None else source,
        "n_records": len(records) if source is None else None,
        "tokenizer": tokenizer,
        "template_ids": {"prefix": list(et.prefix_ids), "end": et.end_id, "suffix": list(et.suffix_ids)},
        "format": dataclasses.asdict(et.fmt),
        "normalization": normalization,
        "max_seq_length": et.max_seq_length,
        "overlong_policy": et.overlong_policy,
        "train_on_last_turn_only": bool(et.train_on_last_turn_only),
        # (only when on: the keys of runs that train no prompt stay what they were)
        **({"train_on_prompt": True, "train_on_prompt_markup": bool(et.train_on_prompt_markup)}
           if et.train_on_prompt else {}),
        "packing": bool(packing),
        # (only for a mixture: the keys of runs without one stay what they were)
        **({"sources": list(source_names)} if source_names is not None else {}),
        "libraries": {"tokenizers": tokenizers.__version__, "transformers": transformers.__version__},
    }, ""


def cache_key(settings: dict) -> str:
    return hashlib.blake2b(json.dumps(settings, sort_keys=True, default=str).encode("utf-8"), digest_size=20).hexdigest()


@dataclass
class Lookup:
    """Where the entry of a split lives, what keys it, and the verified entry when there is one."""

    settings: dict
    key: str
    entry: str
    found: tuple[Any, dict] | None


def look_up(records: list[dict], example_tokenizer: Any, split: str, cache_dir: str, packing: bool,
            source_names: list[str] | None = None) -> Lookup | None:
    """The entry for these records and settings, hit or miss (one log line either way); None, with a warning, when
    the cache cannot be used for them."""
    settings, why_not = cache_settings(records, example_tokenizer, packing, source_names=source_names)
    if settings is None:
        logger.warning("%s: dataset cache not used: %s", split, why_not)
        return None
    key = cache_key(settings)
    entry = os.path.join(cache_dir, ENTRY_PREFIX + key)
    found = load_entry(entry, key, packing)
    if found is not None:
        logger.info("%s: dataset cache hit, %d rows from %s", split, len(found[0]), entry)
    else:
        logger.info("%s: dataset cache miss, tokenizing %d records into %s", split, len(records), entry)
    return Lookup(settings, key, entry, found)


# -- writing -----------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _remove_stale_tmp(cache_dir: str) -> None:
    now = time.time()
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        try:
            if name.startswith(TMP_PREFIX) and now - os.path.getmtime(path) > STALE_TMP_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
                logger.info("removed a partial dataset cache entry left by an interrupted run: %s", path)
        except OSError:  # pragma: no cover - removed by someone else meanwhile
            pass


# -- reading -----------------------------------------------------------------------------------------


def load_entry(entry: str, key: str, packing: bool, warn: bool = True) -> tuple[Any, dict] | None:
    """The verified dataset and metadata of a cache entry; None (with a warning naming the entry and what is wrong,
    or an INFO line without ``warn``) when it is not usable."""
    if not os.path.isdir(entry):
        return None
    data_path = os.path.join(entry, DATA_FILE)
    try:
        with open(os.path.join(entry, META_FILE), encoding="utf-8") as fh:
            meta = json.load(fh)
        problem = None
        if not isinstance(meta, dict) or meta.get("cache_version") != CACHE_VERSION or meta.get("key") != key:
            problem = "its metadata names another key or cache version"
        elif not isinstance(meta.get("counts"), dict) or \
                not all(isinstance(meta["counts"].get(k), int) for k in COUNT_KEYS):
            problem = "its metadata lacks the report counts"
        else:
            problem = _files_problem(entry, meta)  # sizes and checksums of every data file: the whole files are read
        if problem is None:
            dataset = Dataset.from_file(data_path)
            counts = meta["counts"]
            sources = bool((meta.get("settings") or {}).get("sources"))  # a mixture's rows: a sources column
            expected = list(column_names(packing, sources))
            rows = meta["num_rows"] if packing else counts["examples"]
            if dataset.column_names != expected or len(dataset) != rows or len(dataset) != meta["num_rows"]:
                problem = f"it holds {len(dataset)} rows of {dataset.column_names}, expected {rows} of {expected}"
            elif dataset.features != features(packing, sources):
                problem = f"its column types {dataset.features} are not the expected ones"
            elif (pc.sum(dataset.data.column("length")).as_py() or 0) != counts["total_tokens"]:
                problem = "its token count differs from the metadata"
            elif packing and (pc.sum(dataset.data.column("num_examples")).as_py() or 0) != counts["examples"]:
                problem = "its example count differs from the metadata"
    except Exception as exc:  # noqa: BLE001 - any unreadable entry is rebuilt
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        if warn:
            logger.warning("ignoring dataset cache entry %s (%s); rebuilding it", entry, problem)
        else:
            logger.info("replacing dataset cache entry %s (%s)", entry, problem)
        return None
    return dataset, meta


# -- building entries -----------------------------------------------------------------------------


def new_entry_dir(cache_dir: str, key: str) -> str:
    """A fresh temporary folder in ``cache_dir`` to build the entry of ``key`` in (see :func:`commit_entry`)."""
    os.makedirs(cache_dir, exist_ok=True)
    _remove_stale_tmp(cache_dir)
    return tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{key[:16]}-", dir=cache_dir)


def commit_entry(tmp: str, entry: str, key: str, packing: bool, *, split: str, num_rows: int, counts: dict,
                 settings: dict, tokenizer: Any, extra: dict | None = None) -> tuple[Any, dict]:
    """Write the metadata of the finished entry in ``tmp``, rename it into place and read it back (memory-mapped).
    ``extra`` adds fields to the metadata (what a streamed source's loading counted). The metadata is written
    last: the size and checksum of every data file in ``tmp``, to a temporary name renamed to ``meta.json``."""
    algorithm = checksum_algorithm()
    files = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)),
                    algorithm: file_checksum(os.path.join(tmp, name), algorithm)} for name in _data_files(tmp)}
    meta = {
        "cache_version": CACHE_VERSION,
        "key": key,
        "split": split,
        "num_rows": num_rows,
        "counts": {k: int(counts[k]) for k in COUNT_KEYS},
        "data_bytes": os.path.getsize(os.path.join(tmp, DATA_FILE)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer_name": getattr(tokenizer, "name_or_path", None),
        "settings": settings,
        **(extra or {}),
        "checksum": algorithm,
        "files": files,
    }
    _write_json_atomic(os.path.join(tmp, META_FILE), meta)
    _commit(tmp, entry, key, packing)
    found = load_entry(entry, key, packing)
    if found is None:  # pragma: no cover - only if the entry is damaged between writing and reading it
        raise RuntimeError(f"dataset cache entry {entry} could not be read back right after writing it")
    return found


def _write_json_atomic(path: str, data: dict) -> None:
    """``data`` as JSON at ``path``, complete or not at all: written to a temporary name, synced, renamed."""
    part = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.part")
    try:
        with open(part, "w", encoding="utf-8") as fh:
            json.dump(data, fh, ensure_ascii=False, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(part, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(part)
        raise


def _commit(tmp: str, entry: str, key: str, packing: bool) -> None:
    """Rename the finished ``tmp`` directory to ``entry``, replacing an unusable entry in the way."""
    for _ in range(3):
        try:
            os.rename(tmp, entry)
            _fsync_dir(os.path.dirname(entry))
            return
        except OSError:
            if not os.path.exists(entry):
                raise
        # Another process finished the same entry first (keep it), or a broken one is in the way (move it aside;
        # the lookup that missed has warned about it already).
        if load_entry(entry, key, packing, warn=False) is not None:
            return
        trash = f"{os.path.dirname(entry)}/.stale-{os.path.basename(entry)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(entry, trash)
        except FileNotFoundError:  # pragma: no cover - removed meanwhile
            pass
        shutil.rmtree(trash, ignore_errors=True)
    raise OSError(f"could not put the dataset cache entry in place at {entry}")  # pragma: no cover
