"""Sharded and multi-node training run by the engines users run, proven by running (CPU, gloo).

Each engine trains the tiny model for three AdamW steps with 2 ranks x batch 2 and is compared with one
process x batch 4 (same global batch): the per-step losses, the evaluation (every validation row counted
once), the saved files and the saved weights must be the same. DeepSpeed ZeRO-2 and ZeRO-3 run on CPUs
(DeepSpeed's CPU accelerator, gloo); FSDP does not (accelerate selects FSDP for accelerator devices only),
so an FSDP run on CPUs is refused with the reason, and ``tests/distributed/sharded_run.py fsdp2`` runs the same
comparison on GPUs (see README, "Training at scale").
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import PAIRS, ROOT, free_port, make_config, run_forked, torchrun, write_jsonl

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="torch.distributed with the gloo backend is not available"),
]

SCRIPT = os.path.join(ROOT, "tests", "distributed", "sharded_run.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def deepspeed_missing() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # not installed, or installed without what it needs to import
        return True
    return False


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded_data")
    # different lengths: the two ranks hold different numbers of trained tokens
    rows = [{"instruction": p["instruction"], "response": p["response"] * (1 + 2 * (i % 3))} for i, p in enumerate(PAIRS)]
    return write_jsonl(folder / "train.jsonl", rows), write_jsonl(folder / "eval.jsonl", rows[:5])


def launch(nproc, out, engine, model_dir, data, batch, *overrides):
    """``nproc`` processes (2: ranks) of tests/distributed/sharded_run.py, forked from the pre-imported launcher."""
    train, evaluation = data
    result = run_forked([SCRIPT, engine, model_dir, train, evaluation, str(out), str(batch), *overrides], nproc,
                        env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(os.path.join(out, "result.json")) as fh:
        return json.load(fh), result


# LoRA adapters with gradient checkpointing on packed rows: 4 rows of at most 80 tokens, the whole set each step
LORA = ("use_lora=true", "gradient_checkpointing=true", "packing=true", "lora_dropout=0.0", "max_seq_length=80")


@pytest.fixture(scope="module")
def single(tiny_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    result, _ = launch(1, out, "single", tiny_model_dir, data, 4)
    return out, result


@pytest.fixture(scope="module")
def single_lora(tiny_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single_lora")
    result, _ = launch(1, out, "single", tiny_model_dir, data, 4, *LORA)
    return out, result


def assert_same_run(reference, run):
    (ref_dir, ref), (out, got) = reference, run
    from safetensors.torch import load_file

    assert len(got["losses"]) == len(ref["losses"]) == 3
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert got["eval"]["eval_tokens"] == ref["eval"]["eval_tokens"]  # every validation row once
    assert got["eval"]["eval_loss"] == pytest.approx(ref["eval"]["eval_loss"], rel=1e-5)
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref_dir))
    weights = "model.safetensors" if os.path.isfile(os.path.join(ref_dir, "model.safetensors")) else "adapter_model.safetensors"
    a, b = load_file(os.path.join(ref_dir, weights)), load_file(os.path.join(out, weights))
    assert sorted(a) == sorted(b)  # no tied copy of the embeddings written beside them
    # relative to each tensor's largest value, or below 1e-6 absolute: the keys' bias cancels in the softmax, so its
    # gradient is rounding noise only, which Adam scales up to learning-rate-sized steps (~3e-3 over 3 steps) whose
    # direction differs with the engine's summation order; a real difference is orders of magnitude larger
    worst = max((((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)).item() for k in a
                 if (a[k] - b[k]).abs().max() > 1e-6), default=0.0)
    assert worst < 1e-4
    metadata = json.loads(open(os.path.join(out, "sft_metadata.json"), encoding="utf-8").read())
    return metadata


ENGINE_NAMES = {"zero2": "deepspeed-zero2", "zero3": "deepspeed-zero3", "fsdp2-cpu": "fsdp2"}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-checkpointing-packing"])
@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2-cpu"])
def test_sharded_engines_on_two_cpu_ranks_train_and_save_what_one_process_does(engine, lora, tiny_model_dir, data, single,
                                                                              single_lora, tmp_path):
    """fsdp2-cpu: accelerate's engine choice is forced to FSDP on the CPU ranks (tests/distributed/sharded_run.py); from there on
    it is accelerate's FSDP2 preparation, torch's fully_shard over a CPU mesh, the Trainer and our code."""
    if engine.startswith("zero") and deepspeed_missing():
        pytest.skip("deepspeed is not installed (scripts/test.sh installs it; pip install --no-build-isolation deepspeed)")
    out = tmp_path / engine
    result, _ = launch(2, out, engine, tiny_model_dir, data, 2, *(LORA if lora else ()))
    assert result["engine"] == ENGINE_NAMES[engine]
    metadata = assert_same_run(single_lora if lora else single, (out, result))
    assert metadata["world_size"] == 2 and metadata["engine"] == ENGINE_NAMES[engine]
    # the saved run loads back for generation, like a single-process run's
    from src.training.sft_trainer import SFTTrainer

    restored = SFTTrainer(make_config(tiny_model_dir, None, tmp_path / "unused"))
    restored.load_model(str(out))
    assert restored.model.get_input_embeddings().weight is restored.model.get_output_embeddings().weight or lora


def test_streamed_data_on_two_ranks_is_tokenized_once_and_trains_what_one_process_does(tiny_model_dir, data, single,
                                                                                      tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "streamed"
    result, run = launch(2, out, "ddp", tiny_model_dir, data, 2, "stream_data=true",
                         f"dataset_cache_dir={json.dumps(str(cache))}")
    assert_same_run(single, (out, result))
    entries = [name for name in os.listdir(cache) if not name.startswith(".")]
    assert len(entries) == 2  # train and validation, built by the main process and read by the other rank
    assert (run.stdout + run.stderr).count("streaming and tokenizing") == 1


def test_two_nodes_over_loopback_train_what_one_process_does(tiny_model_dir, data, single, tmp_path):
    """torchrun --nnodes=2 --nproc_per_node=1: two node agents meeting at a c10d rendezvous on 127.0.0.1."""
    port = free_port()
    out = tmp_path / "two_nodes"
    train, evaluation = data
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "sft-test",
            SCRIPT, "ddp", tiny_model_dir, train, evaluation, str(out), "2"]
    agents = [subprocess.Popen(node, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [agent.communicate(timeout=600) for agent in agents]
    for agent, (_, err) in zip(agents, outputs):
        assert agent.returncode == 0, err[-4000:]
    with open(out / "result.json") as fh:
        result = json.load(fh)
    metadata = assert_same_run(single, (out, result))
    assert metadata["world_size"] == 2 and metadata["engine"] == "ddp"


def test_fsdp_on_cpus_is_refused_with_the_reason_before_loading_data(tiny_model_dir, tmp_path):
    from src.training.sft_trainer import SFTTrainer

    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal; on GPUs tests/distributed/sharded_run.py fsdp2 runs FSDP2")
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"instruction": "س"}])  # reading it would fail: no response
    config = make_config(tiny_model_dir, broken, tmp_path / "o", max_steps=1,
                         fsdp_config=os.path.join(ROOT, "configs", "fsdp2.json"))
    with pytest.raises(ValueError, match="accelerate selects FSDP for accelerator devices only"):
        SFTTrainer(config).train()  # refused before the data is read
    assert not os.path.exists(tmp_path / "o" / "model.safetensors")
    with pytest.raises(ValueError, match="SFTConfig.fsdp_config: None when deepspeed is set"):
        make_config(tiny_model_dir, None, tmp_path / "o", fsdp_config=os.path.join(ROOT, "configs", "fsdp2.json"),
                    deepspeed=os.path.join(ROOT, "configs", "deepspeed_zero2.json"))


def test_fsdp2_config_reaches_accelerate_as_fsdp2_of_the_models_decoder_layers(tiny_model_dir, tmp_path):
    """Everything up to the device: the config file becomes accelerate's FSDP2 plugin settings."""
    from src.training.training_args import training_arguments_kwargs

    config = make_config(tiny_model_dir, None, tmp_path / "o", fsdp_config=os.path.join(ROOT, "configs", "fsdp2.json"))
    kwargs = training_arguments_kwargs(config, {})
    assert kwargs["fsdp"] is True and kwargs["fsdp_config"].endswith("fsdp2.json")
    from transformers import TrainingArguments

    args = TrainingArguments(**kwargs)
    assert args.fsdp_config["version"] == 2 and args.fsdp_config["state_dict_type"] == "FULL_STATE_DICT"
    # no layer class named: accelerate wraps the model's own _no_split_modules (Qwen2, Qwen3 ... alike)
    assert args.fsdp_config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "transformer_layer_cls_to_wrap" not in args.fsdp_config


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP runs on GPUs only (accelerate selects it for accelerator "
                                                          "devices); this is the GPU half of the comparison")
