"""LoRA options (all-linear, DoRA, rsLoRA, modules_to_save), fp16, and quantization's clear errors on CPU."""

import json
import os

import pytest
import torch

from src.config import SFTConfig
from src.training.sft_trainer import SFTTrainer
from tests.helpers import make_config

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_all_linear_dora_rslora_and_modules_to_save(tiny_model_dir, pairs_file, tmp_path):
    config = make_config(tiny_model_dir, pairs_file, tmp_path / "o", use_lora=True, lora_r=4, lora_alpha=8,
                         lora_target_modules=["all-linear"], use_dora=True, use_rslora=True,
                         modules_to_save=["lm_head"], max_steps=2)
    trainer = SFTTrainer(config)
    trainer.train()
    peft_config = trainer.model.peft_config["default"]
    assert {name.rsplit(".", 1)[-1] for name in peft_config.target_modules} == PROJECTIONS  # all but the head
    assert peft_config.use_dora and peft_config.use_rslora and "lm_head" in peft_config.modules_to_save
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in trained)  # DoRA's magnitudes train
    assert any("lm_head" in n and "modules_to_save" in n for n in trained)
    restored = SFTTrainer(make_config(tiny_model_dir, pairs_file, tmp_path / "x"))
    restored.load_model(str(tmp_path / "o"))
    prompt = "ما عاصمة مصر؟"
    assert restored.generate_response(prompt, max_length=6) == trainer.generate_response(prompt, max_length=6)


def test_unknown_modules_to_save_is_a_clear_error(tiny_model_dir, pairs_file, tmp_path):
    from src.models.loading import ModelLoadError

    trainer = SFTTrainer(make_config(tiny_model_dir, pairs_file, tmp_path / "o", use_lora=True,
                                     modules_to_save=["score_head"], max_steps=1))
    with pytest.raises(ModelLoadError, match="score_head"):
        trainer.train()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_quantized_loading_without_a_gpu_is_a_clear_error(tiny_model_dir, pairs_file, tmp_path):
    trainer = SFTTrainer(make_config(tiny_model_dir, pairs_file, tmp_path / "o", use_lora=True, load_in_4bit=True))
    with pytest.raises(ValueError, match="load_in_4bit=True needs a CUDA GPU"):
        trainer.train()
    assert not os.path.exists(tmp_path / "o" / "model.safetensors")
    with pytest.raises(ValueError, match="SFTConfig.use_lora"):
        SFTConfig(use_lora=False, load_in_8bit=True)
    with pytest.raises(ValueError, match="SFTConfig.fp16"):
        SFTConfig(bf16=True, fp16=True)


def test_bf16_defaults_to_auto_and_records_the_precision_used(tiny_model_dir, pairs_file, tmp_path):
    from src.cli.args import parse_config
    from src.models.loading import bf16_supported
    from src.training.training_args import training_arguments_kwargs

    config = make_config(tiny_model_dir, pairs_file, tmp_path / "o", max_steps=1)
    assert SFTConfig().bf16 is None and config.bf16 is None  # auto
    assert config.resolved_bf16 == bf16_supported()  # on exactly where the GPU supports it
    assert SFTConfig(fp16=True).resolved_bf16 is False  # auto yields to an explicit fp16
    assert SFTConfig(bf16="auto").bf16 is None
    with pytest.raises(ValueError, match=r"SFTConfig.bf16='yes' is invalid"):
        SFTConfig(bf16="yes")
    for argv, expected in ((["--bf16", "auto"], None), (["--bf16"], True), (["--bf16", "false"], False)):
        assert parse_config(SFTConfig, ["--dataset_path", pairs_file] + argv).bf16 is expected
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"dataset_path: {pairs_file}\nbf16: auto\n", encoding="utf-8")
    assert parse_config(SFTConfig, ["--config", str(yaml_file)]).bf16 is None
    trainer = SFTTrainer(config)
    trainer.train()
    assert trainer.trainer.args.bf16 == bf16_supported()
    assert training_arguments_kwargs(config, trainer.environment())["bf16"] == bf16_supported()
    trainer.save_model()
    metadata = json.loads((tmp_path / "o" / "sft_metadata.json").read_text(encoding="utf-8"))
    assert metadata["mixed_precision"] == ("bf16" if bf16_supported() else "no")


def _bitsandbytes_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is None


@pytest.mark.skipif(not torch.cuda.is_available() or _bitsandbytes_missing(),
                    reason="QLoRA needs a CUDA GPU and bitsandbytes (pip install -e '.[qlora]'); this machine has no GPU "
                           "or no bitsandbytes")
def test_qlora_trains_adapters_on_a_4bit_base_and_saves_only_them(tiny_model_dir, pairs_file, tmp_path):
    """The GPU half of QLoRA: NF4 base (double quantization, bf16 compute), adapters trained, saved and loaded back."""
    out = tmp_path / "qlora"
    trainer = SFTTrainer(make_config(tiny_model_dir, pairs_file, out, use_lora=True, load_in_4bit=True, max_steps=3,
                                     lora_target_modules=["all-linear"], lora_r=4, lora_alpha=8, logging_steps=1))
    trainer.train()
    base = trainer.unwrapped_model().get_base_model()
    quantized = [name for name, module in base.named_modules() if type(module).__name__ == "Linear4bit"]
    assert quantized and all(name.split(".")[-2] in PROJECTIONS or name.split(".")[-1] in PROJECTIONS
                             for name in quantized)
    assert os.path.isfile(out / "adapter_model.safetensors") and not os.path.exists(out / "model.safetensors")
    losses = [entry["loss"] for entry in trainer.trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(0 < loss < 100 for loss in losses)
    restored = SFTTrainer(make_config(tiny_model_dir, pairs_file, tmp_path / "unused"))
    restored.load_model(str(out))  # the saved adapter on its (unquantized) base
    trained = {n: p.detach().float().cpu() for n, p in trainer.model.named_parameters() if "lora_" in n}
    loaded = {n: p.detach().float().cpu() for n, p in restored.model.named_parameters() if "lora_" in n}
    assert trained and trained.keys() == loaded.keys() and all(torch.equal(trained[n], loaded[n]) for n in trained)
