"""Everything a run writes, in one rank-aware place.

``save_run`` is the only writer of a finished run: the weights go through ``transformers.Trainer.save_model``
(which gathers FSDP/DeepSpeed state dicts and writes on ``args.should_save`` only), and the files that are
ours (generation config, ``sft_metadata.json``, the loss plot and model card, the tiny base model copy) are
written by the main process alone. Every rank checks the target folder before anyone writes, and waits
at a barrier until the main process is done, so no rank can find another rank's half-written files (the
bug of every rank saving: one torchrun run in six exited 1 without ``model.safetensors``).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
from datetime import datetime, timezone
from typing import Any, Iterable, Optional

from src.distributed import barrier, is_main_process, world_size

logger = logging.getLogger(__name__)

# Files whose presence means a directory already holds a saved model.
SAVED_MODEL_FILES = ("config.json", "model.safetensors", "adapter_model.safetensors", "adapter_config.json")
LIBRARIES = ("torch", "transformers", "peft", "datasets", "accelerate", "tokenizers")


def metadata_filename(method: str) -> str:
    """``sft_metadata.json`` for method "sft": the one spelling of the metadata file name."""
    return f"{method}_metadata.json"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def check_output_dir(path: str, method: str, overwrite: bool, already_ours: Iterable[str] = ()) -> None:
    """Refuse to write a model over one that is already there, unless told to (read-only; safe on every rank)."""
    if path in set(already_ours) or overwrite or not os.path.isdir(path):
        return
    present = [f for f in SAVED_MODEL_FILES + (metadata_filename(method),) if os.path.exists(os.path.join(path, f))]
    if present:
        raise FileExistsError(
            f"{path} already holds a saved model ({', '.join(present)}); choose another output_dir or set "
            "overwrite_output_dir=True to replace it"
        )


def read_metadata(path: str, method: str) -> dict[str, Any]:
    """The metadata of a run written by :func:`save_run`; a clear error for anything else."""
    from src.models.loading import ModelLoadError

    meta_path = os.path.join(path, metadata_filename(method))
    if not os.path.isdir(path):
        raise ModelLoadError(f"load_model: {path!r} is not a directory; expected a directory written by save_model")
    if not os.path.isfile(meta_path):
        raise ModelLoadError(f"load_model: {path!r} is not a saved {method} run: it has no "
                             f"{os.path.basename(meta_path)} (expected a directory written by save_model)")
    with open(meta_path, encoding="utf-8") as fh:
        return json.load(fh)


def save_run(owner: Any, output_dir: str) -> None:
    """Write ``owner``'s model, tokenizer, generation config, metadata and report into ``output_dir``.

    Call it on every rank. ``owner`` is a :class:`~src.training.base_trainer.BaseTrainer`.
    """
    method = owner._get_training_method()
    barrier()  # nobody checks while another rank could still be writing an earlier save
    check_output_dir(output_dir, method, owner.config.overwrite_output_dir, owner._saved_dirs)
    barrier()  # every rank has checked before the main process writes anything
    try:
        hf = owner.trainer
        if hf is not None:
            hf.save_model(output_dir)  # gathers sharded state dicts; writes on args.should_save only
        elif is_main_process():
            os.makedirs(output_dir, exist_ok=True)
            owner.model.save_pretrained(output_dir)
            owner.tokenizer.save_pretrained(output_dir)
        if is_main_process():
            _write_own_files(owner, output_dir, method)
    finally:
        barrier()
    owner._saved_dirs.add(output_dir)
    logger.info("Saved %s model to %s", "LoRA adapter" if owner.config.use_lora else "full", output_dir)


def _write_own_files(owner: Any, output_dir: str, method: str) -> None:
    """The files that are ours, main process only: base model copy, generation config, metadata, report."""
    from src.models.tiny import TINY_MODEL_NAME

    config = owner.config
    os.makedirs(output_dir, exist_ok=True)
    # training_args.bin is a pickle that Trainer.save_model adds; the run's settings are in the metadata.
    args_file = os.path.join(output_dir, "training_args.bin")
    if os.path.isfile(args_file):
        os.remove(args_file)
    base_model = owner.base_model_path
    if config.use_lora and config.model_name == TINY_MODEL_NAME and base_model:
        # The built-in tiny base lives in the training output_dir; keep the saved run self-contained.
        target = os.path.join(output_dir, "base_model")
        if os.path.abspath(target) != os.path.abspath(base_model):
            shutil.copytree(base_model, target, dirs_exist_ok=True)
        base_model = "base_model"
    elif base_model and os.path.isdir(base_model):
        base_model = os.path.abspath(base_model)
    owner.write_generation_config(output_dir)
    metadata = {
        "training_method": method,
        **owner.metadata(),
        "model_name": config.model_name,
        "base_model": base_model,
        "use_lora": bool(config.use_lora),
        "dataset_path": config.dataset_path,
        "training_completed_at": owner.training_completed_at,
        "saved_at": utc_now(),
        "final_metrics": owner.final_metrics,
        "world_size": world_size(),
        "config": config.to_dict(),
        "versions": library_versions(),
    }
    with open(os.path.join(output_dir, metadata_filename(method)), "w", encoding="utf-8") as fh:
        json.dump(metadata, fh, ensure_ascii=False, indent=2)
    if owner.train_result is not None and owner.trainer is not None:
        from src.training.report import write_report

        write_report(output_dir, metadata, owner.trainer.state.log_history, owner.final_metrics)


def write_jsonl(path: str, rows: Iterable[dict]) -> Optional[str]:
    """Write rows as JSON lines from the main process only; returns the path on the writer, None elsewhere."""
    if not is_main_process():
        return None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
