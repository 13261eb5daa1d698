"""Mixing several datasets with weights (``SFTConfig.datasets``).

A mixture is a list of sources, each ``{"path": ..., "weight": w}`` (or ``"fraction"``; the shares are
normalised to sum to 1), optionally ``"split"`` ("train", the default, or "validation") and
``"max_samples"`` (use at most this many rows of the source, taken by a seeded shuffle) and ``"name"`` (what the
per-source figures call it: ``[A-Za-z0-9_-]+``, unique; by default the file's stem, made unique). The mixture has
as many rows as the sources offer together (after ``max_samples``); each source contributes its share of
that total, drawing its rows without replacement while it has enough and repeating them (a seeded
shuffle each pass) when its share is larger than the source. Row counts are exact up to rounding
(a 70/30 mix of 1,000 rows is 700/300), the order is a seeded shuffle, and rows of different shapes
(instruction rows, conversations, text) mix freely.

Every record of a mixture (the held-out validation rows included) carries its source's name under
:data:`SOURCE_KEY`, which tokenization turns into a per-document source id: the loss is then reported per
source (``eval_<name>_loss``, ``loss_<name>``; ``src.training.hf_trainer``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import dataclass
from typing import Any, Optional

from src.data.loading import hold_out, load_records
from src.data.records import LoadReport

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation")
# The record key that names a row's source in a mixture (what per-source losses group by); absent outside mixtures.
SOURCE_KEY = "_source"
SOURCE_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class MixtureSource:
    path: str
    weight: float
    split: str = "train"
    max_samples: Optional[int] = None
    name: Optional[str] = None  # as given; the name the figures use is source_names()'s


def source_names(sources: list[MixtureSource]) -> list[str]:
    """The name of each source in the per-source figures: its ``name``, else its file's stem with every character
    outside ``[A-Za-z0-9_-]`` replaced by ``_``, made unique with ``_2``, ``_3``... (given names are unique already)."""
    taken = {s.name for s in sources if s.name is not None}
    names = []
    for source in sources:
        if source.name is not None:
            names.append(source.name)
            continue
        stem = os.path.splitext(os.path.basename(source.path.rstrip("/\\")))[0]
        base = re.sub(r"[^A-Za-z0-9_-]", "_", stem).strip("_") or "source"
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}_{n}"
        taken.add(name)
        names.append(name)
    return names


def named_paths(sources: list[MixtureSource]) -> dict[str, str]:
    """``{name: path}`` of ``sources``, names as ``source_names`` gives them, in order."""
    return {name: source.path for name, source in zip(source_names(sources), sources)}


def parse_mixture(value: Any) -> list[MixtureSource]:
    """Sources from a list of mappings (or its JSON text, as the command line gives it); ``ValueError`` names
    the entry and key that cannot work."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"datasets: not a JSON list of sources ({exc.msg}); expected "
                             '[{"path": "a.jsonl", "weight": 0.7}, {"path": "b.jsonl", "weight": 0.3}]') from None
    if not isinstance(value, list) or not value:
        raise ValueError("datasets: expected a non-empty list of sources like {path: a.jsonl, weight: 0.7}")
    sources = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ValueError(f"datasets[{i}]: expected a mapping with a 'path'")
        unknown = set(entry) - {"path", "weight", "fraction", "split", "max_samples", "name"}
        if unknown:
            raise ValueError(f"datasets[{i}]: unknown key(s) {sorted(unknown)}; expected path, weight or fraction, "
                             "split, max_samples, name")
        if "weight" in entry and "fraction" in entry:
            raise ValueError(f"datasets[{i}]: give 'weight' or 'fraction', not both")
        weight = entry.get("weight", entry.get("fraction", 1.0))
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"datasets[{i}]: weight={weight!r} is invalid: expected a positive number")
        split = entry.get("split", "train")
        if split not in SPLITS:
            raise ValueError(f"datasets[{i}]: split={split!r} is invalid: expected one of {SPLITS}")
        max_samples = entry.get("max_samples")
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
            raise ValueError(f"datasets[{i}]: max_samples={max_samples!r} is invalid: expected a positive integer")
        name = entry.get("name")
        if name is not None and not (isinstance(name, str) and SOURCE_NAME_RE.fullmatch(name)):
            raise ValueError(f"datasets[{i}].name={name!r} is invalid: expected letters, digits, '_' or '-' "
                             "(it becomes part of metric names such as eval_<name>_loss)")
        if name is not None and name in (s.name for s in sources):
            first = next(j for j, s in enumerate(sources) if s.name == name)
            raise ValueError(f"datasets[{i}].name={name!r} is invalid: datasets[{first}] has that name already; "
                             "names must be unique")
        sources.append(MixtureSource(entry["path"], float(weight), split, max_samples, name))
    return sources


