#!/usr/bin/env python
"""Per-step time and peak memory of the SFT losses on a GPU: 0.5B Qwen2 shape, bf16 autocast, AdamW.

    python bench/loss_gpu_steps.py [--trained 150] [--steps 10] [--profile]

Random token ids in [4, 2048] rows, a varying number of trained positions per step (about --trained),
the same batches for every variant: full_logits, trained_tokens (fused step, 256-row chunks), the same with
the gathered rows rounded up to a multiple of 256, and the previous checkpointed 4,096-row chunks. Prints each step's CUDA-synchronized time, the median, and the peak memory.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from src.training.losses import FullLogitsLoss, TrainedTokensLoss  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trained", type=int, default=150)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
                         max_position_embeddings=32768)
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).cuda().train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.warmup + args.steps):
        ids = torch.randint(0, 151936, (4, 2048), generator=g)
        labels = torch.full_like(ids, -100)
        n = max(1, args.trained + int(torch.randint(-args.trained // 3 - 1, args.trained // 3 + 1, (1,), generator=g)))
        flat = torch.randperm(4 * 2048, generator=g)[:n]
        labels.view(-1)[flat] = ids.view(-1)[flat]
        batches.append({"input_ids": ids.cuda(), "labels": labels.cuda()})
    variants = [("full_logits", FullLogitsLoss()), ("trained_tokens", TrainedTokensLoss()),
                ("trained_tokens_rows256", TrainedTokensLoss(row_multiple=256)),
                # the previous implementation: the head's own forward per 4,096-row chunk, recomputed in backward
                ("trained_tokens_checkpointed_4096", TrainedTokensLoss(4096, fused=False))]
    for name, loss in variants:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for i, batch in enumerate(batches):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                result = loss(model, batch)
            result.loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
        print(f"{name:24s} median {statistics.median(times)*1000:7.1f} ms  mean {statistics.mean(times)*1000:7.1f} ms  "
              f"steps {[round(x*1000) for x in times]}  peak {torch.cuda.max_memory_allocated()/2**30:.1f} GiB", flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    result = loss(model, batches[-1])
                result.loss.backward()
                optim.step()
                optim.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)


if __name__ == "__main__":
    main()
