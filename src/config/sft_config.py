"""Run configuration: one dataclass per training method, validated on construction.

Field names are the specification's (``evaluation_strategy``, ``group_by_length``,
``gradient_checkpointing`` ...), even where transformers 5 renamed them; the translation to the installed
transformers lives in ``src/training/training_args.py``, and reading YAML files and command-line flags in
``src/cli/args.py``. The config states values: it checks types and ranges itself and asks the components
that own a rule (templates, normalization, data files, the loss) to check the rest, so each rule and its
message exist once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import struct
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from src.config.loss_settings import check_loss_settings
from src.data.chat_templates import parse_template_kwargs
from src.data.loading import check_data_path
from src.data.mixing import parse_eval_sources, parse_mixture, source_names
from src.data.normalization import SWITCHES, ArabicNormalizer, build_normalizer
from src.data.templates import check_template_settings, default_response_template
from src.models.loading import bf16_supported

OVERLONG_POLICIES = ("truncate", "drop", "error")
EVAL_STRATEGIES = ("no", "steps", "epoch")


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class BaseConfig:
    """Settings shared by every training method (model, data, optimisation, LoRA, logging, launch)."""

    # --- model and data -------------------------------------------------------------------------
    model_name: str = _help(
        "Hub id (e.g. 'Qwen/Qwen2.5-7B'), a local model directory, or 'local:tiny-qwen2' for a tiny "
        "random-init Qwen2-architecture model built offline (also local:tiny-qwen3, local:tiny-qwen3-moe, "
        "local:tiny-qwen3.5, local:tiny-qwen3.5-moe: see src/models/tiny.py).",
        default="Qwen/Qwen2.5-7B",
    )
    tokenizer_name: Optional[str] = _help(
        "Load the tokenizer from here instead of model_name (a hub id or a directory with tokenizer files).", default=None
    )
    dataset_path: Optional[str] = _help(
        "Training data: a .jsonl, .csv, .json or .parquet file (the JSON file may hold {'train': [...], "
        "'validation': [...]}), a folder saved by datasets (save_to_disk), or a hub dataset id ('org/name'). May "
        "be None when a datasets.Dataset is passed to create_trainer directly.",
        default=None,
    )
    datasets: Optional[Union[str, list[dict[str, Any]]]] = _help(
        "Instead of dataset_path, several sources mixed with weights: a list (YAML) or JSON text of "
        "{path, weight or fraction, split, max_samples} (src/data/mixing.py); deterministic with the seed.",
        default=None,
    )
    eval_dataset_path: Optional[str] = _help(
        "Optional separate validation file (same formats). Without it, a validation split from the "
        "data file is used, or validation_split_ratio of the training rows is held out (seeded).",
        default=None,
    )
    eval_datasets: Optional[Union[str, list[Any]]] = _help(
        "Instead of eval_dataset_path, several validation files, each reported as a source of its own "
        "(eval_<name>_loss, eval_<name>_perplexity): a list (YAML) or JSON text of paths or {path, name}; the name "
        "defaults to the file's stem, and a file named like a datasets source is that source's validation data. "
        "Nothing is held out of the training data then.", default=None)
    output_dir: str = _help("Where checkpoints, the final model and sft_metadata.json go.", default="./checkpoints/sft")
    overwrite_output_dir: bool = _help(
        "Allow saving the final model into a directory that already holds files. Off: refuse rather than "
        "overwrite a user's files.",
        default=False,
    )
    trust_remote_code: bool = _help("Run model/tokenizer code from the hub. Off unless you trust the repo.", default=False)
    attn_implementation: Optional[str] = _help(
        "'sdpa', 'eager', 'flash_attention_2', 'flex_attention' (CUDA only), or None/'auto': on a GPU with packing, "
        "the fastest exact one measured at start on the run's own packed layout (src/training/attention.py); "
        "elsewhere flash_attention_2 when installed on CUDA, else sdpa.",
        default=None,
    )
    validation_split_ratio: float = _help(
        "Share of training rows held out for validation when the data has no validation split (0 disables).",
        default=0.1,
    )
    skip_invalid_rows: bool = _help(
        "Skip (and count) rows with missing/empty/non-string fields instead of raising an error.", default=False
    )

    # --- optimisation -----------------------------------------------------------------------------
    learning_rate: float = _help("Peak learning rate.", default=2e-4)
    num_train_epochs: float = _help("Training epochs.", default=3)
    max_steps: int = _help("If > 0, total optimizer steps (overrides num_train_epochs).", default=-1)
    per_device_train_batch_size: int = _help("Micro-batch size per device (rows; packed rows when packing).", default=4)
    per_device_eval_batch_size: int = _help("Evaluation batch size per device.", default=4)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    warmup_ratio: float = _help("Share of total steps for linear warm-up, in [0, 1).", default=0.03)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    lr_scheduler_type: str = _help("Learning-rate schedule (transformers SchedulerType).", default="cosine")
    max_grad_norm: float = _help("Gradient clipping norm (0 disables clipping).", default=1.0)
    optim: str = _help(
        "Optimizer name understood by transformers. Default 'adamw_torch_fused': AdamW in one fused kernel per "
        "step (what transformers and TRL default to with torch >= 2.8; faster than 'adamw_torch', whose CUDA "
        "foreach path also holds temporaries the size of the parameters). 'adamw_torch', 'sgd', 'adafactor', ...",
        default="adamw_torch_fused")
    loss_type: str = _help(
        "'trained_tokens' (default): the LM head and float32 cross-entropy run only on trained positions, in chunks, "
        "so the full [tokens, vocab] logits never exist; 'full_logits': the specification's computation on "
        "outputs.logits. Same loss and gradients (src/training/losses.py).", default="trained_tokens")
    loss_chunk_size: int = _help(
        "Trained positions per LM-head chunk of the trained_tokens loss: only one chunk's [rows, vocabulary] logits "
        "exist at a time (about 8 bytes x rows x vocabulary at the peak).", default=256)
    router_aux_loss_coef: Optional[float] = _help(
        "MoE models: the weight of the router load-balancing loss added to the training loss. None (default): the "
        "model's own config.router_aux_loss_coef, as transformers and TRL train it; 0: off. Logged as aux_loss.",
        default=None)
    seed: int = _help("Seed for model init, shuffling and the validation hold-out.", default=42)
    gradient_checkpointing: bool = _help("Recompute activations in backward to save memory.", default=True)
    group_by_length: bool = _help("Batch rows of similar length together (examples, or packed rows when packing).",
                                  default=True)
    dataloader_drop_last: bool = _help(
        "Drop the last incomplete batch of each epoch (the count of dropped rows is logged).", default=True
    )
    dataloader_num_workers: int = _help("DataLoader worker processes.", default=0)
    dataloader_pin_memory: bool = _help("Pin host memory for faster host-to-GPU copies.", default=True)
    bf16: Optional[bool] = _help(
        "bfloat16 mixed precision: None or 'auto' (default) turns it on where a CUDA GPU supports bfloat16 and fp16 is "
        "off; True insists (a clear error without such a GPU); False turns it off.", default=None)
    fp16: bool = _help("float16 mixed precision with loss scaling, for GPUs without bfloat16 (V100, T4).",
                       default=False)

    # --- LoRA -------------------------------------------------------------------------------------
    use_lora: bool = _help("Train LoRA adapters (peft) instead of all weights.", default=True)
    lora_r: int = _help("LoRA rank.", default=16)
    lora_alpha: int = _help("LoRA scaling numerator (scale = lora_alpha / lora_r).", default=32)
    lora_dropout: float = _help("Dropout on the LoRA path, in [0, 1).", default=0.1)
    lora_target_modules: list[str] = _help(
        "Module names that get adapters, or ['all-linear'] for every linear layer but the LM head (all seven Qwen "
        "projections; on MoE models also every expert's weights, through peft's target_parameters, and on hybrid "
        "models the linear-attention projections). 'experts' in a list adds the expert weights alone.",
        default_factory=lambda: ["q_proj", "v_proj", "k_proj", "o_proj"]
    )
    lora_train_router: bool = _help(
        "MoE with LoRA: train the routers (mlp.gate, shared_expert_gate) in full next to the adapters. Off by default: "
        "the routers stay frozen, as the experts' assignment of the base model is kept.", default=False)
    use_dora: bool = _help("DoRA: weight-decomposed LoRA adapters (peft).", default=False)
    use_rslora: bool = _help("rsLoRA: scale adapters by lora_alpha / sqrt(lora_r) (peft).", default=False)
    modules_to_save: Optional[list[str]] = _help(
        "Modules trained in full next to the adapters and saved with them (e.g. ['lm_head', 'embed_tokens']).",
        default=None)
    load_in_4bit: bool = _help(
        "QLoRA: load the frozen base in 4-bit NF4 with double quantization and bf16 compute (bitsandbytes, needs a "
        "CUDA GPU; implies LoRA).", default=False)
    load_in_8bit: bool = _help("Load the frozen base in 8-bit (bitsandbytes, needs a CUDA GPU; implies LoRA).",
                               default=False)

    resume_from_checkpoint: Optional[str] = _help(
        "Continue an interrupted run: a checkpoint directory, or 'last' for the newest checkpoint-* in output_dir. The "
        "run must have the checkpoint's settings: only how often it logs, evaluates and saves, where it reports and "
        "how long it runs may change (src/training/persistence.py, RESUMABLE_SETTINGS); other changes are refused.",
        default=None,
    )
    resume_allow_changes: Optional[list[str]] = _help(
        "Settings that may differ from the checkpoint's when resuming (e.g. ['learning_rate']): the run continues with "
        "the new values, and sft_metadata.json records the change.", default=None)

    # --- evaluation, saving, logging ----------------------------------------------------------------
    evaluation_strategy: str = _help("'no', 'steps' or 'epoch' (translated to eval_strategy).", default="epoch")
    eval_steps: Optional[int] = _help("Steps between evaluations when evaluation_strategy='steps'.", default=None)
    save_steps: int = _help("Steps between checkpoints.", default=500)
    save_total_limit: Optional[int] = _help("Keep at most this many checkpoints.", default=2)
    load_best_model_at_end: bool = _help("Reload the checkpoint with the lowest eval_loss at the end.", default=False)
    early_stopping_patience: Optional[int] = _help(
        "Stop when eval_loss has not improved (by more than early_stopping_threshold) for this many evaluations; "
        "needs evaluation_strategy 'steps' or 'epoch' and keeps the best checkpoint (load_best_model_at_end).",
        default=None)
    early_stopping_threshold: float = _help("Smallest eval_loss decrease that counts as an improvement.", default=0.0)
    metric_for_best_model: Optional[str] = _help(
        "What early stopping and load_best_model_at_end watch (lower is better): None/'eval_loss' (the whole validation "
        "set), or one source of a datasets mixture, 'eval_<name>_loss' (its validation rows only).", default=None)
    use_liger_kernel: bool = _help(
        "Liger's Triton kernels for RMSNorm, SwiGLU and RoPE (pip install -e '.[liger]'; CUDA GPUs only), applied by "
        "transformers when training starts. Liger's fused cross-entropy is left off: the loss stays ours "
        "(loss_type), which already computes the LM head on trained positions only.", default=False)
    neftune_noise_alpha: Optional[float] = _help(
        "NEFTune: uniform noise of this scale on the input embeddings, in training steps only (never in evaluation "
        "or generation); typical values 5-15.", default=None)
    logging_steps: int = _help("Steps between training-loss log lines.", default=10)
    report_to: str = _help("'none', 'wandb', 'tensorboard', ... (comma-separated for several).", default="none")
    run_name: Optional[str] = _help("Run name for trackers.", default=None)
    push_to_hub: bool = _help(
        "After training, upload the saved run (output_dir) to hub_model_id (huggingface_hub; once, from the main "
        "process; checkpoints are not uploaded). Offline (HF_HUB_OFFLINE=1) is a clear error before training.",
        default=False)
    hub_model_id: Optional[str] = _help("The hub repository ('org/name') for push_to_hub.", default=None)
    hub_private_repo: bool = _help("Create the hub repository as private (when it does not exist yet).", default=True)

    # --- distributed ------------------------------------------------------------------------------
    ddp_find_unused_parameters: Optional[bool] = _help("Passed to DistributedDataParallel.", default=None)
    ddp_backend: Optional[str] = _help("'nccl', 'gloo', ... (None lets torch choose).", default=None)
    deepspeed: Optional[str] = _help(
        "Path to a DeepSpeed JSON config: configs/deepspeed_zero2.json (optimizer states and gradients sharded) or "
        "configs/deepspeed_zero3.json (parameters too; the full model is gathered when saving).", default=None)
    fsdp_config: Optional[str] = _help(
        "Path to an FSDP JSON config (transformers' fsdp_config; configs/fsdp2.json: FSDP2 fully_shard of each "
        "decoder layer, the model's own _no_split_modules (Qwen2DecoderLayer, Qwen3DecoderLayer ...), full state dict "
        "on save); setting it turns FSDP on. Needs GPUs: accelerate selects "
        "FSDP on accelerator devices only, and a CPU run is refused rather than silently unsharded.", default=None)

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ----------------------------------------------------------------------------------
    def _check_best_metric(self, bad: Any) -> None:
        """``metric_for_best_model``: eval_loss, or eval_<name>_loss of a source of the mixture."""
        metric = self.metric_for_best_model
        if metric is None or metric == "eval_loss":
            return
        names = source_names(parse_mixture(self.datasets)) if self.datasets is not None else []
        if self.eval_datasets is not None:
            names += [n for n in source_names(parse_eval_sources(self.eval_datasets)) if n not in names]
        if not (isinstance(metric, str) and metric.startswith("eval_") and metric.endswith("_loss")
                and metric[len("eval_"):-len("_loss")] in names):
            bad("metric_for_best_model", "None, 'eval_loss' or 'eval_<name>_loss' for a source of datasets or "
                "eval_datasets (" + (", ".join(f"eval_{n}_loss" for n in names) if names else
                                     "neither datasets nor eval_datasets is set") + ")")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field whose value cannot work."""

        def bad(name: str, expected: str) -> None:
            raise ValueError(f"SFTConfig.{name}={getattr(self, name)!r} is invalid: expected {expected}.")

        if self.bf16 == "auto":
            self.bf16 = None  # one spelling of "auto" from here on
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            bad("bf16", "True, False, or None/'auto' (on where the GPU supports bfloat16)")
        _check_types(self, bad)  # every int, float and bool field, this class's and its subclasses'
        self._check_ranges(bad)
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            bad("model_name", "a hub id, a local model directory or 'local:tiny-qwen2'")
        for name in ("dataset_path", "eval_dataset_path"):
            if getattr(self, name) is not None:
                _ask(name, check_data_path, getattr(self, name))
        if self.datasets is not None:
            if self.dataset_path is not None:
                bad("datasets", "None when dataset_path is set (give one or the other)")
            for source in _ask("datasets", parse_mixture, self.datasets):
                _ask("datasets", check_data_path, source.path)
        if self.eval_datasets is not None:
            if self.eval_dataset_path is not None:
                bad("eval_datasets", "None when eval_dataset_path is set (give one or the other)")
            for source in _ask("eval_datasets", parse_eval_sources, self.eval_datasets):
                _ask("eval_datasets", check_data_path, source.path)
        self._check_best_metric(bad)
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            bad("output_dir", "a directory path")
        if self.bf16 is True and self.fp16:
            bad("fp16", "False when bf16=True (choose one mixed precision)")
        if self.push_to_hub and not (isinstance(self.hub_model_id, str) and self.hub_model_id.strip()):
            bad("hub_model_id", "the hub repository ('org/name') to push to when push_to_hub=True")
        if self.load_in_4bit and self.load_in_8bit:
            bad("load_in_8bit", "False when load_in_4bit=True (choose one quantization)")
        if (self.load_in_4bit or self.load_in_8bit) and not self.use_lora:
            bad("use_lora", "True with load_in_4bit/load_in_8bit (quantized weights are frozen: only adapters train)")
        if self.use_lora:
            if (not isinstance(self.lora_target_modules, (list, tuple)) or not self.lora_target_modules
                    or not all(isinstance(m, str) and m for m in self.lora_target_modules)):
                bad("lora_target_modules", "a non-empty list of module names such as ['q_proj', 'v_proj']")
            if self.lora_alpha / self.lora_r > 16:
                bad("lora_alpha", f"at most 16 x lora_r ({16 * self.lora_r}); a scale of lora_alpha/lora_r > 16 "
                    "makes LoRA updates explode")
        if self.evaluation_strategy not in EVAL_STRATEGIES:
            bad("evaluation_strategy", f"one of {EVAL_STRATEGIES}")
        if self.load_best_model_at_end and self.evaluation_strategy == "no":
            bad("load_best_model_at_end", "False when evaluation_strategy='no' (there is nothing to compare)")
        if self.early_stopping_patience is not None and self.evaluation_strategy == "no":
            bad("early_stopping_patience", "None when evaluation_strategy='no' (early stopping watches eval_loss)")
        if self.attn_implementation not in (None, "auto", "sdpa", "eager", "flash_attention_2", "flex_attention"):
            bad("attn_implementation", "None/'auto', 'sdpa', 'eager', 'flash_attention_2' or 'flex_attention'")
        _ask("loss_type", check_loss_settings, self.loss_type, self.loss_chunk_size)
        if self.deepspeed is not None and not os.path.isfile(self.deepspeed):
            raise ValueError(f"SFTConfig.deepspeed: config file {self.deepspeed!r} does not exist.")
        if self.fsdp_config is not None and not os.path.isfile(self.fsdp_config):
            raise ValueError(f"SFTConfig.fsdp_config: config file {self.fsdp_config!r} does not exist.")
        if self.fsdp_config is not None and self.deepspeed is not None:
            raise ValueError("SFTConfig.fsdp_config: None when deepspeed is set (choose one sharding engine).")

    def _check_ranges(self, bad: Any) -> None:
        """The range of each number (its type is checked already: ``_check_types``), from :data:`RANGES`; ``bad(name,
        expected)`` raises for the first field, in table order, whose value is out of its range."""
        rules = next(RANGES[klass.__name__] for klass in type(self).__mro__ if klass.__name__ in RANGES)  # subclasses too
        for names, ok, expected in rules:
            for name in names:
                if not ok(getattr(self, name)):
                    bad(name, expected)

    @property
    def resolved_bf16(self) -> bool:
        """Whether this run uses bfloat16: ``bf16`` when set, else (auto) whether a CUDA GPU here supports it and
        ``fp16`` is off."""
        if self.bf16 is not None and self.bf16 != "auto":
            return bool(self.bf16)
        return not self.fp16 and bf16_supported()

    @property
    def mixed_precision(self) -> str:
        """'bf16', 'fp16' or 'no': what this run uses, with bf16='auto' resolved."""
        return "bf16" if self.resolved_bf16 else ("fp16" if self.fp16 else "no")

    # -- (de)serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SFTConfig(BaseConfig):
    """Configuration of a supervised fine-tuning run.

    Choices the specification leaves open, written down here:

    - ``response_template`` (None) means the template's response prefix (``"### Response:\\n"`` for
      alpaca, ``"<|im_start|>assistant\\n"`` for chatml, the text after ``{instruction}`` for custom).
      It is used to split a pre-formatted ``text`` column into untrained prompt and trained response.
    - ``overlong_policy`` decides what happens to an example longer than ``max_seq_length`` tokens:
      ``truncate`` cuts the response (no end token is trained on a cut response, since the answer did
      not end there; an example whose prompt alone does not fit is dropped), ``drop`` drops it,
      ``error`` raises. Counts are always logged.
    - ``use_lora`` defaults to True: full fine-tuning of a 7B model at the default learning rate is
      rarely what a user wants by accident.
    """

    packing: bool = _help("Pack several examples into each row (no cross-example attention).", default=False)
    instruction_template: str = _help(
        "'alpaca', 'chatml', 'custom', or 'tokenizer' (the model's own chat template: Qwen2.5 to Qwen3.8, thinking and "
        "tool turns; src/data/chat_templates.py).", default="alpaca")
    custom_template: Optional[str] = _help("Template with '{instruction}' when instruction_template='custom'.", default=None)
    response_template: Optional[str] = _help("Response prefix; None derives it from the template.", default=None)
    system_prompt: Optional[str] = _help("Optional system prompt prepended to every prompt.", default=None)
    chat_template_kwargs: Optional[Union[str, dict[str, Any]]] = _help(
        "With instruction_template='tokenizer': variables passed to the chat template for every row, as a mapping "
        "(YAML/Python) or JSON text, e.g. {\"enable_thinking\": false} (Qwen3, Qwen3.5+) or {\"reasoning_effort\": "
        "\"low\"} (Qwen3.8). Saved with the model as the template's defaults.", default=None)
    ignore_empty_think: bool = _help(
        "With instruction_template='tokenizer': leave the empty thinking block ('<think>\\n\\n</think>\\n\\n') that a "
        "thinking template (Qwen3, Qwen3.5+) writes into an assistant turn without reasoning out of the loss, as "
        "ms-swift's ignore_empty_think: trained, it teaches the model to skip thinking in thinking mode. False trains "
        "it. Reasoning that is not empty is always trained.", default=True)
    max_seq_length: int = _help("Maximum tokens per example (and per packed row).", default=512)
    overlong_policy: str = _help("'truncate', 'drop' or 'error' for examples over max_seq_length.", default="truncate")
    pad_to_multiple_of: Optional[int] = _help("Pad batch length to a multiple of this (e.g. 8 for tensor cores).", default=None)
    train_on_last_turn_only: bool = _help(
        "For multi-turn conversations: train only the last assistant turn (default: every assistant turn).", default=False
    )
    train_on_prompt: bool = _help(
        "Train the prompt tokens too: the system, user and tool messages' text (default: only the assistant turns "
        "are trained). The template's markup around them stays masked unless train_on_prompt_markup is true. An "
        "assistant turn with \"loss\": false stays masked either way.", default=False)
    train_on_prompt_markup: bool = _help(
        "With train_on_prompt: also train the template's markup of the prompts ('<|im_start|>user\\n', "
        "'### Instruction:', the assistant header), i.e. every prompt token. Default false: markup masked.",
        default=False)

    # --- Arabic normalization (src/data/normalization.py), applied identically to training and generation text ---
    normalization: str = _help("Preset: 'none', 'light' (default: tatweel, bidi controls, presentation forms) or "
                               "'search' (also diacritics, alef/yeh/taa marbuta unification, Western digits).",
                               default="light")
    arabic_nfc: Optional[bool] = _help("Unicode NFC composition (None: preset).", default=None)
    arabic_presentation_forms: Optional[bool] = _help("Map presentation forms to base letters (None: preset).", default=None)
    arabic_remove_bidi_controls: Optional[bool] = _help("Remove bidi control characters (None: preset).", default=None)
    arabic_remove_tatweel: Optional[bool] = _help("Remove tatweel (None: preset).", default=None)
    arabic_remove_diacritics: Optional[bool] = _help("Remove tashkeel (None: preset).", default=None)
    arabic_normalize_alef: Optional[bool] = _help("Unify alef forms to bare alef (None: preset).", default=None)
    arabic_normalize_alef_maqsura: Optional[bool] = _help("Map alef maqsura to yeh (None: preset).", default=None)
    arabic_normalize_taa_marbuta: Optional[bool] = _help("Map taa marbuta to heh (None: preset).", default=None)
    arabic_digits: Optional[str] = _help("'keep', 'western' or 'arabic-indic' (None: preset).", default=None)

    # --- generation-based evaluation ---
    eval_generation_samples: int = _help(
        "If > 0, evaluate_model also generates answers for this many validation rows and reports chrF, BLEU and "
        "exact match (after normalization); the generations go to <output_dir>/eval_generations.jsonl.", default=0
    )
    eval_generation_max_length: int = _help("Maximum new tokens per answer in generation-based evaluation.", default=128)
    max_foreign_script_rate: Optional[float] = _help(
        "A gate on the generation-based evaluation's Arabic language consistency (src.data.language): the final "
        "evaluation fails (after the model is saved, before any push) when more than this share of answers contain a "
        "foreign-script run (Chinese, Cyrillic, an English sentence, ...). None: measured and reported, no gate.",
        default=None)

    # --- preprocessing ---
    stream_data: bool = _help(
        "Data larger than memory: read the JSONL dataset_path (and eval_dataset_path) in a stream and tokenize it "
        "into the dataset cache on disk, packing planned from lengths alone (src/data/streaming.py); needs "
        "dataset_cache_dir. Generation-based evaluation is not available then.", default=False)
    dataset_cache_dir: Optional[str] = _help(
        "Where tokenized (and packed) splits are cached and reused when the records, tokenizer and settings are "
        "unchanged (src/data/cache.py). 'auto': $ARABIC_QWEN_SFT_CACHE, else $XDG_CACHE_HOME or ~/.cache, under "
        "arabic-qwen-sft/tokenized; None: no cache (everything in memory).", default="auto")

    def validate(self) -> None:
        super().validate()
        _ask("instruction_template", check_template_settings, self.instruction_template, self.custom_template,
             self.response_template)
        if self.chat_template_kwargs is not None:
            # held as a mapping from here on, whether given as one or as JSON text (command line, YAML)
            self.chat_template_kwargs = _ask("chat_template_kwargs", parse_template_kwargs, self.chat_template_kwargs)
            if self.instruction_template != "tokenizer":
                raise ValueError("SFTConfig.chat_template_kwargs: applies to instruction_template='tokenizer' only "
                                 f"(got instruction_template={self.instruction_template!r})")
        if self.train_on_prompt_markup and not self.train_on_prompt:
            raise ValueError("SFTConfig.train_on_prompt_markup=True needs train_on_prompt=True (it chooses whether the "
                             "prompts' template markup is trained with their text)")
        if self.overlong_policy not in OVERLONG_POLICIES:
            raise ValueError(f"SFTConfig.overlong_policy={self.overlong_policy!r} is invalid: expected one of {OVERLONG_POLICIES}.")
        _ask("normalization", self.normalizer)
        if self.stream_data:
            if self.datasets is not None or not (isinstance(self.dataset_path, str) and self.dataset_path.lower().endswith(".jsonl")):
                raise ValueError("SFTConfig.stream_data: needs dataset_path to be a .jsonl file (and no datasets mixture); "
                                 f"got dataset_path={self.dataset_path!r}")
            if self.eval_dataset_path is not None and not self.eval_dataset_path.lower().endswith(".jsonl"):
                raise ValueError(f"SFTConfig.stream_data: needs eval_dataset_path to be a .jsonl file, got {self.eval_dataset_path!r}")
            if self.dataset_cache_dir is None:
                raise ValueError("SFTConfig.stream_data: needs dataset_cache_dir (the tokenized rows live there), got None")
            if self.eval_datasets is not None:
                raise ValueError("SFTConfig.eval_datasets: None with stream_data=True (streaming reads one "
                                 "eval_dataset_path)")
            if self.eval_generation_samples:
                raise ValueError("SFTConfig.eval_generation_samples: 0 with stream_data=True (the validation rows are "
                                 "only on disk, tokenized)")

    def normalizer(self) -> ArabicNormalizer:
        """The :class:`~src.data.normalization.ArabicNormalizer` this config describes."""
        return build_normalizer(self.normalization, **{k: getattr(self, "arabic_" + k) for k in SWITCHES})

    @property
    def resolved_dataset_cache_dir(self) -> Optional[str]:
        """``dataset_cache_dir`` with 'auto' resolved (None: caching off)."""
        if self.dataset_cache_dir != "auto":
            return self.dataset_cache_dir
        if os.environ.get("ARABIC_QWEN_SFT_CACHE"):
            return os.environ["ARABIC_QWEN_SFT_CACHE"]
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "arabic-qwen-sft", "tokenized")

    @property
    def resolved_response_template(self) -> str:
        """``response_template``, or the template's own response prefix when it is None."""
        return self.response_template or default_response_template(self.instruction_template, self.custom_template)


