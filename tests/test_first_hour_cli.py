"""A practitioner's first hour, command-line side (issue 22): YAML and flag lists, CPU threads, --help, the library's
logging, noise under torchrun, and refusals that happen before anything is built.

Slow tests start a fresh Python process (torchrun, a Python API example, the library's logging on import); the
rest are in-process and fast.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
import typing

import pytest
import torch

import train_sft
from src.cli.args import parse_config, parser_view
from src.config import SFTConfig
from tests.helpers import PAIRS, ROOT, free_port, write_jsonl

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": ""}


def list_fields(cls=SFTConfig) -> set[str]:
    """The fields the command line reads as lists (a structured field such as ``datasets`` is read as JSON text)."""
    hints = typing.get_type_hints(parser_view(cls))
    return {n for n, t in hints.items() if list in (typing.get_origin(t), *(typing.get_origin(a) for a in typing.get_args(t)))}


def write_yaml(path, text: str) -> str:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", PAIRS)


# -- 1. lists in YAML and on the command line ---------------------------------------------------------------------------
# Every list-valued field, with a YAML list for it and what the config must hold. A new list field fails
# test_every_list_field_is_covered until it is added here.
YAML_LISTS = {
    "lora_target_modules": ("[q_proj, k_proj, v_proj, o_proj]", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "modules_to_save": ("[lm_head, embed_tokens]", ["lm_head", "embed_tokens"]),
    "resume_allow_changes": ("[learning_rate, seed]", ["learning_rate", "seed"]),
}
# Text fields that hold a list: a YAML list becomes the text the field documents.
YAML_TEXT_LISTS = {
    "report_to": ("[tensorboard, wandb]", "tensorboard,wandb"),
}


def test_every_list_field_is_covered():
    assert list_fields() == set(YAML_LISTS)


def test_every_list_field_loads_from_a_yaml_list(tmp_path, data):
    body = "".join(f"{name}: {text}\n" for name, (text, _) in {**YAML_LISTS, **YAML_TEXT_LISTS}.items())
    config = parse_config(SFTConfig, ["--config", write_yaml(tmp_path / "c.yaml", f"dataset_path: {data}\n" + body)])
    for name, (_, expected) in {**YAML_LISTS, **YAML_TEXT_LISTS}.items():
        assert getattr(config, name) == expected, name


def test_block_style_yaml_lists_and_a_datasets_mixture(tmp_path, data):
    path = write_yaml(tmp_path / "c.yaml", f"""\
        datasets:
          - {{path: {data}, weight: 0.7}}
          - path: {data}
            weight: 0.3
        lora_target_modules:
          - all-linear
        modules_to_save:
          - lm_head
        """)
    config = parse_config(SFTConfig, ["--config", path])
    assert json.loads(config.datasets) == [{"path": data, "weight": 0.7}, {"path": data, "weight": 0.3}]
    assert config.lora_target_modules == ["all-linear"] and config.modules_to_save == ["lm_head"]


@pytest.mark.parametrize("text, expected", [
    ("[all-linear]", ["all-linear"]),
    ("all-linear", ["all-linear"]),  # one name, as the help documents
    ('"q_proj, v_proj"', ["q_proj", "v_proj"]),  # names separated by commas
])
def test_lora_target_modules_from_yaml(tmp_path, data, text, expected):
    path = write_yaml(tmp_path / "c.yaml", f"dataset_path: {data}\nlora_target_modules: {text}\n")
    assert parse_config(SFTConfig, ["--config", path]).lora_target_modules == expected


@pytest.mark.parametrize("flags, name, expected", [
    (["--lora_target_modules", "q_proj", "v_proj"], "lora_target_modules", ["q_proj", "v_proj"]),
    (["--lora_target_modules", "q_proj,v_proj"], "lora_target_modules", ["q_proj", "v_proj"]),
    (["--lora-target-modules", "all-linear"], "lora_target_modules", ["all-linear"]),
    (["--modules_to_save", "lm_head", "embed_tokens"], "modules_to_save", ["lm_head", "embed_tokens"]),
    (["--modules_to_save", "None"], "modules_to_save", None),
    (["--resume_allow_changes", "learning_rate,seed"], "resume_allow_changes", ["learning_rate", "seed"]),
    (["--report_to", "tensorboard", "wandb"], "report_to", "tensorboard,wandb"),
    (["--report_to", "tensorboard,wandb"], "report_to", "tensorboard,wandb"),
])
def test_list_fields_from_flags_override_the_yaml_list(tmp_path, data, flags, name, expected):
    path = write_yaml(tmp_path / "c.yaml", f"dataset_path: {data}\nlora_target_modules: [k_proj]\n"
                      "modules_to_save: [lm_head]\nresume_allow_changes: [seed]\nreport_to: [none]\n")
    assert getattr(parse_config(SFTConfig, ["--config", path, *flags]), name) == expected


@pytest.mark.parametrize("text, shown", [("[q_proj, 1]", "1 (int)"), ("[yes]", "True (bool)"), ("{a: 1}", "{'a': 1} (dict)")])
def test_a_list_of_something_else_names_the_file_line_and_field(tmp_path, data, text, shown):
    path = write_yaml(tmp_path / "c.yaml", f"dataset_path: {data}\nmodules_to_save: {text}\n")
    with pytest.raises(ValueError) as error:
        parse_config(SFTConfig, ["--config", path])
    assert str(error.value).startswith(f"{path}, line 2: modules_to_save: expected a list of names") and shown in str(error.value)


def test_yaml_list_of_target_modules_trains_from_the_command_line(tmp_path, data, tiny_model_dir):
    """The README's own `lora_target_modules: [all-linear]`, through train_sft.py."""
    out = tmp_path / "out"
    path = write_yaml(tmp_path / "run.yaml", f"""\
        model_name: {tiny_model_dir}
        dataset_path: {data}
        output_dir: {out}
        lora_target_modules: [all-linear]
        validation_split_ratio: 0
        max_seq_length: 64
        gradient_checkpointing: false
        dataloader_pin_memory: false
        report_to: [none]
        """)
    assert train_sft.main(["--config", path, "--max_steps", "1"]) == 0
    adapter = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    adapted = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# -- 4. CPU threads -----------------------------------------------------------------------------------------------------
