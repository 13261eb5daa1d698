"""Supervised fine-tuning: ``SFTTrainer`` and ``create_sft_trainer``.

Only what is SFT-specific lives here; data logic is in ``src.data`` (templates, tokenization, packing)
and the shared pipeline in :class:`~src.training.base_trainer.BaseTrainer`.

Choices the specification leaves open:

- ``generate_response(max_length=...)`` bounds the number of *generated* tokens (``max_new_tokens``),
  not prompt + answer, so a long instruction never silently leaves no room for the answer.
- Passing ``temperature``, ``top_p`` or ``top_k`` without ``do_sample`` turns sampling on (that is
  what the caller asks for; transformers would ignore them under greedy decoding). With none of
  them, decoding is greedy and deterministic.
- Generation stops at the template's end token (``<|im_end|>`` for ChatML, EOS otherwise) and at the
  tokenizer's EOS; the returned text is the response only, without special tokens or surrounding
  whitespace.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional

import torch

from src.config import SFTConfig
from src.data.loading import load_records
from src.data.packing import SFTDataCollator, flattens_packed_batches, pack_dataset, padding_efficiency
from src.data.templates import get_prompt_format
from src.data.tokenization import ExampleTokenizer, TokenizeReport, tokenize_records
from src.training.base_trainer import BaseTrainer
from src.training.hf_trainer import SFTHFTrainer
from src.training.losses import token_loss_sum

logger = logging.getLogger(__name__)

SAMPLING_KWARGS = ("temperature", "top_p", "top_k", "typical_p", "min_p")


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

    def _get_training_method(self) -> str:
        return "sft"

    # -- formatting ---------------------------------------------------------------------------------
    def prompt_format(self):
        c = self.config
        return get_prompt_format(c.instruction_template, c.custom_template, c.resolved_response_template, c.system_prompt)

    def example_tokenizer(self) -> ExampleTokenizer:
        """The one object that formats and tokenizes, for training and for generation alike."""
        if self.tokenizer is None:
            raise ValueError("no tokenizer yet: call train(), prepare() or load_model() first")
        normalizer = self.config.normalizer()
        return ExampleTokenizer(self.tokenizer, self.prompt_format(), self.config.max_seq_length, self.config.overlong_policy,
                                normalize=None if normalizer.is_identity else normalizer,
                                train_on_last_turn_only=self.config.train_on_last_turn_only)

    def _check_tokenizer(self) -> None:
        self.example_tokenizer()  # raises TokenizerMismatchError when the template's tokens are missing

    # -- training arguments -------------------------------------------------------------------------
    def get_training_arguments(self):
        """TrainingArguments with the SFT settings of the specification.

        Gradient checkpointing, ``label_names=["labels"]``, ``remove_unused_columns=True``,
        ``dataloader_drop_last`` and length grouping all come from the config, translated to the
        installed transformers' names in ``SFTConfig.to_training_arguments_kwargs``. Length grouping
        (``group_by_length``, on by default) also applies to packed rows, where it batches the few
        part-filled rows together instead of next to full ones.
        """
        return super().get_training_arguments()

    # -- datasets -----------------------------------------------------------------------------------
    def tokenize_split(self, records: List[dict], split: str) -> Any:
        """Records -> tokenized (and, with packing, packed) ``datasets.Dataset``."""
        self.tokenize_report = self.tokenize_report or TokenizeReport()
        dataset = tokenize_records(records, self.example_tokenizer(), split, self.tokenize_report)
        if self.config.packing:
            dataset = pack_dataset(dataset, self.config.max_seq_length)
        return dataset

    def create_trainer(self, dataset, training_args, callbacks):
        """Create and configure the SFT trainer instance.

        ``dataset`` is a dict (or ``DatasetDict``) with ``train`` and optional ``validation`` record
        datasets (instruction/response rows, conversations, or pre-formatted ``text`` rows). Steps: validate and
        format the records, tokenize with prompt masking, pack or length-group, build the collator,
        return a :class:`transformers.Trainer` subclass ready to train.
        """
        if self.model is None:
            self.setup_model()
        records, report = load_records(dataset, validation_split_ratio=0.0, seed=self.config.seed,
                                       skip_invalid=self.config.skip_invalid_rows)
        self.tokenize_report = TokenizeReport()
        train_dataset = self.tokenize_split(records["train"], "train")
        eval_dataset = self.tokenize_split(records["validation"], "validation") if records.get("validation") else None
        logger.info("Tokenized: %s", self.tokenize_report.summary())
        self._check_batches(train_dataset, training_args)
        if eval_dataset is None and (training_args.eval_strategy != "no" or training_args.load_best_model_at_end):
            logger.warning("no validation split: evaluation during training and load_best_model_at_end are turned off")
            training_args.eval_strategy = training_args.eval_strategy.__class__("no")
            training_args.do_eval = False
            training_args.load_best_model_at_end = False
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
        )
        self.trainer = trainer
        self.padding_efficiency = self.measure_padding_efficiency(trainer)
        logger.info("Padding efficiency (real tokens / tokens computed, first epoch): %.4f", self.padding_efficiency)
        return trainer

    def attn_implementation(self) -> str:
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return getattr(model.config, "_attn_implementation", None) or "eager"

    def data_collator(self) -> SFTDataCollator:
        return SFTDataCollator(self.tokenizer.pad_token_id, self.config.pad_to_multiple_of,
                               flatten_packed=flattens_packed_batches(self.attn_implementation()))

    def _check_batches(self, train_dataset, args) -> None:
        rows = len(train_dataset)
        per_step = args.per_device_train_batch_size * max(1, args.world_size)
        unit = "packed rows" if self.config.packing else "examples"
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
        rng_state = torch.random.get_rng_state()  # samplers draw from the global generator: leave it untouched
        try:
            order = list(iter(sampler)) if sampler is not None else list(range(len(lengths)))
        finally:
            torch.random.set_rng_state(rng_state)
        size = trainer.args.per_device_train_batch_size
        batches = [[lengths[i] for i in order[s:s + size]] for s in range(0, len(order), size)]
        if trainer.args.dataloader_drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        return padding_efficiency(batches, self.config.pad_to_multiple_of)

    # -- loss ---------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Shifted next-token cross-entropy over trained tokens (labels != -100).

        During training the Trainer passes ``num_items_in_batch``, the number of trained tokens in the
        whole accumulated batch (over all micro-batches and data-parallel ranks): the summed token loss
        is divided by it, so 4 micro-batches of 1 give the same gradients as 1 batch of 4. Without it
        (a direct call, evaluation) the loss is the mean over this batch's trained tokens, as in the
        specification. The model is called without labels and without a KV cache (packed batches are
        isolated only when no cache is built).
        """
        if num_items_in_batch is None:
            num_items_in_batch = self._num_items_in_batch
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**model_inputs, use_cache=False)
        loss_sum, n_tokens = token_loss_sum(outputs.logits, labels)
        if num_items_in_batch is not None:
            loss = loss_sum / num_items_in_batch
            if self.trainer is not None:
                loss = loss * self.trainer.data_parallel_scale()
            self._loss_normalized_by_num_items = True
        else:
            loss = loss_sum / n_tokens.clamp(min=1)
        return (loss, outputs) if return_outputs else loss

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
                and "validation" in self.dataset:
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
        written to ``output_file`` (default ``<output_dir>/eval_generations.jsonl``).
        """
        import json
        import random

        import sacrebleu

        usable = [r for r in records if r.get("instruction") is not None and r.get("response") is not None]
        skipped = len(records) - len(usable)
        if skipped:
            logger.info("generation eval: %d conversation/text rows skipped (instruction/response rows only)", skipped)
        order = list(range(len(usable)))
        random.Random(self.config.seed).shuffle(order)
        chosen = [usable[i] for i in sorted(order[: max_samples or len(usable)])]
        if not chosen:
            raise ValueError("generation eval: no instruction/response rows to generate for")
        self._ensure_model()
        example_tokenizer = self.example_tokenizer()
        # Each row's own system prompt, exactly as its training prompt had it.
        predictions = self.generate_from_prompts(
            [example_tokenizer.encode_prompt(r["instruction"], r.get("system")) for r in chosen],
            max_length=max_length or self.config.eval_generation_max_length,
            batch_size=self.config.per_device_eval_batch_size)
        normalize = self.config.normalizer()
        references = [normalize(r["response"]) for r in chosen]
        predictions_n = [normalize(p) for p in predictions]
        exact = [" ".join(p.split()) == " ".join(r.split()) for p, r in zip(predictions_n, references)]
        metrics = {
            "eval_gen_chrf": sacrebleu.corpus_chrf(predictions_n, [references]).score,
            "eval_gen_bleu": sacrebleu.corpus_bleu(predictions_n, [references], tokenize="intl").score,
            "eval_gen_exact_match": sum(exact) / len(exact),
            "eval_gen_samples": float(len(chosen)),
        }
        output_file = output_file or os.path.join(self.config.output_dir, "eval_generations.jsonl")
        os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
        with open(output_file, "w", encoding="utf-8") as fh:
            for record, prediction, hit in zip(chosen, predictions, exact):
                fh.write(json.dumps({"instruction": record["instruction"], "reference": record["response"],
                                     "prediction": prediction, "exact_match": hit}, ensure_ascii=False) + "\n")
        logger.info("generation eval on %d rows: chrF %.2f, BLEU %.2f, exact match %.1f%% (generations in %s)",
                    len(chosen), metrics["eval_gen_chrf"], metrics["eval_gen_bleu"], 100 * metrics["eval_gen_exact_match"],
                    output_file)
        return metrics

    def _inference_trainer(self):
        """A Trainer for evaluation only (after load_model, with no training data loaded)."""
        from transformers import TrainingArguments

        kwargs = self.config.to_training_arguments_kwargs()
        kwargs.update(eval_strategy="no", report_to="none")
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith(("activation_checkpointing", "gradient_checkpointing"))}
        self.trainer = SFTHFTrainer(
            model=self.model, args=TrainingArguments(**kwargs),
            data_collator=self.data_collator(),
            processing_class=self.tokenizer, owner=self,
        )
        return self.trainer

    # -- generation ---------------------------------------------------------------------------------
    def _ensure_model(self) -> None:
        if self.model is None:
            self.setup_model()

    def stop_token_ids(self) -> List[int]:
        ids = [self.example_tokenizer().end_id]
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def generate_response(self, instruction: str, max_length: int = 512, **kwargs) -> str:
        """Generate the response to one instruction, formatted exactly as in training.

        ``max_length`` is the maximum number of generated tokens. ``kwargs`` go to
        ``model.generate`` (``do_sample``, ``temperature``, ``top_p``, ``repetition_penalty`` ...).
        """
        return self.batch_generate([instruction], max_length=max_length, batch_size=1, **kwargs)[0]

    @torch.no_grad()
    def batch_generate(self, instructions: List[str], max_length: int = 512, batch_size: int = 4, **kwargs) -> List[str]:
        """Generate responses for many instructions, ``batch_size`` at a time, left-padded.

        With greedy decoding the result for each instruction equals :meth:`generate_response`.
        """
        if isinstance(instructions, str) or not all(isinstance(i, str) for i in instructions):
            raise TypeError("batch_generate expects a list of instruction strings")
        self._ensure_model()
        example_tokenizer = self.example_tokenizer()
        return self.generate_from_prompts([example_tokenizer.encode_prompt(text) for text in instructions],
                                          max_length=max_length, batch_size=batch_size, **kwargs)

    @torch.no_grad()
    def generate_from_prompts(self, prompts: List[List[int]], max_length: int = 512, batch_size: int = 4,
                              **kwargs) -> List[str]:
        """Generate from already formatted prompt ids (as ``ExampleTokenizer.encode_prompt`` makes them)."""
        if max_length < 1 or batch_size < 1:
            raise ValueError(f"max_length and batch_size must be positive (got {max_length}, {batch_size})")
        self._ensure_model()
        from tqdm.auto import tqdm

        stop_ids = self.stop_token_ids()
        pad_id = self.tokenizer.pad_token_id
        gen_kwargs = dict(kwargs)
        if "do_sample" not in gen_kwargs:
            gen_kwargs["do_sample"] = any(k in gen_kwargs for k in SAMPLING_KWARGS)
        gen_kwargs.setdefault("max_new_tokens", max_length)
        gen_kwargs.setdefault("eos_token_id", stop_ids)
        gen_kwargs.setdefault("pad_token_id", pad_id)
        gen_kwargs.setdefault("use_cache", True)
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        outputs: List[str] = []
        chunks = range(0, len(prompts), batch_size)
        for start in tqdm(chunks, desc="Generating", disable=len(chunks) < 4):
            chunk = prompts[start:start + batch_size]
            width = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(chunk):
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids):] = 1
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                       **gen_kwargs)
            for row in generated[:, width:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
                outputs.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        if was_training:
            model.train()
        return outputs

    # -- saving -------------------------------------------------------------------------------------
    def _unwrapped_model(self):
        if self.trainer is not None:
            return self.trainer.accelerator.unwrap_model(self.trainer.model)
        return self.model

    def _metadata(self) -> Dict[str, Any]:
        c = self.config
        meta = {
            "instruction_template": c.instruction_template,
            "response_template": c.resolved_response_template,
            "packing": bool(c.packing),
            "max_seq_length": c.max_seq_length,
            "custom_template": c.custom_template,
            "system_prompt": c.system_prompt,
            "end_token": self.tokenizer.convert_ids_to_tokens(self.example_tokenizer().end_id),
            "padding_efficiency": self.padding_efficiency,
            "normalization": {"preset": c.normalization, **c.normalizer().to_dict()},
            "train_on_last_turn_only": bool(c.train_on_last_turn_only),
            "overlong_policy": c.overlong_policy,
        }
        if self.tokenize_report is not None:
            meta["examples"] = dict(self.tokenize_report.examples)
            meta["truncated_examples"] = dict(self.tokenize_report.truncated)
            meta["dropped_examples"] = dict(self.tokenize_report.dropped)
        return meta

    def _restore_from_metadata(self, metadata: Dict[str, Any]) -> None:
        super()._restore_from_metadata(metadata)
        for key in ("instruction_template", "custom_template", "system_prompt", "max_seq_length", "packing",
                    "train_on_last_turn_only", "overlong_policy"):
            if key in metadata and getattr(self.config, key) != metadata[key]:
                logger.info("load_model: using the saved run's %s=%r (config had %r)", key, metadata[key],
                            getattr(self.config, key))
                setattr(self.config, key, metadata[key])
        if metadata.get("response_template"):
            self.config.response_template = metadata["response_template"]
        # Runs saved before normalization existed trained on untouched text: "none", not today's default.
        normalization = metadata.get("normalization") or {"preset": metadata.get("config", {}).get("normalization", "none")}
        # Generation must normalize exactly as training did: take the saved switches, not the preset's.
        from src.data.normalization import SWITCHES

        self.config.normalization = normalization["preset"]
        for switch in SWITCHES:
            if switch in normalization:
                setattr(self.config, "arabic_" + switch, normalization[switch])

    def _write_generation_config(self, output_dir: str) -> None:
        """generation_config.json whose EOS ids include the template's end token (``<|im_end|>`` for ChatML),
        so plain ``transformers`` generation and serving engines stop where ``generate_response`` stops."""
        from transformers import GenerationConfig

        base = getattr(self._unwrapped_model(), "generation_config", None)
        config = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
        existing = config.eos_token_id
        existing = [] if existing is None else ([existing] if isinstance(existing, int) else list(existing))
        config.eos_token_id = existing + [i for i in self.stop_token_ids() if i not in existing]
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        config.save_pretrained(output_dir)


def create_sft_trainer(config: SFTConfig) -> SFTTrainer:
    """Factory function to create an SFT trainer instance."""
    return SFTTrainer(config)
