"""Stopping well: interrupts (Ctrl-C, SIGTERM) and diverging training.

- **Interrupts**: while ``trainer.train()`` runs, SIGINT and SIGTERM only raise a flag; at the next
  optimizer-step boundary training stops, a resumable checkpoint is written (the Trainer's own
  ``checkpoint-N``), and :class:`TrainingInterrupted` is raised, carrying the signal, the step and the
  checkpoint. The command line prints one line with the resume command and exits 130 (SIGINT) or 143
  (SIGTERM). A second Ctrl-C stops at once (Python's ``KeyboardInterrupt``). Under torchrun every rank
  learns of a signal received by any rank at the same step boundary (one tiny all-reduce per step).
- **Divergence**: before every optimizer step the gradients are checked; a non-finite gradient (which a
  non-finite loss always gives) raises :class:`TrainingDiverged` naming the step *before* the update
  is applied, so the weights in memory and every checkpoint on disk stay finite, and the final model is
  not saved. After an update, weights can still overflow (a finite gradient times a learning rate that
  float32 cannot hold): :func:`check_finite_weights` runs before every checkpoint and before the final save,
  so non-finite weights are never saved, and never named the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from src.distributed import world_size

logger = logging.getLogger(__name__)

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class TrainingInterrupted(Exception):
    """Training stopped at a step boundary after SIGINT/SIGTERM; ``checkpoint`` is where it can resume from."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[str]):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint could be saved"
        super().__init__(f"{name} received: training stopped after step {step}; {where}")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 1)


class TrainingDiverged(RuntimeError):
    """A non-finite gradient (or loss) at a step; the update was not applied."""


class InterruptCallback(TrainerCallback):
    """Turns a pending signal into "save a checkpoint and stop" at the next step end."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None  # set by the signal handler
        self.stopped_at: Optional[int] = None  # the step at which training was stopped

    def _agreed_signal(self, args: Any) -> Optional[int]:
        if world_size() <= 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        signum = self._agreed_signal(args)
        if signum and state.global_step < state.max_steps:  # at the last step the run simply finishes
            self.signum = signum
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


class DivergenceCallback(TrainerCallback):
    """Refuses an optimizer step whose gradients are not finite."""

    warned = False

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        if not grads and not self.warned:
            # DeepSpeed keeps gradients in its own partitions: p.grad is None there.
            logger.warning("divergence check: no gradients visible on the parameters (DeepSpeed?); non-finite "
                           "updates are not caught by this check")
            self.warned = True
        if grads:
            # (what max_grad_norm clipping computes: not finite exactly when some gradient is not)
            total = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)
            if not torch.isfinite(total).item():
                raise TrainingDiverged(
                    f"training diverged at step {state.global_step + 1}: the gradients are not finite (NaN or inf; "
                    "the loss usually is too); the update was not applied and the model was not saved. Lower the "
                    "learning_rate (or set max_grad_norm), then resume from the last checkpoint"
                )
        return control


@contextlib.contextmanager
def interrupt_signals(callback: InterruptCallback) -> Iterator[None]:
    """While inside, SIGINT/SIGTERM set ``callback.signum`` (a second SIGINT raises KeyboardInterrupt)."""
    callback.signum = callback.stopped_at = None  # a signal of an earlier train() call is not this one's
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        if callback.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        callback.signum = signum
        logger.warning("%s received: stopping after this step and saving a checkpoint (Ctrl-C again to stop now)",
                       signal.Signals(signum).name)

    previous = {s: signal.getsignal(s) for s in EXIT_CODES}
    for s in EXIT_CODES:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def check_finite_weights(model: Any, accelerator: Any = None, what: str = "the model") -> None:
    """Raise :class:`TrainingDiverged` when any weight is NaN or infinite (every rank checks its own shards: DeepSpeed's
    ``ds_tensor`` partitions, FSDP2's local tensors; the ranks agree through one all-reduce)."""
    bad = None
    for name, param in model.named_parameters():
        data = getattr(param, "ds_tensor", None)
        data = data if data is not None else param.data
        data = data.to_local() if hasattr(data, "to_local") else data
        if data.numel() and not torch.isfinite(data).all():
            bad = name
            break
    flag = torch.tensor([1.0 if bad else 0.0], device=next(model.parameters()).device)
    if accelerator is not None and accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, "sum")
    if flag.item():
        where = f" ({bad})" if bad else " (on another rank)"
        raise TrainingDiverged(f"the weights are not finite after the last update{where}: {what} was not saved. The update "
                               "overflowed them (a learning_rate too large for the model's dtype?); lower the "
                               "learning_rate, then resume from the last checkpoint")
