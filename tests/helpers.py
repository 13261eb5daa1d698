"""Shared test constants and helpers (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import socket
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
QWEN_TOKENIZER_DIR = os.path.join(ROOT, "..", "shared", "qwen2.5-tokenizer")
SHIPPED_DATA = os.path.join(ROOT, "data", "arabic_instructions.jsonl")

# Small memorisable pairs (Arabic, some diacritics, some English) used across tests.
PAIRS = [
    {"instruction": "ما عاصمة مصر؟", "response": "عاصمة مصر هي القاهرة."},
    {"instruction": "ترجم إلى الإنجليزية: صباح الخير", "response": "Good morning"},
    {"instruction": "اكتب بيتًا عن البحر", "response": "البَحْرُ أزرقُ واسعٌ\nوالموجُ يغني للسماء"},
    {"instruction": "كم يساوي ٣ + ٤؟", "response": "٣ + ٤ = ٧"},
    {"instruction": "شو أحسن أكلة بالشام؟", "response": "الكبة والتبولة أكيد!"},
    {"instruction": "ما هو الذكاء الاصطناعي؟", "response": "الذكاء الاصطناعي فرع من علوم الحاسوب يبني أنظمة تتعلم."},
    {"instruction": "صنّف المشاعر: الخدمة كانت ممتازة", "response": "إيجابي"},
    {"instruction": "What is Python?", "response": "Python لغة برمجة سهلة ومشهورة."},
]

CORPUS = [p["instruction"] for p in PAIRS] + [p["response"] for p in PAIRS] + [
    "### Instruction:\n", "### Response:\n", "user\n", "assistant\n", "system\n",
    "السؤال: ", "الجواب: ", "User: ", "Assistant: ",
    "في فصل الربيع تتفتح الأزهار وتغرد الطيور في كل مكان.",
    "التعلم الآلي يساعد الحواسيب على التعلم من البيانات.",
]


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)




def need_shared(path: str, what: str = "") -> None:
    """Skip the test when ``path`` (a file from ../shared) is absent; with REQUIRE_SHARED=1 (set by .ci/run, where
    ../shared is always laid) fail instead, so that a broken setup cannot pass as skipped tests."""
    if os.path.exists(path):
        return
    import pytest

    message = f"{what or os.path.normpath(path)} not found (../shared absent)"
    if os.environ.get("REQUIRE_SHARED") == "1":
        pytest.fail(f"{message}; REQUIRE_SHARED=1 requires it", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (torchrun's --master_port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """The command that launches a script under torchrun with ``nproc`` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port())]


def make_config(model_dir, data_path, out, **overrides):
    """A small, fast SFTConfig for the tiny model (full fine-tuning, no evaluation, constant LR)."""
    from src.config import SFTConfig

    values = dict(
        model_name=model_dir, dataset_path=data_path, output_dir=str(out), use_lora=False, learning_rate=3e-3,
        num_train_epochs=1, per_device_train_batch_size=2, max_seq_length=96, warmup_ratio=0.0,
        evaluation_strategy="no", logging_steps=50, save_steps=10_000, gradient_checkpointing=False,
        validation_split_ratio=0.0, lr_scheduler_type="constant", dataloader_pin_memory=False,
    )
    values.update(overrides)
    return SFTConfig(**values)


def one_sgd_step(model_dir, data, out, batch, accumulation, packing, trainer_cls=None, max_seq_length=96, **overrides):
    """The parameter update of one SGD step (lr 1, no clipping): equal updates mean equal gradients."""
    from src.training.sft_trainer import SFTTrainer

    config = make_config(model_dir, data, out, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                         max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=0.0, packing=packing,
                         group_by_length=False, max_seq_length=max_seq_length, seed=0, **overrides)
    trainer = (trainer_cls or SFTTrainer)(config)
    trainer.prepare()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return {n: (p.detach() - before[n]) for n, p in trainer.model.named_parameters()}


def max_rel_diff(a, b):
    """Largest difference between same-named tensors, relative to the largest magnitude of ``b``'s tensor."""
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp(min=1e-12)).item() for n in a)


def load_tiny(model_dir, lora=False):
    """The tiny model (float32, SDPA, train mode) and its tokenizer; with ``lora``, rank-4 adapters on q/v."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    model.train()
    return model, tokenizer


def step_counting_trainer(steps: list):
    """An SFTTrainer class that appends every optimizer step it runs (``state.global_step``) to ``steps``."""
    from transformers import TrainerCallback

    from src.training.sft_trainer import SFTTrainer

    class CountSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    class Counting(SFTTrainer):
        def get_callbacks(self):
            return super().get_callbacks() + [CountSteps()]

    return Counting


class _ForkingLauncher:
    """The client of tests/distributed/forking_launcher.py: one launcher process per test process, started on first
    use and stopped at exit."""

    process = None

    @classmethod
    def stop(cls):
        """End the launcher and wait for it (so that its CPU time counts in this process's children's)."""
        if cls.process is not None and cls.process.poll() is None:
            cls.process.stdin.close()
            cls.process.wait(timeout=60)

    @classmethod
    def run(cls, argv, nproc, env, cwd, timeout):
        import subprocess
        import tempfile
        import threading

        if cls.process is None or cls.process.poll() is not None:
            import atexit

            script = os.path.join(ROOT, "tests", "distributed", "forking_launcher.py")
            cls.process = subprocess.Popen([sys.executable, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           cwd=ROOT, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
            atexit.register(cls.stop)
        with tempfile.TemporaryDirectory(prefix="forked-run-") as logs:
            request = {"argv": [str(a) for a in argv], "env": dict(env), "cwd": str(cwd), "nproc": nproc,
                       "logs": logs, "port": free_port()}
            cls.process.stdin.write(json.dumps(request) + "\n")
            cls.process.stdin.flush()
            pids = json.loads(cls.process.stdout.readline())["pids"]
            expired = []

            def kill():
                expired.append(True)
                for pid in pids:
                    try:
                        os.kill(pid, 9)
                    except ProcessLookupError:
                        pass

            timer = threading.Timer(timeout, kill)
            timer.start()
            codes = json.loads(cls.process.stdout.readline())["returncodes"]
            timer.cancel()
            if expired:
                raise subprocess.TimeoutExpired(argv, timeout)

            def read(name):
                return "".join(open(os.path.join(logs, f"{name}.{rank}"), encoding="utf-8", errors="replace").read()
                               for rank in range(nproc))

            return subprocess.CompletedProcess(argv, next((c for c in codes if c), 0), read("stdout"), read("stderr"))


def run_forked(argv, nproc: int = 1, env=None, cwd=ROOT, timeout: float = 600):
    """Run ``python argv...`` as ``nproc`` processes (2: ranks, as torchrun starts them) forked from a pre-imported
    launcher instead of fresh interpreters: a ``subprocess.CompletedProcess`` with the ranks' stdout and stderr one
    after the other and the first failing rank's exit code. For tests of what the processes compute; what a fresh
    interpreter or torchrun itself does is tested with real ones (see tests/distributed/forking_launcher.py)."""
    return _ForkingLauncher.run(argv, nproc, os.environ if env is None else env, cwd, timeout)
