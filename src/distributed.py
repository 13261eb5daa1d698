"""Which process writes, and waiting for it: the one place that knows about ranks.

Used by every layer that writes files (the tiny model build in ``src.models``, the persistence module in
``src.training``, the CLI's printing), so it depends on nothing of the project. Before the Trainer
exists, ranks are read from the launcher's environment (``RANK``/``WORLD_SIZE`` of torchrun, accelerate,
DeepSpeed); waiting uses the process group that accelerate initialises, created on first need.

It also holds what every process decides about its output and its CPU share, since both depend on the rank:

- the library's own logging (``src.*`` loggers): INFO lines on the main process through a handler of the ``src``
  logger, used only while no handler of the application would take the record (as transformers does for its own
  logger; the root logger is never configured here), ERROR and above on the other ranks;
- known noise of libraries that we cause (``quiet_library_noise``);
- the number of CPU threads a training process uses (``configure_cpu_threads``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from typing import Callable, Iterator, Optional

_STARTED = time.monotonic()  # about when this process started (cpu_thread_plan)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on the one process that writes and prints (global rank 0; always True without a launcher)."""
    return rank() == 0


def _state():
    import torch
    from accelerate import PartialState

    # cpu=True on machines without CUDA: accelerate's default there is "not distributed" (no process group,
    # so waiting would return at once); transformers later joins the same gloo group (use_cpu).
    return PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if world_size() > 1:
        _state().wait_for_everyone()


SHARED_ERRORS = (FileExistsError, FileNotFoundError, PermissionError, ValueError, OSError)


def main_decides(step: Callable[[], None]) -> None:
    """Run ``step`` on the main process only; if it raises, every rank raises the same error.

    Checks and writes that only the main process does must not leave the other ranks waiting at a later
    barrier, nor let ranks disagree (each rank judging a lock file by its own process id).
    """
    error = None
    if is_main_process():
        try:
            step()
        except SHARED_ERRORS as exc:
            error = exc
    shared = from_main(None if error is None else (type(error).__name__, str(error)))
    if error is None and shared is not None:
        raise {e.__name__: e for e in SHARED_ERRORS}.get(shared[0], RuntimeError)(shared[1])
    if error is not None:
        raise error


