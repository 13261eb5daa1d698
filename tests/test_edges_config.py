"""Edges of the run configuration: values that cannot work, YAML files that do not say what they seem to say,
text that shows nothing, and model names that can only be local paths.

Every one is a user error: ``ValueError`` naming the field (Python API), or from the command line exit status 2
and one line on stderr naming the file, key or flag, never a traceback or an argparse usage dump.
"""

from __future__ import annotations

import socket
import time
import unicodedata

import pytest

import train_sft
from src.cli.args import load_config, parse_config
from src.config import SFTConfig
from src.data.loading import DatasetError, load_records
from src.data.normalization import PRESETS
from src.data.records import is_blank, visible_text
from src.models.loading import ModelLoadError, resolve_model_path
from tests.helpers import PAIRS, write_jsonl


def _main_error(capsys, argv):
    """Run the command line; return (exit code, last stderr line), checking it printed no traceback or usage."""
    code = train_sft.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err, err[-2000:]
    lines = err.strip().splitlines()
    return code, (lines[-1] if lines else "")


# -- 1. config values: strict types, finite (float32) numbers, clear bounds -------------------------------------------

INTEGER_FIELDS = ("seed", "max_steps", "eval_steps", "save_steps", "save_total_limit", "logging_steps",
                  "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "lora_r",
                  "lora_alpha", "max_seq_length", "pad_to_multiple_of", "dataloader_num_workers",
                  "early_stopping_patience", "eval_generation_samples", "eval_generation_max_length", "loss_chunk_size")
FLOAT_FIELDS = ("learning_rate", "num_train_epochs", "warmup_ratio", "weight_decay", "max_grad_norm", "lora_dropout",
                "early_stopping_threshold", "neftune_noise_alpha", "validation_split_ratio", "router_aux_loss_coef")


@pytest.mark.parametrize("name", INTEGER_FIELDS)
@pytest.mark.parametrize("value", [1.5, 2.0, True, "4"])
def test_integer_fields_take_integers_only(name, value):
    with pytest.raises(ValueError, match=rf"SFTConfig\.{name}\b"):
        SFTConfig(**{name: value})


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e39, -1e39, True, "0.1"])
def test_float_fields_take_finite_float32_numbers_only(name, value):
    # 1e39 is finite in Python but not in float32: every weight would be inf after the first update
    with pytest.raises(ValueError, match=rf"SFTConfig\.{name}\b"):
        SFTConfig(**{name: value})


@pytest.mark.parametrize("kwargs, field, words", [
    ({"save_total_limit": 0}, "save_total_limit", "None or a positive integer"),  # 0 and -1 kept every checkpoint
    ({"save_total_limit": -1}, "save_total_limit", "None or a positive integer"),
    ({"learning_rate": 11}, "learning_rate", "at most 10"),
    ({"learning_rate": 1e-50}, "learning_rate", "float32"),  # 0 in float32: nothing would train
    ({"seed": -1}, "seed", "2\\*\\*32"),  # numpy's seed range (transformers.set_seed seeds numpy)
    ({"seed": 2 ** 32}, "seed", "2\\*\\*32"),
    ({"max_steps": -5}, "max_steps", "-1"),
    ({"max_grad_norm": -1.0}, "max_grad_norm", "non-negative"),
    ({"eval_steps": 0}, "eval_steps", "positive"),
    ({"neftune_noise_alpha": 0}, "neftune_noise_alpha", "positive"),
])
def test_values_outside_their_bounds_name_the_field_and_the_bound(kwargs, field, words):
    with pytest.raises(ValueError, match=rf"SFTConfig\.{field}\b.*{words}"):
        SFTConfig(**kwargs)


def test_values_at_the_bounds_are_accepted():
    c = SFTConfig(learning_rate=10, num_train_epochs=1, seed=0, save_total_limit=None, max_grad_norm=0,
                  router_aux_loss_coef=0, neftune_noise_alpha=5.0, early_stopping_threshold=0.0, weight_decay=0.1)
    assert (c.learning_rate, c.seed, c.save_total_limit, c.max_grad_norm) == (10, 0, None, 0)
    assert SFTConfig(seed=2 ** 32 - 1, save_total_limit=1, num_train_epochs=2.5, max_steps=-1).seed == 2 ** 32 - 1


