"""Generation from formatted prompts, and generation-based evaluation (chrF, BLEU, exact match).

Choices the specification leaves open:

- ``max_length`` bounds the number of *generated* tokens (``max_new_tokens``), not prompt + answer, so a
  long instruction never silently leaves no room for the answer.
- Passing ``temperature``, ``top_p``, ``top_k``, ``typical_p`` or ``min_p`` without ``do_sample`` turns
  sampling on (that is what the caller asks for; transformers would ignore them under greedy
  decoding). With none of them, decoding is greedy and deterministic.
- A prompt that does not leave ``max_length`` new tokens inside the model's context
  (``config.max_position_embeddings``) is refused with an error naming it, before anything is generated:
  cutting a prompt would silently drop the instruction or its system prompt.
- Generation stops at the template's end token (``<|im_end|>`` for ChatML, EOS otherwise) and at the
  tokenizer's EOS; the returned text is the response only, without special tokens or surrounding
  whitespace.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable, Optional

import torch

logger = logging.getLogger(__name__)

SAMPLING_KWARGS = ("temperature", "top_p", "top_k", "typical_p", "min_p")


def generation_kwargs(stop_ids: list[int], pad_id: int, max_new_tokens: int, **kwargs: Any) -> dict[str, Any]:
    """``model.generate`` keyword arguments: the caller's, with sampling on when a sampling knob is given."""
    out = dict(kwargs)
    if "do_sample" not in out:
        out["do_sample"] = any(k in out for k in SAMPLING_KWARGS)
    out.setdefault("max_new_tokens", max_new_tokens)
    out.setdefault("eos_token_id", stop_ids)
    out.setdefault("pad_token_id", pad_id)
    out.setdefault("use_cache", True)
    return out


@torch.no_grad()
def generate_from_prompts(model: Any, tokenizer: Any, prompts: list[list[int]], stop_ids: list[int],
                          max_length: int = 512, batch_size: int = 4, **kwargs: Any) -> list[str]:
    """Generate from already formatted prompt ids, ``batch_size`` at a time, left-padded.

    With greedy decoding the answer to each prompt does not depend on the batch it is in.
    """
    if max_length < 1 or batch_size < 1:
        raise ValueError(f"max_length and batch_size must be positive (got {max_length}, {batch_size})")
    check_prompt_lengths(model, prompts, max_length)
    from tqdm.auto import tqdm

    pad_id = tokenizer.pad_token_id
    gen_kwargs = generation_kwargs(stop_ids, pad_id, max_length, **kwargs)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs: list[str] = []
    chunks = range(0, len(prompts), batch_size)
    try:
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
                outputs.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    finally:
        if was_training:
            model.train()
    return outputs


def check_prompt_lengths(model: Any, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Refuse prompts that leave no room for ``max_new_tokens`` in the model's context (module docstring)."""
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None)
    if not isinstance(context, int):
        return
    room = context - max_new_tokens
    for i, prompt in enumerate(prompts):
        if len(prompt) > room:
            raise ValueError(f"prompt {i} is {len(prompt)} tokens long, but the model's context is {context} tokens and "
                             f"max_length={max_new_tokens} new tokens leaves room for {max(room, 0)}; shorten the "
                             "prompt or lower max_length")


def choose_rows(records: list[dict], max_samples: Optional[int], seed: int) -> list[dict]:
    """Instruction/response rows for generation eval: the first ``max_samples`` of a seeded shuffle, in file order."""
    usable = [r for r in records if r.get("instruction") is not None and r.get("response") is not None]
    skipped = len(records) - len(usable)
    if skipped:
        logger.info("generation eval: %d conversation/text rows skipped (instruction/response rows only)", skipped)
    order = list(range(len(usable)))
    random.Random(seed).shuffle(order)
    chosen = [usable[i] for i in sorted(order[: max_samples or len(usable)])]
    if not chosen:
        raise ValueError("generation eval: no instruction/response rows to generate for")
    return chosen


def generation_metrics(predictions: list[str], references: list[str],
                       normalize: Callable[[str], str]) -> tuple[dict[str, float], list[bool]]:
    """chrF and BLEU (sacrebleu, corpus level, ``intl`` tokenization) and exact match, after ``normalize``
    (plus whitespace collapsing for exact match). Returns the metrics and the per-row exact matches."""
    import sacrebleu

    references_n = [normalize(r) for r in references]
    predictions_n = [normalize(p) for p in predictions]
    exact = [" ".join(p.split()) == " ".join(r.split()) for p, r in zip(predictions_n, references_n)]
    metrics = {
        "eval_gen_chrf": sacrebleu.corpus_chrf(predictions_n, [references_n]).score,
        "eval_gen_bleu": sacrebleu.corpus_bleu(predictions_n, [references_n], tokenize="intl").score,
        "eval_gen_exact_match": sum(exact) / len(exact),
        "eval_gen_samples": float(len(exact)),
    }
    return metrics, exact
