"""Supervised fine-tuning: ``SFTTrainer`` and ``create_sft_trainer`` (the specification's facade).

Only what is SFT-specific lives here: formatting and tokenizing records, packing, the collator, and
the SFT settings a saved run carries. Data logic is in ``src.data``; the shared pipeline, loss and
persistence in ``BaseTrainer``, ``src.training.losses`` and ``src.training.persistence``; generation and
generation-based evaluation in ``src.training.generation`` (its docstring lists the generation choices).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import replace
from typing import Any, Dict, List, Optional

import torch
from transformers import EarlyStoppingCallback, GenerationConfig, TrainingArguments

from src.config import SFTConfig
from src.data.chat_templates import split_reasoning
from src.data.language import answer_language, check_foreign_script_rate, describe_language, language_metrics, language_summary
from src.data.loading import load_records
from src.data.mixing import SOURCE_KEY, SOURCE_NAME_RE, named_paths, parse_eval_sources, parse_mixture, source_names
from src.data.normalization import SWITCHES
from src.data.packing import SFTDataCollator, padding_efficiency
from src.data.preprocess import TokenizeReport, tokenize_records
from src.data.streaming import StreamedData, stream_splits
from src.data.templates import chat_template
from src.data.tokenization import ExampleTokenizer
from src.data.viewer import show_rows
from src.data.wiring import example_tokenizer_for, load_config_records
from src.distributed import main_process_first
from src.models.architectures import ROWS, PackedLayout, describe, plan_packed_layout, unwrap_model
from src.models.loading import load_tokenizer, resolve_model_path
from src.training import generation
from src.training.attention import AUTO, AttentionChoice, check_trainable, choose_for_packed_rows
from src.training.base_trainer import BaseTrainer
from src.training.hf_trainer import SFTHFTrainer
from src.training.persistence import write_jsonl
from src.training.training_args import training_arguments_kwargs

logger = logging.getLogger(__name__)

# Settings a saved run carries in sft_metadata.json and load_model puts back into the config: the one list
# for writing and restoring. (response_template is written resolved; normalization as its switches.)
SAVED_SETTINGS = ("instruction_template", "custom_template", "system_prompt", "chat_template_kwargs", "max_seq_length",
                  "packing", "train_on_last_turn_only", "train_on_prompt", "train_on_prompt_markup", "overlong_policy")


class SFTTrainer(BaseTrainer):
    """Trainer for Supervised Fine-Tuning (SFT).

    This class handles the complete SFT training pipeline including
    instruction data loading, model setup, and SFT training execution.
    """

    config_class = SFTConfig

    def __init__(self, config: SFTConfig):
        super().__init__(config)
        self.tokenize_report: Optional[TokenizeReport] = None
        self.padding_efficiency: Optional[float] = None
        self.language_consistency: Optional[dict] = None  # of the last generation-based evaluation (src.data.language)
        self.attention = None  # the AttentionChoice of the last create_trainer (src.training.attention)
        self._layout: Optional[tuple[tuple, PackedLayout]] = None  # (model, packing, attention) -> layout
        self.source_names: Optional[List[str]] = None  # a mixture's sources, in the ids' order (loss per source)

    def packed_layout(self) -> PackedLayout:
        """How this run lays out its rows for its model (``src.models.architectures.plan_packed_layout``): packed rows,
        one flattened row, one flattened row with document boundaries (hybrid models with their GPU kernels), or
        unpacked rows where packing would leak between documents (hybrid models without them; logged once)."""
        self._ensure_model()
        key = (id(self.model), bool(self.config.packing), self.attn_implementation())
        if self._layout is None or self._layout[0] != key:
            self._layout = (key, plan_packed_layout(self.model, self.config.packing, self.attn_implementation()))
        return self._layout[1]

    def _get_training_method(self) -> str:
        return "sft"

    # -- formatting ---------------------------------------------------------------------------------
    def example_tokenizer(self) -> ExampleTokenizer:
        """The one object that formats and tokenizes, for training and for generation alike."""
        if self.tokenizer is None:
            raise ValueError("no tokenizer yet: call train(), prepare() or load_model() first")
        return example_tokenizer_for(self.config, self.tokenizer)

    def _check_tokenizer(self) -> None:
        self.example_tokenizer()  # raises TokenizerMismatchError when the template's tokens are missing

    # -- datasets -----------------------------------------------------------------------------------
    def load_dataset(self) -> Any:
        """The records of ``dataset_path`` (see ``BaseTrainer.load_dataset``); with ``stream_data``, the tokenized
        splits instead, streamed from the JSONL file into the dataset cache (:mod:`src.data.streaming`), built by
        the main process first and read by the others. Streaming needs the tokenizer, so the model loads first."""
        if not self.config.stream_data:
            return super().load_dataset()
        if self.model is None:
            self.setup_model()
        self.tokenize_report = TokenizeReport()
        c = self.config
        with main_process_first():
            self.dataset = stream_splits(c.dataset_path, self.example_tokenizer(), c.resolved_dataset_cache_dir,
                                         packing=self.packed_layout().packs, validation_split_ratio=c.validation_split_ratio,
                                         seed=c.seed,
                                         skip_invalid=c.skip_invalid_rows, eval_path=c.eval_dataset_path,
                                         report=self.tokenize_report)
        self.load_report = self.dataset.load_report
        return self.dataset

    def tokenize_split(self, records: List[dict], split: str, source_names: Optional[List[str]] = None) -> Any:
        """Records -> tokenized (and, with packing, packed) ``datasets.Dataset``.

        With a dataset cache (``config.dataset_cache_dir``), an unchanged split (same records, tokenizer and
        settings) is memory-mapped from disk instead of tokenized again; under torchrun the main process
        tokenizes first and the other ranks then read its cache entry. ``source_names`` (a mixture's records, each
        naming its source under ``_source``): the rows get the ``sources`` column of the loss per source.
        """
        self.tokenize_report = self.tokenize_report or TokenizeReport()
        cache_dir = self.config.resolved_dataset_cache_dir
        with main_process_first() if cache_dir else contextlib.nullcontext():
            return tokenize_records(records, self.example_tokenizer(), split, self.tokenize_report,
                                    packing=self.packed_layout().packs, cache_dir=cache_dir, source_names=source_names)

    def _attach_sources(self, dataset: Any, records: Dict[str, List[dict]]) -> Dict[str, Optional[List[str]]]:
        """Put each row's source (the ``_source`` a mixture gives every record, :mod:`src.data.mixing`) back on the
        validated records of ``dataset`` (validation keeps only the fields it knows); set ``source_names``, the
        sources' names in id order (the mixture's order, then any other name met; None when no split names sources:
        no mixture), and return them for each split whose rows name their source (None for the others)."""
        tagged: Dict[str, list] = {}
        for split, rows in records.items():
            names = _source_column(_raw_split(dataset, split))
            if names is None:
                continue
            if len(names) != len(rows):
                raise ValueError(f"{split}: {len(names)} rows name a source ({SOURCE_KEY}) but {len(rows)} rows are valid; "
                                 "the source of each row cannot be told (fix or drop the invalid rows)")
            for i, name in enumerate(names):
                if not (isinstance(name, str) and SOURCE_NAME_RE.fullmatch(name)):
                    raise ValueError(f"{split} row {i}: {SOURCE_KEY}={name!r} is not a source name ([A-Za-z0-9_-]+)")
            tagged[split] = names
        self.source_names = None
        if not tagged:
            return {split: None for split in records}
        order = source_names(parse_mixture(self.config.datasets)) if self.config.datasets is not None else []
        for names in tagged.values():
            order += [n for n in dict.fromkeys(names) if n not in order]
        for split, names in tagged.items():
            records[split] = [{**row, SOURCE_KEY: name} for row, name in zip(records[split], names)]
        self.source_names = order
        return {split: order if split in tagged else None for split in records}

    def create_trainer(self, dataset, training_args, callbacks):
        """Create and configure the SFT trainer instance.

        ``dataset`` is a dict (or ``DatasetDict``) with ``train`` and optional ``validation`` record
        datasets (instruction/response rows, conversations, or pre-formatted ``text`` rows). Steps: validate and
        format the records, tokenize with prompt masking, pack or length-group, build the collator,
        return a :class:`transformers.Trainer` subclass ready to train.
        """
        if self.model is None:
            self.setup_model()
        if isinstance(dataset, StreamedData):  # tokenized already, on disk
            train_dataset, eval_dataset = dataset["train"], dataset.get("validation")
        else:
            records, report = load_records(dataset, validation_split_ratio=0.0, seed=self.config.seed,
                                           skip_invalid=self.config.skip_invalid_rows,
                                           log=dataset is not self.dataset)  # load_dataset logged these rows already
            self.tokenize_report = TokenizeReport()
            tags = self._attach_sources(dataset, records)
            train_dataset = self.tokenize_split(records["train"], "train", tags["train"])
            eval_dataset = self.tokenize_split(records["validation"], "validation", tags["validation"]) \
                if records.get("validation") else None
            self._check_best_metric(records.get("validation"), training_args)
        logger.info("Tokenized: %s", self.tokenize_report.summary())
        self._check_batches(train_dataset, training_args)
        if eval_dataset is None and (training_args.eval_strategy != "no" or training_args.load_best_model_at_end):
            logger.warning("no validation split: evaluation during training, load_best_model_at_end and early "
                           "stopping are turned off")
            training_args.eval_strategy = training_args.eval_strategy.__class__("no")
            training_args.do_eval = False
            training_args.load_best_model_at_end = False
            callbacks = [c for c in (callbacks or []) if not isinstance(c, EarlyStoppingCallback)]
        self.attention = self.choose_attention(train_dataset, training_args)
        collator = self.data_collator()
        trainer = SFTHFTrainer(
            model=self.model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=collator,
            processing_class=self.tokenizer,
            callbacks=callbacks or None,
            owner=self,
            sft_loss=self.loss,
            source_names=self.source_names,
        )
        self.trainer = trainer
        self.padding_efficiency = self.measure_padding_efficiency(trainer)
        logger.info("Padding efficiency (real tokens / tokens computed, first epoch): %.4f", self.padding_efficiency)
        return trainer

    def _check_best_metric(self, validation: Optional[List[dict]], training_args) -> None:
        """A source's metric for early stopping / the best checkpoint needs that source's rows in the validation set
        (``metric_for_best_model: eval_<name>_loss``); refused before training rather than failing at the first
        evaluation."""
        metric = self.config.metric_for_best_model
        if not metric or metric == "eval_loss" or not (training_args.load_best_model_at_end or
                                                       self.config.early_stopping_patience is not None):
            return
        name = metric[len("eval_"):-len("_loss")]
        if validation and not any(row.get(SOURCE_KEY) == name for row in validation):
            where = ("the validation rows come from eval_dataset_path, which is not a source of the mixture"
                     if self.config.eval_dataset_path else "no validation row comes from that source")
            raise ValueError(f"SFTConfig.metric_for_best_model={metric!r}: {where}; watch eval_loss or give the "
                             "source validation rows (validation_split_ratio holds rows of every source out)")

    def choose_attention(self, train_dataset, training_args) -> Any:
        """The attention implementation for training (see :mod:`src.training.attention`).

        An explicit ``attn_implementation`` is checked (flex needs a CUDA GPU) and kept. Left unset
        (``None``/``"auto"``) with packing on a GPU, the exact candidates are timed on the first batch's layout
        and the model switches to the fastest; every rank takes the main process's choice.
        """
        requested = self.config.attn_implementation
        device = training_args.device
        check_trainable(requested, device)
        if requested not in (None, AUTO) or self.packed_layout().layout != ROWS or device.type != "cuda":
            return AttentionChoice(implementation=self.attn_implementation())
        rows = train_dataset.select(range(min(len(train_dataset), training_args.per_device_train_batch_size)))
        collate = SFTDataCollator(self.tokenizer.pad_token_id, self.config.pad_to_multiple_of, flatten_packed=False)
        batch = collate([{k: row[k] for k in ("input_ids", "labels", "position_ids")} for row in rows])
        dtype = torch.bfloat16 if self.config.resolved_bf16 else torch.float16 if self.config.fp16 else torch.float32
        return choose_for_packed_rows(self.model, batch["position_ids"], device, dtype,
                                      planned_passes=self._planned_passes(train_dataset, training_args))

    @staticmethod
    def _planned_passes(train_dataset, args) -> int:
        """Forward/backward passes this process will run: micro-batches per rank over the planned steps/epochs."""
        if args.max_steps and args.max_steps > 0:
            return args.max_steps * args.gradient_accumulation_steps
        per_epoch = math.ceil(len(train_dataset) / (args.per_device_train_batch_size * max(1, args.world_size)))
        return per_epoch * math.ceil(args.num_train_epochs)

    def attn_implementation(self) -> str:
        return getattr(unwrap_model(self.model).config, "_attn_implementation", None) or "eager"

    def data_collator(self) -> SFTDataCollator:
        layout = self.packed_layout()
        return SFTDataCollator(self.tokenizer.pad_token_id, self.config.pad_to_multiple_of,
                               flatten_packed=layout.flattened, boundaries=layout.boundaries)

    def _check_batches(self, train_dataset, args) -> None:
        rows = len(train_dataset)
        per_step = args.per_device_train_batch_size * max(1, args.world_size)
        unit = "packed rows" if self.packed_layout().packs else "examples"
        if args.dataloader_drop_last and rows < per_step:
            raise ValueError(
                f"only {rows} training {unit} but a batch needs {per_step} and dataloader_drop_last=True: no step "
                "would run; lower per_device_train_batch_size or set dataloader_drop_last=False"
            )
        if args.dataloader_drop_last and rows % per_step:
            logger.warning("dataloader_drop_last=True: %d of %d training %s are left out of each epoch "
                           "(a different subset each epoch when shuffling)", rows % per_step, rows, unit)

    def measure_padding_efficiency(self, trainer) -> float:
        """Real tokens / tokens computed over the first epoch's training batches, as the sampler orders them."""
        dataset = trainer.train_dataset
        if trainer.data_collator.flatten_packed and "position_ids" in dataset.column_names:
            return 1.0  # each batch is one flattened row: nothing is padded
        lengths = dataset["length"]
        sampler = trainer._get_train_sampler(dataset)
        with torch.random.fork_rng(devices=[]):  # samplers draw from the global (CPU) generator: leave it untouched
            order = list(iter(sampler)) if sampler is not None else list(range(len(lengths)))
        size = trainer.args.per_device_train_batch_size
        batches = [[lengths[i] for i in order[s:s + size]] for s in range(0, len(order), size)]
        if trainer.args.dataloader_drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        return padding_efficiency(batches, self.config.pad_to_multiple_of)

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate_model(self, eval_dataset: Optional[Any] = None) -> Dict[str, float]:
        """Evaluate and compute perplexity.

        Returns ``eval_loss`` (mean cross-entropy per trained token over the whole set),
        ``eval_perplexity`` (= exp(eval_loss); ``inf`` instead of an overflow), ``eval_runtime``,
        ``eval_samples_per_second`` and a few more. ``eval_dataset`` may be a record dataset
        (instruction/response or text rows), a list of record dicts, or an already tokenized dataset;
        by default the validation split is used.
        """
        if self.trainer is None:
            if self.model is not None and eval_dataset is not None:
                self._inference_trainer()
            else:
                self.prepare()
        dataset = None
        if eval_dataset is not None:
            if hasattr(eval_dataset, "column_names") and "input_ids" in eval_dataset.column_names:
                dataset = eval_dataset
            else:
                records, _ = load_records({"train": eval_dataset}, validation_split_ratio=0.0,
                                          skip_invalid=self.config.skip_invalid_rows)
                dataset = self.tokenize_split(records["train"], "eval")
        metrics = {k: float(v) for k, v in self.trainer.evaluate(dataset).items()}
        if self.config.eval_generation_samples > 0 and eval_dataset is None and self.dataset is not None \
                and not isinstance(self.dataset, StreamedData) and "validation" in self.dataset:
            if "instruction" in self.dataset["validation"].column_names:
                metrics.update(self.evaluate_generation(list(self.dataset["validation"]),
                                                        max_samples=self.config.eval_generation_samples))
            else:
                logger.warning("eval_generation_samples is set but the validation rows are conversations or "
                               "pre-formatted text: generation-based evaluation needs instruction/response rows; skipped")
        return metrics

    def evaluate_generation(self, records: List[dict], max_samples: Optional[int] = None, max_length: Optional[int] = None,
                            output_file: Optional[str] = None) -> Dict[str, float]:
        """Generate answers for instruction/response records and score them against the references.

        Returns ``eval_gen_chrf`` and ``eval_gen_bleu`` (sacrebleu, corpus level, ``intl`` tokenization
        for BLEU) and ``eval_gen_exact_match``, all computed after the configured normalization (plus
        whitespace collapsing for exact match). The first ``max_samples`` rows of a seeded shuffle are
        used; conversation and pre-formatted text rows are skipped (and counted). Every generation is
        written to ``output_file`` (default ``<output_dir>/eval_generations.jsonl``) by the main process.
        """
        chosen = generation.choose_rows(records, max_samples, self.config.seed)
        self._ensure_model()
        example_tokenizer = self.example_tokenizer()
        # Each row's own system prompt, exactly as its training prompt had it.
        predictions = self.generate_from_prompts(
            [example_tokenizer.encode_prompt(r["instruction"], r.get("system")) for r in chosen],
            max_length=max_length or self.config.eval_generation_max_length,
            batch_size=self.config.per_device_eval_batch_size)
        reasoning, predictions = zip(*map(split_reasoning, predictions)) if predictions else ((), ())  # score answers
        metrics, exact = generation.generation_metrics(list(predictions), [r["response"] for r in chosen],
                                                       self.config.normalizer())
        # Arabic language consistency of each answer (src.data.language): flagged rows are marked in the file.
        languages = [answer_language(r["instruction"], p) for r, p in zip(chosen, predictions)]
        self.language_consistency = language_summary(languages)
        metrics.update(language_metrics(self.language_consistency))
        output_file = output_file or os.path.join(self.config.output_dir, "eval_generations.jsonl")
        write_jsonl(output_file, ({"instruction": r["instruction"], "reference": r["response"], "prediction": p,
                                   "exact_match": hit, **({"reasoning": t} if t else {}),
                                   "language": language, "flagged": language["flagged"]}
                                  for r, p, t, hit, language in zip(chosen, predictions, reasoning, exact, languages)))
        logger.info("generation eval on %d rows: chrF %.2f, BLEU %.2f, exact match %.1f%%; %s (generations in %s)",
                    len(chosen), metrics["eval_gen_chrf"], metrics["eval_gen_bleu"], 100 * metrics["eval_gen_exact_match"],
                    describe_language(self.language_consistency), output_file)
        return metrics

    def check_quality_gates(self) -> None:
        """``max_foreign_script_rate`` on the final generation-based evaluation (a ``ValueError`` above it)."""
        if self.language_consistency is not None:
            check_foreign_script_rate(self.language_consistency, self.config.max_foreign_script_rate,
                                      "generation eval (final model)")

    def _inference_trainer(self):
        """A Trainer for evaluation only (after load_model, with no training data loaded)."""
        inference = replace(self.config, evaluation_strategy="no", load_best_model_at_end=False, report_to="none",
                            early_stopping_patience=None,
                            gradient_checkpointing=False)
        self.trainer = SFTHFTrainer(
            model=self.model, args=TrainingArguments(**training_arguments_kwargs(inference, self.environment())),
            data_collator=self.data_collator(),
            processing_class=self.tokenizer, owner=self, sft_loss=self.loss,
        )
        return self.trainer

    # -- generation ---------------------------------------------------------------------------------
    def _ensure_model(self) -> None:
        if self.model is None:
            self.setup_model()

    def show_examples(self, count: int = 3, rows: Optional[List[int]] = None, packed: bool = False,
                      as_json: bool = False, color: bool = False) -> str:
        """What the model trains on, token by token (``train_sft.py audit --show``; :mod:`src.data.viewer`): the first
        ``count`` training rows (or those at the 0-based ``rows``), each as text with its trained part marked and a
        token table; ``packed``: the first packed rows with their seams. Reads the config's data as training does and
        needs only the tokenizer, loaded here if no model is."""
        if self.tokenizer is None:
            source = self.config.tokenizer_name or resolve_model_path(self.config.model_name, self.config.output_dir,
                                                                      self.config.dataset_path, self.config.seed)
            self.tokenizer = load_tokenizer(source, trust_remote_code=self.config.trust_remote_code)
        records = load_config_records(self.config)[0].get("train") or []  # as training reads them
        return show_rows(records, self.example_tokenizer(), count, rows, packed, color, as_json)

    def stop_token_ids(self) -> List[int]:
        ids = [self.example_tokenizer().end_id]
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def generate_response(self, instruction: str, max_length: int = 512, **kwargs) -> str:
        """Generate the response to one instruction, formatted exactly as in training.

        ``max_length`` is the maximum number of generated tokens. ``kwargs`` go to
        ``model.generate`` (``do_sample``, ``temperature``, ``top_p``, ``repetition_penalty`` ...), except
        ``include_reasoning`` (default False): a thinking model's answer is returned without its reasoning
        (the text up to ``</think>``); True returns the generated text whole, reasoning and ``</think>`` included.
        Texts without ``</think>`` are returned as generated either way.
        """
        return self.batch_generate([instruction], max_length=max_length, batch_size=1, **kwargs)[0]

    def batch_generate(self, instructions: List[str], max_length: int = 512, batch_size: int = 4, **kwargs) -> List[str]:
        """Generate responses for many instructions, ``batch_size`` at a time, left-padded.

        With greedy decoding the result for each instruction equals :meth:`generate_response`.
        """
        if isinstance(instructions, str) or not all(isinstance(i, str) for i in instructions):
            raise TypeError("batch_generate expects a list of instruction strings")
        include_reasoning = kwargs.pop("include_reasoning", False)
        self._ensure_model()
        example_tokenizer = self.example_tokenizer()
        texts = self.generate_from_prompts([example_tokenizer.encode_prompt(text) for text in instructions],
                                           max_length=max_length, batch_size=batch_size, **kwargs)
        if include_reasoning:
            return texts
        return [split_reasoning(text)[1] for text in texts]

    def generate_from_prompts(self, prompts: List[List[int]], max_length: int = 512, batch_size: int = 4,
                              **kwargs) -> List[str]:
        """Generate from already formatted prompt ids (as ``ExampleTokenizer.encode_prompt`` makes them)."""
        self._ensure_model()
        return generation.generate_from_prompts(self.model, self.tokenizer, prompts, self.stop_token_ids(),
                                                max_length=max_length, batch_size=batch_size, **kwargs)

    # -- saving -------------------------------------------------------------------------------------
    def metadata(self) -> Dict[str, Any]:
        c = self.config
        meta: Dict[str, Any] = {key: getattr(c, key) for key in SAVED_SETTINGS}
        meta.update({
            "response_template": c.resolved_response_template,
            "normalization": {"preset": c.normalization, **c.normalizer().to_dict()},
            "end_token": self.tokenizer.convert_ids_to_tokens(self.example_tokenizer().end_id),
            "padding_efficiency": self.padding_efficiency,
            "loss_type": c.loss_type,
            "attention": (self.attention or AttentionChoice(implementation=self.attn_implementation())).as_metadata(),
            "packed_layout": self.packed_layout().as_metadata(),
            "architecture": describe(self.model),
            # early stopping ended training before max_steps: at which step, why, which checkpoint was kept
            "early_stopped": self.early_stopped or False,
            # of the last generation-based evaluation (the final model's, after training): src.data.language
            "language_consistency": self.language_consistency,
        })
        if self.source_names:
            meta["per_source"] = self.per_source_figures()
        if self.tokenize_report is not None:
            meta["examples"] = dict(self.tokenize_report.examples)
            meta["truncated_examples"] = dict(self.tokenize_report.truncated)
            meta["dropped_examples"] = dict(self.tokenize_report.dropped)
        return meta

    def per_source_figures(self) -> Dict[str, Dict[str, Any]]:
        """Each source's final figures (a mixture): its token-weighted training loss over the run and its trained
        tokens, and the final evaluation's loss, perplexity and tokens on its validation rows."""
        train = getattr(self.trainer, "source_train_losses", None) or {}
        c = self.config
        paths = named_paths(parse_mixture(c.datasets)) if c.datasets is not None else {}
        evals = named_paths(parse_eval_sources(c.eval_datasets)) if c.eval_datasets is not None else {}
        figures: Dict[str, Dict[str, Any]] = {}
        for name in self.source_names or []:
            entry: Dict[str, Any] = {"path": paths[name]} if name in paths else {}
            if name in evals:
                entry["eval_path"] = evals[name]
            if name in train:
                entry.update(train_loss=train[name]["loss"], train_tokens=train[name]["tokens"])
            for key in ("loss", "perplexity", "tokens"):
                value = self.final_metrics.get(f"eval_{name}_{key}")
                if value is not None:
                    entry[f"eval_{key}"] = int(value) if key == "tokens" else value
            figures[name] = entry
        return figures

    def restore_from_metadata(self, metadata: Dict[str, Any]) -> None:
        super().restore_from_metadata(metadata)
        for key in SAVED_SETTINGS:
            if key in metadata and getattr(self.config, key) != metadata[key]:
                logger.info("load_model: using the saved run's %s=%r (config had %r)", key, metadata[key],
                            getattr(self.config, key))
                setattr(self.config, key, metadata[key])
        if metadata.get("response_template"):
            self.config.response_template = metadata["response_template"]
        # Runs saved before normalization existed trained on untouched text: "none", not today's default.
        normalization = metadata.get("normalization") or {"preset": metadata.get("config", {}).get("normalization", "none")}
        # Generation must normalize exactly as training did: take the saved switches, not the preset's.
        self.config.normalization = normalization["preset"]
        for switch in SWITCHES:
            if switch in normalization:
                setattr(self.config, "arabic_" + switch, normalization[switch])

    def before_save(self) -> None:
        """Give the tokenizer a chat template that renders conversations exactly as this run formatted its
        training examples (``src.data.templates.chat_template``), so serving stacks that call
        ``apply_chat_template`` build the prompts the model saw; it replaces the base model's template
        (which may, like Qwen2.5's, add a default system prompt that training never had)."""
        et = self.example_tokenizer()
        self.tokenizer.chat_template = chat_template(et.fmt, self.tokenizer.convert_ids_to_tokens(et.end_id))

    def write_generation_config(self, output_dir: str) -> None:
        """generation_config.json whose EOS ids include the template's end token (``<|im_end|>`` for ChatML),
        so plain ``transformers`` generation and serving engines stop where ``generate_response`` stops."""
        base = getattr(self.unwrapped_model(), "generation_config", None)
        config = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
        existing = config.eos_token_id
        existing = [] if existing is None else ([existing] if isinstance(existing, int) else list(existing))
        config.eos_token_id = existing + [i for i in self.stop_token_ids() if i not in existing]
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        config.save_pretrained(output_dir)


def _raw_split(dataset: Any, split: str) -> Any:
    """The rows of ``split`` in what ``create_trainer`` was given (a dict/``DatasetDict`` of splits, whose validation
    split ``load_records`` also takes from 'eval' or 'valid', or one ``Dataset``: the training rows)."""
    if not isinstance(dataset, dict):  # (a DatasetDict is a dict)
        return dataset if split == "train" else None
    for key in (split,) if split == "train" else ("validation", "eval", "valid"):
        if key in dataset:
            return dataset[key]
    return None


def _source_column(data: Any) -> Optional[list]:
    """The ``_source`` of every row of a split (a ``datasets.Dataset`` column or the records' key), or None."""
    if data is None:
        return None
    if hasattr(data, "column_names"):
        return list(data[SOURCE_KEY]) if SOURCE_KEY in data.column_names else None
    if isinstance(data, list) and any(isinstance(row, dict) and SOURCE_KEY in row for row in data):
        return [row.get(SOURCE_KEY) if isinstance(row, dict) else None for row in data]
    return None


def create_sft_trainer(config: SFTConfig) -> SFTTrainer:
    """Factory function to create an SFT trainer instance."""
    return SFTTrainer(config)
