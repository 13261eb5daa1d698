"""Everything a run writes, in one rank-aware place, and the rules that keep it whole.

``save_run`` is the only writer of a finished run: the weights go through ``transformers.Trainer.save_model``
(which gathers FSDP/DeepSpeed state dicts and writes on ``args.should_save`` only), and the files that are
ours (generation config, ``sft_metadata.json``, the loss plot and model card, the tiny base model copy) are
written by the main process alone. ``sft_metadata.json`` has one writer, :func:`write_metadata`, which the final
save, ``train_sft.py export`` and the benchmark scores (``src.training.benchmark``) all call. Checks are decided by the main process and shared with every rank
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
- **Resume continues the same run** (:func:`check_resume`): the run marker records the settings of the run that
  writes the folder's checkpoints; resuming with other settings is refused, naming each difference, unless the
  setting only decides how often the run logs, evaluates or saves, where it reports or how long it runs
  (:data:`RESUMABLE_SETTINGS`), or the user lists it in ``resume_allow_changes``. Every resume and what it changed
  is recorded in the marker and in ``sft_metadata.json`` (``resumes``).
- **Complete checkpoints only**: a checkpoint counts when its ``trainer_state.json`` (which the Trainer
  writes last) parses and its weights are there; ``resume_from_checkpoint='last'`` takes the newest
  complete one and names those it skipped.
"""

from __future__ import annotations

import errno
import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import uuid
from datetime import datetime, timezone
from typing import Any, Iterable, Optional

from src.distributed import barrier, is_main_process, main_decides, pid_alive, proc_stat_fields, world_size
from src.models.loading import ModelLoadError
from src.models.tiny import TINY_MODELS
from src.training.report import write_report

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
# Temporary folders and files of our own writers left by a killed or failed run (the tiny-model build's
# base_model.tmp-<pid>, a marker or lock being replaced): ours, never "files this project did not write".
OWN_TEMPORARY_RE = re.compile(r"^(base_model|\.sft_run\.json|\.sft_run\.lock)\.tmp-\d+$")
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


# Settings that may change when a run is resumed: how often it logs, evaluates and saves, where it reports, how long it
# runs, how it loads data and attends (exact either way). Every other setting decides what the checkpoint's weights,
# optimizer state and schedule mean, and a change is refused unless listed in resume_allow_changes.
RESUMABLE_SETTINGS = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "resume_allow_changes", "logging_steps",
    "eval_steps", "save_steps", "save_total_limit", "evaluation_strategy", "per_device_eval_batch_size", "report_to",
    "run_name", "max_steps", "num_train_epochs", "dataloader_num_workers", "dataloader_pin_memory", "push_to_hub",
    "hub_model_id", "hub_private_repo", "eval_generation_samples", "eval_generation_max_length",
    "early_stopping_patience", "early_stopping_threshold", "load_best_model_at_end", "dataset_cache_dir",
    "attn_implementation"})


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON has no such numbers; ``json.dump`` would write bare ``NaN``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def read_json_object(path: str) -> Optional[dict]:
    """The JSON object in ``path``, or None when it is missing, unreadable, not JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def run_record(folder: str) -> Optional[dict]:
    """The run marker of ``folder`` (who writes it, the run's settings, its resumes), or None."""
    return read_json_object(os.path.join(folder, RUN_MARKER))


def _settings(config: dict) -> dict:
    return json.loads(json.dumps(json_safe(config), ensure_ascii=False, default=str))


def check_resume(checkpoint: str, config: dict, allowed: Iterable[str] = ()) -> dict[str, list]:
    """The settings that differ between ``config`` and the run that wrote ``checkpoint`` (``{name: [old, new]}``);
    raises ``ValueError`` naming every difference outside :data:`RESUMABLE_SETTINGS` and ``allowed``."""
    record = run_record(os.path.dirname(os.path.abspath(checkpoint)))
    if record is None or not isinstance(record.get("config"), dict):
        logger.warning("resume: %s has no record of the settings of the run that wrote it (a run of an earlier "
                       "version): resuming without checking that they are this config's", checkpoint)
        return {}
    old, new = record["config"], _settings(config)
    changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    refused = {k: v for k, v in changed.items() if k not in RESUMABLE_SETTINGS and k not in set(allowed or ())}
    if refused:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in refused.items())
        raise ValueError(
            f"resume_from_checkpoint: {checkpoint} belongs to a run with other settings ({shown}). Resuming would "
            "continue that run's weights, optimizer and schedule under the new settings. Start a new run in another "
            "output_dir (or drop resume_from_checkpoint to replace the old run with overwrite_output_dir), or, to "
            f"continue it with the new values, set resume_allow_changes: [{', '.join(refused)}]")
    return changed


