"""Wires a run's config to the data components: its records (one source or a mixture), its prompt format and
the :class:`~src.data.tokenization.ExampleTokenizer` over a tokenizer.

The one place training (``SFTTrainer``) and ``train_sft.py audit`` ask, so the audit reads exactly what training
reads. The config is taken as it is (an ``SFTConfig`` or anything with its fields): the data layer does not
import the config package, which imports the data layer's rules.
"""

from __future__ import annotations

from typing import Any

from src.data.chat_templates import TokenizerChatFormat, parse_template_kwargs
from src.data.loading import load_records
from src.data.mixing import load_eval_sources, load_mixture, parse_eval_sources, parse_mixture
from src.data.records import LoadReport
from src.data.templates import PromptFormat, get_prompt_format
from src.data.tokenization import ExampleTokenizer


def load_config_records(config: Any, *, skip_invalid: bool | None = None) -> tuple[dict[str, list[dict]], LoadReport]:
    """The validated records per split of ``config``: ``dataset_path`` (and ``eval_dataset_path``), or the mixture
    of ``datasets``; the hold-out of ``validation_split_ratio`` and ``seed``. ``skip_invalid`` (None: the config's
    ``skip_invalid_rows``) counts invalid rows instead of raising, as the audit does."""
    skip = config.skip_invalid_rows if skip_invalid is None else skip_invalid
    options = {"validation_split_ratio": config.validation_split_ratio, "seed": config.seed, "skip_invalid": skip}
    if getattr(config, "eval_datasets", None) is not None:
        # Several validation files, each a source of the per-source figures: the training rows are all of the
        # training data (nothing held out), the validation rows those files' rows.
        options["validation_split_ratio"] = 0.0
        if config.datasets is not None:
            splits, report = load_mixture(parse_mixture(config.datasets), None, **options)
        else:
            splits, report = load_records(config.dataset_path, None, **options)
            if splits.get("validation"):
                raise ValueError(f"SFTConfig.eval_datasets: {config.dataset_path} has a validation split of its own; "
                                 "with eval_datasets the validation rows come from those files only")
        splits["validation"] = load_eval_sources(parse_eval_sources(config.eval_datasets), report, seed=config.seed,
                                                 skip_invalid=skip)
        report.rows_kept["validation"] = len(splits["validation"])
        return splits, report
    if config.datasets is not None:
        return load_mixture(parse_mixture(config.datasets), config.eval_dataset_path, **options)
    if config.dataset_path is None:
        raise ValueError("SFTConfig.dataset_path is not set: give a .jsonl, .csv, .json or .parquet file (or "
                         "datasets: a mixture) to train on")
    return load_records(config.dataset_path, config.eval_dataset_path, **options)


def prompt_format_for(config: Any, tokenizer: Any = None) -> PromptFormat:
    """The :class:`~src.data.templates.PromptFormat` a config describes (``instruction_template='tokenizer'``
    reads the chat template of ``tokenizer``)."""
    chat = None
    if config.instruction_template == "tokenizer":
        if tokenizer is None:
            raise ValueError("instruction_template='tokenizer': no tokenizer yet to read the chat template from")
        chat = TokenizerChatFormat.from_tokenizer(tokenizer, parse_template_kwargs(config.chat_template_kwargs),
                                                  config.ignore_empty_think)
    return get_prompt_format(config.instruction_template, config.custom_template, config.resolved_response_template,
                             config.system_prompt, chat=chat)


def example_tokenizer_for(config: Any, tokenizer: Any) -> ExampleTokenizer:
    """The formatting + tokenizing object of ``config`` over ``tokenizer``: shared by training, generation and
    the audit command, so all of them see the same token ids."""
    normalizer = config.normalizer()
    return ExampleTokenizer(tokenizer, prompt_format_for(config, tokenizer), config.max_seq_length, config.overlong_policy,
                            normalize=None if normalizer.is_identity else normalizer,
                            train_on_last_turn_only=config.train_on_last_turn_only,
                            train_on_prompt=config.train_on_prompt, train_on_prompt_markup=config.train_on_prompt_markup)
