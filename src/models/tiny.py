"""An offline default: a tiny random-init Qwen2-architecture model and a byte-level BPE tokenizer.

Nothing here touches the network. The tokenizer is trained on the given texts (the shipped Arabic
sample set by default) with Qwen2's pre-tokenizer regex, NFC normalisation and byte-level BPE, and
carries Qwen's special tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``. Like a Qwen2.5
*base* model, its EOS and PAD token are both ``<|endoftext|>`` and it has no BOS token: the exact
situation in which collators that mask padding by token id erase the trained EOS.

Use it through the model name ``local:tiny-qwen2`` (built into ``<output_dir>/base_model`` on first
use), or call :func:`build_tiny_qwen2` yourself::

    model, tokenizer = build_tiny_qwen2(texts, "models/tiny")   # then model_name="models/tiny"
"""

from __future__ import annotations

import json
import os
from typing import Iterable

QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_MODEL_NAME = "local:tiny-qwen2"
DEFAULT_CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "data", "arabic_instructions.jsonl")

# Small enough to train for a few hundred steps on two CPU cores in minutes.
TINY_DIMS = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2)


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


def build_tiny_qwen2(texts: Iterable[str] | None = None, output_dir: str | None = None, *, vocab_size: int = 4000,
                     seed: int = 0, max_position_embeddings: int = 4096, **dims):
    """Build a random-init Qwen2ForCausalLM and its tokenizer; save both to ``output_dir`` if given.

    ``dims`` override :data:`TINY_DIMS` (``hidden_size``, ``num_hidden_layers``, ...). The weights are a
    deterministic function of ``seed``.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = train_bpe_tokenizer(texts if texts is not None else corpus_texts(), vocab_size=vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        **{**TINY_DIMS, **dims},
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    return model, tokenizer
