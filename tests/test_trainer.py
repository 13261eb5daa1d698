import json
import math
import os

import pytest
import torch

from src.config import SFTConfig
from src.models.loading import ModelLoadError
from src.training.losses import FullLogitsLoss
from src.training.sft_trainer import SFTTrainer, create_sft_trainer
from tests.helpers import PAIRS, make_config, max_rel_diff, one_sgd_step, step_counting_trainer, write_jsonl

MEMO = PAIRS[:4]


@pytest.fixture(scope="module")
def memorised(tiny_model_dir, tmp_path_factory):
    """A tiny model trained (full fine-tuning) until it has memorised four pairs."""
    tmp = tmp_path_factory.mktemp("memo")
    data = write_jsonl(tmp / "memo.jsonl", MEMO)
    val = write_jsonl(tmp / "val.jsonl", MEMO)
    config = make_config(tiny_model_dir, data, tmp / "run", eval_dataset_path=val, max_steps=150,
                         per_device_train_batch_size=4, evaluation_strategy="no", eval_generation_samples=4,
                         eval_generation_max_length=40, logging_steps=10)
    trainer = create_sft_trainer(config)
    trainer.prepare()
    before = trainer.evaluate_model()
    trainer.train()
    after = trainer.evaluate_model()
    return trainer, before, after


def test_training_report_and_generation_metrics(memorised):
    trainer, before, after = memorised
    out = trainer.config.output_dir
    assert after["eval_gen_exact_match"] == 1.0 and after["eval_gen_chrf"] == pytest.approx(100.0)
    assert before["eval_gen_exact_match"] == 0.0 and before["eval_gen_chrf"] < 50
    lines = open(os.path.join(out, "eval_generations.jsonl"), encoding="utf-8").read().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["exact_match"] for line in lines)
    with open(os.path.join(out, "training_curves.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "alpaca" in card and "learning_rate" in card and "eval_loss" in card and "training_curves.png" in card
    meta = json.loads(open(os.path.join(out, "sft_metadata.json"), encoding="utf-8").read())
    assert meta["final_metrics"]["eval_gen_exact_match"] == 1.0


def test_wrong_config_type_and_method_name():
    with pytest.raises(TypeError, match="SFTConfig"):
        SFTTrainer({"model_name": "x"})
    config = SFTConfig(max_seq_length=64)
    trainer = create_sft_trainer(config)
    assert type(trainer) is SFTTrainer and trainer.config is config
    assert trainer._get_training_method() == "sft" and trainer.loss.name == "trained_tokens"


def test_memorised_pairs_are_generated_and_generation_stops(memorised):
    trainer, before, after = memorised
    assert after["eval_loss"] < 0.05 < before["eval_loss"]
    for pair in MEMO:
        assert trainer.generate_response(pair["instruction"], max_length=40) == pair["response"]


def test_batch_generate_equals_single_greedy_generation(memorised):
    trainer, _, _ = memorised
    instructions = [p["instruction"] for p in PAIRS]  # different prompt lengths: left padding is exercised
    single = [trainer.generate_response(i, max_length=12) for i in instructions]
    assert trainer.batch_generate(instructions, max_length=12, batch_size=3) == single


def test_sampling_kwargs_pass_through(memorised):
    from src.training.generation import generation_kwargs

    trainer, _, _ = memorised
    instruction, greedy = MEMO[0]["instruction"], MEMO[0]["response"]
    assert trainer.generate_response(instruction, max_length=40) == greedy
    # temperature without do_sample turns sampling on: a very hot distribution leaves the memorised answer
    torch.manual_seed(0)
    hot = [trainer.generate_response(instruction, max_length=8, temperature=50.0) for _ in range(3)]
    assert all(h != greedy for h in hot)
    torch.manual_seed(0)
    assert [trainer.generate_response(instruction, max_length=8, temperature=50.0) for _ in range(3)] == hot  # seeded
    # ... unless the caller says do_sample=False explicitly
    assert trainer.generate_response(instruction, max_length=40, temperature=50.0, do_sample=False) == greedy
    kwargs = generation_kwargs([7, 9], 0, 8, top_p=0.9, repetition_penalty=1.1)
    assert kwargs == {"top_p": 0.9, "repetition_penalty": 1.1, "do_sample": True, "max_new_tokens": 8,
                      "eos_token_id": [7, 9], "pad_token_id": 0, "use_cache": True}
    assert generation_kwargs([7], 0, 8, repetition_penalty=1.1)["do_sample"] is False
    with pytest.raises(TypeError):
        trainer.batch_generate("not a list")


def test_evaluate_model_keys_and_perplexity(memorised):
    _, before, after = memorised
    for metrics in (before, after):
        assert {"eval_loss", "eval_perplexity", "eval_runtime", "eval_samples_per_second"} <= set(metrics)
        assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-9)


def test_perplexity_does_not_overflow():
    from src.training.losses import safe_perplexity

    assert safe_perplexity(1000.0) == float("inf")
    assert safe_perplexity(0.0) == 1.0


def test_save_load_roundtrip_metadata_and_generation_config(memorised, tmp_path):
    trainer, _, _ = memorised
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "sft_metadata.json"} <= files
    assert not any(f.endswith(".bin") for f in files)
    meta = json.loads((out / "sft_metadata.json").read_text(encoding="utf-8"))
    for key in ("training_method", "instruction_template", "response_template", "packing", "max_seq_length",
                "model_name", "dataset_path", "training_completed_at"):
        assert key in meta
    assert meta["training_method"] == "sft" and meta["instruction_template"] == "alpaca"
    assert meta["response_template"] == "### Response:\n"
    assert meta["training_completed_at"].endswith("Z") and "T" in meta["training_completed_at"]
    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert trainer.tokenizer.eos_token_id in eos

    restored = SFTTrainer(SFTConfig(instruction_template="chatml"))  # formatting comes from the saved run
    restored.load_model(str(out))
    assert restored.config.instruction_template == "alpaca"
    for pair in MEMO:
        assert restored.generate_response(pair["instruction"], max_length=40) == trainer.generate_response(
            pair["instruction"], max_length=40)


