"""Everything a run writes, in one rank-aware place, and the rules that keep it whole.

``save_run`` is the only writer of a finished run: the weights go through ``transformers.Trainer.save_model``
(which gathers FSDP/DeepSpeed state dicts and writes on ``args.should_save`` only), and the files that are
ours (generation config, ``sft_metadata.json``, the loss plot and model card, the tiny base model copy) are
written by the main process alone. Checks are decided by the main process and shared with every rank
(``src.distributed.main_decides``: all ranks raise the same error or all go on), and the other ranks wait
at a barrier until the main process is done, so no rank can find another rank's half-written files (the
bug of every rank saving: one torchrun run in six exited 1 without ``model.safetensors``).

What we guarantee about the output folder:

- **Own your folder** (:func:`claim_output_dir`, before anything is loaded): a run refuses a folder that
  holds files this project did not write (unless ``overwrite_output_dir``), a folder another live run is
  writing to (a lock file with its process id and host; a stale lock is reported and taken over), a
  folder that is a file or is not writable, and a folder with a saved model (unless overwriting or
  resuming). It writes a marker (``.sft_run.json``) and holds the lock until it ends.
  ``overwrite_output_dir`` also removes old ``checkpoint-*`` folders, so ``resume_from_checkpoint='last'``
  can never continue an older run.
- **Atomic final save**: the model is written to a staging folder inside ``output_dir`` first; only when
  every file is complete is the old run's metadata removed, the files moved into place (renames) and
  the metadata written last. The metadata file is the completeness marker ``load_model`` checks: a save
  that fails while writing (a full disk) leaves the previous model untouched.
- **Complete checkpoints only**: a checkpoint counts when its ``trainer_state.json`` (which the Trainer
  writes last) parses and its weights are there; ``resume_from_checkpoint='last'`` takes the newest
  complete one and names those it skipped.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import shutil
import socket
from datetime import datetime, timezone
from typing import Any, Iterable, Optional

from src.distributed import barrier, is_main_process, main_decides, world_size

logger = logging.getLogger(__name__)

# Files whose presence means a directory already holds a saved model.
SAVED_MODEL_FILES = ("config.json", "model.safetensors", "adapter_model.safetensors", "adapter_config.json")
LIBRARIES = ("torch", "transformers", "peft", "datasets", "accelerate", "tokenizers")
RUN_MARKER = ".sft_run.json"
LOCK_FILE = ".sft_run.lock"
STAGING_DIR = ".saving"
# What our own commands put into an output_dir before a run has written its marker (the audit command, the
# tiny-model build, generation-based evaluation before training), besides the Trainer's checkpoints.
OWN_BEFORE_MARKER = ("base_model", "audit.json", "eval_generations.jsonl", RUN_MARKER, LOCK_FILE, STAGING_DIR)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


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
    try:
        with open(meta_path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"load_model: {meta_path} is damaged (not valid JSON: {exc}); the save that wrote it "
                             "did not finish") from None


def save_run(owner: Any, output_dir: str) -> None:
    """Write ``owner``'s model, tokenizer, generation config, metadata and report into ``output_dir``.

    Call it on every rank. ``owner`` is a :class:`~src.training.base_trainer.BaseTrainer`. Everything is
    written into ``<output_dir>/.saving`` first and moved into place once complete (module docstring).
    """
    method = owner._get_training_method()
    staging = os.path.join(output_dir, STAGING_DIR)

    def check() -> None:
        check_output_dir(output_dir, method, owner.config.overwrite_output_dir, owner._saved_dirs)
        if os.path.isfile(output_dir):
            raise ValueError(f"output_dir {output_dir!r} is a file; expected a directory")
        if os.path.isdir(staging):
            shutil.rmtree(staging)  # what an earlier, failed save left

    main_decides(check)  # all ranks raise together, or all go on
    owner.before_save()  # e.g. the tokenizer's chat template, so it is saved with the tokenizer
    try:
        hf = owner.trainer
        if hf is not None:
            hf.save_model(staging)  # gathers sharded state dicts; writes on args.should_save only
        elif is_main_process():
            os.makedirs(staging, exist_ok=True)
            owner.model.save_pretrained(staging)
            owner.tokenizer.save_pretrained(staging)
        if is_main_process():
            _write_own_files(owner, staging, method)
            _move_into_place(staging, output_dir, metadata_filename(method))
    finally:
        barrier()
    owner._saved_dirs.add(output_dir)
    logger.info("Saved %s model to %s", "LoRA adapter" if owner.config.use_lora else "full", output_dir)


def _move_into_place(staging: str, output_dir: str, marker: str) -> None:
    """Renames, marker last: the old marker goes first, so a half-moved folder is never taken for a whole run."""
    old_marker = os.path.join(output_dir, marker)
    if os.path.exists(old_marker):
        os.remove(old_marker)
    staged = set(os.listdir(staging))
    for name in os.listdir(output_dir):
        # An earlier save's files that this save does not write (a LoRA adapter next to a new full model,
        # weight shards, an old plot) would be taken for part of this run: they go.
        if name not in staged and _is_saved_run_file(name):
            os.remove(os.path.join(output_dir, name))
    for name in sorted(staged):
        if name == marker:
            continue
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.replace(os.path.join(staging, marker), old_marker)
    shutil.rmtree(staging, ignore_errors=True)


SAVED_RUN_FILE_RE = re.compile(
    r"^(config\.json|generation_config\.json|adapter_config\.json|README\.md|training_curves\.png|training_args\.bin"
    r"|(model|adapter_model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)|(model|pytorch_model)\.(safetensors|bin)\.index\.json)$")


def _is_saved_run_file(name: str) -> bool:
    """A file name that a model save writes (weights, shards, configs, the card and plot)."""
    return bool(SAVED_RUN_FILE_RE.match(name))


def _write_own_files(owner: Any, output_dir: str, method: str) -> None:
    """The files that are ours, main process only: base model copy, generation config, metadata, report."""
    from src.models.tiny import TINY_MODELS

    config = owner.config
    os.makedirs(output_dir, exist_ok=True)
    # training_args.bin is a pickle that Trainer.save_model adds; the run's settings are in the metadata.
    args_file = os.path.join(output_dir, "training_args.bin")
    if os.path.isfile(args_file):
        os.remove(args_file)
    base_model = owner.base_model_path
    final_dir = os.path.dirname(os.path.abspath(output_dir))  # output_dir is the staging folder inside it
    if config.use_lora and config.model_name in TINY_MODELS and base_model:
        # The built-in tiny base lives in the training output_dir; keep the saved run self-contained.
        if os.path.abspath(os.path.join(final_dir, "base_model")) != os.path.abspath(base_model):
            shutil.copytree(base_model, os.path.join(output_dir, "base_model"))
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
        # the data-parallel engine that trained (None: the model was loaded, not trained, in this process)
        "engine": getattr(owner.trainer, "engine", None),
        "mixed_precision": config.mixed_precision,
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


# -- owning the output folder ----------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(output_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(output_dir, LOCK_FILE), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def foreign_files(output_dir: str, method: str) -> list[str]:
    """Entries of ``output_dir`` this project did not write (empty when the folder is a run of ours)."""
    if not os.path.isdir(output_dir):
        return []
    entries = os.listdir(output_dir)
    if RUN_MARKER in entries or metadata_filename(method) in entries:
        return []
    return sorted(e for e in entries if e not in OWN_BEFORE_MARKER and not CHECKPOINT_RE.match(e))


def claim_output_dir(output_dir: str, method: str, overwrite: bool, resuming: bool, write: bool = True) -> None:
    """Check ``output_dir``, then clear old checkpoints when overwriting, write the run marker and take the
    lock. The main process decides and every rank raises the same error (``main_decides``). Raises before
    anything is loaded (see the module docstring). ``write=False`` only checks (nothing is written: for
    refusing early, before the data is even read)."""
    lock_holder: dict = {}

    def check() -> None:
        if os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise ValueError(f"output_dir {output_dir!r} is a file; expected a directory")
        lock = read_lock(output_dir)
        if lock and lock.get("pid") != os.getpid() and lock.get("host") == socket.gethostname() \
                and _pid_alive(int(lock.get("pid", 0))):
            raise FileExistsError(f"{output_dir} is in use by another run (pid {lock.get('pid')}, started "
                                  f"{lock.get('started_at')}); wait for it or choose another output_dir")
        lock_holder.update(lock or {})
        foreign = foreign_files(output_dir, method)
        if foreign and not overwrite:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise FileExistsError(f"{output_dir} holds files this project did not write ({shown}); choose a new or "
                                  "empty output_dir, or set overwrite_output_dir=True to write over them")
        check_output_dir(output_dir, method, overwrite)

    def claim() -> None:
        if lock_holder and lock_holder.get("pid") != os.getpid():
            logger.warning("%s: taking over a stale lock of pid %s (that process is gone)", output_dir,
                           lock_holder.get("pid"))
        try:
            os.makedirs(output_dir, exist_ok=True)
            if overwrite and not resuming:
                old = [e for e in os.listdir(output_dir) if CHECKPOINT_RE.match(e)]
                for name in old:
                    shutil.rmtree(os.path.join(output_dir, name))
                if old:
                    logger.info("overwrite_output_dir: removed %d old checkpoint folder(s) from %s", len(old), output_dir)
            marker = os.path.join(output_dir, RUN_MARKER)
            if not os.path.exists(marker):
                _write_json(marker, {"written_by": "arabic-qwen-sft", "method": method, "created_at": utc_now()})
            _write_json(os.path.join(output_dir, LOCK_FILE),
                        {"pid": os.getpid(), "host": socket.gethostname(), "started_at": utc_now()})
        except PermissionError as exc:
            raise ValueError(f"output_dir {output_dir!r} is not writable ({exc.strerror})") from None

    main_decides(check)
    if write:
        main_decides(claim)


def release_output_dir(output_dir: str) -> None:
    lock = read_lock(output_dir)
    if is_main_process() and lock and lock.get("pid") == os.getpid():
        os.remove(os.path.join(output_dir, LOCK_FILE))


def _write_json(path: str, value: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(value, fh, ensure_ascii=False, indent=2)
    os.replace(tmp, path)


# -- checkpoints ------------------------------------------------------------------------------------
def checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a complete checkpoint, or None when it is."""
    state = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state):
        return "no trainer_state.json (the save did not finish)"
    try:
        with open(state, encoding="utf-8") as fh:
            json.load(fh)
    except (ValueError, UnicodeDecodeError):
        return f"{state} is not valid JSON (the save did not finish)"
    if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        return "no model weights"
    return None


def checkpoint_step(path: str) -> int:
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as fh:
        return int(json.load(fh).get("global_step", 0))


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (logging each newer one skipped, and why)."""
    if not os.path.isdir(output_dir):
        return None
    found = sorted((int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(name)))
    for _, name in reversed(found):
        path = os.path.join(output_dir, name)
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("resume: skipping %s: %s", path, problem)
    return None
