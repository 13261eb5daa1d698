"""Benchmark evaluation with EleutherAI's lm-evaluation-harness (``train_sft.py evaluate``; extra ``.[benchmark]``).

Tasks are the harness's own (any name its ``TaskManager`` knows, with datasets available offline) or the
project's local multiple-choice tasks (``LOCAL_TASKS``: a JSONL of ``{question, choices, answer}``). A
local task is rendered for the run being scored: each question becomes the prompt exactly as training
formats an instruction (template, system prompt, normalization), and each choice is scored by its
log-likelihood as the response that follows (``acc``; ``acc_norm`` divides by length). So a model is asked
the way it was taught. The harness runs the loaded model object (``HFLM``), offline, deterministically.
Results go into the run's ``sft_metadata.json`` under ``benchmarks`` (main process only).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

from src.training import persistence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCAL_TASKS = {"arabic_mc_sft": os.path.join(ROOT, "data", "arabic_mc_benchmark.jsonl")}


def _local_task(folder: str, name: str, source: str, trainer: Any) -> None:
    """Write the task's YAML and its rendered documents into ``folder``."""
    et = trainer.example_tokenizer()
    docs = os.path.join(folder, f"{name}.jsonl")
    with open(source, encoding="utf-8") as fh, open(docs, "w", encoding="utf-8") as out:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not (isinstance(row.get("question"), str) and isinstance(row.get("choices"), list)
                    and isinstance(row.get("answer"), int) and 0 <= row["answer"] < len(row["choices"])):
                raise ValueError(f"{source}, line {number}: expected question, choices and an answer index")
            out.write(json.dumps({"prompt": et.prompt_text(row["question"]),
                                  "choices": [et.normalize(c) for c in row["choices"]], "answer": row["answer"]},
                                 ensure_ascii=False) + "\n")
    task = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": docs}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}", "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }
    with open(os.path.join(folder, f"{name}.yaml"), "w", encoding="utf-8") as fh:
        json.dump(task, fh, ensure_ascii=False)  # JSON is YAML


def check_tasks(tasks: list[str]) -> None:
    """Refuse unknown task names (and a missing harness) before any model is loaded."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("evaluate needs lm-evaluation-harness: pip install -e '.[benchmark]'") from None
    if not tasks:
        raise ValueError("evaluate: --tasks names no task")
    others = [t for t in tasks if t not in LOCAL_TASKS]
    unknown = [t for t in others if t not in TaskManager().all_tasks] if others else []
    if unknown:
        raise ValueError(f"evaluate: unknown task(s) {unknown}; local tasks: {sorted(LOCAL_TASKS)}, or any task "
                         "of lm-evaluation-harness")


def _model_object_notice(record: logging.LogRecord) -> bool:
    """A logging filter: False for lm-eval's notice that ``pretrained`` is not a model name (see run_benchmarks)."""
    return not record.getMessage().startswith("`pretrained` model kwarg is not of type")


def run_benchmarks(trainer: Any, tasks: list[str], batch_size: int = 8, limit: int | None = None) -> dict[str, dict]:
    """Score ``trainer``'s loaded model on ``tasks``; returns ``{task: {metric: value}}``."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("evaluate needs lm-evaluation-harness: pip install -e '.[benchmark]'") from None
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # the harness wants a plain transformers model
    model.eval()
    with tempfile.TemporaryDirectory() as folder:
        for name in tasks:
            if name in LOCAL_TASKS:
                _local_task(folder, name, LOCAL_TASKS[name], trainer)
        # The harness's own 14,683 tasks are indexed (~16 s) only when a task is not one of ours; the local task
        # folder is indexed either way (include_path).
        manager = TaskManager(include_path=folder, include_defaults=any(t not in LOCAL_TASKS for t in tasks))
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise ValueError(f"evaluate: unknown task(s) {unknown}; local tasks: {sorted(LOCAL_TASKS)}, or any task "
                             "of lm-evaluation-harness")
        # lm-eval warns whenever `pretrained` is a model object (other model arguments ignored; not for accelerate
        # launch or parallelize=True). We pass the loaded run on purpose (offline, merged as trained), none of that
        # applies: the one line would read as a problem with the run.
        harness_logger = logging.getLogger("lm_eval.models.huggingface")
        harness_logger.addFilter(_model_object_notice)
        try:
            lm = HFLM(pretrained=model, tokenizer=trainer.tokenizer, batch_size=batch_size)
        finally:
            harness_logger.removeFilter(_model_object_notice)
        results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=0,
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0, log_samples=False)
    scores = {}
    for task, metrics in results["results"].items():
        scores[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                        if isinstance(v, (int, float)) and not k.startswith(("alias", "sample")) and "stderr" not in k}
    return scores


def record_benchmarks(run_dir: str, scores: dict[str, dict]) -> None:
    """Add the scores to the run's ``sft_metadata.json`` (``benchmarks``) and its model card."""
    meta_path = os.path.join(run_dir, persistence.metadata_filename("sft"))
    with open(meta_path, encoding="utf-8") as fh:
        metadata = json.load(fh)
    metadata.setdefault("benchmarks", {}).update(scores)
    persistence.write_metadata(run_dir, metadata)
    card = os.path.join(run_dir, "README.md")
    if os.path.isfile(card):
        lines = ["", "## Benchmarks (lm-evaluation-harness)", "", "| task | metric | value |", "|---|---|---|"]
        lines += [f"| {task} | {metric} | {value:.4f} |" for task, metrics in scores.items()
                  for metric, value in sorted(metrics.items())]
        with open(card, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
