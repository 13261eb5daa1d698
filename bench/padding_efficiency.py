#!/usr/bin/env python
"""Padding efficiency (real tokens / tokens computed) on the shipped Arabic sample set.

    python bench/padding_efficiency.py [--max_seq_length 512] [--batch_size 4] [--json out.json]

Measured through the real training path (SFTTrainer.create_trainer and the sampler the Trainer uses,
first epoch), for: packing (best-fit decreasing + length-grouped rows), no packing with length
grouping, and two anchors: no packing with random batches padded to the longest row, and padding
every row to max_seq_length (what a fixed-length tokenizer call with padding="max_length" does).
Tokenizers: the tiny offline one (trained on the shipped data) and, where ../shared has it, the real
Qwen2.5 tokenizer.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import report  # noqa: E402

DATA = os.path.join(ROOT, "data", "arabic_instructions.jsonl")
QWEN_TOKENIZER = os.path.join(ROOT, "..", "shared", "qwen2.5-tokenizer")


def measure(model_dir: str, *, packing: bool, group_by_length: bool, max_seq_length: int, batch_size: int,
            template: str = "chatml", tokenizer_dir: str | None = None) -> dict:
    from src.config import SFTConfig
    from src.models.loading import load_tokenizer
    from src.training.sft_trainer import SFTTrainer

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(model_name=model_dir, dataset_path=DATA, output_dir=out, packing=packing,
                           group_by_length=group_by_length, max_seq_length=max_seq_length,
                           per_device_train_batch_size=batch_size, instruction_template=template, use_lora=False,
                           validation_split_ratio=0.0, evaluation_strategy="no", gradient_checkpointing=False,
                           dataloader_pin_memory=False)
        trainer = SFTTrainer(config)
        if tokenizer_dir:
            trainer.setup_model()
            trainer.tokenizer = load_tokenizer(tokenizer_dir)
        trainer.prepare()
        lengths = trainer.trainer.train_dataset["length"]
        return {
            "padding_efficiency": trainer.padding_efficiency,
            # every row padded to max_seq_length, whatever the batching
            "pad_to_max_length": sum(lengths) / (len(lengths) * max_seq_length),
            "rows": len(lengths),
            "tokens": int(sum(lengths)),
        }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    from src.models.tiny import build_tiny_qwen2, corpus_texts

    results = {}
    with tempfile.TemporaryDirectory() as model_dir:
        build_tiny_qwen2(corpus_texts(DATA), model_dir, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
        tokenizers = {"tiny-bpe": None}
        if os.path.isfile(os.path.join(QWEN_TOKENIZER, "vocab.json")):
            tokenizers["qwen2.5"] = QWEN_TOKENIZER
        for tok_name, tok_dir in tokenizers.items():
            for name, packing, grouped in (("packing", True, True), ("no packing, length-grouped", False, True),
                                           ("no packing, random batches", False, False)):
                r = measure(model_dir, packing=packing, group_by_length=grouped, max_seq_length=args.max_seq_length,
                            batch_size=args.batch_size, tokenizer_dir=tok_dir)
                results[f"{tok_name} | {name}"] = r
    report(f"Padding efficiency on {os.path.relpath(DATA, ROOT)} (max_seq_length={args.max_seq_length}, "
           f"batch_size={args.batch_size}, chatml, first epoch)", "tokenizer | batching",
           [("efficiency", "padding_efficiency", ".2%"), ("rows", "rows", "d"), ("tokens", "tokens", "d"),
            ("pad-to-max anchor", "pad_to_max_length", ".2%")], results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
