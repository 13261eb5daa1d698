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
backward, plus the mask construction each step pays, and switches the model to the fastest. A candidate whose
output differs from ``sdpa``'s on the same inputs (beyond the precision's rounding) is excluded, with a
warning: it would not be exact. On a CPU ``sdpa`` is the only candidate that trains (flex has no CPU backward,
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

logger = logging.getLogger(__name__)

AUTO = "auto"
IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")


@dataclass
class AttentionChoice:
    """What was measured and chosen: per-step milliseconds by implementation, and why others were left out."""

    implementation: str
    step_ms: dict[str, float] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    measured: bool = False

    def as_metadata(self) -> dict:
        return {"implementation": self.implementation, "measured": self.measured,
                "estimated_attention_ms_per_step": {k: round(v, 3) for k, v in self.step_ms.items()},
                "excluded": dict(self.excluded)}


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
                             warmup: int = 1, seed: int = 0) -> AttentionChoice:
    """Time ``candidates`` on packed rows laid out as ``position_ids`` (``[batch, tokens]``) and pick the fastest.

    Each candidate runs the same attention layer (``attention_class(config, layer_idx=0)``, random weights, the
    model's geometry, ``dtype``) forward and backward on the same hidden states; its cost per step is the
    median layer time times the model's layer count plus the median time to build its mask. ``flash*``
    candidates get the batch flattened into one row, as the collator gives them. The first candidate is the
    reference: another whose output differs from it beyond ``dtype``'s rounding is excluded.
    """
    layers = int(getattr(config, "num_hidden_layers", 1) or 1)
    batch, tokens = position_ids.shape
    generator = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(batch, tokens, config.hidden_size, generator=generator).to(device=device, dtype=dtype)
    grad = torch.randn(batch, tokens, config.hidden_size, generator=generator).to(device=device, dtype=dtype)
    position_ids = position_ids.to(device)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    reference: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    choice = AttentionChoice(implementation=candidates[0], measured=True)
    torch.manual_seed(seed)
    layer_config = copy.deepcopy(config)
    layer_config._attn_implementation = candidates[0]
    layer = attention_class(layer_config, layer_idx=0).to(device=device, dtype=dtype)
    from transformers.masking_utils import create_causal_mask

    for impl in candidates:
        layer_config._attn_implementation = impl
        flat = impl.startswith("flash")
        pos = position_ids.reshape(1, -1) if flat else position_ids
        x = (hidden.reshape(1, batch * tokens, -1) if flat else hidden).detach().requires_grad_(True)
        g = grad.reshape(x.shape)
        head_dim = getattr(layer, "head_dim", config.hidden_size // config.num_attention_heads)
        cos = torch.ones(*pos.shape, head_dim, device=device, dtype=dtype)
        sin = torch.zeros_like(cos)

        def build_mask():
            return create_causal_mask(config=layer_config, inputs_embeds=x, attention_mask=None, cache=None,
                                      position_ids=pos)

        def run(mask):
            x.grad = None
            out = layer(x, position_embeddings=(cos, sin), attention_mask=mask, position_ids=pos)[0]
            out.backward(g)
            return out

        try:
            mask = build_mask()
            out = None
            for _ in range(warmup):
                out = run(mask)
            mask_times, layer_times = [], []
            for _ in range(repeats):
                _synchronize(device)
                start = time.perf_counter()
                mask = build_mask()
                _synchronize(device)
                middle = time.perf_counter()
                out = run(mask)
                _synchronize(device)
                mask_times.append(middle - start)
                layer_times.append(time.perf_counter() - middle)
        except Exception as exc:  # a kernel that cannot run this dtype/shape/GPU is not a candidate
            choice.excluded[impl] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            layer.zero_grad(set_to_none=True)
            continue
        layer.zero_grad(set_to_none=True)
        # Forward output and the gradient it sends back to the hidden states, both compared with the reference's.
        result = (out.detach().reshape(batch, tokens, -1).float(), x.grad.reshape(batch, tokens, -1).float())
        if reference is None:
            reference = result
        else:
            error = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-6) for a, b in zip(result, reference))
            if not error <= tolerance:
                choice.excluded[impl] = (f"output or gradient differs from {candidates[0]}'s by {error:.2e} (relative), "
                                         "not exact")
                logger.warning("attention %s left out: %s", impl, choice.excluded[impl])
                continue
        choice.step_ms[impl] = 1000 * (statistics.median(mask_times) + layers * statistics.median(layer_times))
    if choice.step_ms:
        choice.implementation = min(choice.step_ms, key=choice.step_ms.get)
    return choice


def choose_for_packed_rows(model: Any, position_ids: torch.Tensor, device: torch.device, dtype: torch.dtype,
                           candidates: Optional[Sequence[str]] = None) -> AttentionChoice:
    """Measure the candidates for ``model`` on ``position_ids`` and switch the model to the fastest exact one.

    Where only one candidate exists (every CPU), the model keeps its implementation and nothing is measured.
    """
    from src.training.losses import unwrap_to_pretrained

    base = unwrap_to_pretrained(model)
    current = getattr(base.config, "_attn_implementation", None) or "sdpa"
    candidates = list(candidates) if candidates is not None else candidate_implementations(device)
    if len(candidates) < 2:
        return AttentionChoice(implementation=current)
    attention_class = attention_module_class(base)
    if attention_class is None:
        return AttentionChoice(implementation=current, excluded={"*": "no attention module with the usual attributes"})
    started = time.perf_counter()
    choice = measure_packed_attention(base.config, attention_class, position_ids, device, dtype, candidates)
    logger.info("Attention for packed rows (estimated ms per step, %d layers): %s%s -> %s (measured in %.1f s)",
                getattr(base.config, "num_hidden_layers", 1),
                ", ".join(f"{k} {v:.1f}" for k, v in choice.step_ms.items()),
                "".join(f"; {k} left out ({v})" for k, v in choice.excluded.items()),
                choice.implementation, time.perf_counter() - started)
    if choice.implementation != current:
        base.set_attn_implementation(choice.implementation)
    return choice

