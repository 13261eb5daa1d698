"""``train_sft.py chat``: prompts formatted as in training, streamed answers, commands, pipes and terminals."""

import os
import select
import subprocess
import sys
import time

import pytest

from src.data.templates import get_prompt_format
from src.data.tokenization import IGNORE_INDEX, ExampleTokenizer
from src.training.chat import ChatSession
from src.training.sft_trainer import SFTTrainer
from tests.helpers import PAIRS, ROOT, make_config, write_jsonl


def test_conversation_prompts_are_the_training_ids_before_each_answer(tiny_tokenizer):
    et = ExampleTokenizer(tiny_tokenizer, get_prompt_format("chatml"), 512)
    messages = [{"role": "system", "content": "أجب باختصار."},
                {"role": "user", "content": PAIRS[0]["instruction"]}, {"role": "assistant", "content": PAIRS[0]["response"]},
                {"role": "user", "content": PAIRS[1]["instruction"]}, {"role": "assistant", "content": PAIRS[1]["response"]}]
    ids, labels, _ = et.tokenize_batch([{"messages": messages}])[0]
    starts = [i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX]
    assert len(starts) == 2
    assert et.encode_conversation_prompt(messages[:2]) == ids[:starts[0]]
    assert et.encode_conversation_prompt(messages[:4]) == ids[:starts[1]]


@pytest.fixture(scope="module")
def chat_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    data = write_jsonl(tmp / "d.jsonl", PAIRS[:2])
    out = tmp / "run"
    trainer = SFTTrainer(make_config(tiny_model_dir, data, out, max_steps=60, per_device_train_batch_size=2,
                                     instruction_template="chatml"))
    trainer.train()
    return trainer, out


def test_session_answers_like_generate_response_and_keeps_history(chat_run):
    import io

    trainer, _ = chat_run
    session = ChatSession(trainer, max_length=16)
    streamed = io.StringIO()
    first = session.reply(PAIRS[0]["instruction"], out=streamed)
    assert first == trainer.generate_response(PAIRS[0]["instruction"], max_length=16)
    assert streamed.getvalue().strip() == first  # what was streamed is the answer
    session.reply(PAIRS[1]["instruction"])
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    session.reset()
    assert session.messages == [] and session.reply(PAIRS[0]["instruction"]) == first


@pytest.mark.slow
def test_piped_input_with_commands(chat_run):
    trainer, run_dir = chat_run
    expected = trainer.generate_response(PAIRS[0]["instruction"], max_length=16)
    script = f"{PAIRS[0]['instruction']}\n/reset\n/system أنت مساعد مفيد.\n/bogus\n{PAIRS[1]['instruction']}\n/exit\nnever read\n"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_sft.py"), "chat", "--model", str(run_dir),
                             "--max_length", "16"], input=script, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"> {PAIRS[0]['instruction']}" and lines[1] == expected
    assert "(new conversation)" in lines and any(line.startswith("(system prompt set") for line in lines)
    assert any(line.startswith("unknown command /bogus") for line in lines)
    assert f"> {PAIRS[1]['instruction']}" in lines and "never read" not in result.stdout


@pytest.mark.slow
def test_a_terminal_session_streams_arabic_and_exits(chat_run):
    trainer, run_dir = chat_run
    expected = trainer.generate_response(PAIRS[0]["instruction"], max_length=16)
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_sft.py"), "chat", "--model", str(run_dir),
                             "--max_length", "16"], stdin=slave, stdout=slave, stderr=subprocess.DEVNULL,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, close_fds=True)
    os.close(slave)
    seen = b""

    def read_until(marker, timeout=240, after=0):
        nonlocal seen
        deadline = time.time() + timeout
        while marker not in seen[after:] and time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
        return marker in seen[after:]

    assert read_until(b"commands: /reset")  # the interactive greeting
    assert read_until(b"> ")
    before = len(seen)
    os.write(master, (PAIRS[0]["instruction"] + "\n").encode("utf-8"))
    assert read_until(b"\n> ", timeout=120, after=before + 2)  # the answer was written, then a new prompt
    os.write(master, b"/exit\n")
    assert proc.wait(timeout=60) == 0
    os.close(master)
    text = seen.decode("utf-8", errors="replace")
    assert PAIRS[0]["instruction"] in text  # Arabic echoed and shown intact
    assert expected and expected in text.replace("\r", "")  # the streamed answer
