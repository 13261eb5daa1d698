"""Loss per data source (issue 23, item 3): a mixture's sources are named, every token carries its source, and
evaluation, training logs, early stopping, the metadata and the model card report each source's trained-token loss,
computed from the very per-token losses whose sum is the overall loss."""

import json
import os

import pytest
import torch

from src.config import SFTConfig
from src.data.cache import cache_settings
from src.data.mixing import MixtureSource, parse_mixture, source_names
from src.data.packing import SFTDataCollator
from src.data.preprocess import tokenize_records
from src.training.losses import shift_labels
from src.training.sft_trainer import SFTTrainer
from tests.helpers import PAIRS, ROOT, write_jsonl

# Two sources of different lengths: the instruction pairs, and the pairs turned around with a longer answer.
SWAPPED = [{"instruction": p["response"], "response": p["instruction"] * (1 + i % 3)} for i, p in enumerate(PAIRS)]


def _mixture(tmp_path, **names):
    msa = write_jsonl(tmp_path / "msa.jsonl", PAIRS)
    swapped = write_jsonl(tmp_path / "swapped.jsonl", SWAPPED)
    return [{"path": msa, "weight": 1, **({"name": names["msa"]} if "msa" in names else {})},
            {"path": swapped, "weight": 1, **({"name": names["swapped"]} if "swapped" in names else {})}]


def _config(model_dir, tmp_path, datasets, **overrides):
    values = dict(model_name=model_dir, datasets=datasets, output_dir=str(tmp_path / "out"), use_lora=False,
                  max_steps=1, per_device_train_batch_size=2, per_device_eval_batch_size=3, validation_split_ratio=0.5,
                  evaluation_strategy="no", gradient_checkpointing=False, dataloader_pin_memory=False,
                  max_seq_length=96, warmup_ratio=0.0, lr_scheduler_type="constant", seed=3, logging_steps=1,
                  save_steps=10_000)
    values.update(overrides)
    return SFTConfig(**values)


def _trained_tokens_per_source(trainer, dataset):
    """Trained tokens of each source in ``dataset``, counted from the collated batch (shifted labels)."""
    batch = trainer.data_collator()([dataset[i] for i in range(len(dataset))])
    trained = shift_labels(batch["labels"]).ne(-100)
    counts = torch.bincount(shift_labels(batch["source_ids"])[trained], minlength=len(trainer.source_names))
    return dict(zip(trainer.source_names, counts.tolist()))


@pytest.mark.parametrize("packing", [False, True])
def test_per_source_eval_losses_recombine_exactly_into_eval_loss(tiny_model_dir, tmp_path, packing):
    trainer = SFTTrainer(_config(tiny_model_dir, tmp_path, _mixture(tmp_path, msa="msa"), packing=packing))
    trainer.prepare()
    assert trainer.source_names == ["msa", "swapped"]  # the given name, and the file's stem
    validation = trainer.trainer.eval_dataset
    assert "sources" in validation.column_names
    if packing:  # packed rows hold documents of both sources: the source is per token, not per row
        assert any(len(set(row)) > 1 for row in validation["sources"])
    seen = []
    hook = trainer.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)),
                                                   with_kwargs=True)
    metrics = trainer.evaluate_model()
    hook.remove()
    assert seen and not any("source_ids" in keys or "sources" in keys for keys in seen)  # never reaches the model
    tokens = {name: metrics[f"eval_{name}_tokens"] for name in trainer.source_names}
    assert all(tokens.values()) and sum(tokens.values()) == metrics["eval_tokens"]
    assert tokens == _trained_tokens_per_source(trainer, validation)
    recombined = sum(metrics[f"eval_{n}_loss"] * tokens[n] for n in tokens) / metrics["eval_tokens"]
    assert recombined == pytest.approx(metrics["eval_loss"], rel=1e-6)
    for name in tokens:
        assert metrics[f"eval_{name}_perplexity"] == pytest.approx(torch.tensor(metrics[f"eval_{name}_loss"]).exp().item())
    # each source's figure is the loss of its own rows: evaluated alone, they give the same value
    rows = [dict(r) for r in trainer.dataset["validation"]]
    for name in tokens:
        own = [{k: v for k, v in r.items() if k != "_source" and v is not None} for r in rows if r["_source"] == name]
        alone = trainer.evaluate_model(own)
        assert alone["eval_tokens"] == tokens[name]
        assert alone["eval_loss"] == pytest.approx(metrics[f"eval_{name}_loss"], rel=1e-5)
        assert not any(k.startswith(f"eval_{n}_") for k in alone for n in tokens)  # untagged rows: overall only


