"""``BaseTrainer``: model + tokenizer loading, LoRA, and the train / evaluate / save pipeline.

Method-specific trainers (``SFTTrainer``) supply ``_get_training_method``, ``create_trainer`` and
what they write into their metadata; everything else lives here once. Writing goes through
:mod:`src.training.persistence` (rank-aware), the loss through :mod:`src.training.losses`, the
translation to ``TrainingArguments`` through :mod:`src.training.training_args`.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
from abc import ABC, abstractmethod
from typing import Any, Optional

import torch
from peft import PeftModel
from transformers import EarlyStoppingCallback, TrainerCallback, TrainerState, TrainingArguments, set_seed

from src.config import BaseConfig
from src.distributed import configure_cpu_threads, is_main_process, main_decides, main_process_first, world_size
from src.models.architectures import check_architecture, is_moe, model_config, router_aux_loss_coef, unwrap_model
from src.models.loading import (
    TINY_MODEL_FILES,
    ModelLoadError,
    apply_lora,
    check_bf16,
    check_liger,
    check_quantization,
    load_causal_lm,
    load_tokenizer,
    quantization_config,
    resolve_model_path,
)
from src.models.tiny import TINY_MODELS, build_tiny_model, tiny_config
from src.training import hub, persistence
from src.training.guards import (
    DivergenceCallback,
    InterruptCallback,
    TrainingDiverged,
    TrainingInterrupted,
    check_finite_weights,
    interrupt_signals,
)
from src.training.losses import SFTLoss, build_loss
from src.training.report import early_stop_text
from src.training.training_args import training_arguments_kwargs

logger = logging.getLogger(__name__)


def _json_text_for_arrow(record: dict) -> dict:
    """``record`` with its tool definitions, tool calls and template variables as JSON text (the loader parses them
    back)."""
    if "tools" not in record and "messages" not in record and "chat_template_kwargs" not in record:
        return record
    record = dict(record)
    for key in ("tools", "chat_template_kwargs"):
        if record.get(key) is not None:
            record[key] = json.dumps(record[key], ensure_ascii=False)
    if record.get("messages") is not None:
        record["messages"] = [{**m, "tool_calls": json.dumps(m["tool_calls"], ensure_ascii=False)} if m.get("tool_calls")
                              else m for m in record["messages"]]
    return record


FSDP_NEEDS_ACCELERATOR = (
    "accelerate selects FSDP for accelerator devices only (CUDA, XPU, NPU, ...); on CPUs it runs plain DDP instead, "
    "every rank holding the whole model, which is not what fsdp_config asks for. On CPUs use deepspeed "
    "(configs/deepspeed_zero2.json or configs/deepspeed_zero3.json, which run there) or drop fsdp_config")


def check_fsdp_possible(fsdp_config: Optional[str]) -> None:
    """Refuse FSDP where accelerate would silently run unsharded (no accelerator), before any data is loaded."""
    if fsdp_config and not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())):
        raise ValueError(f"SFTConfig.fsdp_config={fsdp_config!r}: no GPU here. {FSDP_NEEDS_ACCELERATOR}")


class BaseTrainer(ABC):
    """Shared pipeline: ``load_dataset`` -> ``setup_model`` -> ``create_trainer`` -> train -> ``save_model``."""

    config_class: type = BaseConfig

    def __init__(self, config: BaseConfig):
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__} instance, got {type(config).__name__}"
            )
        self.config = config
        self.model: Any = None
        self.tokenizer: Any = None
        self.trainer: Any = None
        self.dataset: Any = None
        self.base_model_path: Optional[str] = None
        self.training_completed_at: Optional[str] = None
        self.train_result: Any = None
        self.final_metrics: dict[str, float] = {}
        # set when early stopping ended training before max_steps/epochs (EarlyStopReport): step, reason, best checkpoint
        self.early_stopped: Optional[dict[str, Any]] = None
        self._saved_dirs: set[str] = set()  # folders this trainer wrote or claimed (no overwrite refusal there)
        self._claimed: set[str] = set()
        self.interrupt = InterruptCallback()
        self.loss: SFTLoss = build_loss(config.loss_type, config.loss_chunk_size)

    # -- hooks for subclasses ------------------------------------------------------------------------
    @abstractmethod
    def _get_training_method(self) -> str:
        """A short name of the method ("sft")."""

    @abstractmethod
    def create_trainer(self, dataset: Any, training_args: Any, callbacks: list | None) -> Any:
        """Build a ready-to-train ``transformers.Trainer`` from a dict of record datasets."""

    def metadata(self) -> dict[str, Any]:
        """Method-specific fields of the saved metadata file."""
        return {}

    def check_quality_gates(self) -> None:
        """Gates on the final evaluation that make a finished run fail (after its model is saved); none here."""

    def restore_from_metadata(self, metadata: dict[str, Any]) -> None:
        """Copy the settings a saved run needs into ``self.config`` (subclasses add theirs)."""
        self.config.use_lora = bool(metadata.get("use_lora", self.config.use_lora))

    def write_generation_config(self, output_dir: str) -> None:
        """Subclasses write a generation_config.json that stops where their format stops."""

    def before_save(self) -> None:
        """Subclasses bring in-memory objects up to date before they are saved (the tokenizer's chat template)."""

    def _check_tokenizer(self) -> None:
        """Subclasses check that the tokenizer can represent their format."""

    # -- data and model ------------------------------------------------------------------------------
    def load_dataset(self) -> Any:
        """Load ``config.dataset_path`` (and ``eval_dataset_path``) into a ``DatasetDict`` of validated records."""
        from datasets import Dataset, DatasetDict

        from src.data.wiring import load_config_records

        records, report = load_config_records(self.config)
        self.load_report = report
        # Columns of every row shape (Dataset.from_list would keep only the first row's keys); a row's absent
        # fields are nulls, which the loader reads as absent again. Free-form JSON (tool definitions, tool-call
        # arguments) travels as JSON text: Arrow would merge the objects of all rows into one struct type and
        # hand every row the other rows' keys as nulls, which chat templates would render.
        def to_dataset(rows: list[dict]) -> Any:
            rows = [_json_text_for_arrow(row) for row in rows]
            keys = list(dict.fromkeys(k for row in rows for k in row))
            return Dataset.from_dict({k: [row.get(k) for row in rows] for k in keys})

        self.dataset = DatasetDict({split: to_dataset(rows) for split, rows in records.items()})
        return self.dataset

    def setup_model(self) -> tuple[Any, Any]:
        """Load (or build, for ``local:tiny-qwen2``) the model and tokenizer; add LoRA when configured."""
        set_seed(self.config.seed)
        c = self.config
        quantized = c.load_in_4bit or c.load_in_8bit
        check_quantization(c.load_in_4bit, c.load_in_8bit)  # before a tiny base model is built into output_dir
        check_liger(c.use_liger_kernel)
        trust = self.config.trust_remote_code
        if self.config.model_name in TINY_MODELS and self.config.tokenizer_name:
            # A small model with a real tokenizer's vocabulary (a fast trial on real text): built for that tokenizer.
            self.tokenizer = load_tokenizer(self.config.tokenizer_name, trust_remote_code=trust)
            self.base_model_path = build_tiny_for_tokenizer(self.config.model_name, self.tokenizer,
                                                            self.config.output_dir, self.config.seed)
        else:
            if self.config.model_name in TINY_MODELS:
                drop_tiny_built_for_tokenizer(os.path.join(self.config.output_dir, "base_model"))
            self.base_model_path = resolve_model_path(
                self.config.model_name, self.config.output_dir, self.config.dataset_path, self.config.seed
            )
            self.tokenizer = load_tokenizer(self.config.tokenizer_name or self.base_model_path, trust_remote_code=trust)
        model = load_causal_lm(self.base_model_path, trust_remote_code=trust, attn_implementation=c.attn_implementation,
                               bf16=c.resolved_bf16, bf16_weights=c.use_lora,
                               quantization=quantization_config(c.load_in_4bit, c.load_in_8bit) if quantized else None)
        check_vocabulary_fits(self.tokenizer, model, c.tokenizer_name or self.base_model_path, c.model_name)
        if c.use_lora:
            model = apply_lora(model, c.lora_r, c.lora_alpha, c.lora_dropout, c.lora_target_modules,
                               c.gradient_checkpointing, use_dora=c.use_dora, use_rslora=c.use_rslora,
                               modules_to_save=c.modules_to_save, quantized=quantized, train_router=c.lora_train_router)
        self.model = model
        self._configure_architecture()
        self._check_tokenizer()
        return self.model, self.tokenizer

    def _configure_architecture(self) -> None:
        """Warn once for an unverified architecture; give the loss the MoE router-loss weight (``src.models.architectures``)."""
        check_architecture(self.model)
        config = model_config(self.model)
        coef = self.config.router_aux_loss_coef
        self.loss.router_aux_coef = (router_aux_loss_coef(config) if coef is None else float(coef)) if is_moe(config) else 0.0
        if is_moe(config):
            logger.info("MoE: router load-balancing loss %s", f"added with coefficient {self.loss.router_aux_coef:g}"
                        if self.loss.router_aux_coef else "off (router_aux_loss_coef=0)")

    # -- training arguments --------------------------------------------------------------------------
    def environment(self) -> dict[str, Any]:
        """``TrainingArguments`` that depend on this machine rather than on the config."""
        cuda = torch.cuda.is_available()
        env: dict[str, Any] = {"dataloader_pin_memory": self.config.dataloader_pin_memory and cuda}  # pinning helps host->GPU only
        if world_size() > 1 and not cuda:
            # Launched with torchrun on CPUs: without use_cpu, transformers leaves parallel_mode
            # NOT_PARALLEL and each rank trains on its own shard with no gradient sync at all.
            env["use_cpu"] = True
        return env

    def get_training_arguments(self) -> Any:
        """``TrainingArguments`` with the settings of the specification.

        Gradient checkpointing, ``label_names=["labels"]``, ``remove_unused_columns=True``,
        ``dataloader_drop_last`` and length grouping all come from the config, translated to the
        installed transformers' names in ``src.training.training_args``; ``environment`` adds what depends on the
        machine. Length grouping (``group_by_length``, on by default) also applies to packed rows, where it batches
        the few part-filled rows together instead of next to full ones.
        """
        return TrainingArguments(**training_arguments_kwargs(self.config, self.environment()))

    def get_callbacks(self) -> list:
        """Stop cleanly on Ctrl-C/SIGTERM and before a non-finite update (``src.training.guards``); early
        stopping on eval_loss when ``early_stopping_patience`` is set."""
        callbacks = [self.interrupt, DivergenceCallback()]
        if self.config.early_stopping_patience is not None:
            early_stopping = EarlyStoppingCallback(self.config.early_stopping_patience,
                                                   self.config.early_stopping_threshold)
            callbacks += [early_stopping, EarlyStopReport(self, early_stopping)]
        return callbacks

    # -- the pipeline --------------------------------------------------------------------------------
    def prepare(self) -> Any:
        """Everything up to a ready ``transformers.Trainer`` (data, model, arguments); idempotent."""
        if self.trainer is not None:
            return self.trainer
        self.config.validate()
        _check_reporters(self.config.report_to)
        if self.model is None:
            check_bf16(self.config.resolved_bf16)  # before loading any data
            check_quantization(self.config.load_in_4bit, self.config.load_in_8bit)
        check_fsdp_possible(self.config.fsdp_config)
        configure_cpu_threads()  # CPU training: threads chosen for this machine, said in one line
        dataset = self.dataset if self.dataset is not None else self.load_dataset()
        if self.model is None:
            self.setup_model()
        self.trainer = self.create_trainer(dataset, self.get_training_arguments(), self.get_callbacks())
        alpha = getattr(self.config, "neftune_noise_alpha", None)
        if alpha is not None:
            logger.info("NEFTune on: uniform noise (alpha=%g, scaled by 1/sqrt(sequence length x hidden size)) is added "
                        "to the input embeddings in training steps only; evaluation and generation see none", alpha)
        if self.config.fsdp_config and not self.trainer.is_fsdp_enabled:
            raise ValueError(f"SFTConfig.fsdp_config={self.config.fsdp_config!r}: accelerate did not select FSDP on this "
                             "machine, so the model would not be sharded; refusing to train unsharded")
        return self.trainer

    def train(self) -> Any:
        """Run the whole pipeline: load data and model, train, save to ``config.output_dir``.

        Before anything is loaded, the output folder is claimed (``persistence.claim_output_dir``: foreign
        files, a live run, an existing model are refused). Ctrl-C or SIGTERM stops at the next step with a
        resumable checkpoint and raises :class:`~src.training.guards.TrainingInterrupted`; non-finite
        gradients stop before the update with :class:`~src.training.guards.TrainingDiverged` (nothing is
        saved then, the last checkpoint stays the last good one).
        """
        output_dir = self.config.output_dir
        if self.config.push_to_hub:
            hub.check_hub_reachable(self.config.hub_model_id, output_dir)  # before hours of training, not after
        checkpoint, changed = self.resume_plan()
        resume = None
        if checkpoint is not None:
            resume = {"from": os.path.abspath(checkpoint), "step": persistence.checkpoint_step(checkpoint),
                      "changed": changed}
            logger.info("Resuming from %s (step %d)%s", checkpoint, resume["step"],
                        "; changed: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()) if changed else "")
        self.claim_output_dir(resuming=checkpoint is not None, resume=resume)
        try:
            trainer = self.prepare()
            step = persistence.checkpoint_step(checkpoint) if checkpoint is not None else None
            if step is not None and 0 < trainer.args.max_steps <= step:
                # transformers would train one step more from here; there is nothing left to train.
                if os.path.isfile(os.path.join(output_dir, persistence.metadata_filename(self._get_training_method()))):
                    logger.warning("%s is already at step %d of max_steps=%d and the run was saved: nothing to train",
                                   checkpoint, step, trainer.args.max_steps)
                    return None
                logger.warning("%s is already at step %d of max_steps=%d: nothing to train; saving its weights as "
                               "the final model (the run stopped before its final save)", checkpoint, step,
                               trainer.args.max_steps)
                trainer._load_from_checkpoint(checkpoint)
                # the checkpoint's log history, for the loss plot and model card of the final save
                trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
                self.training_completed_at = persistence.utc_now()
                self.final_metrics = self.evaluate_model() if trainer.eval_dataset is not None else {}
                self.save_model()
                return None
            try:
                with interrupt_signals(self.interrupt):
                    self.train_result = trainer.train(resume_from_checkpoint=checkpoint)
            except TrainingDiverged as exc:
                last = persistence.last_complete_checkpoint(output_dir)
                raise TrainingDiverged(f"{exc}; last good checkpoint: {last or 'none'}") from None
            if self.interrupt.signum and self.interrupt.stopped_at is None:
                # The signal came after the last step: every step ran, so the run finishes and saves.
                logger.warning("a stop signal arrived after the last training step; finishing the run")
            elif self.interrupt.signum:
                step = self.interrupt.stopped_at
                saved = os.path.join(output_dir, f"checkpoint-{step}")
                raise TrainingInterrupted(self.interrupt.signum, step,
                                          saved if persistence.checkpoint_problem(saved) is None else None)
            self.training_completed_at = persistence.utc_now()
            self.final_metrics = {"train_loss": float(self.train_result.training_loss)}
            failure = None
            if trainer.eval_dataset is not None:
                try:
                    self.final_metrics.update(self.evaluate_model())
                except BaseException as exc:  # the trained model is saved whatever the final evaluation does, Ctrl-C included
                    logger.error("final evaluation failed (%s); saving the trained model anyway", exc)
                    failure = exc
            self.save_model()
            if failure is not None:
                raise failure
            self.check_quality_gates()  # after saving (nothing is lost), before anything is pushed
            if self.config.push_to_hub:
                self.push_to_hub()
            return self.train_result
        except Exception as exc:
            if not persistence.no_space_left(exc):
                raise
            last = persistence.last_complete_checkpoint(output_dir)
            raise ValueError(f"No space left on device while writing to {output_dir} ({type(exc).__name__}); the last "
                             f"complete checkpoint is {last or 'none'}. Free space, then resume with "
                             "resume_from_checkpoint='last'") from None
        finally:
            persistence.release_output_dir(output_dir)

    def push_to_hub(self, output_dir: Optional[str] = None) -> None:
        """Upload the saved run to ``config.hub_model_id`` (main process; every rank raises the same error)."""
        folder = output_dir or self.config.output_dir

        def push() -> None:
            url = hub.push_folder(folder, self.config.hub_model_id, private=self.config.hub_private_repo)
            logger.info("pushed %s to %s", folder, url)

        main_decides(push)

    def evaluate_model(self, eval_dataset: Any = None) -> dict[str, float]:
        """Evaluation metrics of the current model (subclasses add method-specific ones)."""
        trainer = self.prepare()
        return {k: float(v) for k, v in trainer.evaluate(eval_dataset).items()}

    def resume_plan(self) -> tuple[Optional[str], dict]:
        """The checkpoint this run continues (None: a new run) and the settings that changed since it was written;
        a checkpoint of a run with other settings is refused (``persistence.check_resume``), before anything loads."""
        checkpoint = self._resume_checkpoint()
        if checkpoint is None:
            return None, {}
        allowed = getattr(self.config, "resume_allow_changes", None) or ()
        return checkpoint, persistence.check_resume(checkpoint, self.config.to_dict(), allowed)

    def preflight(self) -> None:
        """Every check that needs no data and no model, writing nothing: the checkpoint to resume and its settings,
        and the output folder (the command line runs it before reading any data)."""
        checkpoint, _ = self.resume_plan()
        self.claim_output_dir(resuming=checkpoint is not None, write=False)

    def claim_output_dir(self, resuming: bool = False, write: bool = True, resume: Optional[dict] = None) -> None:
        """Check and claim ``config.output_dir`` once, before anything is loaded (``persistence.claim_output_dir``);
        the lock is released when training ends or, after evaluation-only use, when the process exits.
        ``write=False`` only checks: the command line refuses a wrong folder before reading any data, and
        writes nothing there until training starts."""
        output_dir = self.config.output_dir
        if output_dir in self._claimed:
            return
        persistence.claim_output_dir(output_dir, self._get_training_method(), self.config.overwrite_output_dir, resuming,
                                     write=write, config=self.config.to_dict(), resume=resume)
        if not write:
            return
        self._claimed.add(output_dir)
        self._saved_dirs.add(output_dir)
        atexit.register(persistence.release_output_dir, output_dir)

    def compute_loss(self, model, inputs, return_outputs=False):
        """Shifted next-token cross-entropy over trained tokens (labels != -100).

        The loss object chosen by ``config.loss_type`` (``src.training.losses``) computes it; evaluation
        uses the same object. During training each micro-batch's summed token loss is divided by the
        trained tokens of the whole accumulated batch (all micro-batches and ranks), so 4 micro-batches of
        1 give the same gradients as 1 batch of 4; called directly (no training step), it is the mean over
        this batch's trained tokens, as in the specification. ``return_outputs=True`` returns
        ``(loss, outputs)`` with real ``outputs.logits`` (computed on every position for that call).
        """
        result = self.loss(model, inputs, return_outputs=return_outputs)
        return (result.loss, result.outputs) if return_outputs else result.loss

    def _resume_checkpoint(self) -> Optional[str]:
        """``config.resume_from_checkpoint`` as a directory (``'last'`` = newest complete checkpoint-* in output_dir)."""
        wanted = self.config.resume_from_checkpoint
        if not wanted:
            return None
        output_dir = self.config.output_dir
        if wanted == "last":
            last = persistence.last_complete_checkpoint(output_dir)
            if last is None:
                raise ValueError(f"resume_from_checkpoint='last' found no checkpoint to resume from: {output_dir} has no "
                                 "complete checkpoint-* directory")
            return last
        if not os.path.isdir(wanted):
            raise ValueError(f"resume_from_checkpoint: {wanted!r} is not a checkpoint directory")
        problem = persistence.checkpoint_problem(wanted)
        if problem:
            raise ValueError(f"resume_from_checkpoint: {wanted} is not a complete checkpoint: {problem}")
        return wanted

    # -- saving and loading ------------------------------------------------------------------------
    def unwrapped_model(self) -> Any:
        """The model outside the engines' wrappers, peft (and torch.compile) kept (``src.models.architectures.unwrap_model``)."""
        return unwrap_model(self.trainer.model if self.trainer is not None else self.model, keep_peft=True,
                            keep_torch_compile=True)

    def save_model(self, output_dir: Optional[str] = None) -> None:
        """Save weights (LoRA adapter or full model, safetensors), tokenizer, config and metadata.

        Call it on every process: the main process writes, the others wait (``src.training.persistence``).
        """
        if self.model is None:
            raise ValueError("save_model: there is no model yet; call train() or load_model() first")
        check_finite_weights(self.trainer.model if self.trainer is not None else self.model,
                             self.trainer.accelerator if self.trainer is not None else None, "the final model")
        persistence.save_run(self, output_dir or self.config.output_dir)

    def read_metadata(self, path: str) -> dict[str, Any]:
        return persistence.read_metadata(path, self._get_training_method())

    def load_model(self, path: str, dtype: Any = None) -> None:
        """Restore a run written by :meth:`save_model` (weights, tokenizer, formatting settings).

        ``dtype`` (a torch dtype or "auto") overrides the precision the config implies (float32, or
        bfloat16 with ``bf16``)."""
        metadata = self.read_metadata(path)
        self.restore_from_metadata(metadata)
        check_bf16(self.config.resolved_bf16)
        trust = self.config.trust_remote_code
        self.tokenizer = load_tokenizer(path, trust_remote_code=trust)
        # The metadata says what the run saved; files left beside it (an older adapter) must not decide.
        is_adapter = metadata.get("use_lora")
        if is_adapter is None:
            is_adapter = os.path.isfile(os.path.join(path, "adapter_config.json"))
        if is_adapter and not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ModelLoadError(f"load_model: {path} says it holds a LoRA adapter but has no adapter_config.json")
        if is_adapter:
            base = metadata.get("base_model")
            if base and not os.path.isabs(base) and os.path.isdir(os.path.join(path, base)):
                base = os.path.join(path, base)
            if not base:
                raise ModelLoadError(f"load_model: {path!r} holds a LoRA adapter but its metadata names no base model")
            if (os.path.isabs(base) or base == "base_model") and not os.path.isdir(base):
                raise ModelLoadError(f"load_model: {path} is a LoRA adapter on the base model folder {base}, which is "
                                     "missing (moved or deleted); put the base model back there, or export the run "
                                     "(train_sft.py export) where its base exists")
            base_model = load_causal_lm(base, trust_remote_code=trust, attn_implementation=self.config.attn_implementation,
                                        bf16=self.config.resolved_bf16, dtype=dtype)
            self.model = PeftModel.from_pretrained(base_model, path)
            self.base_model_path = base
        else:
            self.model = load_causal_lm(path, trust_remote_code=trust, attn_implementation=self.config.attn_implementation,
                                        bf16=self.config.resolved_bf16, dtype=dtype)
            self.base_model_path = path
        self.model.eval()
        self.trainer = None
        self._configure_architecture()
        self._check_tokenizer()
        logger.info("Loaded %s from %s", "LoRA adapter" if self.config.use_lora else "model", path)


TINY_TOKENIZER_MARKER = "tiny_tokenizer.json"  # in a tiny base model built for tokenizer_name: which vocabulary


def _vocabulary_fingerprint(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def build_tiny_for_tokenizer(model_name: str, tokenizer: Any, output_dir: str, seed: int) -> str:
    """``<output_dir>/base_model``: the tiny random-init model of ``model_name`` (``local:tiny-qwen2``, ...) with one
    embedding row per id of ``tokenizer`` (a real Qwen tokenizer: 151,665 rows), the tokenizer saved beside it.

    A complete folder built for the same family and vocabulary is reused; anything else there (the default tiny
    build, another tokenizer's) is this project's own build and is built again: into a temporary sibling, renamed
    into place, so a folder is never half-built. Under torchrun the main process builds, the others wait."""
    family = TINY_MODELS[model_name]
    path = os.path.join(output_dir, "base_model")
    wanted = {"family": family, "vocab_size": len(tokenizer), "vocabulary_sha256": _vocabulary_fingerprint(tokenizer),
              "tokenizer": getattr(tokenizer, "name_or_path", None)}
    with main_process_first():
        built = persistence.read_json_object(os.path.join(path, TINY_TOKENIZER_MARKER))
        complete = all(os.path.isfile(os.path.join(path, f)) for f in TINY_MODEL_FILES)
        if complete and built is not None and all(built.get(k) == wanted[k] for k in ("family", "vocab_size",
                                                                                       "vocabulary_sha256")):
            return path
        if os.path.isdir(path):
            logger.warning("%s holds another tiny build (%s): building local:tiny-%s for the tokenizer %s", path,
                           f"for the tokenizer {built.get('tokenizer')}" if built else "with its own tokenizer", family,
                           wanted["tokenizer"])
            shutil.rmtree(path)
        logger.info("Building the tiny random-init %s model in %s with the vocabulary of %s (%d tokens: %s parameters "
                    "in the embeddings)", family, path, wanted["tokenizer"], len(tokenizer),
                    f"{len(tokenizer) * tiny_config(family, 8).hidden_size:,}")
        tmp = f"{path}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_model(family, None, tmp, tokenizer=tokenizer, seed=seed)
        with open(os.path.join(tmp, TINY_TOKENIZER_MARKER), "w", encoding="utf-8") as fh:
            json.dump(wanted, fh, ensure_ascii=False, indent=2)
        os.replace(tmp, path)
    return path


def drop_tiny_built_for_tokenizer(path: str) -> None:
    """Remove a tiny base model built for a tokenizer_name that this run no longer gives, so the default tiny model
    (with its own tokenizer) is built there again instead of the other vocabulary being reused."""
    with main_process_first():
        if is_main_process() and os.path.isfile(os.path.join(path, TINY_TOKENIZER_MARKER)):
            logger.warning("%s was built for tokenizer_name=%s; this run gives none: building the default tiny model "
                           "again", path, (persistence.read_json_object(os.path.join(path, TINY_TOKENIZER_MARKER)) or {}).get("tokenizer"))
            shutil.rmtree(path)


def check_vocabulary_fits(tokenizer: Any, model: Any, tokenizer_name: str, model_name: str) -> None:
    """Refuse, before any training, a tokenizer with ids the model has no embedding row for (the forward pass would
    end in ``IndexError: index out of range in self`` on the first such token, or never see it)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:
        return
    vocab = tokenizer.get_vocab()
    largest = max(max(vocab.values(), default=-1), len(tokenizer) - 1)
    if largest >= rows:
        hint = (" (local:tiny-* models are built with the vocabulary of tokenizer_name when it is given)"
                if model_name in TINY_MODELS else "")
        raise ModelLoadError(
            f"tokenizer {tokenizer_name!r} has ids up to {largest:,} but model {model_name!r} has only {rows:,} "
            f"embedding rows: its ids past {rows - 1:,} cannot be embedded; use the tokenizer the model was trained "
            f"with (leave tokenizer_name unset) or a model built for this tokenizer{hint}")


class EarlyStopReport(TrainerCallback):
    """Says in one log line when early stopping ends training, why, and which checkpoint the run keeps, and records it
    as ``owner.early_stopped`` (saved in the run's metadata and model card, printed in the end-of-run summary).
    transformers' ``EarlyStoppingCallback`` only sets ``should_training_stop``: the progress bar stops where it is.

    Goes after that callback in the list (it reads what the evaluation decided). The line comes once the stopping
    step's checkpoint is saved (``on_save``; ``on_train_end`` without one): only then are the best metric and
    checkpoint final (the stopping evaluation itself may be the best, by less than the threshold)."""

    def __init__(self, owner: "BaseTrainer", early_stopping: Any):
        self.owner = owner
        self.early_stopping = early_stopping
        self.training = False
        self.pending: Optional[dict[str, Any]] = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.training, self.pending = True, None
        self.owner.early_stopped = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        patience = self.early_stopping.early_stopping_patience
        if not (self.training and control.should_training_stop and self.owner.early_stopped is None
                and self.pending is None and self.early_stopping.early_stopping_patience_counter >= patience
                and state.global_step < state.max_steps):
            return  # not stopping, stopped already, or at the last step anyway (not early)
        metric = args.metric_for_best_model or "eval_loss"
        metric = metric if metric.startswith("eval_") else f"eval_{metric}"
        self.pending = {"step": state.global_step, "max_steps": state.max_steps, "metric": metric, "patience": patience,
                        "threshold": self.early_stopping.early_stopping_threshold,
                        "last_value": (metrics or {}).get(metric)}

    def on_save(self, args, state, control, **kwargs):
        self._report(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._report(state)
        self.training = False

    def _report(self, state) -> None:
        if self.pending is None:
            return
        info, self.pending = self.pending, None
        best = state.best_model_checkpoint
        match = re.search(r"checkpoint-(\d+)$", os.path.normpath(best)) if best else None
        info.update(best_value=state.best_metric, best_step=int(match.group(1)) if match else None, best_checkpoint=best)
        self.owner.early_stopped = info
        logger.info("Early stopping: %s", early_stop_text(info))


REPORTER_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow", "comet_ml": "comet_ml",
                     "clearml": "clearml", "neptune": "neptune", "trackio": "trackio", "swanlab": "swanlab"}


def _check_reporters(report_to: str) -> None:
    """Fail before loading a model when a requested tracker's package is missing."""
    for name in (r.strip() for r in (report_to or "").split(",")):
        package = REPORTER_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise ValueError(f"report_to={name!r} needs the {package} package: pip install {package}, or set report_to='none'")
