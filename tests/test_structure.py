"""The code base's own rules: imports run one way, and the linter is clean."""

import ast
import importlib.util
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

LOWER_LAYERS = ("src/data", "src/models")
UPPER_PACKAGES = ("src.training", "src.cli")


def _imported_modules(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_lower_layers_never_import_training_or_the_cli():
    offenders = []
    for layer in LOWER_LAYERS:
        for name in sorted(os.listdir(os.path.join(ROOT, layer))):
            if name.endswith(".py"):
                path = os.path.join(ROOT, layer, name)
                offenders += [f"{layer}/{name}: {m}" for m in _imported_modules(path) if m.startswith(UPPER_PACKAGES)]
    assert offenders == []
    # and the check can see an upward import when there is one
    assert any(m.startswith("src.training") for m in _imported_modules(os.path.join(ROOT, "src", "cli", "train.py")))


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "src", "tests", "bench",
                             "train_sft.py"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