def test_training_logs_each_sources_loss_and_they_recombine_into_the_logged_loss(tiny_model_dir, tmp_path):
    # Every optimizer step sees the whole training set (2 micro-batches of half of it), so each step's tokens per
    # source are known; transformers' logged loss is the token mean of the step, which the sources must recombine into.
    config = _config(tiny_model_dir, tmp_path, _mixture(tmp_path), max_steps=3, per_device_train_batch_size=4,
                     gradient_accumulation_steps=2, dataloader_drop_last=False, group_by_length=False,
                     validation_split_ratio=0.5, evaluation_strategy="steps", eval_steps=3)
    trainer = SFTTrainer(config)
    trainer.prepare()
    assert len(trainer.trainer.train_dataset) == 8
    counts = _trained_tokens_per_source(trainer, trainer.trainer.train_dataset)
    assert all(counts.values())
    trainer.train()
    logged = [e for e in trainer.trainer.state.log_history if "loss" in e]
    assert len(logged) == 3
    for entry in logged:
        assert {f"loss_{n}" for n in counts} <= set(entry)
        recombined = sum(entry[f"loss_{n}"] * counts[n] for n in counts) / sum(counts.values())
        assert recombined == pytest.approx(entry["loss"], rel=1e-5)
    # the metadata and the model card carry the final figures per source
    metadata = json.loads((tmp_path / "out" / "sft_metadata.json").read_text(encoding="utf-8"))
    per_source = metadata["per_source"]
    assert list(per_source) == ["msa", "swapped"]
    for name, figures in per_source.items():
        assert figures["path"].endswith(f"{name}.jsonl")
        assert figures["train_tokens"] == 3 * counts[name]  # three steps over the whole training set
        assert figures["eval_loss"] == metadata["final_metrics"][f"eval_{name}_loss"]
        assert figures["eval_tokens"] == metadata["final_metrics"][f"eval_{name}_tokens"]
    run_mean = sum(per_source[n]["train_loss"] * per_source[n]["train_tokens"] for n in counts) / (3 * sum(counts.values()))
    assert run_mean == pytest.approx(sum(e["loss"] for e in logged) / 3, rel=1e-5)  # equal tokens every step
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "## Loss per data source" in card
    for name, figures in per_source.items():
        assert f"| {name} | `msa.jsonl (local)`" in card or f"| {name} | `swapped.jsonl (local)`" in card
        assert f"{figures['eval_loss']:.4g}" in card


def test_early_stopping_and_the_best_checkpoint_can_watch_one_source(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path, _mixture(tmp_path, msa="msa"), max_steps=4,
                     evaluation_strategy="steps", eval_steps=1, save_steps=1, early_stopping_patience=1,
                     metric_for_best_model="eval_swapped_loss", learning_rate=5e-3, save_total_limit=None)
    trainer = SFTTrainer(config)
    trainer.train()
    state = trainer.trainer.state
    assert trainer.trainer.args.metric_for_best_model == "eval_swapped_loss"
    evaluations = [e for e in state.log_history if "eval_swapped_loss" in e and e["step"] > 0]
    best = min(evaluations, key=lambda e: e["eval_swapped_loss"])
    assert state.best_metric == best["eval_swapped_loss"]
    assert state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    if trainer.early_stopped:
        assert trainer.early_stopped["metric"] == "eval_swapped_loss"


def test_a_source_metric_must_name_a_source_with_validation_rows(tiny_model_dir, tmp_path):
    datasets = _mixture(tmp_path, msa="msa")
    with pytest.raises(ValueError, match=r"SFTConfig.metric_for_best_model='eval_other_loss'.*eval_msa_loss, "
                                         r"eval_swapped_loss"):
        _config(tiny_model_dir, tmp_path, datasets, metric_for_best_model="eval_other_loss")
    with pytest.raises(ValueError, match="metric_for_best_model.*neither datasets nor eval_datasets is set"):
        SFTConfig(dataset_path=datasets[0]["path"], metric_for_best_model="eval_msa_loss")
    assert SFTConfig(dataset_path=datasets[0]["path"], metric_for_best_model="eval_loss")
    # validation from eval_dataset_path: not a source, so no figure per source to watch; refused before training
    config = _config(tiny_model_dir, tmp_path, datasets, eval_dataset_path=datasets[0]["path"],
                     metric_for_best_model="eval_msa_loss", evaluation_strategy="steps", eval_steps=1, save_steps=1,
                     load_best_model_at_end=True)
    with pytest.raises(ValueError, match="metric_for_best_model='eval_msa_loss': the validation rows come from "
                                         "eval_dataset_path"):
        SFTTrainer(config).prepare()