def metadata_filename(method: str) -> str:
    """``sft_metadata.json`` for method "sft": the one spelling of the metadata file name."""
    return f"{method}_metadata.json"


def write_metadata(folder: str, metadata: dict[str, Any], method: str = "sft") -> str:
    """The one writer of a run's ``<method>_metadata.json`` (the final save, export, benchmark scores): JSON with
    NaN and infinities as null. Over an existing file (benchmark scores added to a run) it writes a temporary file
    and renames it over the old one, so a reader finds the previous file or the new one whole; a new file is written
    in place: the callers that create one write into a folder nobody reads yet (the final save's staging folder,
    export's temporary folder), which is renamed into place once complete. Returns its path."""
    path = os.path.join(folder, metadata_filename(method))
    if os.path.exists(path):
        _write_json(path, metadata)
    else:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(json_safe(metadata), fh, ensure_ascii=False, indent=2, allow_nan=False)
    return path


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
    meta_path = os.path.join(path, metadata_filename(method))
    if os.path.isdir(path) and not os.path.isfile(meta_path):
        recover_interrupted_save(path, method)
    if not os.path.isdir(path):
        raise ModelLoadError(f"load_model: {path!r} is not a directory; expected a directory written by save_model")
    if not os.path.isfile(meta_path):
        raise ModelLoadError(f"load_model: {path!r} is not a saved {method} run: it has no "
                             f"{os.path.basename(meta_path)} (expected a directory written by save_model)")
    try:
        with open(meta_path, encoding="utf-8") as fh:
            metadata = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"load_model: {meta_path} is damaged (not valid JSON: {exc}); the save that wrote it "
                             "did not finish") from None
    except RecursionError:
        raise ModelLoadError(f"load_model: {meta_path} is not valid JSON as save_model writes it (nested too "
                             "deeply); the file was replaced or edited") from None
    except OSError as exc:
        raise ModelLoadError(f"load_model: cannot read {meta_path} ({exc.strerror or exc})") from None
    if not isinstance(metadata, dict):
        raise ModelLoadError(f"load_model: {meta_path} holds a JSON {_json_type(metadata)}, not the object save_model "
                             "writes; the file was replaced or edited")
    # the parts load_model reads as objects (restore_from_metadata): a clear error, not an AttributeError
    for key in ("config", "normalization"):
        if metadata.get(key) is not None and not isinstance(metadata[key], dict):
            raise ModelLoadError(f"load_model: {meta_path}: {key!r} is a JSON {_json_type(metadata[key])}, not the "
                                 "object save_model writes; the file was replaced or edited")
    if metadata.get("base_model") is not None and not isinstance(metadata["base_model"], str):
        raise ModelLoadError(f"load_model: {meta_path}: 'base_model' is a JSON {_json_type(metadata['base_model'])}, "
                             "not the path or hub id save_model writes; the file was replaced or edited")
    if metadata.get("normalization") and "preset" not in metadata["normalization"]:
        raise ModelLoadError(f"load_model: {meta_path}: 'normalization' has no 'preset', which save_model always "
                             "writes; the file was replaced or edited")
    return metadata


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type: object, array, string, number, true/false or null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    return {dict: "object", list: "array", str: "string"}.get(type(value), "number")


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
        recover_interrupted_save(output_dir, method)  # a save killed while moving: finish it first
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


JOURNAL = ".moving.json"  # inside the staging folder: the names to move, written once every staged file is complete


