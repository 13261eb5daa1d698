"""The trained-tokens loss equals the specification's full-logits loss, in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from src.config import SFTConfig
from src.data.packing import SFTDataCollator, pack_dataset
from src.data.templates import get_prompt_format
from src.data.tokenization import ExampleTokenizer
from src.training.losses import FullLogitsLoss, TrainedTokensLoss, build_loss, token_loss_sum
from src.training.sft_trainer import SFTTrainer
from tests.helpers import PAIRS, load_tiny, make_config, max_rel_diff, one_sgd_step, write_jsonl


def _batch(tokenizer, packing):
    from datasets import Dataset

    et = ExampleTokenizer(tokenizer, get_prompt_format("chatml"), 96)
    examples = [(ids, labels) for ids, labels, _ in et.tokenize_batch(PAIRS)]
    dataset = Dataset.from_dict({"input_ids": [i for i, _ in examples], "labels": [lab for _, lab in examples]})
    if packing:
        dataset = pack_dataset(dataset, 96)
    return SFTDataCollator(tokenizer.pad_token_id)(list(dataset))


def _loss_and_grads(model, loss, batch, parameters_of=None):
    parameters_of = parameters_of or model
    parameters_of.zero_grad()
    result = loss(model, batch)
    result.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in parameters_of.named_parameters() if p.grad is not None}
    return result, grads


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("chunk_size", [4096, 7])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "checkpointed-chunks"])
def test_trained_tokens_loss_equals_full_logits(tiny_model_dir, packing, lora, chunk_size, fused):
    model, tokenizer = load_tiny(tiny_model_dir, lora=lora)
    batch = _batch(tokenizer, packing)
    full, full_grads = _loss_and_grads(model, FullLogitsLoss(), batch)
    trained, trained_grads = _loss_and_grads(model, TrainedTokensLoss(chunk_size, fused=fused), batch)
    assert int(trained.num_tokens) == int(full.num_tokens) > 20
    assert trained.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)
    assert set(trained_grads) == set(full_grads) and full_grads
    assert max_rel_diff(trained_grads, full_grads) < 1e-5
    # the full logits were never built: one float32 value per position, carrying the summed loss
    assert trained.outputs.logits.shape == (*batch["input_ids"].shape, 1)
    assert trained.outputs.logits.reshape(-1)[0].item() == pytest.approx(full.loss.item() * int(full.num_tokens), rel=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_fused_linear_cross_entropy_with_bias_and_ignored_rows(chunk_size):
    """The fused step on its own: loss and gradients of hidden, weight and bias equal autograd's, -100 rows ignored."""
    from src.training.losses import _LinearCrossEntropy

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=generator, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=generator, dtype=torch.float64)
    bias = torch.randn(50, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 50, (23,), generator=generator)
    targets[[0, 7, 8, 22]] = -100
    upstream = torch.tensor(0.37, dtype=torch.float64)  # what the normalisation multiplies the summed loss by

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        loss = fn(*leaves)
        (loss * upstream).backward()
        return loss.detach(), [leaf.grad for leaf in leaves]

    expected, expected_grads = grads(lambda h, w, b: F.cross_entropy(F.linear(h, w, b), targets, reduction="sum"))
    fused, fused_grads = grads(lambda h, w, b: _LinearCrossEntropy.apply(h, w, b, targets, chunk_size, torch.float64, True))
    # float64 inputs, so the only rounding is the fused step's float32 loss and weight/bias gradient accumulators
    assert fused.item() == pytest.approx(expected.item(), rel=1e-6)
    for got, want in zip(fused_grads, expected_grads):
        assert got.dtype == want.dtype and torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_a_second_backward_through_the_fused_step_is_a_clear_error():
    from src.training.losses import _LinearCrossEntropy

    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    loss = _LinearCrossEntropy.apply(hidden, weight, None, torch.tensor([1, 2, -100, 3]), 2, torch.float32, True)
    loss.backward(retain_graph=True)
    first = weight.grad.clone()
    with pytest.raises(RuntimeError, match="backward ran twice through the fused trained-tokens loss"):
        loss.backward()
    assert torch.equal(weight.grad, first)  # nothing half-applied


def test_rounded_up_row_counts_give_the_same_loss_and_gradients(tiny_model_dir):
    """row_multiple pads the trained rows with ignored ones (fewer distinct shapes): nothing changes."""
    model, tokenizer = load_tiny(tiny_model_dir)
    batch = _batch(tokenizer, True)
    full, full_grads = _loss_and_grads(model, FullLogitsLoss(), batch)
    for fused in (True, False):
        padded, padded_grads = _loss_and_grads(model, TrainedTokensLoss(7, row_multiple=64, fused=fused), batch)
        assert int(padded.num_tokens) == int(full.num_tokens) and int(full.num_tokens) % 64
        assert padded.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)
        assert max_rel_diff(padded_grads, full_grads) < 1e-5


def test_a_head_that_is_not_a_plain_linear_layer_takes_the_checkpointed_chunks(tiny_model_dir):
    """An adapter-wrapped head (peft modules_to_save) is run through its own forward, chunk by chunk."""
    from peft import LoraConfig, get_peft_model

    from src.models.architectures import unwrap_model
    from src.training.losses import _LinearCrossEntropy, _plain_linear

    model, tokenizer = load_tiny(tiny_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                             init_lora_weights=False))
    head = unwrap_model(model).get_output_embeddings()
    assert not _plain_linear(head)
    batch = _batch(tokenizer, True)
    calls = []
    original = _LinearCrossEntropy.apply
    _LinearCrossEntropy.apply = lambda *args: calls.append(1) or original(*args)
    try:
        full, full_grads = _loss_and_grads(model, FullLogitsLoss(), batch)
        trained, trained_grads = _loss_and_grads(model, TrainedTokensLoss(7), batch)
    finally:
        _LinearCrossEntropy.apply = original
    assert not calls
    assert any("modules_to_save" in name for name in full_grads)
    assert trained.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)
    assert set(trained_grads) == set(full_grads) and max_rel_diff(trained_grads, full_grads) < 1e-5


