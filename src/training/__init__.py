"""Trainers: ``from src.training.sft_trainer import SFTTrainer, create_sft_trainer``."""
