"""Attention for packed rows: the fastest *exact* implementation, measured on this machine at start.

Packed rows carry restarting ``position_ids`` and no ``attention_mask``; transformers turns them into a
per-document causal mask for every implementation (``find_packed_sequence_indices``), so each is exact, but
they differ in speed by a large factor on a GPU:

- ``sdpa``: a dense ``[batch, 1, T, T]`` boolean mask, which keeps PyTorch off its FlashAttention kernel (it
  takes the memory-efficient kernel with an attention bias, and computes every block of the causal triangle).
- ``flex_attention``: a ``BlockMask`` of the documents; blocks outside every document are skipped. Compiled
  with Triton on first use (tens of seconds, once per process); PyTorch has no CPU backward for it.
- ``flash_attention_2`` (when the ``flash_attn`` package is installed): the collator flattens each packed batch
  into one row and the varlen kernel attends within documents (``flattens_packed_batches``).

With ``SFTConfig.attn_implementation`` left at ``None`` / ``"auto"`` and packing on, a CUDA run measures the
candidates that this machine can run on the run's own first batch layout (its ``position_ids``), with one
attention layer of the model's geometry (heads, KV heads, head size) in the run's precision, forward and
backward, plus the mask construction each step pays, and switches the model to the one with the least total
time over the run's planned passes (a one-off compilation counts once). A candidate whose
output or input gradient differs from ``sdpa``'s on the same inputs (beyond the precision's rounding) is
excluded, with a warning: it would not be exact. On a CPU ``sdpa`` is the only candidate that trains (flex has no CPU backward,
eager is the same arithmetic, slower), so nothing is measured. The timings and the choice are logged and
written into ``sft_metadata.json`` (``attention``).

An explicit ``attn_implementation`` is used as given; ``flex_attention`` without a CUDA GPU is refused before
training with the reason.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from src.distributed import from_main
from src.models.architectures import unwrap_model

logger = logging.getLogger(__name__)

AUTO = "auto"


@dataclass
class AttentionChoice:
    """What was measured and chosen: per-step milliseconds by implementation, and why others were left out."""

    implementation: str
    step_ms: dict[str, float] = field(default_factory=dict)  # per forward/backward pass, all layers
    setup_ms: dict[str, float] = field(default_factory=dict)  # one-off (compilation), beyond ordinary passes
    excluded: dict[str, str] = field(default_factory=dict)
    measured: bool = False
    planned_passes: Optional[int] = None

    def pick(self, planned_passes: Optional[int] = None) -> str:
        """The measured candidate with the least total attention time: per-pass cost only without a pass count."""
        if planned_passes is None:
            return min(self.step_ms, key=self.step_ms.get)
        return min(self.step_ms, key=lambda k: self.setup_ms.get(k, 0.0) + planned_passes * self.step_ms[k])

    def as_metadata(self) -> dict:
        return {"implementation": self.implementation, "measured": self.measured,
                "estimated_attention_ms_per_step": {k: round(v, 3) for k, v in self.step_ms.items()},
                "setup_ms": {k: round(v, 1) for k, v in self.setup_ms.items()},
                "planned_passes": self.planned_passes, "excluded": dict(self.excluded)}


def flex_attention_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return importlib.util.find_spec("triton") is not None


def flash_attention_available() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def candidate_implementations(device: torch.device) -> list[str]:
    """The exact implementations that can train on ``device``, ``sdpa`` (the reference) first."""
    if device.type != "cuda":
        return ["sdpa"]
    found = ["sdpa"]
    if flex_attention_available():
        found.append("flex_attention")
    if flash_attention_available():
        found.append("flash_attention_2")
    return found


def check_trainable(attn_implementation: Optional[str], device: torch.device) -> None:
    """Refuse, with the reason, an explicit implementation that cannot train on ``device``."""
    if attn_implementation == "flex_attention" and device.type != "cuda":
        raise ValueError("attn_implementation='flex_attention' trains only on a CUDA GPU: PyTorch has no CPU backward "
                         "for flex attention. Use 'sdpa' (or leave it unset) on this machine.")
    if attn_implementation == "flex_attention" and not flex_attention_available():
        raise ValueError("attn_implementation='flex_attention' needs Triton (shipped with PyTorch's CUDA builds); "
                         "it was not found. Use 'sdpa' or leave attn_implementation unset.")


def attention_module_class(model: Any) -> Optional[type]:
    """The class of the model's self-attention module (the first module with ``num_key_value_groups``)."""
    for module in model.modules():
        if hasattr(module, "num_key_value_groups") and hasattr(module, "layer_idx") and hasattr(module, "config"):
            return type(module)
    return None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_packed_attention(config: Any, attention_class: type, position_ids: torch.Tensor, device: torch.device,
                             dtype: torch.dtype, candidates: Sequence[str], *, repeats: int = 3,
                             seed: int = 0, planned_passes: Optional[int] = None) -> AttentionChoice:
    """Time ``candidates`` on packed rows laid out as ``position_ids`` (``[batch, tokens]``) and pick the fastest.

    Each candidate runs the same attention layer (``attention_class(config, layer_idx=0)``, random weights, the
    model's geometry, ``dtype``) forward and backward on the same hidden states; its cost per pass is the
    median layer time times the model's layer count plus the median time to build its mask. ``flash*``
    candidates get the batch flattened into one row, as the collator gives them. The first candidate is the
    reference: another whose output or input gradient differs from it beyond ``dtype``'s rounding is excluded.

    Before timing, each candidate runs once on the layout and once on it one token shorter: compiled kernels
    (flex attention) compile there, for a second length too (after which PyTorch compiles for dynamic shapes),
    instead of inside a training step. What that costs beyond two ordinary passes is the candidate's one-off
    ``setup_ms``; with ``planned_passes`` (forward/backward passes this process will run) the choice minimises
    ``setup_ms + planned_passes x step_ms``, so a short run does not pay a long compilation for nothing.
    """
    layers = int(getattr(config, "num_hidden_layers", 1) or 1)
    batch, tokens = position_ids.shape
    generator = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(batch, tokens, config.hidden_size, generator=generator).to(device=device, dtype=dtype)
    grad = torch.randn(batch, tokens, config.hidden_size, generator=generator).to(device=device, dtype=dtype)
    position_ids = position_ids.to(device)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    reference: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    choice = AttentionChoice(implementation=candidates[0], measured=True, planned_passes=planned_passes)
    torch.manual_seed(seed)
    layer_config = copy.deepcopy(config)
    layer_config._attn_implementation = candidates[0]
    layer = attention_class(layer_config, layer_idx=0).to(device=device, dtype=dtype)
    head_dim = getattr(layer, "head_dim", config.hidden_size // config.num_attention_heads)
    from transformers.masking_utils import create_causal_mask

    def one_pass(flat: bool, length: int) -> tuple[float, float, torch.Tensor, torch.Tensor]:
        """Mask build and layer forward+backward on the first ``length`` tokens of each row: (mask s, layer s, out, grad)."""
        pos = position_ids[:, :length]
        x = hidden[:, :length].detach()
        g = grad[:, :length]
        if flat:
            pos, x, g = pos.reshape(1, -1), x.reshape(1, batch * length, -1), g.reshape(1, batch * length, -1)
        x.requires_grad_(True)
        cos = torch.ones(*pos.shape, head_dim, device=device, dtype=dtype)
        sin = torch.zeros_like(cos)
        _synchronize(device)
        start = time.perf_counter()
        mask = create_causal_mask(config=layer_config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=pos)
        _synchronize(device)
        middle = time.perf_counter()
        out = layer(x, position_embeddings=(cos, sin), attention_mask=mask, position_ids=pos)[0]
        out.backward(g)
        _synchronize(device)
        layer.zero_grad(set_to_none=True)
        return middle - start, time.perf_counter() - middle, out.detach(), x.grad

    for impl in candidates:
        layer_config._attn_implementation = impl
        flat = impl.startswith("flash")
        try:
            started = time.perf_counter()
            one_pass(flat, tokens)
            if tokens > 1:
                one_pass(flat, tokens - 1)
            setup_s = time.perf_counter() - started
            timings = [one_pass(flat, tokens) for _ in range(repeats)]
        except Exception as exc:  # a kernel that cannot run this dtype/shape/GPU is not a candidate
            choice.excluded[impl] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            layer.zero_grad(set_to_none=True)
            continue
        out, x_grad = timings[-1][2], timings[-1][3]
        result = (out.reshape(batch, tokens, -1).float(), x_grad.reshape(batch, tokens, -1).float())
        if reference is None:
            reference = result
        else:
            error = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-6) for a, b in zip(result, reference))
            if not error <= tolerance:
                choice.excluded[impl] = (f"output or gradient differs from {candidates[0]}'s by {error:.2e} (relative), "
                                         "not exact")
                logger.warning("attention %s left out: %s", impl, choice.excluded[impl])
                continue
        mask_s = statistics.median(t[0] for t in timings)
        layer_s = statistics.median(t[1] for t in timings)
        choice.step_ms[impl] = 1000 * (mask_s + layers * layer_s)
        choice.setup_ms[impl] = max(0.0, 1000 * (setup_s - 2 * (mask_s + layer_s)))
    if choice.step_ms:
        choice.implementation = choice.pick(planned_passes)
    return choice


