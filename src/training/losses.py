"""The SFT loss: shifted next-token cross-entropy over trained (label != -100) tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from src.data.tokenization import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over trained positions, and how many positions were trained.

    Exactly the specification's computation (``logits[..., :-1, :]`` against ``labels[..., 1:]``,
    ``ignore_index=-100``) with ``reduction="sum"``, so that callers can divide by the number of
    trained tokens of a whole accumulated batch instead of a micro-batch.
    """
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous().to(shift_logits.device)
    loss_sum = F.cross_entropy(
        shift_logits.view(-1, shift_logits.size(-1)).float(),
        shift_labels.view(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, shift_labels.ne(IGNORE_INDEX).sum()


def safe_perplexity(loss: float) -> float:
    """exp(loss) without OverflowError: losses above ~709 give ``inf``."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")
