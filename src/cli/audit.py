"""``train_sft.py audit --config run.yaml [--audit_output audit.json]``: the data report of ``src.data.audit``.

``train_sft.py audit --config run.yaml --show N [--rows I,J] [--packed] [--json] [--color auto|always|never]``: the
token-level example viewer (``src.data.viewer``) instead: the first N training rows (or the rows at 0-based indices
I, J of the training split), tokenized exactly as training tokenizes them, each token shown trained or masked.
``--packed`` shows the first N packed rows (packing as training packs, whatever the config's ``packing``), their
seams and ``position_ids``; ``--json`` prints one JSON object per row instead of text.

Reads the data exactly as training does (``src.data.wiring``: same loader or mixture, hold-out, normalization
and template, with invalid rows counted instead of raised), prints the table and writes JSON (default ``<output_dir>/audit.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from src.cli.args import parse_config, raise_argument_error
from src.config import SFTConfig
from src.data.audit import audit_records, format_table
from src.data.tokenization import drop_reason
from src.data.viewer import show_rows
from src.data.wiring import example_tokenizer_for, load_config_records
from src.distributed import is_main_process
from src.models.loading import load_tokenizer, resolve_model_path


def _rows(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0-based row numbers like 0,4,9") from None


def _audit_parser() -> argparse.ArgumentParser:
    """The audit's own flags (the rest of the command line is the run's config)."""
    parser = argparse.ArgumentParser(prog="train_sft.py audit", add_help=False, allow_abbrev=False)
    parser.error = raise_argument_error  # one line, not a usage dump and exit
    parser.add_argument("--audit_output", metavar="FILE")
    parser.add_argument("--show", type=int, metavar="N")
    parser.add_argument("--rows", type=_rows, metavar="I,J")
    parser.add_argument("--color", choices=("auto", "always", "never"), default=None)
    parser.add_argument("--packed", action="store_true")
    parser.add_argument("--json", action="store_true")
    return parser


def _show(config: Any, records: dict, example_tokenizer: Any, flags: argparse.Namespace) -> int:
    """The token-level viewer (module docstring; ``src.data.viewer.show_rows``)."""
    color_choice = flags.color or "auto"
    color = color_choice == "always" or (color_choice == "auto" and sys.stdout.isatty() and not flags.json)
    try:
        text = show_rows(records.get("train") or [], example_tokenizer, flags.show or 0, flags.rows, flags.packed, color,
                         flags.json, drop_note=f" ({drop_reason(config.overlong_policy)})")
    except ValueError as exc:
        raise ValueError(f"audit: {exc}") from None
    if is_main_process():
        print(text)
    return 0


def run(argv: list[str]) -> int:
    flags, argv = _audit_parser().parse_known_args(argv)
    viewing = flags.show is not None or flags.rows is not None
    given = [f"--{name}" for name in ("color", "packed", "json") if getattr(flags, name)]
    if given and not viewing:
        raise ValueError(f"audit: {', '.join(given)} go with --show N (the example viewer)")
    output = flags.audit_output
    config = parse_config(SFTConfig, argv)
    records, report = load_config_records(config, skip_invalid=True)
    # Only the tokenizer is needed; for local:tiny-qwen2 this builds the tiny model once, as training would.
    source = config.tokenizer_name or resolve_model_path(config.model_name, config.output_dir, config.dataset_path, config.seed)
    tokenizer = load_tokenizer(source, trust_remote_code=config.trust_remote_code)
    if viewing:
        return _show(config, records, example_tokenizer_for(config, tokenizer), flags)
    result = audit_records(records, report, example_tokenizer_for(config, tokenizer), config.max_seq_length,
                           config.normalizer())
    if not is_main_process():
        return 0
    print(format_table(result))
    output = output or os.path.join(config.output_dir, "audit.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as fh:
        json.dump(result, fh, ensure_ascii=False, indent=2)
    print(f"\nwrote {output}")
    return 0
