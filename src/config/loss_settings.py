"""The loss settings' values and their check: owned here, where the config asks without importing training.

``src.training.losses`` builds the loss objects these names select and calls :func:`check_loss_settings` too, so
the rule and its message exist once. A leaf module: it imports nothing of the project.
"""

from __future__ import annotations

LOSS_TYPES = ("trained_tokens", "full_logits")


def check_loss_settings(loss_type: str, chunk_size: int = 256) -> None:
    """Raise ``ValueError`` naming the setting when ``loss_type``/``loss_chunk_size`` cannot work."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is invalid: expected one of {LOSS_TYPES}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"loss_chunk_size={chunk_size!r} is invalid: expected a positive integer.")
