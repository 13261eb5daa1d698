"""Batch generation from a JSONL file (``train_sft.py generate``), resumable.

Input rows are JSON objects with ``instruction`` (and optionally ``system`` and ``id``; without ``id`` a
row's id is its 1-based line number). Each output line is ``{"id", "instruction", "response"}`` (plus
``"reasoning"`` when a thinking model wrote ``...</think>`` before its answer), written
and flushed batch by batch in input order, so an interrupted run keeps every finished row. Running again
with the same output skips the ids already there (a last line cut off mid-write is dropped and redone).
Prompts are formatted exactly as in training (``ExampleTokenizer.encode_prompt``); decoding is greedy
unless sampling flags are given (``src.training.generation``).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

logger = logging.getLogger(__name__)


def read_input_rows(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {number}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
                raise ValueError(f"{path}, line {number}: expected an object with a non-empty 'instruction' string")
            if row.get("system") is not None and not isinstance(row["system"], str):
                raise ValueError(f"{path}, line {number}, field 'system': expected a string")
            rows.append({"id": row.get("id", number), "instruction": row["instruction"], "system": row.get("system")})
    ids = [json.dumps(r["id"]) for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: ids must be unique (a repeated id would be skipped as already generated)")
    return rows


def done_ids(output: str) -> set[str]:
    """Ids already in ``output``; a cut-off last line (an interrupted write) is removed from the file."""
    if not os.path.isfile(output):
        return set()
    with open(output, encoding="utf-8") as fh:
        lines = fh.readlines()
    done, keep = set(), []
    for index, line in enumerate(lines):
        try:
            done.add(json.dumps(json.loads(line)["id"]))
            keep.append(line if line.endswith("\n") else line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            if index != len(lines) - 1:
                raise ValueError(f"{output}, line {index + 1}: not a generated row; choose another output file") from None
            logger.warning("%s: dropping a cut-off last line (an interrupted write); that row is generated again", output)
    if len(keep) != len(lines) or any(not line.endswith("\n") for line in lines):
        with open(output, "w", encoding="utf-8") as fh:
            fh.writelines(keep)
    return done


def generate_file(trainer: Any, input_path: str, output: str, *, batch_size: int = 8, max_length: int = 256,
                  seed: Optional[int] = None, rows: Optional[list[dict]] = None, **generation_kwargs: Any) -> dict[str, int]:
    """Generate a response for every input row not yet in ``output``; returns counts (generated, skipped).
    ``rows``: the input already read with :func:`read_input_rows` (checked before a model is loaded)."""
    import torch
    from tqdm.auto import tqdm

    from src.data.chat_templates import split_reasoning

    rows = rows if rows is not None else read_input_rows(input_path)
    done = done_ids(output)
    todo = [r for r in rows if json.dumps(r["id"]) not in done]
    if len(todo) < len(rows):
        logger.info("%s: %d of %d rows already generated; generating the other %d", output, len(rows) - len(todo),
                    len(rows), len(todo))
    if seed is not None:
        torch.manual_seed(seed)
    example_tokenizer = trainer.example_tokenizer()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "a", encoding="utf-8") as fh, tqdm(total=len(todo), desc="Generating", unit="row") as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            prompts = [example_tokenizer.encode_prompt(r["instruction"], r["system"]) for r in chunk]
            responses = trainer.generate_from_prompts(prompts, max_length=max_length, batch_size=batch_size,
                                                      **generation_kwargs)
            for row, text in zip(chunk, responses):
                reasoning, response = split_reasoning(text)  # a thinking model's reasoning is kept beside its answer
                out = {"id": row["id"], "instruction": row["instruction"], "response": response}
                if reasoning:
                    out["reasoning"] = reasoning
                fh.write(json.dumps(out, ensure_ascii=False) + "\n")
            fh.flush()
            bar.update(len(chunk))
    return {"generated": len(todo), "skipped": len(rows) - len(todo)}
