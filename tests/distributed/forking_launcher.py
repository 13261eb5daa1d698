"""Start the processes of a test run by fork from one pre-imported Python process (what ``torchrun`` or ``python
script.py`` does with a fresh interpreter each, minus the ~10 CPU seconds of imports every fresh one pays: torch,
transformers, peft, accelerate, DeepSpeed).

The tests in this folder compare 1 process with 2 ranks some 35 times; the imports were most of their CPU time.
A launcher process started once per test process imports the project and its libraries, then serves requests on
stdin, one JSON line each: ``{"argv": [script, args...], "env": {...}, "cwd": ..., "nproc": N, "logs": folder}``.
It forks N children, answers their pids, waits for them and answers their exit codes. Each child sets the
environment a launcher gives a rank (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``,
torchelastic's names; nothing for N=1: a plain process), sends its stdout and stderr to files in ``logs`` and runs
the script as ``__main__``, then Python's exit work and the exit code, as a fresh process would.

What a fork does not give a rank (so tests of these stay on a real launcher): environment variables read while the
libraries are imported (the launcher starts with the test session's), the import-time messages of the libraries,
and torchrun's own behaviour (signals to the launcher, its error report).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
            "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
            "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "GROUP_WORLD_SIZE")


def _preload() -> None:
    sys.path.insert(0, ROOT)
    for module in ("src.cli.main", "src.training.sft_trainer", "safetensors.torch", "deepspeed"):
        try:
            importlib.import_module(module)
        except ImportError:  # DeepSpeed is optional: a rank that needs it imports it (and fails) itself
            pass


def _run_child(request: dict, rank: int, reply_fd: int) -> None:
    """In the forked child: become rank ``rank`` and run the script; never returns."""
    code = 1
    try:
        os.close(reply_fd)
        nproc = request["nproc"]
        env = {k: v for k, v in request["env"].items() if k not in RANK_ENV}
        if nproc > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                       GROUP_RANK="0", GROUP_WORLD_SIZE="1", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(nproc),
                       ROLE_NAME="default", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(request["port"]),
                       TORCHELASTIC_RUN_ID="forking-launcher", TORCHELASTIC_RESTART_COUNT="0",
                       TORCHELASTIC_MAX_RESTARTS="0", TORCHELASTIC_USE_AGENT_STORE="False")
        os.environ.clear()
        os.environ.update(env)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            target = os.open(os.path.join(request["logs"], f"{name}.{rank}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(target, fd)
            os.close(target)
        os.chdir(request["cwd"])
        script = request["argv"][0]
        sys.argv = list(request["argv"])
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script.py` puts it first
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve() -> None:
    reply_fd = os.dup(1)  # answers go there; anything the libraries print goes to stderr
    os.dup2(2, 1)
    reply = os.fdopen(reply_fd, "w")
    _preload()
    for line in sys.stdin:
        request = json.loads(line)
        reply.flush()
        sys.stderr.flush()
        pids = []
        for rank in range(request["nproc"]):
            pid = os.fork()
            if pid == 0:
                _run_child(request, rank, reply_fd)
            pids.append(pid)
        reply.write(json.dumps({"pids": pids}) + "\n")
        reply.flush()
        codes = []
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            codes.append(os.waitstatus_to_exitcode(status))
        reply.write(json.dumps({"returncodes": codes}) + "\n")
        reply.flush()


if __name__ == "__main__":
    serve()
