"""Qwen architecture families: which ones are verified, which are hybrid or MoE, and how packed rows stay exact.

The promise "packed samples never see each other" holds per architecture, not in general:

- **Attention-only families** (Qwen2/2.5, Qwen3, Qwen3-MoE) isolate the documents of a packed row by their
  restarting ``position_ids`` (transformers builds a block-diagonal causal mask from them when no cache is
  built; FlashAttention gets one flattened row whose boundaries it reads from the same ``position_ids``).
- **Hybrid families** (Qwen3.5 / Qwen3.6 and their MoE: Gated DeltaNet linear-attention layers interleaved with
  full attention, ``config.layer_types``) do not: the linear-attention recurrence and its causal conv1d run
  straight across a document boundary whatever the positions say (the second document's logits move by ~0.4 on
  the tiny model). They are exact only when the layers are told the boundaries (``cu_seq_lens_q``/``_k`` for the
  recurrence, ``seq_idx`` for the conv) *and* the kernels that honour them are installed: flash-linear-attention
  and causal-conv1d, both CUDA-only. transformers' PyTorch fallbacks refuse the boundaries.

:func:`plan_packed_layout` decides, once per run, how a run with ``packing=True`` lays out its rows:
``rows`` (packed rows, isolated by positions), ``flattened`` (one row per batch, for FlashAttention),
``flattened-with-boundaries`` (hybrid model with both kernels on a GPU: one row plus the boundary tensors), or
``unpacked-fallback`` (hybrid model without them: the examples are not packed; unpacked, length-grouped rows
are exact everywhere). The fallback is chosen over an error on purpose: the same config then trains correctly
on a CPU and fast on a GPU, the loss and the trained tokens are the same, and the choice is logged once and
recorded in ``sft_metadata.json`` (``packed_layout``); nothing trains on a leaking row.

:func:`check_architecture` warns once, in one line, for a model outside the verified families: what we test
(packing isolation, the trained-tokens loss, MoE auxiliary loss, export) has not been checked on it.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from accelerate.utils import extract_model_from_parallel

from src.data.arrow import flattens_packed_batches

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type values (a Qwen3.5 checkpoint's own, and its text model's)
    tiny: str  # the offline tiny model of this family (src.models.tiny)
    examples: tuple[str, ...]
    hybrid: bool = False  # linear-attention layers among the full-attention ones
    moe: bool = False  # routed experts (a router load-balancing loss)


FAMILIES = (
    Family("Qwen2 / Qwen2.5", ("qwen2",), "local:tiny-qwen2", ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct")),
    Family("Qwen3", ("qwen3",), "local:tiny-qwen3", ("Qwen/Qwen3-8B", "Qwen/Qwen3-4B-Instruct-2507")),
    Family("Qwen3-MoE", ("qwen3_moe",), "local:tiny-qwen3-moe", ("Qwen/Qwen3-30B-A3B",), moe=True),
    Family("Qwen3.5 / Qwen3.6 (hybrid)", ("qwen3_5", "qwen3_5_text"), "local:tiny-qwen3.5",
           ("Qwen/Qwen3.5-9B", "Qwen/Qwen3.6-27B"), hybrid=True),
    Family("Qwen3.5 / Qwen3.6 MoE (hybrid)", ("qwen3_5_moe", "qwen3_5_moe_text"), "local:tiny-qwen3.5-moe",
           ("Qwen/Qwen3.5-35B-A3B", "Qwen/Qwen3.6-35B-A3B"), hybrid=True, moe=True),
)

# Packed layouts (see the module docstring); the first is packing=False.
UNPACKED, ROWS, FLATTENED, FLATTENED_WITH_BOUNDARIES, UNPACKED_FALLBACK = (
    "unpacked", "rows", "flattened", "flattened-with-boundaries", "unpacked-fallback")
# Router modules of the MoE families: never given LoRA adapters unless asked (lora_train_router).
ROUTER_MODULES = ("gate", "shared_expert_gate")
# Fused expert weights (a [experts, out, in] parameter each, no nn.Linear): LoRA reaches them through peft's
# target_parameters.
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def unwrap_model(model: Any, *, keep_peft: bool = False, keep_torch_compile: bool = False) -> Any:
    """The one way to reach the model under its wrappers: the engines' (DDP, DataParallel, DeepSpeed, FSDP1;
    accelerate's ``extract_model_from_parallel``, what ``Accelerator.unwrap_model`` runs), ``torch.compile``'s
    (unless ``keep_torch_compile``) and peft's (``get_base_model``, unless ``keep_peft``). By default the
    ``transformers`` model itself (its config, its output embeddings); ``keep_peft=True`` the model that is saved
    (an adapter saves through peft)."""
    model = extract_model_from_parallel(model, keep_torch_compile=keep_torch_compile)
    if not keep_peft and callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    return model


def model_config(model: Any) -> Any:
    """The (text) config of a model, under peft and engine wrappers."""
    config = getattr(unwrap_model(model), "config", None)
    return getattr(config, "text_config", None) or config


def family_of(config: Any) -> Optional[Family]:
    model_type = getattr(config, "model_type", None)
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def is_hybrid(config: Any) -> bool:
    return "linear_attention" in (getattr(config, "layer_types", None) or ())


def is_moe(config: Any) -> bool:
    return bool(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0))


def router_aux_loss_coef(config: Any) -> float:
    """The model's own coefficient of the router load-balancing loss (0 for dense models)."""
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if is_moe(config) else 0.0


