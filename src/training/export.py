"""Exporting a trained run as a plain ``transformers`` model folder (``train_sft.py export``).

A LoRA run is merged into its base model (``peft``'s ``merge_and_unload``); a full run is re-saved. The
folder gets safetensors weights, the tokenizer, a generation config that stops at the template's end token,
and ``sft_metadata.json`` (the run's, marked as exported and merged), so plain ``transformers`` and
serving engines that read the same files (vLLM) load it without peft, and ``load_model`` still restores
the formatting settings. Weights keep the checkpoint's own precision unless ``dtype`` says otherwise.

The target is written to a temporary sibling and put in place when complete: renamed, or, over an earlier
export, swapped with it in one atomic exchange (``renameat2(RENAME_EXCHANGE)`` on Linux), so a kill at any
moment leaves the previous export or the new one whole, never neither. An existing target is refused unless
``overwrite``, and even then export follows training's ownership rules: it never replaces a folder that holds
files this project did not write, nor one that contains the run being exported.

Every export is also made readable by transformers 4.x-era readers and llama.cpp's converter
(:func:`src.training.serving.make_portable`). ``formats`` adds, inside the folder, ``model.gguf`` (``gguf``: llama.cpp's
own ``convert_hf_to_gguf.py`` from a checkout the user names) and an Ollama ``Modelfile`` (``ollama``:
:mod:`src.training.ollama`) whose template writes prompts as training did; ``FROM`` is the GGUF when there is one,
else the folder itself.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

from src.training import persistence

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
FORMATS = ("hf", "gguf", "ollama")
GGUF_NAME = "model.gguf"
CONVERSION_LOG = "gguf_conversion.log"


def parse_formats(values: Any) -> tuple[str, ...]:
    """``--format`` values (repeated, or comma-separated) as a tuple of :data:`FORMATS`; ``hf`` is always written."""
    if isinstance(values, str):
        values = [values]
    names = [name.strip() for value in values or () for name in str(value).split(",") if name.strip()]
    bad = [name for name in names if name not in FORMATS]
    if bad:
        raise ValueError(f"export: --format {bad[0]!r} is invalid: expected one or more of {', '.join(FORMATS)} "
                         "(comma-separated or repeated)")
    return tuple(name for name in FORMATS if name == "hf" or name in names)


def check_formats(formats: Any, llama_cpp: str | None = None, llama_cpp_python: str | None = None,
                  gguf_outtype: str | None = None) -> tuple[str, ...]:
    """The formats to write (:func:`parse_formats`), once what they need is there: for ``gguf`` the llama.cpp checkout,
    its converter and the ``gguf`` package (:func:`src.training.serving.check_llama_cpp`); one-line errors."""
    from src.training import serving

    formats = parse_formats(formats)
    if gguf_outtype is not None and gguf_outtype not in serving.GGUF_OUTTYPES:
        raise ValueError(f"export: --gguf_outtype {gguf_outtype!r} is invalid: expected one of {serving.GGUF_OUTTYPES}")
    if "gguf" in formats:
        serving.check_llama_cpp(llama_cpp, llama_cpp_python)
    elif llama_cpp or gguf_outtype or llama_cpp_python:
        raise ValueError("export: --llama_cpp, --llama_cpp_python and --gguf_outtype go with --format gguf")
    return formats


def export_run(model_dir: str, target: str, *, overwrite: bool = False, dtype: str = "auto",
               trust_remote_code: bool = False, formats: Any = ("hf",), llama_cpp: str | None = None,
               llama_cpp_python: str | None = None, gguf_outtype: str | None = None) -> str:
    """Write ``model_dir`` (a run saved by ``save_model``) as a merged, peft-free model folder at ``target``; with
    ``formats`` also ``model.gguf`` (``gguf``, converted by the llama.cpp checkout ``llama_cpp``) and an Ollama
    ``Modelfile`` (``ollama``) in it. What each format needs is checked before anything is merged."""
    import torch

    from src.config import SFTConfig
    from src.training import ollama, serving
    from src.training.sft_trainer import SFTTrainer

    if dtype not in DTYPES:
        raise ValueError(f"export: dtype={dtype!r} is invalid: expected one of {DTYPES}")
    formats = check_formats(formats, llama_cpp, llama_cpp_python, gguf_outtype)
    check_target(model_dir, target, overwrite)
    if "ollama" in formats:  # before minutes of merging: a system prompt a Modelfile cannot carry
        ollama.check_modelfile_text(persistence.read_metadata(model_dir, "sft").get("system_prompt"))
    trainer = SFTTrainer(SFTConfig(output_dir=target, trust_remote_code=trust_remote_code))
    trainer.load_model(model_dir, dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    model = trainer.model
    merged = hasattr(model, "merge_and_unload")
    if merged:
        model = model.merge_and_unload()
    trainer.model = model
    metadata = trainer.read_metadata(model_dir)
    metadata.update({
        "use_lora": False,
        "base_model": None,
        "exported_from": os.path.abspath(model_dir),
        "merged_lora_adapter": merged,
        "exported_at": persistence.utc_now(),
        "export_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "export_formats": list(formats),
    })
    tmp = f"{os.path.abspath(target).rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    failure = None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        trainer.tokenizer.save_pretrained(tmp)
        trainer.write_generation_config(tmp)
        card = os.path.join(model_dir, "README.md")
        if os.path.isfile(card):
            shutil.copy2(card, os.path.join(tmp, "README.md"))
        with open(os.path.join(tmp, persistence.metadata_filename("sft")), "w", encoding="utf-8") as fh:
            json.dump(persistence.json_safe(metadata), fh, ensure_ascii=False, indent=2, allow_nan=False)
        serving.make_portable(tmp)
        source = "."
        if "gguf" in formats:
            log = os.path.join(tmp, CONVERSION_LOG)
            try:
                serving.convert_to_gguf(tmp, llama_cpp, os.path.join(tmp, GGUF_NAME), outtype=gguf_outtype,
                                        python=llama_cpp_python, log_path=log)
                os.remove(log)
                source = "./" + GGUF_NAME
            except ValueError as exc:  # the transformers folder is whole: it is kept, the failure reported below
                failure = exc
        if "ollama" in formats and failure is None:
            preset = (metadata.get("normalization") or {}).get("preset", "none")
            ollama.write_modelfile(tmp, trainer.example_tokenizer(), trainer.stop_token_ids(), source,
                                   normalization=preset)
        _put_in_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if failure is not None:
        raise ValueError(f"export: {target} holds the transformers export, but {failure}; the converter's output is in "
                         f"{os.path.join(target, CONVERSION_LOG)}") from None
    logger.info("Exported %s%s to %s%s", model_dir, " (LoRA merged into its base)" if merged else "", target,
                "".join(f", with {name}" for name in (GGUF_NAME, ollama.MODELFILE)
                        if os.path.isfile(os.path.join(target, name))))
    return target


def check_target(model_dir: str, target: str, overwrite: bool) -> None:
    """Refuse a target that is, or contains, the run; an existing one unless ``overwrite``; and, even with it, one
    holding files this project did not write (an export or run of ours may be replaced, nothing else)."""
    source, dest = os.path.realpath(model_dir), os.path.realpath(target)
    if dest == source:
        raise ValueError(f"export: the target {target} is the run itself; choose another folder")
    if os.path.commonpath([source, dest]) == dest:
        raise ValueError(f"export: the target {target} contains the run {model_dir}; replacing it would delete the run. "
                         "Choose a folder outside it")
    if not os.path.exists(target) or (os.path.isdir(target) and not os.listdir(target)):
        return
    if not overwrite:
        raise FileExistsError(f"export: {target} already exists and is not empty; choose another folder or pass --overwrite")
    if not os.path.isdir(target):
        raise FileExistsError(f"export: {target} is a file; export writes a folder and never replaces a file it did not write")
    if not os.path.isfile(os.path.join(target, persistence.metadata_filename("sft"))):
        shown = ", ".join(sorted(os.listdir(target))[:5])
        raise FileExistsError(f"export: {target} holds files this project did not write ({shown}); --overwrite replaces an "
                              "earlier export only, never a folder of yours: choose another folder")


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _put_in_place(tmp: str, target: str) -> None:
    """``tmp`` becomes ``target``: a rename, or an atomic exchange with the earlier export (then deleted)."""
    if os.path.isdir(target) and os.listdir(target):
        if _exchange(tmp, target):
            return  # tmp now holds the earlier export; the caller removes it
        old = f"{os.path.abspath(target).rstrip(os.sep)}.old-{os.getpid()}"
        os.replace(target, old)  # no atomic exchange here: the earlier export waits beside the target meanwhile
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(tmp, target)


# What a run folder holds besides the model: checkpoints (optimizer states, RNG), the run's lock and marker, an
# unfinished save, tracker logs and generated evaluation answers. The hub gets the model only.
NOT_UPLOADED = ("checkpoint-*", "checkpoint-*/**", ".sft_run*", ".saving*", ".saving*/**", "runs/**",
                "eval_generations.jsonl", "*.lock")


HUB_TIMEOUT_S = 5.0


def hub_endpoint() -> str:
    """The hub the upload would go to: ``huggingface_hub``'s configured endpoint (``HF_ENDPOINT``)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def probe_hub(endpoint: str, timeout: float = HUB_TIMEOUT_S) -> str | None:
    """``None`` when ``endpoint`` answers a HEAD request within ``timeout`` seconds (with any status below 500);
    otherwise why not, in a few words. Uses ``huggingface_hub``'s own HTTP session (its proxies and headers)."""
    from huggingface_hub.utils import get_session

    try:
        response = get_session().head(endpoint, timeout=timeout)
    except Exception as exc:  # connection refused, DNS, timeout, proxy: whatever the installed HTTP client raises
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}: {first}"[:200]
    if response.status_code >= 500:
        return f"it answered HTTP {response.status_code}"
    return None