def test_save_refuses_to_overwrite_another_model(memorised, tmp_path):
    trainer, _, _ = memorised
    target = tmp_path / "users_model"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        trainer.save_model(str(target))
    assert (target / "config.json").read_text() == "{}"


def test_load_model_errors(tmp_path):
    trainer = SFTTrainer(SFTConfig())
    with pytest.raises(ModelLoadError, match="not a saved sft run"):
        trainer.load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="not a directory"):
        trainer.load_model(str(tmp_path / "missing"))


def test_missing_model_path_is_a_clear_error(pairs_file, tmp_path):
    config = make_config("./no/such/model", pairs_file, tmp_path / "o")
    with pytest.raises(ModelLoadError, match="does not exist"):
        create_sft_trainer(config).train()


@pytest.mark.parametrize("use_lora", [True, False])
def test_lora_and_full_fine_tuning_both_train(tiny_model_dir, pairs_file, tmp_path, use_lora):
    config = make_config(tiny_model_dir, pairs_file, tmp_path / "o", use_lora=use_lora, max_steps=40,
                         eval_dataset_path=pairs_file, learning_rate=3e-3, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                         lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                         gradient_checkpointing=use_lora)
    trainer = create_sft_trainer(config)
    trainer.prepare()
    before = trainer.evaluate_model()["eval_loss"]
    trainer.train()
    after = trainer.evaluate_model()["eval_loss"]
    assert after < before - 0.3
    files = os.listdir(tmp_path / "o")
    if use_lora:
        assert "adapter_model.safetensors" in files and "model.safetensors" not in files
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        assert trainable < sum(p.numel() for p in trainer.model.parameters()) / 2
        restored = SFTTrainer(SFTConfig())
        restored.load_model(str(tmp_path / "o"))
        assert restored.generate_response(PAIRS[0]["instruction"], max_length=10) == trainer.generate_response(
            PAIRS[0]["instruction"], max_length=10)
    else:
        assert "model.safetensors" in files


