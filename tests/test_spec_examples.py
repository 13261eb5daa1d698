"""Every Python example of the specification, run as written.

The code blocks are read from ``../shared/seed/SFTTrainer-API.md`` and executed in document order in
one namespace (like a notebook), in a scratch directory where ``data/`` is the shipped sample set.
The only substitutions: the tiny local model stands in for ``Qwen/Qwen2.5-7B``, the shipped data file
for data files the project does not ship, and ``report_to="none"`` for ``"wandb"`` when wandb is not
installed. Three blocks describe internals rather than usage and reference objects they do not define
(``sft_trainer``, ``training_args``, ``model``/``inputs``); the test defines those objects first, and
checks the loss block's result against ``SFTTrainer.compute_loss``.
"""

import importlib.util
import os
import re
import shutil

import pytest
import torch

from tests.helpers import ROOT, need_shared

pytestmark = pytest.mark.slow  # subprocesses / long runs: `pytest -m "not slow"` skips them

SPEC = os.path.join(ROOT, "..", "shared", "seed", "SFTTrainer-API.md")


def spec_blocks():
    with open(SPEC, encoding="utf-8") as fh:
        return re.findall(r"```python\n(.*?)```", fh.read(), flags=re.S)


@pytest.fixture(scope="module")
def shipped_tiny_model(tmp_path_factory):
    from src.models.tiny import build_tiny_qwen2, corpus_texts

    path = str(tmp_path_factory.mktemp("spec_model"))
    build_tiny_qwen2(corpus_texts(os.path.join(ROOT, "data", "arabic_instructions.jsonl")), path, vocab_size=2000,
                     hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1)
    return path


def substitute(code: str, model_dir: str) -> str:
    code = code.replace('"Qwen/Qwen2.5-7B"', repr(model_dir))
    for missing in ("data/sft_arabic.jsonl", "data/large_arabic_dataset.jsonl"):
        code = code.replace(missing, "data/arabic_instructions.jsonl")
    if importlib.util.find_spec("wandb") is None:
        code = code.replace('report_to="wandb"', 'report_to="none"')
    return code


def test_every_specification_example_runs(shipped_tiny_model, tmp_path, monkeypatch):
    need_shared(SPEC, f"specification at {os.path.normpath(SPEC)}")
    os.symlink(os.path.join(ROOT, "data"), tmp_path / "data")
    shutil.copytree(os.path.join(ROOT, "configs"), tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    blocks = spec_blocks()
    assert len(blocks) >= 20
    from src.training.sft_trainer import SFTTrainer

    ns: dict = {}
    ran = 0
    sft = None  # the latest SFTTrainer the examples made (the internal create_trainer example rebinds `trainer`)
    for block in blocks:
        code = substitute(block, shipped_tiny_model)
        if code.lstrip().startswith(("class SFTTrainer(BaseTrainer)", "def ")):
            continue  # signatures and the class header, not runnable examples
        internal = False
        if "sft_trainer.create_trainer(dataset, training_args, callbacks)" in code:
            internal = True
            ns.update(sft_trainer=SFTTrainer(sft.config), dataset=sft.load_dataset(),
                      training_args=sft.get_training_arguments(), callbacks=[])
        if code.lstrip().startswith("# Enable gradient checkpointing for memory efficiency\ntraining_args"):
            ns.update(training_args=sft.get_training_arguments(), config=sft.config)
        if "shift_logits = logits[..., :-1, :]" in code:
            batch = next(iter(sft.prepare().get_train_dataloader()))
            ns.update(model=sft.model, inputs=batch, labels=batch["labels"], CrossEntropyLoss=torch.nn.CrossEntropyLoss)
            code = code.replace("outputs = model(**inputs)",
                                "outputs = model(**{k: v for k, v in inputs.items() if k != 'labels'})")
        exec(compile(code, "<spec>", "exec"), ns)
        ran += 1
        if "shift_logits = logits[..., :-1, :]" in code:
            assert ns["loss"].item() == pytest.approx(sft.compute_loss(sft.model, batch).item(), rel=1e-5)
        if internal:
            assert isinstance(ns["trainer"], __import__("transformers").Trainer)
            ns["trainer"] = sft
        if isinstance(ns.get("trainer"), SFTTrainer):
            sft = ns["trainer"]
    assert ran >= 18
    # The custom-processing example defines a subclass; train it too.
    custom_cls = ns["CustomSFTTrainer"]
    config = ns["SFTConfig"](model_name=shipped_tiny_model, dataset_path="data/arabic_instructions.jsonl",
                             output_dir="./checkpoints/custom", max_steps=2, use_lora=False)
    custom = custom_cls(config)
    custom.train()
    assert custom.dataset["train"].column_names == ["text"]  # the user's formatting ran
    report = custom.tokenize_report
    # "### Response:\n" is not in the custom text, so every token but each example's first is trained
    assert report.trained_tokens["train"] == report.total_tokens["train"] - report.examples["train"]
    assert os.path.isfile("checkpoints/custom/sft_metadata.json")
    # The spec's examples left these behind:
    for path in ("checkpoints/sft_arabic/sft_metadata.json", "checkpoints/sft_advanced/sft_metadata.json",
                 "models/arabic_sft_v1/sft_metadata.json"):
        assert os.path.isfile(path), path
    assert isinstance(ns["responses"], list) and len(ns["responses"]) == 3