def test_fused_loss_under_bfloat16_autocast_is_as_exact_as_the_models_own_head(tiny_model_dir):
    """Under autocast the fused head computes logits in bfloat16, as the model's head does, and the loss in float32.

    Its gradients round in another order than autograd's (the 1/tokens scale comes after the bfloat16 cast), so
    they are compared with the float32 gradients: no further from them than the full-logits loss under the same
    autocast."""
    model, tokenizer = load_tiny(tiny_model_dir)
    batch = _batch(tokenizer, True)
    _, exact = _loss_and_grads(model, FullLogitsLoss(), batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, full_grads = _loss_and_grads(model, FullLogitsLoss(), batch)
        fused, fused_grads = _loss_and_grads(model, TrainedTokensLoss(16), batch)
    assert fused.loss.dtype == torch.float32
    assert fused.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)  # the same bfloat16 logits
    assert set(fused_grads) == set(full_grads) == set(exact)
    assert 0 < max_rel_diff(fused_grads, exact) <= 1.25 * max_rel_diff(full_grads, exact)


def test_trained_tokens_loss_with_gradient_checkpointing(tiny_model_dir):
    model, tokenizer = load_tiny(tiny_model_dir)
    batch = _batch(tokenizer, True)
    _, plain = _loss_and_grads(model, TrainedTokensLoss(7), batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.config.use_cache = False
    for module in model.modules():  # no dropout in the tiny model, but be explicit: compare the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    _, checkpointed = _loss_and_grads(model, TrainedTokensLoss(7), batch)
    assert max_rel_diff(checkpointed, plain) < 1e-5


def test_a_batch_without_trained_tokens_still_gives_every_parameter_a_gradient(tiny_model_dir):
    model, tokenizer = load_tiny(tiny_model_dir)
    batch = _batch(tokenizer, False)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    result, grads = _loss_and_grads(model, TrainedTokensLoss(), batch)
    assert result.loss.item() == 0.0 and int(result.num_tokens) == 0
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(grads)  # DDP needs every grad


@pytest.mark.slow  # torch.compile compiles the model first
def test_trained_tokens_loss_under_torch_compile(tiny_model_dir):
    model, tokenizer = load_tiny(tiny_model_dir)
    batch = _batch(tokenizer, True)
    expected, expected_grads = _loss_and_grads(model, FullLogitsLoss(), batch)
    compiled = torch.compile(model, backend="eager")  # Dynamo tracing without a C++ toolchain in the loop
    loss = TrainedTokensLoss(7)
    for _ in range(2):  # the second call reuses the installed head: no recompilation per step
        result, grads = _loss_and_grads(compiled, loss, batch, parameters_of=model)
        assert result.loss.item() == pytest.approx(expected.loss.item(), rel=1e-6)
        assert max_rel_diff(grads, expected_grads) < 1e-5


def test_return_outputs_gives_real_logits_and_the_same_loss(tiny_model_dir, pairs_file, tmp_path):
    """The specification's CustomSFTTrainer reads outputs.logits: asking for outputs gets them."""

    class CustomSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
            self.seen_vocab = outputs.logits.shape[-1]
            return (loss, outputs) if return_outputs else loss

    trainer = CustomSFTTrainer(make_config(tiny_model_dir, pairs_file, tmp_path / "o", instruction_template="chatml"))
    trainer.prepare()
    batch = next(iter(trainer.trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, batch)
    assert trainer.seen_vocab == trainer.model.config.vocab_size
    direct, _ = token_loss_sum(trainer.model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])
    n = (batch["labels"][:, 1:] != -100).sum()
    assert loss.item() == pytest.approx((direct / n).item(), rel=1e-6)


@pytest.mark.parametrize("loss_type", ["trained_tokens", "full_logits"])
def test_every_loss_type_trains_the_same_update(tiny_model_dir, tmp_path, loss_type):
    """One SGD step with gradient accumulation (4 x 1) equals batch 4 under either loss, and the two agree."""
    rows = [{"instruction": p["instruction"], "response": p["response"] * (1 + 2 * (i % 3))} for i, p in enumerate(PAIRS)]
    data = write_jsonl(tmp_path / "d.jsonl", rows[:4])
    accumulated = one_sgd_step(tiny_model_dir, data, tmp_path / "a", 1, 4, False, max_seq_length=160, loss_type=loss_type)
    single = one_sgd_step(tiny_model_dir, data, tmp_path / "b", 4, 1, False, max_seq_length=160, loss_type="full_logits")
    assert max_rel_diff(accumulated, single) < 1e-4


def test_tied_embeddings_stay_tied_after_training(tiny_model_dir, pairs_file, tmp_path):
    trainer = SFTTrainer(make_config(tiny_model_dir, pairs_file, tmp_path / "o", use_lora=False, max_steps=2))
    trainer.train()
    model = trainer.model
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_loss_type_is_validated_by_the_loss_module():
    with pytest.raises(ValueError, match="SFTConfig.loss_type"):
        SFTConfig(loss_type="fast")
    with pytest.raises(ValueError, match="SFTConfig.loss_chunk_size"):
        SFTConfig(loss_chunk_size=0)
    assert isinstance(build_loss("full_logits"), FullLogitsLoss)
