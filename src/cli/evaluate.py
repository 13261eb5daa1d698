"""``train_sft.py evaluate --model DIR --tasks arabic_mc_sft[,...]``: benchmark scores with lm-evaluation-harness,
recorded in the run's metadata and model card (``src.training.benchmark``)."""

from __future__ import annotations

import argparse

from src.config import SFTConfig
from src.distributed import is_main_process
from src.training.benchmark import check_tasks, record_benchmarks, run_benchmarks
from src.training.sft_trainer import SFTTrainer


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="train_sft.py evaluate", allow_abbrev=False,
                                     description="Score a trained run on benchmark tasks (lm-evaluation-harness).")
    parser.add_argument("--model", required=True, help="a run folder written by training")
    parser.add_argument("--tasks", required=True, help="comma-separated task names (local: arabic_mc_sft)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--limit", type=int, help="score only the first N documents of each task")
    parser.add_argument("--no_record", action="store_true", help="do not write the scores into the run folder")
    args = parser.parse_args(argv)
    if not is_main_process():
        return 0
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    check_tasks(tasks)  # before loading the model
    trainer = SFTTrainer(SFTConfig(output_dir=args.model))
    trainer.load_model(args.model)
    scores = run_benchmarks(trainer, tasks, batch_size=args.batch_size, limit=args.limit)
    for task, metrics in scores.items():
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    if not args.no_record:
        record_benchmarks(args.model, scores)
    return 0
