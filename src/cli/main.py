"""The command table and the shared command-line behaviour (logging, errors, ranks).

    python train_sft.py [train] --config run.yaml [--field value ...]   # train (the default command)
    python train_sft.py audit --config run.yaml [--audit_output a.json]
    python train_sft.py export --model RUN_DIR --to DIR
    python train_sft.py generate --model RUN_DIR --input rows.jsonl --output out.jsonl
    python train_sft.py chat --model RUN_DIR
    python train_sft.py launch --nproc_per_node N -- [training options]

A new command is a module in ``src/cli`` with ``run(argv) -> int`` and one line in ``COMMANDS``.
User errors (bad config, bad data, missing model, refused overwrite) exit with status 2 and one line on
stderr; ``--debug`` shows the traceback. A run stopped by Ctrl-C or SIGTERM prints one line with the
resume command and exits 130 or 143; diverging training prints one line and exits 1. Under torchrun only
the main process logs at INFO level and prints; the others print errors only. ``--help`` lists the commands, then
the training fields in their groups.
"""

from __future__ import annotations

import importlib
import logging
import os
import shlex
import sys
import time

from src.cli.args import format_help
from src.config import SFTConfig
from src.data.records import DatasetError
from src.data.tokenization import TokenizerMismatchError
from src.distributed import (
    LOG_FORMAT,
    configure_library_logging,
    exit_rank,
    is_main_process,
    quiet_library_noise,
    shutdown,
    world_size,
)
from src.models.loading import ModelLoadError

# name -> (module under src.cli, one-line description)
COMMANDS = {
    "train": ("src.cli.train", "train, evaluate and sample an SFT run (default)"),
    "audit": ("src.cli.audit", "report what training would see in the data, without training"),
    "export": ("src.cli.export", "merge a LoRA run into its base (or re-save a full run) as a plain transformers folder"),
    "generate": ("src.cli.generate", "generate a response for every row of a JSONL file (batched, resumable)"),
    "chat": ("src.cli.chat", "chat with a trained run (streamed answers, multi-turn, /reset /system /exit)"),
    "evaluate": ("src.cli.evaluate", "score a trained run on benchmark tasks with lm-evaluation-harness"),
    "launch": ("src.cli.launch", "torchrun over several processes, ending like a single run (exit 143 on SIGTERM)"),
}
DEFAULT_COMMAND = "train"


def _user_error_types() -> tuple[type, ...]:
    # TypeError is left out on purpose: from the command line it can only be a bug, which deserves a traceback.
    return (ValueError, FileNotFoundError, FileExistsError, DatasetError, ModelLoadError, TokenizerMismatchError)


def configure_logging() -> None:
    """INFO lines on the main process; on the other ranks errors only, ours and every library's (each rank would
    repeat the main process's warnings and progress bars; ``src.distributed.quiet_library_noise``)."""
    level = logging.INFO if is_main_process() else logging.ERROR
    logging.basicConfig(level=level, format=LOG_FORMAT)
    configure_library_logging(level)
    quiet_library_noise(other_ranks=True)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: the same arguments, ``--resume_from_checkpoint last`` instead of
    any earlier resume flag, under the same kind of launcher."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0].replace("-", "_")
        if name == "__resume_from_checkpoint":
            skip = "=" not in token
            continue
        kept.append(token)
    launcher = ["python"] if world_size() <= 1 else ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world_size())}"]
    return shlex.join([*launcher, "train_sft.py", *kept, "--resume_from_checkpoint", "last"])


def entry() -> int:
    """The process entry of ``train_sft.py``, ``python -m src.cli`` and the installed ``arabic-qwen-sft`` command
    (``[project.scripts]``, whose wrapper exits with the returned status): :func:`main` on ``sys.argv``; under torchrun
    the rank then exits with that status at once (``src.distributed.exit_rank``)."""
    code = main()
    exit_rank(code)  # under torchrun: exit without the C++ teardown that can abort a finished rank
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    original = list(argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    name = argv[0] if argv and argv[0] in COMMANDS else DEFAULT_COMMAND
    if argv and argv[0] == name:
        argv = argv[1:]
    if name == DEFAULT_COMMAND and any(a in ("-h", "--help") for a in argv):
        print(format_help(SFTConfig, COMMANDS))  # the commands first, then the fields in their groups
        return 0
    configure_logging()
    command = importlib.import_module(COMMANDS[name][0])
    # here, not at the top: --help (above) stays free of torch and transformers' Trainer (seconds of import)
    from src.training.guards import TrainingDiverged, TrainingInterrupted
    try:
        code = command.run(argv)
        shutdown()
        return code
    except SystemExit:
        raise
    except TrainingInterrupted as exc:
        if is_main_process():
            print(f"interrupted: {exc}; resume with: {resume_command(original)}" if exc.checkpoint
                  else f"interrupted: {exc}", file=sys.stderr)
        return exc.exit_code
    except TrainingDiverged as exc:
        if debug:
            raise
        if is_main_process():
            print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # a second Ctrl-C during training, or one while loading, tokenizing, generating or chatting
        if debug:
            raise
        if is_main_process():
            print("interrupted: stopped at once (Ctrl-C); what was saved before stays (resume a training run with "
                  "--resume_from_checkpoint last)", file=sys.stderr)
        return 130
    except _user_error_types() as exc:
        if debug:
            raise
        if is_main_process():  # every rank raises the same error (src.distributed.main_decides): print it once
            print(f"error: {exc}", file=sys.stderr)
        else:
            time.sleep(5)  # torchrun stops every rank at the first exit: let the main process print the one line first
        return 2