@pytest.mark.parametrize("yaml_line, field", [
    ("seed: 1.5", "seed"),
    ("num_train_epochs: .inf", "num_train_epochs"),
    ("max_grad_norm: .nan", "max_grad_norm"),
    ("save_total_limit: 0", "save_total_limit"),
    ("learning_rate: 1e39", "learning_rate"),
    ("eval_steps: 2.5", "eval_steps"),
])
def test_bad_yaml_values_exit_2_naming_the_field(tmp_path, capsys, yaml_line, field):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    config = tmp_path / "run.yaml"
    config.write_text(f"dataset_path: {data}\noutput_dir: {tmp_path / 'o'}\nmodel_name: ./no/such/model\n{yaml_line}\n",
                      encoding="utf-8")
    code, line = _main_error(capsys, ["--config", str(config)])
    assert code == 2 and f"SFTConfig.{field}" in line, line
    assert "run.yaml" in line and "line 4" in line  # where the value came from


# -- 2. a value of the wrong type: one line naming the file and key (or the flag) --------------------------------------

@pytest.mark.parametrize("yaml_line, key", [
    ("per_device_train_batch_size: four", "per_device_train_batch_size"),
    ("learning_rate: fast", "learning_rate"),
    ("packing: maybe", "packing"),
    ("eval_steps: some", "eval_steps"),
])
def test_a_yaml_value_of_the_wrong_type_is_one_line_naming_file_and_key(tmp_path, capsys, yaml_line, key):
    config = tmp_path / "run.yaml"
    config.write_text(f"max_seq_length: 128\n{yaml_line}\n", encoding="utf-8")
    code, line = _main_error(capsys, ["--config", str(config)])
    assert code == 2 and "run.yaml" in line and key in line and "line 2" in line, line
    with pytest.raises(ValueError, match=rf"run\.yaml.*{key}"):
        load_config(SFTConfig, str(config))


def test_a_flag_value_of_the_wrong_type_is_one_line_naming_the_flag(capsys):
    code, line = _main_error(capsys, ["--per_device_train_batch_size", "four"])
    assert code == 2 and "--per_device_train_batch_size" in line and "'four'" in line, line
    code, line = _main_error(capsys, ["--seed", "1.5"])
    assert code == 2 and "--seed" in line, line
    code, line = _main_error(capsys, ["--config"])  # a flag without its value
    assert code == 2 and "--config" in line, line


def test_a_flag_overrides_a_bad_yaml_value_and_its_own_error_names_no_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("max_seq_length: 128\nseed: 1.5\n", encoding="utf-8")
    assert parse_config(SFTConfig, ["--config", str(config), "--seed", "3"]).seed == 3
    with pytest.raises(ValueError, match=r"^SFTConfig\.seed=-1 is invalid"):
        parse_config(SFTConfig, ["--config", str(config), "--seed", "-1"])
    with pytest.raises(ValueError, match=r"run\.yaml, line 2: SFTConfig\.seed=1\.5 is invalid: expected an integer"):
        load_config(SFTConfig, str(config))


