"""What we guarantee about interrupted runs, output folders, partial files and diverging training."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import TrainerCallback

from src.models.loading import ModelLoadError, load_tokenizer, resolve_model_path
from src.training import persistence
from src.training.guards import TrainingDiverged, TrainingInterrupted
from src.training.sft_trainer import SFTTrainer
from tests.helpers import PAIRS, ROOT, make_config, step_counting_trainer, write_jsonl


def _weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


# -- the output folder ---------------------------------------------------------------------------------
def test_a_folder_with_other_peoples_files_is_refused_before_loading(tmp_path, pairs_file):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes", encoding="utf-8")
    (out / "tokenizer.json").write_text("{}", encoding="utf-8")
    # a model path that does not exist: loading it would be a ModelLoadError, so the refusal comes first
    trainer = SFTTrainer(make_config(str(tmp_path / "no-model"), pairs_file, out))
    with pytest.raises(FileExistsError, match=r"did not write \(README.md, tokenizer.json\)"):
        trainer.train()
    assert sorted(os.listdir(out)) == ["README.md", "tokenizer.json"]  # nothing written, nothing touched
    assert (out / "README.md").read_text(encoding="utf-8") == "my notes"


def test_output_dir_that_is_a_file_or_in_use_is_refused(tmp_path, pairs_file, tiny_model_dir):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        SFTTrainer(make_config(tiny_model_dir, pairs_file, a_file)).train()
    out = tmp_path / "busy"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / persistence.LOCK_FILE).write_text(json.dumps({"pid": other.pid, "host": os.uname().nodename,
                                                             "started_at": "earlier"}))
        with pytest.raises(FileExistsError, match=f"in use by another run \\(pid {other.pid}"):
            SFTTrainer(make_config(tiny_model_dir, pairs_file, out, max_steps=1)).train()
    finally:
        other.kill()
        other.wait()
    # the same lock, its process gone: taken over, the run goes ahead and leaves no lock behind
    SFTTrainer(make_config(tiny_model_dir, pairs_file, out, max_steps=1)).train()
    assert os.path.isfile(out / "model.safetensors") and not os.path.exists(out / persistence.LOCK_FILE)
    assert os.path.isfile(out / persistence.RUN_MARKER)


def test_overwrite_removes_old_checkpoints_so_last_cannot_pick_them(tmp_path, pairs_file, tiny_model_dir):
    out = tmp_path / "o"
    SFTTrainer(make_config(tiny_model_dir, pairs_file, out, max_steps=4, save_steps=2)).train()
    assert {"checkpoint-2", "checkpoint-4"} <= set(os.listdir(out))
    SFTTrainer(make_config(tiny_model_dir, pairs_file, out, max_steps=1, save_steps=100, overwrite_output_dir=True)).train()
    assert [e for e in os.listdir(out) if e.startswith("checkpoint-")] == ["checkpoint-1"]  # this run's only


# -- partial files -------------------------------------------------------------------------------------
def test_last_skips_an_incomplete_checkpoint(tmp_path, pairs_file, tiny_model_dir, caplog):
    out = tmp_path / "o"
    SFTTrainer(make_config(tiny_model_dir, pairs_file, out, max_steps=2, save_steps=2)).train()
    partial = out / "checkpoint-3"  # what a run killed while writing a checkpoint leaves
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    (partial / "trainer_state.json").write_text('{"global_step": 3, "log_hist', encoding="utf-8")
    assert persistence.last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert "skipping" in caplog.text and "checkpoint-3" in caplog.text and "not valid JSON" in caplog.text
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        SFTTrainer(make_config(tiny_model_dir, pairs_file, out, resume_from_checkpoint=str(partial),
                               overwrite_output_dir=True)).train()


def test_resuming_a_finished_run_trains_nothing_and_says_so(tmp_path, pairs_file, tiny_model_dir, caplog):
    out = tmp_path / "o"
    SFTTrainer(make_config(tiny_model_dir, pairs_file, out, max_steps=2, save_steps=2)).train()
    before = (out / "model.safetensors").read_bytes()
    again = SFTTrainer(make_config(tiny_model_dir, pairs_file, out, max_steps=2, save_steps=2,
                                   resume_from_checkpoint="last", overwrite_output_dir=True))
    assert again.train() is None
    assert "nothing to train" in caplog.text
    assert (out / "model.safetensors").read_bytes() == before


def test_a_failed_save_leaves_the_previous_model_whole(tmp_path, pairs_file, tiny_model_dir, monkeypatch):
    out = tmp_path / "o"
    first = SFTTrainer(make_config(tiny_model_dir, pairs_file, out, max_steps=2))
    first.train()
    saved = {f: (out / f).read_bytes() for f in ("model.safetensors", "config.json", "sft_metadata.json")}
    second = SFTTrainer(make_config(tiny_model_dir, pairs_file, out, max_steps=3, learning_rate=1e-2,
                                    overwrite_output_dir=True))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(persistence, "_write_own_files", disk_full)
    with pytest.raises(ValueError, match="No space left on device while writing to .*last complete checkpoint"):
        second.train()  # one clear error (exit 2 from the command line), not the bare OSError
    assert {f: (out / f).read_bytes() for f in saved} == saved  # the previous model, untouched
    restored = SFTTrainer(make_config(tiny_model_dir, pairs_file, tmp_path / "elsewhere"))
    restored.load_model(str(out))
    assert all(torch.equal(p, first.model.state_dict()[n]) for n, p in restored.model.state_dict().items())


def test_an_interrupted_tiny_model_build_is_rebuilt(tmp_path):
    base = tmp_path / "base_model"
    path = resolve_model_path("local:tiny-qwen2", str(tmp_path))
    assert path == str(base) and len(load_tokenizer(path)) > 1000
    os.remove(base / "tokenizer.json")  # killed mid-build in an older version: no tokenizer
    os.remove(base / "tokenizer_config.json")
    resolve_model_path("local:tiny-qwen2", str(tmp_path))
    assert os.path.isfile(base / "tokenizer.json") and len(load_tokenizer(str(base))) > 1000
    assert not [e for e in os.listdir(tmp_path) if ".tmp-" in e]


def test_a_model_folder_without_tokenizer_files_is_an_error(tmp_path, tiny_model_dir):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare, ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "merges*", "special*"))
    with pytest.raises(ModelLoadError, match="has no tokenizer files"):
        load_tokenizer(str(bare))


def test_truncated_weights_and_metadata_name_the_file(tmp_path, pairs_file, tiny_model_dir):
    out = tmp_path / "o"
    SFTTrainer(make_config(tiny_model_dir, pairs_file, out, max_steps=1)).train()
    meta = out / "sft_metadata.json"
    meta.write_text(meta.read_text(encoding="utf-8")[:50], encoding="utf-8")
    with pytest.raises(ModelLoadError, match="sft_metadata.json is damaged"):
        SFTTrainer(make_config(tiny_model_dir, pairs_file, tmp_path / "x")).load_model(str(out))
    out2 = tmp_path / "o2"
    SFTTrainer(make_config(tiny_model_dir, pairs_file, out2, max_steps=1)).train()
    weights = out2 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="o2"):
        SFTTrainer(make_config(tiny_model_dir, pairs_file, tmp_path / "y")).load_model(str(out2))


# -- divergence ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_lora", [False, True])
def test_diverging_training_stops_before_a_nan_update_and_saves_nothing(tmp_path, pairs_file, tiny_model_dir, use_lora):
    class NanFromStep3(SFTTrainer):
        """A loss that turns NaN at the third step, as an overflow does (the tiny model saturates instead)."""

        def compute_loss(self, model, inputs, return_outputs=False):
            loss = super().compute_loss(model, inputs, return_outputs)
            return loss * float("nan") if self.trainer.state.global_step >= 2 else loss

    out = tmp_path / "o"
    trainer = NanFromStep3(make_config(tiny_model_dir, pairs_file, out, max_steps=20, save_steps=1, use_lora=use_lora,
                                       lora_r=4, lora_alpha=8))
    with pytest.raises(TrainingDiverged, match=r"diverged at step 3: .*last good checkpoint: .*checkpoint-2"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the bad update was not applied
    assert not os.path.exists(out / "model.safetensors") and not os.path.exists(out / "adapter_model.safetensors")
    from safetensors.torch import load_file

    last = persistence.last_complete_checkpoint(str(out))
    weights = load_file(os.path.join(last, "adapter_model.safetensors" if use_lora else "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


# -- interrupts ------------------------------------------------------------------------------------------
class SignalAt(TrainerCallback):
    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("group_by_length,packing,signal_step", [
    (False, False, 1), (False, False, 3), (False, False, 4),  # mid-epoch, end of the first epoch, in the second
    (True, False, 1), (True, False, 3), (True, False, 4),
    (True, True, 4),  # packed rows, length-grouped, in the second epoch
])
def test_sigterm_saves_a_checkpoint_and_resuming_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, group_by_length,
                                                                             packing, signal_step):
    rows = [{"instruction": p["instruction"], "response": p["response"] * (1 + i % 3)} for i, p in enumerate(PAIRS)]
    data = write_jsonl(tmp_path / "d.jsonl", rows * (2 if packing else 1))  # packed: 8 rows, 4 steps per epoch
    settings = dict(max_steps=6, save_steps=100, per_device_train_batch_size=2, group_by_length=group_by_length,
                    num_train_epochs=3, seed=3, packing=packing, max_seq_length=64 if packing else 96)
    whole = SFTTrainer(make_config(tiny_model_dir, data, tmp_path / "whole", **settings))
    whole.train()

    class Interrupted(SFTTrainer):
        def get_callbacks(self):
            return super().get_callbacks() + [SignalAt(signal_step, signal.SIGTERM)]

    out = tmp_path / "cut"
    cut = Interrupted(make_config(tiny_model_dir, data, out, **settings))
    with pytest.raises(TrainingInterrupted) as info:
        cut.train()
    stopped = signal_step + 1  # the signal arrives during a step; training stops when that step ends
    assert info.value.exit_code == 143 and info.value.step == stopped
    assert info.value.checkpoint == str(out / f"checkpoint-{stopped}")
    assert not os.path.exists(out / "model.safetensors")  # an interrupted run is not a finished model
    resumed = SFTTrainer(make_config(tiny_model_dir, data, out, resume_from_checkpoint="last", **settings))
    resumed.train()
    a, b = _weights(whole), _weights(resumed)
    assert max((a[n] - b[n]).abs().max().item() for n in a) == 0.0


@pytest.mark.slow
def test_ctrl_c_from_the_command_line_exits_130_with_the_resume_command(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS * 20)
    out = tmp_path / "o"
    args = [sys.executable, os.path.join(ROOT, "train_sft.py"), "--model_name", tiny_model_dir, "--dataset_path", data,
            "--output_dir", str(out), "--use_lora", "false", "--max_steps", "500", "--logging_steps", "1",
            "--evaluation_strategy", "no", "--validation_split_ratio", "0", "--dataloader_pin_memory", "false",
            "--gradient_checkpointing", "false", "--per_device_train_batch_size", "1"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    deadline = time.time() + 240
    for line in proc.stdout:  # wait until training steps are being logged
        seen.append(line)
        if "'loss'" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=240)
    output = "".join(seen) + rest
    assert proc.returncode == 130, output[-3000:]
    final = [line for line in output.splitlines() if line.startswith("interrupted:")]
    assert len(final) == 1 and "resume with: python train_sft.py" in final[0]
    assert "--resume_from_checkpoint last" in final[0]
    assert "Traceback" not in output
    assert persistence.last_complete_checkpoint(str(out)) is not None


def test_length_grouped_order_depends_on_seed_and_epoch_only():
    from src.training.hf_trainer import EpochSeededLengthGroupedSampler

    lengths = [(i * 37) % 101 + 1 for i in range(64)]
    sampler = EpochSeededLengthGroupedSampler(4, lengths, seed=7)
    first = list(sampler)
    torch.rand(100)  # other consumers of the global generator change nothing
    assert list(sampler) == first and sorted(first) == list(range(64))
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == list(range(64))
    batches = [second[i:i + 4] for i in range(0, 64, 4)]
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest batch first, as transformers does


def test_a_mistyped_local_model_path_is_reported_at_once(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="'models/my-rnu' does not exist"):
        resolve_model_path("models/my-rnu", str(tmp_path / "o"))  # not sent to the hub as an org/name id
    import huggingface_hub.constants

    # online, a hub id stays one (offline, one that is not in the hub cache is refused at once)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert resolve_model_path("Qwen/Qwen2.5-7B", str(tmp_path / "o")) == "Qwen/Qwen2.5-7B"


def test_a_run_killed_after_its_last_checkpoint_resumes_to_its_final_model(tmp_path, pairs_file, tiny_model_dir):
    import shutil

    from safetensors.torch import load_file

    out = tmp_path / "o"
    SFTTrainer(make_config(tiny_model_dir, pairs_file, out, max_steps=2, save_steps=2)).train()
    expected = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    for name in os.listdir(out):  # what a SIGKILL between the last checkpoint and the final save leaves
        if not name.startswith("checkpoint-") and name not in (persistence.RUN_MARKER,):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    steps = []
    Counting = step_counting_trainer(steps)
    resumed = Counting(make_config(tiny_model_dir, pairs_file, out, max_steps=2, save_steps=2, resume_from_checkpoint="last"))
    assert resumed.train() is None
    assert steps == []  # transformers alone would have trained a third step
    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    assert json.loads((out / "sft_metadata.json").read_text(encoding="utf-8"))["training_completed_at"]


def test_a_prompt_longer_than_the_context_is_refused_before_generating(tiny_model_dir, pairs_file, tmp_path):
    trainer = SFTTrainer(make_config(tiny_model_dir, pairs_file, tmp_path / "o"))
    trainer.setup_model()
    context = trainer.model.config.max_position_embeddings
    long_instruction = "كلمة " * (context + 10)
    with pytest.raises(ValueError, match=rf"prompt 1 is \d+ tokens long, but the model's context is {context}"):
        trainer.batch_generate(["قصير", long_instruction], max_length=8)
    assert len(trainer.batch_generate(["قصير"], max_length=4)) == 1  # a prompt that fits still generates


def _cli(data, out, *extra, model_dir):
    return [sys.executable, os.path.join(ROOT, "train_sft.py"), "--model_name", model_dir, "--dataset_path", data,
            "--output_dir", str(out), "--use_lora", "false", "--max_steps", "8", "--save_steps", "1",
            "--save_total_limit", "None", "--per_device_train_batch_size", "2", "--evaluation_strategy", "no",
            "--validation_split_ratio", "0", "--dataloader_pin_memory", "false", "--gradient_checkpointing", "false",
            "--group_by_length", "true", "--num_train_epochs", "3", "--logging_steps", "1", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [2, 5])  # first epoch; second epoch (4 steps per epoch)
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, kill_after):
    from safetensors.torch import load_file

    rows = [{"instruction": p["instruction"], "response": p["response"] * (1 + i % 3)} for i, p in enumerate(PAIRS)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    whole = subprocess.run(_cli(data, tmp_path / "whole", model_dir=tiny_model_dir), env=env, capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(data, out, model_dir=tiny_model_dir), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while persistence.checkpoint_problem(str(out / f"checkpoint-{kill_after}")) is not None and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    assert not os.path.exists(out / "model.safetensors")  # it really died before the end
    resumed = subprocess.run(_cli(data, out, "--resume_from_checkpoint", "last", model_dir=tiny_model_dir), env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_saving_a_full_model_over_a_lora_run_leaves_no_adapter_behind(tmp_path, pairs_file, tiny_model_dir):
    out = tmp_path / "o"
    SFTTrainer(make_config(tiny_model_dir, pairs_file, out, max_steps=1, use_lora=True, lora_r=4, lora_alpha=8)).train()
    assert os.path.isfile(out / "adapter_model.safetensors")
    full = SFTTrainer(make_config(tiny_model_dir, pairs_file, out, max_steps=1, overwrite_output_dir=True))
    full.train()
    assert not os.path.exists(out / "adapter_model.safetensors") and not os.path.exists(out / "adapter_config.json")
    restored = SFTTrainer(make_config(tiny_model_dir, pairs_file, tmp_path / "x"))
    restored.load_model(str(out))
    assert not hasattr(restored.model, "peft_config")
    assert all(torch.equal(p, full.model.state_dict()[n]) for n, p in restored.model.state_dict().items())


def test_a_second_train_call_is_not_stopped_by_the_first_ones_signal(tmp_path, pairs_file, tiny_model_dir):
    class Interrupted(SFTTrainer):
        def get_callbacks(self):
            return super().get_callbacks() + [SignalAt(1, signal.SIGTERM)]

    out = tmp_path / "o"
    trainer = Interrupted(make_config(tiny_model_dir, pairs_file, out, max_steps=4, save_steps=100))
    with pytest.raises(TrainingInterrupted):
        trainer.train()
    # the same trainer, asked to continue, without any new signal
    trainer.get_callbacks = lambda: SFTTrainer.get_callbacks(trainer)
    trainer.trainer = None
    trainer.config.resume_from_checkpoint = "last"
    trainer.train()
    assert os.path.isfile(out / "model.safetensors")


def test_the_resume_command_replaces_an_earlier_resume_flag():
    from src.cli.main import resume_command

    assert resume_command(["--config", "my run.yaml", "--resume_from_checkpoint", "o/checkpoint-10", "--max_steps=9"]) == \
        "python train_sft.py --config 'my run.yaml' --max_steps=9 --resume_from_checkpoint last"
    assert resume_command(["--resume-from-checkpoint=o/checkpoint-3"]) == "python train_sft.py --resume_from_checkpoint last"


def test_models_that_change_logits_after_the_head_fall_back_to_full_logits(tiny_model_dir):
    from src.training.losses import FullLogitsLoss, TrainedTokensLoss
    from tests.helpers import load_tiny

    model, tokenizer = load_tiny(tiny_model_dir)
    model.config.final_logit_softcapping = 30.0  # as Gemma 2 has; Qwen2 ignores it, the loss must not assume that
    loss = TrainedTokensLoss()
    assert loss.head(model) is None
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": torch.tensor([[-100, 6, 7, 8]])}
    assert loss(model, batch).loss.item() == pytest.approx(FullLogitsLoss()(model, batch).loss.item(), rel=1e-6)


@pytest.mark.parametrize("case", ["yaml", "file_as_output_dir", "unknown_flag"])
def test_command_line_errors_are_one_line_naming_the_file(tmp_path, capsys, tiny_model_dir, pairs_file, case):
    import train_sft

    if case == "yaml":
        config = tmp_path / "run.yaml"
        config.write_text("model_name: x\nmax_seq_length: [1, 2\n", encoding="utf-8")
        argv, expected = ["--config", str(config)], rf"{config}, line 3, column 1: not valid YAML"
    elif case == "file_as_output_dir":
        target = tmp_path / "a-file"
        target.write_text("x")
        argv = ["--model_name", tiny_model_dir, "--dataset_path", pairs_file, "--output_dir", str(target)]
        expected = rf"output_dir '{target}' is a file"
    else:
        argv, expected = ["--learning_rat", "1e-3"], "unknown argument.*did you mean --learning_rate"
    assert train_sft.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(expected, err[0]), err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write into read-only folders")
def test_a_read_only_output_dir_is_refused_naming_it(tmp_path, pairs_file, tiny_model_dir):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="is not writable"):
            SFTTrainer(make_config(tiny_model_dir, pairs_file, out, max_steps=1)).train()
    finally:
        out.chmod(0o755)
