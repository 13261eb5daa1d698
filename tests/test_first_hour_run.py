"""A practitioner's first hour (issue 22): TensorBoard events under output_dir when evaluating before training, the
tiny model with a real tokenizer, no false missing-key warning for a tied LM head, early stopping and NEFTune that say
what they do, over-long rows counted by reason, a model card fit for the Hub, short summary previews, the step-0
validation loss in the plot."""

import glob
import json
import logging
import os

import pytest
import yaml

import train_sft
from src.data.preprocess import TokenizeReport, tokenize_records
from src.data.templates import get_prompt_format
from src.data.tokenization import ExampleTokenizer
from src.training import report
from src.training.sft_trainer import SFTTrainer
from tests.helpers import PAIRS, QWEN_TOKENIZER_DIR, make_config, need_shared, write_jsonl


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, level=logging.DEBUG):
        return [r.getMessage() for r in self.records if r.levelno >= level]


def _capturing(fn):
    """Run ``fn()`` with every INFO line of ``src`` and every warning of transformers (which does not propagate to
    the root logger) captured; returns (result, handler)."""
    handler = _Records()
    loggers = [logging.getLogger("src"), logging.getLogger("transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
        lg.addHandler(handler)
    try:
        return fn(), handler
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


# -- a run that evaluates before training, as the command line does with validation data ------------------------------
@pytest.fixture(scope="module")
def evaluated_run(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e '.[test]')")
    tmp = tmp_path_factory.mktemp("evaluated")
    data = write_jsonl(tmp / "pairs.jsonl", PAIRS)
    work = tmp / "cwd"
    work.mkdir()
    cwd = os.getcwd()
    os.chdir(work)  # nothing may land in ./runs of the working directory
    try:
        trainer = SFTTrainer(make_config(tiny_model_dir, data, tmp / "o", max_steps=3, logging_steps=1,
                                         eval_dataset_path=data, report_to="tensorboard"))
        trainer.prepare()
        before = trainer.evaluate_model()
        trainer.train()
    finally:
        os.chdir(cwd)
    return trainer, before, work


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    folders = {os.path.dirname(p) for p in glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True)}
    for folder in sorted(folders):
        accumulator = EventAccumulator(folder)
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return scalars


def test_tensorboard_events_stay_under_output_dir_when_evaluating_before_training(evaluated_run):
    trainer, before, work = evaluated_run
    assert os.listdir(work) == []  # no ./runs/<date>_<host>
    scalars = _scalars(os.path.join(trainer.config.output_dir, "runs"))
    logged = [(e["step"], e["loss"]) for e in trainer.trainer.state.log_history if "loss" in e]
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([v for _, v in logged], rel=1e-6)
    evals = sorted(scalars["eval/loss"])
    assert [s for s, _ in evals] == [0, 3]  # before training, and the final evaluation
    assert evals[0][1] == pytest.approx(before["eval_loss"], rel=1e-6)
    assert evals[1][1] == pytest.approx(trainer.final_metrics["eval_loss"], rel=1e-6)


def test_loss_plot_starts_with_the_step_zero_validation_loss(evaluated_run):
    trainer, before, _ = evaluated_run
    _, val = report.loss_curves(trainer.trainer.state.log_history)
    assert val[0] == (0, pytest.approx(before["eval_loss"], rel=1e-9)) and val[-1][0] == 3
    assert os.path.isfile(os.path.join(trainer.config.output_dir, report.PLOT_FILE))


def _split_card(text):
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def test_model_card_has_a_hub_header_and_no_local_paths(evaluated_run, tmp_path_factory, tiny_model_dir):
    trainer, _, _ = evaluated_run
    card = open(os.path.join(trainer.config.output_dir, "README.md"), encoding="utf-8").read()
    header, body = _split_card(card)
    assert header["language"] == ["ar"] and header["library_name"] == "transformers"
    assert {"sft", "arabic", "qwen", "qwen2"} <= set(header["tags"]) and "lora" not in header["tags"]
    assert "base_model" not in header and "datasets" not in header  # a local folder and file are not hub ids
    assert str(tmp_path_factory.getbasetemp()) not in card and os.path.dirname(tiny_model_dir) not in card
    assert "{'" not in card and "['" not in card  # no Python dict or list text
    assert "lora_" not in body and "LoRA" not in body  # a full run lists no LoRA settings
    assert "| method | full fine-tuning |" in body and "pairs.jsonl (local)" in body
    assert "train 8" in body and "validation 8" in body


def test_model_card_names_hub_ids_license_and_lora_settings(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# base\n", encoding="utf-8")
    config = {"use_lora": True, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
              "lora_target_modules": ["q_proj", "v_proj"], "learning_rate": 2e-4, "max_steps": -1,
              "eval_dataset_path": str(tmp_path / "eval.jsonl"),
              "datasets": json.dumps([{"path": "org/arabic-sft", "weight": 0.7}, {"path": "data/x.jsonl", "weight": 0.3}])}
    meta = {"model_name": "Qwen/Qwen2.5-0.5B", "use_lora": True, "dataset_path": None, "config": config,
            "examples": {"train": 1071}, "dropped_examples": {"train": 85}, "overlong_policy": "truncate",
            "system_prompt": "أنت مساعد.\nأجب باختصار.", "response_template": "### Response:\n",
            "architecture": {"model_type": "qwen2"}}
    header, body = _split_card(report.model_card(meta, {"eval_loss": 1.25}, has_plot=False))
    assert header["base_model"] == "Qwen/Qwen2.5-0.5B" and header["library_name"] == "peft"
    assert header["datasets"] == ["org/arabic-sft"] and "lora" in header["tags"]
    assert "license" not in header  # nothing says which license the hub model has (not in the cache)
    assert "| lora_target_modules | q_proj, v_proj |" in body and "| lora_r | 16 |" in body
    assert "| max_steps |" not in body  # -1: the epochs decide
    assert "train 1,071" in body and "85 (the prompt alone fills max_seq_length" in body
    assert "`### Response:\\n`" in body and "`أنت مساعد.\\nأجب باختصار.`" in body
    meta.update(model_name=str(base), use_lora=False)
    header, body = _split_card(report.model_card(meta, {}, has_plot=False))
    assert header["license"] == "apache-2.0" and "base_model" not in header and str(tmp_path) not in body
    assert "lora_r" not in body


def test_summary_previews_are_short():
    passage = "قرأ الطالب النص بعناية. " * 70  # ~1,700 characters, as reading-comprehension prompts are
    shown = report.preview(passage)
    assert len(shown) < 200 and shown.startswith("قرأ الطالب النص") and f"[{len(passage):,} characters]" in shown
    assert report.preview("ما عاصمة مصر؟") == "ما عاصمة مصر؟"
    assert "\n" not in report.preview("سطر\nسطر آخر")


# -- the tiny model and a real tokenizer ------------------------------------------------------------------------------
@pytest.mark.slow  # trains a model with the real 151,665-token vocabulary
def test_tiny_model_is_built_with_a_real_tokenizers_vocabulary(tmp_path, capsys):
    need_shared(os.path.join(QWEN_TOKENIZER_DIR, "vocab.json"),
                f"real Qwen2.5 tokenizer at {os.path.normpath(QWEN_TOKENIZER_DIR)}")
    from transformers import AutoConfig, AutoTokenizer

    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    out = tmp_path / "o"
    code = train_sft.main(["--model_name", "local:tiny-qwen2", "--tokenizer_name", QWEN_TOKENIZER_DIR,
                           "--dataset_path", data, "--output_dir", str(out), "--max_steps", "1", "--use_lora", "false",
                           "--validation_split_ratio", "0", "--max_seq_length", "64", "--save_steps", "1000",
                           "--gradient_checkpointing", "false", "--dataloader_pin_memory", "false"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    qwen = AutoTokenizer.from_pretrained(QWEN_TOKENIZER_DIR)
    assert AutoConfig.from_pretrained(out / "base_model").vocab_size == len(qwen) == 151665
    assert AutoConfig.from_pretrained(out).vocab_size == len(qwen)
    saved = AutoTokenizer.from_pretrained(out)
    assert saved(PAIRS[0]["instruction"])["input_ids"] == qwen(PAIRS[0]["instruction"])["input_ids"]


def test_a_tokenizer_with_ids_past_the_embeddings_is_refused_in_one_line(tmp_path, capsys, tiny_model_dir):
    from transformers import AutoTokenizer

    bigger = AutoTokenizer.from_pretrained(tiny_model_dir)
    bigger.add_tokens([f"<extra_{i}>" for i in range(50)])
    bigger.save_pretrained(tmp_path / "tok")
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    out = tmp_path / "o"
    code = train_sft.main(["--model_name", tiny_model_dir, "--tokenizer_name", str(tmp_path / "tok"),
                           "--dataset_path", data, "--output_dir", str(out), "--max_steps", "1", "--use_lora", "false",
                           "--validation_split_ratio", "0", "--max_seq_length", "64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("error: tokenizer") and "embedding rows" in err[-1]
    assert not glob.glob(str(out / "checkpoint-*")) and not (out / "model.safetensors").exists()


# -- early stopping, NEFTune and checkpoint reloads say what they do -------------------------------------------------
@pytest.fixture(scope="module")
def early_stopped_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("early")
    data = write_jsonl(tmp / "d.jsonl", PAIRS)
    # every decrease is smaller than the threshold: the evaluations at steps 2 and 3 count as no improvement
    trainer = SFTTrainer(make_config(tiny_model_dir, data, tmp / "o", max_steps=20, eval_dataset_path=data,
                                     evaluation_strategy="steps", eval_steps=1, save_steps=1, early_stopping_patience=2,
                                     early_stopping_threshold=100.0, neftune_noise_alpha=5.0))
    _, handler = _capturing(trainer.train)
    return trainer, handler


def test_early_stopping_says_when_and_why_and_the_metadata_records_it(early_stopped_run):
    trainer, handler = early_stopped_run
    assert trainer.trainer.state.global_step == 3
    evals = {e["step"]: e["eval_loss"] for e in trainer.trainer.state.log_history if "eval_loss" in e and e["step"] <= 3}
    best = min(evals, key=evals.get)  # the lowest loss is the best, even by less than the threshold
    (line,) = [m for m in handler.messages(logging.INFO) if m.startswith("Early stopping")]
    assert "step 3 of 20" in line and "eval_loss did not improve by more than 100 for 2 evaluation" in line
    assert f"best checkpoint (step {best})" in line
    meta = json.loads(open(os.path.join(trainer.config.output_dir, "sft_metadata.json"), encoding="utf-8").read())
    assert meta["early_stopped"]["step"] == 3 and meta["early_stopped"]["best_step"] == best
    card = open(os.path.join(trainer.config.output_dir, "README.md"), encoding="utf-8").read()
    assert "Early stopping: stopped at step 3 of 20" in card
    assert "| early_stopping_patience | 2 |" in card


def test_neftune_being_on_is_logged(early_stopped_run):
    _, handler = early_stopped_run
    assert any(m.startswith("NEFTune on: ") and "alpha=5" in m for m in handler.messages(logging.INFO))


def test_a_run_that_ran_to_the_end_did_not_stop_early(evaluated_run):
    trainer, _, _ = evaluated_run
    meta = json.loads(open(os.path.join(trainer.config.output_dir, "sft_metadata.json"), encoding="utf-8").read())
    assert meta["early_stopped"] is False and trainer.early_stopped is None


def test_tied_lm_head_is_not_reported_missing_but_other_keys_are(early_stopped_run, caplog, monkeypatch):
    from torch.nn.modules.module import _IncompatibleKeys

    trainer, handler = early_stopped_run
    # the best checkpoint was reloaded at the end: its missing lm_head.weight is the tied embedding
    assert any("Loading best model from" in m for m in handler.messages(logging.INFO))
    assert not [m for m in handler.messages() if "missing keys" in m]
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    hf = trainer.trainer
    with caplog.at_level(logging.WARNING):
        hf._issue_warnings_after_load(_IncompatibleKeys(["lm_head.weight"], []))
    assert "missing keys" not in caplog.text
    with caplog.at_level(logging.WARNING):
        hf._issue_warnings_after_load(_IncompatibleKeys(["model.norm.weight", "lm_head.weight"], []))
    assert "missing keys in the checkpoint model loaded: ['model.norm.weight']" in caplog.text
    caplog.clear()
    monkeypatch.setattr(hf.model.config, "tie_word_embeddings", False)  # not tied: a missing head is missing
    with caplog.at_level(logging.WARNING):
        hf._issue_warnings_after_load(_IncompatibleKeys(["lm_head.weight"], []))
    assert "missing keys in the checkpoint model loaded: ['lm_head.weight']" in caplog.text


# -- over-long rows counted by reason -------------------------------------------------------------------------------
def test_overlong_rows_are_counted_by_reason(tiny_tokenizer, caplog):
    et = ExampleTokenizer(tiny_tokenizer, get_prompt_format("alpaca"), max_seq_length=24, overlong_policy="truncate")
    passage = "الذكاء الاصطناعي فرع من علوم الحاسوب يبني أنظمة تتعلم. " * 3
    rows = [{"instruction": passage, "response": "نعم", "system": None},  # the prompt alone is too long: dropped
            {"instruction": "س", "response": passage, "system": None},  # the response is cut: truncated
            {"instruction": "a", "response": "b", "system": None}]
    report_ = TokenizeReport()
    with caplog.at_level(logging.WARNING, logger="src.data.preprocess"):
        dataset = tokenize_records(rows, et, "train", report_)
    assert len(dataset) == 2 and report_.truncated["train"] == 1 and report_.dropped["train"] == 1
    (line,) = [r.getMessage() for r in caplog.records if "max_seq_length=24" in r.getMessage()]
    assert "1 examples longer than max_seq_length=24 were truncated and 1 dropped" in line
    assert line.endswith("dropped: 1 because the prompt alone fills max_seq_length: nothing left to train after "
                         "truncation")
    assert "1 truncated, 1 dropped (the prompt alone fills max_seq_length" in report_.summary()
    drop = ExampleTokenizer(tiny_tokenizer, get_prompt_format("alpaca"), max_seq_length=24, overlong_policy="drop")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="src.data.preprocess"):
        tokenize_records(rows, drop, "train", TokenizeReport())
    assert "dropped: 2 because over-long (overlong_policy='drop' drops every over-long example)" in caplog.text
