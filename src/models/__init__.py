"""Model and tokenizer building/loading, including the offline tiny Qwen2 default."""

from src.models.loading import ModelLoadError, load_causal_lm, load_tokenizer, resolve_model_path
from src.models.tiny import TINY_MODEL_NAME, TINY_MODELS, build_tiny_model, build_tiny_qwen2

__all__ = ["ModelLoadError", "load_causal_lm", "load_tokenizer", "resolve_model_path", "TINY_MODEL_NAME", "TINY_MODELS",
           "build_tiny_model", "build_tiny_qwen2"]
