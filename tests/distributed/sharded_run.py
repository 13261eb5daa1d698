"""A short SFT run on one engine, launched by tests/distributed/test_sharded.py (and by hand on GPUs) to compare engines.

usage: [torchrun --nproc_per_node=N] tests/distributed/sharded_run.py ENGINE MODEL_DIR TRAIN EVAL OUT_DIR BATCH_PER_DEVICE [KEY=VALUE ...]
ENGINE: single | ddp | zero2 | zero3 (configs/deepspeed_zero*.json) | fsdp2 (configs/fsdp2.json).
Three AdamW steps (logging every step), then evaluation on EVAL; the run is saved to OUT_DIR as training saves it.
Rank 0 writes OUT_DIR/result.json: the per-step training losses and the evaluation metrics. KEY=VALUE pairs
override SFTConfig fields (JSON values), e.g. bf16=true use_lora=true.
"""

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from src.config import SFTConfig  # noqa: E402
from src.distributed import exit_rank, shutdown  # noqa: E402
from src.training.sft_trainer import SFTTrainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENGINES = {"single": {}, "ddp": {},
           "zero2": {"deepspeed": os.path.join(ROOT, "configs", "deepspeed_zero2.json")},
           "zero3": {"deepspeed": os.path.join(ROOT, "configs", "deepspeed_zero3.json")},
           "fsdp2": {"fsdp_config": os.path.join(ROOT, "configs", "fsdp2.json")},
           "fsdp2-cpu": {"fsdp_config": os.path.join(ROOT, "configs", "fsdp2.json")}}


def force_fsdp_on_cpu() -> None:
    """Test harness only: make accelerate take its FSDP2 path on CPU ranks (gloo), which it never selects itself.

    accelerate decides the engine from the device type (FSDP for accelerator devices only); here the CPU ranks
    are presented as a multi-device setup whose device is the CPU. Everything after that decision is the real
    code: accelerate's fsdp2_prepare_model, torch's fully_shard over a CPU device mesh, the Trainer, our loss.
    """
    import torch
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    import src.training.base_trainer as base_trainer

    prepare_backend = PartialState._prepare_backend

    def as_multi_device(self, cpu=False, sagemaker_dp=False, backend=None):
        backend, distributed_type = prepare_backend(self, cpu=True, sagemaker_dp=sagemaker_dp, backend=backend)
        if distributed_type != DistributedType.MULTI_CPU:
            return backend, distributed_type
        if not torch.distributed.is_initialized():  # accelerate initializes the group only on its CPU path
            torch.distributed.init_process_group("gloo")
        return "gloo", DistributedType.MULTI_GPU

    def cpu_device(self):
        if self.device is None:
            self.device = torch.device("cpu")

    PartialState._prepare_backend = as_multi_device
    PartialState.set_device = cpu_device
    base_trainer.check_fsdp_possible = lambda fsdp_config: None


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="rank %(process)d %(name)s: %(message)s")
    engine, model_dir, train, evaluation, out, batch = sys.argv[1:7]
    if engine == "fsdp2-cpu":
        force_fsdp_on_cpu()
    overrides = {key: json.loads(value) for key, value in (arg.split("=", 1) for arg in sys.argv[7:])}
    settings = dict(model_name=model_dir, dataset_path=train, eval_dataset_path=evaluation, output_dir=out,
                    use_lora=False, learning_rate=1e-3, max_steps=3, per_device_train_batch_size=int(batch),
                    per_device_eval_batch_size=2, gradient_accumulation_steps=1, warmup_ratio=0.0,
                    lr_scheduler_type="constant", evaluation_strategy="no", gradient_checkpointing=False,
                    group_by_length=False, max_seq_length=96, dataloader_pin_memory=False, seed=0, logging_steps=1,
                    max_grad_norm=1.0)
    config = SFTConfig(**{**settings, **ENGINES[engine], **overrides})
    trainer = SFTTrainer(config)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.trainer.state.log_history if "loss" in entry]
    metrics = trainer.final_metrics
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(out, "result.json"), "w") as fh:
            json.dump({"losses": losses, "eval": metrics, "engine": trainer.trainer.engine}, fh)
    shutdown()
    exit_rank(0)


if __name__ == "__main__":
    main()