# Bounds a value must keep to be what the user meant (each is named in its error).
MAX_LEARNING_RATE = 10.0  # far above any optimizer's useful range: a larger value is a typo (2e4 for 2e-4)

# The range of every number, in the order they are checked: (fields, the test a value passes, what is expected).
_BASE_RANGES = (
    (("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "save_steps",
      "logging_steps", "lora_r", "lora_alpha"), lambda v: v >= 1, "a positive integer"),
    # save_total_limit 0 or -1 would keep every checkpoint: None says that
    (("eval_steps", "save_total_limit", "early_stopping_patience"), lambda v: v is None or v >= 1,
     "None or a positive integer"),
    (("seed",), lambda v: 0 <= v < 2 ** 32,
     "an integer in [0, 2**32 - 1] (transformers.set_seed also seeds numpy, which takes no other)"),
    (("max_steps",), lambda v: v == -1 or v > 0, "-1 (use num_train_epochs) or a positive integer"),
    (("dataloader_num_workers",), lambda v: v >= 0, "a non-negative integer"),
    (("learning_rate",), lambda v: _float32(v) > 0 and v <= MAX_LEARNING_RATE,
     f"a positive number (non-zero in float32) of at most {MAX_LEARNING_RATE:g}; a larger one is almost certainly a "
     "typo (2e4 for 2e-4) and makes training diverge"),
    (("num_train_epochs",), lambda v: v > 0, "a positive number"),
    (("warmup_ratio", "validation_split_ratio", "lora_dropout"), lambda v: 0 <= v < 1, "a number in [0, 1)"),
    (("max_grad_norm",), lambda v: v >= 0, "a non-negative number (0 disables clipping)"),
    (("weight_decay", "early_stopping_threshold"), lambda v: v >= 0, "a non-negative number"),
    (("router_aux_loss_coef",), lambda v: v is None or v >= 0,
     "None (the model's own) or a finite number >= 0 (0 turns it off)"),
    (("neftune_noise_alpha",), lambda v: v is None or v > 0, "None or a positive number"),
)
RANGES = {
    "BaseConfig": _BASE_RANGES,
    "SFTConfig": _BASE_RANGES + (
        (("max_seq_length",), lambda v: v >= 8, "an integer >= 8"),
        (("pad_to_multiple_of",), lambda v: v is None or v >= 1, "None or a positive integer"),
        (("eval_generation_samples",), lambda v: v >= 0, "a non-negative integer (0: no generation-based evaluation)"),
        (("eval_generation_max_length",), lambda v: v >= 1, "a positive integer"),
        (("max_foreign_script_rate",), lambda v: v is None or 0 <= v <= 1, "None or a share between 0 and 1"),
    ),
}
_KINDS = {int: "an integer", float: "a finite number (float32: |x| <= 3.4e38)", bool: "true or false"}


