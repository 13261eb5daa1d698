"""Loading models and tokenizers: hub ids, local directories, and the offline tiny default."""

from __future__ import annotations

import logging
import os
from typing import Any

from src.distributed import main_process_first, pid_alive
from src.models.tiny import TINY_MODEL_NAME, TINY_MODELS, build_tiny_model, corpus_texts, tiny_config

logger = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded; the message says what was expected."""


# Files without which a local folder is not a usable tokenizer (any one of them is enough).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")
# What a complete tiny base model folder holds (the build writes them, then renames the folder into place).
TINY_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` can be a hub model id: 'name' or 'org/name' of ASCII letters, digits, '-', '_' and '.', not
    starting or ending with '-' or '.', without '--' or '..', at most 96 characters (huggingface_hub's own rule)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name.isascii():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _looks_local(name: str) -> bool:
    """A name that can only be a filesystem path: one that cannot be a hub id (more than one '/', a leading '.', '/'
    or '~', a backslash, a space, a character or length a hub id does not allow: ``_is_hub_id``), or whose first part
    is a local folder (``models/my-run`` when ``models/`` exists: a mistyped path, not a hub id). Such a name that
    does not exist fails at once instead of waiting on the network."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or not _is_hub_id(name):
        return True
    return "/" in name and os.path.isdir(name.split("/", 1)[0])


def _where_missing(path: str) -> str:
    """Where a path that does not exist stops existing: " (no folder 'mdels' in /work)"."""
    current = os.path.normpath(os.path.expanduser(path))
    while True:
        parent = os.path.dirname(current)
        if parent == current:
            return ""
        if not parent or os.path.exists(parent):
            break
        current = parent
    if parent and not os.path.isdir(parent):
        return f" ({parent!r} is a file, not a folder)"
    return f" (no folder {os.path.basename(current)!r} in {parent!r})" if parent else \
        f" (no folder {os.path.basename(current)!r} in the current folder, {os.getcwd()})"


def _offline_flag() -> str | None:
    """``"HF_HUB_OFFLINE=1"`` (or ``"TRANSFORMERS_OFFLINE=1"``) when the hub may not be reached, else None."""
    from huggingface_hub import constants

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").upper() in constants.ENV_VARS_TRUE_VALUES:
            return f"{variable}=1"
    return "HF_HUB_OFFLINE=1" if constants.is_offline_mode() else None


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local hub cache holds ``repo_id``'s config (a model's, or a LoRA adapter's)."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in ("config.json", "adapter_config.json"))


