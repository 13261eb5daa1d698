"""Configuration: ``from src.config import SFTConfig``."""

from src.config.sft_config import BaseConfig, SFTConfig

__all__ = ["BaseConfig", "SFTConfig"]