def test_yaml_none_and_null_mean_none_for_optional_fields(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("eval_steps: None\nsave_total_limit: null\nnum_train_epochs: '2'\n", encoding="utf-8")
    c = load_config(SFTConfig, str(config))
    assert c.eval_steps is None and c.save_total_limit is None and c.num_train_epochs == 2


# -- 3. a key given twice in one YAML file ----------------------------------------------------------------------------

def test_a_key_given_twice_is_refused_with_both_lines(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 2e-4\nmax_seq_length: 128\n\nlearning_rate: 1e-5\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"run\.yaml: key 'learning_rate' is given twice \(lines 1 and 4\)"):
        load_config(SFTConfig, str(config))
    code, line = _main_error(capsys, ["--config", str(config)])
    assert code == 2 and "run.yaml" in line and "'learning_rate'" in line and "lines 1 and 4" in line, line


def test_a_key_given_twice_inside_a_nested_mapping_is_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("datasets:\n  - path: a.jsonl\n    weight: 1\n    weight: 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"run\.yaml: key 'weight' is given twice \(lines 3 and 4\)"):
        load_config(SFTConfig, str(config))


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    import yaml

    from src.cli.args import read_yaml

    config = tmp_path / "run.yaml"
    config.write_text("base: &b {a: 1, b: 2}\nrun:\n  <<: *b\n  b: 3\n", encoding="utf-8")
    values, lines = read_yaml(str(config))
    assert values["run"] == {"a": 1, "b": 3} and lines == {"base": 1, "run": 2}
    assert yaml.safe_load(config.read_text()) == values  # the same values as YAML's own loader


# -- 4. text that shows nothing -------------------------------------------------------------------------------------

# Code points whose Prepended_Concatenation_Mark property makes them visible although they are format characters (Cf)
PREPENDED_CONCATENATION_MARKS = {*range(0x600, 0x606), 0x6DD, 0x70F, 0x890, 0x891, 0x8E2, 0x110BD, 0x110CD}


@pytest.mark.parametrize("char", ["\u034f", "\u115f", "\u1160", "\u3164", "\uffa0",  # the reported ones
                                  "\u00ad", "\u17b4", "\u180e", "\ufe0f", "\u2064", "\U000e0020", "\U000e0100",
                                  "\U0001d173", "\ufff9", "\u2800"])
def test_invisible_characters_alone_are_an_empty_value(char):
    rows = [PAIRS[0], {**PAIRS[1], "instruction": f" {char}{char}\u200b "}]
    with pytest.raises(DatasetError, match=rf"row 1, field 'instruction': value is empty.*U\+{ord(char):04X}"):
        load_records({"train": rows})
    records, report = load_records({"train": rows}, skip_invalid=True, validation_split_ratio=0)
    assert len(records["train"]) == 1 and report.skipped == {"empty value": 1}
    for preset in PRESETS.values():
        assert is_blank(preset(char))


def test_every_format_and_default_ignorable_code_point_is_invisible():
    """The class, not a list: every format character (Cf) but the visible prepended concatenation marks, and every
    Default_Ignorable_Code_Point (the Unicode property, from the regex module that transformers installs)."""
    cf = [c for c in range(0x110000) if unicodedata.category(chr(c)) == "Cf" and c not in PREPENDED_CONCATENATION_MARKS]
    assert [f"U+{c:04X}" for c in cf if not is_blank(chr(c))] == []
    regex = pytest.importorskip("regex")
    ignorable = regex.compile(r"\p{Default_Ignorable_Code_Point}")
    di = [c for c in range(0x110000) if ignorable.match(chr(c))]
    assert len(di) > 4000 and [f"U+{c:04X}" for c in di if not is_blank(chr(c))] == []
    assert all(visible_text(f"a{chr(c)}b") == "ab" for c in di)


@pytest.mark.parametrize("text", ["\u0600", "\u06dd", "a", "\u0627", "\u064e", "\U0001f600", "\u200d\U0001f600\ufe0f"])
def test_visible_text_is_not_blank(text):
    assert not is_blank(text) and visible_text(text)


# -- 6. model names that can only be local paths fail at once; offline, an uncached hub id too ------------------------

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", ["mdels/my-run/final", "./x", "../x/y", "~/no-such-model", "/no/such/model",
                                  "my model", "org/na me", "org/name/", "نماذج/نهائي", "C:\\models\\run", "org/-name",
                                  "org/na--me", "org/na..me", "org/name.git", "a" * 97])
def test_a_name_that_cannot_be_a_hub_id_fails_at_once(tmp_path, monkeypatch, no_network, name):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(name, str(tmp_path / "o"))
    assert time.monotonic() - start < 1


def test_the_message_names_the_missing_folder(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"'mdels/my-run/final' does not exist \(no folder 'mdels'"):
        resolve_model_path("mdels/my-run/final", str(tmp_path / "o"))
    with pytest.raises(ModelLoadError, match=r"'models/my-run/final' does not exist \(no folder 'my-run' in 'models'"):
        resolve_model_path("models/my-run/final", str(tmp_path / "o"))


def _fake_cached_model(cache, repo_id):
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (folder / "snapshots" / ("0" * 40) / "config.json").write_text("{}")


def test_offline_a_hub_id_not_in_the_cache_fails_at_once(tmp_path, monkeypatch, no_network):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"'someone/not-cached' is not in the hub cache.*HF_HUB_OFFLINE=1"):
        resolve_model_path("someone/not-cached", str(tmp_path / "o"))
    _fake_cached_model(tmp_path / "hub", "someone/cached")
    assert resolve_model_path("someone/cached", str(tmp_path / "o")) == "someone/cached"
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online, a hub id stays one (downloaded by from_pretrained)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read by the library at import
    assert resolve_model_path("Qwen/Qwen2.5-7B", str(tmp_path / "o")) == "Qwen/Qwen2.5-7B"
    assert resolve_model_path("gpt2", str(tmp_path / "o")) == "gpt2"


def test_offline_an_uncached_hub_id_from_the_command_line_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    code, line = _main_error(capsys, ["--model_name", "someone/not-cached", "--dataset_path", data,
                                      "--output_dir", str(tmp_path / "o"), "--validation_split_ratio", "0"])
    assert code == 2 and "someone/not-cached" in line and "HF_HUB_OFFLINE=1" in line, line
