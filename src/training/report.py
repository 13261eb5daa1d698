"""The training report written at the end of ``train()``: a loss plot and a model card; texts of the run summary.

The model card (``README.md`` of the saved run) is meant to be uploaded as it is: a Hub metadata header (YAML front
matter: ``language``, ``base_model`` and ``datasets`` as hub ids only, ``library_name``, ``tags``, ``license`` when
the base model's card names one), no local paths (a local model or data file is named by its folder or file name),
settings as text rather than Python values, and the LoRA settings only for a LoRA run.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Optional

import yaml

from src.data.language import describe_language
from src.data.tokenization import drop_reason

logger = logging.getLogger(__name__)

PLOT_FILE = "training_curves.png"
PREVIEW_CHARS = 160  # a sample prompt in the end-of-run summary: its first characters
# 'name' or 'org/name' (huggingface_hub's characters); datasets are always 'org/name' (src.data.loading.HUB_ID_RE)
_HUB_MODEL_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_DATASET_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
OPTIONAL_HYPERPARAMETERS = ("neftune_noise_alpha", "early_stopping_patience")  # listed when set
LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_dora", "use_rslora",
               "modules_to_save")
HYPERPARAMETERS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                   "gradient_accumulation_steps", "warmup_ratio", "lr_scheduler_type", "weight_decay", "max_seq_length",
                   "packing", "neftune_noise_alpha", "early_stopping_patience", "seed")


def loss_curves(log_history: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, training loss) and (step, validation loss) pairs from ``Trainer.state.log_history`` (the validation
    loss of the untrained model at step 0 when the run evaluated before training, as the command line does)."""
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


# -- texts shared by the model card and the end-of-run summary -------------------------------------------------------
def preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    """``text`` on one line (whitespace runs as one space), cut to its first ``limit`` characters with the full length
    named: a 1,500-character passage in a summary reads as its start, not as a screenful."""
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return flat
    return f"{flat[:limit].rstrip()}… [{len(text):,} characters]"


def early_stop_text(info: dict[str, Any]) -> str:
    """One sentence for an early stop (``BaseTrainer.early_stopped``): where, why, and which weights the run keeps."""
    metric = info.get("metric", "eval_loss")
    threshold = info.get("threshold") or 0.0
    since = f"by more than {threshold:g} " if threshold else ""
    where = f"step {info.get('step')}" + (f" of {info['max_steps']}" if info.get("max_steps") else "")
    last, best = info.get("last_value"), info.get("best_value")
    values = []
    if isinstance(last, (int, float)):
        values.append(f"last {last:.4g}")
    if isinstance(best, (int, float)):
        values.append(f"best {best:.4g}" + (f" at step {info['best_step']}" if info.get("best_step") is not None else ""))
    kept = f"the best checkpoint (step {info['best_step']})" if info.get("best_step") is not None else "the best checkpoint"
    return (f"stopped at {where}: {metric} did not improve {since}for {info.get('patience')} evaluation(s) in a row"
            f"{' (' + ', '.join(values) + ')' if values else ''}; {kept} is the model the run keeps")


# -- the model card -------------------------------------------------------------------------------------------------
def _exists(path: str) -> bool:
    return os.path.exists(os.path.expanduser(path))


def hub_model_id(name: Any) -> Optional[str]:
    """``name`` when it is a hub model id (not ``local:...``, not a local path), else None."""
    if not isinstance(name, str) or name.startswith("local:") or _exists(name) or not _HUB_MODEL_RE.match(name):
        return None
    return name if ".." not in name and "--" not in name else None


def hub_dataset_ids(metadata: dict[str, Any]) -> list[str]:
    """The data sources of a run that are hub dataset ids ('org/name'): never a local file or folder."""
    config = metadata.get("config") or {}
    sources = [metadata.get("dataset_path"), config.get("eval_dataset_path")]
    mixture = config.get("datasets")
    if isinstance(mixture, str):
        try:
            mixture = json.loads(mixture)
        except ValueError:
            mixture = None
    if isinstance(mixture, list):
        sources += [entry.get("path") for entry in mixture if isinstance(entry, dict)]
    ids = [s for s in sources if isinstance(s, str) and _HUB_DATASET_RE.match(s) and not _exists(s)
           and not os.path.isdir(s.split("/", 1)[0])]
    return list(dict.fromkeys(ids))


def display_name(name: Any) -> str:
    """How the card names a model or data source: a hub id or ``local:`` name as it is, a local path by its last part
    (the folder or file name: the card is read on other machines)."""
    if not isinstance(name, str) or not name:
        return "—"
    if name.startswith("local:") or not (os.path.isabs(name) or _exists(name) or name.startswith(("~", "."))):
        return name
    return f"{os.path.basename(os.path.normpath(os.path.expanduser(name)))} (local)"


