"""Loss per data source under torchrun: 2 CPU ranks give the per-source losses of one process (tests/test_per_source_loss.py
has the rest)."""

import json
import os

import pytest
import torch

from tests.helpers import ROOT, run_forked
from tests.test_per_source_loss import _mixture


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available")
@pytest.mark.parametrize("packing", [False, True])
def test_two_ranks_give_the_same_per_source_losses_as_one_process(tiny_model_dir, tmp_path, packing):
    datasets = json.dumps(_mixture(tmp_path, msa="msa"))
    script = os.path.join(ROOT, "tests", "distributed", "per_source_run.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        done = run_forked([script, tiny_model_dir, datasets, str(out), str(4 // nproc), "1" if packing else "0"], nproc,
                          env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results[nproc] = json.loads((out / "per_source.json").read_text())
    single, double = results[1], results[2]
    for name in ("msa", "swapped"):
        assert double["eval"][f"eval_{name}_tokens"] == single["eval"][f"eval_{name}_tokens"] > 0
        assert double["eval"][f"eval_{name}_loss"] == pytest.approx(single["eval"][f"eval_{name}_loss"], rel=1e-6)
        assert double["train"][f"loss_{name}"] == pytest.approx(single["train"][f"loss_{name}"], rel=1e-5)
    assert double["eval"]["eval_loss"] == pytest.approx(single["eval"]["eval_loss"], rel=1e-6)
