"""``train_sft.py launch [torchrun options] -- [training options]``: torchrun, ending as a training run ends.

torchrun itself turns a SIGTERM (what schedulers send) into its own traceback and exit status 1, after its workers
have already stopped cleanly and saved a checkpoint. This command runs torchrun's own launcher
(``torch.distributed.run``) in-process with ``train_sft.py`` as the training script, and ends the way a
single-process run ends: exit 130 (SIGINT) or 143 (SIGTERM) when the launcher was signalled, the
workers' own exit status when one failed (2 for a user error, printed once by the main rank), 0 otherwise. On a signal
the one line is the main rank's (the step, the checkpoint and the resume command); the launcher adds nothing::

    python train_sft.py launch --nproc_per_node 4 -- --config configs/my_run.yaml
"""

from __future__ import annotations

import logging
import os

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args
from torch.distributed.run import run as torchrun

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "train_sft.py")


class _UserErrorExit(logging.Filter):
    """Drops torchrun's report of a worker that exited 2 (a user error, already printed in one line) and of the
    SIGTERM it then sends the other workers; any other failure (a crash, a signal such as the OOM killer's) is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("failed (exitcode: 2)" in message or "closing signal SIGTERM" in message)


def run(argv: list[str]) -> int:
    if "--" not in argv:
        raise ValueError("launch: put '--' between torchrun's options and the training options, e.g. "
                         "train_sft.py launch --nproc_per_node 4 -- --config run.yaml")
    split = argv.index("--")
    launcher, training = argv[:split], argv[split + 1:]
    # train_sft.py beside the package (a checkout, an editable install); else the package's own entry (``python -m
    # src.cli``, what the installed ``arabic-qwen-sft`` command runs)
    worker = [SCRIPT] if os.path.isfile(SCRIPT) else ["--module", "src.cli"]
    args = parse_args([*launcher, *worker, *training])
    # torchrun sets OMP_NUM_THREADS=1 for its workers, with a banner, when it is not set; set here, the banner goes,
    # and each worker still replaces it with its share of the cores (src.distributed.cpu_thread_plan tells it from
    # the user's own, which the launcher's starting environment would hold).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # A worker that exits 2 has printed its one-line user error (main rank); torchrun's own line about it is noise.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_UserErrorExit())
    try:
        torchrun(args)
    except SignalException as exc:
        # torchrun has passed the signal on; the main rank has printed the one line (step, checkpoint, resume command)
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        failure = next(iter(exc.failures.values()), None) if exc.failures else None
        code = getattr(failure, "exitcode", 1) or 1
        return code if code > 0 else 128 - code  # a worker killed by a signal: -N -> 128 + N
    return 0