def mix_records(parts: list[tuple[list[dict], float]], seed: int) -> tuple[list[dict], list[int]]:
    """Mix ``(records, weight)`` parts as the module docstring says; returns the rows and each part's count."""
    rng = random.Random(seed)
    total = sum(len(rows) for rows, _ in parts)
    weights = [w for _, w in parts]
    shares = [total * w / sum(weights) for w in weights]
    counts = [int(s) for s in shares]
    # largest remainders get the rows rounding left over, so the counts add up to the total exactly
    for i in sorted(range(len(parts)), key=lambda i: shares[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    mixed: list[dict] = []
    for (rows, _), count in zip(parts, counts):
        if not rows:
            raise ValueError("datasets: a source has no rows")
        taken: list[dict] = []
        while len(taken) < count:
            order = list(range(len(rows)))
            rng.shuffle(order)
            taken += [rows[i] for i in order[: count - len(taken)]]
        mixed += taken
    rng.shuffle(mixed)
    return mixed, counts


def cap_rows(rows: list[dict], max_samples: Optional[int], seed: int) -> list[dict]:
    """At most ``max_samples`` rows, chosen by a seeded shuffle (kept in their original order)."""
    if max_samples is None or len(rows) <= max_samples:
        return rows
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in sorted(order[:max_samples])]


def load_mixture(sources: list[MixtureSource], eval_source: Any = None, *, validation_split_ratio: float = 0.1,
                 seed: int = 42, skip_invalid: bool = False) -> tuple[dict[str, list[dict]], LoadReport]:
    """Load every source (each validated like a single data file), mix their training rows, and take the
    validation rows from ``eval_source`` or else hold ``validation_split_ratio`` of the mixture out.

    Returns the records per split and one :class:`~src.data.records.LoadReport` of the whole mixture: rows read
    and skipped summed over every source (and ``eval_source``), rows kept as the mixture's splits, and in
    ``sources`` each source's own counts (``path``, ``split``, ``rows_read``, ``rows_kept``, ``invalid_rows`` by
    reason, ``mixed_rows``: its rows in the training mixture, after ``max_samples`` and weighting)."""
    parts, reports = [], []
    for i, source in enumerate(sources):
        records, report = load_records(source.path, validation_split_ratio=0.0, seed=seed, skip_invalid=skip_invalid,
                                       log=False)
        rows = records.get(source.split)
        if not rows:
            raise ValueError(f"datasets[{i}]: {source.path} has no {source.split!r} rows (it has {sorted(records)})")
        parts.append((cap_rows(rows, source.max_samples, seed + i), source.weight))
        reports.append((report, len(rows)))
    names = source_names(sources)
    for (rows, _), name in zip(parts, names):
        for row in rows:  # the held-out validation rows keep it too: evaluation is reported per source
            row[SOURCE_KEY] = name
    mixed, counts = mix_records(parts, seed)
    logger.info("Mixed %d training rows: %s", len(mixed),
                ", ".join(f"{s.path} {n} ({n / len(mixed):.1%})" for s, n in zip(sources, counts)))
    total = LoadReport()
    for source, (report, valid), n in zip(sources, reports, counts):
        _add_source(total, report, "train", path=source.path, split=source.split, kept=valid, mixed=n)
    if eval_source is not None:
        loaded, report = load_records(eval_source, validation_split_ratio=0.0, seed=seed, skip_invalid=skip_invalid,
                                      log=False)
        validation = loaded.get("validation") or loaded["train"]
        _add_source(total, report, "validation", path=str(eval_source), split="validation", kept=len(validation),
                    mixed=0)
        splits = {"train": mixed, "validation": validation}
    else:
        train, validation = hold_out(mixed, validation_split_ratio, seed)
        splits = {"train": train, "validation": validation} if validation else {"train": train}
        total.held_out_validation = len(validation)
    total.rows_kept.update({split: len(rows) for split, rows in splits.items()})
    return splits, total


def parse_eval_sources(value: Any) -> list[MixtureSource]:
    """``eval_datasets``: several validation files, each a source of its own in the per-source figures. A list of
    paths or ``{path, name}`` mappings (or its JSON text, as the command line gives it; a text that is not JSON is one
    path). Names as in a mixture (``source_names``); a validation file named like a mixture source is that source's
    validation data. ``ValueError`` names the entry and key."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError("eval_datasets: expected a non-empty list of validation files (paths, or {path, name})")
    sources = []
    for i, entry in enumerate(value):
        entry = {"path": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ValueError(f"eval_datasets[{i}]: expected a path or a mapping with a 'path'")
        unknown = set(entry) - {"path", "name"}
        if unknown:
            raise ValueError(f"eval_datasets[{i}]: unknown key(s) {sorted(unknown)}; expected path, name")
        name = entry.get("name")
        if name is not None and not (isinstance(name, str) and SOURCE_NAME_RE.fullmatch(name)):
            raise ValueError(f"eval_datasets[{i}].name={name!r} is invalid: expected letters, digits, '_' or '-'")
        if name is not None and name in [s.name for s in sources]:
            raise ValueError(f"eval_datasets[{i}].name={name!r} is invalid: eval_datasets[{[s.name for s in sources].index(name)}] "
                             "has that name already")
        sources.append(MixtureSource(entry["path"], 1.0, "validation", None, name))
    return sources


def load_eval_sources(sources: list[MixtureSource], report: LoadReport, *, seed: int = 42,
                      skip_invalid: bool = False) -> list[dict]:
    """The validation rows of every file of ``eval_datasets`` (a file's ``validation`` split, else all its rows), each
    row naming its source (``SOURCE_KEY``), in file order; each file's counts are added to ``report``."""
    rows: list[dict] = []
    names = source_names(sources)
    for source, name in zip(sources, names):
        loaded, file_report = load_records(source.path, validation_split_ratio=0.0, seed=seed, skip_invalid=skip_invalid,
                                           log=False)
        validation = loaded.get("validation") or loaded["train"]
        rows += [{**row, SOURCE_KEY: name} for row in validation]
        _add_source(report, file_report, "validation", path=source.path, split="validation", kept=len(validation),
                    mixed=0)
    logger.info("Validation files: %s", ", ".join(f"{name} {source.path}" for source, name in zip(sources, names)))
    return rows


def _add_source(total: LoadReport, report: LoadReport, feeds: str, **counts: Any) -> None:
    """Add one source's load report to the mixture's: its reads (to the split it ``feeds``) and skips to the totals,
    its own counts to ``sources``."""
    read = sum(report.rows_read.values())
    total.rows_read[feeds] += read
    total.skipped.update(report.skipped)
    total.skipped_examples.extend(report.skipped_examples[: max(0, 20 - len(total.skipped_examples))])
    total.sources.append({"path": counts["path"], "split": counts["split"], "rows_read": read, "rows_kept": counts["kept"],
                          "invalid_rows": dict(report.skipped), "mixed_rows": counts["mixed"]})
