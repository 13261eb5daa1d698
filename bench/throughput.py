#!/usr/bin/env python
"""Training throughput and quality against the anchor (TRL's SFTTrainer), in one run, on this machine.

    pip install trl==1.16.0        # the anchor; not a dependency of the project
    python bench/throughput.py [--epochs 3] [--repeats 2] [--max_seq_length 512] [--json out.json]

Same tiny Qwen2-architecture model (src/models/tiny.py TINY_DIMS, float32, SDPA, same random init),
same tokenizer, same shipped Arabic training set in ChatML, same optimiser settings, CPU. For each
setup: wall time of ``trainer.train()`` (median of repeats), real (non-padding) tokens per second, and
the validation loss per trained token after training, measured by one shared function on unpacked
examples so the numbers are comparable. TRL gets the same examples as prompt/completion pairs (prompt
= our ChatML prompt, completion = response + "<|im_end|>"; completion-only loss).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import report  # noqa: E402

TRAIN = os.path.join(ROOT, "data", "arabic_instructions.jsonl")
VALID = os.path.join(ROOT, "data", "arabic_instructions_validation.jsonl")

COMMON = dict(learning_rate=2e-3, per_device_train_batch_size=4, gradient_accumulation_steps=1,
              lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, seed=0)


def validation_loss(model, tokenizer, max_seq_length: int) -> float:
    """Mean cross-entropy per trained token on the validation file, one example at a time (no padding)."""
    import torch

    from src.data.loading import load_records
    from src.data.templates import get_prompt_format
    from src.data.tokenization import ExampleTokenizer
    from src.training.losses import token_loss_sum

    records, _ = load_records(VALID, validation_split_ratio=0)
    et = ExampleTokenizer(tokenizer, get_prompt_format("chatml"), max_seq_length)
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for ids, labels, _ in et.tokenize_batch(records["train"]):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
            s, n = token_loss_sum(logits, torch.tensor([labels]))
            total += s.item()
            count += n.item()
    return total / count


def run_ours(model_dir: str, packing: bool, epochs: int, max_seq_length: int) -> dict:
    from src.config import SFTConfig
    from src.training.sft_trainer import SFTTrainer

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(model_name=model_dir, dataset_path=TRAIN, output_dir=out, instruction_template="chatml",
                           packing=packing, max_seq_length=max_seq_length, num_train_epochs=epochs, use_lora=False,
                           gradient_checkpointing=False, evaluation_strategy="no", validation_split_ratio=0.0,
                           logging_steps=10_000, save_steps=100_000, dataloader_pin_memory=False,
                           dataloader_drop_last=False, attn_implementation="sdpa", warmup_ratio=0.0, **COMMON)
        trainer = SFTTrainer(config)
        hf = trainer.prepare()
        tokens = sum(sum(1 for _ in row) for row in hf.train_dataset["input_ids"]) * epochs
        start = time.perf_counter()
        hf.train()
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "real_tokens": tokens, "padding_efficiency": trainer.padding_efficiency,
                "val_loss": validation_loss(trainer.model, trainer.tokenizer, max_seq_length)}


def run_trl(model_dir: str, packing: bool, epochs: int, max_seq_length: int) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from src.data.loading import load_records
    from src.data.templates import get_prompt_format

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    records, _ = load_records(TRAIN, validation_split_ratio=0)
    fmt = get_prompt_format("chatml")
    dataset = Dataset.from_list([{"prompt": fmt.format_prompt(r["instruction"]), "completion": r["response"] + "<|im_end|>"}
                                 for r in records["train"]])
    with tempfile.TemporaryDirectory() as out:
        args = trl.SFTConfig(output_dir=out, max_length=max_seq_length, packing=packing, num_train_epochs=epochs,
                             completion_only_loss=True, report_to="none", logging_steps=10_000, save_strategy="no",
                             dataloader_pin_memory=False, use_cpu=True, bf16=False, gradient_checkpointing=False,
                             **COMMON)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        ds = trainer.train_dataset
        tokens = sum(len(x) for x in ds["input_ids"]) * epochs
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "real_tokens": tokens, "padding_efficiency": None,
            "val_loss": validation_loss(model, tokenizer, max_seq_length)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    from src.models.tiny import build_tiny_qwen2, corpus_texts

    setups = [("ours, packing", run_ours, True), ("ours, no packing (length-grouped)", run_ours, False)]
    try:
        import trl

        setups += [(f"TRL {trl.__version__}, packing (bfd, padding-free)", run_trl, True),
                   (f"TRL {trl.__version__}, no packing", run_trl, False)]
    except ImportError:
        print("trl not installed: anchor rows skipped (pip install trl==1.16.0)")
    results = {}
    with tempfile.TemporaryDirectory() as model_dir:
        build_tiny_qwen2(corpus_texts(TRAIN), model_dir, seed=0)
        for name, fn, packing in setups:
            runs = [fn(model_dir, packing, args.epochs, args.max_seq_length) for _ in range(args.repeats)]
            seconds = statistics.median(r["seconds"] for r in runs)
            results[name] = {**runs[0], "seconds": seconds, "tokens_per_second": runs[0]["real_tokens"] / seconds,
                             "all_seconds": [round(r["seconds"], 2) for r in runs]}
    report(f"CPU ({os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads); "
           f"tiny Qwen2 {args.epochs} epochs on {os.path.relpath(TRAIN, ROOT)}, max_seq_length={args.max_seq_length}, "
           f"batch 4, median of {args.repeats}", "setup",
           [("train s", "seconds", ".1f"), ("real tok/s", "tokens_per_second", ".0f"), ("val loss", "val_loss", ".4f")],
           results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