def test_fsdp2_on_gpus_trains_what_one_process_does(tiny_model_dir, data, single, tmp_path):
    """The one command on a GPU machine: pytest tests/distributed/test_sharded.py -k fsdp2_on_gpus (2 GPUs shard, 1 still runs FSDP2)."""
    nproc = 2 if torch.cuda.device_count() >= 2 else 1
    out = tmp_path / "fsdp2"
    train, evaluation = data
    cmd = torchrun(nproc) + [SCRIPT, "fsdp2", tiny_model_dir, train, evaluation, str(out), str(4 // nproc)]
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(out / "result.json") as fh:
        got = json.load(fh)
    assert got["engine"] == "fsdp2"
    metadata = assert_same_run(single, (out, got))
    assert metadata["world_size"] == nproc and metadata["engine"] == "fsdp2"


def test_zero2_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(tiny_model_dir, data, tmp_path):
    """SIGKILL to torchrun and its ranks after checkpoint 2 of 16, then --resume_from_checkpoint last."""
    import signal
    import time

    import psutil
    from safetensors.torch import load_file

    from src.training import persistence

    if deepspeed_missing():
        pytest.skip("deepspeed is not installed (scripts/test.sh installs it; pip install --no-build-isolation deepspeed)")
    train, _ = data

    def command(out, *extra):  # train_sft.py and its flags
        return [os.path.join(ROOT, "train_sft.py"), "--model_name", tiny_model_dir, "--dataset_path", train,
                "--output_dir", str(out), "--use_lora", "false", "--max_steps", "16", "--save_steps", "1",
                "--save_total_limit", "None", "--per_device_train_batch_size", "2", "--evaluation_strategy", "no",
                "--validation_split_ratio", "0", "--dataloader_pin_memory", "false", "--gradient_checkpointing", "false",
                "--logging_steps", "1", "--learning_rate", "1e-3", "--deepspeed",
                os.path.join(ROOT, "configs", "deepspeed_zero2.json"), *extra]

    whole = run_forked(command(tmp_path / "whole"), 2, env=ENV, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(torchrun(2) + command(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while persistence.checkpoint_problem(str(out / "checkpoint-2")) is not None and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    # the agent and both ranks (torchrun starts each rank in its own session): no handler runs anywhere
    agent = psutil.Process(proc.pid)
    for process in agent.children(recursive=True) + [agent]:
        process.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out / "model.safetensors")  # it really died before the end
    resumed = run_forked(command(out, "--resume_from_checkpoint", "last"), 2, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6

    def losses(run):
        with open(run / "checkpoint-16" / "trainer_state.json", encoding="utf-8") as fh:
            return [entry["loss"] for entry in json.load(fh)["log_history"] if "loss" in entry]

    assert losses(out) == pytest.approx(losses(tmp_path / "whole"), rel=1e-6)


def test_the_command_line_run_under_zero3_evaluates_trains_and_shows_samples_like_one_process(tiny_model_dir, data,
                                                                                             tmp_path):
    """The CLI evaluates before and after training and generates samples: under ZeRO-3 every forward gathers the
    parameters from all ranks, so the ranks generate in step (the main process alone would wait forever)."""
    import re

    if deepspeed_missing():
        pytest.skip("deepspeed is not installed (scripts/test.sh installs it; pip install --no-build-isolation deepspeed)")
    train, evaluation = data

    def cli(nproc, out, batch, *extra):
        result = run_forked([os.path.join(ROOT, "train_sft.py"), "--model_name", tiny_model_dir,
                                            "--dataset_path", train, "--eval_dataset_path", evaluation, "--output_dir",
                                            str(out), "--use_lora", "false", "--max_steps", "2",
                                            "--per_device_train_batch_size", str(batch), "--dataloader_pin_memory",
                                            "false", "--gradient_checkpointing", "false", "--group_by_length", "false",
                                            *extra], nproc, env=ENV, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        losses = [float(x) for x in re.search(r"Validation loss\s*: ([\d.]+) -> ([\d.]+)", result.stdout).groups()]
        return losses, result.stdout.count("\nQ: ")

    one = cli(1, tmp_path / "one", 4)
    zero3 = cli(2, tmp_path / "zero3", 2, "--deepspeed", os.path.join(ROOT, "configs", "deepspeed_zero3.json"))
    assert zero3[0] == pytest.approx(one[0], abs=2e-4)
    assert zero3[1] == one[1] == 3


@pytest.fixture(scope="module")
def family_single():
    """One-process reference runs of the family tests below, per (family, settings)."""
    return {}


@pytest.mark.parametrize("engine", ["ddp", "zero3"])
@pytest.mark.parametrize("family", ["qwen3.5", "qwen3-moe"])
def test_hybrid_and_moe_families_on_two_ranks_train_what_one_process_does(family, engine, tiny_family_dir, data,
                                                                          family_single, tmp_path_factory, tmp_path):
    """A hybrid linear-attention family (packing asked for: it falls back to unpacked rows on every rank alike) and an
    MoE family (its router loss included). The MoE router loss is a mean over micro-batches and ranks, and it is not
    linear in the rows, so the MoE reference is one process with the same two micro-batches of 2 (gradient
    accumulation) rather than one batch of 4."""
    if engine == "zero3" and deepspeed_missing():
        pytest.skip("deepspeed is not installed (scripts/test.sh installs it; pip install --no-build-isolation deepspeed)")
    model_dir = tiny_family_dir(family)
    settings = ("packing=true",) if family == "qwen3.5" else ()
    reference = ("gradient_accumulation_steps=2",) if family == "qwen3-moe" else ()
    if family not in family_single:
        out = tmp_path_factory.mktemp(f"single_{family}")
        batch = 2 if family == "qwen3-moe" else 4
        family_single[family] = (out, launch(1, out, "single", model_dir, data, batch, *settings, *reference)[0])
    out = tmp_path / engine
    result, _ = launch(2, out, engine, model_dir, data, 2, *settings)
    metadata = assert_same_run(family_single[family], (out, result))
    assert metadata["world_size"] == 2 and metadata["architecture"]["model_type"] in ("qwen3_5_text", "qwen3_moe")
    if family == "qwen3.5":
        assert metadata["packed_layout"]["layout"] == "unpacked-fallback"
