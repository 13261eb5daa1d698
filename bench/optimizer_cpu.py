"""AdamW implementations on CPU: peak RSS and step time of full fine-tuning a small Qwen2 shape (real vocabulary).

usage: OMP_NUM_THREADS=2 python bench/optimizer_cpu.py {foreach,fused,default}
One process per implementation (peak RSS is per process). Six steps of batch 2 x 256 tokens, random init;
prints peak RSS and the median time of steps 2-6. 'default' is torch.optim.AdamW's own choice (transformers'
'adamw_torch'); 'fused' is 'adamw_torch_fused', the SFTConfig default.
"""

import resource
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def main() -> None:
    name = sys.argv[1]
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151936, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    kwargs = {"fused": True} if name == "fused" else {"foreach": True} if name == "foreach" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **kwargs)
    batch = torch.randint(0, config.vocab_size, (2, 256))
    times = []
    for _ in range(6):
        start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    median = sorted(times[1:])[len(times[1:]) // 2]
    print(f"{name}: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB, "
          f"median step {median:.3f} s")


if __name__ == "__main__":
    main()
