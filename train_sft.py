#!/usr/bin/env python
"""Command line entry: train, evaluate and sample an SFT run.

    python train_sft.py --config configs/sft_demo.yaml [--max_seq_length 256 ...]
    torchrun --nproc_per_node=4 train_sft.py --config configs/my_run.yaml

Every SFTConfig field can be given as a flag; flags override the YAML file. User errors (bad config,
bad data, missing model) exit with status 2 and one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import logging
import sys


def _user_error_types():
    from src.data.loading import DatasetError
    from src.data.tokenization import TokenizerMismatchError
    from src.models.loading import ModelLoadError

    # TypeError is left out on purpose: from the command line it can only be a bug, which deserves a traceback.
    return (ValueError, FileNotFoundError, FileExistsError, DatasetError, ModelLoadError, TokenizerMismatchError)


def run_training(argv: list[str]) -> int:
    from src.config import SFTConfig
    from src.training.sft_trainer import create_sft_trainer

    config = SFTConfig.from_args(argv)
    trainer = create_sft_trainer(config)
    trainer.prepare()
    has_validation = trainer.trainer.eval_dataset is not None
    before = trainer.evaluate_model() if has_validation else None
    trainer.train()
    after = trainer.final_metrics if has_validation else None  # train() evaluates the final model once
    print()
    print("=" * 72)
    print(f"Model saved to {config.output_dir}")
    if before and after:
        print(f"Validation loss       : {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}")
        print(f"Validation perplexity : {before['eval_perplexity']:.2f} -> {after['eval_perplexity']:.2f}")
    if after and "eval_gen_chrf" in after:
        print(f"Generation (validation): chrF {after['eval_gen_chrf']:.1f}, BLEU {after['eval_gen_bleu']:.1f}, "
              f"exact match {after['eval_gen_exact_match']:.0%}")
    if trainer.padding_efficiency is not None:
        print(f"Padding efficiency    : {trainer.padding_efficiency:.2%}")
    validation = trainer.dataset["validation"] if has_validation else None
    if validation is not None and "instruction" in validation.column_names:  # not for conversation/text rows
        samples = validation["instruction"][:3]
        responses = trainer.batch_generate(samples, max_length=48, batch_size=len(samples), repetition_penalty=1.3)
        for instruction, response in zip(samples, responses):
            print("-" * 72)
            print(f"Q: {instruction}")
            print(f"A: {response}")
    print("=" * 72)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    command = run_training
    if argv and argv[0] == "audit":
        from src.data.audit import main as audit_main

        command, argv = audit_main, argv[1:]
    try:
        return command(argv)
    except SystemExit:
        raise
    except _user_error_types() as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
