"""Loss exactness across data-parallel ranks: 2 processes x batch 2 == 1 process x batch 4 (CPU, gloo)."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from tests.conftest import PAIRS, ROOT, write_jsonl

SCRIPT = os.path.join(ROOT, "tests", "ddp_one_step.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(nproc, model_dir, data, out, batch, packing, mode=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if nproc == 1:
        cmd = [sys.executable, SCRIPT]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), SCRIPT]
    result = subprocess.run(cmd + [model_dir, data, str(out), str(batch), "1" if packing else "0"] + ([mode] if mode else []),
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    if mode == "eval":
        with open(os.path.join(out, "eval.json")) as fh:
            return json.load(fh)
    return torch.load(os.path.join(out, "update.pt"))


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available")
@pytest.mark.parametrize("packing", [False, True])
def test_two_ranks_give_the_same_update_as_one(tiny_model_dir, tmp_path, packing):
    # very different lengths: the two ranks hold different numbers of trained tokens
    rows = [{"instruction": p["instruction"], "response": p["response"] * (1 + 3 * (i % 2))} for i, p in enumerate(PAIRS)]
    data = write_jsonl(tmp_path / "d.jsonl", rows if packing else rows[:4])
    single = run(1, tiny_model_dir, data, tmp_path / "single", 4, packing)
    double = run(2, tiny_model_dir, data, tmp_path / "ddp", 2, packing)
    worst = max(((double[n] - single[n]).abs().max() / single[n].abs().max().clamp(min=1e-12)).item() for n in single)
    assert worst < 1e-4
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available")
def test_two_ranks_evaluate_every_row_once(tiny_model_dir, tmp_path):
    # 5 rows over 2 ranks with batch 2: accelerate's even_batches would repeat a row on one rank
    rows = [{"instruction": p["instruction"], "response": p["response"] * (1 + 2 * (i % 3))} for i, p in enumerate(PAIRS[:5])]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    single = run(1, tiny_model_dir, data, tmp_path / "single", 2, False, "eval")
    double = run(2, tiny_model_dir, data, tmp_path / "ddp", 2, False, "eval")
    assert double["eval_tokens"] == single["eval_tokens"]
    assert double["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-6)
