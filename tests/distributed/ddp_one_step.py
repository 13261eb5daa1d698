"""One SGD step of SFT, launched by tests/distributed/test_distributed.py under torchrun (CPU, gloo).

usage: torchrun --nproc_per_node=N tests/distributed/ddp_one_step.py MODEL_DIR DATA OUT_DIR BATCH_PER_DEVICE PACKING [eval]
Rank 0 writes the parameter update to OUT_DIR/update.pt; with "eval", it evaluates on DATA instead and
writes the metrics to OUT_DIR/eval.json.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from src.config import SFTConfig  # noqa: E402
from src.distributed import exit_rank, shutdown  # noqa: E402
from src.training.sft_trainer import SFTTrainer  # noqa: E402


def main() -> None:
    model_dir, data, out, batch, packing = sys.argv[1:6]
    config = SFTConfig(model_name=model_dir, dataset_path=data, output_dir=out, use_lora=False, learning_rate=1.0,
                       optim="sgd", max_grad_norm=0.0, max_steps=1, per_device_train_batch_size=int(batch),
                       gradient_accumulation_steps=1, warmup_ratio=0.0, lr_scheduler_type="constant",
                       evaluation_strategy="no", gradient_checkpointing=False, group_by_length=False,
                       validation_split_ratio=0.0, packing=packing == "1", max_seq_length=64 if packing == "1" else 160,
                       dataloader_pin_memory=False, ddp_backend="gloo" if "RANK" in os.environ else None, seed=0,
                       overwrite_output_dir=True, eval_dataset_path=data, per_device_eval_batch_size=int(batch))
    trainer = SFTTrainer(config)
    trainer.prepare()
    if sys.argv[6:7] == ["eval"]:
        metrics = trainer.evaluate_model()
        if int(os.environ.get("RANK", "0")) == 0:
            with open(os.path.join(out, "eval.json"), "w") as fh:
                json.dump(metrics, fh)
        shutdown()
        exit_rank(0)
        return
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.trainer.train()
    if int(os.environ.get("RANK", "0")) == 0:
        update = {n: (p.detach() - before[n]) for n, p in trainer.model.named_parameters()}
        torch.save(update, os.path.join(out, "update.pt"))
    shutdown()
    exit_rank(0)


if __name__ == "__main__":
    main()