def _move_into_place(staging: str, output_dir: str, marker: str) -> None:
    """Renames, marker last: the old marker goes first, so a half-moved folder is never taken for a whole run.

    Before the first rename, the list of staged names is written to a journal in the staging folder; a save killed
    between the renames is finished from it (:func:`recover_interrupted_save`), so the folder always ends up with
    the new run whole (or, killed before the journal, the previous one untouched)."""
    journal = os.path.join(staging, JOURNAL)
    if os.path.isfile(journal):
        with open(journal, encoding="utf-8") as fh:
            staged = json.load(fh)
    else:
        staged = sorted(n for n in os.listdir(staging) if n != JOURNAL)
        _write_json(journal, staged)
    old_marker = os.path.join(output_dir, marker)
    if os.path.exists(old_marker) and os.path.exists(os.path.join(staging, marker)):
        os.remove(old_marker)
    for name in os.listdir(output_dir):
        # An earlier save's files that this save does not write (a LoRA adapter next to a new full model,
        # weight shards, an old plot) would be taken for part of this run: they go.
        if name not in staged and _is_saved_run_file(name):
            os.remove(os.path.join(output_dir, name))
    for name in staged:
        source = os.path.join(staging, name)
        if name == marker or not os.path.exists(source):  # the marker goes last; a missing one was moved already
            continue
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(source, target)
    if os.path.exists(os.path.join(staging, marker)):
        os.replace(os.path.join(staging, marker), old_marker)
    shutil.rmtree(staging, ignore_errors=True)


def recover_interrupted_save(output_dir: str, method: str) -> bool:
    """Finish a final save that was killed between its renames (its journal is there); drop one killed before (its
    staged files are incomplete, the previous model is untouched). Returns whether a save was finished."""
    staging = os.path.join(output_dir, STAGING_DIR)
    if not os.path.isdir(staging) or not is_main_process():
        return False
    if not os.path.isfile(os.path.join(staging, JOURNAL)):
        return False  # an unfinished save that moved nothing: the next save (or overwrite) removes it
    logger.warning("%s: finishing a save that was interrupted while moving its files into place", output_dir)
    _move_into_place(staging, output_dir, metadata_filename(method))
    return True


SAVED_RUN_FILE_RE = re.compile(
    r"^(config\.json|generation_config\.json|adapter_config\.json|README\.md|training_curves\.png|training_args\.bin"
    r"|(model|adapter_model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)|(model|pytorch_model)\.(safetensors|bin)\.index\.json)$")


def _is_saved_run_file(name: str) -> bool:
    """A file name that a model save writes (weights, shards, configs, the card and plot)."""
    return bool(SAVED_RUN_FILE_RE.match(name))


