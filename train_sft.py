#!/usr/bin/env python
"""Command line entry: train, evaluate and sample an SFT run, or audit its data (``src/cli``).

    python train_sft.py --config configs/sft_demo.yaml [--max_seq_length 256 ...]
    python train_sft.py audit --config configs/sft_demo.yaml
    torchrun --nproc_per_node=4 train_sft.py --config configs/my_run.yaml

Every SFTConfig field can be given as a flag; flags override the YAML file. User errors (bad config,
bad data, missing model) exit with status 2 and one line on stderr; ``--debug`` shows the traceback.
"""

import sys

from src.cli.main import main
from src.distributed import exit_rank

if __name__ == "__main__":
    code = main()
    exit_rank(code)  # under torchrun: exit without the C++ teardown that can abort a finished rank
    sys.exit(code)
