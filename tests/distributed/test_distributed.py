"""Loss exactness across data-parallel ranks: 2 processes x batch 2 == 1 process x batch 4 (CPU, gloo)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import PAIRS, ROOT, run_forked, write_jsonl

pytestmark = pytest.mark.slow  # subprocesses / long runs: `pytest -m "not slow"` skips them

SCRIPT = os.path.join(ROOT, "tests", "distributed", "ddp_one_step.py")


def run(nproc, model_dir, data, out, batch, packing, mode=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = run_forked([SCRIPT, model_dir, data, str(out), str(batch), "1" if packing else "0"] + ([mode] if mode else []),
                        nproc, env=env, timeout=300)
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


def _train_cli(nproc, data, out, batch):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    flags = ["--model_name", "local:tiny-qwen2", "--dataset_path", data, "--output_dir", str(out), "--use_lora", "false",
             "--max_steps", "2", "--per_device_train_batch_size", str(batch), "--optim", "sgd", "--learning_rate", "0.5",
             "--max_grad_norm", "0", "--warmup_ratio", "0", "--lr_scheduler_type", "constant", "--evaluation_strategy",
             "no", "--validation_split_ratio", "0", "--group_by_length", "false", "--gradient_checkpointing", "false",
             "--dataloader_pin_memory", "false", "--logging_steps", "1", "--save_steps", "1", "--max_seq_length", "96"]
    if nproc > 1:
        flags += ["--ddp_backend", "gloo"]
    return run_forked([os.path.join(ROOT, "train_sft.py")] + flags, nproc, env=env, timeout=600)


def _saved_files(out):
    return sorted(f for f in os.listdir(out) if not f.startswith("checkpoint-"))


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """The same command-line run in one process (batch 4) and under torchrun with 2 ranks (batch 2), once each."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    tmp = tmp_path_factory.mktemp("cli_runs")
    data = write_jsonl(tmp / "d.jsonl", PAIRS)
    single = _train_cli(1, data, tmp / "single", 4)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _train_cli(2, data, tmp / "ddp", 2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return tmp / "single", tmp / "ddp", ddp


def test_a_torchrun_run_saves_one_complete_run_like_one_process(cli_runs):
    """Every rank used to save (one run in six exited 1 without model.safetensors): now the main process writes,
    the others wait, and the run leaves the same complete folder as one process, printed once."""
    single, out, result = cli_runs
    expected_files = _saved_files(single)
    assert {"model.safetensors", "sft_metadata.json", "tokenizer.json", "generation_config.json", "README.md",
            "base_model"} <= set(expected_files)
    assert _saved_files(out) == expected_files
    metadata = json.loads((out / "sft_metadata.json").read_text(encoding="utf-8"))
    assert metadata["world_size"] == 2
    assert result.stdout.count("Model saved to") == 1
    assert sorted(os.listdir(out / "base_model")) == sorted(os.listdir(single / "base_model"))


def test_a_torchrun_run_trains_the_weights_of_one_process(cli_runs):
    from safetensors.torch import load_file

    single, out, _ = cli_runs
    expected = load_file(str(single / "model.safetensors"))
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == expected.keys()
    worst = max(((weights[k] - expected[k]).abs().max() / expected[k].abs().max().clamp(min=1e-12)).item()
                for k in expected)
    assert worst < 1e-4


def test_exit_rank_runs_pythons_exit_work_and_keeps_the_exit_code(tmp_path):
    marker = tmp_path / "flushed.txt"
    code = ("import atexit, sys; sys.path.insert(0, %r)\n"
            "from src.distributed import exit_rank\n"
            "atexit.register(lambda: open(%r, 'w').write('done'))\n"
            "print('before exit', flush=False)\n"
            "exit_rank(3)\n"
            "raise SystemExit('not reached')\n") % (ROOT, str(marker))
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "WORLD_SIZE": "2"}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 3 and "before exit" in result.stdout and "not reached" not in result.stderr
    assert marker.read_text() == "done"
    single = subprocess.run([sys.executable, "-c", code], env={**os.environ, "WORLD_SIZE": "1"}, capture_output=True,
                            text=True, timeout=60)
    assert single.returncode == 1 and "not reached" in single.stderr  # one process: a no-op


