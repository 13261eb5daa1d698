#!/usr/bin/env python
"""Preprocessing speed and peak memory against the anchor (TRL 1.16's ``SFTTrainer`` dataset preparation).

    pip install trl==1.16.0        # the anchor; not a dependency of the project
    python bench/preprocess.py [--rows 100000] [--max_seq_length 512] [--json out.json]

Generates ``--rows`` Arabic instruction/response rows deterministically (short rows like the shipped
``data/arabic_instructions.jsonl``: each row is a shipped row with about a third of its words replaced
by words drawn from the whole shipped vocabulary, and a number now and then; no downloads), writes them
as JSONL to a temporary directory, then prepares them in a fresh subprocess per measurement:

- ours: ``load_records`` -> ``tokenize_records(records, ExampleTokenizer(tokenizer, chatml, max_seq_length),
  "train", report, packing=..., cache_dir=...)``, the path ``SFTTrainer.tokenize_split`` takes: cold (an
  empty cache directory: tokenize and write the entry), warm (the same directory again: verify and
  memory-map it) and without ``cache_dir`` (in-memory result). Against code whose ``tokenize_records``
  takes no ``cache_dir`` (the code before the cache), only the last runs, followed by ``pack_dataset``;
- TRL: ``datasets.load_dataset("json")`` -> prompt/completion strings (prompt = our ChatML prompt,
  completion = response + ``<|im_end|>``, the tokenizer's EOS, so TRL appends nothing) ->
  ``trl.SFTTrainer._prepare_dataset`` called on a stand-in ``self`` holding what it reads (the
  tokenizer, ``completion_only_loss=True``, no chat template), with ``trl.SFTConfig(max_length=...,
  packing=...)`` defaults otherwise (``dataset_num_proc=None``, ``packing_strategy="bfd"``). Its
  ``datasets`` cache goes to a fresh directory per run, so every TRL run is cold.

Both use the real Qwen2.5 tokenizer (``AutoTokenizer.from_pretrained``, fast) from
``../shared/qwen2.5-tokenizer`` (``--tokenizer``), the same ``max_seq_length``, the same packing flag. No
model is loaded. Imports and the tokenizer load are outside the timing; the peak RSS is
``VmHWM`` read from ``/proc/self/status`` at the end, after resetting it (``/proc/self/clear_refs``) right
after imports and tokenizer load, and the table reports it and its delta over the RSS at that point.
rows/s = input rows / seconds from reading the file to the prepared (tokenized, packed) dataset; CPU s
is the worker's user + system time over the same span (children included), which stays comparable when
other work shares the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHIPPED = os.path.join(ROOT, "data", "arabic_instructions.jsonl")
QWEN_TOKENIZER = os.path.normpath(os.path.join(ROOT, "..", "shared", "qwen2.5-tokenizer"))


# -- data --------------------------------------------------------------------------------------------


def generate_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` short Arabic instruction/response rows, the same for the same ``n`` and ``seed``."""
    with open(SHIPPED, encoding="utf-8") as fh:
        base = [json.loads(line) for line in fh if line.strip()]
    pool = sorted({w for r in base for w in (r["instruction"] + " " + r["response"]).split() if re.search(r"[\u0600-\u06ff]", w)})
    rng = random.Random(seed)

    def vary(text: str) -> str:
        words = text.split()
        for i in range(len(words)):
            roll = rng.random()
            if roll < 0.3:
                words[i] = rng.choice(pool)
            elif roll < 0.33:
                words[i] = str(rng.randrange(1, 10_000))
        return " ".join(words)

    rows = []
    for _ in range(n):
        row = rng.choice(base)
        rows.append({"instruction": vary(row["instruction"]), "response": vary(row["response"]), "category": row["category"]})
    return rows


