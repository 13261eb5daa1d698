"""Shared fixtures: a tiny locally built tokenizer and Qwen2 model, the real Qwen2.5 tokenizer when present."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
QWEN_TOKENIZER_DIR = os.path.join(ROOT, "..", "shared", "qwen2.5-tokenizer")
SHIPPED_DATA = os.path.join(ROOT, "data", "arabic_instructions.jsonl")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


@pytest.fixture(scope="session")
def qwen_tokenizer():
    if not os.path.isfile(os.path.join(QWEN_TOKENIZER_DIR, "vocab.json")):
        pytest.skip(f"real Qwen2.5 tokenizer not found at {os.path.normpath(QWEN_TOKENIZER_DIR)} (../shared absent)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN_TOKENIZER_DIR)


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