def _built_model_type(path: str) -> str | None:
    import json

    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            return json.load(fh).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _build_tiny(path: str, corpus_path: str | None, seed: int, family: str = "qwen2") -> None:
    """Build the tiny ``family`` model into a temporary sibling and rename it into place: never a half-built folder.
    A complete folder of the same family is reused; one of another family (the run switched ``model_name``) is
    rebuilt: it is this project's own build, a deterministic function of the corpus and seed."""
    import shutil

    if os.path.isdir(path):
        missing = [f for f in TINY_MODEL_FILES if not os.path.isfile(os.path.join(path, f))]
        wanted = tiny_config(family, 8).model_type
        if not missing and _built_model_type(path) == wanted:
            return
        if missing:
            logger.warning("%s is incomplete (missing %s; an earlier build was interrupted): building it again",
                           path, ", ".join(missing))
        else:
            logger.warning("%s holds a tiny %s model, not local:tiny-%s: building it again", path,
                           _built_model_type(path), family)
        shutil.rmtree(path)
    logger.info("Building the tiny random-init %s model and tokenizer in %s", family, path)
    texts = corpus_texts(corpus_path) if corpus_path and corpus_path.endswith(".jsonl") else None
    _remove_dead_builds(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_model(family, texts, tmp, seed=seed)
    os.replace(tmp, path)


def _remove_dead_builds(path: str) -> None:
    """Remove ``<path>.tmp-<pid>`` folders of builds whose process is gone (killed, or stopped by a full disk)."""
    import glob
    import shutil

    for leftover in glob.glob(glob.escape(path) + ".tmp-*"):
        pid = leftover.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            logger.info("removing %s, left by a tiny-model build that did not finish", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def resolve_model_path(model_name: str, output_dir: str, corpus_path: str | None = None, seed: int = 0) -> str:
    """Turn ``config.model_name`` into something ``from_pretrained`` can load.

    - ``local:tiny-qwen2`` (or another of ``src.models.tiny.TINY_MODELS``: ``local:tiny-qwen3``,
      ``local:tiny-qwen3-moe``, ``local:tiny-qwen3.5``, ``local:tiny-qwen3.5-moe``): builds the tiny random-init
      model once into ``<output_dir>/base_model`` (reused afterwards) and returns that directory;
    - an existing directory: returned as is (it must hold ``config.json``);
    - a name that cannot be a hub id (``_looks_local``) and does not exist: :class:`ModelLoadError` at once, naming the
      first missing folder (no network is tried);
    - a hub id, returned unchanged for ``from_pretrained``; offline (``HF_HUB_OFFLINE=1``), one that is not in the
      hub cache is a :class:`ModelLoadError` at once.
    """
    if model_name.startswith("local:"):
        if model_name not in TINY_MODELS:
            raise ModelLoadError(f"unknown local model {model_name!r}; the built-in offline models are "
                                 f"{', '.join(TINY_MODELS)} (default {TINY_MODEL_NAME!r})")
        path = os.path.join(output_dir, "base_model")
        # Under torchrun the main process builds it; the other ranks wait, then find it built.
        with main_process_first():
            _build_tiny(path, corpus_path, seed, TINY_MODELS[model_name])
        return path
    expanded = os.path.expanduser(model_name)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")) and not os.path.isfile(
            os.path.join(expanded, "adapter_config.json")
        ):
            raise ModelLoadError(f"model directory {model_name!r} has no config.json; expected a saved transformers model")
        return expanded
    if os.path.exists(expanded):
        raise ModelLoadError(f"model path {model_name!r} is a file; expected a local model directory, a hub id like "
                             f"'Qwen/Qwen2.5-7B', or {TINY_MODEL_NAME!r}")
    if _looks_local(model_name):
        raise ModelLoadError(
            f"model path {model_name!r} does not exist{_where_missing(model_name)}; expected a local model directory, "
            f"a hub id like 'Qwen/Qwen2.5-7B' ('name' or 'org/name' of letters, digits, '-', '_' and '.'), or "
            f"{TINY_MODEL_NAME!r}"
        )
    offline = _offline_flag()
    if offline and not _in_hub_cache(model_name):
        from huggingface_hub import constants

        raise ModelLoadError(
            f"model {model_name!r} is not in the hub cache ({constants.HF_HUB_CACHE}) nor a local folder, and {offline} "
            f"is set, so nothing is downloaded: download it where there is network (huggingface-cli download "
            f"{model_name}), give a local model directory, or unset {offline.split('=')[0]}"
        )
    return model_name


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a local folder or hub id; a local folder without tokenizer files is an error (transformers
    would otherwise fall back to a near-empty tokenizer and train on nonsense without a word)."""
    from transformers import AutoTokenizer

    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ModelLoadError(f"{path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); copy the "
                             "tokenizer of the base model there or set tokenizer_name")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a tokenizer from {path!r}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        # Padding is masked by position, never by id, so reusing EOS for padding is safe here.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pick_attn_implementation(requested: str | None) -> str:
    import importlib.util

    import torch

    if requested and requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def bf16_supported() -> bool:
    """Whether a CUDA GPU with bfloat16 support is present (compute capability >= 8.0)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def check_bf16(bf16: bool) -> None:
    """bf16 needs a GPU with bfloat16 support; say so plainly instead of transformers' generic error."""
    import torch

    if not bf16:
        return
    if not torch.cuda.is_available():
        raise ValueError("SFTConfig.bf16=True needs a CUDA GPU with bfloat16 support, and none was found "
                         "(CPU-only machine); set bf16=False")
    if not torch.cuda.is_bf16_supported():
        raise ValueError("SFTConfig.bf16=True but this GPU does not support bfloat16 (needs compute capability "
                         ">= 8.0, e.g. A100/H100); set bf16=False")


def load_causal_lm(path: str, *, trust_remote_code: bool = False, attn_implementation: str | None = None,
                   bf16: bool = False, bf16_weights: bool = True, dtype: Any = None,
                   quantization: Any = None) -> Any:
    """Load a causal LM. With ``bf16``, weights are stored in bfloat16 only when ``bf16_weights``: a frozen
    LoRA base or inference; full fine-tuning keeps float32 master weights under bf16 autocast, since AdamW
    updates on bfloat16 weights lose most small steps. ``dtype`` (a torch dtype or "auto": the checkpoint's
    own) overrides both, for exporting."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype is None:
        dtype = torch.bfloat16 if bf16 and bf16_weights else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            trust_remote_code=trust_remote_code,
            attn_implementation=pick_attn_implementation(attn_implementation),
            dtype=dtype,
            **({"quantization_config": quantization, "device_map": {"": 0}} if quantization is not None else {}),
        )
    except Exception as exc:  # safetensors, torch and json errors of a damaged folder all land here
        raise ModelLoadError(f"could not load a causal LM from {path!r}: {type(exc).__name__}: {exc}") from exc
    return model


def check_quantization(load_in_4bit: bool, load_in_8bit: bool) -> None:
    """bitsandbytes quantization needs a CUDA GPU and the package; say which is missing."""
    import importlib.util

    import torch

    if not (load_in_4bit or load_in_8bit):
        return
    flag = "load_in_4bit" if load_in_4bit else "load_in_8bit"
    if not torch.cuda.is_available():
        raise ValueError(f"SFTConfig.{flag}=True needs a CUDA GPU (bitsandbytes quantization), and none was found; "
                         "set it to False (LoRA on an unquantized base) or run on a GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"SFTConfig.{flag}=True needs the bitsandbytes package: pip install -e '.[qlora]'")


def quantization_config(load_in_4bit: bool, load_in_8bit: bool) -> Any:
    """QLoRA's settings (NF4, double quantization, bf16 compute), or 8-bit; None when not quantizing."""
    if not (load_in_4bit or load_in_8bit):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def apply_lora(model: Any, r: int, alpha: int, dropout: float, target_modules: list[str], gradient_checkpointing: bool,
               *, use_dora: bool = False, use_rslora: bool = False, modules_to_save: list[str] | None = None,
               quantized: bool = False, train_router: bool = False) -> Any:
    """Wrap ``model`` with LoRA adapters (peft); with gradient checkpointing, make inputs require grads.
    ``target_modules=['all-linear']`` targets every linear layer but the output head (peft's own rule);
    a quantized base goes through ``prepare_model_for_kbit_training`` first.

    MoE models (``src.models.architectures``): the experts' fused weights are parameters, not linear layers, so
    ``all-linear`` (or the name ``experts``) reaches them through peft's ``target_parameters`` (one adapter per
    expert, merged by export like any other). The routers never get adapters; ``train_router`` trains them in
    full next to the adapters (``modules_to_save``) instead of leaving them frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    # (here, not at the top: src.config imports this module, and architectures imports torch and accelerate)
    from src.models.architectures import EXPERT_PARAMETERS, ROUTER_MODULES, is_moe, model_config

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    all_linear = list(target_modules) == ["all-linear"]
    moe = is_moe(model_config(model))
    wants_experts = moe and (all_linear or "experts" in target_modules)
    target_modules = [m for m in target_modules if not (moe and m == "experts")]
    missing = [] if all_linear else [m for m in target_modules if m not in names]
    missing += [m for m in modules_to_save or [] if m not in names]
    if missing:
        raise ModelLoadError(
            f"lora_target_modules/modules_to_save {missing} are not modules of this model; available linear layers "
            f"include {sorted(n for n in names if n.endswith('_proj'))} (or use ['all-linear'])"
            + ("; 'experts' targets the expert weights of MoE models only" if "experts" in missing else "")
        )
    parameter_names = [name for name, _ in model.named_parameters()]
    expert_parameters = [p for p in EXPERT_PARAMETERS if any(n.endswith("." + p) for n in parameter_names)] \
        if wants_experts else []
    if expert_parameters and dropout:
        raise ModelLoadError(f"lora_dropout={dropout}: peft's adapters on fused expert weights ({', '.join(expert_parameters)}) "
                             "do not support dropout; set lora_dropout: 0 to adapt the experts, or list the modules to "
                             "adapt without 'all-linear'/'experts' to leave the experts frozen")
    routers = [m for m in ROUTER_MODULES if m in names] if moe else []
    if routers and (set(routers) & set(target_modules)):
        raise ModelLoadError(f"lora_target_modules names the MoE routers {sorted(set(routers) & set(target_modules))}; "
                             "routers are trained in full or not at all: set lora_train_router=true instead")
    if train_router and not routers:
        raise ModelLoadError("lora_train_router=True but this model has no MoE routers")
    save = list(modules_to_save or []) + ([m for m in routers if m not in (modules_to_save or [])] if train_router else [])
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        # With frozen embeddings, checkpointed blocks would see inputs without grad and return no grads.
        model.enable_input_require_grads()
    if all_linear and moe:
        # peft's own "all-linear" expands MoE models with target_parameters of its choosing, the router's weight
        # among them: name the linear layers ourselves (every one but the output head and the routers).
        import torch

        head = model.get_output_embeddings()
        target_modules = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                                 if isinstance(module, torch.nn.Linear) and module is not head} - set(routers))
        all_linear = False
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules="all-linear" if all_linear else (list(target_modules) or None),
                      target_parameters=expert_parameters or None, exclude_modules=routers or None,
                      task_type="CAUSAL_LM", bias="none", use_dora=use_dora, use_rslora=use_rslora,
                      modules_to_save=save or None)
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    logger.info("LoRA: %s trainable parameters of %s (%.3f%%), adapter %.1f MB%s%s", f"{trainable:,}", f"{total:,}",
                100 * trainable / max(total, 1), size / 1e6,
                f"; expert weights adapted ({', '.join(expert_parameters)})" if expert_parameters else "",
                f"; routers {'trained in full' if train_router else 'frozen'}" if routers else "")
    return model


def check_liger(use_liger_kernel: bool) -> None:
    """Liger's kernels are Triton kernels: they need a CUDA GPU and the liger-kernel package; say which is missing."""
    import torch

    if not use_liger_kernel:
        return
    if not torch.cuda.is_available():
        raise ValueError("SFTConfig.use_liger_kernel=True needs a CUDA GPU (Liger's kernels are Triton kernels), and "
                         "none was found; set it to False on this machine")
    from transformers.utils import is_liger_kernel_available

    if not is_liger_kernel_available():
        raise ValueError("SFTConfig.use_liger_kernel=True needs the liger-kernel package: pip install -e '.[liger]'")
