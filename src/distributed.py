"""Which process writes, and waiting for it: the one place that knows about ranks.

Used by every layer that writes files (the tiny model build in ``src.models``, the persistence module in
``src.training``, the CLI's printing), so it depends on nothing of the project. Before the Trainer
exists, ranks are read from the launcher's environment (``RANK``/``WORLD_SIZE`` of torchrun, accelerate,
DeepSpeed); waiting uses the process group that accelerate initialises, created on first need.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on the one process that writes and prints (global rank 0; always True without a launcher)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if world_size() <= 1:
        return
    import torch
    from accelerate import PartialState

    # cpu=True on machines without CUDA: accelerate's default there is "not distributed" (no process group,
    # so waiting would return at once); transformers later joins the same gloo group (use_cpu).
    PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the block on the main process first, then on the others (which then find what it wrote)."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()
