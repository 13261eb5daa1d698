"""The SFT loss: shifted next-token cross-entropy over trained (label != -100) tokens, in one object.

The path of one training micro-batch, hop by hop (file: what happens there)::

    transformers Trainer.training_step
     1 -> SFTHFTrainer.compute_loss            hf_trainer.py   THE NORMALISATION IS DECIDED HERE: opens
          (model, inputs, num_items_in_batch)                   loss.accumulated_tokens(num_items_in_batch,
                                                                data-parallel scale, micro-batches), which puts
                                                                the divisor on the loss object (SFTLoss._step)
     2 -> BaseTrainer.compute_loss             base_trainer.py the user's hook (the specification's
                                                                CustomSFTTrainer overrides it); calls the loss
     3 -> SFTLoss.__call__                     losses.py       loss = loss_sum / n x scale inside the block (else
                                                                / this batch's tokens); + MoE router loss
     4 -> TrainedTokensLoss.sums               losses.py       arms the head (head.pending = shifted labels),
                                                                then runs model(**inputs) without labels
     5 -> model forward -> lm_head.forward     losses.py       _TrainedPositionsHead: trained positions only,
                                                                _LinearCrossEntropy (or the head's own forward
                                                                in chunks) -> float32 loss_sum; count in
                                                                head.result
     6 <- outputs.logits = loss_sum            losses.py       the sum leaves through the head's output, shape
                                                                [..., 1], every entry loss_sum; sums() reads
                                                                outputs.logits.reshape(-1)[0]

Evaluation (``SFTHFTrainer.evaluate``) calls hop 4 directly and adds the sums and counts over batches and ranks;
``loss_type="full_logits"`` (and ``return_outputs=True``) replaces hops 4-6 by the model's real logits and
:func:`token_loss_sum`.

Loss per data source (a mixture, ``src.data.mixing``): the batch's ``source_ids`` (the source of every token, from the
collator) never reach the model: hop 1 (or ``evaluate``) takes them out of the batch and opens
``loss.per_source(source_ids, n)`` around the call, and hop 5 (or :meth:`SFTLoss._full_logits`) adds the very
per-token losses whose sum is ``loss_sum`` into one float64 sum and one count per source (``index_add_`` and
``bincount`` over the trained positions: no extra forward, nothing without a mixture), left in
``loss.last_sources``. Summed over sources they are the batch's ``loss_sum`` and trained-token count.

Why the sum leaves as the head's output instead of a separate return value (``outputs.loss`` as TRL patches it):
backward must enter the head through its output, where the hooks of engines that shard parameters (ZeRO-3, FSDP)
gather the head's weight again, and DDP's unused-parameter search walks the graph from the outputs. Why the
normalisation is state on the loss object and not an argument: hop 2 is the user's override, which the
specification shows calling ``compute_loss`` without ``num_items_in_batch``; the block reaches the loss through it.
This contract is pinned by tests/test_losses.py, test_trainer.py, test_sharded.py, test_distributed.py and
test_architectures.py (exact against full logits, one process against DDP, ZeRO and FSDP); a change to it must stay
exact under all of them.

Training (``SFTTrainer.compute_loss``) and evaluation (``SFTHFTrainer.evaluate``) both call the loss
object that :func:`build_loss` makes from ``SFTConfig.loss_type``:

- ``"trained_tokens"`` (default, :class:`TrainedTokensLoss`): the LM head runs only on the final hidden
  states of trained positions (those whose shifted label is not -100), in chunks of ``chunk_size``
  rows, each chunk's logits upcast to float32 for the cross-entropy. Neither the full
  ``[tokens, vocab]`` logits nor their float32 copy ever exist. A plain linear head (every Qwen model)
  goes through :class:`_LinearCrossEntropy`, which computes each chunk's loss and gradients in one pass
  in one float32 buffer, so the head runs once and no logits are kept for backward; any other head
  (an adapter or quantized layer) runs its own forward per chunk, recomputed in backward (activation
  checkpointing) when there is more than one chunk. The head is the model's own output-embedding module,
  called from inside the model's forward, so it runs under the same autocast, through peft, DDP and
  accelerate wrappers, and tied embeddings stay tied.
- ``"full_logits"`` (:class:`FullLogitsLoss`): the specification's computation on ``outputs.logits``.

Both give the same loss and gradients (tests/test_losses.py). A caller that asks for the model outputs
(``compute_loss(..., return_outputs=True)``) gets the full-logits computation, so ``outputs.logits`` is
real.

The normalisation: with no step context the loss is the mean over this batch's trained tokens (the
specification). Inside ``with loss.accumulated_tokens(n, scale):`` (what the Trainer wraps each
micro-batch in) the summed token loss is divided by ``n``, the trained tokens of the whole accumulated
batch over all ranks (transformers' ``num_items_in_batch``), and multiplied by ``scale`` (undoing DDP's
gradient averaging), so 4 micro-batches of 1 give the gradients of 1 batch of 4, and 2 ranks of 2 those
of 1 process of 4. The count reaches the loss even through a ``compute_loss`` override that does not
pass it on (the specification's ``CustomSFTTrainer`` example).

MoE models (Qwen3-MoE, Qwen3.5-MoE): the router load-balancing loss that transformers adds to its own loss
(``output_router_logits=True``: loss = token mean + ``router_aux_loss_coef`` x aux) is added here the same way,
with the model's own coefficient unless ``SFTConfig.router_aux_loss_coef`` overrides it (0: off). Per
micro-batch it is divided by the step's micro-batches and never multiplied by the data-parallel scale, so the
step trains on the mean router loss over micro-batches and ranks: one batch of 4 and 4 micro-batches of 1 weigh
it alike (transformers' own loss adds it once per micro-batch). On a single batch the training loss equals
the model's own loss with labels and ``output_router_logits=True``; evaluation (``eval_loss``, perplexity)
stays the token loss alone. The raw router loss is logged as ``aux_loss``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from src.config.loss_settings import check_loss_settings
from src.data.tokenization import IGNORE_INDEX
from src.models.architectures import unwrap_model

logger = logging.getLogger(__name__)

def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits that predict them: position ``i`` predicts ``labels[i + 1]``.

    Padding with -100 at the end instead of slicing the logits gives identical results without a
    contiguous copy of the ``[tokens, vocab]`` logits (bench/loss_memory.py).
    """
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy (float32) over trained positions, and how many were trained."""
    shifted = shift_labels(labels).to(logits.device)
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), shifted.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, shifted.ne(IGNORE_INDEX).sum()


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy (float32) of every position (0 where not trained), flat, and the shifted labels."""
    shifted = shift_labels(labels).to(logits.device).reshape(-1)
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), shifted, ignore_index=IGNORE_INDEX,
                             reduction="none")
    return losses, shifted


