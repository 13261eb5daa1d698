"""Exported folders that other serving stacks read as we trained: transformers 4.x-era readers, llama.cpp, Ollama.

transformers 5 writes three things that readers pinned to transformers 4.x (llama.cpp's ``convert_hf_to_gguf.py``
among them) misread or crash on; :func:`make_portable` rewrites a saved folder so both generations read the same:

- ``tokenizer_config.json``: ``extra_special_tokens`` as a *list* (transformers 4.x expects a mapping of named
  tokens and crashes with ``'list' object has no attribute 'keys'``) becomes ``additional_special_tokens``, the
  name both generations read (transformers 5 turns it back into ``extra_special_tokens`` on load);
- the chat template, saved by transformers 5 only as ``chat_template.jinja``, is also written under
  ``tokenizer_config.json``'s ``chat_template`` key (the same text: transformers 5 reads the ``.jinja`` file first,
  older readers and the ``gguf`` package read the key first; without it llama-server falls back to ChatML);
- ``config.json``: the RoPE base, which transformers 5 keeps inside ``rope_parameters``, is also written as the
  top-level ``rope_theta`` (older converters otherwise use 10000 instead of Qwen's 1e6), Qwen3.5's
  ``partial_rotary_factor`` also at the top level, and a scaled RoPE (``rope_type`` other than ``default``) also as
  ``rope_scaling``; transformers 5 reads them back into the same ``rope_parameters``. (Ollama's own safetensors
  import reads the top-level ``rope_theta`` too, but a scaled RoPE only under the older key ``rope_scaling.type``,
  which transformers 5 would keep as an extra setting: for a scaled RoPE, give Ollama the GGUF.)

Nothing else changes: transformers 5 loads the folder with the same tokenizer ids, special tokens, chat
template rendering, config and generations (``tests/test_serving.py``).

:func:`convert_to_gguf` runs llama.cpp's own converter on such a folder (``export --format gguf``); the Ollama
``Modelfile`` is :mod:`src.training.ollama`'s.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from typing import Any

logger = logging.getLogger(__name__)

CONVERTER = "convert_hf_to_gguf.py"
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _write_json(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, ensure_ascii=False, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def portable_tokenizer_config(config: dict, chat_template: str | None) -> dict:
    """``tokenizer_config.json``'s content as transformers 4.x and 5 both read it (module docstring)."""
    out = dict(config)
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):
        additional = list(out.get("additional_special_tokens") or [])
        for token in extra:
            if token not in additional:
                additional.append(token)
        del out["extra_special_tokens"]
        out["additional_special_tokens"] = additional
    if chat_template is not None:
        out["chat_template"] = chat_template
    return out


def portable_model_config(config: dict) -> dict:
    """``config.json``'s content with the RoPE settings also where transformers 4.x reads them (module docstring)."""
    out = dict(config)
    for key in ("text_config",):  # multimodal configs keep the language model's settings one level down
        if isinstance(out.get(key), dict):
            out[key] = portable_model_config(out[key])
    rope = out.get("rope_parameters")
    if not isinstance(rope, dict) or not isinstance(rope.get("rope_theta"), (int, float)):
        return out  # absent, or one set per layer type: nothing a 4.x reader could take
    out.setdefault("rope_theta", rope["rope_theta"])
    if "partial_rotary_factor" in rope:  # Qwen3.5: rotary embedding on part of each head, top-level in 4.x
        out.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
    if rope.get("rope_type", "default") != "default" and "rope_scaling" not in out:
        out["rope_scaling"] = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return out


def make_portable(folder: str) -> list[str]:
    """Rewrite the transformers 5 files of a saved model folder (an export or a run) so that transformers 4.x-era
    readers and llama.cpp's converter read them as transformers 5 does; returns the names of the files changed.
    A folder without these files (a LoRA adapter has no ``config.json``) keeps what it has."""
    changed = []
    template_path = os.path.join(folder, "chat_template.jinja")
    chat_template = None
    if os.path.isfile(template_path):
        with open(template_path, encoding="utf-8") as fh:
            chat_template = fh.read()
    for name, rewrite in (("tokenizer_config.json", lambda c: portable_tokenizer_config(c, chat_template)),
                          ("config.json", portable_model_config)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        before = _read_json(path)
        after = rewrite(before)
        if after != before:
            _write_json(path, after)
            changed.append(name)
    return changed


# -- llama.cpp ------------------------------------------------------------------------------------------------------
def check_llama_cpp(llama_cpp_dir: str | None, python: str | None = None) -> str:
    """The converter script of a llama.cpp checkout, or a one-line ``ValueError`` naming what is missing: the
    folder, its ``convert_hf_to_gguf.py``, or the ``gguf`` package (the checkout's ``gguf-py`` or an installed one)."""
    if not llama_cpp_dir:
        raise ValueError("export: --format gguf needs --llama_cpp DIR, a llama.cpp checkout (git clone "
                         "https://github.com/ggml-org/llama.cpp): its convert_hf_to_gguf.py does the conversion")
    if not os.path.isdir(llama_cpp_dir):
        raise ValueError(f"export: --llama_cpp {llama_cpp_dir} does not exist or is not a folder; point it to a "
                         "llama.cpp checkout (git clone https://github.com/ggml-org/llama.cpp)")
    script = os.path.join(llama_cpp_dir, CONVERTER)
    if not os.path.isfile(script):
        raise ValueError(f"export: --llama_cpp {llama_cpp_dir} has no {CONVERTER}; point it to the root of a llama.cpp "
                         "checkout (the pip package 'gguf' alone has no converter)")
    python = python or sys.executable
    if python != sys.executable and not os.path.isfile(python):
        raise ValueError(f"export: --llama_cpp_python {python} does not exist")
    if not os.path.isfile(os.path.join(llama_cpp_dir, "gguf-py", "gguf", "__init__.py")) and not _importable(python, "gguf"):
        raise ValueError(f"export: llama.cpp's converter needs the gguf package, which neither {llama_cpp_dir}/gguf-py "
                         f"nor {python} has: pip install gguf (or pip install -r {llama_cpp_dir}/requirements.txt)")
    return script


def _importable(python: str, module: str) -> bool:
    if python == sys.executable:
        return importlib.util.find_spec(module) is not None
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def convert_to_gguf(folder: str, llama_cpp_dir: str, outfile: str, *, outtype: str | None = None,
                    python: str | None = None, log_path: str | None = None) -> str:
    """Run llama.cpp's ``convert_hf_to_gguf.py`` on an exported ``folder``, writing ``outfile``. Its output goes to
    ``log_path`` (if given); a failure is a one-line ``ValueError`` with the converter's last error line."""
    script = check_llama_cpp(llama_cpp_dir, python)
    command = [python or sys.executable, script, folder, "--outfile", outfile]
    if outtype:
        command += ["--outtype", outtype]
    logger.info("Converting %s to GGUF with %s", folder, script)
    result = subprocess.run(command, capture_output=True, text=True, errors="replace")
    output = result.stdout + result.stderr
    if log_path:
        with open(log_path, "w", encoding="utf-8") as fh:
            fh.write(" ".join(command) + "\n" + output)
    if result.returncode != 0 or not os.path.isfile(outfile):
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        last = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "")
        if os.path.exists(outfile):
            os.remove(outfile)
        raise ValueError(f"llama.cpp's converter failed (exit {result.returncode}): {last[:300]}")
    return outfile
