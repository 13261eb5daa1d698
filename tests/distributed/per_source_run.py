"""Evaluation and one training step of a two-source mixture, launched by tests/test_per_source_loss.py with or
without torchrun (CPU, gloo).

usage: [torchrun --nproc_per_node=N] tests/distributed/per_source_run.py MODEL_DIR DATASETS_JSON OUT_DIR BATCH_PER_DEVICE PACKING
Rank 0 writes the per-source figures to OUT_DIR/per_source.json: the evaluation's metrics of the untrained model and
the first training step's log line.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the checkout

from src.config import SFTConfig  # noqa: E402
from src.distributed import exit_rank, shutdown  # noqa: E402
from src.training.sft_trainer import SFTTrainer  # noqa: E402


def main() -> None:
    model_dir, datasets, out, batch, packing = sys.argv[1:6]
    config = SFTConfig(model_name=model_dir, datasets=datasets, output_dir=out, use_lora=False, learning_rate=1e-3,
                       max_steps=1, per_device_train_batch_size=int(batch), per_device_eval_batch_size=int(batch),
                       gradient_accumulation_steps=1, warmup_ratio=0.0, lr_scheduler_type="constant",
                       evaluation_strategy="no", gradient_checkpointing=False, group_by_length=False,
                       validation_split_ratio=0.5, packing=packing == "1", max_seq_length=64 if packing == "1" else 160,
                       dataloader_pin_memory=False, ddp_backend="gloo" if "RANK" in os.environ else None, seed=0,
                       overwrite_output_dir=True, logging_steps=1, save_steps=10_000)
    trainer = SFTTrainer(config)
    trainer.prepare()
    metrics = trainer.evaluate_model()
    trainer.trainer.train()
    step = next(e for e in trainer.trainer.state.log_history if "loss" in e)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(out, "per_source.json"), "w") as fh:
            json.dump({"eval": metrics, "train": step}, fh)
    shutdown()
    exit_rank(0)


if __name__ == "__main__":
    main()