def write_jsonl(rows: list[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


# -- measuring in a worker process -------------------------------------------------------------------


def _status() -> dict[str, float]:
    values = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024  # MiB
    return values


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def worker_ours(spec: dict) -> dict:
    import inspect

    import datasets  # noqa: F401 - imported before the baseline, as TRL's side does (training imports it anyway)
    import pyarrow  # noqa: F401
    from transformers import AutoTokenizer

    from src.data.loading import load_records
    from src.data.normalization import build_normalizer
    from src.data.packing import pack_dataset
    from src.data.preprocess import TokenizeReport, tokenize_records
    from src.data.templates import get_prompt_format
    from src.data.tokenization import ExampleTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    accepts = inspect.signature(tokenize_records).parameters
    cached = "cache_dir" in accepts and "packing" in accepts
    threads = {"num_threads": spec["num_threads"]} if spec.get("num_threads") is not None and "num_threads" in accepts else {}
    if spec["cache_dir"] and not cached:
        return {"skipped": "tokenize_records takes no cache_dir here"}
    normalize = None if spec["normalization"] == "none" else build_normalizer(spec["normalization"])
    reset = _reset_peak()
    base = _status()["VmRSS"]
    cpu = _cpu_seconds()
    start = time.perf_counter()
    records, _ = load_records(spec["data"], validation_split_ratio=0.0)
    et = ExampleTokenizer(tokenizer, get_prompt_format("chatml"), spec["max_seq_length"], normalize=normalize)
    report = TokenizeReport()
    if cached:
        dataset = tokenize_records(records["train"], et, "train", report, packing=spec["packing"], cache_dir=spec["cache_dir"],
                                   **threads)
    else:
        dataset = tokenize_records(records["train"], et, "train", report)
        if spec["packing"]:
            dataset = pack_dataset(dataset, spec["max_seq_length"])
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu
    status = _status()
    return {"seconds": seconds, "cpu_seconds": cpu, "rows_in": report.examples["train"] + report.dropped["train"], "rows_out": len(dataset),
            "tokens": report.total_tokens["train"], "base_mb": base, "peak_mb": status["VmHWM"],
            "peak_reset": reset}


def worker_trl(spec: dict) -> dict:
    import types

    import datasets
    import trl
    from transformers import AutoTokenizer

    from src.data.templates import get_prompt_format

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    fmt = get_prompt_format("chatml")
    end = "<|im_end|>"
    assert tokenizer.eos_token == end
    args = trl.SFTConfig(output_dir=spec["scratch"], max_length=spec["max_seq_length"], packing=spec["packing"],
                         completion_only_loss=True, report_to="none", use_cpu=True, bf16=False,
                         dataset_num_proc=spec.get("num_proc"))
    # What _prepare_dataset reads from ``self`` (set in SFTTrainer.__init__ before it is called).
    stand_in = types.SimpleNamespace(_tokenizer=tokenizer, completion_only_loss=True, chat_template=None)

    def to_prompt_completion(batch):
        return {"prompt": [fmt.format_prompt(i) for i in batch["instruction"]],
                "completion": [r + end for r in batch["response"]]}

    reset = _reset_peak()
    base = _status()["VmRSS"]
    cpu = _cpu_seconds()
    start = time.perf_counter()
    raw = datasets.load_dataset("json", data_files=spec["data"], split="train", cache_dir=spec["hf_cache"])
    dataset = raw.map(to_prompt_completion, batched=True, remove_columns=raw.column_names)
    dataset = trl.SFTTrainer._prepare_dataset(stand_in, dataset, tokenizer, args, spec["packing"], None, "train")
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu
    status = _status()
    import pyarrow.compute as pc

    tokens = pc.sum(pc.list_value_length(dataset.data.column("input_ids"))).as_py()  # after the measurement
    return {"seconds": seconds, "cpu_seconds": cpu, "rows_in": len(raw), "rows_out": len(dataset), "tokens": tokens, "base_mb": base,
            "peak_mb": status["VmHWM"], "peak_reset": reset}


def run_worker(kind: str, spec: dict) -> dict:
    env = dict(os.environ, TQDM_DISABLE="1", HF_DATASETS_CACHE=spec["hf_cache"], HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", kind, json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{kind} worker failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- main --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--tokenizer", default=QWEN_TOKENIZER)
    parser.add_argument("--normalization", default="none", help="ours only: none (as TRL) | light | search")
    parser.add_argument("--packing", default="both", choices=("both", "on", "off"))
    parser.add_argument("--num_threads", type=int, default=None, help="ours: tokenize_records(num_threads=...) (default: its own)")
    parser.add_argument("--trl_num_proc", type=int, default=None, help="TRL's dataset_num_proc (default None, as TRL)")
    parser.add_argument("--skip_trl", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        kind, spec = args.worker[0], json.loads(args.worker[1])
        result = (worker_ours if kind == "ours" else worker_trl)(spec)
        print(json.dumps(result))
        return 0

    from common import report

    tmp = tempfile.mkdtemp(prefix="bench_preprocess_")
    try:
        data = os.path.join(tmp, "rows.jsonl")
        write_jsonl(generate_rows(args.rows), data)
        print(f"{args.rows} rows, {os.path.getsize(data) / 2**20:.1f} MiB JSONL, max_seq_length={args.max_seq_length}, "
              f"tokenizer {args.tokenizer}, {os.cpu_count()} CPUs", flush=True)
        results: dict[str, dict] = {}
        for packing in {"both": (False, True), "on": (True,), "off": (False,)}[args.packing]:
            tag = "packing" if packing else "no packing"
            common = dict(data=data, tokenizer=args.tokenizer, max_seq_length=args.max_seq_length, packing=packing,
                          normalization=args.normalization)
            cache = os.path.join(tmp, f"cache_{int(packing)}")
            runs = [(f"ours, {tag}, cold", "ours", dict(cache_dir=cache, num_threads=args.num_threads)),
                    (f"ours, {tag}, warm cache", "ours", dict(cache_dir=cache, num_threads=args.num_threads)),
                    (f"ours, {tag}, no cache_dir", "ours", dict(cache_dir=None, num_threads=args.num_threads))]
            if not args.skip_trl:
                runs.append((f"TRL 1.16, {tag}" + (f", dataset_num_proc={args.trl_num_proc}" if args.trl_num_proc else ""),
                             "trl", dict(num_proc=args.trl_num_proc)))
            for n, (name, kind, extra) in enumerate(runs):
                hf_cache = os.path.join(tmp, f"hf_cache_{int(packing)}_{n}")
                scratch = os.path.join(tmp, f"scratch_{int(packing)}_{n}")
                result = run_worker(kind, {**common, **extra, "hf_cache": hf_cache, "scratch": scratch})
                shutil.rmtree(hf_cache, ignore_errors=True)
                if "skipped" in result:
                    print(f"{name}: skipped ({result['skipped']})", flush=True)
                    continue
                result["rows_per_s"] = result["rows_in"] / result["seconds"]
                result["delta_mb"] = result["peak_mb"] - result["base_mb"]
                results[name] = result
                print(f"{name}: {result['seconds']:.2f} s ({result['cpu_seconds']:.1f} s CPU), {result['rows_per_s']:.0f} rows/s, peak {result['peak_mb']:.0f} MiB "
                      f"(+{result['delta_mb']:.0f})", flush=True)
            trl = next((r for k, r in results.items() if k.startswith("TRL") and tag in k.split(", ")), None)
            if trl:
                for k, r in results.items():
                    if tag in k.split(", "):
                        r["speedup_vs_trl"] = r["rows_per_s"] / trl["rows_per_s"]
        for r in results.values():
            r.setdefault("speedup_vs_trl", float("nan"))
        print()
        report(f"Preprocessing {args.rows} rows (python bench/preprocess.py --rows {args.rows})", "setup",
               [("seconds", "seconds", ".2f"), ("CPU s", "cpu_seconds", ".1f"), ("rows/s", "rows_per_s", ".0f"), ("x TRL", "speedup_vs_trl", ".2f"),
                ("base MiB", "base_mb", ".0f"), ("peak MiB", "peak_mb", ".0f"), ("peak-base MiB", "delta_mb", ".0f"),
                ("rows out", "rows_out", "d")], results, args.json)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
