"""Run configuration: one dataclass, validated on construction, loadable from YAML.

Field names are the specification's (``evaluation_strategy``, ``group_by_length``,
``gradient_checkpointing`` ...), even where transformers 5 renamed them;
:meth:`SFTConfig.to_training_arguments_kwargs` is the single place that translates them to the
names of the installed transformers version.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from src.data.templates import TEMPLATE_NAMES, default_response_template

DATA_FILE_EXTENSIONS = (".jsonl", ".json", ".csv")
TINY_MODEL_PREFIX = "local:"
OVERLONG_POLICIES = ("truncate", "drop", "error")
EVAL_STRATEGIES = ("no", "steps", "epoch")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class BaseConfig:
    """Settings shared by every training method (model, data, optimisation, LoRA, logging, launch)."""

    # --- model and data -------------------------------------------------------------------------
    model_name: str = _help(
        "Hub id (e.g. 'Qwen/Qwen2.5-7B'), a local model directory, or 'local:tiny-qwen2' for a tiny "
        "random-init Qwen2-architecture model built offline (see src/models/tiny.py).",
        default="Qwen/Qwen2.5-7B",
    )
    tokenizer_name: Optional[str] = _help(
        "Load the tokenizer from here instead of model_name (a hub id or a directory with tokenizer files).", default=None
    )
    dataset_path: Optional[str] = _help(
        "Training data: a .jsonl, .csv or .json file (the JSON file may hold {'train': [...], "
        "'validation': [...]}). May be None when a datasets.Dataset is passed to create_trainer directly.",
        default=None,
    )
    eval_dataset_path: Optional[str] = _help(
        "Optional separate validation file (same formats). Without it, a validation split from the "
        "data file is used, or validation_split_ratio of the training rows is held out (seeded).",
        default=None,
    )
    output_dir: str = _help("Where checkpoints, the final model and sft_metadata.json go.", default="./checkpoints/sft")
    overwrite_output_dir: bool = _help(
        "Allow saving the final model into a directory that already holds files. Off: refuse rather than "
        "overwrite a user's files.",
        default=False,
    )
    trust_remote_code: bool = _help("Run model/tokenizer code from the hub. Off unless you trust the repo.", default=False)
    attn_implementation: Optional[str] = _help(
        "'sdpa', 'eager' or 'flash_attention_2'; None picks flash_attention_2 when installed on CUDA, else sdpa.",
        default=None,
    )
    validation_split_ratio: float = _help(
        "Share of training rows held out for validation when the data has no validation split (0 disables).",
        default=0.1,
    )
    skip_invalid_rows: bool = _help(
        "Skip (and count) rows with missing/empty/non-string fields instead of raising an error.", default=False
    )

    # --- optimisation -----------------------------------------------------------------------------
    learning_rate: float = _help("Peak learning rate.", default=2e-4)
    num_train_epochs: float = _help("Training epochs.", default=3)
    max_steps: int = _help("If > 0, total optimizer steps (overrides num_train_epochs).", default=-1)
    per_device_train_batch_size: int = _help("Micro-batch size per device (rows; packed rows when packing).", default=4)
    per_device_eval_batch_size: int = _help("Evaluation batch size per device.", default=4)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    warmup_ratio: float = _help("Share of total steps for linear warm-up, in [0, 1).", default=0.03)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    lr_scheduler_type: str = _help("Learning-rate schedule (transformers SchedulerType).", default="cosine")
    max_grad_norm: float = _help("Gradient clipping norm (0 disables clipping).", default=1.0)
    optim: str = _help("Optimizer name understood by transformers ('adamw_torch', 'sgd', 'adafactor', ...).",
                       default="adamw_torch")
    seed: int = _help("Seed for model init, shuffling and the validation hold-out.", default=42)
    gradient_checkpointing: bool = _help("Recompute activations in backward to save memory.", default=True)
    group_by_length: bool = _help("Batch rows of similar length together (examples, or packed rows when packing).",
                                  default=True)
    dataloader_drop_last: bool = _help(
        "Drop the last incomplete batch of each epoch (the count of dropped rows is logged).", default=True
    )
    dataloader_num_workers: int = _help("DataLoader worker processes.", default=0)
    dataloader_pin_memory: bool = _help("Pin host memory for faster host-to-GPU copies.", default=True)
    bf16: bool = _help("bfloat16 mixed precision (needs hardware support; a clear error otherwise).", default=False)

    # --- LoRA -------------------------------------------------------------------------------------
    use_lora: bool = _help("Train LoRA adapters (peft) instead of all weights.", default=True)
    lora_r: int = _help("LoRA rank.", default=16)
    lora_alpha: int = _help("LoRA scaling numerator (scale = lora_alpha / lora_r).", default=32)
    lora_dropout: float = _help("Dropout on the LoRA path, in [0, 1).", default=0.1)
    lora_target_modules: list[str] = _help(
        "Module names that get adapters.", default_factory=lambda: ["q_proj", "v_proj", "k_proj", "o_proj"]
    )

    resume_from_checkpoint: Optional[str] = _help(
        "Continue an interrupted run: a checkpoint directory, or 'last' for the newest checkpoint-* in output_dir.",
        default=None,
    )

    # --- evaluation, saving, logging ----------------------------------------------------------------
    evaluation_strategy: str = _help("'no', 'steps' or 'epoch' (translated to eval_strategy).", default="epoch")
    eval_steps: Optional[int] = _help("Steps between evaluations when evaluation_strategy='steps'.", default=None)
    save_steps: int = _help("Steps between checkpoints.", default=500)
    save_total_limit: Optional[int] = _help("Keep at most this many checkpoints.", default=2)
    load_best_model_at_end: bool = _help("Reload the checkpoint with the lowest eval_loss at the end.", default=False)
    logging_steps: int = _help("Steps between training-loss log lines.", default=10)
    report_to: str = _help("'none', 'wandb', 'tensorboard', ... (comma-separated for several).", default="none")
    run_name: Optional[str] = _help("Run name for trackers.", default=None)

    # --- distributed ------------------------------------------------------------------------------
    ddp_find_unused_parameters: Optional[bool] = _help("Passed to DistributedDataParallel.", default=None)
    ddp_backend: Optional[str] = _help("'nccl', 'gloo', ... (None lets torch choose).", default=None)
    deepspeed: Optional[str] = _help("Path to a DeepSpeed JSON config (e.g. configs/deepspeed_zero2.json).", default=None)

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ----------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field whose value cannot work."""

        def bad(name: str, expected: str) -> None:
            raise ValueError(f"SFTConfig.{name}={getattr(self, name)!r} is invalid: expected {expected}.")

        if not isinstance(self.model_name, str) or not self.model_name.strip():
            bad("model_name", "a hub id, a local model directory or 'local:tiny-qwen2'")
        for name in ("dataset_path", "eval_dataset_path"):
            path = getattr(self, name)
            if path is None:
                continue
            if not isinstance(path, str) or not path.strip():
                bad(name, "a path to a .jsonl, .csv or .json file")
            if not path.lower().endswith(DATA_FILE_EXTENSIONS):
                bad(name, f"a file ending in one of {DATA_FILE_EXTENSIONS}")
            if not os.path.isfile(path):
                raise ValueError(f"SFTConfig.{name}: data file {path!r} does not exist (looked in {os.getcwd()}).")
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            bad("output_dir", "a directory path")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "save_steps", "logging_steps", "lora_r", "lora_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                bad(name, "a positive integer")
        for name in ("learning_rate", "num_train_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                bad(name, "a positive number")
        for name in ("warmup_ratio", "validation_split_ratio", "lora_dropout", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                bad(name, "a number")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps == 0:
            bad("max_steps", "-1 (use num_train_epochs) or a positive integer")
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", "a number in [0, 1)")
        if not 0 <= self.validation_split_ratio < 1:
            bad("validation_split_ratio", "a number in [0, 1)")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "a number in [0, 1)")
        if self.max_grad_norm < 0:
            bad("max_grad_norm", "a non-negative number (0 disables clipping)")
        if self.weight_decay < 0:
            bad("weight_decay", "a non-negative number")
        if self.dataloader_num_workers < 0:
            bad("dataloader_num_workers", "a non-negative integer")
        if self.use_lora:
            if (not isinstance(self.lora_target_modules, (list, tuple)) or not self.lora_target_modules
                    or not all(isinstance(m, str) and m for m in self.lora_target_modules)):
                bad("lora_target_modules", "a non-empty list of module names such as ['q_proj', 'v_proj']")
            if self.lora_alpha / self.lora_r > 16:
                bad("lora_alpha", f"at most 16 x lora_r ({16 * self.lora_r}); a scale of lora_alpha/lora_r > 16 "
                    "makes LoRA updates explode")
        if self.evaluation_strategy not in EVAL_STRATEGIES:
            bad("evaluation_strategy", f"one of {EVAL_STRATEGIES}")
        if self.evaluation_strategy == "steps" and self.eval_steps is not None and self.eval_steps <= 0:
            bad("eval_steps", "a positive integer")
        if self.load_best_model_at_end and self.evaluation_strategy == "no":
            bad("load_best_model_at_end", "False when evaluation_strategy='no' (there is nothing to compare)")
        if self.attn_implementation not in (None, "sdpa", "eager", "flash_attention_2"):
            bad("attn_implementation", "None, 'sdpa', 'eager' or 'flash_attention_2'")
        if self.deepspeed is not None and not os.path.isfile(self.deepspeed):
            raise ValueError(f"SFTConfig.deepspeed: config file {self.deepspeed!r} does not exist.")

    # -- translation to transformers ------------------------------------------------------------------
    def to_training_arguments_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the installed ``transformers.TrainingArguments``.

        The one place that knows the transformers 5 renames: ``evaluation_strategy`` -> ``eval_strategy``,
        ``group_by_length`` -> ``train_sampling_strategy='group_by_length'``, ``gradient_checkpointing``
        -> ``activation_checkpointing``, ``warmup_ratio`` -> fractional ``warmup_steps``.
        """
        from transformers import TrainingArguments

        accepted = {f.name for f in dataclasses.fields(TrainingArguments)}
        eval_strategy = self.evaluation_strategy
        kwargs: dict[str, Any] = dict(
            output_dir=self.output_dir,
            learning_rate=self.learning_rate,
            num_train_epochs=self.num_train_epochs,
            max_steps=self.max_steps,
            per_device_train_batch_size=self.per_device_train_batch_size,
            per_device_eval_batch_size=self.per_device_eval_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            weight_decay=self.weight_decay,
            lr_scheduler_type=self.lr_scheduler_type,
            max_grad_norm=self.max_grad_norm,
            optim=self.optim,
            seed=self.seed,
            data_seed=self.seed,
            dataloader_drop_last=self.dataloader_drop_last,
            dataloader_num_workers=self.dataloader_num_workers,
            dataloader_pin_memory=self.dataloader_pin_memory and _cuda_available(),  # pinning only helps host->GPU copies
            bf16=self.bf16,
            save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            load_best_model_at_end=self.load_best_model_at_end,
            logging_steps=self.logging_steps,
            report_to=[r.strip() for r in self.report_to.split(",")] if self.report_to else "none",
            run_name=self.run_name,
            ddp_find_unused_parameters=self.ddp_find_unused_parameters,
            ddp_backend=self.ddp_backend,
            deepspeed=self.deepspeed,
            label_names=["labels"],
            remove_unused_columns=True,
        )
        if self.load_best_model_at_end:
            # transformers requires matching save and eval schedules for load_best_model_at_end.
            kwargs["save_strategy"] = eval_strategy
            kwargs["metric_for_best_model"] = "eval_loss"
            kwargs["greater_is_better"] = False
        if eval_strategy == "steps":
            kwargs["eval_steps"] = self.eval_steps or self.save_steps
        kwargs["eval_strategy" if "eval_strategy" in accepted else "evaluation_strategy"] = eval_strategy
        kwargs["warmup_ratio" if "warmup_ratio" in accepted else "warmup_steps"] = self.warmup_ratio
        checkpointing = "activation_checkpointing" if "activation_checkpointing" in accepted else "gradient_checkpointing"
        kwargs[checkpointing] = self.gradient_checkpointing
        if self.gradient_checkpointing:
            kwargs[checkpointing + "_kwargs"] = {"use_reentrant": False}
        # Length grouping also applies to packed rows: almost all of them are full, and grouping puts the few
        # partly filled ones into the same batches instead of padding them next to full rows.
        group = self.group_by_length
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "use_cpu" in accepted:
            if not _cuda_available():
                # Launched with torchrun on CPUs: without use_cpu, transformers leaves parallel_mode
                # NOT_PARALLEL and each rank trains on its own shard with no gradient sync at all.
                kwargs["use_cpu"] = True
        if "train_sampling_strategy" in accepted:
            kwargs["train_sampling_strategy"] = "group_by_length" if group else "random"
        else:
            kwargs["group_by_length"] = group
        return {k: v for k, v in kwargs.items() if k in accepted}

    # -- (de)serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_yaml(cls, path: str) -> "BaseConfig":
        """Load a config from a YAML mapping of field names to values."""
        # Same path as the command line: argparse converts YAML strings such as `2e-4` (which YAML 1.1
        # reads as a string) with each field's type.
        return cls.from_args(["--config", path])

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> "BaseConfig":
        """Parse ``--config file.yaml`` plus any field overrides (``--max_seq_length 256``).

        Overrides are parsed by ``transformers.HfArgumentParser`` from the dataclass fields, with the
        YAML values as defaults, so the command line always wins over the file. Beyond what the parser
        does: ``--field None`` sets an optional field to None, a bare ``--arabic_remove_diacritics``
        means true, and YAML 1.1 quirks are undone (``evaluation_strategy: no`` is read by YAML as
        False; ``lora_target_modules: q_proj`` as a string instead of a one-item list).
        """
        import argparse
        import typing

        import yaml
        from transformers import HfArgumentParser

        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        optional = {n for n, t in hints.items() if n in fields and type(None) in typing.get_args(t)}
        optional_bool = {n for n in optional if bool in typing.get_args(hints[n])}
        list_fields = {n for n, t in hints.items() if n in fields and typing.get_origin(t) is list}
        str_fields = {n for n, t in hints.items() if n in fields and (t is str or str in typing.get_args(t))}

        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", action="append", default=None)
        known, rest = pre.parse_known_args(argv)
        if known.config and len(known.config) > 1:
            raise ValueError(f"--config given {len(known.config)} times ({', '.join(known.config)}); give one file")
        known.config = known.config[0] if known.config else None
        rest, set_to_none = _preprocess_flags(rest, optional, optional_bool)
        parser = HfArgumentParser(cls)
        parser.add_argument("--config", default=None, help="YAML file with field values; flags override it.")
        if known.config:
            if not os.path.isfile(known.config):
                raise ValueError(f"config file {known.config!r} does not exist.")
            with open(known.config, encoding="utf-8") as fh:
                values = yaml.safe_load(fh) or {}
            if not isinstance(values, dict):
                raise ValueError(f"{known.config}: expected a mapping of field names to values, got {type(values).__name__}.")
            unknown = sorted(set(values) - set(fields))
            if unknown:
                raise ValueError(f"{known.config}: unknown field(s) {unknown}.")
            for name, value in values.items():
                if name in str_fields and isinstance(value, bool):
                    # YAML 1.1 reads a bare no/off/false as False: meaningful only where "no"/"none" is a value.
                    if value is False and name in YAML_FALSE_MEANS:
                        values[name] = YAML_FALSE_MEANS[name]
                    else:
                        raise ValueError(f"{known.config}: {name}: YAML read {value} (a boolean) where text is "
                                         f"expected; quote the value, e.g. {name}: \"...\"")
                elif name in list_fields and isinstance(value, str):
                    values[name] = [value]
            # Defaults from YAML; dataclass construction (and validation) happens once, after parsing.
            parser.set_defaults(**values)
        namespace = parser.parse_args(rest)
        kwargs = {name: getattr(namespace, name) for name, f in fields.items() if f.init}
        kwargs.update({name: None for name in set_to_none})
        return cls(**kwargs)


YAML_FALSE_MEANS = {"evaluation_strategy": "no", "report_to": "none"}


def _preprocess_flags(argv: list[str], optional: set[str], optional_bool: set[str]) -> tuple[list[str], set[str]]:
    """Take ``--field None`` / ``--field=None`` out of argv (returned as names to set to None), and give
    bare optional-bool flags ``true``. Dashes in flag names count as underscores, as in HfArgumentParser."""
    out: list[str] = []
    set_to_none: set[str] = set()
    i = 0
    while i < len(argv):
        token = argv[i]
        name, inline = None, None
        if token.startswith("--"):
            flag, has_value, value = token[2:].partition("=")
            name, inline = flag.replace("-", "_"), (value if has_value else None)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if name in optional and (inline == "None" or (inline is None and following == "None")):
            set_to_none.add(name)
            i += 1 if inline is not None else 2
            continue
        out.append(token)
        if name in optional_bool and inline is None and (following is None or following.startswith("--")):
            out.append("true")
        i += 1
    return out, set_to_none


@dataclass
class SFTConfig(BaseConfig):
    """Configuration of a supervised fine-tuning run.

    Choices the specification leaves open, written down here:

    - ``response_template`` (None) means the template's response prefix (``"### Response:\\n"`` for
      alpaca, ``"<|im_start|>assistant\\n"`` for chatml, the text after ``{instruction}`` for custom).
      It is used to split a pre-formatted ``text`` column into untrained prompt and trained response.
    - ``overlong_policy`` decides what happens to an example longer than ``max_seq_length`` tokens:
      ``truncate`` cuts the response (no end token is trained on a cut response, since the answer did
      not end there; an example whose prompt alone does not fit is dropped), ``drop`` drops it,
      ``error`` raises. Counts are always logged.
    - ``use_lora`` defaults to True: full fine-tuning of a 7B model at the default learning rate is
      rarely what a user wants by accident.
    """

    packing: bool = _help("Pack several examples into each row (no cross-example attention).", default=False)
    instruction_template: str = _help("'alpaca', 'chatml' or 'custom'.", default="alpaca")
    custom_template: Optional[str] = _help("Template with '{instruction}' when instruction_template='custom'.", default=None)
    response_template: Optional[str] = _help("Response prefix; None derives it from the template.", default=None)
    system_prompt: Optional[str] = _help("Optional system prompt prepended to every prompt.", default=None)
    max_seq_length: int = _help("Maximum tokens per example (and per packed row).", default=512)
    overlong_policy: str = _help("'truncate', 'drop' or 'error' for examples over max_seq_length.", default="truncate")
    pad_to_multiple_of: Optional[int] = _help("Pad batch length to a multiple of this (e.g. 8 for tensor cores).", default=None)
    train_on_last_turn_only: bool = _help(
        "For multi-turn conversations: train only the last assistant turn (default: every assistant turn).", default=False
    )

    # --- Arabic normalization (src/data/normalization.py), applied identically to training and generation text ---
    normalization: str = _help("Preset: 'none', 'light' (default: tatweel, bidi controls, presentation forms) or "
                               "'search' (also diacritics, alef/yeh/taa marbuta unification, Western digits).",
                               default="light")
    arabic_nfc: Optional[bool] = _help("Unicode NFC composition (None: preset).", default=None)
    arabic_presentation_forms: Optional[bool] = _help("Map presentation forms to base letters (None: preset).", default=None)
    arabic_remove_bidi_controls: Optional[bool] = _help("Remove bidi control characters (None: preset).", default=None)
    arabic_remove_tatweel: Optional[bool] = _help("Remove tatweel (None: preset).", default=None)
    arabic_remove_diacritics: Optional[bool] = _help("Remove tashkeel (None: preset).", default=None)
    arabic_normalize_alef: Optional[bool] = _help("Unify alef forms to bare alef (None: preset).", default=None)
    arabic_normalize_alef_maqsura: Optional[bool] = _help("Map alef maqsura to yeh (None: preset).", default=None)
    arabic_normalize_taa_marbuta: Optional[bool] = _help("Map taa marbuta to heh (None: preset).", default=None)
    arabic_digits: Optional[str] = _help("'keep', 'western' or 'arabic-indic' (None: preset).", default=None)

    # --- generation-based evaluation ---
    eval_generation_samples: int = _help(
        "If > 0, evaluate_model also generates answers for this many validation rows and reports chrF, BLEU and "
        "exact match (after normalization); the generations go to <output_dir>/eval_generations.jsonl.", default=0
    )
    eval_generation_max_length: int = _help("Maximum new tokens per answer in generation-based evaluation.", default=128)

    def validate(self) -> None:
        super().validate()
        if self.instruction_template not in TEMPLATE_NAMES:
            raise ValueError(
                f"SFTConfig.instruction_template={self.instruction_template!r} is invalid: expected one of {TEMPLATE_NAMES}."
            )
        if self.instruction_template == "custom" and (
            not isinstance(self.custom_template, str) or "{instruction}" not in self.custom_template
        ):
            raise ValueError(
                "SFTConfig.custom_template must be a string containing '{instruction}' when "
                f"instruction_template='custom' (got {self.custom_template!r})."
            )
        if self.response_template is not None and (not isinstance(self.response_template, str) or not self.response_template):
            raise ValueError(f"SFTConfig.response_template={self.response_template!r} is invalid: expected a non-empty string.")
        if isinstance(self.max_seq_length, bool) or not isinstance(self.max_seq_length, int) or self.max_seq_length < 8:
            raise ValueError(f"SFTConfig.max_seq_length={self.max_seq_length!r} is invalid: expected an integer >= 8.")
        if self.overlong_policy not in OVERLONG_POLICIES:
            raise ValueError(f"SFTConfig.overlong_policy={self.overlong_policy!r} is invalid: expected one of {OVERLONG_POLICIES}.")
        from src.data.normalization import DIGIT_FORMS, PRESETS

        if self.normalization not in PRESETS:
            raise ValueError(f"SFTConfig.normalization={self.normalization!r} is invalid: expected one of {sorted(PRESETS)}.")
        if self.arabic_digits is not None and self.arabic_digits not in DIGIT_FORMS:
            raise ValueError(f"SFTConfig.arabic_digits={self.arabic_digits!r} is invalid: expected one of {DIGIT_FORMS}.")
        if self.eval_generation_samples < 0 or self.eval_generation_max_length < 1:
            raise ValueError("SFTConfig.eval_generation_samples must be >= 0 and eval_generation_max_length >= 1.")
        if self.pad_to_multiple_of is not None and (
            isinstance(self.pad_to_multiple_of, bool) or not isinstance(self.pad_to_multiple_of, int) or self.pad_to_multiple_of <= 0
        ):
            raise ValueError(f"SFTConfig.pad_to_multiple_of={self.pad_to_multiple_of!r} is invalid: expected a positive integer.")

    def normalizer(self):
        """The :class:`~src.data.normalization.ArabicNormalizer` this config describes."""
        from src.data.normalization import SWITCHES, build_normalizer

        return build_normalizer(self.normalization, **{k: getattr(self, "arabic_" + k) for k in SWITCHES})

    @property
    def resolved_response_template(self) -> str:
        """``response_template``, or the template's own response prefix when it is None."""
        return self.response_template or default_response_template(self.instruction_template, self.custom_template)