def from_main(value):
    """The main process's ``value`` on every rank (a pickled broadcast; ``value`` itself in one process).

    For choices each rank could make differently (a timing), which all ranks must share."""
    if world_size() <= 1:
        return value
    from accelerate.utils import broadcast_object_list

    _state()  # the process group, created on first need
    return broadcast_object_list([value], from_process=0)[0]


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the block on the main process first, then on the others (which then find what it wrote).

    Not accelerate's ``PartialState().main_process_first()``: that one builds the accelerate state in every process,
    a single one included (its device choice then binds transformers' later ``TrainingArguments``), and when the block
    raises on the main process it never reaches its second barrier, leaving the other ranks waiting for good; here
    the main process reaches the barrier either way, and the others then meet the same error themselves."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()


def shutdown() -> None:
    """Leave the process group at the end of a successful run (the collective teardown every rank agrees on)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_rank(code: int) -> None:
    """End a process of a multi-process run with ``code``, after Python's own exit work (atexit handlers:
    trackers' final flushes, logging) but without the C++ runtime's static teardown.

    With DeepSpeed installed (accelerate imports it in every run), that teardown aborted about one CPU rank in
    twelve *after* a successful run ("terminate called without an active exception", exit code -6), so torchrun
    reported a failed run that had finished and saved everything (measured: 1 of 12 two-rank runs with
    DeepSpeed importable, 0 of 20 without). Single-process runs exit normally.
    """
    if world_size() <= 1:
        return
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # pragma: no cover - a closed or broken stream
            pass
    os._exit(code)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (one we may not signal counts as alive). A zombie (a
    process that has ended but that its parent has not waited for yet, as a killed run whose launcher was killed too
    stays until init reaps it) is not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = proc_stat_fields(pid)
    return fields is None or fields[0] != "Z"  # None: no /proc (not Linux), or it ended meanwhile


def proc_stat_fields(pid: int) -> Optional[list[str]]:
    """The fields of ``/proc/<pid>/stat`` after the command name (0: the state, R/S/Z...; 19: the start time in clock
    ticks after boot), or None where that cannot be read (not Linux, no such process)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            return fh.read().rpartition(")")[2].split()
    except OSError:
        return None


# -- logging -----------------------------------------------------------------------------------------------------------
LIBRARY_LOGGER = "src"
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class LibraryHandler(logging.StreamHandler):
    """The ``src`` logger's default output (stderr): writes a record only when no other handler on its way up (the
    application's, pytest's, the command line's root handler) takes it, so an application that configures logging
    gets each line once, in its own format, and one that configures nothing still sees what the library reports."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        logger: Optional[logging.Logger] = logging.getLogger(record.name)
        while logger is not None:
            if any(handler is not self for handler in logger.handlers):
                return
            if not logger.propagate:
                break
            logger = logger.parent  # type: ignore[assignment]
        self.stream = sys.stderr  # the current stderr (a test, or the application, may have replaced it)
        super().emit(record)


def configure_library_logging(level: Optional[int] = None) -> None:
    """Give the ``src`` logger its default handler (``LibraryHandler``, once) and a level: ``level``, else INFO on the
    main process and ERROR on the other ranks (each rank would repeat the main process's warnings) unless the
    application has set one. Called on import of this module; the command line calls it with its level."""
    logger = logging.getLogger(LIBRARY_LOGGER)
    if not any(isinstance(handler, LibraryHandler) for handler in logger.handlers):
        logger.addHandler(LibraryHandler())
    if level is not None:
        logger.setLevel(level)
    elif logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO if is_main_process() else logging.ERROR)


class _LibraryNoiseFilter(logging.Filter):
    """Drops known noise of a library's logger: the given messages everywhere, and (``quiet_below``) records under a
    level on the ranks other than the main one."""

    def __init__(self, messages: tuple[str, ...] = (), quiet_below: int = logging.NOTSET) -> None:
        super().__init__()
        self.messages, self.quiet_below = messages, quiet_below

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.quiet_below and not is_main_process():
            return False
        message = record.getMessage()
        return not any(message.startswith(m) for m in self.messages)


# DeepSpeed's logger has its own handler: what it says before training on a machine without a GPU.
DEEPSPEED_NOISE = ("Setting accelerator to CPU",)
# peft's PeftModel asks every model we wrap for ``is_gradient_checkpointing``, which transformers 5 deprecates.
DEPRECATIONS_OF_OTHERS = (r"`is_gradient_checkpointing` is deprecated",)


def quiet_library_noise(other_ranks: bool = False) -> None:
    """Silence what other libraries print because of how we use them (idempotent):

    - DeepSpeed's "Setting accelerator to CPU" warning, printed once per process by every run on a machine
      without a GPU once DeepSpeed is installed (accelerate and transformers import it): training on CPU is what the
      run asked for, and the CPU-thread log line says so;
    - transformers' FutureWarning for ``is_gradient_checkpointing``, raised by peft's own call when we wrap a model
      in LoRA adapters (not our call: nothing in ``src`` reads it);

    - DeepSpeed's warnings on the ranks other than the main one (each would repeat the main process's);

    and with ``other_ranks`` (the command line), on every process but the main one, every library's warnings and
    progress bars: Python warnings, transformers' and datasets' loggers, and torch's C++ warnings where torch is not
    imported yet.
    """
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _LibraryNoiseFilter) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_LibraryNoiseFilter(DEEPSPEED_NOISE, quiet_below=logging.ERROR))
    for message in DEPRECATIONS_OF_OTHERS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    if not other_ranks or is_main_process():
        return
    warnings.simplefilter("ignore")
    if "torch" not in sys.modules:
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # already imported (an application that launched us in-process, or an import chain that reached them): the
    # environment above comes too late for them. huggingface_hub first: transformers, imported later, takes its
    # progress-bar switch from it.
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()


# -- CPU threads --------------------------------------------------------------------------------------------------------
def _affinity_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's share)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def available_cores() -> int:
    """CPU cores this process may run on: the CPUs of its affinity mask counted as physical cores (hyper-threads of one
    core share its arithmetic units), capped by a cgroup CPU quota."""
    cores = set()
    for cpu in _affinity_cpus():
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as fh:
                cores.add(fh.read().strip())
        except OSError:
            cores.add(str(cpu))
    count = len(cores) or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            count = min(count, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return count


def busy_cores(seconds: float = 0.5) -> Optional[float]:
    """How many of this process's CPUs other work keeps busy now: their busy share over ``seconds`` (``/proc/stat``;
    this process sleeps meanwhile, so it counts nothing of its own), in cores. None where it cannot be measured."""
    cpus = _affinity_cpus()

    def sample() -> dict[int, tuple[int, int]]:
        times = {}
        with open("/proc/stat") as fh:
            for line in fh:
                if line.startswith("cpu") and line[3:4].isdigit():
                    name, *values = line.split()
                    ticks = [int(v) for v in values[:8]]
                    times[int(name[3:])] = (sum(ticks), ticks[3] + ticks[4])  # total, idle + iowait
        return times

    try:
        before = sample()
        time.sleep(seconds)
        after = sample()
    except (OSError, ValueError, IndexError):
        return None
    busy = 0.0
    for cpu in cpus:
        if cpu in before and cpu in after and after[cpu][0] > before[cpu][0]:
            total, idle = after[cpu][0] - before[cpu][0], after[cpu][1] - before[cpu][1]
            busy += (total - idle) / total
    return busy * available_cores() / max(1, len(cpus))  # in physical cores


def _set_by_launcher(name: str) -> bool:
    """Whether environment variable ``name`` was set by torchrun for its workers rather than by the user: torchrun sets
    OMP_NUM_THREADS=1 for every worker when the user did not set it. True when the launcher's own starting environment
    (``/proc/<parent>/environ``) lacks it; False when it has it or cannot be read (then it counts as the user's)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_WORLD_SIZE" not in os.environ:
        return False
    try:
        with open(f"/proc/{os.getppid()}/environ", "rb") as fh:
            parent = fh.read().split(b"\0")
    except OSError:
        return False
    return not any(entry.startswith(name.encode() + b"=") for entry in parent)


def cpu_thread_plan() -> tuple[int, str]:
    """How many intra-op threads a CPU training process uses, and why (for the log line).

    An OMP_NUM_THREADS the user set is kept. Otherwise the cores this process may use (``available_cores``) are
    shared among the processes of this machine (``LOCAL_WORLD_SIZE`` under torchrun), and cores busy with other work
    (``busy_cores``, less the other processes of this run) are left to it: two threads on two cores, one of them
    taken by another program, wait for each other at every operation (measured on a loaded 2-core machine: the demo's
    training 13x slower than with one thread), while one thread too few costs at most its share (1.7x on the same
    machine idle). Where the busy share cannot be measured, the 1-minute load average stands for it, less this run's
    own part (each process has been running since it started: 1 - exp(-seconds / 60) of a task).
    """
    import math

    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    given = os.environ.get("OMP_NUM_THREADS")
    if given and not _set_by_launcher("OMP_NUM_THREADS"):
        try:
            return max(1, int(given)), f"OMP_NUM_THREADS={given}"
        except ValueError:
            pass
    cores = available_cores()
    threads = max(1, cores // local)
    why = f"{cores} core{'s' if cores > 1 else ''}" + (f" for {local} processes" if local > 1 else "")
    busy = busy_cores()
    if busy is not None:
        other = max(0.0, busy - (local - 1))  # the other ranks of this run may be busy at this moment
        seen = f"{busy:.1f} busy now"
    else:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # not available on this system
            load = 0.0
        other = max(0.0, load - local * (1 - math.exp(-(time.monotonic() - _STARTED) / 60)))
        seen = f"load average {load:.1f}"
    free = int(cores - other + 0.5)
    if free < cores:
        threads = max(1, min(threads, free // local))
        why += f", {seen}: cores busy with other work left to it"
    return threads, why + "; OMP_NUM_THREADS overrides"


_cpu_threads: Optional[int] = None


def configure_cpu_threads() -> Optional[int]:
    """Set torch's intra-op thread count for training on CPU (``cpu_thread_plan``) and say so in one log line (main
    process); None, changing nothing, where training runs on a GPU. Decided once per process: later calls return the
    same count."""
    global _cpu_threads
    import torch

    if torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return None
    if _cpu_threads is None:
        threads, why = cpu_thread_plan()
        torch.set_num_threads(threads)
        _cpu_threads = threads
        logging.getLogger(__name__).info("Training on CPU with %d thread%s per process (%s)", threads,
                                         "s" if threads > 1 else "", why)
    return _cpu_threads


configure_library_logging()
quiet_library_noise()
