"""Edges of the tokenized-data cache (src/data/cache.py): a damaged entry is never used, and a cache folder that
cannot be written (full, read-only, a file) costs the cache, not the run."""

import errno
import json
import logging
import os
import subprocess
import sys
import tempfile

import pytest

from src.data import arrow as arrow_module
from src.data import cache as cache_module
from src.data.preprocess import TokenizeReport, tokenize_records
from src.data.templates import get_prompt_format
from src.data.tokenization import IGNORE_INDEX, ExampleTokenizer
from tests.helpers import PAIRS, ROOT, write_jsonl

COUNTS = ("examples", "truncated", "dropped", "trained_tokens", "total_tokens")
CONVERSATION = {"messages": [{"role": "system", "content": "أنت مساعد مفيد."},
                             {"role": "user", "content": "ما عاصمة مصر؟"}, {"role": "assistant", "content": "القاهرة."},
                             {"role": "user", "content": "وعاصمة الأردن؟"}, {"role": "assistant", "content": "عمّان."}]}


def records(n=3):
    """Instruction pairs (and a conversation), ``n`` copies with a number in each: several Arrow batches of 4."""
    rows = [{**p, "instruction": f"{p['instruction']} ({i})", "system": None} for i in range(n) for p in PAIRS]
    return rows + [CONVERSATION]


def counts(report, split="train"):
    return {name: getattr(report, name)[split] for name in COUNTS}


def entries(cache_dir):
    return sorted(n for n in os.listdir(cache_dir) if n.startswith(cache_module.ENTRY_PREFIX))


def leftovers(cache_dir):
    """Everything in the cache folder that is not a complete entry (temporary or half-written folders)."""
    return sorted(n for n in os.listdir(cache_dir) if not n.startswith(cache_module.ENTRY_PREFIX))


def cache_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "src.data.cache"]


@pytest.fixture
def et(tiny_tokenizer):
    return ExampleTokenizer(tiny_tokenizer, get_prompt_format("chatml"), 48)


@pytest.fixture
def encode_calls(monkeypatch):
    calls = []
    original = ExampleTokenizer.encode_texts

    def counting(self, texts):
        calls.append(len(texts))
        return original(self, texts)

    monkeypatch.setattr(ExampleTokenizer, "encode_texts", counting)
    return calls


def in_memory(rows, et, packing, split="train"):
    report = TokenizeReport()
    return tokenize_records(rows, et, split, report, packing=packing, batch_size=4).to_dict(), counts(report, split)


