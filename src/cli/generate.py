"""``train_sft.py generate --model DIR --input rows.jsonl --output out.jsonl``: batched, resumable generation
with the run's own prompt format (``src.training.batch_generation``)."""

from __future__ import annotations

import argparse
import sys

from src.config import SFTConfig
from src.data.language import check_foreign_script_rate, describe_language
from src.distributed import is_main_process
from src.training.batch_generation import (
    GenerationInterrupted,
    check_output,
    generate_file,
    output_language,
    read_input_rows,
)
from src.training.sft_trainer import SFTTrainer


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="train_sft.py generate", allow_abbrev=False,
                                     description="Generate a response for every row of a JSONL file (resumable).")
    parser.add_argument("--model", required=True, help="a run folder (output_dir of training) or an exported folder")
    parser.add_argument("--input", required=True, help="JSONL rows with 'instruction' (and optional 'system', 'id')")
    parser.add_argument("--output", required=True, help="JSONL output; rows already there are skipped (each checked "
                        "against the input row with its id)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256, help="maximum new tokens per response")
    parser.add_argument("--do_sample", action="store_true", help="sample (implied by any sampling flag below)")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top_p", type=float)
    parser.add_argument("--top_k", type=int)
    parser.add_argument("--repetition_penalty", type=float)
    parser.add_argument("--seed", type=int, help="seed for sampling")
    parser.add_argument("--max_foreign_script_rate", type=float, help="fail (exit 1) when more than this share of the "
                        "answers in the output contain a foreign-script run (src.data.language); the file is kept")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_length < 1:
        raise ValueError(f"--batch_size and --max_length must be at least 1 (got {args.batch_size} and {args.max_length})")
    if args.max_foreign_script_rate is not None and not 0 <= args.max_foreign_script_rate <= 1:
        raise ValueError(f"--max_foreign_script_rate must be a share between 0 and 1 (got {args.max_foreign_script_rate})")
    if not is_main_process():
        return 0  # one process generates; the file is not split across ranks
    try:
        return _generate(args)
    except GenerationInterrupted as exc:
        left = exc.total - exc.done
        print(f"interrupted (Ctrl-C): {exc.done} of {exc.total} rows are in {exc.output}; run the same command again "
              f"to generate the other {left} (the rows written are kept)", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"interrupted (Ctrl-C) before any row was generated; {args.output} is unchanged", file=sys.stderr)
        return 130


def _generate(args: argparse.Namespace) -> int:
    rows = read_input_rows(args.input)  # bad input is reported before a model is loaded
    check_output(rows, args.input, args.output)  # and so is an output that is the input, not ours, or for other rows
    trainer = SFTTrainer(SFTConfig(output_dir=args.model))
    trainer.load_model(args.model)
    sampling = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty")
                if getattr(args, k) is not None}
    if args.do_sample:
        sampling["do_sample"] = True
    counts = generate_file(trainer, args.input, args.output, batch_size=args.batch_size, max_length=args.max_length,
                           seed=args.seed, rows=rows, **sampling)
    print(f"Generated {counts['generated']} rows into {args.output} ({counts['skipped']} already there)")
    summary = output_language(args.output)
    print(f"Language of the {summary['answers']} answers: {describe_language(summary)}")
    if args.max_foreign_script_rate is not None:
        try:
            check_foreign_script_rate(summary, args.max_foreign_script_rate, args.output)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0
