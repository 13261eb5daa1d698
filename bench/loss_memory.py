#!/usr/bin/env python
"""Peak memory and time of the SFT loss (forward + backward) on Qwen2.5's vocabulary size.

    python bench/loss_memory.py [--tokens 2048] [--repeats 2]

Compares the specification's formula (slice the logits, ``.contiguous()``, cross-entropy) with
``src.training.losses.token_loss_sum`` (shift the labels instead), each in a fresh process so that
peak RSS is comparable, on random float32 logits [4, tokens/4, 151936]. Checks that loss and gradients agree.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import report  # noqa: E402

CHILD = r"""
import resource, sys, time, torch, torch.nn.functional as F
sys.path.insert(0, {root!r})
from src.training.losses import token_loss_sum
torch.manual_seed(0)
B, L, V = 4, {tokens} // 4, 151936
logits = torch.randn(B, L, V, requires_grad=True)
labels = torch.randint(0, V, (B, L)); labels[:, : L // 5] = -100
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if {variant!r} == "spec":
    shift_logits = logits[..., :-1, :].contiguous(); shift_labels = labels[..., 1:].contiguous()
    loss = F.cross_entropy(shift_logits.view(-1, V).float(), shift_labels.view(-1), ignore_index=-100, reduction="sum")
else:
    loss, _ = token_loss_sum(logits, labels)
loss.backward()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(loss.item(), logits.grad.double().abs().sum().item(), (peak - base) / 1024, seconds)
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    results, values = {}, {}
    for name, variant in (("specification formula (slice logits)", "spec"), ("token_loss_sum (shift labels)", "ours")):
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, tokens=args.tokens, variant=variant)],
                                 capture_output=True, text=True, check=True).stdout.split()
            runs.append([float(x) for x in out])
        values[variant] = runs[0][:2]
        results[name] = {"peak_mb": statistics.median(r[2] for r in runs), "seconds": statistics.median(r[3] for r in runs)}
    same = all(abs(a - b) <= 1e-6 * max(1.0, abs(a)) for a, b in zip(values["spec"], values["ours"]))
    report(f"Loss forward+backward, {args.tokens} tokens x 151,936 vocab, float32, CPU, median of {args.repeats} "
           f"(loss and |grad| sum equal: {same})", "variant",
           [("extra peak MB", "peak_mb", ".0f"), ("seconds", "seconds", ".2f")], results, None)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