def unmask_labels(data_path):
    """Rewrite an entry's Arrow stream with every masked label (-100) set to its input id, in place: same batches,
    same schema, same ``length`` column, same file size. Returns the number of labels changed."""
    import pyarrow as pa

    with pa.OSFile(str(data_path), "rb") as source:
        reader = pa.ipc.open_stream(source)
        schema, batches = reader.schema, list(reader)
    changed, edited = 0, []
    for batch in batches:
        ids, labels = batch.column("input_ids"), batch.column("labels")
        values = labels.values.to_numpy().copy()
        masked = values == IGNORE_INDEX
        values[masked] = ids.values.to_numpy()[masked]
        changed += int(masked.sum())
        new_labels = pa.ListArray.from_arrays(labels.offsets, pa.array(values, type=labels.type.value_type))
        columns = [new_labels if name == "labels" else batch.column(name) for name in schema.names]
        edited.append(pa.record_batch(columns, schema=schema))
    size = os.path.getsize(data_path)
    with pa.OSFile(str(data_path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in edited:
            writer.write_batch(batch)
    assert os.path.getsize(data_path) == size  # the same size: only the content tells
    return changed


# -- 1. integrity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", [False, True])
def test_hand_unmasked_labels_fail_the_checksum_and_the_entry_is_rebuilt(et, tmp_path, encode_calls, caplog, packing):
    rows = records()
    expected, expected_counts = in_memory(rows, et, packing)
    first = tokenize_records(rows, et, "train", packing=packing, cache_dir=tmp_path, batch_size=4)
    assert first.to_dict() == expected
    (entry,) = entries(tmp_path)
    data = tmp_path / entry / cache_module.DATA_FILE
    del first
    assert unmask_labels(data) > 0
    # the damage keeps every count the metadata checks (rows, tokens, examples): only a checksum sees it
    encode_calls.clear()
    caplog.set_level(logging.INFO, logger="src.data.cache")
    report = TokenizeReport()
    again = tokenize_records(rows, et, "train", report, packing=packing, cache_dir=tmp_path, batch_size=4)
    assert encode_calls, "the damaged entry was used as a hit"
    assert again.to_dict() == expected and counts(report) == expected_counts
    (warning,) = cache_warnings(caplog)
    assert entry in warning and cache_module.DATA_FILE in warning and "checksum" in warning
    assert "dataset cache hit" not in caplog.text
    assert entries(tmp_path) == [entry] and leftovers(tmp_path) == []
    # the rebuilt entry is whole: the next run hits it
    encode_calls.clear()
    caplog.clear()
    report = TokenizeReport()
    hit = tokenize_records(rows, et, "train", report, packing=packing, cache_dir=tmp_path, batch_size=4)
    assert encode_calls == [] and "dataset cache hit" in caplog.text and cache_warnings(caplog) == []
    assert hit.to_dict() == expected and counts(report) == expected_counts


def test_the_metadata_checksums_every_data_file_and_is_written_last_and_atomically(et, tmp_path, monkeypatch):
    renamed = []
    original_replace = os.replace

    def watching(src, dst, *args, **kwargs):
        names = sorted(os.listdir(os.path.dirname(os.fspath(dst))))
        renamed.append((os.path.basename(os.fspath(src)), os.path.basename(os.fspath(dst)), names))
        return original_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", watching)
    tokenize_records(records(), et, "train", packing=True, cache_dir=tmp_path, batch_size=4)
    (entry,) = entries(tmp_path)
    meta = json.loads((tmp_path / entry / cache_module.META_FILE).read_text(encoding="utf-8"))
    data_files = sorted(n for n in os.listdir(tmp_path / entry) if n != cache_module.META_FILE)
    assert data_files == [cache_module.DATA_FILE]
    assert sorted(meta["files"]) == data_files
    algorithm = meta["checksum"]
    for name, recorded in meta["files"].items():
        path = tmp_path / entry / name
        assert recorded["bytes"] == path.stat().st_size
        assert recorded[algorithm] == cache_module.file_checksum(str(path), algorithm)
    # meta.json appears by a rename of a complete file, after the data files are in the folder
    (rename,) = [r for r in renamed if r[1] == cache_module.META_FILE]
    assert rename[0] != cache_module.META_FILE and cache_module.DATA_FILE in rename[2]
    assert cache_module.META_FILE not in rename[2]


@pytest.mark.parametrize("damage", ["no checksums", "unknown checksum algorithm", "one flipped byte", "listed file missing"])
def test_an_entry_that_cannot_be_verified_is_rebuilt_with_a_warning(et, tmp_path, encode_calls, caplog, damage):
    rows = records(2)
    expected, _ = in_memory(rows, et, False)
    tokenize_records(rows, et, "train", cache_dir=tmp_path, batch_size=4)
    (entry,) = entries(tmp_path)
    meta_path, data = tmp_path / entry / cache_module.META_FILE, tmp_path / entry / cache_module.DATA_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if damage == "no checksums":  # an entry written before checksums existed, or metadata edited by hand
        meta.pop("files", None)
        meta.pop("checksum", None)
        meta_path.write_text(json.dumps(meta), encoding="utf-8")
    elif damage == "unknown checksum algorithm":
        meta["checksum"] = "md4"
        meta_path.write_text(json.dumps(meta), encoding="utf-8")
    elif damage == "one flipped byte":  # a byte in the last batch's values: the Arrow reader cannot tell
        raw = bytearray(data.read_bytes())
        raw[-64] ^= 0x01
        data.write_bytes(bytes(raw))
    else:  # the metadata names a data file that is not there
        meta["files"]["extra.bin"] = {"bytes": 1, meta["checksum"]: "00"}
        meta_path.write_text(json.dumps(meta), encoding="utf-8")
    encode_calls.clear()
    caplog.set_level(logging.WARNING, logger="src.data.cache")
    rebuilt = tokenize_records(rows, et, "train", cache_dir=tmp_path, batch_size=4)
    assert encode_calls and rebuilt.to_dict() == expected
    (warning,) = cache_warnings(caplog)
    assert entry in warning and "rebuilding" in warning
    encode_calls.clear()
    assert tokenize_records(rows, et, "train", cache_dir=tmp_path, batch_size=4).to_dict() == expected
    assert encode_calls == []


def test_streamed_entries_are_checksummed_too(et, tmp_path, caplog):
    from src.data.streaming import stream_splits

    path = write_jsonl(tmp_path / "d.jsonl", [{k: v for k, v in r.items() if k != "system"} for r in records(4)[:-1]])
    cache = tmp_path / "cache"
    kwargs = dict(packing=True, validation_split_ratio=0.2, seed=1, chunk_rows=5)
    first = stream_splits(path, et, str(cache), **kwargs)
    expected = {split: first[split].to_dict() for split in ("train", "validation")}
    del first
    train_entry = os.path.join(cache, [e for e in entries(cache)
                                       if json.load(open(cache / e / cache_module.META_FILE))["split"] == "train"][0])
    assert unmask_labels(os.path.join(train_entry, cache_module.DATA_FILE)) > 0
    caplog.set_level(logging.INFO)
    again = stream_splits(path, et, str(cache), **kwargs)
    assert "dataset cache hit (streamed)" not in caplog.text
    assert any(os.path.basename(train_entry) in w and "checksum" in w for w in cache_warnings(caplog))
    assert {split: again[split].to_dict() for split in ("train", "validation")} == expected


# -- 2. a cache folder that cannot be written --------------------------------------------------------


def enospc_while_writing_arrow(monkeypatch):
    """The disk fills while the cache writes its Arrow data: each on-disk write lands, then ENOSPC."""
    original = arrow_module.ArrowSink.write

    def full(self, batch):
        original(self, batch)
        if self.path is not None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)

    monkeypatch.setattr(arrow_module.ArrowSink, "write", full)


def enospc_at_fsync(monkeypatch):
    """Delayed allocation: the writes were buffered, the full disk shows when they are flushed."""
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("where", ["arrow data", "fsync"])
def test_a_full_disk_falls_back_to_memory_and_leaves_no_entry(et, tmp_path, encode_calls, caplog, monkeypatch, where,
                                                              packing):
    rows = records()
    expected, expected_counts = in_memory(rows, et, packing)
    cache = tmp_path / "cache"
    with monkeypatch.context() as full_disk:
        (enospc_while_writing_arrow if where == "arrow data" else enospc_at_fsync)(full_disk)
        caplog.set_level(logging.INFO, logger="src.data.cache")
        report = TokenizeReport()
        dataset = tokenize_records(rows, et, "train", report, packing=packing, cache_dir=cache, batch_size=4)
        assert dataset.to_dict() == expected and counts(report) == expected_counts  # counted once
        (warning,) = cache_warnings(caplog)
        assert str(cache) in warning and "No space left on device" in warning and "dataset_cache_dir" in warning
        assert entries(cache) == [] and leftovers(cache) == []  # nothing half-written, nothing to take as a hit
        # the validation split of the same run: in memory too, without a second warning
        caplog.clear()
        report = TokenizeReport()
        tokenize_records(rows[:5], et, "validation", report, packing=packing, cache_dir=cache, batch_size=4)
        assert cache_warnings(caplog) == [] and report.examples["validation"] == 5
        assert entries(cache) == [] and leftovers(cache) == []
    # once there is room again, the cache works: built on the next miss, a hit after
    encode_calls.clear()
    assert tokenize_records(rows, et, "train", packing=packing, cache_dir=cache, batch_size=4).to_dict() == expected
    assert encode_calls and len(entries(cache)) == 1
    encode_calls.clear()
    assert tokenize_records(rows, et, "train", packing=packing, cache_dir=cache, batch_size=4).to_dict() == expected
    assert encode_calls == []


def test_a_read_only_cache_folder_still_serves_its_hits_and_tokenizes_the_rest_in_memory(et, tmp_path, encode_calls,
                                                                                       caplog, monkeypatch):
    cache = tmp_path / "cache"
    old = records(1)
    tokenize_records(old, et, "train", cache_dir=cache)
    cache.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: make the folder refuse as a read-only one does
        original = tempfile.mkdtemp

        def refusing(*args, dir=None, **kwargs):
            if dir is not None and os.path.realpath(dir) == os.path.realpath(cache):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)
            return original(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkdtemp", refusing)
    try:
        caplog.set_level(logging.INFO, logger="src.data.cache")
        encode_calls.clear()
        tokenize_records(old, et, "train", cache_dir=cache)
        assert encode_calls == [] and "dataset cache hit" in caplog.text  # reading needs no write access
        rows = records(2)
        expected, expected_counts = in_memory(rows, et, True)
        report = TokenizeReport()
        dataset = tokenize_records(rows, et, "train", report, packing=True, cache_dir=cache)
        assert dataset.to_dict() == expected and counts(report) == expected_counts
        (warning,) = cache_warnings(caplog)
        assert str(cache) in warning and "not writable" in warning and "dataset_cache_dir" in warning
        assert len(entries(cache)) == 1 and leftovers(cache) == []
    finally:
        cache.chmod(0o755)


@pytest.mark.parametrize("where", ["the folder", "a parent"])
def test_a_file_where_the_cache_folder_should_be_falls_back_to_memory_with_one_warning(et, tmp_path, caplog, where):
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder\n", encoding="utf-8")
    cache = blocker if where == "the folder" else blocker / "tokenized"
    rows = records()
    caplog.set_level(logging.INFO, logger="src.data.cache")
    for split in ("train", "validation"):
        expected, expected_counts = in_memory(rows, et, False, split)
        report = TokenizeReport()
        dataset = tokenize_records(rows, et, split, report, cache_dir=cache, batch_size=4)
        assert dataset.to_dict() == expected and counts(report, split) == expected_counts
    (warning,) = cache_warnings(caplog)  # one warning for both splits
    assert str(cache) in warning and "not a folder" in warning and "dataset_cache_dir" in warning
    assert blocker.read_text(encoding="utf-8") == "not a folder\n"


@pytest.mark.parametrize("problem", ["a file", "full", "full while packing"])
def test_streamed_data_with_a_cache_it_cannot_write_is_a_clear_error(et, tmp_path, monkeypatch, problem):
    """stream_data keeps the tokenized rows only in the cache (the data may not fit in memory): no fallback,
    but one clear error (a ValueError: one line from the command line) and nothing half-written."""
    from src.data import streaming

    path = write_jsonl(tmp_path / "d.jsonl", [{k: v for k, v in r.items() if k != "system"} for r in records(3)[:-1]])
    cache = tmp_path / "cache"
    if problem == "a file":
        cache.write_text("x", encoding="utf-8")
    elif problem == "full":  # unpacked rows go straight to the entry's Arrow file
        enospc_while_writing_arrow(monkeypatch)
    else:  # packing: the token ids and flags go to raw files first
        original = streaming._SplitWriter.add

        def full(self, chunk):
            original(self, chunk)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(streaming._SplitWriter, "add", full)
    with pytest.raises(ValueError, match="dataset_cache_dir") as caught:
        streaming.stream_splits(path, et, str(cache), packing=problem == "full while packing", validation_split_ratio=0.2,
                                seed=1, chunk_rows=5)
    assert str(cache) in str(caught.value) and "stream_data" in str(caught.value)
    assert ("not a folder" if problem == "a file" else "No space left on device") in str(caught.value)
    if problem != "a file":
        assert entries(cache) == [] and leftovers(cache) == []


# -- under torchrun: the main process first, then the others ------------------------------------------

TWO_RANKS = """
import errno, json, logging, os, sys
sys.path.insert(0, {root!r})
from src.data import arrow as arrow_module
from src.data import cache as cache_module
from src.distributed import exit_rank, rank
from src.training.sft_trainer import SFTTrainer
from tests.helpers import make_config

warnings = []
class Keep(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING and record.name == "src.data.cache":
            warnings.append(record.getMessage())
logging.getLogger("src.data.cache").addHandler(Keep())
logging.getLogger("src").setLevel(logging.WARNING)  # every rank's warnings (the library's default: the main rank's only)
if {problem!r} == "full":
    original = arrow_module.ArrowSink.write
    def full(self, batch):
        original(self, batch)
        if self.path is not None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
    arrow_module.ArrowSink.write = full
config = make_config({model!r}, {data!r}, {out!r}, dataset_cache_dir={cache!r}, packing=True)
trainer = SFTTrainer(config)
trainer.setup_model()
rows = json.load(open({rows!r}, encoding="utf-8"))
result = {{split: trainer.tokenize_split(rows, split).to_dict() for split in ("train", "validation")}}
with open(os.path.join({out!r}, f"rank{{rank()}}.json"), "w", encoding="utf-8") as fh:
    json.dump({{"data": result, "warnings": warnings, "report": trainer.tokenize_report.summary()}}, fh)
exit_rank(0)
"""


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["a file", "full"])
def test_two_ranks_with_an_unusable_cache_each_tokenize_in_memory(tiny_model_dir, tmp_path, problem):
    import socket

    import torch

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    from transformers import AutoTokenizer

    from src.data.wiring import example_tokenizer_for
    from tests.helpers import make_config

    cache = tmp_path / "cache"
    if problem == "a file":
        cache.write_text("x", encoding="utf-8")
    rows = records(2)
    (tmp_path / "rows.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(root=ROOT, problem=problem, model=tiny_model_dir, data=data, out=str(tmp_path),
                                       cache=str(cache), rows=str(tmp_path / "rows.json")), encoding="utf-8")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(port), str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]
    config = make_config(tiny_model_dir, data, tmp_path, packing=True, dataset_cache_dir=None)
    et = example_tokenizer_for(config, AutoTokenizer.from_pretrained(tiny_model_dir))
    expected = {split: in_memory(rows, et, True, split)[0] for split in ("train", "validation")}
    for r in ranks:
        assert r["data"] == expected
        assert len(r["warnings"]) == 1 and str(cache) in r["warnings"][0]  # each rank: one warning, then trains on
    assert ranks[0]["report"] == ranks[1]["report"]
    if problem == "full":
        assert entries(cache) == [] and leftovers(cache) == []