def _front_matter_of(readme: str) -> dict[str, Any]:
    try:
        with open(readme, encoding="utf-8") as fh:
            text = fh.read(65536)
    except OSError:
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return {}
    try:
        value = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return value if isinstance(value, dict) else {}


def base_model_license(metadata: dict[str, Any]) -> Optional[str]:
    """The license of the base model when its model card is at hand (a local folder's README.md, or the hub cache's
    copy for a hub id; nothing is downloaded). A fine-tune inherits its base model's license terms."""
    if isinstance(metadata.get("license"), str):
        return metadata["license"]
    readmes = []
    for name in (metadata.get("model_name"), metadata.get("base_model")):
        if isinstance(name, str) and os.path.isdir(os.path.expanduser(name)):
            readmes.append(os.path.join(os.path.expanduser(name), "README.md"))
    repo = hub_model_id(metadata.get("model_name"))
    if repo:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(repo, "README.md")
            if isinstance(cached, str):
                readmes.append(cached)
        except Exception:  # a card is optional; the cache may be absent or unreadable
            pass
    for readme in readmes:
        license_ = _front_matter_of(readme).get("license")
        if isinstance(license_, str) and license_.strip():
            return license_.strip()
    return None


def front_matter(metadata: dict[str, Any]) -> dict[str, Any]:
    """The Hub metadata header of a run's model card."""
    lora = bool(metadata.get("use_lora"))
    model_type = (metadata.get("architecture") or {}).get("model_type")
    tags = ["sft", "arabic", "qwen"]
    if isinstance(model_type, str) and model_type.startswith("qwen") and model_type not in tags:
        tags.append(model_type)
    tags += ["lora", "peft"] if lora else ["full-fine-tuning"]
    header: dict[str, Any] = {"language": ["ar"]}
    base = hub_model_id(metadata.get("model_name"))
    if base:
        header["base_model"] = base
    header["library_name"] = "peft" if lora else "transformers"
    license_ = base_model_license(metadata)
    if license_:
        header["license"] = license_
    header["pipeline_tag"] = "text-generation"
    header["tags"] = tags
    datasets = hub_dataset_ids(metadata)
    if datasets:
        header["datasets"] = datasets
    return header


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) or "—"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()) or "—"
    return "—" if value is None else str(value)


def _code(text: Any) -> str:
    """A short string as inline code with its newlines and tabs written as ``\\n``/``\\t`` (not Python repr)."""
    if text is None:
        return "none"
    escaped = json.dumps(str(text), ensure_ascii=False)[1:-1].replace("`", "\\u0060")
    return f"`{escaped}`" if escaped else "(empty)"


def _per_split(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{split} {count:,}" if isinstance(count, int) else f"{split} {count}"
                         for split, count in value.items()) or "none"
    return _fmt(value) if value is not None else "none"