def _write_own_files(owner: Any, output_dir: str, method: str) -> None:
    """The files that are ours, main process only: base model copy, generation config, metadata, report."""
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
    record = run_record(final_dir)
    if record is not None and record.get("resumes"):
        metadata["resumes"] = record["resumes"]
    write_metadata(output_dir, metadata, method)
    if owner.trainer is not None and (owner.train_result is not None or owner.trainer.state.log_history):
        # (a run finished from its last checkpoint has the checkpoint's log history: its report too)
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
def _process_start(pid: int) -> Optional[float]:
    """When process ``pid`` started, in seconds since the epoch (Linux ``/proc``), or None where that cannot be
    read. A pid alone does not identify a process: after a container restart, pid 1 (or any pid of the old run)
    belongs to another process, started after the old run wrote its lock."""
    fields = proc_stat_fields(pid)
    if fields is None or len(fields) <= 19:
        return None
    try:
        ticks = int(fields[19])
        with open("/proc/stat", encoding="utf-8") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _lock_holder_alive(lock: dict) -> bool:
    """Whether the run that wrote ``lock`` still runs: its pid is alive and is the same process, i.e. it started when
    the lock says (``process_start``), or, for a lock without it, before the lock was written (``started_at``)."""
    try:
        pid = int(lock.get("pid", 0))
    except (TypeError, ValueError):
        return False
    if pid <= 0 or not pid_alive(pid):
        return False
    actual = _process_start(pid)
    if actual is None:
        return True  # cannot tell: assume the run is alive (the message says how to clear the lock)
    if isinstance(lock.get("process_start"), (int, float)):
        return abs(actual - lock["process_start"]) < 2.0
    try:
        written = datetime.strptime(str(lock.get("started_at")), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return True
    return actual <= written.timestamp() + 2.0  # a process started after the lock was written did not write it


def read_lock(output_dir: str) -> Optional[dict]:
    return read_json_object(os.path.join(output_dir, LOCK_FILE))


def no_space_left(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk or quota: OSError ENOSPC/EDQUOT, or the wrapped forms
    safetensors and torch raise (``StorageFull``, "No space left on device")."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def check_writable(output_dir: str) -> None:
    """Refuse an ``output_dir`` that cannot be written (read-only, full), before anything is loaded: a probe file is
    written (4 KiB, synced) and removed in the folder, or in its nearest existing parent."""
    folder = os.path.abspath(output_dir)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".sft-write-probe-")
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as exc:
        why = "no space left on device" if no_space_left(exc) else (exc.strerror or str(exc))
        raise ValueError(f"output_dir {output_dir!r} cannot be written ({why}, in {folder}); free space there or "
                         "choose another output_dir") from None


def foreign_files(output_dir: str, method: str) -> list[str]:
    """Entries of ``output_dir`` this project did not write (empty when the folder is a run of ours)."""
    if not os.path.isdir(output_dir):
        return []
    entries = os.listdir(output_dir)
    if RUN_MARKER in entries or metadata_filename(method) in entries:
        return []
    return sorted(e for e in entries if e not in OWN_BEFORE_MARKER and not CHECKPOINT_RE.match(e)
                  and not OWN_TEMPORARY_RE.match(e))


def claim_output_dir(output_dir: str, method: str, overwrite: bool, resuming: bool, write: bool = True,
                     config: Optional[dict] = None, resume: Optional[dict] = None) -> None:
    """Check ``output_dir``, then clear old checkpoints when overwriting, write the run marker and take the
    lock. The main process decides and every rank raises the same error (``main_decides``). Raises before
    anything is loaded (see the module docstring). ``write=False`` only checks (nothing is written: for
    refusing early, before the data is even read). ``config`` (the run's settings) goes into the marker, and a
    resume (``resume``: from which checkpoint, what changed) is appended to its record."""
    lock_holder: dict = {}

    def check() -> None:
        if os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise ValueError(f"output_dir {output_dir!r} is a file; expected a directory")
        lock = read_lock(output_dir)
        if lock and lock.get("pid") != os.getpid() and lock.get("host") == socket.gethostname() \
                and _lock_holder_alive(lock):
            lock_path = os.path.join(output_dir, LOCK_FILE)
            raise FileExistsError(f"{output_dir} is in use by another run (pid {lock.get('pid')}, started "
                                  f"{lock.get('started_at')}, lock file {lock_path}); wait for it or choose another "
                                  f"output_dir. If no run uses it any more, delete {lock_path}")
        lock_holder.update(lock or {})
        foreign = foreign_files(output_dir, method)
        if foreign and not overwrite:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise FileExistsError(f"{output_dir} holds files this project did not write ({shown}); choose a new or "
                                  "empty output_dir, or set overwrite_output_dir=True to write over them")
        check_output_dir(output_dir, method, overwrite)
        check_writable(output_dir)

    def claim() -> None:
        if lock_holder and lock_holder.get("pid") != os.getpid():
            logger.warning("%s: taking over a stale lock of pid %s (that process is gone)", output_dir,
                           lock_holder.get("pid"))
        try:
            os.makedirs(output_dir, exist_ok=True)
            recover_interrupted_save(output_dir, method)
            if overwrite and not resuming:
                old = [e for e in os.listdir(output_dir) if CHECKPOINT_RE.match(e)]
                for name in old:
                    shutil.rmtree(os.path.join(output_dir, name))
                if old:
                    logger.info("overwrite_output_dir: removed %d old checkpoint folder(s) from %s", len(old), output_dir)
            marker = os.path.join(output_dir, RUN_MARKER)
            record = run_record(output_dir) if resuming else None
            if record is None or not resuming:
                # a new run (or the first record of a resumed one): its own id and settings
                record = {"written_by": "arabic-qwen-sft", "method": method, "created_at": utc_now(),
                          "run_id": uuid.uuid4().hex, "resumes": []}
            if config is not None:
                if resuming:
                    record.setdefault("resumes", []).append({"at": utc_now(), **(resume or {})})
                record["config"] = _settings(config)
            _write_json(marker, record)
            _write_json(os.path.join(output_dir, LOCK_FILE),
                        {"pid": os.getpid(), "host": socket.gethostname(), "started_at": utc_now(),
                         "process_start": _process_start(os.getpid()), "run_id": record.get("run_id")})
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
        json.dump(json_safe(value), fh, ensure_ascii=False, indent=2, allow_nan=False)
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
