"""``SFTConfig`` -> ``transformers.TrainingArguments``: the one translation, loud when transformers changes.

``SFTConfig`` keeps the specification's field names (``evaluation_strategy``, ``group_by_length``,
``gradient_checkpointing``, ``warmup_ratio``) even where transformers 5 renamed them. This module is the
only place that knows the installed names:

- ``evaluation_strategy`` -> ``eval_strategy``;
- ``group_by_length`` -> ``train_sampling_strategy="group_by_length"`` (or ``"random"``);
- ``gradient_checkpointing`` -> ``activation_checkpointing`` (transformers >= 5.x; the old name where it is
  the only one), with non-reentrant checkpointing;
- ``warmup_ratio`` -> a fractional ``warmup_steps`` (transformers 5 reads a value below 1 as a ratio);
- ``ddp_find_unused_parameters`` None -> False (``ddp_find_unused_parameters``: every parameter gets a gradient).

Every key is checked against the installed ``TrainingArguments``: a key it does not accept raises
:class:`TrainingArgumentsMismatch` naming it, never a silent drop (tests/test_config.py pins the
mapping: ``test_training_arguments_translation_to_installed_transformers``,
``test_translation_is_pinned_to_the_installed_transformers``). Decisions that depend on the machine (CUDA, the launcher) are not made here but by the trainer,
through ``environment``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import transformers
from transformers import TrainingArguments

# Ours -> the installed name, first that the installed TrainingArguments accepts.
RENAMES: dict[str, tuple[str, ...]] = {
    "evaluation_strategy": ("eval_strategy",),
    "group_by_length": ("train_sampling_strategy",),
    "gradient_checkpointing": ("activation_checkpointing", "gradient_checkpointing"),
    "warmup_ratio": ("warmup_steps",),
}


class TrainingArgumentsMismatch(RuntimeError):
    """The installed transformers does not accept a key this translation produces."""


def accepted_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainingArguments)}


def installed_name(ours: str, accepted: set[str]) -> str:
    for candidate in RENAMES[ours]:
        if candidate in accepted:
            return candidate
    raise TrainingArgumentsMismatch(
        f"transformers {transformers.__version__} TrainingArguments has none of {RENAMES[ours]} for SFTConfig.{ours}; "
        "update src/training/training_args.py"
    )


# The Liger kernels SFTConfig.use_liger_kernel applies (liger's _apply_liger_kernel_to_instance keywords): the
# elementwise ones. Its cross-entropy kernels would replace the loss; ours (src.training.losses) stays.
LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}


def ddp_find_unused_parameters(config: Any) -> bool:
    """DDP's ``find_unused_parameters``: the config's value, else False.

    Every trainable parameter gets a gradient in every step of our training: the loss always runs the LM head, on
    an empty chunk when a micro-batch trains no token (``src.training.losses``); LoRA adapters sit on modules
    every forward runs; MoE experts are 3-D parameters of which each step uses some rows. transformers' own choice
    (None: True unless gradient checkpointing is on) makes DDP walk the autograd graph after every backward and warn
    on every rank that it found nothing. Should a model ever leave a parameter without a gradient, DDP stops with an
    error naming it (then set ``ddp_find_unused_parameters: true``); it does not train wrongly.
    """
    return False if config.ddp_find_unused_parameters is None else bool(config.ddp_find_unused_parameters)


def training_arguments_kwargs(config: Any, environment: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for the installed ``TrainingArguments`` from an ``SFTConfig``.

    ``environment`` holds machine-dependent settings decided by the trainer (``use_cpu``,
    ``dataloader_pin_memory``); they override the config's.
    """
    accepted = accepted_fields()
    kwargs: dict[str, Any] = dict(
        output_dir=config.output_dir,
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler_type,
        max_grad_norm=config.max_grad_norm,
        optim=config.optim,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_drop_last=config.dataloader_drop_last,
        dataloader_num_workers=config.dataloader_num_workers,
        dataloader_pin_memory=config.dataloader_pin_memory,
        bf16=config.resolved_bf16,
        fp16=config.fp16,
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=config.load_best_model_at_end,
        logging_steps=config.logging_steps,
        report_to=[r.strip() for r in config.report_to.split(",")] if config.report_to else "none",
        run_name=config.run_name,
        ddp_find_unused_parameters=ddp_find_unused_parameters(config),
        ddp_backend=config.ddp_backend,
        deepspeed=config.deepspeed,
        fsdp=True if config.fsdp_config else None,
        fsdp_config=config.fsdp_config,
        label_names=["labels"],
        remove_unused_columns=True,
    )
    eval_strategy = config.evaluation_strategy
    if config.neftune_noise_alpha is not None:
        kwargs["neftune_noise_alpha"] = config.neftune_noise_alpha
    if config.use_liger_kernel:
        kwargs.update(use_liger_kernel=True, liger_kernel_config=dict(LIGER_KERNELS))
    if config.load_best_model_at_end or config.early_stopping_patience is not None:
        # Early stopping keeps the best checkpoint: transformers' EarlyStoppingCallback works through it.
        kwargs["load_best_model_at_end"] = True
        # transformers requires matching save and eval schedules for load_best_model_at_end.
        kwargs.update(save_strategy=eval_strategy, metric_for_best_model=config.metric_for_best_model or "eval_loss",
                      greater_is_better=False)
    if eval_strategy == "steps":
        kwargs["eval_steps"] = config.eval_steps or config.save_steps
    kwargs[installed_name("evaluation_strategy", accepted)] = eval_strategy
    kwargs[installed_name("warmup_ratio", accepted)] = config.warmup_ratio
    checkpointing = installed_name("gradient_checkpointing", accepted)
    kwargs[checkpointing] = config.gradient_checkpointing
    if config.gradient_checkpointing:
        kwargs[checkpointing + "_kwargs"] = {"use_reentrant": False}
    # Length grouping also applies to packed rows: almost all of them are full, and grouping puts the few
    # partly filled ones into the same batches instead of padding them next to full rows.
    kwargs[installed_name("group_by_length", accepted)] = "group_by_length" if config.group_by_length else "random"
    kwargs.update(environment or {})
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TrainingArgumentsMismatch(
            f"transformers {transformers.__version__} TrainingArguments does not accept {unknown}; "
            "update src/training/training_args.py"
        )
    return kwargs
