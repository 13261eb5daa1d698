"""Offline defaults: tiny random-init models of every Qwen architecture family and a byte-level BPE tokenizer.

Nothing here touches the network. The tokenizer is trained on the given texts (the shipped Arabic
sample set by default) with Qwen2's pre-tokenizer regex, NFC normalisation and byte-level BPE, and
carries Qwen's special tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``. Like a Qwen2.5
*base* model, its EOS and PAD token are both ``<|endoftext|>`` and it has no BOS token: the exact
situation in which collators that mask padding by token id erase the trained EOS.

Use them through the model names of :data:`TINY_MODELS` (``local:tiny-qwen2``, ``local:tiny-qwen3``,
``local:tiny-qwen3-moe``, ``local:tiny-qwen3.5``, ``local:tiny-qwen3.5-moe``; built into
``<output_dir>/base_model`` on first use), or call :func:`build_tiny_model` / :func:`build_tiny_qwen2`
yourself::

    model, tokenizer = build_tiny_model("qwen3.5-moe", texts, "models/tiny")   # then model_name="models/tiny"

Each family is built with its own config class (``Qwen3Config``, ``Qwen3MoeConfig``, ``Qwen3_5TextConfig``,
``Qwen3_5MoeTextConfig``), so ``AutoModelForCausalLM.from_pretrained`` loads the saved folder as it loads a
real checkpoint of that architecture. The Qwen3.5 ones are hybrid: three Gated DeltaNet (linear attention)
layers, then one full-attention layer (``config.layer_types``), as the real models interleave them. They use
the project's templates by default, not Qwen's (a clone has no ``../shared``).

A run with ``model_name: local:tiny-qwen2`` and ``tokenizer_name`` (a local Qwen tokenizer folder, a hub id) gets the
tiny model built with that tokenizer's vocabulary instead (``BaseTrainer.setup_model``): a small model that reads
real text with the real Qwen token ids, for a fast trial.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_MODEL_NAME = "local:tiny-qwen2"  # the default offline model (the demo's)
DEFAULT_CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "data", "arabic_instructions.jsonl")

# Small enough to train for a few hundred steps on two CPU cores in minutes.
TINY_DIMS = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2)
# The other families: the same width and depth, each with its architecture's own parts at their smallest
# (experts, linear-attention heads), so a training test takes seconds.
_QWEN3 = dict(TINY_DIMS, head_dim=32)
_MOE = dict(moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.01)
_LINEAR = dict(linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
               layer_types=["linear_attention"] * 3 + ["full_attention"])
# family -> (config class path, dims); names as in local:tiny-<family>
TINY_FAMILIES = {
    "qwen2": ("transformers.Qwen2Config", TINY_DIMS),
    "qwen3": ("transformers.Qwen3Config", _QWEN3),
    "qwen3-moe": ("transformers.Qwen3MoeConfig", dict(_QWEN3, **_MOE)),
    "qwen3.5": ("transformers.models.qwen3_5.configuration_qwen3_5.Qwen3_5TextConfig", dict(_QWEN3, **_LINEAR)),
    "qwen3.5-moe": ("transformers.models.qwen3_5_moe.configuration_qwen3_5_moe.Qwen3_5MoeTextConfig",
                    dict({k: v for k, v in _QWEN3.items() if k != "intermediate_size"}, **_MOE, **_LINEAR,
                         shared_expert_intermediate_size=64)),
}
TINY_MODELS = {f"local:tiny-{family}": family for family in TINY_FAMILIES}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4000):
    """Train a Qwen2-style byte-level BPE tokenizer on ``texts``; returns a transformers tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    )
    tokenizer.model_max_length = 32768
    return tokenizer


def corpus_texts(path: str = DEFAULT_CORPUS) -> list[str]:
    """All instruction/response strings of a JSONL file plus the template words, for tokenizer training."""
    texts = ["### Instruction:\n", "### Response:\n", "user\n", "assistant\n", "system\n"]
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                texts.extend(str(v) for v in row.values() if isinstance(v, str))
    return texts


def tiny_config(family: str, vocab_size: int, *, max_position_embeddings: int = 4096, eos_id: int | None = None,
                **dims) -> Any:
    """The config of a tiny ``family`` model (a key of :data:`TINY_FAMILIES`); ``dims`` override its sizes."""
    import importlib

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {sorted(TINY_FAMILIES)}")
    path, defaults = TINY_FAMILIES[family]
    module, name = path.rsplit(".", 1)
    values = {**defaults, **dims}
    if "layer_types" in values and "num_hidden_layers" in dims and len(values["layer_types"]) != dims["num_hidden_layers"]:
        n = dims["num_hidden_layers"]  # every fourth layer full attention, the rest linear (Qwen3.5's own pattern)
        values["layer_types"] = ["full_attention" if (i + 1) % 4 == 0 or i == n - 1 else "linear_attention" for i in range(n)]
    return getattr(importlib.import_module(module), name)(
        vocab_size=vocab_size, max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=eos_id, pad_token_id=eos_id, **values)


def embedding_rows(tokenizer: Any) -> int:
    """Embedding rows a model needs for every id of ``tokenizer`` (added tokens included): 151,665 for Qwen2.5's."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def build_tiny_model(family: str = "qwen2", texts: Iterable[str] | None = None, output_dir: str | None = None, *,
                     vocab_size: int = 4000, seed: int = 0, max_position_embeddings: int = 4096, tokenizer: Any = None,
                     **dims):
    """Build a random-init causal LM of ``family`` (see :data:`TINY_FAMILIES`) and its tokenizer; save both to
    ``output_dir`` if given.

    The tokenizer is trained on ``texts`` unless one is given; a given one (a real Qwen tokenizer) decides the
    vocabulary: one embedding row per id (tied to the LM head), so its 151,665 ids make about 19M of the parameters
    at the default width. ``dims`` override the family's sizes
    (``hidden_size``, ``num_hidden_layers``, ...). The weights are a deterministic function of ``seed``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if tokenizer is None:
        tokenizer = train_bpe_tokenizer(texts if texts is not None else corpus_texts(), vocab_size=vocab_size)
    vocab = tokenizer.get_vocab()
    eos_id = vocab["<|endoftext|>"] if "<|endoftext|>" in vocab else tokenizer.eos_token_id
    config = tiny_config(family, embedding_rows(tokenizer), max_position_embeddings=max_position_embeddings,
                         eos_id=eos_id, **dims)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    return model, tokenizer


def build_tiny_qwen2(texts: Iterable[str] | None = None, output_dir: str | None = None, **kwargs):
    """:func:`build_tiny_model` of the Qwen2 family (the default offline model)."""
    return build_tiny_model("qwen2", texts, output_dir, **kwargs)