# -- gradient accumulation ---------------------------------------------------------------------------


@pytest.mark.parametrize("packing", [False, True])
def test_gradient_accumulation_gives_the_same_update(tiny_model_dir, tmp_path, packing):
    # examples of very different lengths, so micro-batches hold different numbers of trained tokens
    rows = [{"instruction": p["instruction"], "response": p["response"] * (1 + 2 * (i % 3))} for i, p in enumerate(PAIRS)]
    data = write_jsonl(tmp_path / "ga.jsonl", rows if packing else rows[:4])
    seq = 64 if packing else 160
    accumulated = one_sgd_step(tiny_model_dir, data, tmp_path / "a", 1, 4, packing, max_seq_length=seq)
    single = one_sgd_step(tiny_model_dir, data, tmp_path / "b", 4, 1, packing, max_seq_length=seq)
    assert max_rel_diff(accumulated, single) < 1e-4

    class MeanPerMicroBatch(SFTTrainer):
        """The bug other trainers had: each micro-batch normalised by its own token count."""

        def compute_loss(self, model, inputs, return_outputs=False):
            # mean over this micro-batch's tokens (never reaching the loss object); the Trainer divides by 4
            result = FullLogitsLoss()(model, inputs)
            return (result.loss, result.outputs) if return_outputs else result.loss

    naive = one_sgd_step(tiny_model_dir, data, tmp_path / "c", 1, 4, packing, trainer_cls=MeanPerMicroBatch,
                          max_seq_length=seq)
    assert max_rel_diff(naive, single) > 1e-2  # the test can tell the difference