@pytest.fixture
def plan_env(monkeypatch):
    """cpu_thread_plan on a machine of 8 idle cores, outside any launcher (each test changes what it needs)."""
    import src.distributed as distributed

    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "available_cores", lambda: 8)
    monkeypatch.setattr(distributed, "busy_cores", lambda: 0.0)
    monkeypatch.setattr(distributed.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(distributed, "_STARTED", time.monotonic())  # this run's own share of the load: none yet
    return distributed


def test_cpu_threads_use_the_idle_cores(plan_env):
    assert plan_env.cpu_thread_plan() == (8, "8 cores; OMP_NUM_THREADS overrides")


def test_cpu_threads_leave_cores_busy_with_other_work(plan_env, monkeypatch):
    """The issue's machine: 2 cores, one busy with another program -> 1 thread (training 13x faster than with 2)."""
    monkeypatch.setattr(plan_env, "available_cores", lambda: 2)
    monkeypatch.setattr(plan_env, "busy_cores", lambda: 1.0)
    assert plan_env.cpu_thread_plan() == (1, "2 cores, 1.0 busy now: cores busy with other work left to it; "
                                             "OMP_NUM_THREADS overrides")
    monkeypatch.setattr(plan_env, "busy_cores", lambda: 0.3)  # a little background work: both cores
    assert plan_env.cpu_thread_plan()[0] == 2


def test_busy_cores_are_measured_now():
    """A process spinning on one CPU of this process's set shows as (at least about) one busy core."""
    from src.distributed import busy_cores

    if not os.path.exists("/proc/stat"):
        pytest.skip("needs /proc/stat")
    cpu = sorted(os.sched_getaffinity(0))[0]
    spin = f"import os, time\nos.sched_setaffinity(0, {{{cpu}}})\nend = time.time() + 10\nwhile time.time() < end: pass"
    spinner = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.3)
        busy = busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy >= 0.8


