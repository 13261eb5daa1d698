"""``train_sft.py audit --config run.yaml [--audit_output audit.json]``: the data report of ``src.data.audit``.

Reads the data exactly as training does (``src.data.wiring``: same loader or mixture, hold-out, normalization
and template, with invalid rows counted instead of raised), prints the table and writes JSON (default ``<output_dir>/audit.json``).
"""

from __future__ import annotations

import json
import os

from src.cli.args import parse_config
from src.config import SFTConfig
from src.data.audit import audit_records, format_table
from src.data.wiring import example_tokenizer_for, load_config_records
from src.distributed import is_main_process
from src.models.loading import load_tokenizer, resolve_model_path


def run(argv: list[str]) -> int:
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
