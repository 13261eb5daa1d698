import dataclasses

import pytest
import yaml

from src.cli.args import load_config, parse_config
from src.config import SFTConfig
from src.training.training_args import TrainingArgumentsMismatch, training_arguments_kwargs


def test_defaults_match_the_specification():
    c = SFTConfig()
    assert c.instruction_template == "alpaca"
    assert c.resolved_response_template == "### Response:\n"
    assert c.max_seq_length == 512
    assert c.lora_target_modules == ["q_proj", "v_proj", "k_proj", "o_proj"]
    assert c.gradient_checkpointing and c.group_by_length and c.dataloader_drop_last
    assert c.trust_remote_code is False
    assert SFTConfig(instruction_template="chatml").resolved_response_template == "<|im_start|>assistant\n"
    custom = SFTConfig(instruction_template="custom", custom_template="User: {instruction}\nAssistant: ")
    assert custom.resolved_response_template == "\nAssistant: "


def test_every_spec_field_exists():
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    spec = """model_name dataset_path output_dir packing instruction_template custom_template response_template
    max_seq_length learning_rate num_train_epochs per_device_train_batch_size gradient_accumulation_steps warmup_ratio
    gradient_checkpointing group_by_length dataloader_drop_last dataloader_num_workers dataloader_pin_memory bf16
    use_lora lora_r lora_alpha lora_dropout lora_target_modules evaluation_strategy eval_steps save_steps
    load_best_model_at_end report_to run_name ddp_find_unused_parameters ddp_backend deepspeed""".split()
    assert set(spec) <= names, set(spec) - names


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"instruction_template": "vicuna"}, "instruction_template"),
        ({"instruction_template": "custom"}, "custom_template"),
        ({"instruction_template": "custom", "custom_template": "Q: {question}"}, "custom_template"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"learning_rate": -1e-4}, "learning_rate"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ({"gradient_accumulation_steps": -2}, "gradient_accumulation_steps"),
        ({"max_seq_length": 0}, "max_seq_length"),
        ({"num_train_epochs": 0}, "num_train_epochs"),
        ({"lora_r": 0}, "lora_r"),
        ({"lora_r": 4, "lora_alpha": 1024}, "lora_alpha"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"dataset_path": "data/does_not_exist.jsonl"}, "dataset_path"),
        ({"dataset_path": "data/file.parquet"}, "dataset_path"),
        ({"evaluation_strategy": "sometimes"}, "evaluation_strategy"),
        ({"overlong_policy": "ignore"}, "overlong_policy"),
        ({"load_best_model_at_end": True, "evaluation_strategy": "no"}, "load_best_model_at_end"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SFTConfig(**kwargs)


def test_training_arguments_translation_to_installed_transformers():
    from transformers import TrainingArguments

    c = SFTConfig(evaluation_strategy="steps", eval_steps=7, warmup_ratio=0.1, packing=False, group_by_length=True)
    args = TrainingArguments(**training_arguments_kwargs(c))
    assert str(args.eval_strategy.value if hasattr(args.eval_strategy, "value") else args.eval_strategy) == "steps"
    assert args.eval_steps == 7
    assert args.label_names == ["labels"]
    assert args.remove_unused_columns is True
    assert args.dataloader_drop_last is True
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in names:
        assert args.train_sampling_strategy == "group_by_length"
        ungrouped = TrainingArguments(**training_arguments_kwargs(SFTConfig(group_by_length=False)))
        assert ungrouped.train_sampling_strategy == "random"
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    assert getattr(args, checkpointing) is True


def test_yaml_then_command_line_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"max_seq_length": 128, "packing": True, "learning_rate": 1e-4}))
    c = parse_config(SFTConfig, ["--config", str(path), "--max_seq_length", "256", "--lora_target_modules", "q_proj", "v_proj"])
    assert c.max_seq_length == 256  # flag wins over the file
    assert c.packing is True and c.learning_rate == 1e-4  # file wins over the default
    assert c.lora_target_modules == ["q_proj", "v_proj"]
    assert load_config(SFTConfig, str(path)).max_seq_length == 128


