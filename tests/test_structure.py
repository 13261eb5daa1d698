"""The code base's own rules: imports run one way, and the linter is clean."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def lint_imports(root):
    """import-linter's verdict on the contracts of pyproject.toml ([tool.importlinter]) for the package under ``root``:
    (exit code, report)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename=sys.argv[2], no_cache=True))")
    result = subprocess.run([sys.executable, "-c", code, str(root), os.path.join(ROOT, "pyproject.toml")], cwd=root,
                            capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.skipif(importlib.util.find_spec("importlinter") is None,
                    reason="import-linter is not installed (pip install -e '.[test]')")
def test_layers_and_no_import_cycles_by_the_contracts(tmp_path):
    """cli > training > config > models > data > distributed, and no cycle between a package's modules (imports inside
    functions count too). The negative control: the same contracts on a copy with one upward import and one cycle."""
    code, report = lint_imports(ROOT)
    assert code == 0 and "2 kept, 0 broken" in report, report
    copy = tmp_path / "copy"
    shutil.copytree(os.path.join(ROOT, "src"), copy / "src", ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "src" / "data" / "formatting.py", "a", encoding="utf-8") as fh:
        fh.write("\n\ndef _upward():\n    from src.training import losses  # noqa\n")
    with open(copy / "src" / "data" / "records.py", "a", encoding="utf-8") as fh:
        fh.write("\n\ndef _circle():\n    from src.data import formatting  # noqa\n")
    code, report = lint_imports(copy)
    assert code != 0 and "0 kept, 2 broken" in report, report
    assert "src.data.formatting -> src.training.losses" in report


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "src", "tests", "bench",
                             "train_sft.py"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
