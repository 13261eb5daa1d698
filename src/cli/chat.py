"""``train_sft.py chat --model DIR [--system TEXT]``: chat with a trained run, answers streamed as generated,
multi-turn history formatted exactly as in training (``src.training.chat``)."""

from __future__ import annotations

import argparse
import sys

from src.config import SFTConfig
from src.training.chat import ChatSession, chat_loop
from src.training.sft_trainer import SFTTrainer


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="train_sft.py chat", allow_abbrev=False,
                                     description="Chat with a trained run. Commands: /reset, /system TEXT, /exit.")
    parser.add_argument("--model", required=True, help="a run folder (output_dir of training) or an exported folder")
    parser.add_argument("--system", default=None, help="system prompt (default: the run's own, if it had one)")
    parser.add_argument("--max_length", type=int, default=512, help="maximum new tokens per answer")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top_p", type=float)
    parser.add_argument("--repetition_penalty", type=float)
    args = parser.parse_args(argv)
    if args.max_length < 1:
        raise ValueError(f"--max_length must be at least 1 (got {args.max_length})")
    try:
        return _chat(args)
    except KeyboardInterrupt:
        if sys.stdout.isatty():
            sys.stdout.write("\n")  # after a half-streamed answer or the prompt
            sys.stdout.flush()
        print("interrupted (Ctrl-C): chat ended", file=sys.stderr)
        return 130


def _chat(args: argparse.Namespace) -> int:
    # Arabic in and out, whatever the locale says; bytes that are not UTF-8 reach the session (surrogate-escaped),
    # which reports the line and goes on, instead of ending with a decoding error.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(encoding="utf-8", errors="surrogateescape")
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")
    trainer = SFTTrainer(SFTConfig(output_dir=args.model))
    trainer.load_model(args.model)
    sampling = {k: getattr(args, k) for k in ("temperature", "top_p", "repetition_penalty") if getattr(args, k) is not None}
    session = ChatSession(trainer, system=args.system if args.system is not None else trainer.config.system_prompt,
                          max_length=args.max_length, **sampling)
    return chat_loop(session, sys.stdin, sys.stdout)  # the streams of now (a test or a wrapper may have replaced them)