def test_yaml_with_unknown_field_is_rejected(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_seq_lenght: 128\n")
    with pytest.raises(ValueError, match="max_seq_lenght"):
        load_config(SFTConfig, str(path))
    with pytest.raises(ValueError, match="max_seq_lenght"):
        parse_config(SFTConfig, ["--config", str(path)])


def test_command_line_values_are_validated():
    with pytest.raises(ValueError, match="max_seq_length"):
        parse_config(SFTConfig, ["--max_seq_length", "0"])


def test_yaml_scientific_notation_and_string_numbers(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 2e-4\nwarmup_ratio: 0.1\n", encoding="utf-8")  # YAML 1.1 reads 2e-4 as a string
    assert load_config(SFTConfig, str(path)).learning_rate == 2e-4
    with pytest.raises(ValueError, match="warmup_ratio"):
        SFTConfig(warmup_ratio="0.1")


def test_yaml_1_1_quirks_and_none_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("evaluation_strategy: no\nlora_target_modules: q_proj\nsystem_prompt: أنت مساعد\n", encoding="utf-8")
    c = parse_config(SFTConfig, ["--config", str(path), "--system_prompt", "None", "--arabic_remove_diacritics", "--packing"])
    assert c.evaluation_strategy == "no"  # YAML read the bare `no` as False
    assert c.lora_target_modules == ["q_proj"]
    assert c.system_prompt is None  # `--field None` means None, not the string "None"
    assert c.arabic_remove_diacritics is True and c.packing is True  # bare optional-bool flag means true
    with pytest.raises(ValueError, match="lora_target_modules"):
        SFTConfig(lora_target_modules="q_proj")


def test_flag_spellings_and_yaml_booleans(tmp_path):
    c = parse_config(SFTConfig, ["--system_prompt=None", "--eval-steps", "None", "--arabic-nfc", "--pad_to_multiple_of=None"])
    assert c.system_prompt is None and c.eval_steps is None and c.arabic_nfc is True and c.pad_to_multiple_of is None
    path = tmp_path / "run.yaml"
    path.write_text("report_to: false\n", encoding="utf-8")
    assert load_config(SFTConfig, str(path)).report_to == "none"
    path.write_text("system_prompt: Yes\n", encoding="utf-8")
    with pytest.raises(ValueError, match="system_prompt: YAML read True"):
        load_config(SFTConfig, str(path))
    with pytest.raises(ValueError, match="--config given 2 times"):
        parse_config(SFTConfig, ["--config", str(path), "--config", str(path)])


def test_translation_is_pinned_to_the_installed_transformers():
    """Every key the translation produces is a field of the installed TrainingArguments, each renamed field
    lands where transformers reads it, and a key it lacks is an error naming the key (never dropped)."""
    from transformers import TrainingArguments

    import src.training.training_args as ta

    config = SFTConfig(evaluation_strategy="steps", eval_steps=3, warmup_ratio=0.25, gradient_checkpointing=True,
                       group_by_length=False, learning_rate=1e-3, per_device_train_batch_size=3)
    kwargs = training_arguments_kwargs(config)
    accepted = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert set(kwargs) <= accepted
    args = TrainingArguments(**kwargs)
    assert (args.learning_rate, args.per_device_train_batch_size, args.eval_steps) == (1e-3, 3, 3)
    assert args.warmup_steps == 0.25
    assert args.train_sampling_strategy == "random"
    checkpointing = ta.installed_name("gradient_checkpointing", accepted)
    assert getattr(args, checkpointing) is True and getattr(args, checkpointing + "_kwargs") == {"use_reentrant": False}
    # environment decisions come from the trainer and override the config
    assert training_arguments_kwargs(config, {"use_cpu": True})["use_cpu"] is True
    # a renamed or removed field fails loudly
    original = ta.RENAMES["evaluation_strategy"]
    ta.RENAMES["evaluation_strategy"] = ("evaluation_strategy_removed",)
    try:
        with pytest.raises(TrainingArgumentsMismatch, match="evaluation_strategy_removed"):
            training_arguments_kwargs(config)
    finally:
        ta.RENAMES["evaluation_strategy"] = original
    with pytest.raises(TrainingArgumentsMismatch, match="no_such_argument"):
        training_arguments_kwargs(config, {"no_such_argument": 1})
