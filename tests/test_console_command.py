"""The installed command ``arabic-qwen-sft`` (``[project.scripts]`` in pyproject.toml) is train_sft.py's command line.

The entry point is resolved as pip's console-script wrapper resolves it: from the distribution's metadata when this
checkout is the installed one (``pip install -e .``, as scripts/setup.sh does), else from pyproject.toml (a checkout
installed elsewhere, or not at all), and run in a new process the way the wrapper runs it
(``sys.exit(entry_point.load()())``), so the exit status is the command's own.
"""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tomllib
from urllib.parse import unquote, urlparse

import pytest

from src.cli.main import COMMANDS
from tests.helpers import PAIRS, ROOT, write_jsonl

NAME = "arabic-qwen-sft"

pytestmark = pytest.mark.slow  # new processes


def declared_entry_point() -> importlib.metadata.EntryPoint:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    return importlib.metadata.EntryPoint(name=NAME, value=project["scripts"][NAME], group="console_scripts")


def installed_here() -> importlib.metadata.Distribution | None:
    """The installed distribution when it is this checkout (an editable install of ROOT), else None."""
    try:
        dist = importlib.metadata.distribution(NAME)
    except importlib.metadata.PackageNotFoundError:
        return None
    url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    path = unquote(urlparse(url).path) if url.startswith("file://") else None
    return dist if path and os.path.realpath(path) == os.path.realpath(ROOT) else None


def entry_point() -> importlib.metadata.EntryPoint:
    dist = installed_here()
    if dist is not None and any(e.name == NAME for e in dist.entry_points.select(group="console_scripts")):
        return dist.entry_points.select(group="console_scripts")[NAME]
    return declared_entry_point()


def run_command(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    ep = entry_point()
    wrapper = ("import sys; from importlib.metadata import EntryPoint; "
               f"sys.exit(EntryPoint(name={ep.name!r}, value={ep.value!r}, group={ep.group!r}).load()())")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}  # this checkout's src
    return subprocess.run([sys.executable, "-c", wrapper, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_installed_metadata_names_the_declared_entry_point():
    """An install of this checkout carries the command pyproject.toml declares (setup.sh reinstalls when pyproject.toml
    changes); a checkout installed elsewhere, or not installed, is checked through pyproject.toml alone."""
    declared = declared_entry_point()
    assert declared.value == "src.cli.main:entry" and callable(declared.load())
    dist = installed_here()
    if dist is not None:
        installed = {e.name: e.value for e in dist.entry_points.select(group="console_scripts")}
        assert installed.get(NAME) == declared.value, "reinstall: pip install -e . (scripts/setup.sh)"
        script = shutil.which(NAME, path=os.path.dirname(sys.executable))
        assert script is not None, f"{NAME} is not in {os.path.dirname(sys.executable)}"
        result = subprocess.run([script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and all(name in result.stdout for name in COMMANDS)


def test_help_lists_every_subcommand_of_train_sft():
    result = run_command("--help")
    assert result.returncode == 0, result.stderr
    listed = result.stdout.split("commands (the first argument; without one, train):", 1)[1]
    for name in COMMANDS:
        assert f"\n  {name} " in listed, name
    assert "--max_seq_length" in result.stdout  # the training fields follow, as with python train_sft.py --help


def test_a_subcommand_runs_and_a_user_error_exits_2(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    report = tmp_path / "audit.json"
    result = run_command("audit", "--model_name", tiny_model_dir, "--dataset_path", data, "--output_dir",
                         str(tmp_path / "run"), "--audit_output", str(report), cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "Arabic-script share of letters" in result.stdout
    audit = json.loads(report.read_text(encoding="utf-8"))
    assert audit["rows"]["train"] + audit["rows"]["validation"] == len(PAIRS)
    # the wrapper exits with the command's status: 2 and one line for a user error
    missing = run_command("export", "--model", str(tmp_path / "no_such_run"), "--to", str(tmp_path / "out"),
                          cwd=str(tmp_path))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("error: ") and "no_such_run" in missing.stderr