def check_hub_reachable(repo_id: str, folder: str) -> None:
    """Refuse a push that cannot happen (offline, or the hub unreachable), before the work whose result it would
    upload: ``HF_HUB_OFFLINE`` set (now, or when ``huggingface_hub`` was imported: its session then refuses every
    request), or no answer from the hub endpoint within :data:`HUB_TIMEOUT_S` seconds."""
    from huggingface_hub import constants

    later = f"run without pushing, then upload the folder when online: huggingface-cli upload {repo_id} {folder}"
    offline = os.environ.get("HF_HUB_OFFLINE")
    if offline == "1" or constants.HF_HUB_OFFLINE:  # the constant: huggingface_hub's reading of it at import
        raise ValueError(f"cannot push {folder} to the hub repository {repo_id!r}: HF_HUB_OFFLINE={offline or '1'} is set "
                         "(offline); " + later)
    endpoint = hub_endpoint()
    reason = probe_hub(endpoint)
    if reason is not None:
        raise ValueError(f"cannot push {folder} to the hub repository {repo_id!r}: the hub at {endpoint} is unreachable "
                         f"(offline? {reason}; checked with a {HUB_TIMEOUT_S:g} s timeout); " + later)


def push_folder(folder: str, repo_id: str, private: bool = True) -> str:
    """Upload a saved or exported folder to the Hugging Face Hub (``huggingface_hub``); a clear error offline."""
    check_hub_reachable(repo_id, folder)
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload model saved by arabic-qwen-sft",
                          ignore_patterns=list(NOT_UPLOADED))
    except Exception as exc:  # network, authentication and permission errors of the hub client
        raise ValueError(f"could not push {folder} to the hub repository {repo_id!r}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}; the exported folder is kept") from None
    return f"https://huggingface.co/{repo_id}"


def parse_and_export(argv: list[str]) -> Any:
    import argparse

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
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("export: --push_to_hub needs --hub_model_id org/name")
    formats = check_formats(args.format or ["hf"], args.llama_cpp, args.llama_cpp_python, args.gguf_outtype)
    if args.push_to_hub:  # before minutes of merging, not after
        check_hub_reachable(args.hub_model_id, args.to)
    target = export_run(args.model, args.to, overwrite=args.overwrite, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code, formats=formats, llama_cpp=args.llama_cpp,
                        llama_cpp_python=args.llama_cpp_python, gguf_outtype=args.gguf_outtype)
    if args.push_to_hub:
        push_folder(target, args.hub_model_id, private=not args.public)
    return target
