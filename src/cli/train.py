"""``train_sft.py [train] --config run.yaml``: train, evaluate before and after, print a summary and samples.

Every process trains; the summary and the sample generations come from the main process only.
"""

from __future__ import annotations

from src.cli.args import parse_config
from src.distributed import is_main_process


def run(argv: list[str]) -> int:
    from src.config import SFTConfig
    from src.training.sft_trainer import create_sft_trainer

    config = parse_config(SFTConfig, argv)
    trainer = create_sft_trainer(config)
    # Refuse a wrong folder before reading data or loading a model (nothing is written until training starts).
    trainer.claim_output_dir(resuming=bool(config.resume_from_checkpoint), write=False)
    trainer.prepare()
    has_validation = trainer.trainer.eval_dataset is not None
    before = trainer.evaluate_model() if has_validation else None
    trainer.train()
    if not is_main_process():
        return 0
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
        samples = [i for i in validation["instruction"] if i is not None][:3]  # instruction rows only
        responses = trainer.batch_generate(samples, max_length=48, batch_size=len(samples), repetition_penalty=1.3)
        for instruction, response in zip(samples, responses):
            print("-" * 72)
            print(f"Q: {instruction}")
            print(f"A: {response}")
    print("=" * 72)
    return 0
