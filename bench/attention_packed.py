"""Attention implementations on packed rows: estimated attention time per training step, and the pick.

    python bench/attention_packed.py                        # GPU: 0.5B and 1.5B shapes, bf16, 4 x 2048, sdpa/flex/flash
    python bench/attention_packed.py --shape cpu-small      # CPU: a small shape, float32, sdpa vs eager

The same measurement ``attn_implementation=None``/``"auto"`` makes at the start of a GPU run
(``src.training.attention.measure_packed_attention``: one attention layer of the model's geometry, forward and
backward, times the layer count, plus the mask each step builds), on packed layouts of documents whose lengths
are drawn as in the prompt-heavy and response-heavy benchmark data. Candidates whose output differs from sdpa's
are reported as excluded. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import report  # noqa: E402
from src.training.attention import candidate_implementations, measure_packed_attention  # noqa: E402

SHAPES = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
    "cpu-small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
}
# Document lengths (tokens) of the two benchmark data shapes: (low, high) of a uniform draw.
DOCUMENTS = {"prompt-heavy": (250, 900), "response-heavy": (60, 700)}


def packed_position_ids(batch: int, tokens: int, lengths: tuple[int, int], seed: int) -> torch.Tensor:
    """Rows of ``tokens`` filled with documents of random lengths (the last one cut to fit), positions restarting."""
    rng = random.Random(seed)
    rows = []
    for _ in range(batch):
        row: list[int] = []
        while len(row) < tokens:
            row.extend(range(min(rng.randint(*lengths), tokens - len(row))))
        rows.append(row)
    return torch.tensor(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--shape", default="0.5b,1.5b" if cuda else "cpu-small", help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--data", default="prompt-heavy,response-heavy", help=f"comma list of {sorted(DOCUMENTS)}")
    parser.add_argument("--batch", type=int, default=4 if cuda else 2)
    parser.add_argument("--tokens", type=int, default=2048 if cuda else 512)
    parser.add_argument("--candidates", default=None, help="comma list (default: what this machine can train with; "
                        "on CPU sdpa,eager)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    candidates = args.candidates.split(",") if args.candidates else (candidate_implementations(device) if cuda
                                                                      else ["sdpa", "eager"])
    results = {}
    for shape in args.shape.split(","):
        config = Qwen2Config(vocab_size=151_936, intermediate_size=4 * SHAPES[shape]["hidden_size"], **SHAPES[shape])
        for data in args.data.split(","):
            position_ids = packed_position_ids(args.batch, args.tokens, DOCUMENTS[data], seed=0)
            documents = int((position_ids == 0).sum())
            choice = measure_packed_attention(config, Qwen2Attention, position_ids, device, dtype, candidates,
                                              repeats=args.repeats)
            for impl in candidates:
                results[f"{shape} {data} {impl}"] = {
                    "ms": choice.step_ms.get(impl, float("nan")),
                    "setup_ms": choice.setup_ms.get(impl, float("nan")),
                    "x_sdpa": choice.step_ms.get("sdpa", float("nan")) / choice.step_ms.get(impl, float("nan")),
                    "documents": documents, "chosen": "yes" if impl == choice.implementation else "",
                    "excluded": choice.excluded.get(impl, "")[:60],
                }
    report(f"Estimated attention ms per step ({device}, {dtype}, {args.batch} x {args.tokens} packed tokens)",
           "shape data implementation", [("ms/step", "ms", ".1f"), ("setup ms", "setup_ms", ".0f"), ("sdpa/this", "x_sdpa", ".2f"),
                                         ("documents", "documents", "d"), ("chosen", "chosen", "s"),
                                         ("excluded", "excluded", "s")], results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