FROM_MAIN = """
import json, os, sys
sys.path.insert(0, {root!r})
from src.distributed import exit_rank, from_main, rank
from src.training.attention import AttentionChoice
# Each rank measures its own (different) timings; every rank must train with the main process's choice.
mine = AttentionChoice(implementation=["sdpa", "flex_attention"][rank()], step_ms={{"sdpa": 1.0 + rank()}}, measured=True)
shared = from_main(mine)
with open(os.path.join({out!r}, f"rank{{rank()}}.json"), "w") as fh:
    json.dump(shared.as_metadata(), fh)
exit_rank(0)
"""


def run_on_two_ranks(source, tmp_path):
    """Run a script (``source``, formatted with ``root`` and ``out``) on 2 CPU ranks; each rank's ``rank<r>.json``."""
    script = tmp_path / "two_ranks.py"
    script.write_text(source.format(root=ROOT, out=str(tmp_path)), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = run_forked([str(script)], 2, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_every_rank_takes_the_main_process_choice(tmp_path):
    choices = run_on_two_ranks(FROM_MAIN, tmp_path)
    assert choices[0] == choices[1]
    assert choices[1]["implementation"] == "sdpa" and choices[1]["estimated_attention_ms_per_step"] == {"sdpa": 1.0}


@pytest.mark.parametrize("group_by_length", ["true", "false"])
def test_two_ranks_resumed_inside_a_later_epoch_train_as_if_never_stopped(tiny_model_dir, tmp_path, group_by_length):
    """Resuming in the middle of epoch 2 under 2 ranks: the skipped-batch loader used to leave the length-grouped
    sampler at epoch 0's order, and the run diverged from the uninterrupted one at the first resumed step."""
    import json

    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)  # 8 rows, 2 ranks x batch 2: 2 steps per epoch
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}

    def train(out, *extra):
        command = [os.path.join(ROOT, "train_sft.py"), "--model_name", tiny_model_dir, "--dataset_path", data,
                   "--output_dir", str(out), "--use_lora", "false", "--max_steps", "6", "--save_steps", "1",
                   "--save_total_limit", "None", "--per_device_train_batch_size", "2", "--evaluation_strategy", "no",
                   "--validation_split_ratio", "0", "--dataloader_pin_memory", "false", "--gradient_checkpointing",
                   "false", "--logging_steps", "1", "--learning_rate", "1e-3", "--ddp_backend", "gloo", "--group_by_length",
                   group_by_length, *extra]
        result = run_forked(command, 2, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    def losses(out):
        with open(out / "checkpoint-6" / "trainer_state.json", encoding="utf-8") as fh:
            return [entry["loss"] for entry in json.load(fh)["log_history"] if "loss" in entry]

    train(tmp_path / "whole")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", resumed / "checkpoint-3")  # step 1 of epoch 2 done
    train(resumed, "--resume_from_checkpoint", "last")
    assert losses(resumed) == pytest.approx(losses(tmp_path / "whole"), rel=1e-6)
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


MAIN_DECIDES = """
import json, os, sys
sys.path.insert(0, {root!r})
from src.distributed import exit_rank, main_decides, rank
calls = []

def check():  # only the main process runs it; its error must reach every rank
    calls.append(rank())
    raise FileExistsError("the output folder holds someone else's files")

try:
    main_decides(check)
    outcome = None
except Exception as exc:
    outcome = [type(exc).__name__, str(exc)]
with open(os.path.join({out!r}, f"rank{{rank()}}.json"), "w") as fh:
    json.dump({{"outcome": outcome, "ran_check": calls}}, fh)
exit_rank(0)
"""


def test_a_check_only_the_main_process_runs_fails_on_every_rank_alike(tmp_path):
    ranks = run_on_two_ranks(MAIN_DECIDES, tmp_path)
    assert ranks[0]["ran_check"] == [0] and ranks[1]["ran_check"] == []
    assert ranks[0]["outcome"] == ranks[1]["outcome"] == ["FileExistsError", "the output folder holds someone else's files"]
