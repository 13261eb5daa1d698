"""The training report written at the end of ``train()``: a loss plot and a model card."""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

PLOT_FILE = "training_curves.png"


def loss_curves(log_history: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, training loss) and (step, validation loss) pairs from ``Trainer.state.log_history``."""
    train = [(e["step"], float(e["loss"])) for e in log_history if "loss" in e and "step" in e]
    val = [(e["step"], float(e["eval_loss"])) for e in log_history if "eval_loss" in e and "step" in e]
    return train, val


def plot_losses(log_history: list[dict[str, Any]], path: str, title: str = "") -> str | None:
    """Write a PNG of training and validation loss against optimizer steps; returns the path (None if no data)."""
    train, val = loss_curves(log_history)
    if not train and not val:
        logger.warning("no logged losses to plot (logging_steps larger than the run?); %s not written", path)
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install matplotlib): %s not written", path)
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="training loss", color="#1f77b4")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="#d62728")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per trained token")
    ax.set_title(title or "SFT loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def model_card(metadata: dict[str, Any], metrics: dict[str, float], has_plot: bool) -> str:
    """A README.md for a saved run: what it is, how it was trained, how to use it."""
    config = metadata.get("config", {})
    norm = metadata.get("normalization") or {}
    changed = [k for k, v in norm.items() if k != "preset" and v not in (False, "keep")]
    hyper = ["learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
             "gradient_accumulation_steps", "warmup_ratio", "lr_scheduler_type", "weight_decay", "max_seq_length",
             "packing", "use_lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "bf16", "seed"]
    lines = [
        f"# SFT model: {os.path.basename(str(metadata.get('model_name', 'model')).rstrip('/'))}",
        "",
        f"Supervised fine-tuning ({'LoRA adapter' if metadata.get('use_lora') else 'full fine-tuning'}) of "
        f"`{metadata.get('model_name')}` on `{metadata.get('dataset_path')}`, completed "
        f"{metadata.get('training_completed_at') or 'not yet'}.",
        "",
        "## Data and formatting",
        "",
        f"- Examples: {metadata.get('examples')}; truncated: {metadata.get('truncated_examples')}; "
        f"dropped: {metadata.get('dropped_examples')}",
        f"- Template: `{metadata.get('instruction_template')}`; response template: `{metadata.get('response_template')!r}`; "
        f"end token: `{metadata.get('end_token')}`",
        f"- System prompt: {metadata.get('system_prompt')!r}",
        f"- Arabic normalization: preset `{norm.get('preset')}` ({', '.join(changed) or 'no changes'})",
        f"- Packing: {metadata.get('packing')}; padding efficiency: {_fmt(metadata.get('padding_efficiency'))}",
        "",
        "## Hyperparameters",
        "",
        "| field | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(config.get(k))} |" for k in hyper if k in config],
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())],
        "",
    ]
    if has_plot:
        lines += [f"![training and validation loss]({PLOT_FILE})", ""]
    lines += [
        "## Use",
        "",
        "```python",
        "from src.config import SFTConfig",
        "from src.training.sft_trainer import SFTTrainer",
        "",
        "trainer = SFTTrainer(SFTConfig())",
        "trainer.load_model(\"<this directory>\")  # restores template and normalization",
        "print(trainer.generate_response(\"اشرح لي مفهوم التعلم العميق\", max_length=256))",
        "```",
        "",
        "With plain transformers, format prompts with the template above; `generation_config.json` stops at the end token.",
        "",
    ]
    return "\n".join(lines)


def write_report(output_dir: str, metadata: dict[str, Any], log_history: list[dict[str, Any]],
                 metrics: dict[str, float]) -> None:
    has_plot = plot_losses(log_history, os.path.join(output_dir, PLOT_FILE),
                           title=f"SFT of {metadata.get('model_name')}") is not None
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as fh:
        fh.write(model_card(metadata, metrics, has_plot))