def test_source_names_are_validated_and_default_to_unique_file_stems(tmp_path):
    with pytest.raises(ValueError, match=r"datasets\[1\]\.name='a b' is invalid"):
        parse_mixture([{"path": "x.jsonl"}, {"path": "y.jsonl", "name": "a b"}])
    with pytest.raises(ValueError, match=r"datasets\[2\]\.name='news' is invalid: datasets\[0\] has that name"):
        parse_mixture([{"path": "x.jsonl", "name": "news"}, {"path": "y.jsonl"}, {"path": "z.jsonl", "name": "news"}])
    with pytest.raises(ValueError, match=r"datasets\[0\]\.name=3 is invalid"):
        parse_mixture([{"path": "x.jsonl", "name": 3}])
    a = write_jsonl(tmp_path / "a.jsonl", PAIRS)
    with pytest.raises(ValueError, match=r"SFTConfig.datasets: datasets\[1\]\.name='ن' is invalid"):
        SFTConfig(datasets=[{"path": a}, {"path": a, "name": "ن"}])
    sources = [MixtureSource("d1/chat.jsonl", 1.0), MixtureSource("d2/chat.jsonl", 1.0),
               MixtureSource("عربي v1.jsonl", 1.0), MixtureSource("x.jsonl", 1.0, name="chat_2"),
               MixtureSource("org/name", 1.0)]
    assert source_names(sources) == ["chat", "chat_3", "v1", "chat_2", "name"]


