"""The GPU half of hybrid linear attention with packing (src/models/architectures.py): with flash-linear-attention
and causal-conv1d on a CUDA GPU, a packed run of a Qwen3.5-architecture model lays its rows out flattened with their
document boundaries, and every packed document gets the logits it gets alone. Skipped (with the reason) elsewhere;
`bash bench/device_pending.sh` runs it on a lent GPU (part "hybrid")."""

import pytest
import torch

from src.models.architectures import linear_attention_kernels
from tests.helpers import PAIRS, make_config, write_jsonl

USABLE, WHY = linear_attention_kernels()
pytestmark = pytest.mark.skipif(not USABLE, reason=f"exact packed hybrid rows need the GPU kernels: {WHY}")


@pytest.mark.parametrize("family", ["qwen3.5", "qwen3.5-moe"])
def test_packed_hybrid_rows_are_exact_with_the_kernels(family, tiny_family_dir, tmp_path):
    from src.training.sft_trainer import SFTTrainer

    data = write_jsonl(tmp_path / "d.jsonl", PAIRS * 2)
    trainer = SFTTrainer(make_config(tiny_family_dir(family), data, tmp_path / "run", packing=True, max_steps=2,
                                     per_device_train_batch_size=2, bf16=False, attn_implementation="sdpa"))
    trainer.prepare()
    assert trainer.packed_layout().layout == "flattened-with-boundaries"
    dataset = trainer.trainer.train_dataset
    batch = trainer.trainer.data_collator([dataset[i] for i in range(2)])
    assert batch["input_ids"].shape[0] == 1 and batch["cu_seq_lens_q"].numel() >= 3
    model = trainer.model.cuda().eval()
    inputs = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items() if k != "labels"}
    cu = batch["cu_seq_lens_q"].tolist()
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits
        leaking = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False).logits
        worst_leak = 0.0
        for start, end in zip(cu, cu[1:]):
            alone = model(input_ids=inputs["input_ids"][:, start:end], use_cache=False).logits
            assert (packed[:, start:end] - alone).abs().max().item() < 1e-3  # fp32 kernels, different op order
            worst_leak = max(worst_leak, (leaking[:, start:end] - alone).abs().max().item())
    assert worst_leak > 1e-2  # negative control: the same row without its boundaries leaks
    trainer.train()  # and trains on that layout
    assert trainer.metadata()["packed_layout"]["layout"] == "flattened-with-boundaries"
