"""use_liger_kernel: Liger's Triton kernels under our loss (GPU only), and clear errors where they cannot run."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from src.training.sft_trainer import SFTTrainer
from tests.helpers import make_config


def test_liger_settings_reach_transformers_with_our_loss_in_charge(tiny_model_dir, pairs_file, tmp_path):
    from src.cli.args import parse_config
    from src.config import SFTConfig
    from src.training.training_args import training_arguments_kwargs

    config = make_config(tiny_model_dir, pairs_file, tmp_path / "o", use_liger_kernel=True)
    kwargs = training_arguments_kwargs(config)
    assert kwargs["use_liger_kernel"] is True
    kernels = kwargs["liger_kernel_config"]
    assert kernels["rms_norm"] and kernels["swiglu"] and kernels["rope"]
    assert not kernels["fused_linear_cross_entropy"] and not kernels["cross_entropy"]  # the loss stays ours
    assert "use_liger_kernel" not in training_arguments_kwargs(make_config(tiny_model_dir, pairs_file, tmp_path / "p"))
    assert parse_config(SFTConfig, ["--dataset_path", pairs_file, "--use_liger_kernel"]).use_liger_kernel is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_liger_without_a_gpu_is_a_clear_error_before_anything_loads(tiny_model_dir, pairs_file, tmp_path):
    trainer = SFTTrainer(make_config(tiny_model_dir, pairs_file, tmp_path / "o", use_liger_kernel=True, max_steps=1))
    with pytest.raises(ValueError, match="use_liger_kernel=True needs a CUDA GPU"):
        trainer.train()
    assert trainer.model is None and not os.path.exists(tmp_path / "o" / "model.safetensors")


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="Liger's kernels need a CUDA GPU and liger-kernel (pip install -e '.[liger]'); this machine "
                           "has no GPU or no liger-kernel")
def test_liger_kernels_train_to_the_losses_of_the_plain_model(tiny_model_dir, pairs_file, tmp_path):
    losses = {}
    for liger in (False, True):
        trainer = SFTTrainer(make_config(tiny_model_dir, pairs_file, tmp_path / str(liger), max_steps=4, packing=True,
                                         logging_steps=1, use_liger_kernel=liger, bf16=False))
        trainer.train()
        losses[liger] = [h["loss"] for h in trainer.trainer.state.log_history if "loss" in h]
        # Liger patches instances in place (their class keeps its name; _get_name reports the kernel)
        norms = {m._get_name() for m in trainer.unwrapped_model().modules() if "RMSNorm" in type(m).__name__}
        assert norms and any(name.startswith("Liger") for name in norms) == liger
    assert losses[True] == pytest.approx(losses[False], rel=2e-3)