def per_source_sums(losses: torch.Tensor, sources: torch.Tensor, n_sources: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 sum of ``losses`` and their count per source id (``sources``, aligned with ``losses``)."""
    sources = sources.to(losses.device, torch.long)
    sums = torch.zeros(n_sources, dtype=torch.float64, device=losses.device)
    sums.index_add_(0, sources, losses.detach().double())
    return sums, torch.bincount(sources, minlength=n_sources)


def safe_perplexity(loss: float) -> float:
    """exp(loss) without OverflowError: losses above ~709 give ``inf``."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


@dataclass
class LossResult:
    loss: torch.Tensor  # what backward runs on (normalised as the module docstring says)
    loss_sum: torch.Tensor  # summed float32 token cross-entropy of this batch
    num_tokens: torch.Tensor  # trained tokens in this batch
    outputs: Any  # the model's outputs (logits are empty under TrainedTokensLoss)


@dataclass
class _Step:
    num_items_in_batch: Any
    scale: float
    micro_batches: int = 1  # of this optimizer step on this process (the MoE router loss is averaged over them)
    calls: int = 0


class SFTLoss:
    """Base class: owns the normalisation; subclasses compute ``(loss_sum, num_tokens, outputs)``."""

    name = ""

    def __init__(self) -> None:
        self._step: Optional[_Step] = None
        # MoE: the coefficient of the router load-balancing loss added to the token loss (0: not added); set by the
        # trainer from the model's own router_aux_loss_coef (src.models.architectures) or the config's override.
        self.router_aux_coef = 0.0
        self.last_aux: Optional[torch.Tensor] = None  # the router loss of the last call (detached), for logging
        # Loss per data source (see the module docstring): (source id of every token, number of sources) for the calls
        # inside per_source(), and the (float64 loss sums, trained-token counts) per source of the last such call.
        self._sources: Optional[tuple[torch.Tensor, int]] = None
        self.last_sources: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @contextlib.contextmanager
    def per_source(self, source_ids: Optional[torch.Tensor], n_sources: int) -> Iterator[None]:
        """Inside the block, each call also leaves its loss sum and trained tokens per source in ``last_sources``;
        ``source_ids`` (shaped like the labels) gives the source of every token. ``None``: nothing per source."""
        previous = self._sources
        self._sources = (source_ids, n_sources) if source_ids is not None else None
        self.last_sources = None
        try:
            yield
        finally:
            self._sources = previous

    @contextlib.contextmanager
    def accumulated_tokens(self, num_items_in_batch: Any, scale: float = 1.0, micro_batches: int = 1) -> Iterator[_Step]:
        """Divide by ``num_items_in_batch`` (times ``scale``) for calls inside this block.

        Yields a record whose ``calls`` says how many losses were normalised that way, so the Trainer
        knows whether the returned loss is already scaled for gradient accumulation. ``micro_batches``
        is how many micro-batches this process runs for the optimizer step (the router loss is their mean).
        """
        previous = self._step
        self._step = _Step(num_items_in_batch, scale, micro_batches) if num_items_in_batch is not None else None
        try:
            yield self._step or _Step(None, 1.0)
        finally:
            self._step = previous

    def __call__(self, model: Any, inputs: dict, return_outputs: bool = False) -> LossResult:
        """The loss of one batch. ``return_outputs=True`` computes full logits so ``outputs.logits`` is real."""
        router = {"output_router_logits": True} if self.router_aux_coef else {}
        if return_outputs:
            loss_sum, num_tokens, outputs = self._full_logits(model, inputs, router)
        else:
            loss_sum, num_tokens, outputs = self.sums(model, inputs, router)
        step = self._step
        if step is not None:
            loss = loss_sum / step.num_items_in_batch * step.scale
            step.calls += 1
        else:
            loss = loss_sum / num_tokens.clamp(min=1)
        self.last_aux = None
        if self.router_aux_coef:
            aux = getattr(outputs, "aux_loss", None)
            if aux is None:
                raise RuntimeError(f"{type(unwrap_model(model)).__name__} returned no aux_loss with "
                                   "output_router_logits=True: its router load-balancing loss cannot be added; set "
                                   "router_aux_loss_coef=0 to train without it")
            # The model's own weighting (transformers adds coef x aux to the mean token loss), averaged over the
            # micro-batches of a step; not multiplied by the data-parallel scale, so ranks average it as DDP does.
            loss = loss + self.router_aux_coef * aux.to(loss.device) / (step.micro_batches if step is not None else 1)
            self.last_aux = aux.detach()
        return LossResult(loss, loss_sum, num_tokens, outputs)

    def sums(self, model: Any, inputs: dict, extra: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        raise NotImplementedError

    def _full_logits(self, model: Any, inputs: dict, extra: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """:func:`full_logits_sums`; inside :meth:`per_source`, from per-token losses, also summed per source."""
        if self._sources is None:
            return full_logits_sums(model, inputs, extra)
        outputs = model(**_model_inputs(inputs, extra))
        losses, shifted = token_losses(outputs.logits, inputs["labels"])
        trained = shifted.ne(IGNORE_INDEX)
        source_ids, n_sources = self._sources
        sources = shift_labels(source_ids).to(losses.device).reshape(-1)
        self.last_sources = per_source_sums(losses[trained], sources[trained], n_sources)
        return losses.sum(), trained.sum(), outputs


def _model_inputs(inputs: dict, extra: Optional[dict] = None) -> dict:
    # No labels (the model would compute its own loss on full logits), no KV cache (packed rows are
    # isolated only when no cache is built), and not the "skip_logits" that transformers' evaluation adds
    # under use_liger_kernel for liger's fused loss, which we leave off, nor a mixture's "source_ids" (the loss per
    # source reads them; hf_trainer takes them out before this). ``extra``: output_router_logits for MoE.
    return {**{k: v for k, v in inputs.items() if k not in ("labels", "skip_logits", "source_ids")}, "use_cache": False,
            **(extra or {})}


def full_logits_sums(model: Any, inputs: dict, extra: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    outputs = model(**_model_inputs(inputs, extra))
    loss_sum, num_tokens = token_loss_sum(outputs.logits, inputs["labels"])
    return loss_sum, num_tokens, outputs


class FullLogitsLoss(SFTLoss):
    """The specification's loss on ``outputs.logits`` (every position's logits are materialised)."""

    name = "full_logits"

    def sums(self, model: Any, inputs: dict, extra: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        return self._full_logits(model, inputs, extra)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed float32 cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``, chunk by chunk, with the
    gradients computed in the forward pass (as Liger's fused linear cross-entropy does).

    Per chunk of rows: logits in the compute dtype (the autocast dtype when autocast is on, as the model's own head
    would give them), upcast to float32, log-sum-exp and target logit for the loss, then turned in place into
    ``softmax - onehot`` (rows with target -100 zeroed) in one float32 ``[rows, vocabulary]`` buffer, besides which
    only the compute-dtype logits before the upcast and the gradient after the downcast exist (about 6 bytes x
    rows x vocabulary at the peak under bf16 autocast, 4 in float32). It is then multiplied out into
    the hidden-state gradient and the weight (and bias) gradient, accumulated in float32. Only one chunk's logits
    exist at a time, nothing of them is kept for backward, and the head is never run twice; backward only scales
    the stored gradients by the incoming one. The weight gradient buffer exists only when the weight is trained.
    ``token_out`` (a float32 vector as long as ``targets``, or None) receives each row's loss, the very values summed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, compute_dtype, grad_enabled, token_out=None):
        need_hidden, need_weight = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        need_bias = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        # float32 buffers: the step's scale (1/trained tokens) is applied in backward before any rounding
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start:start + chunk_size].to(compute_dtype)
                t = targets[start:start + chunk_size]
                valid = t.ne(IGNORE_INDEX)
                index = t.clamp(min=0).unsqueeze(1)
                # In place on the one float32 [rows, vocabulary] buffer from here on (see the docstring for the rest).
                logits = F.linear(h, w, b).float()
                shifted = logits.sub_(logits.amax(dim=-1, keepdim=True))
                target = shifted.gather(1, index).squeeze(1)
                sum_exp = shifted.exp_().sum(dim=-1)
                losses = (sum_exp.log() - target) * valid
                loss_sum += losses.sum()
                if token_out is not None:
                    token_out[start:start + chunk_size] = losses
                if not (need_hidden or need_weight or need_bias):
                    continue
                grad = shifted.div_(sum_exp.unsqueeze(1))  # softmax
                grad.scatter_add_(1, index, torch.full_like(index, -1, dtype=grad.dtype))
                grad = grad.to(compute_dtype)
                # Rows with an ignored target get no gradient: masked on the [rows, hidden] side, not the big one.
                keep = valid.unsqueeze(1).to(compute_dtype)
                if need_hidden:
                    grad_hidden[start:start + chunk_size] = (grad @ w) * keep
                if need_weight and compute_dtype == torch.float32:
                    grad_weight.addmm_(grad.t(), h * keep)
                elif need_weight:  # a [vocabulary, hidden] product in the compute dtype, added up in float32
                    grad_weight.add_(grad.t() @ (h * keep))
                if need_bias:
                    grad_bias.add_((keep.t() @ grad).squeeze(0))
                del logits, shifted, grad
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        # Kept on ctx rather than saved for backward: they are results, not inputs, and backward scales them in
        # place (no second [vocabulary, hidden] buffer), so it may run only once.
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("backward ran twice through the fused trained-tokens loss (retain_graph); it keeps no "
                               "graph to run again: use loss_type='full_logits' for that")
        grads, ctx.grads = ctx.grads, None
        scale = grad_output.to(torch.float32)
        return (*(None if g is None else g.mul_(scale).to(dtype) for g, dtype in zip(grads, ctx.dtypes)),
                None, None, None, None, None)


def _plain_linear(module: Any) -> bool:
    """A head whose output is exactly ``F.linear(x, weight, bias)``: ``nn.Linear`` (engines' dynamic subclasses
    included) with a floating-point weight and the class's own forward (not a quantized or adapter layer)."""
    forward = getattr(type(module), "forward", None)
    return (isinstance(module, torch.nn.Linear) and forward is torch.nn.Linear.forward
            and module.weight.dtype.is_floating_point)


class _TrainedPositionsHead:
    """Installed once as the output-embedding module's ``forward``; a pass-through unless a loss is pending.

    While ``pending`` holds shift labels, it gathers the hidden states of trained positions, runs the
    original head on them chunk by chunk, stores the trained-token count in ``result`` and returns, as the
    logits, one float32 value per position equal to the summed cross-entropy (the loss is read there, so
    backward enters the head through its output; and DDP's unused-parameter search, which walks the
    graph from the outputs, finds every parameter). It is persistent rather than patched per call so
    that ``torch.compile`` guards see the same function each step.
    """

    def __init__(self, original_forward: Any):
        self.original_forward = original_forward
        # (shift labels, chunk_size, row_multiple, fused, (shifted source ids, number of sources) or None) of the
        # pending loss (see TrainedTokensLoss)
        self.pending: Optional[tuple[torch.Tensor, int, int, bool, Optional[tuple[torch.Tensor, int]]]] = None
        self.result: Optional[torch.Tensor] = None  # the trained-token count of the last loss
        self.source_result: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # its sums and counts per source

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.pending is None:
            return self.original_forward(hidden_states, *args, **kwargs)
        labels, chunk_size, row_multiple, fused, sources = self.pending
        self.pending = None
        flat_labels = labels.to(hidden_states.device).reshape(-1)
        if flat_labels.numel() != hidden_states.shape[:-1].numel():
            raise RuntimeError(f"trained-tokens loss: the head got hidden states of shape {tuple(hidden_states.shape)} "
                               f"for labels of shape {tuple(labels.shape)}; use loss_type='full_logits' for this model")
        positions = flat_labels.ne(IGNORE_INDEX).nonzero().squeeze(1)
        n = positions.numel()
        if row_multiple > 1 and n % row_multiple:
            # Round the row count up (extra rows repeat position 0 with an ignored target): a few shapes
            # instead of a new one every step, for the GPU kernels' and allocator's caches.
            extra = row_multiple - n % row_multiple
            positions = torch.cat([positions, positions.new_zeros(extra)])
        hidden = hidden_states.reshape(-1, hidden_states.size(-1)).index_select(0, positions)
        targets = flat_labels.index_select(0, positions)
        if positions.numel() > n:
            targets[n:] = IGNORE_INDEX
        module = getattr(self.original_forward, "__self__", None)
        # a mixture: the loss of every trained row is kept, to be added up per source (_leave)
        token_out = None if sources is None else torch.zeros(targets.numel(), dtype=torch.float32, device=hidden.device)
        if fused and _plain_linear(module):
            device = hidden.device.type
            compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
            loss_sum = _LinearCrossEntropy.apply(hidden, module.weight, module.bias, targets, chunk_size, compute_dtype,
                                                 torch.is_grad_enabled(), token_out)
            return self._leave(hidden_states, loss_sum, n, sources, positions, token_out)
        chunks = range(0, max(targets.numel(), 1), chunk_size)  # one (empty) chunk when nothing is trained: every parameter gets a grad
        loss_sum = None
        chunk_loss = self._chunk_loss if token_out is None else self._chunk_token_losses
        for start in chunks:
            args_ = (hidden[start:start + chunk_size], targets[start:start + chunk_size])
            if len(chunks) > 1 and torch.is_grad_enabled():
                part = checkpoint(chunk_loss, *args_, use_reentrant=False)
            else:
                part = chunk_loss(*args_)
            if token_out is not None:
                part, losses = part
                token_out[start:start + losses.numel()] = losses.detach()
            loss_sum = part if loss_sum is None else loss_sum + part
        return self._leave(hidden_states, loss_sum, n, sources, positions, token_out)

    def _leave(self, hidden_states: torch.Tensor, loss_sum: torch.Tensor, n: int, sources: Any = None,
               positions: Any = None, token_out: Any = None) -> torch.Tensor:
        self.result = torch.tensor(n, device=loss_sum.device)
        if sources is not None:
            source_ids, n_sources = sources
            trained_sources = source_ids.to(token_out.device).reshape(-1).index_select(0, positions[:n])
            self.source_result = per_source_sums(token_out[:n], trained_sources, n_sources)
        # The loss leaves through the head's (and the model's) output, one float32 value per position: the
        # caller reads it there, so backward enters the head through its output, where the hooks of engines
        # that shard parameters (ZeRO-3, FSDP) gather the head's weight again before it is needed.
        return torch.zeros(*hidden_states.shape[:-1], 1, dtype=loss_sum.dtype, device=loss_sum.device) + loss_sum

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.original_forward(hidden)
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")

    def _chunk_token_losses(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_chunk_loss` from the loss of every row, which it returns too (a mixture's loss per source)."""
        logits = self.original_forward(hidden)
        losses = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
        return losses.sum(), losses.detach()


class TrainedTokensLoss(SFTLoss):
    """LM head and float32 cross-entropy on trained positions only, in chunks (see the module docstring).

    Falls back to :class:`FullLogitsLoss` (with one warning) where the head's output is not the logits
    the loss must see or cannot be reached safely: models without an output-embedding module, models that
    change the logits after the head (``final_logit_softcapping``, ``logit_scale``, ``logits_scaling``),
    and single-process multi-GPU ``DataParallel`` (its per-call replicas would not carry the installed
    head). Engines that shard parameters (ZeRO-3, FSDP2) need no fallback: the loss leaves through the
    head's output, where their hooks gather the weight for backward (tests/distributed/test_sharded.py compares them
    with one process).
    """

    # Config attributes of models that transform the head's output before returning logits.
    LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")

    name = "trained_tokens"

    def __init__(self, chunk_size: int = 256, row_multiple: int = 1, fused: bool = True):
        super().__init__()
        self.chunk_size = chunk_size
        self.row_multiple = row_multiple
        # fused: a plain linear head gets _LinearCrossEntropy (gradients in the forward pass, no recomputation);
        # False, or any other head (adapter, quantized), gets chunks of the head's own forward, checkpointed.
        self.fused = fused
        self._warned = False

    def head(self, model: Any) -> Optional[_TrainedPositionsHead]:
        """The installed head of ``model`` (installed on first use), or None where it cannot be used."""
        if isinstance(model, torch.nn.DataParallel):
            return self._fallback("single-process multi-GPU DataParallel")
        base = unwrap_model(model)
        config = getattr(base, "config", None)
        changed = [a for a in self.LOGIT_POSTPROCESSING if getattr(config, a, None) not in (None, 0, 1, 1.0)]
        if changed:
            return self._fallback(f"{type(base).__name__} changes its logits after the head ({', '.join(changed)})")
        module = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if module is None:
            return self._fallback(f"{type(base).__name__} has no output-embedding module")
        installed = module.__dict__.get("forward")
        if not isinstance(installed, _TrainedPositionsHead):
            installed = _TrainedPositionsHead(module.forward)
            module.forward = installed
        return installed

    def _fallback(self, why: str) -> None:
        if not self._warned:
            logger.warning("loss_type='trained_tokens' is not available (%s): computing the loss on full logits", why)
            self._warned = True
        return None

    def sums(self, model: Any, inputs: dict, extra: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        head = self.head(model)
        if head is None:
            return self._full_logits(model, inputs, extra)
        sources = None if self._sources is None else (shift_labels(self._sources[0]), self._sources[1])
        head.pending = (shift_labels(inputs["labels"]), self.chunk_size, self.row_multiple, self.fused, sources)
        head.result, head.source_result = None, None
        try:
            outputs = model(**_model_inputs(inputs, extra))
        finally:
            head.pending = None
        if head.result is None:
            raise RuntimeError("trained-tokens loss: the model's forward never called its output-embedding module; "
                               "use loss_type='full_logits' for this model")
        num_tokens, head.result = head.result, None
        if sources is not None:
            self.last_sources, head.source_result = head.source_result, None
        return outputs.logits.reshape(-1)[0], num_tokens, outputs


def build_loss(loss_type: str = "trained_tokens", chunk_size: int = 256) -> SFTLoss:
    """The loss object for ``SFTConfig.loss_type`` and ``loss_chunk_size``."""
    check_loss_settings(loss_type, chunk_size)
    return TrainedTokensLoss(chunk_size) if loss_type == "trained_tokens" else FullLogitsLoss()