def test_a_single_file_run_is_unchanged_and_the_cache_key_includes_the_tagging(tiny_model_dir, tmp_path):
    from src.data.loading import load_records
    from src.data.wiring import example_tokenizer_for

    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    trainer = SFTTrainer(_config(tiny_model_dir, tmp_path, None, dataset_path=data))
    trainer.prepare()
    assert trainer.source_names is None and trainer.trainer.source_names is None
    assert trainer.trainer.train_dataset.column_names == ["input_ids", "labels", "length"]
    metrics = trainer.evaluate_model()
    assert sorted(k for k in metrics if k.endswith(("_loss", "_perplexity", "_tokens"))) == \
        ["eval_loss", "eval_perplexity", "eval_tokens"]
    assert "per_source" not in trainer.metadata()
    records = load_records(data, validation_split_ratio=0.0)[0]["train"]
    assert not any("_source" in r for r in records)
    et = example_tokenizer_for(trainer.config, trainer.tokenizer)
    plain = cache_settings(records, et, packing=False)[0]
    assert "sources" not in plain
    tagged = [{**r, "_source": "a" if i % 2 else "b"} for i, r in enumerate(records)]
    keys = {json.dumps(cache_settings(rows, et, packing=False, source_names=names)[0], sort_keys=True)
            for rows, names in ((records, None), (tagged, ["a", "b"]), (tagged, ["b", "a"]),
                                ([{**r, "_source": "a"} for r in records], ["a", "b"]))}
    assert len(keys) == 4  # the tagging and the names' order both change the key
    # a tagged split through the cache: the entry is read back with its sources column, ids as tagged
    cache = tmp_path / "cache"
    for _ in range(2):  # a miss, then a hit
        for packing in (False, True):
            dataset = tokenize_records(tagged, et, "train", packing=packing, cache_dir=cache, source_names=["a", "b"])
            collated = SFTDataCollator(trainer.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
            trained = shift_labels(collated["labels"]).ne(-100)
            per_source = torch.bincount(shift_labels(collated["source_ids"])[trained], minlength=2).tolist()
            assert per_source == [_trained_tokens(et, [r for r in tagged if r["_source"] == s]) for s in ("a", "b")]


def _trained_tokens(example_tokenizer, records):
    """Trained tokens of ``records`` tokenized on their own (no sources)."""
    from src.data.preprocess import TokenizeReport

    report = TokenizeReport()
    tokenize_records([{k: v for k, v in r.items() if k != "_source"} for r in records], example_tokenizer, "t", report)
    return report.trained_tokens["t"]


def test_the_readme_example_names_its_sources_and_watches_one(tmp_path):
    import yaml

    from src.cli.args import parse_config

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    block = readme[readme.index("- **Loss per data source**"):]
    block = block[block.index("```yaml") + len("```yaml"):]
    example = yaml.safe_load(block[:block.index("```")])
    sources = parse_mixture(example["datasets"])
    assert source_names(sources) == ["msa", "gulf"]
    # the same settings through the command line, with files that exist
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    datasets = [{**entry, "path": data} for entry in example["datasets"]]
    config = parse_config(SFTConfig, ["--datasets", json.dumps(datasets), "--metric_for_best_model",
                                      example["metric_for_best_model"]])
    assert config.metric_for_best_model == "eval_gulf_loss"


def test_every_loss_path_gives_the_same_per_source_sums_and_they_add_up(tiny_model_dir, tmp_path):
    """The fused trained-tokens head, its chunked fallback (checkpointed, with gradients), the full-logits loss and
    ``return_outputs``: each leaves sums and counts per source that add up to its own loss sum, all alike."""
    from src.training.losses import FullLogitsLoss, TrainedTokensLoss
    from tests.helpers import load_tiny

    trainer = SFTTrainer(_config(tiny_model_dir, tmp_path, _mixture(tmp_path), packing=True))
    trainer.prepare()
    dataset = trainer.trainer.train_dataset
    batch = trainer.data_collator()([dataset[i] for i in range(len(dataset))])
    source_ids = batch.pop("source_ids")
    model, _ = load_tiny(tiny_model_dir)
    results = {}
    for name, loss, outputs in (("fused", TrainedTokensLoss(), False), ("chunked", TrainedTokensLoss(8, fused=False), False),
                                ("full", FullLogitsLoss(), False), ("outputs", TrainedTokensLoss(), True)):
        model.zero_grad()
        with loss.per_source(source_ids, 2):
            result = loss(model, batch, return_outputs=outputs)
        result.loss.backward()  # gradients still flow (the chunked path recomputes its chunks)
        sums, counts = loss.last_sources
        assert int(counts.sum()) == int(result.num_tokens)
        assert sums.sum().item() == pytest.approx(result.loss_sum.item(), rel=1e-6)
        results[name] = (sums, counts)
        with loss.per_source(None, 2):  # outside a mixture nothing is left per source
            loss(model, batch)
        assert loss.last_sources is None
    for name, (sums, counts) in results.items():
        assert torch.equal(counts, results["fused"][1])
        assert torch.allclose(sums, results["fused"][0], rtol=1e-5), name


def test_the_command_line_reports_and_saves_each_sources_loss(tiny_model_dir, tmp_path, capsys):
    """train_sft.py with a YAML mixture of named sources: per-source figures in the metadata and the model card, and
    eval_<name>_loss beside eval_loss in the final metrics."""
    import train_sft

    sources = _mixture(tmp_path, msa="msa", swapped="swapped")
    config = tmp_path / "run.yaml"
    config.write_text("datasets:\n" + "".join(f"  - {{path: {s['path']}, weight: 1, name: {s['name']}}}\n" for s in sources)
                      + f"model_name: {tiny_model_dir}\noutput_dir: {tmp_path / 'out'}\nmax_steps: 2\n"
                        "validation_split_ratio: 0.5\nmax_seq_length: 96\nper_device_train_batch_size: 2\n"
                        "metric_for_best_model: eval_msa_loss\n", encoding="utf-8")
    assert train_sft.main(["--config", str(config)]) == 0
    meta = json.load(open(tmp_path / "out" / "sft_metadata.json", encoding="utf-8"))
    final = meta["final_metrics"]
    for name in ("msa", "swapped"):
        assert final[f"eval_{name}_loss"] > 0 and meta["per_source"][name]["eval_loss"] == final[f"eval_{name}_loss"]
    weights = {n: final[f"eval_{n}_tokens"] for n in ("msa", "swapped")}
    recombined = sum(final[f"eval_{n}_loss"] * w for n, w in weights.items()) / sum(weights.values())
    assert recombined == pytest.approx(final["eval_loss"], rel=1e-6)
    card = open(tmp_path / "out" / "README.md", encoding="utf-8").read()
    assert "Loss per data source" in card and "msa" in card and "swapped" in card


# -- several validation files (eval_datasets) ------------------------------------------------------------------------
def _eval_files(tmp_path):
    dialect = [{"instruction": p["instruction"] + " باللهجة", "response": p["response"] + " يا صاحبي"} for p in PAIRS[:5]]
    return write_jsonl(tmp_path / "msa_val.jsonl", PAIRS[:3]), write_jsonl(tmp_path / "dialect.jsonl", dialect)


@pytest.mark.parametrize("packing", [False, True])
def test_several_validation_files_are_sources_of_their_own(tiny_model_dir, tmp_path, packing):
    """A mixture with eval_datasets: a file named like a mixture source is its validation data, another file is a
    source of its own; nothing is held out of training; the figures recombine into eval_loss."""
    msa_val, dialect = _eval_files(tmp_path)
    config = _config(tiny_model_dir, tmp_path, _mixture(tmp_path, msa="msa"), packing=packing,
                     eval_datasets=[{"path": msa_val, "name": "msa"}, dialect], metric_for_best_model="eval_dialect_loss")
    trainer = SFTTrainer(config)
    trainer.prepare()
    assert trainer.source_names == ["msa", "swapped", "dialect"]
    assert len(trainer.dataset["train"]) == 2 * len(PAIRS) and len(trainer.dataset["validation"]) == 3 + 5
    metrics = trainer.evaluate_model()
    assert "eval_swapped_loss" not in metrics  # no validation rows of that source
    tokens = {n: metrics[f"eval_{n}_tokens"] for n in ("msa", "dialect")}
    assert all(tokens.values()) and sum(tokens.values()) == metrics["eval_tokens"]
    recombined = sum(metrics[f"eval_{n}_loss"] * tokens[n] for n in tokens) / metrics["eval_tokens"]
    assert recombined == pytest.approx(metrics["eval_loss"], rel=1e-6)


def test_validation_files_beside_one_training_file(tiny_model_dir, tmp_path):
    """No mixture: the training file is not split by source, the validation files are; the run trains, and the
    metadata names each validation file."""
    msa_val, dialect = _eval_files(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    config = _config(tiny_model_dir, tmp_path, None, dataset_path=data, eval_datasets=json.dumps([msa_val, dialect]),
                     max_steps=2)
    trainer = SFTTrainer(config)
    trainer.train()
    final = trainer.final_metrics
    assert final["eval_msa_val_loss"] > 0 and final["eval_dialect_loss"] > 0
    meta = json.load(open(os.path.join(config.output_dir, "sft_metadata.json"), encoding="utf-8"))
    assert meta["per_source"]["dialect"]["eval_path"] == dialect
    assert meta["per_source"]["msa_val"]["eval_loss"] == final["eval_msa_val_loss"]


def test_bad_validation_files_name_the_entry(tmp_path):
    msa_val, dialect = _eval_files(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    cases = [
        (dict(eval_datasets=[msa_val], eval_dataset_path=dialect), "eval_datasets.*None when eval_dataset_path is set"),
        (dict(eval_datasets=[{"path": msa_val, "name": "a"}, {"path": dialect, "name": "a"}]),
         r"eval_datasets\[1\].name='a' is invalid: eval_datasets\[0\] has that name already"),
        (dict(eval_datasets=[{"path": msa_val, "weight": 1}]), r"eval_datasets\[0\]: unknown key\(s\) \['weight'\]"),
        (dict(eval_datasets=[str(tmp_path / "missing.jsonl")]), "eval_datasets.*does not exist"),
        (dict(eval_datasets=[msa_val], metric_for_best_model="eval_other_loss"), "eval_msa_val_loss"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            SFTConfig(dataset_path=data, **overrides)
    assert SFTConfig(dataset_path=data, eval_datasets=[msa_val], metric_for_best_model="eval_msa_val_loss")


def test_validation_files_from_yaml(tmp_path):
    from src.cli.args import parse_config

    msa_val, dialect = _eval_files(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    path = tmp_path / "run.yaml"
    path.write_text(f"dataset_path: {data}\neval_datasets:\n  - {msa_val}\n  - {{path: {dialect}, name: dia}}\n",
                    encoding="utf-8")
    config = parse_config(SFTConfig, ["--config", str(path)])
    assert json.loads(config.eval_datasets) == [msa_val, {"path": dialect, "name": "dia"}]


@pytest.mark.parametrize("family", ["qwen3", "qwen3-moe", "qwen3.5"])
def test_per_source_losses_recombine_on_every_qwen_family(tiny_family_dir, tmp_path, family):
    """The per-source figures on Qwen3, Qwen3-MoE (the token loss; the router loss is not per source) and the hybrid
    Qwen3.5 (packing asked: it trains unpacked on a CPU), not only Qwen2."""
    trainer = SFTTrainer(_config(tiny_family_dir(family), tmp_path, _mixture(tmp_path, msa="msa"), packing=True))
    trainer.prepare()
    metrics = trainer.evaluate_model()
    tokens = {n: metrics[f"eval_{n}_tokens"] for n in ("msa", "swapped")}
    assert all(tokens.values()) and sum(tokens.values()) == metrics["eval_tokens"]
    recombined = sum(metrics[f"eval_{n}_loss"] * tokens[n] for n in tokens) / metrics["eval_tokens"]
    assert recombined == pytest.approx(metrics["eval_loss"], rel=1e-6)
