"""``train_sft.py export --model RUN_DIR --to DIR [--dtype auto] [--overwrite] [--format gguf,ollama --llama_cpp DIR]``:
a peft-free model folder (LoRA merged into its base) that plain ``transformers``, vLLM and transformers 4.x-era
readers load, with a GGUF (llama.cpp's converter) and an Ollama ``Modelfile`` on request (``src.training.export``)."""

from __future__ import annotations

import os
import shlex

from src.distributed import is_main_process


def run(argv: list[str]) -> int:
    from src.training.export import GGUF_NAME, parse_and_export
    from src.training.ollama import MODELFILE

    target = parse_and_export(argv)
    if is_main_process():
        print(f"Exported to {target}")
        gguf = os.path.join(target, GGUF_NAME)
        if os.path.isfile(gguf):
            print(f"GGUF: {gguf} (serve it with: llama-server -m {shlex.quote(gguf)} --jinja)")
        if os.path.isfile(os.path.join(target, MODELFILE)):
            print(f"Ollama: cd {shlex.quote(target)} && ollama create NAME -f {MODELFILE}")
    return 0