def choose_for_packed_rows(model: Any, position_ids: torch.Tensor, device: torch.device, dtype: torch.dtype,
                           candidates: Optional[Sequence[str]] = None,
                           planned_passes: Optional[int] = None) -> AttentionChoice:
    """Measure the candidates for ``model`` on ``position_ids`` and switch the model to the fastest exact one.

    Where only one candidate exists (every CPU), the model keeps its implementation and nothing is measured.
    Under several processes every rank measures, then all take the main process's choice, so the ranks never
    disagree; a measurement that fails counts as keeping the current implementation, and its rank still joins
    the broadcast, so none is left waiting.
    """
    base = unwrap_model(model)
    current = getattr(base.config, "_attn_implementation", None) or "sdpa"
    candidates = list(candidates) if candidates is not None else candidate_implementations(device)
    if len(candidates) < 2:
        return AttentionChoice(implementation=current)
    started = time.perf_counter()
    try:
        attention_class = attention_module_class(base)
        if attention_class is None:
            choice = AttentionChoice(implementation=current, excluded={"*": "no attention module with the usual attributes"})
        else:
            choice = measure_packed_attention(base.config, attention_class, position_ids, device, dtype, candidates,
                                              planned_passes=planned_passes)
    except Exception as exc:  # every rank must reach the broadcast below, whatever happens here
        logger.warning("could not measure the attention implementations (%s: %s); keeping %s", type(exc).__name__, exc,
                       current)
        choice = AttentionChoice(implementation=current, excluded={"*": f"{type(exc).__name__}: {exc}"})
    choice = from_main(choice)
    logger.info("Attention for packed rows (estimated ms per pass, %d layers; one-off setup ms; %s planned passes): "
                "%s%s -> %s (measured in %.1f s)", getattr(base.config, "num_hidden_layers", 1), planned_passes,
                ", ".join(f"{k} {v:.1f} (+{choice.setup_ms.get(k, 0):.0f})" for k, v in choice.step_ms.items()),
                "".join(f"; {k} left out ({v})" for k, v in choice.excluded.items()),
                choice.implementation, time.perf_counter() - started)
    if choice.implementation != current:
        base.set_attn_implementation(choice.implementation)
    return choice