def test_gradient_checkpointing_with_lora_gives_the_same_update(tiny_model_dir, pairs_file, tmp_path):
    lora = dict(use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    plain = one_sgd_step(tiny_model_dir, pairs_file, tmp_path / "a", 4, 1, False, **lora)
    checkpointed = one_sgd_step(tiny_model_dir, pairs_file, tmp_path / "b", 4, 1, False, gradient_checkpointing=True, **lora)
    lora_b = [n for n in plain if "lora_B" in n]
    assert lora_b and all(plain[n].abs().max() > 0 for n in lora_b)  # adapters received gradients
    assert max_rel_diff(checkpointed, plain) < 1e-5


@pytest.mark.slow  # trains 150 steps until the pairs are memorised
def test_chatml_model_stops_at_im_end_with_plain_transformers(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "memo.jsonl", MEMO)
    config = make_config(tiny_model_dir, data, tmp_path / "run", instruction_template="chatml", max_steps=150,
                         per_device_train_batch_size=4)
    trainer = create_sft_trainer(config)
    trainer.train()
    im_end = trainer.tokenizer.convert_tokens_to_ids("<|im_end|>")
    gen = json.loads((tmp_path / "run" / "generation_config.json").read_text())
    assert im_end in gen["eos_token_id"] and trainer.tokenizer.eos_token_id in gen["eos_token_id"]
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run")).eval()  # reads generation_config.json
    for pair in MEMO:
        prompt = trainer.example_tokenizer().encode_prompt(pair["instruction"])
        with torch.no_grad():
            out = plain.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt):].tolist()
        assert out[-1] == im_end  # stopped by itself at the end of the turn
        assert trainer.tokenizer.decode(out[:-1]) == pair["response"] == trainer.generate_response(pair["instruction"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_bf16_without_gpu_is_a_clear_error(pairs_file, tmp_path, tiny_model_dir):
    trainer = create_sft_trainer(make_config(tiny_model_dir, pairs_file, tmp_path / "o", bf16=True))
    with pytest.raises(ValueError, match="bf16=True needs a CUDA GPU"):
        trainer.train()


def test_own_mean_loss_override_is_scaled_for_accumulation(tiny_model_dir, tmp_path):
    """An override that returns its own per-micro-batch mean (the spec's CrossEntropyLoss) is divided by the
    accumulation steps, as the stock Trainer does: with equal-length examples it matches batch 4 exactly."""

    class OwnMeanLoss(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False):
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            logits, labels = outputs.logits, inputs["labels"]
            loss = torch.nn.CrossEntropyLoss()(logits[..., :-1, :].reshape(-1, logits.size(-1)), labels[..., 1:].reshape(-1))
            return (loss, outputs) if return_outputs else loss

    data = write_jsonl(tmp_path / "same.jsonl", [PAIRS[0]] * 4)
    accumulated = one_sgd_step(tiny_model_dir, data, tmp_path / "a", 1, 4, False, trainer_cls=OwnMeanLoss)
    single = one_sgd_step(tiny_model_dir, data, tmp_path / "b", 4, 1, False)
    assert max_rel_diff(accumulated, single) < 1e-4


def test_final_evaluation_problems_never_lose_the_trained_model(tiny_model_dir, tmp_path):
    conversation = [{"role": "user", "content": p["instruction"]} if i % 2 == 0 else {"role": "assistant", "content": p["response"]}
                    for i, p in enumerate(PAIRS[:4])]
    data = write_jsonl(tmp_path / "conv.jsonl", [{"messages": conversation}] * 4)
    config = make_config(tiny_model_dir, data, tmp_path / "o", eval_dataset_path=data, max_steps=2,
                         eval_generation_samples=2)
    trainer = create_sft_trainer(config)
    trainer.train()  # generation eval needs instruction rows: skipped with a warning, not a crash
    assert os.path.isfile(tmp_path / "o" / "model.safetensors")
    assert "eval_loss" in trainer.final_metrics and "eval_gen_chrf" not in trainer.final_metrics


def test_evaluate_after_load_model_in_the_same_output_dir(memorised, tmp_path):
    trainer, _, after = memorised
    out = tmp_path / "run"
    trainer.save_model(str(out))
    config = SFTConfig(output_dir=str(out), dataset_path=trainer.config.dataset_path,
                       eval_dataset_path=trainer.config.eval_dataset_path, per_device_train_batch_size=4,
                       dataloader_pin_memory=False)
    restored = SFTTrainer(config)
    restored.load_model(str(out))
    metrics = restored.evaluate_model()  # evaluating writes nothing: no "already holds a saved model" refusal
    assert metrics["eval_loss"] == pytest.approx(after["eval_loss"], rel=1e-5)


def test_no_validation_data_turns_off_evaluation_and_best_model(tiny_model_dir, pairs_file, tmp_path):
    config = make_config(tiny_model_dir, pairs_file, tmp_path / "o", max_steps=2, evaluation_strategy="steps",
                         eval_steps=1, save_steps=1, load_best_model_at_end=True, validation_split_ratio=0.0)
    trainer = create_sft_trainer(config)
    trainer.train()
    assert trainer.trainer.eval_dataset is None and "eval_loss" not in trainer.final_metrics
    assert os.path.isfile(tmp_path / "o" / "model.safetensors")


def test_generation_eval_prompts_equal_training_prompts_and_settings_round_trip(tiny_model_dir, tmp_path):
    from src.data.tokenization import IGNORE_INDEX

    rows = [{**p, "system": "أجب باختصار." if i % 2 else None} for i, p in enumerate(PAIRS[:4])]
    data = write_jsonl(tmp_path / "sys.jsonl", rows)
    config = make_config(tiny_model_dir, data, tmp_path / "o", eval_dataset_path=data, per_device_train_batch_size=1,
                         group_by_length=False, overlong_policy="drop", train_on_last_turn_only=True,
                         system_prompt="نظام عام")
    trainer = create_sft_trainer(config)
    trainer.prepare()
    seen = []
    generate = trainer.generate_from_prompts
    trainer.generate_from_prompts = lambda prompts, **kw: seen.extend(prompts) or generate(prompts, **kw)
    trainer.evaluate_generation(list(trainer.dataset["validation"]), max_length=2)
    training_prompts = []
    for row in trainer.trainer.eval_dataset:
        first_trained = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
        training_prompts.append(row["input_ids"][:first_trained])
    # each row's own system prompt (or the configured one), exactly as in its training example
    assert seen == training_prompts
    system_ids = trainer.tokenizer("أجب باختصار.", add_special_tokens=False)["input_ids"]
    assert [p[:len(system_ids)] == system_ids for p in seen] == [False, True, False, True]
    trainer.save_model()
    restored = SFTTrainer(SFTConfig())
    restored.load_model(str(tmp_path / "o"))
    assert restored.config.overlong_policy == "drop" and restored.config.train_on_last_turn_only is True
    assert restored.config.system_prompt == "نظام عام"


def test_resume_from_the_last_checkpoint(tiny_model_dir, pairs_file, tmp_path):
    first = create_sft_trainer(make_config(tiny_model_dir, pairs_file, tmp_path / "o", max_steps=4, save_steps=2))
    first.train()
    assert os.path.isdir(tmp_path / "o" / "checkpoint-4")
    steps_run = []
    Counting = step_counting_trainer(steps_run)

    again = Counting(make_config(tiny_model_dir, pairs_file, tmp_path / "o", max_steps=6, save_steps=2,
                                 resume_from_checkpoint="last", overwrite_output_dir=True))
    again.train()
    assert steps_run == [5, 6]  # continued from checkpoint-4, did not start over
    with pytest.raises(ValueError, match="no checkpoint"):
        create_sft_trainer(make_config(tiny_model_dir, pairs_file, tmp_path / "empty", max_steps=2,
                                       resume_from_checkpoint="last")).train()


def test_ctrl_c_during_the_final_evaluation_still_saves_the_model(tiny_model_dir, pairs_file, tmp_path):
    class InterruptedEval(SFTTrainer):
        def evaluate_model(self, eval_dataset=None):
            raise KeyboardInterrupt

    trainer = InterruptedEval(make_config(tiny_model_dir, pairs_file, tmp_path / "o", max_steps=2,
                                          eval_dataset_path=pairs_file))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert os.path.isfile(tmp_path / "o" / "model.safetensors")
    assert os.path.isfile(tmp_path / "o" / "sft_metadata.json")


def test_bad_resume_path_fails_before_loading_anything(tmp_path, pairs_file):
    trainer = create_sft_trainer(make_config("./no/such/model", pairs_file, tmp_path / "o",
                                             resume_from_checkpoint=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        trainer.train()  # the model path is bad too, but the checkpoint is checked first


def test_generation_eval_scores_the_answer_and_keeps_a_thinking_models_reasoning_beside_it(tiny_model_dir, tmp_path):
    """A thinking model writes '<think>...</think>' before its answer (not special tokens: decoding keeps them). The
    real generations run; their text is then given a thinking block in front, as such a model writes it."""
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS[:4])
    trainer = create_sft_trainer(make_config(tiny_model_dir, data, tmp_path / "o", eval_dataset_path=data))
    trainer.prepare()
    generate = trainer.generate_from_prompts
    plain = generate([trainer.example_tokenizer().encode_prompt(p["instruction"]) for p in PAIRS[:4]], max_length=4)
    trainer.generate_from_prompts = lambda prompts, **kw: [f"<think>\nفكرة {i}\n</think>\n\n{text}"
                                                           for i, text in enumerate(generate(prompts, **kw))]
    out = tmp_path / "gen.jsonl"
    with_thinking = trainer.evaluate_generation(PAIRS[:4], max_length=4, output_file=str(out))
    trainer.generate_from_prompts = generate
    without = trainer.evaluate_generation(PAIRS[:4], max_length=4, output_file=str(tmp_path / "plain.jsonl"))
    assert with_thinking == without  # scored on the answers alone
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prediction"] for r in rows] == plain and [r["reasoning"] for r in rows] == [f"فكرة {i}" for i in range(4)]
