"""Nothing silent at the edges of a run: resume checks what it continues, export cannot delete a run, non-finite
weights are never saved, locks identify their run, rotation goes by step, an interrupted final save is finished,
and full or read-only disks, moved base models and Ctrl-C end in one clear line."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from transformers import TrainerCallback

import train_sft
from src.training import persistence
from src.training.guards import TrainingDiverged
from src.training.sft_trainer import SFTTrainer
from tests.helpers import PAIRS, ROOT, free_port, make_config, write_jsonl


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", PAIRS)


def weights(folder):
    from safetensors.torch import load_file

    name = "model.safetensors" if os.path.isfile(os.path.join(folder, "model.safetensors")) else "adapter_model.safetensors"
    return load_file(os.path.join(folder, name))


# -- resume -------------------------------------------------------------------------------------------------------
def test_an_always_resume_job_does_not_continue_an_older_run_with_new_settings(tiny_model_dir, data, tmp_path):
    out = tmp_path / "o"
    SFTTrainer(make_config(tiny_model_dir, data, out, max_steps=2, save_steps=1)).train()
    before = weights(out)
    again = SFTTrainer(make_config(tiny_model_dir, data, out, max_steps=4, save_steps=1, learning_rate=1e-3,
                                   overwrite_output_dir=True, resume_from_checkpoint="last"))
    with pytest.raises(ValueError, match=r"learning_rate: 0\.003 there, 0\.001 now.*resume_allow_changes: \[learning_rate\]"):
        again.train()
    assert all(torch.equal(a, weights(out)[k]) for k, a in before.items())  # nothing trained, nothing replaced


def test_resume_refuses_changed_data_and_layout_and_records_what_may_change(tiny_model_dir, data, tmp_path):
    out = tmp_path / "o"
    SFTTrainer(make_config(tiny_model_dir, data, out, max_steps=2, save_steps=1)).train()
    other = write_jsonl(tmp_path / "other.jsonl", PAIRS[:4])
    changed = dict(dataset_path=other, max_seq_length=64, packing=True, use_lora=True)
    with pytest.raises(ValueError) as caught:
        SFTTrainer(make_config(tiny_model_dir, data, out, max_steps=3, resume_from_checkpoint="last",
                               overwrite_output_dir=True, **changed)).train()
    for name in changed:  # every difference is named (a LoRA run can never resume a full run's checkpoint)
        assert f"{name}:" in str(caught.value)
    # how long it runs and how often it logs may change; the resume and the change are recorded
    resumed = SFTTrainer(make_config(tiny_model_dir, data, out, max_steps=3, logging_steps=1, resume_from_checkpoint="last",
                                     overwrite_output_dir=True))
    resumed.train()
    metadata = json.loads((out / "sft_metadata.json").read_text(encoding="utf-8"))
    (resume,) = metadata["resumes"]
    assert resume["step"] == 2 and resume["from"].endswith("checkpoint-2")
    assert resume["changed"]["max_steps"] == [2, 3] and resume["changed"]["logging_steps"] == [50, 1]
    # and a listed change is accepted and recorded
    again = SFTTrainer(make_config(tiny_model_dir, data, out, max_steps=4, logging_steps=1, learning_rate=1e-3,
                                   resume_from_checkpoint="last", overwrite_output_dir=True,
                                   resume_allow_changes=["learning_rate"]))
    again.train()
    metadata = json.loads((out / "sft_metadata.json").read_text(encoding="utf-8"))
    assert metadata["resumes"][-1]["changed"]["learning_rate"] == [0.003, 0.001]


def test_resume_last_into_a_fresh_folder_fails_before_building_anything(data, tmp_path, capsys):
    out = tmp_path / "typo"
    code = train_sft.main(["--model_name", "local:tiny-qwen2", "--dataset_path", data, "--output_dir", str(out),
                           "--resume_from_checkpoint", "last"])
    assert code == 2 and "found no checkpoint" in capsys.readouterr().err
    assert not out.exists()


# -- export -------------------------------------------------------------------------------------------------------
def test_export_never_deletes_the_run_or_files_it_did_not_write(tiny_model_dir, data, tmp_path, capsys):
    parent = tmp_path / "work"
    run = parent / "run"
    SFTTrainer(make_config(tiny_model_dir, data, run, max_steps=1)).train()
    (parent / "notes.txt").write_text("mine", encoding="utf-8")
    assert train_sft.main(["export", "--model", str(run), "--to", str(parent), "--overwrite"]) == 2
    assert "contains the run" in capsys.readouterr().err
    assert (run / "sft_metadata.json").is_file() and (parent / "notes.txt").read_text(encoding="utf-8") == "mine"
    users = tmp_path / "users"
    users.mkdir()
    (users / "thesis.tex").write_text("x", encoding="utf-8")
    assert train_sft.main(["export", "--model", str(run), "--to", str(users), "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err and (users / "thesis.tex").is_file()
    # an earlier export of ours is replaced
    target = tmp_path / "exported"
    assert train_sft.main(["export", "--model", str(run), "--to", str(target)]) == 0
    assert train_sft.main(["export", "--model", str(run), "--to", str(target), "--overwrite"]) == 0
    assert (target / "model.safetensors").is_file() and not list(tmp_path.glob("exported.*"))


# -- non-finite weights ----------------------------------------------------------------------------------------------
class Overflow(TrainerCallback):
    """What a learning rate too large for float32 does: the update leaves a weight infinite (gradients were finite)."""

    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at_step:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("inf")


def test_weights_that_overflow_are_never_saved_nor_named_the_last_good_checkpoint(tiny_model_dir, data, tmp_path):
    class Overflowing(SFTTrainer):
        def get_callbacks(self):
            return super().get_callbacks() + [Overflow(self.overflow_at)]

    out = tmp_path / "one"
    trainer = Overflowing(make_config(tiny_model_dir, data, out, max_steps=1))
    trainer.overflow_at = 1
    with pytest.raises(TrainingDiverged, match="not finite"):
        trainer.train()
    assert not (out / "model.safetensors").exists() and not (out / "sft_metadata.json").exists()
    out = tmp_path / "three"
    trainer = Overflowing(make_config(tiny_model_dir, data, out, max_steps=3, save_steps=1))
    trainer.overflow_at = 2
    with pytest.raises(TrainingDiverged, match="checkpoint-2 was not saved") as caught:
        trainer.train()
    assert sorted(os.listdir(out)).count("checkpoint-1") == 1 and not (out / "checkpoint-2").exists()
    del caught


# -- the folder -----------------------------------------------------------------------------------------------------
def test_a_lock_of_a_live_but_unrelated_process_is_stale_and_a_live_one_names_its_file(tiny_model_dir, data, tmp_path, caplog):
    out = tmp_path / "o"
    out.mkdir()
    # what a restarted container leaves: the old run's lock naming pid 1, alive now as another process
    (out / persistence.LOCK_FILE).write_text(json.dumps({"pid": 1, "host": __import__("socket").gethostname(),
                                                         "started_at": "2001-01-01T00:00:00Z"}), encoding="utf-8")
    SFTTrainer(make_config(tiny_model_dir, data, out, max_steps=1)).train()
    assert "stale lock" in caplog.text
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        lock = {"pid": sleeper.pid, "host": __import__("socket").gethostname(), "started_at": persistence.utc_now(),
                "process_start": persistence._process_start(sleeper.pid)}
        (out / persistence.LOCK_FILE).write_text(json.dumps(lock), encoding="utf-8")
        with pytest.raises(FileExistsError, match=r"lock file .*\.sft_run\.lock.*delete"):
            SFTTrainer(make_config(tiny_model_dir, data, out, max_steps=1, overwrite_output_dir=True)).train()
    finally:
        sleeper.kill()


def test_checkpoints_rotate_by_step_not_by_modification_time(tiny_model_dir, data, tmp_path):
    out = tmp_path / "o"
    SFTTrainer(make_config(tiny_model_dir, data, out, max_steps=1, save_steps=1)).train()
    future = time.time() + 3600
    os.utime(out / "checkpoint-1", (future, future))  # an old checkpoint that looks newest (half-deleted, touched)
    (out / "checkpoint-1" / "optimizer.pt").unlink(missing_ok=True)
    SFTTrainer(make_config(tiny_model_dir, data, out, max_steps=4, save_steps=1, save_total_limit=2,
                           resume_from_checkpoint="last", overwrite_output_dir=True)).train()
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-3", "checkpoint-4"]


def test_our_own_temporary_folders_never_make_a_folder_foreign(tmp_path):
    from src.models.loading import _remove_dead_builds

    (tmp_path / "base_model.tmp-4242").mkdir()
    (tmp_path / ".sft_run.lock.tmp-77").write_text("{", encoding="utf-8")
    assert persistence.foreign_files(str(tmp_path), "sft") == []
    (tmp_path / "mine.txt").write_text("x", encoding="utf-8")
    assert persistence.foreign_files(str(tmp_path), "sft") == ["mine.txt"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f"base_model.tmp-{dead.stdout.strip()}").mkdir()  # a build whose process is gone
    (tmp_path / f"base_model.tmp-{os.getpid()}").mkdir()  # a live one (this process)
    _remove_dead_builds(str(tmp_path / "base_model"))
    assert not (tmp_path / f"base_model.tmp-{dead.stdout.strip()}").exists()
    assert (tmp_path / f"base_model.tmp-{os.getpid()}").exists()


def test_a_final_save_killed_between_its_renames_is_finished(tiny_model_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "o"
    first = SFTTrainer(make_config(tiny_model_dir, data, out, max_steps=1))
    first.train()
    second = SFTTrainer(make_config(tiny_model_dir, data, out, max_steps=3, learning_rate=1e-2, overwrite_output_dir=True))
    real_replace, calls = os.replace, []

    def dies_on_the_second_rename(source, target):
        if persistence.STAGING_DIR in str(source) and not str(source).endswith(persistence.JOURNAL):
            calls.append(target)
            if len(calls) == 2:
                raise KeyboardInterrupt  # as a SIGKILL would stop it: mid-way through the renames
        return real_replace(source, target)

    monkeypatch.setattr(persistence.os, "replace", dies_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        second.train()
    monkeypatch.setattr(persistence.os, "replace", real_replace)
    assert not (out / "sft_metadata.json").exists()  # half moved: neither model is whole in place
    restored = SFTTrainer(make_config(str(out), None, tmp_path / "unused"))
    restored.load_model(str(out))  # finishes the move from its journal
    expected = {k: v for k, v in second.unwrapped_model().state_dict().items()}
    assert all(torch.equal(restored.model.state_dict()[k], v) for k, v in expected.items())
    assert not (out / persistence.STAGING_DIR).exists()


def test_a_run_finished_from_its_last_checkpoint_has_its_model_card_and_plot(tiny_model_dir, data, tmp_path):
    out = tmp_path / "o"
    SFTTrainer(make_config(tiny_model_dir, data, out, max_steps=2, save_steps=2, logging_steps=1)).train()
    for name in ("model.safetensors", "sft_metadata.json", "README.md", "training_curves.png"):
        (out / name).unlink()  # as if killed before the final save
    SFTTrainer(make_config(tiny_model_dir, data, out, max_steps=2, save_steps=2, logging_steps=1,
                           resume_from_checkpoint="last", overwrite_output_dir=True)).train()
    assert (out / "README.md").is_file() and (out / "training_curves.png").is_file()


def test_metadata_is_valid_json_with_null_for_nan(tiny_model_dir, data, tmp_path):
    out = tmp_path / "o"
    trainer = SFTTrainer(make_config(tiny_model_dir, data, out, max_steps=1))
    trainer.train()
    trainer.final_metrics = {"eval_loss": float("nan"), "eval_perplexity": float("inf")}
    trainer.save_model()
    text = (out / "sft_metadata.json").read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    metadata = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in the metadata"))
    assert metadata["final_metrics"] == {"eval_loss": None, "eval_perplexity": None}


@pytest.mark.parametrize("text, words", [
    ("[1, 2]", "holds a JSON array"),
    ("null", "holds a JSON null"),
    ('"run"', "holds a JSON string"),
    ('{"use_lora": false, "config": []}', "'config' is a JSON array"),
    ('{"use_lora": false, "normalization": [1]}', "'normalization' is a JSON array"),
    ('{"use_lora": false, "normalization": {"nfc": true}}', "'normalization' has no 'preset'"),
    ('{"use_lora": true, "base_model": 5}', "'base_model' is a JSON number"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_metadata_that_is_not_what_save_model_writes_is_a_clear_error(tmp_path, capsys, tiny_model_dir, text, words):
    import re

    from src.config import SFTConfig
    from src.models.loading import ModelLoadError

    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run)
    (run / "sft_metadata.json").write_text(text, encoding="utf-8")
    with pytest.raises(ModelLoadError, match=rf"sft_metadata\.json.*{re.escape(words)}"):
        SFTTrainer(SFTConfig()).load_model(str(run))
    assert train_sft.main(["chat", "--model", str(run)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "sft_metadata.json" in err.strip().splitlines()[-1] and words in err


def test_a_lora_run_whose_base_folder_moved_names_the_folder(tiny_model_dir, data, tmp_path):
    from src.models.loading import ModelLoadError

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    out = tmp_path / "o"
    SFTTrainer(make_config(str(base), data, out, max_steps=1, use_lora=True)).train()
    base.rename(tmp_path / "moved")
    with pytest.raises(ModelLoadError, match=f"base model folder {base}, which is missing"):
        SFTTrainer(make_config(tiny_model_dir, None, tmp_path / "x")).load_model(str(out))


# -- disks and Ctrl-C ----------------------------------------------------------------------------------------------
def test_a_full_disk_at_a_checkpoint_says_so_in_one_line(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    import errno

    import transformers.modeling_utils as modeling

    out = tmp_path / "o"
    real = modeling.safe_save_file
    saves = []

    def full_after_one(*args, **kwargs):
        saves.append(1)
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling, "safe_save_file", full_after_one)
    code = train_sft.main(["--model_name", tiny_model_dir, "--dataset_path", data, "--output_dir", str(out),
                           "--max_steps", "3", "--save_steps", "1", "--use_lora", "false", "--evaluation_strategy", "no",
                           "--validation_split_ratio", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "checkpoint-1" in err and "Traceback" not in err


def test_an_unwritable_output_dir_is_refused_before_the_data_is_read(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import errno

    broken = write_jsonl(tmp_path / "broken.jsonl", [{"instruction": "س"}])  # reading it would fail: no response
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(persistence.os, "write", full)
    code = train_sft.main(["--model_name", tiny_model_dir, "--dataset_path", broken, "--output_dir", str(tmp_path / "o")])
    monkeypatch.setattr(persistence.os, "write", real_write)
    err = capsys.readouterr().err
    assert code == 2 and "cannot be written (no space left on device" in err and "line" not in err


def test_ctrl_c_while_tokenizing_is_one_line_and_exit_130(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    import src.training.sft_trainer as sft

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "tokenize_records", interrupted)
    code = train_sft.main(["--model_name", tiny_model_dir, "--dataset_path", data, "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err
    assert [line for line in err.splitlines() if line.startswith("interrupted")] == [
        "interrupted: stopped at once (Ctrl-C); what was saved before stays (resume a training run with "
        "--resume_from_checkpoint last)"]


@pytest.mark.slow
def test_sigkill_at_a_random_moment_leaves_the_previous_or_the_new_result_whole(tiny_model_dir, data, tmp_path):
    """Property: SIGKILL a training run (into a folder holding a finished run, overwriting it), an export (over an
    earlier export) and a batch generation at random moments; afterwards the folder loads, as the previous result or
    the new one, and the generation finishes to exactly what an uninterrupted one writes."""
    import random

    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    SFTTrainer(make_config(tiny_model_dir, data, out, max_steps=1)).train()
    previous = weights(out)
    reference = tmp_path / "reference"
    SFTTrainer(make_config(tiny_model_dir, data, reference, max_steps=3, seed=1)).train()
    new = weights(reference)
    export = tmp_path / "exported"
    assert train_sft.main(["export", "--model", str(out), "--to", str(export)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, os.path.join(ROOT, "train_sft.py"), "--model_name", tiny_model_dir, "--dataset_path", data,
               "--output_dir", str(out), "--max_steps", "3", "--seed", "1", "--use_lora", "false",
               "--evaluation_strategy", "no", "--validation_split_ratio", "0", "--learning_rate", "3e-3",
               "--per_device_train_batch_size", "2", "--max_seq_length", "96", "--warmup_ratio", "0",
               "--lr_scheduler_type", "constant", "--save_steps", "10000", "--gradient_checkpointing", "false",
               "--dataloader_pin_memory", "false", "--overwrite_output_dir", "true"]
    rng = random.Random(0)
    for attempt in range(3):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 12.0))
        process.kill()
        process.wait()
        restored = SFTTrainer(make_config(str(out), None, tmp_path / f"unused{attempt}"))
        restored.load_model(str(out))
        got = weights(out)
        assert any(all(torch.equal(got[k], ref[k]) for k in ref) for ref in (previous, new)), f"attempt {attempt}"
        exporter = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_sft.py"), "export", "--model", str(out),
                                     "--to", str(export), "--overwrite"], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 8.0))
        exporter.kill()
        exporter.wait()
        AutoModelForCausalLM.from_pretrained(str(export))  # the earlier export or the new one, whole
    # generate: killed at random moments, the same command finishes the file exactly as an uninterrupted run writes it
    questions = write_jsonl(tmp_path / "q.jsonl", [{"id": str(i), "instruction": p["instruction"]}
                                                   for i, p in enumerate(PAIRS * 4)])
    generate = [sys.executable, os.path.join(ROOT, "train_sft.py"), "generate", "--model", str(reference), "--input",
                questions, "--batch_size", "2", "--max_length", "8"]
    whole = tmp_path / "whole.jsonl"
    assert subprocess.run(generate + ["--output", str(whole)], env=env, capture_output=True).returncode == 0
    partial = tmp_path / "partial.jsonl"
    for _ in range(3):
        process = subprocess.Popen(generate + ["--output", str(partial)], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.0, 9.0))
        process.kill()
        process.wait()
    assert subprocess.run(generate + ["--output", str(partial)], env=env, capture_output=True).returncode == 0
    assert partial.read_bytes() == whole.read_bytes()


@pytest.mark.slow
def test_sigterm_to_the_launcher_of_two_ranks_ends_with_143_and_one_line(tiny_model_dir, tmp_path):
    """torchrun turns a SIGTERM into its own traceback and exit 1; `train_sft.py launch` ends like a single run."""
    import signal

    data = write_jsonl(tmp_path / "d.jsonl", PAIRS * 20)
    out = tmp_path / "o"
    args = [sys.executable, os.path.join(ROOT, "train_sft.py"), "launch", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "--",
            "--model_name", tiny_model_dir, "--dataset_path", data, "--output_dir", str(out), "--use_lora", "false",
            "--max_steps", "500", "--logging_steps", "1", "--evaluation_strategy", "no", "--validation_split_ratio", "0",
            "--dataloader_pin_memory", "false", "--gradient_checkpointing", "false", "--per_device_train_batch_size", "1"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen, deadline = [], time.time() + 240
    for line in proc.stdout:  # wait until training steps are being logged
        seen.append(line)
        if "'loss'" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=240)
    output = "".join(seen) + rest
    assert proc.returncode == 143, output[-3000:]
    assert "Traceback" not in output
    assert len([line for line in output.splitlines() if line.startswith("interrupted: SIGTERM")]) == 1
    assert persistence.last_complete_checkpoint(str(out)) is not None


@pytest.mark.slow
def test_a_user_error_under_two_ranks_is_printed_once(tiny_model_dir, data, tmp_path):

    args = [sys.executable, os.path.join(ROOT, "train_sft.py"), "launch", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "--", "--model_name", tiny_model_dir, "--dataset_path", data, "--output_dir",
            str(tmp_path / "o"), "--resume_from_checkpoint", "last"]  # nothing to resume: a user error on every rank
    result = subprocess.run(args, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert [line for line in output.splitlines() if line.startswith("error:")] == [
        f"error: resume_from_checkpoint='last' found no checkpoint to resume from: {tmp_path / 'o'} has no complete "
        "checkpoint-* directory"]
    assert "Traceback" not in output


def test_an_ended_process_not_yet_waited_for_holds_no_lock(tmp_path):
    """A run killed together with its launcher stays a zombie until init reaps it: its pid exists, but it runs no
    more, so its lock is stale (a resume right after the kill was refused as 'in use by another run')."""
    from src.distributed import pid_alive, proc_stat_fields

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while proc_stat_fields(child.pid)[0] != "Z" and time.time() < deadline:  # ended, not waited for: a zombie
        time.sleep(0.05)
    assert not pid_alive(child.pid)
    child.wait()
    assert not pid_alive(child.pid)
    assert pid_alive(os.getpid())
