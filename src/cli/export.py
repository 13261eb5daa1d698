"""``train_sft.py export --model RUN_DIR --to DIR [--dtype auto] [--overwrite]``: a peft-free model folder
(LoRA merged into its base) that plain ``transformers`` and vLLM load (``src.training.export``)."""

from __future__ import annotations

from src.distributed import is_main_process


def run(argv: list[str]) -> int:
    from src.training.export import parse_and_export

    target = parse_and_export(argv)
    if is_main_process():
        print(f"Exported to {target}")
    return 0
