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

import json
import os
import sys
from typing import Any

from src.cli.args import parse_config
from src.config import SFTConfig
from src.data.audit import audit_records, format_table
from src.data.tokenization import drop_reason
from src.data.viewer import show_rows
from src.data.wiring import example_tokenizer_for, load_config_records
from src.distributed import is_main_process
from src.models.loading import load_tokenizer, resolve_model_path

VIEWER_FLAGS = {"--show": True, "--rows": True, "--color": True, "--packed": False, "--json": False}


def _take_viewer_flags(argv: list[str]) -> tuple[list[str], dict]:
    """The viewer's flags out of ``argv`` (the rest is the config's)."""
    flags: dict = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        name, eq, inline = argv[i].partition("=")
        if name in VIEWER_FLAGS:
            if VIEWER_FLAGS[name]:
                value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else None)
                if value is None or value.startswith("--"):
                    raise ValueError(f"audit: {name} needs a value")
                flags[name[2:]] = value
                i += 1 if eq else 2
                continue
            flags[name[2:]] = True
        else:
            rest.append(argv[i])
        i += 1
    return rest, flags


def _show(config: Any, records: dict, example_tokenizer: Any, flags: dict) -> int:
    """The token-level viewer (module docstring; ``src.data.viewer.show_rows``)."""
    try:
        count = int(flags.get("show", 0))
    except ValueError:
        raise ValueError(f"audit: --show {flags['show']!r} is not a number of rows") from None
    color_choice = flags.get("color", "auto")
    if color_choice not in ("auto", "always", "never"):
        raise ValueError(f"audit: --color {color_choice!r}: expected auto, always or never")
    color = color_choice == "always" or (color_choice == "auto" and sys.stdout.isatty() and not flags.get("json"))
    rows = None
    if "rows" in flags:
        try:
            rows = [int(x) for x in str(flags["rows"]).split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"audit: --rows {flags['rows']!r}: expected 0-based row numbers like 0,4,9") from None
    try:
        text = show_rows(records.get("train") or [], example_tokenizer, count, rows, bool(flags.get("packed")), color,
                         bool(flags.get("json")), drop_note=f" ({drop_reason(config.overlong_policy)})")
    except ValueError as exc:
        raise ValueError(f"audit: {exc}") from None
    if is_main_process():
        print(text)
    return 0


def run(argv: list[str]) -> int:
    argv, viewer = _take_viewer_flags(argv)
    output = None
    if "--audit_output" in argv:
        i = argv.index("--audit_output")
        output = argv[i + 1] if i + 1 < len(argv) else None
        if output is None:
            raise ValueError("--audit_output needs a file path")
        argv = argv[:i] + argv[i + 2:]
    config = parse_config(SFTConfig, argv)
    records, report = load_config_records(config, skip_invalid=True)
    # Only the tokenizer is needed; for local:tiny-qwen2 this builds the tiny model once, as training would.
    source = config.tokenizer_name or resolve_model_path(config.model_name, config.output_dir, config.dataset_path, config.seed)
    tokenizer = load_tokenizer(source, trust_remote_code=config.trust_remote_code)
    if viewer:
        if "show" not in viewer and "rows" not in viewer:
            raise ValueError(f"audit: {', '.join('--' + k for k in viewer)} go with --show N (the example viewer)")
        return _show(config, records, example_tokenizer_for(config, tokenizer), viewer)
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
