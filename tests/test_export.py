"""``train_sft.py export``: a LoRA run merged into its base loads with plain transformers and generates the same."""

import json
import os

import pytest
import torch

import train_sft
from src.training.sft_trainer import SFTTrainer
from tests.helpers import PAIRS, make_config, write_jsonl


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    data = write_jsonl(tmp / "d.jsonl", PAIRS[:4])
    out = tmp / "run"
    trainer = SFTTrainer(make_config(tiny_model_dir, data, out, use_lora=True, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                                     max_steps=40, learning_rate=1e-2, per_device_train_batch_size=4,
                                     instruction_template="chatml"))
    trainer.train()
    return trainer, out


def test_export_merges_the_adapter_and_plain_transformers_generates_the_same(lora_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer, run_dir = lora_run
    target = tmp_path / "merged"
    assert train_sft.main(["export", "--model", str(run_dir), "--to", str(target)]) == 0
    assert f"Exported to {target}" in capsys.readouterr().out
    files = set(os.listdir(target))
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "sft_metadata.json"} <= files
    assert not {"adapter_model.safetensors", "adapter_config.json"} & files
    meta = json.loads((target / "sft_metadata.json").read_text(encoding="utf-8"))
    assert meta["merged_lora_adapter"] is True and meta["use_lora"] is False and meta["instruction_template"] == "chatml"
    plain = AutoModelForCausalLM.from_pretrained(str(target)).eval()  # no peft involved
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    assert not hasattr(plain, "peft_config")
    # the saved chat template builds the training prompt: serving stacks ask the model as it was taught
    chat = tokenizer.apply_chat_template([{"role": "user", "content": PAIRS[1]["instruction"]}], add_generation_prompt=True,
                                         tokenize=True)["input_ids"]
    assert chat == trainer.example_tokenizer().encode_prompt(PAIRS[1]["instruction"])
    adapter_model = trainer.model.eval()
    for pair in PAIRS[:4]:
        prompt = torch.tensor([trainer.example_tokenizer().encode_prompt(pair["instruction"])])
        with torch.no_grad():
            merged_ids = plain.generate(prompt, max_new_tokens=12, do_sample=False)[0]
            adapter_ids = adapter_model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False,
                                                 eos_token_id=trainer.stop_token_ids())[0]
        assert merged_ids.tolist() == adapter_ids.tolist()
        assert tokenizer.decode(merged_ids[prompt.shape[1]:], skip_special_tokens=True).strip() == \
            trainer.generate_response(pair["instruction"], max_length=12)
    # load_model still restores the run's formatting settings from the exported folder
    restored = SFTTrainer(make_config(str(target), None, tmp_path / "x"))
    restored.load_model(str(target))
    assert restored.config.instruction_template == "chatml"
    assert restored.generate_response(PAIRS[0]["instruction"], max_length=12) == \
        trainer.generate_response(PAIRS[0]["instruction"], max_length=12)


def test_export_refuses_an_existing_folder_and_names_it(lora_run, tmp_path, capsys):
    _, run_dir = lora_run
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    assert train_sft.main(["export", "--model", str(run_dir), "--to", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(target) in err[0] and "--overwrite" in err[0]
    assert os.listdir(target) == ["notes.txt"]
    # --overwrite replaces an earlier export of ours, never a folder of the user's (tests/test_edges_runs.py)
    assert train_sft.main(["export", "--model", str(run_dir), "--to", str(target), "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err and os.listdir(target) == ["notes.txt"]


def test_export_of_a_full_run_and_of_a_folder_that_is_not_a_run(tiny_model_dir, tiny_full_run, tmp_path, capsys):
    run_dir = tiny_full_run
    assert train_sft.main(["export", "--model", str(run_dir), "--to", str(tmp_path / "copy")]) == 0
    meta = json.loads((tmp_path / "copy" / "sft_metadata.json").read_text(encoding="utf-8"))
    assert meta["merged_lora_adapter"] is False
    from safetensors.torch import load_file

    a, b = load_file(str(run_dir / "model.safetensors")), load_file(str(tmp_path / "copy" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_sft.main(["export", "--model", tiny_model_dir, "--to", str(tmp_path / "nope")]) == 2
    assert "sft_metadata.json" in capsys.readouterr().err


def test_push_to_hub_offline_is_a_clear_error_before_exporting(lora_run, tmp_path, capsys, monkeypatch):
    _, run_dir = lora_run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target = tmp_path / "pushed"
    code = train_sft.main(["export", "--model", str(run_dir), "--to", str(target), "--push_to_hub",
                           "--hub_model_id", "someone/arabic-sft"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "someone/arabic-sft" in err[0] and "offline" in err[0]
    assert not os.path.exists(target)  # refused before minutes of merging, not after
    assert train_sft.main(["export", "--model", str(run_dir), "--to", str(tmp_path / "x"), "--push_to_hub"]) == 2
    assert "--hub_model_id" in capsys.readouterr().err


def test_training_push_to_hub_offline_is_refused_before_training(tiny_model_dir, pairs_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    code = train_sft.main(["--model_name", tiny_model_dir, "--dataset_path", pairs_file, "--output_dir", str(out),
                           "--use_lora", "false", "--max_steps", "1", "--push_to_hub", "--hub_model_id", "someone/arabic-sft"])
    assert code == 2
    err = capsys.readouterr().err
    assert "someone/arabic-sft" in err and "HF_HUB_OFFLINE=1" in err and "huggingface-cli upload" in err
    assert not os.path.exists(out / "model.safetensors")  # refused before training, not after
    with pytest.raises(ValueError, match="SFTConfig.hub_model_id"):
        make_config(tiny_model_dir, pairs_file, out, push_to_hub=True)


def test_push_uploads_the_model_not_checkpoints_or_run_files(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """The upload itself is huggingface_hub's (offline here): the folder it is given and what it is told to leave out
    decide what reaches the hub, so that is what is checked, with the hub client's own pattern filter."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls = []

    class Recorder:
        def create_repo(self, *args, **kwargs):
            pass

        def upload_folder(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    # the hub client is a recorder here: no hub to reach (the reachability check is tested in tests/test_serving.py)
    monkeypatch.setattr("src.training.hub.check_hub_reachable", lambda repo_id, folder: None)
    out = tmp_path / "run"
    trainer = SFTTrainer(make_config(tiny_model_dir, pairs_file, out, max_steps=2, save_steps=1, push_to_hub=True,
                                     hub_model_id="someone/arabic-sft"))
    trainer.train()
    assert len(calls) == 1 and calls[0]["repo_id"] == "someone/arabic-sft" and calls[0]["folder_path"] == str(out)
    files = [os.path.relpath(os.path.join(d, f), out) for d, _, names in os.walk(out) for f in names]
    assert any(f.startswith("checkpoint-") for f in files)  # the folder holds checkpoints ...
    uploaded = set(filter_repo_objects(files, ignore_patterns=calls[0]["ignore_patterns"]))
    assert not any(f.startswith(("checkpoint-", ".sft_run", ".saving")) for f in uploaded)  # ... that are not uploaded
    assert {"model.safetensors", "config.json", "tokenizer.json", "sft_metadata.json"} <= uploaded
