"""Shared fixtures: a tiny locally built tokenizer and Qwen2 model, the real Qwen2.5 tokenizer when present."""

from __future__ import annotations

import gc
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.helpers import CORPUS, PAIRS, QWEN_TOKENIZER_DIR, need_shared, write_jsonl  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One CPU thread count for the whole session and every process it starts. Training otherwise picks it from the
# machine's load at that moment (src.distributed.configure_cpu_threads), so two runs a test compares numerically
# (resumed vs uninterrupted, one process vs another) could run with different counts, hence different float
# reduction orders. The plan keeps an OMP_NUM_THREADS it is given; a user's own setting wins here too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The tokenized-data cache of every run in this session (and its subprocesses) lives in one fresh folder.
if "ARABIC_QWEN_SFT_CACHE" not in os.environ:
    import tempfile

    os.environ["ARABIC_QWEN_SFT_CACHE"] = tempfile.mkdtemp(prefix="sft-test-cache-")


def pytest_collection_modifyitems(config, items):
    """Modules holding slow tests first, in their collected order, the rest after: scripts/test.sh runs the tests on
    several workers a module at a time (pytest-xdist's loadscope, in this order), and long modules started last would
    leave the other workers idle at the end."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)


def pytest_collection_finish(session):
    """Freeze what the imports built (gc.freeze): every training run ends in accelerate's free_memory, a full
    gc.collect that otherwise walks those ~450,000 objects again (about 1.5 s a run, over 100 runs in-process)."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="module", autouse=True)
def _freeze_long_lived_objects():
    """The same for what earlier modules imported lazily (lm_eval, peft, deepspeed...): collected, then frozen."""
    gc.collect()
    gc.freeze()
    yield


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from src.models.tiny import train_bpe_tokenizer

    return train_bpe_tokenizer(CORPUS, vocab_size=600)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random-init Qwen2 model + tokenizer directory (float32, 2 layers)."""
    from src.models.tiny import build_tiny_qwen2

    path = str(tmp_path_factory.mktemp("tiny_qwen2"))
    build_tiny_qwen2(CORPUS, path, vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, seed=0)
    return path


# Test sizes of every family (src.models.tiny.TINY_FAMILIES): the hybrid ones keep 3 linear-attention layers and a
# full-attention one, the MoE ones 4 experts (2 per token).
FAMILY_TEST_DIMS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
FAMILY_EXTRA_DIMS = {"qwen2": dict(num_hidden_layers=2), "qwen3": dict(num_hidden_layers=2, head_dim=16),
                     "qwen3-moe": dict(num_hidden_layers=2, head_dim=16, moe_intermediate_size=32),
                     "qwen3.5": dict(num_hidden_layers=4, head_dim=16),
                     "qwen3.5-moe": dict(num_hidden_layers=4, head_dim=16, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=32)}


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory):
    """``tiny_family_dir(family)``: a saved tiny random-init model of that Qwen family (built once per session)."""
    from src.models.tiny import build_tiny_model, train_bpe_tokenizer

    built: dict[str, str] = {}
    tokenizer = train_bpe_tokenizer(CORPUS, vocab_size=600)

    def get(family: str) -> str:
        if family not in built:
            path = str(tmp_path_factory.mktemp(f"tiny_{family}"))
            dims = {**FAMILY_TEST_DIMS, **FAMILY_EXTRA_DIMS[family]}
            if family == "qwen3.5-moe":
                dims.pop("intermediate_size")
            build_tiny_model(family, output_dir=path, tokenizer=tokenizer, seed=0, **dims)
            built[family] = path
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_full_run(tiny_model_dir, tmp_path_factory):
    """A saved one-step full fine-tuning run of the tiny model on PAIRS, trained once per session: for tests that only
    read a finished run (copy it before changing it)."""
    from src.training.sft_trainer import SFTTrainer
    from tests.helpers import make_config

    folder = tmp_path_factory.mktemp("tiny_full_run")
    out = folder / "run"
    SFTTrainer(make_config(tiny_model_dir, write_jsonl(folder / "pairs.jsonl", PAIRS), out, max_steps=1)).train()
    return out


@pytest.fixture(scope="session")
def qwen_tokenizer():
    need_shared(os.path.join(QWEN_TOKENIZER_DIR, "vocab.json"),
                f"real Qwen2.5 tokenizer at {os.path.normpath(QWEN_TOKENIZER_DIR)}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN_TOKENIZER_DIR)


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