def test_cpu_threads_fall_back_to_the_load_average_less_this_runs_own_part(plan_env, monkeypatch):
    """Without /proc/stat: two ranks that have run for a minute on an otherwise idle 8-core machine keep 4 threads
    each; a load of 2.2 on 2 cores from other programs leaves one."""
    monkeypatch.setattr(plan_env, "busy_cores", lambda: None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(plan_env.os, "getloadavg", lambda: (1.3, 0.5, 0.2))
    monkeypatch.setattr(plan_env, "_STARTED", time.monotonic() - 60)
    assert plan_env.cpu_thread_plan() == (4, "8 cores for 2 processes; OMP_NUM_THREADS overrides")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(plan_env, "available_cores", lambda: 2)
    monkeypatch.setattr(plan_env.os, "getloadavg", lambda: (2.2, 2.0, 1.5))
    monkeypatch.setattr(plan_env, "_STARTED", time.monotonic())
    threads, why = plan_env.cpu_thread_plan()
    assert threads == 1 and "load average 2.2" in why


def test_cpu_threads_leave_the_other_ranks_of_the_run_out_of_the_busy_cores(plan_env, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(plan_env, "busy_cores", lambda: 1.0)  # the other rank, tokenizing
    assert plan_env.cpu_thread_plan() == (4, "8 cores for 2 processes; OMP_NUM_THREADS overrides")


def test_cpu_threads_keep_the_users_omp_num_threads(plan_env, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert plan_env.cpu_thread_plan() == (3, "OMP_NUM_THREADS=3")


def test_cpu_threads_are_shared_among_the_ranks_of_a_machine(plan_env, monkeypatch):
    """Under torchrun: cores / local world size, replacing the OMP_NUM_THREADS=1 that torchrun sets for its workers."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(plan_env, "_set_by_launcher", lambda name: True)
    assert plan_env.cpu_thread_plan()[0] == 4
    monkeypatch.setattr(plan_env, "_set_by_launcher", lambda name: False)  # the user's own OMP_NUM_THREADS=1
    assert plan_env.cpu_thread_plan()[0] == 1


@pytest.mark.slow  # a fresh Python process
def test_omp_num_threads_set_by_the_launcher_is_told_from_the_users():
    """A worker whose parent started without OMP_NUM_THREADS got it from the launcher (torchrun sets 1). The parent
    here is a small launcher process started without it (the test session itself sets OMP_NUM_THREADS)."""
    if not os.path.exists(f"/proc/{os.getpid()}/environ"):
        pytest.skip("needs /proc")
    code = "from src.distributed import _set_by_launcher; print(_set_by_launcher('OMP_NUM_THREADS'))"
    launcher = ("import os, subprocess, sys; env = dict(os.environ, OMP_NUM_THREADS='1'); "
                "sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1]], env=env).returncode)")
    env = {key: value for key, value in ENV.items() if key != "OMP_NUM_THREADS"}
    env.update(TORCHELASTIC_RUN_ID="x", LOCAL_WORLD_SIZE="2")
    result = subprocess.run([sys.executable, "-c", launcher, code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip() == "True", result.stderr
    env.pop("TORCHELASTIC_RUN_ID"), env.pop("LOCAL_WORLD_SIZE")  # not under a launcher: it is the user's
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_training_sets_the_cpu_threads_and_says_so(tmp_path, data, tiny_model_dir, caplog, monkeypatch):
    import src.distributed as distributed

    if torch.cuda.is_available():
        pytest.skip("CPU threads are chosen for CPU training only")
    monkeypatch.setattr(distributed, "_cpu_threads", None)
    monkeypatch.setattr(distributed, "cpu_thread_plan", lambda: (1, "test"))
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO):
            code = train_sft.main(["--model_name", tiny_model_dir, "--dataset_path", data, "--output_dir",
                                   str(tmp_path / "o"), "--max_steps", "1", "--validation_split_ratio", "0",
                                   "--use_lora", "false", "--max_seq_length", "64", "--gradient_checkpointing", "false"])
        assert code == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Training on CPU with")]
    assert lines == ["Training on CPU with 1 thread per process (test)"]


# -- 7. --help ----------------------------------------------------------------------------------------------------------
GROUPS = ["model and data", "optimisation", "LoRA", "evaluation, saving, logging", "distributed", "SFT formatting",
          "Arabic normalization", "generation-based evaluation", "preprocessing"]


def test_every_field_is_in_one_of_the_groups():
    from src.cli.args import field_groups

    groups = field_groups(SFTConfig)
    assert list(groups) == [f for f in SFTConfig.__dataclass_fields__]
    assert list(dict.fromkeys(groups.values())) == GROUPS
    assert groups["lora_target_modules"] == "LoRA" and groups["resume_from_checkpoint"] == "evaluation, saving, logging"
    assert groups["packing"] == "SFT formatting" and groups["arabic_digits"] == "Arabic normalization"


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["train", "--help"]])
def test_help_shows_the_commands_first_then_the_fields_in_groups(argv, capsys):
    from src.cli.main import COMMANDS

    assert train_sft.main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    first_field = next(i for i, line in enumerate(lines) if line.strip().startswith("--model_name"))
    for name in COMMANDS:
        assert any(re.match(rf"  {name}\s+\S", line) for line in lines[:first_field]), name
    titles = [line[:-1] for line in lines if line.endswith(":") and not line.startswith(" ")]
    assert titles[titles.index("model and data"):] == GROUPS
    for name in SFTConfig.__dataclass_fields__:  # each field once, in its underscore spelling only
        assert sum(line.startswith(f"  --{name} ") or line == f"  --{name}" for line in lines) == 1, name
        assert "_" not in name or not any(line.strip().startswith(f"--{name.replace('_', '-')}") for line in lines)
    (negated,) = [i for i, line in enumerate(lines) if line.strip().startswith("--no_gradient_checkpointing")]
    text = " ".join(lines[negated:negated + 2])
    assert "Turn gradient_checkpointing off" in text and "Recompute" not in text and "(default: False)" not in text


# -- 8. the library's logging and the deprecation warning it caused -----------------------------------------------------
def run_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow  # a fresh Python process
def test_library_logs_info_lines_when_the_application_configures_no_logging():
    result = run_python("""\
        import logging
        import src.distributed
        logging.getLogger("src.data.loading").info("hello")
        logging.getLogger("other").warning("not ours")
        """)
    assert result.stderr.splitlines() == ["INFO src.data.loading: hello", "not ours"], result.stderr


@pytest.mark.slow  # a fresh Python process
def test_library_logging_gives_way_to_the_applications_own():
    """An application's handler gets each line once, in its own format; the root logger is never configured by us."""
    result = run_python("""\
        import logging, sys
        import src.distributed
        assert logging.getLogger().handlers == []
        logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="APP %(name)s %(message)s")
        logging.getLogger("src.training.sft_trainer").info("info line")
        logging.getLogger("src").setLevel(logging.WARNING)
        logging.getLogger("src.training.sft_trainer").info("now quiet")
        logging.getLogger("src.training.sft_trainer").warning("warned")
        """)
    assert result.stdout.splitlines() == ["APP src.training.sft_trainer info line", "APP src.training.sft_trainer warned"]
    assert result.stderr == "", result.stderr


@pytest.mark.slow  # a fresh Python process
def test_lora_wrapping_raises_no_deprecation_warning():
    """peft asks the model for transformers' deprecated is_gradient_checkpointing whenever we wrap it in adapters."""
    result = run_python("""\
        import warnings
        warnings.simplefilter("default")
        import src.distributed
        from transformers import Qwen2Config, Qwen2ForCausalLM
        from src.models.loading import apply_lora
        config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
        apply_lora(Qwen2ForCausalLM(config), 4, 8, 0.0, ["q_proj"], False)
        print("wrapped")
        """)
    assert result.stdout.strip() == "wrapped", result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_python_api_example_logs_and_warns_nothing_spurious(tmp_path, data, tiny_model_dir):
    """The README's "Using it" example on the tiny model: the library's INFO lines, no deprecation warning, no
    DeepSpeed accelerator warning."""
    rows = write_jsonl(tmp_path / "rows.jsonl", PAIRS * 4)
    result = run_python(f"""\
        from src.config import SFTConfig
        from src.training.sft_trainer import create_sft_trainer

        config = SFTConfig(model_name={tiny_model_dir!r}, dataset_path={rows!r}, output_dir={str(tmp_path / 'o')!r},
                           instruction_template="chatml", max_seq_length=64, packing=True, max_steps=1,
                           per_device_train_batch_size=2, dataloader_pin_memory=False)
        trainer = create_sft_trainer(config)
        trainer.train()
        print(trainer.evaluate_model()["eval_perplexity"])
        """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "INFO src.data.loading: Loaded data" in result.stderr and "INFO src.training.persistence: Saved" in result.stderr
    assert "FutureWarning" not in result.stderr and "Setting accelerator to CPU" not in result.stderr + result.stdout


# -- 10. noise: DeepSpeed, DDP, every rank, lm-eval ---------------------------------------------------------------------
@pytest.mark.slow  # a fresh Python process
def test_deepspeed_says_nothing_about_its_cpu_accelerator():
    pytest.importorskip("deepspeed")
    if torch.cuda.is_available():
        pytest.skip("the warning is DeepSpeed's on machines without a GPU")
    result = run_python("""\
        import src.distributed
        from deepspeed.accelerator import get_accelerator
        print(get_accelerator()._name)
        """)
    assert result.stdout.strip() == "cpu", result.stderr[-3000:]
    assert "Setting accelerator" not in result.stdout + result.stderr


def test_ddp_does_not_search_for_unused_parameters_unless_asked(tmp_path, data):
    from src.training.training_args import training_arguments_kwargs

    def kwargs(**overrides):
        return training_arguments_kwargs(SFTConfig(dataset_path=data, output_dir=str(tmp_path), **overrides))

    assert kwargs()["ddp_find_unused_parameters"] is False
    assert kwargs(ddp_find_unused_parameters=True)["ddp_find_unused_parameters"] is True


@pytest.mark.slow
def test_two_ranks_print_each_warning_once_and_no_library_noise(tmp_path, data, tiny_family_dir):
    """torchrun, 2 CPU ranks, an MoE model with LoRA on every linear layer and its experts: the run succeeds without
    DDP's unused-parameter search (every parameter gets its gradient), and prints each warning once."""
    rows = write_jsonl(tmp_path / "rows.jsonl", PAIRS * 3)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               os.path.join(ROOT, "train_sft.py"), "--model_name", tiny_family_dir("qwen3-moe"), "--dataset_path", rows,
               "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
               "--lora_target_modules", "all-linear", "--lora_dropout", "0", "--max_seq_length", "24", "--validation_split_ratio", "0.2",
               "--evaluation_strategy", "no", "--gradient_checkpointing", "false", "--logging_steps", "1",
               "--dataloader_pin_memory", "false"]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert (out / "adapter_config.json").is_file()
    for noise in ("find_unused_parameters=True was specified", "Setting accelerator to CPU", "FutureWarning",
                  "is_gradient_checkpointing"):
        assert noise not in output, noise
    ours = [line for line in output.splitlines() if line.startswith("WARNING src.")]
    assert ours and len(ours) == len(set(ours)), ours  # the truncation warning, once
    assert output.count("Loading weights: 100%") == 1  # rank 0's progress bar only
    assert sum("Training on CPU with" in line for line in output.splitlines()) == 1


def test_lm_eval_is_not_told_to_warn_about_the_model_object(tmp_path, data, tiny_model_dir, caplog):
    """We hand lm-evaluation-harness the loaded model object on purpose (offline, the merged run as trained); its
    warning that a non-text `pretrained` ignores other arguments does not apply to how we call it."""
    pytest.importorskip("lm_eval")
    from src.training.benchmark import run_benchmarks
    from src.training.sft_trainer import SFTTrainer

    trainer = SFTTrainer(SFTConfig(model_name=tiny_model_dir, dataset_path=data, output_dir=str(tmp_path / "o"),
                                   use_lora=False, max_seq_length=64))
    trainer.setup_model()
    with caplog.at_level(logging.INFO):
        scores = run_benchmarks(trainer, ["arabic_mc_sft"], batch_size=8, limit=2)
    assert "acc" in scores["arabic_mc_sft"]
    assert "model kwarg is not of type" not in caplog.text


# -- 12. refusals before anything is built ------------------------------------------------------------------------------
def test_qlora_without_a_gpu_is_refused_before_the_tiny_base_is_built(tmp_path, data, capsys):
    if torch.cuda.is_available():
        pytest.skip("refusal without a GPU")
    out = tmp_path / "out"
    code = train_sft.main(["--model_name", "local:tiny-qwen2", "--dataset_path", data, "--output_dir", str(out),
                           "--load_in_4bit"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: SFTConfig.load_in_4bit=True needs a CUDA GPU")
    assert not (out / "base_model").exists() and (not out.exists() or not any(out.iterdir()))


def test_fsdp_on_cpus_is_one_line_and_exit_2(tmp_path, data, capsys):
    if torch.cuda.is_available():
        pytest.skip("refusal without a GPU")
    code = train_sft.main(["--model_name", "local:tiny-qwen2", "--dataset_path", data, "--output_dir",
                           str(tmp_path / "out"), "--fsdp_config", os.path.join(ROOT, "configs", "fsdp2.json")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error:")]) == 1
    assert err[-1].startswith("error: SFTConfig.fsdp_config=") and "no GPU here" in err[-1]
    assert not (tmp_path / "out").exists()


def test_readme_launches_fsdp_through_a_launcher_that_ends_in_one_line():
    """`accelerate launch` turns any failure of its child, the one-line refusal included, into its own traceback and
    exit 1; `train_sft.py launch` (torchrun) ends as the run ends: one line, exit 2."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        commands = [line for line in fh if "--fsdp_config" in line and "train_sft.py" in line]
    assert commands and not any(line.lstrip().startswith("accelerate launch") for line in commands), commands


@pytest.mark.slow
def test_fsdp_refusal_under_launch_is_one_line_and_exit_2(tmp_path, data):
    if torch.cuda.is_available():
        pytest.skip("refusal without a GPU")
    command = [sys.executable, os.path.join(ROOT, "train_sft.py"), "launch", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "--", "--model_name", "local:tiny-qwen2", "--dataset_path", data, "--output_dir",
               str(tmp_path / "out"), "--fsdp_config", os.path.join(ROOT, "configs", "fsdp2.json")]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no GPU here" in errors[0] and "Traceback" not in result.stderr

