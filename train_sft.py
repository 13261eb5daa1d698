#!/usr/bin/env python
"""Command line entry: train, evaluate and sample an SFT run, or audit its data (``src/cli``).

    python train_sft.py --config configs/sft_demo.yaml [--max_seq_length 256 ...]
    python train_sft.py audit --config configs/sft_demo.yaml
    torchrun --nproc_per_node=4 train_sft.py --config configs/my_run.yaml

Installed (``pip install -e .``), the same command line is the ``arabic-qwen-sft`` command.
Every SFTConfig field can be given as a flag; flags override the YAML file. User errors (bad config,
bad data, missing model) exit with status 2 and one line on stderr; ``--debug`` shows the traceback.
"""

import sys

from src.cli.main import entry, main  # noqa: F401  (main: the tests' and the specification's in-process entry)

if __name__ == "__main__":
    sys.exit(entry())
