"""``train_sft.py export --model RUN_DIR --to DIR [--dtype auto] [--overwrite] [--format gguf,ollama --llama_cpp DIR]``:
a peft-free model folder (LoRA merged into its base) that plain ``transformers``, vLLM and transformers 4.x-era
readers load, with a GGUF (llama.cpp's converter) and an Ollama ``Modelfile`` on request (``src.training.export``);
``--push_to_hub`` uploads it (``src.training.hub``)."""

from __future__ import annotations

import argparse
import os
import shlex

from src.distributed import is_main_process
from src.training import hub
from src.training.export import DTYPES, GGUF_NAME, check_formats, export_run
from src.training.ollama import MODELFILE


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train_sft.py export", allow_abbrev=False,
                                     description="Merge a trained run (LoRA or full) into a plain transformers model folder.")
    parser.add_argument("--model", required=True, help="a run folder written by training (its output_dir)")
    parser.add_argument("--to", required=True, help="the folder to write (must be new or empty, unless --overwrite)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="weight precision (auto: the checkpoint's own)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing target folder")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--push_to_hub", action="store_true", help="also upload the exported folder to the hub")
    parser.add_argument("--hub_model_id", help="the hub repository ('org/name') for --push_to_hub")
    parser.add_argument("--public", action="store_true", help="create the hub repository public (default: private)")
    parser.add_argument("--format", action="append", default=None, metavar="FORMAT",
                        help="also write, inside the folder: gguf (model.gguf, converted by llama.cpp; needs --llama_cpp), "
                             "ollama (a Modelfile: FROM model.gguf with gguf, else the folder); comma-separated or "
                             "repeated, e.g. --format gguf,ollama. The transformers folder (hf) is always written")
    parser.add_argument("--llama_cpp", metavar="DIR", help="a llama.cpp checkout: its convert_hf_to_gguf.py converts")
    parser.add_argument("--llama_cpp_python", metavar="PYTHON",
                        help="the interpreter that runs the converter (default: this one), e.g. llama.cpp's own venv")
    parser.add_argument("--gguf_outtype", metavar="TYPE",
                        help="the converter's --outtype: f32, f16, bf16, q8_0 or auto (default: the converter's own)")
    return parser


def export(argv: list[str]) -> str:
    """Parse ``argv``, check what the export and the push need (before minutes of merging), export, push."""
    args = parser().parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("export: --push_to_hub needs --hub_model_id org/name")
    formats = check_formats(args.format or ["hf"], args.llama_cpp, args.llama_cpp_python, args.gguf_outtype)
    if args.push_to_hub:  # before minutes of merging, not after
        hub.check_hub_reachable(args.hub_model_id, args.to)
    target = export_run(args.model, args.to, overwrite=args.overwrite, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code, formats=formats, llama_cpp=args.llama_cpp,
                        llama_cpp_python=args.llama_cpp_python, gguf_outtype=args.gguf_outtype)
    if args.push_to_hub:
        hub.push_folder(target, args.hub_model_id, private=not args.public)
    return target


def run(argv: list[str]) -> int:
    target = export(argv)
    if is_main_process():
        print(f"Exported to {target}")
        gguf = os.path.join(target, GGUF_NAME)
        if os.path.isfile(gguf):
            print(f"GGUF: {gguf} (serve it with: llama-server -m {shlex.quote(gguf)} --jinja)")
        if os.path.isfile(os.path.join(target, MODELFILE)):
            print(f"Ollama: cd {shlex.quote(target)} && ollama create NAME -f {MODELFILE}")
    return 0