def _float32(value: float) -> float:
    """``value`` as float32 holds it (what training computes with); ``OverflowError`` when it does not fit."""
    return struct.unpack("f", struct.pack("f", value))[0]


@functools.lru_cache(maxsize=None)
def _field_kinds(cls: type) -> dict[str, tuple[type, bool]]:
    """``{field: (int, float or bool, whether None is allowed)}`` for every such field of ``cls``, from its annotations."""
    kinds = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kind = hint if hint in _KINDS else (args[0] if len(args) == 1 and args[0] in _KINDS else None)
        if kind is not None:
            kinds[name] = (kind, type(None) in typing.get_args(hint))
    return kinds


def _check_types(config: Any, bad: Any) -> None:
    """The one type check of every number and switch: an int field holds an ``int`` (not ``True``, not ``1.5``); a
    float field an ``int`` or ``float`` that is finite in float32 (``1e39`` is finite in Python, but every weight
    would be inf after the first update); a bool field ``True`` or ``False``; None only where the field allows it."""
    for name, (kind, optional) in _field_kinds(type(config)).items():
        value = getattr(config, name)
        if value is None and optional:
            continue
        if kind is bool:
            ok = isinstance(value, bool)
        elif isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            ok = False
        elif kind is float:
            try:
                ok = math.isfinite(_float32(value))
            except OverflowError:
                ok = False
        else:
            ok = True
        if not ok:
            bad(name, ("None or " if optional else "") + _KINDS[kind])


def _ask(field_name: str, check: Any, *args: Any) -> Any:
    """Run a component's own check; its ``ValueError`` (which names the setting) is re-raised as
    ``SFTConfig.<setting>...``, or ``SFTConfig.<field_name>: ...`` when the message names no setting."""
    try:
        return check(*args)
    except ValueError as exc:
        message = str(exc)
        named = message.split("=", 1)[0] if "=" in message.split(" ", 1)[0] else message.split(" ", 1)[0]
        if named in {f.name for f in dataclasses.fields(SFTConfig)}:
            raise ValueError(f"SFTConfig.{message}") from None
        raise ValueError(f"SFTConfig.{field_name}: {message}") from None
