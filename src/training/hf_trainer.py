"""The ``transformers.Trainer`` subclass our trainers hand back from ``create_trainer``.

It overrides only what must change:

- ``compute_loss`` delegates to the owning :class:`~src.training.base_trainer.BaseTrainer`, so a
  user's ``compute_loss`` override on ``SFTTrainer`` (the specification's ``CustomSFTTrainer``
  example) is what trains. The loss object (``src.training.losses``) is handed to transformers as
  its ``compute_loss_func`` hook, so the Trainer counts ``num_items_in_batch`` (trained tokens in the
  whole accumulated batch, across ranks) for any model; each micro-batch runs inside
  ``loss.accumulated_tokens(num_items_in_batch)``, so the count reaches the loss even through an
  override that does not pass it on.
- evaluation never drops the last batch (the stock loader obeys ``dataloader_drop_last``) and, under
  data parallelism, never counts a row twice (accelerate's ``even_batches`` repeats rows).
- the length-grouped training order of each epoch is a function of the seed and the epoch alone
  (transformers' ``LengthGroupedSampler`` draws from the global random generator, so a run resumed in
  its second epoch saw a different order than an uninterrupted one).
- ``evaluate`` weights every trained token equally across batches (the stock loop averages
  per-batch means), so packed and unpacked evaluation of the same examples give the same
  ``eval_loss``; it adds ``eval_perplexity``. It uses the same loss object as training.
- TensorBoard writes under ``<output_dir>/runs`` even when an evaluation logs before training starts (the stock
  callback opens its writer on the first log line, in ``./runs`` of the working directory, when that line comes
  before ``on_train_begin``: see ``_deferred_tensorboard_class``), and the evaluation of the untrained model
  (step 0) stays in the log history that the loss plot and model card read (the stock ``train()`` starts a new,
  empty history).
- reloading a checkpoint (resume, best checkpoint) does not warn about the tied LM head it never holds
  (``lm_head.weight`` of a model with ``tie_word_embeddings``): only missing keys that are really missing.
- a mixture's rows (``source_names``, ``src.data.mixing``) keep their ``sources`` column, whose per-token expansion
  (``source_ids``) is taken out of every batch before the model sees it: ``evaluate`` adds
  ``eval_<name>_loss``/``_perplexity``/``_tokens`` per source and each training log line ``loss_<name>``, token-weighted
  sums over the steps since the last line, divided once, over all ranks (``losses.SFTLoss.per_source``).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Any, Optional

import torch
from torch.nn.modules.module import _IncompatibleKeys
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.trainer_utils import rotate_checkpoints

from src.data.arrow import SOURCES_COLUMN
from src.models.architectures import unwrap_model
from src.training.guards import check_finite_weights
from src.training.losses import SFTLoss, safe_perplexity, token_loss_sum

logger = logging.getLogger(__name__)


class SFTHFTrainer(Trainer):
    # Set per call in compute_loss: True when the loss was divided by num_items_in_batch.
    loss_is_scaled_for_ga = None

    def __init__(self, *args: Any, owner: Any, sft_loss: SFTLoss, source_names: Optional[list[str]] = None,
                 **kwargs: Any):
        # compute_loss_func: the hook that makes the Trainer count num_items_in_batch for every
        # accumulated batch, whatever the model's forward signature. Our compute_loss calls the owner.
        super().__init__(*args, compute_loss_func=_HookSignature(sft_loss), **kwargs)
        self.owner = owner
        self.sft_loss = sft_loss
        # Our losses always predict labels[i + 1] from position i: count trained tokens that way (the
        # Trainer decides from the model's loss_type otherwise). Loud if transformers renames the switch.
        if not hasattr(self, "_loss_shifts_labels"):
            raise RuntimeError("this transformers version has no Trainer._loss_shifts_labels; the trained-token count "
                               "for gradient accumulation needs review (src/training/hf_trainer.py)")
        self._loss_shifts_labels = True
        self._length_sampler: Optional["EpochSeededLengthGroupedSampler"] = None
        self.add_callback(_SamplerEpoch(self))
        # MoE: the router loss of this process's micro-batches since the last log line (mean per step), see log()
        self._aux_sum: Optional[torch.Tensor] = None
        self._aux_logged_step = 0
        # the log line of the evaluation of the untrained model (step 0, before train()): see _KeepStepZeroEval
        self._eval_before_training: Optional[dict] = None
        self._training = False
        self.add_callback(_KeepStepZeroEval(self))
        _defer_tensorboard(self)
        # A mixture's sources (None: no loss per source). Training: this process's float64 loss sums and trained-token
        # counts per source since the last log line (_source_window) and since train() began (_source_run); after
        # train(), ``source_train_losses``: each source's token-weighted training loss over the run, all ranks.
        self.source_names = list(source_names) if source_names else None
        self._source_window: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._source_run: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.source_train_losses: Optional[dict[str, dict[str, float]]] = None

    def _set_signature_columns_if_needed(self) -> None:
        """The model's forward arguments, plus a mixture's ``sources`` column: the collator turns it into the
        ``source_ids`` that compute_loss takes out of the batch (the stock Trainer drops every other column)."""
        super()._set_signature_columns_if_needed()
        if self.source_names and SOURCES_COLUMN not in self._signature_columns:
            self._signature_columns.append(SOURCES_COLUMN)

    def _take_sources(self, inputs: Any) -> tuple[Any, Optional[torch.Tensor]]:
        """``inputs`` without ``source_ids`` (the model never sees them), and the ``source_ids`` of a mixture's batch."""
        if "source_ids" not in inputs:
            return inputs, None
        source_ids = inputs["source_ids"]
        inputs = {k: v for k, v in inputs.items() if k != "source_ids"}
        return inputs, source_ids if self.source_names else None

    @property
    def engine(self) -> str:
        """The data-parallel engine this run uses: 'fsdp2' (or 'fsdp1'), 'deepspeed-zero<stage>', 'ddp' or 'single'."""
        if self.is_fsdp_enabled:
            return f"fsdp{getattr(self.accelerator.state.fsdp_plugin, 'fsdp_version', 1)}"
        if self.is_deepspeed_enabled:
            return f"deepspeed-zero{self.accelerator.state.deepspeed_plugin.zero_stage}"
        return "ddp" if self.accelerator.num_processes > 1 else "single"

    @property
    def shards_parameters(self) -> bool:
        """Whether the engine shards the parameters themselves (FSDP, ZeRO-3), gathering them around each
        module's forward; ZeRO-1/2 shard only optimizer states and gradients."""
        return self.is_fsdp_enabled or self.engine == "deepspeed-zero3"

    def _save(self, output_dir=None, state_dict=None):
        """The stock save, minus tied copies: a state dict gathered by DeepSpeed holds the tied LM head as a
        separate tensor (equal to the input embeddings), which ``save_pretrained`` cannot recognise as tied and
        would write twice. Dropping it writes the same files as a single-process run."""
        base = unwrap_model(self.model, keep_peft=True)
        if state_dict is not None and not hasattr(base, "peft_config"):  # an adapter's state dict holds no tied copies
            for target, source in (getattr(base, "all_tied_weights_keys", None) or {}).items():
                if target in state_dict and source in state_dict and torch.equal(state_dict[target], state_dict[source]):
                    state_dict = {k: v for k, v in state_dict.items() if k != target}
        return super()._save(output_dir, state_dict)

    def _save_checkpoint(self, model, trial):
        """The stock checkpoint, but never of non-finite weights (an update that overflowed them is refused with
        :class:`~src.training.guards.TrainingDiverged`, so no non-finite checkpoint exists to resume from or be named
        the last good one), and old checkpoints rotated by step number: transformers orders them by modification
        time, so a half-deleted old checkpoint counted as the newest and complete newer ones were deleted."""
        check_finite_weights(self.model, self.accelerator, f"checkpoint-{self.state.global_step}")
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            rotate_checkpoints(output_dir=self.args.output_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._training = True
        self._source_window = self._source_run = None
        try:
            result = super().train(*args, **kwargs)
        finally:
            self._training = False
        if self.source_names:  # every rank gets here (a collective): the run's loss per source
            sums, counts = self._reduced_sources(self._source_run)
            self.source_train_losses = {name: {"loss": sums[i] / counts[i], "tokens": counts[i]}
                                        for i, name in enumerate(self.source_names) if counts[i]}
        return result

    def _reduced_sources(self, totals: Optional[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[float], list[int]]:
        """Per-source sums and counts added over ranks (zeros where this process has none): every rank calls it."""
        n = len(self.source_names)
        sums, counts = totals if totals is not None else (torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.long))
        sums = self.accelerator.reduce(sums.to(self.args.device), "sum")
        counts = self.accelerator.reduce(counts.to(self.args.device), "sum")
        return sums.tolist(), [int(c) for c in counts.tolist()]

    def _add_sources(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        for name in ("_source_window", "_source_run"):
            total = getattr(self, name)
            setattr(self, name, (sums, counts) if total is None else (total[0] + sums, total[1] + counts))

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """The stock warning about a checkpoint's missing and unexpected keys, less the keys that are missing by
        design: a weight tied to another one that the checkpoint does hold (the LM head of a model with
        ``tie_word_embeddings``: ``save_pretrained`` writes the shared tensor once). Any other missing key warns."""
        missing = list(load_result.missing_keys)
        expected = tied_missing_keys(self.model, missing)
        if expected:
            logger.debug("checkpoint without %s: tied to the input embeddings (tie_word_embeddings), as expected",
                         ", ".join(expected))
            load_result = _IncompatibleKeys([k for k in missing if k not in expected], list(load_result.unexpected_keys))
        super()._issue_warnings_after_load(load_result)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        micro_batches = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        self.sft_loss.last_aux = None
        inputs, source_ids = self._take_sources(inputs)
        with self.sft_loss.accumulated_tokens(num_items_in_batch, self.data_parallel_scale(), micro_batches) as step, \
                self.sft_loss.per_source(source_ids, len(self.source_names or ())):
            result = self.owner.compute_loss(model, inputs, return_outputs)
        if self.sft_loss.last_sources is not None and model.training:
            self._add_sources(*self.sft_loss.last_sources)
        # A compute_loss override that returns its own per-micro-batch mean (it never reached the loss
        # object) gets the stock division by the accumulation steps in training_step.
        self.loss_is_scaled_for_ga = step.calls > 0
        aux = self.sft_loss.last_aux
        if aux is not None and model.training:
            aux = aux.float() / micro_batches
            self._aux_sum = aux if self._aux_sum is None else self._aux_sum + aux.to(self._aux_sum.device)
        return result

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """The stock log, plus ``aux_loss`` (MoE: the router load-balancing loss, before its coefficient, mean over
        the steps since the last line and over ranks) beside the training ``loss``, which includes it."""
        if "loss" in logs and self._aux_sum is not None:
            steps = max(1, self.state.global_step - self._aux_logged_step)
            logs["aux_loss"] = self.accelerator.reduce(self._aux_sum.to(self.args.device), "mean").item() / steps
            self._aux_sum, self._aux_logged_step = None, self.state.global_step
        if "loss" in logs and self.source_names and self._training:
            # each source's trained-token loss since the last line: sums and counts over steps and ranks, divided once
            window, self._source_window = self._source_window, None
            sums, counts = self._reduced_sources(window)
            logs.update({f"loss_{name}": sums[i] / counts[i] for i, name in enumerate(self.source_names) if counts[i]})
        super().log(logs, start_time)

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            self._length_sampler = EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths,
                                                                   self.args.data_seed or self.args.seed)
            return self._length_sampler
        return sampler

    def get_eval_dataloader(self, eval_dataset=None):
        """The stock eval dataloader, but never dropping the last batch: ``dataloader_drop_last`` is a
        training setting, and evaluation that silently skips examples reports a wrong loss."""
        drop_last = self.args.dataloader_drop_last
        self.args.dataloader_drop_last = False
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.args.dataloader_drop_last = drop_last

    def _eval_loader_and_model(self, dataset):
        """The evaluation batches of this process (``(batch, is_filler)``) and the model to run them through.

        Each process takes every world_size-th row, so no row is counted twice (accelerate's even_batches
        would repeat rows to even out the last batch). With plain data parallelism (or none) each process
        runs its replica's unwrapped module and no collective runs until the final sum. Engines that shard
        parameters (DeepSpeed, FSDP) gather them inside every forward, so every process must run the same
        number of forwards: processes with fewer rows run filler batches whose labels are all ignored (no
        loss, no tokens, no samples). Single-process multi-GPU (DataParallel) uses the stock loader.
        """
        sharding_engine = self.is_deepspeed_enabled or self.is_fsdp_enabled
        if self.args.n_gpu > 1 and not sharding_engine:
            return ((batch, False) for batch in self.get_eval_dataloader(dataset)), self._wrap_model(self.model, training=False)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        shard = dataset.select(range(rank, len(dataset), world)) if world > 1 else dataset
        loader = DataLoader(shard, batch_size=self.args.eval_batch_size, shuffle=False, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        if not sharding_engine:
            return ((batch, False) for batch in loader), self.model.to(self.args.device)
        model = self._wrap_model(self.model, training=False)
        if len(self.accelerator._models) == 0 and model is self.model:
            if self.is_deepspeed_enabled:
                # Evaluation before training: DeepSpeed has not taken the model yet (transformers leaves it where
                # it was loaded until deepspeed.initialize), and it holds the whole model: run it on this device.
                model = model.to(self.args.device)
            else:
                model = self.accelerator.prepare_model(model, evaluation_mode=True)
        most_rows = -(-len(dataset) // world)
        batches = -(-most_rows // self.args.eval_batch_size)

        def with_fillers():
            n = 0
            for batch in loader:
                n += 1
                yield batch, False
            filler = self.data_collator([dataset[0]])
            filler["labels"] = torch.full_like(filler["labels"], -100)
            for _ in range(batches - n):
                yield filler, True

        return with_fillers(), model

    def data_parallel_scale(self) -> float:
        """Factor that undoes DDP's gradient averaging when the loss is divided by a global token count."""
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            return float(self.accelerator.num_processes)
        return 1.0

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("no evaluation dataset: the data has no validation split and none was passed")
        self._memory_tracker.start()
        dataloader, model = self._eval_loader_and_model(dataset)
        model.eval()
        start = time.time()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.args.device)
        tokens = torch.zeros((), dtype=torch.long, device=self.args.device)
        n_sources = len(self.source_names or ())
        source_sums = torch.zeros(n_sources, dtype=torch.float64, device=self.args.device)
        source_tokens = torch.zeros(n_sources, dtype=torch.long, device=self.args.device)
        samples = 0
        steps = 0
        for batch, filler in dataloader:
            batch, source_ids = self._take_sources(self._prepare_inputs(batch))
            # accelerate.autocast: the bare module is not wrapped in mixed precision until training starts.
            with self.compute_loss_context_manager(), self.accelerator.autocast(), \
                    self.sft_loss.per_source(source_ids, n_sources):
                batch_sum, batch_tokens, _ = self.sft_loss.sums(model, batch)
            loss_sum += batch_sum.double()
            tokens += batch_tokens
            if self.sft_loss.last_sources is not None:
                source_sums += self.sft_loss.last_sources[0].to(source_sums.device)
                source_tokens += self.sft_loss.last_sources[1].to(source_tokens.device)
            if not filler:
                samples += int(batch["labels"].shape[0])
                steps += 1
        loss_sum = self.accelerator.reduce(loss_sum, "sum")
        tokens = self.accelerator.reduce(tokens, "sum")
        loss = (loss_sum / tokens.clamp(min=1)).item()
        runtime = time.time() - start
        n_examples = sum(dataset["num_examples"]) if "num_examples" in dataset.column_names else len(dataset)
        metrics = {
            f"{metric_key_prefix}_loss": loss,
            f"{metric_key_prefix}_perplexity": safe_perplexity(loss),
            f"{metric_key_prefix}_tokens": int(tokens.item()),
            **self._source_metrics(source_sums, source_tokens, metric_key_prefix),
            f"{metric_key_prefix}_runtime": round(runtime, 4),
            f"{metric_key_prefix}_samples_per_second": round(n_examples / runtime, 3) if runtime > 0 else float("inf"),
            f"{metric_key_prefix}_steps_per_second": round(steps / runtime, 3) if runtime > 0 else float("inf"),
        }
        if self.state.epoch is not None:
            metrics["epoch"] = self.state.epoch
        self.log(metrics)
        if eval_dataset is None and metric_key_prefix == "eval" and not self._training and self.state.global_step == 0 \
                and self.state.log_history:
            self._eval_before_training = dict(self.state.log_history[-1])  # the untrained model on the validation split
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics


    def _source_metrics(self, sums: torch.Tensor, tokens: torch.Tensor, prefix: str) -> dict[str, float]:
        """``<prefix>_<name>_loss``, ``_perplexity`` and ``_tokens`` of every source with trained tokens in the
        evaluated rows (sums and counts over all ranks, divided once); nothing without a mixture."""
        if not self.source_names:
            return {}
        sums, tokens = self._reduced_sources((sums, tokens))
        metrics: dict[str, float] = {}
        for i, name in enumerate(self.source_names):
            if tokens[i]:
                loss = sums[i] / tokens[i]
                metrics.update({f"{prefix}_{name}_loss": loss, f"{prefix}_{name}_perplexity": safe_perplexity(loss),
                                f"{prefix}_{name}_tokens": tokens[i]})
        return metrics


def tied_missing_keys(model: Any, missing: list[str]) -> list[str]:
    """The keys of ``missing`` that a model with tied word embeddings does not need from a checkpoint: parameters that
    are the same tensor as another parameter that was loaded (``lm_head.weight`` is ``embed_tokens.weight``)."""
    config = getattr(unwrap_model(model), "config", None)
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    if not missing or not getattr(text_config, "tie_word_embeddings", False):
        return []
    params = dict(model.named_parameters(remove_duplicate=False))
    names: dict[int, list[str]] = {}
    for name, param in params.items():
        names.setdefault(id(param), []).append(name)
    skipped = set(missing)
    return [key for key in missing if key in params
            and any(other not in skipped for other in names[id(params[key])] if other != key)]


def _defer_tensorboard(trainer: Trainer) -> None:
    """Replace transformers' TensorBoard callback (when ``report_to`` has one) by ``DeferredTensorBoard``
    (:func:`_deferred_tensorboard_class`), keeping its place in the callback list."""
    try:
        from transformers.integrations.integration_utils import TensorBoardCallback
    except ImportError:  # pragma: no cover - transformers moved it: the test of the event files says so
        return
    callbacks = trainer.callback_handler.callbacks
    for i, callback in enumerate(callbacks):
        if type(callback) is TensorBoardCallback:
            deferred = _deferred_tensorboard_class()(tb_writer=callback.tb_writer)
            deferred.logging_dir = callback.logging_dir
            callbacks[i] = deferred


@functools.lru_cache(maxsize=None)
def _deferred_tensorboard_class() -> type:
    from transformers.integrations.integration_utils import TensorBoardCallback

    class DeferredTensorBoard(TensorBoardCallback):
        """transformers' TensorBoard callback, minus its writer in the working directory.

        The stock callback decides its folder (``<output_dir>/runs/<date>_<host>``) in ``on_train_begin``; a line
        logged before (an evaluation before training, as the command line runs it) opened a writer on
        ``SummaryWriter``'s default, ``./runs`` of the working directory, which then took every training line too.
        Here the lines logged before training are kept and written, at their step (0), once training has begun: into
        the run's folder, and only after the run has claimed ``output_dir`` (nothing is written into a folder that
        another run holds or that will be refused). Lines after training (the final evaluation) go to the same
        folder. An evaluation that no training follows is not written to TensorBoard (its metrics are returned)."""

        def __init__(self, tb_writer=None):
            super().__init__(tb_writer)
            self.before_training: list[tuple[int, dict]] = []
            self.began = False

        def on_train_begin(self, args, state, control, **kwargs):
            self.began = True
            super().on_train_begin(args, state, control, **kwargs)
            pending, self.before_training = self.before_training, []
            for step, logs in pending:
                super().on_log(args, _StepOf(step), control, logs=logs)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not self.began and self.tb_writer is None:
                if state.is_world_process_zero:
                    self.before_training.append((state.global_step, dict(logs or {})))
                return
            super().on_log(args, state, control, logs=logs, **kwargs)

    return DeferredTensorBoard


class _StepOf:
    """The two fields of ``TrainerState`` that ``TensorBoardCallback.on_log`` reads, for a line logged earlier."""

    is_world_process_zero = True

    def __init__(self, global_step: int):
        self.global_step = global_step


class _KeepStepZeroEval(TrainerCallback):
    """Puts the evaluation of the untrained model (``evaluate()`` before ``train()``, as the command line runs it) at
    the head of the new run's log history, where the stock ``train()`` leaves it out: the loss plot, the model card
    and every checkpoint's ``trainer_state.json`` then start at step 0. Not on resume (the history is the
    checkpoint's), nor when the history already has a step-0 evaluation."""

    def __init__(self, trainer: "SFTHFTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        entry, self.trainer._eval_before_training = self.trainer._eval_before_training, None
        if entry is None or state.global_step != 0:
            return
        if not any(e.get("step") == 0 and "eval_loss" in e for e in state.log_history):
            state.log_history.insert(0, entry)


class _HookSignature:
    """The loss object seen through transformers' ``compute_loss_func(outputs, labels, num_items_in_batch)``.

    Our ``compute_loss`` never calls it (it calls the loss object on the model); it is here so the
    stock Trainer counts trained tokens, and it computes the same loss from full logits should stock
    code ever call it.
    """

    def __init__(self, loss: SFTLoss):
        self.loss = loss

    def __call__(self, outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        loss_sum, tokens = token_loss_sum(outputs["logits"], labels)
        return loss_sum / (num_items_in_batch if num_items_in_batch is not None else tokens.clamp(min=1))


class _SamplerEpoch(TrainerCallback):
    """Tells the length-grouped sampler which epoch starts, from the Trainer's own state.

    The Trainer reaches the sampler through accelerate's ``set_epoch`` chain, which breaks where a resumed
    epoch skips its first batches under several processes (``SkipBatchSampler`` around ``BatchSamplerShard``):
    the sampler then kept epoch 0's order for a resumed later epoch, and the run diverged from the uninterrupted
    one. ``state.epoch`` is the whole number of the epoch at its start, or the resumed fraction inside it.
    """

    def __init__(self, trainer: "SFTHFTrainer"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        sampler = self.trainer._length_sampler
        if sampler is not None:
            sampler.set_epoch(math.floor((state.epoch or 0.0) + 1e-9))


class EpochSeededLengthGroupedSampler(torch.utils.data.Sampler):
    """transformers' length grouping (shuffle, sort within mega-batches, longest batch first), with the
    shuffle of epoch ``e`` drawn from a generator seeded with ``seed + e``: the order never depends on what
    else consumed random numbers, so a resumed run sees exactly the batches an uninterrupted run sees."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        self.batch_size, self.lengths, self.seed = batch_size, list(lengths), seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))
