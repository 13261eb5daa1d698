"""Tracking and training controls: TensorBoard under output_dir, NEFTune in training only, early stopping."""

import glob
import os

import pytest

from src.config import SFTConfig
from src.training.sft_trainer import SFTTrainer
from tests.helpers import PAIRS, make_config, write_jsonl


def test_tensorboard_event_files_under_output_dir_hold_the_logged_losses(tiny_model_dir, pairs_file, tmp_path,
                                                                         monkeypatch):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e '.[test]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)  # nothing may land in ./runs of the working directory
    out = tmp_path / "o"
    trainer = SFTTrainer(make_config(tiny_model_dir, pairs_file, out, max_steps=4, logging_steps=1, report_to="tensorboard"))
    trainer.train()
    events = glob.glob(str(out / "runs" / "*" / "events.out.tfevents.*"))
    assert events and not os.path.exists(tmp_path / "runs")
    accumulator = EventAccumulator(os.path.dirname(events[0]))
    accumulator.Reload()
    logged = [e["loss"] for e in trainer.trainer.state.log_history if "loss" in e]
    read_back = [s.value for s in accumulator.Scalars("train/loss")]
    assert len(logged) == 4 and read_back == pytest.approx(logged, rel=1e-6)


def test_neftune_adds_noise_in_training_only(tiny_model_dir, pairs_file, tmp_path):
    def first_step_loss_and_eval(alpha, out):
        trainer = SFTTrainer(make_config(tiny_model_dir, pairs_file, out, max_steps=1, logging_steps=1, learning_rate=1e-9,
                                         eval_dataset_path=pairs_file, neftune_noise_alpha=alpha, seed=0))
        trainer.prepare()
        before = trainer.evaluate_model()["eval_loss"]
        greedy = trainer.generate_response(PAIRS[0]["instruction"], max_length=6)
        trainer.train()
        loss = next(e["loss"] for e in trainer.trainer.state.log_history if "loss" in e)
        return loss, before, trainer.final_metrics["eval_loss"], greedy

    plain = first_step_loss_and_eval(None, tmp_path / "plain")
    noisy = first_step_loss_and_eval(15.0, tmp_path / "noisy")
    assert noisy[0] != pytest.approx(plain[0], rel=1e-4)  # the training step saw noisy embeddings
    assert noisy[1] == pytest.approx(plain[1], rel=1e-6)  # evaluation before training: no noise
    assert noisy[2] == pytest.approx(plain[2], rel=1e-5)  # evaluation after training (lr ~0): no noise
    assert noisy[3] == plain[3]  # generation: no noise
    with pytest.raises(ValueError, match="neftune_noise_alpha"):
        SFTConfig(neftune_noise_alpha=-1.0)


def test_early_stopping_stops_when_eval_loss_stops_improving(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    # every decrease is smaller than the threshold, so the first evaluation is the best one
    trainer = SFTTrainer(make_config(tiny_model_dir, data, tmp_path / "o", max_steps=20, eval_dataset_path=data,
                                     evaluation_strategy="steps", eval_steps=1, save_steps=1,
                                     early_stopping_patience=2, early_stopping_threshold=100.0))
    trainer.train()
    assert trainer.trainer.state.global_step == 3  # evaluations at steps 1, 2, 3: two without enough improvement
    assert os.path.isfile(tmp_path / "o" / "model.safetensors")  # a stopped run is still a finished, saved run
    with pytest.raises(ValueError, match="early_stopping_patience"):
        SFTConfig(early_stopping_patience=2, evaluation_strategy="no")
