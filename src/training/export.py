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

import ctypes
import ctypes.util
import logging
import os
import shutil
import sys
from typing import Any

import torch

from src.config import SFTConfig
from src.training import ollama, persistence, serving
from src.training.sft_trainer import SFTTrainer

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
        persistence.write_metadata(tmp, metadata)
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