def describe(model: Any) -> dict[str, Any]:
    """What ``sft_metadata.json`` records about the architecture."""
    config = model_config(model)
    family = family_of(config)
    return {"model_type": getattr(config, "model_type", None), "family": family.name if family else None,
            "verified": family is not None, "hybrid_linear_attention": is_hybrid(config), "moe": is_moe(config)}


def check_architecture(model: Any) -> Optional[Family]:
    """The model's verified family, or None after a one-line warning naming what is unverified."""
    config = model_config(model)
    family = family_of(config)
    if family is None:
        logger.warning("model type %r is not one of the verified families (%s): packed-row isolation, the trained-tokens "
                       "loss%s and export are unverified for it; compare a few steps with packing=False and "
                       "loss_type='full_logits' before trusting a long run",
                       getattr(config, "model_type", None), ", ".join(f.name for f in FAMILIES),
                       ", the MoE router loss" if is_moe(config) else "")
    return family


def linear_attention_kernels() -> tuple[bool, str]:
    """Whether the kernels that keep packed documents apart in linear-attention layers are usable here: a CUDA
    GPU, flash-linear-attention (the recurrence, ``cu_seqlens``) and causal-conv1d (the conv, ``seq_idx``)."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU (the linear-attention kernels that honour document boundaries are CUDA-only)"
    missing = []
    for package, module, name in (("flash-linear-attention", "fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
                                  ("causal-conv1d", "causal_conv1d", "causal_conv1d_fn")):
        try:
            getattr(importlib.import_module(module), name)
        except Exception:  # ImportError, or a broken build failing at import
            missing.append(package)
    if missing:
        return False, f"{' and '.join(missing)} not installed (pip install {' '.join(missing)})"
    return True, "flash-linear-attention and causal-conv1d installed"


@dataclass(frozen=True)
class PackedLayout:
    """How a run lays out its training rows (see the module docstring)."""

    layout: str
    reason: str = ""

    @property
    def packs(self) -> bool:
        return self.layout in (ROWS, FLATTENED, FLATTENED_WITH_BOUNDARIES)

    @property
    def flattened(self) -> bool:
        return self.layout in (FLATTENED, FLATTENED_WITH_BOUNDARIES)

    @property
    def boundaries(self) -> bool:
        return self.layout == FLATTENED_WITH_BOUNDARIES

    def as_metadata(self) -> dict[str, str]:
        return {"layout": self.layout, **({"reason": self.reason} if self.reason else {})}


def plan_packed_layout(model: Any, packing: bool, attn_implementation: Optional[str]) -> PackedLayout:
    """The layout of a run's rows for ``model`` (see the module docstring); logs the hybrid fallback once."""
    if not packing:
        return PackedLayout(UNPACKED)
    config = model_config(model)
    if is_hybrid(config):
        usable, why = linear_attention_kernels()
        if usable:
            return PackedLayout(FLATTENED_WITH_BOUNDARIES, f"hybrid linear attention: document boundaries passed to "
                                                           f"the kernels ({why})")
        reason = (f"packing=True but {getattr(config, 'model_type', 'this model')} has linear-attention layers, which "
                  f"packed rows can keep apart only with their GPU kernels: {why}; training on unpacked, length-grouped "
                  "rows instead (same loss, no cross-document leak)")
        logger.warning(reason)
        return PackedLayout(UNPACKED_FALLBACK, reason)
    if flattens_packed_batches(attn_implementation):
        return PackedLayout(FLATTENED, f"{attn_implementation}: one flattened row per batch")
    return PackedLayout(ROWS)
