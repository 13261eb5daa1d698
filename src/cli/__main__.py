"""``python -m src.cli``: the command line of ``train_sft.py`` and of the installed ``arabic-qwen-sft`` command."""

import sys

from src.cli.main import entry

if __name__ == "__main__":
    sys.exit(entry())
