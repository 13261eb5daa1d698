"""Data sources beyond JSONL/CSV/JSON: parquet files, folders saved by datasets, hub ids (offline: a clear error)."""

import pytest

from src.config import SFTConfig
from src.data.loading import DatasetError, load_records
from tests.helpers import PAIRS, write_jsonl


def test_parquet_and_saved_dataset_folders_load_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    table = pa.Table.from_pylist(PAIRS)
    pq.write_table(table, str(tmp_path / "d.parquet"))
    records, _ = load_records(str(tmp_path / "d.parquet"), validation_split_ratio=0)
    from_jsonl, _ = load_records(write_jsonl(tmp_path / "d.jsonl", PAIRS), validation_split_ratio=0)
    assert records["train"] == from_jsonl["train"] and len(records["train"]) == len(PAIRS)
    DatasetDict({"train": Dataset.from_list(PAIRS[:6]), "validation": Dataset.from_list(PAIRS[6:])}).save_to_disk(
        str(tmp_path / "saved"))
    records, _ = load_records(str(tmp_path / "saved"))
    assert [r["instruction"] for r in records["train"]] == [p["instruction"] for p in PAIRS[:6]]
    assert [r["instruction"] for r in records["validation"]] == [p["instruction"] for p in PAIRS[6:]]
    assert SFTConfig(dataset_path=str(tmp_path / "d.parquet")).dataset_path.endswith(".parquet")


def test_bad_rows_in_parquet_name_the_file_and_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(p) for p in PAIRS[:3]]
    rows[1]["response"] = "   "
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "bad.parquet"))
    with pytest.raises(DatasetError, match=r"bad.parquet, row 1, field 'response'"):
        load_records(str(tmp_path / "bad.parquet"), validation_split_ratio=0)


def test_a_hub_dataset_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert SFTConfig(dataset_path="someone/arabic-instructions").dataset_path == "someone/arabic-instructions"
    with pytest.raises(DatasetError, match=r"hub dataset 'someone/arabic-instructions' could not be loaded \(offline"):
        load_records("someone/arabic-instructions")
    with pytest.raises(ValueError, match="SFTConfig.dataset_path"):
        SFTConfig(dataset_path="data.txt")  # neither a file type we read, nor a folder, nor an org/name id