def model_card(metadata: dict[str, Any], metrics: dict[str, float], has_plot: bool) -> str:
    """A README.md for a saved run: Hub metadata header, what it is, how it was trained, how to use it."""
    config = metadata.get("config", {}) or {}
    norm = metadata.get("normalization") or {}
    lora = bool(metadata.get("use_lora"))
    changed = [k for k, v in norm.items() if k != "preset" and v not in (False, "keep")]
    model_name = metadata.get("model_name", "model")
    title = os.path.basename(str(model_name).rstrip("/")) if not str(model_name).startswith("local:") else model_name
    data = [display_name(metadata.get("dataset_path"))] if metadata.get("dataset_path") else []
    if not data and config.get("datasets"):
        data = ["a mixture of " + ", ".join(display_name(s) for s in _mixture_paths(config.get("datasets")))]
    dropped = metadata.get("dropped_examples") or {}
    dropped_text = _per_split(dropped) if dropped else "none"
    if dropped:
        dropped_text += f" ({drop_reason(metadata.get('overlong_policy'))})"
    hyper = [k for k in HYPERPARAMETERS if k in config and not (k in OPTIONAL_HYPERPARAMETERS and config[k] is None)
             and not (k == "max_steps" and isinstance(config[k], int) and config[k] <= 0)]  # -1: epochs decide
    lines = [
        "---",
        yaml.safe_dump(front_matter(metadata), allow_unicode=True, sort_keys=False).rstrip("\n"),
        "---",
        "",
        f"# SFT model: {title}",
        "",
        f"Supervised fine-tuning ({'LoRA adapter' if lora else 'full fine-tuning'}) of `{display_name(model_name)}` "
        f"on {', '.join(f'`{d}`' for d in data) or 'the data given to the trainer'}, completed "
        f"{metadata.get('training_completed_at') or 'not yet'}.",
        "",
    ]
    if metadata.get("early_stopped"):
        lines += [f"Early stopping: {early_stop_text(metadata['early_stopped'])}.", ""]
    lines += [
        "## Data and formatting",
        "",
        f"- Examples: {_per_split(metadata.get('examples'))}; truncated: {_per_split(metadata.get('truncated_examples') or {})}; "
        f"dropped: {dropped_text}",
        f"- Template: `{metadata.get('instruction_template')}`; response template: {_code(metadata.get('response_template'))}; "
        f"end token: `{metadata.get('end_token')}`",
        f"- System prompt: {_code(metadata.get('system_prompt'))}",
        f"- Arabic normalization: preset `{norm.get('preset')}` ({', '.join(changed) or 'no changes'})",
        f"- Packing: {_fmt(metadata.get('packing'))}; padding efficiency: {_fmt(metadata.get('padding_efficiency'))}",
        "",
        "## Hyperparameters",
        "",
        "| field | value |",
        "|---|---|",
        f"| method | {'LoRA' if lora else 'full fine-tuning'} |",
        *[f"| {k} | {_fmt(config.get(k))} |" for k in hyper],
        *([f"| mixed_precision | {metadata['mixed_precision']} |"] if metadata.get("mixed_precision") else []),
        *([f"| {k} | {_fmt(config.get(k))} |" for k in LORA_FIELDS if k in config and config.get(k) not in (None, False)]
          if lora else []),
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())],
        "",
    ]
    per_source = metadata.get("per_source")
    if per_source:  # a mixture: src.training.hf_trainer computes these from the per-token losses
        lines += ["## Loss per data source", "",
                  "Trained-token cross-entropy of each source of the mixture: training over the whole run, evaluation on "
                  "its validation rows with the final model (token-weighted, so the sources recombine into the overall "
                  "loss).", "",
                  "| source | file | train loss | train tokens | eval loss | eval perplexity | eval tokens |",
                  "|---|---|---|---|---|---|---|",
                  *[f"| {name} | {_code(display_name(f.get('path'))) if f.get('path') else '—'} | {_fmt(f.get('train_loss'))} "
                    f"| {_fmt(f.get('train_tokens'))} | {_fmt(f.get('eval_loss'))} | {_fmt(f.get('eval_perplexity'))} "
                    f"| {_fmt(f.get('eval_tokens'))} |" for name, f in per_source.items()],
                  ""]
    language = metadata.get("language_consistency")
    if language:
        lines += ["## Arabic language consistency", "",
                  f"Of {language['answers']} validation answers generated by the final model (greedy): "
                  + describe_language(language) + ". An answer is flagged when it contains a run of another script "
                  "(Chinese, Cyrillic, an English sentence...; code and listed technical terms excepted); the flagged "
                  "rows are marked in `eval_generations.jsonl`.", ""]
    if has_plot:
        lines += [f"![training and validation loss]({PLOT_FILE})", ""]
    repo = config.get("hub_model_id") or "<this repository or folder>"
    loader = ("from peft import AutoPeftModelForCausalLM\n"
              f"model = AutoPeftModelForCausalLM.from_pretrained(\"{repo}\")  # loads the base model, then the adapter"
              if lora else
              "from transformers import AutoModelForCausalLM\n"
              f"model = AutoModelForCausalLM.from_pretrained(\"{repo}\")")
    lines += [
        "## Use",
        "",
        "The tokenizer's chat template formats prompts exactly as in training, and `generation_config.json` stops at "
        "the end token:",
        "",
        "```python",
        "from transformers import AutoTokenizer",
        loader,
        f"tokenizer = AutoTokenizer.from_pretrained(\"{repo}\")",
        "messages = [{\"role\": \"user\", \"content\": \"اشرح لي مفهوم التعلم العميق\"}]",
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
        "return_dict=True)",
        "output = model.generate(**inputs, max_new_tokens=256)",
        "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "With this project (restores the template and the Arabic normalization, which no chat template applies):",
        "",
        "```python",
        "from src.config import SFTConfig",
        "from src.training.sft_trainer import SFTTrainer",
        "",
        "trainer = SFTTrainer(SFTConfig())",
        "trainer.load_model(\"path/to/this/folder\")  # a local copy (huggingface_hub.snapshot_download for the Hub)",
        "print(trainer.generate_response(\"اشرح لي مفهوم التعلم العميق\", max_length=256))",
        "```",
        "",
    ]
    return "\n".join(lines)


def _mixture_paths(value: Any) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    return [e["path"] for e in value if isinstance(e, dict) and isinstance(e.get("path"), str)] \
        if isinstance(value, list) else []


def write_report(output_dir: str, metadata: dict[str, Any], log_history: list[dict[str, Any]],
                 metrics: dict[str, float]) -> None:
    has_plot = plot_losses(log_history, os.path.join(output_dir, PLOT_FILE),
                           title=f"SFT of {display_name(metadata.get('model_name'))}") is not None
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as fh:
        fh.write(model_card(metadata, metrics, has_plot))
