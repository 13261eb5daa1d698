"""Train under a hard memory limit, launched by tests/test_streaming.py.

usage: tests/bounded_memory_run.py MODEL_DIR DATA OUT_DIR CACHE_DIR BUDGET_MIB STREAM(0|1)
The tokenizer and model are loaded first; then the process's data segment (private writable memory: the Python
heap, numpy and torch arrays; not memory-mapped files) is capped at what it uses plus BUDGET_MIB with
RLIMIT_DATA, and two training steps run. Exit code 0: trained; 3: ran out of memory. Prints the cap and the
data segment's peak.
"""

import importlib
import importlib.util
import os
import resource
import sys

import numpy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.config import SFTConfig  # noqa: E402
from src.training.sft_trainer import SFTTrainer  # noqa: E402


def data_segment_kib() -> dict:
    with open("/proc/self/status") as fh:
        fields = dict(line.split(":", 1) for line in fh)
    return {name: int(fields[name].split()[0]) for name in ("VmData", "VmHWM")}


def main() -> int:
    model_dir, data, out, cache, budget_mib, stream = sys.argv[1:7]
    config = SFTConfig(model_name=model_dir, dataset_path=data, output_dir=out, use_lora=False, max_steps=2,
                       per_device_train_batch_size=1, per_device_eval_batch_size=1, stream_data=stream == "1", packing=True, max_seq_length=1024,
                       dataset_cache_dir=cache, validation_split_ratio=0.001, evaluation_strategy="no",
                       gradient_checkpointing=False, dataloader_pin_memory=False, group_by_length=False, save_steps=10_000)
    trainer = SFTTrainer(config)
    trainer.setup_model()
    # What every run loads whatever its data: the libraries imported on the way (accelerate imports DeepSpeed
    # when it is installed; the report plots with matplotlib) and numpy's BLAS buffers, allocated on first use.
    # The cap is on what the data costs.
    for module in ("deepspeed", "matplotlib.pyplot"):
        if importlib.util.find_spec(module.split(".")[0]) is not None:
            importlib.import_module(module)
    numpy.ones((64, 64)) @ numpy.ones((64, 64))
    start = data_segment_kib()["VmData"]
    cap = (start + int(budget_mib) * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    print(f"data segment {start >> 10} MiB after loading the model; capped at {cap >> 20} MiB", flush=True)
    try:
        trainer.train()
    except MemoryError as exc:  # numpy, Python and pyarrow (ArrowMemoryError) allocation failures
        import traceback

        traceback.print_exc()
        print(f"out of memory: {type(exc).__name__}: {exc}", flush=True)
        return 3
    except RuntimeError as exc:
        if "alloc" not in str(exc):
            raise
        print(f"out of memory: {exc}", flush=True)
        return 3
    print(f"trained; data segment {data_segment_kib()['VmData'] >> 10} MiB at the end", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
