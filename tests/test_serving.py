"""Serving an export as trained: files transformers 4.x-era readers and llama.cpp's converter take
(``src.training.serving``), the Ollama Modelfile (``src.training.ollama``), GGUF conversion with llama.cpp's own
converter, the hub reachability check, and the normalization filter for prompts (``python -m src.data.normalization``).

Optional parts run where their tools are: ``TRANSFORMERS4_PYTHON`` (an interpreter with transformers 4.x, default
``/tmp/transformers4-venv/bin/python``) and ``LLAMA_CPP_DIR`` (a llama.cpp checkout; ``LLAMA_CPP_PYTHON``: the
interpreter for its converter) with the real Qwen2.5 tokenizer in ``../shared``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

import train_sft
from src.data.wiring import example_tokenizer_for
from src.training import ollama, serving
from src.training.sft_trainer import SFTTrainer
from tests.helpers import PAIRS, QWEN_TOKENIZER_DIR, ROOT, make_config, need_shared, write_jsonl

SYSTEM = "أنت مساعد مفيد يجيب بالعربية."
TRANSFORMERS4_PYTHON = os.environ.get("TRANSFORMERS4_PYTHON", "/tmp/transformers4-venv/bin/python")
SAMPLE_TEXTS = ["ما عاصمة مصر؟", "<|im_start|>user\nمرحبا<|im_end|>\n", "Hello <|endoftext|> world ٣ + ٤"]
CONVERSATION = [{"role": "user", "content": "ما عاصمة مصر؟"}, {"role": "assistant", "content": "القاهرة"},
                {"role": "user", "content": "وفرنسا؟"}]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def chatml_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    data = write_jsonl(tmp / "d.jsonl", PAIRS[:4])
    out = tmp / "run"
    trainer = SFTTrainer(make_config(tiny_model_dir, data, out, max_steps=2, instruction_template="chatml",
                                     system_prompt=SYSTEM))
    trainer.train()
    return trainer, out


@pytest.fixture(scope="module")
def exported(chatml_run, tmp_path_factory):
    """The run exported with a Modelfile, and the same model and tokenizer re-saved by plain transformers 5 (what
    every export was before: extra_special_tokens as a list, no chat_template key, no top-level rope_theta)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir = chatml_run
    tmp = tmp_path_factory.mktemp("exported")
    target = tmp / "export"
    assert train_sft.main(["export", "--model", str(run_dir), "--to", str(target), "--format", "ollama"]) == 0
    raw = tmp / "raw"
    AutoModelForCausalLM.from_pretrained(str(target)).save_pretrained(str(raw))
    AutoTokenizer.from_pretrained(str(target)).save_pretrained(str(raw))
    return target, raw


# -- 13. files both transformers generations read -------------------------------------------------------------------
def test_make_portable_rewrites_what_transformers_4_readers_miss(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "extra_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "additional_special_tokens": ["<|im_end|>"]}), encoding="utf-8")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 32768},
        "text_config": {"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}}), encoding="utf-8")
    assert serving.make_portable(str(tmp_path)) == ["tokenizer_config.json", "config.json"]
    tok = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "extra_special_tokens" not in tok and tok["additional_special_tokens"] == ["<|im_end|>", "<|im_start|>"]
    assert tok["chat_template"] == "{{ messages[0]['content'] }}"
    cfg = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    assert cfg["rope_theta"] == 1e6 and cfg["rope_parameters"]["rope_theta"] == 1e6
    assert cfg["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert cfg["text_config"]["rope_theta"] == 5e5 and "rope_scaling" not in cfg["text_config"]
    assert serving.make_portable(str(tmp_path)) == []  # idempotent
    # a named-token mapping is what transformers 4.x expects: kept; a LoRA adapter folder has no config.json
    assert serving.portable_tokenizer_config({"extra_special_tokens": {"image_token": "<img>"}}, None) == \
        {"extra_special_tokens": {"image_token": "<img>"}}
    assert serving.make_portable(str(tmp_path / "nothing-here")) == []


def test_every_export_holds_what_the_converter_reads(exported):
    target, _ = exported
    tok = json.loads((target / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = (target / "chat_template.jinja").read_text(encoding="utf-8")
    assert tok["chat_template"] == template and SYSTEM in template  # the run's format and system prompt, twice
    assert "extra_special_tokens" not in tok
    assert {"<|im_start|>", "<|im_end|>"} <= set(tok["additional_special_tokens"])
    cfg = json.loads((target / "config.json").read_text(encoding="utf-8"))
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"]
    gen = json.loads((target / "generation_config.json").read_text(encoding="utf-8"))
    tokens = json.loads((target / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    ids = {t["content"]: t["id"] for t in tokens}
    assert ids["<|im_end|>"] in gen["eos_token_id"] and ids["<|endoftext|>"] in gen["eos_token_id"]
    meta = json.loads((target / "sft_metadata.json").read_text(encoding="utf-8"))
    assert meta["export_formats"] == ["hf", "ollama"]


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen3-moe", "qwen3.5", "qwen3.5-moe", "qwen2 yarn"])
def test_every_family_loads_the_same_after_make_portable(family, tiny_family_dir, tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = tiny_family_dir(family.split()[0])
    if family.endswith("yarn"):  # a scaled RoPE (Qwen2.5's long-context setting)
        shutil.copytree(source, tmp_path / "yarn")
        source = tmp_path / "yarn"
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
        config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                                     "rope_theta": 1000000.0}
        (source / "config.json").write_text(json.dumps(config), encoding="utf-8")
    copy = tmp_path / "portable"
    shutil.copytree(source, copy)
    assert "config.json" in serving.make_portable(str(copy))
    configs = [{k: v for k, v in AutoConfig.from_pretrained(str(folder)).to_dict().items() if k != "_name_or_path"}
               for folder in (source, copy)]
    assert configs[0] == configs[1]
    ids = torch.tensor([[5, 17, 42, 8, 99]])
    logits = []
    for folder in (source, copy):
        model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert torch.equal(logits[0], logits[1])


def _tokenizer_facts(tokenizer) -> dict:
    return {"ids": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in SAMPLE_TEXTS],
            "special": sorted(tokenizer.all_special_tokens), "eos": tokenizer.eos_token, "pad": tokenizer.pad_token,
            "len": len(tokenizer),
            "render": tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)}


def test_transformers_5_loads_the_portable_export_exactly_as_before(exported):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target, raw = exported
    assert "extra_special_tokens" in json.loads((raw / "tokenizer_config.json").read_text(encoding="utf-8"))
    new, old = AutoTokenizer.from_pretrained(str(target)), AutoTokenizer.from_pretrained(str(raw))
    assert _tokenizer_facts(new) == _tokenizer_facts(old)
    assert new.special_tokens_map == old.special_tokens_map and new.chat_template == old.chat_template
    configs = [{k: v for k, v in AutoConfig.from_pretrained(str(folder)).to_dict().items() if k != "_name_or_path"}
               for folder in (target, raw)]
    assert configs[0] == configs[1]
    prompt = torch.tensor([new.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"]])
    outputs = []
    for folder in (target, raw):
        model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        with torch.no_grad():
            outputs.append(model.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist())
    assert outputs[0] == outputs[1]


TRANSFORMERS4_SCRIPT = r"""
import json, sys
import transformers
from transformers import AutoConfig, AutoTokenizer
folder, texts, conversation = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
try:
    tokenizer = AutoTokenizer.from_pretrained(folder)
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
    sys.exit(0)
config = AutoConfig.from_pretrained(folder)
print(json.dumps({"version": transformers.__version__, "rope_theta": config.rope_theta,
                  "ids": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts],
                  "special": sorted(tokenizer.all_special_tokens), "eos": tokenizer.eos_token, "pad": tokenizer.pad_token,
                  "len": len(tokenizer),
                  "render": tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)}))
"""


def _transformers4(folder) -> dict:
    result = subprocess.run([TRANSFORMERS4_PYTHON, "-c", TRANSFORMERS4_SCRIPT, str(folder), json.dumps(SAMPLE_TEXTS),
                             json.dumps(CONVERSATION)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_transformers_4_reads_the_export_as_transformers_5_does(exported):
    if not os.path.isfile(TRANSFORMERS4_PYTHON):
        pytest.skip(f"no transformers 4.x interpreter at {TRANSFORMERS4_PYTHON} (set TRANSFORMERS4_PYTHON; e.g. "
                    "python -m venv /tmp/transformers4-venv && /tmp/transformers4-venv/bin/pip install "
                    "'transformers==4.57.*' jinja2 protobuf)")
    from transformers import AutoConfig, AutoTokenizer

    target, raw = exported
    assert "'list' object has no attribute 'keys'" in _transformers4(raw).get("error", "")  # what every export did
    old_reader = _transformers4(target)
    assert old_reader["version"].startswith("4.")
    assert old_reader.pop("rope_theta") == AutoConfig.from_pretrained(str(target)).rope_parameters["rope_theta"]
    old_reader.pop("version")
    assert old_reader == _tokenizer_facts(AutoTokenizer.from_pretrained(str(target)))


# -- 14. Ollama: the Go-template subset and the Modelfile syntax, against Ollama's own renderings ------------------
HELLO = [{"role": "user", "content": "Hello friend!"}, {"role": "assistant", "content": "Hello human!"},
         {"role": "user", "content": "What is your name?"}]
MISTRAL_NO_RESPONSE = "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST] "
MISTRAL_RESPONSE = "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST] {{ .Response }}"
OLLAMA_CHATML = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}<|im_start|>user\n"
                 "{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}<|im_end|>\n")


@pytest.mark.parametrize("template", [MISTRAL_NO_RESPONSE, MISTRAL_RESPONSE])
def test_go_renderer_reproduces_known_ollama_renderings(template):
    """Expected texts as Ollama renders them (its template tests, TestExecuteWithMessages)."""
    assert ollama.ollama_execute(template, HELLO) == \
        "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] "
    assert ollama.ollama_execute(template, [{"role": "system", "content": "You are a helpful assistant!"}] + HELLO) == \
        "[INST] You are a helpful assistant!\n\nHello friend![/INST] Hello human![INST] What is your name?[/INST] "
    assert ollama.ollama_execute(template, HELLO + [{"role": "assistant", "content": "My name is Ollama and I"}]) == \
        "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] My name is Ollama and I"


def test_go_renderer_chatml_trimming_literals_and_ollama_limits():
    system = [{"role": "system", "content": "You are a helpful assistant!"}]
    assert ollama.ollama_execute(OLLAMA_CHATML, system + HELLO) == (
        "<|im_start|>system\nYou are a helpful assistant!<|im_end|>\n<|im_start|>user\nHello friend!<|im_end|>\n"
        "<|im_start|>assistant\nHello human!<|im_end|>\n<|im_start|>user\nWhat is your name?<|im_end|>\n"
        "<|im_start|>assistant\n")
    # consecutive user messages are merged with a blank line (Ollama's collate)
    assert ollama.ollama_execute("{{ .Prompt }}|", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) \
        == "a\n\nb|"
    assert ollama.ollama_execute('A {{- " x " -}} B{{ "\\u200f{{" }}{{ if not .System }}!{{ else }}?{{ end }}',
                                 [{"role": "user", "content": "u"}]) == "A x B\u200f{{!"
    with pytest.raises(ValueError, match="crash"):  # Ollama's deleteNode dereferences a nil else-list there
        ollama.ollama_execute("{{ if .Prompt }}{{ .Response }}{{ else }}x{{ end }}", HELLO)
    with pytest.raises(ValueError, match="Messages"):
        ollama.ollama_execute("{{ range .Messages }}{{ .Content }}{{ end }}", HELLO)


def test_modelfile_syntax_as_ollama_parses_it():
    text = ('# a comment\nFROM ./model.gguf\nTEMPLATE """{{ .System }}\n  {{ .Prompt }} "q" """\n'
            'SYSTEM """two\nlines\u200f"""\nPARAMETER stop "<|im_end|>"\nPARAMETER stop <|endoftext|>\n'
            'PARAMETER num_ctx 4096\nMESSAGE user hi there\n')
    assert ollama.parse_modelfile(text) == [
        ("model", "./model.gguf"), ("template", '{{ .System }}\n  {{ .Prompt }} "q" '),
        ("system", "two\nlines"),  # U+200F is not printable: Ollama's parser drops it
        ("stop", "<|im_end|>"), ("stop", "<|endoftext|>"), ("num_ctx", "4096"), ("message", "user: hi there")]
    with pytest.raises(ValueError, match="no FROM"):
        ollama.parse_modelfile('SYSTEM "x"\n')
    with pytest.raises(ValueError, match="end of file"):
        ollama.parse_modelfile('FROM x\nSYSTEM """open\n')
    # what we write survives that parser: '{{', a third quote in a row, characters the parser drops
    for text in ['a{{b}}"""c""', "x\u200f\u00a0y\r\n{", '"quoted"', "plain\ttab\nline"]:
        source = ollama.go_literal(text)
        value = dict(ollama.parse_modelfile(f'FROM .\nTEMPLATE """{source}"""\n'))["template"]
        assert ollama.ollama_execute(value + "{{ .Response }}", [{"role": "user", "content": "u"}]) == text


# -- 14. the Modelfile renders what training formatted ---------------------------------------------------------------
def _example_tokenizer(tiny_model_dir, tmp_path, **settings):
    from transformers import AutoTokenizer

    config = make_config(tiny_model_dir, None, tmp_path / "unused", **settings)
    return example_tokenizer_for(config, AutoTokenizer.from_pretrained(tiny_model_dir))


def _our_prompt(et, messages: list[dict]) -> list[int]:
    if len(messages) == 1 or (len(messages) == 2 and messages[0]["role"] == "system"):
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        return et.encode_prompt(messages[-1]["content"], system)
    return et.encode_conversation_prompt(messages)


FORMATS = {
    "chatml": dict(instruction_template="chatml"),
    "chatml, system": dict(instruction_template="chatml", system_prompt=SYSTEM),
    "alpaca": dict(instruction_template="alpaca"),
    "alpaca, system": dict(instruction_template="alpaca", system_prompt=SYSTEM),
    "custom, system": dict(instruction_template="custom", custom_template="السؤال: {instruction}\nالجواب:\n",
                           system_prompt='قل "نعم" {{ أو }} "لا"'),
}
CONVERSATIONS = [
    [{"role": "user", "content": PAIRS[0]["instruction"]}],
    [{"role": "system", "content": "كن موجزاً."}, {"role": "user", "content": PAIRS[1]["instruction"]}],
    [{"role": "user", "content": PAIRS[2]["instruction"]}, {"role": "assistant", "content": PAIRS[2]["response"]},
     {"role": "user", "content": PAIRS[3]["instruction"]}],
    [{"role": "system", "content": "أجب بجملة."}, {"role": "user", "content": PAIRS[4]["instruction"]},
     {"role": "assistant", "content": PAIRS[4]["response"]}, {"role": "user", "content": PAIRS[5]["instruction"]},
     {"role": "assistant", "content": PAIRS[5]["response"]}, {"role": "user", "content": PAIRS[7]["instruction"]}],
]


@pytest.mark.parametrize("name", FORMATS)
def test_modelfile_renders_the_prompts_training_formatted(name, tiny_model_dir, tmp_path):
    et = _example_tokenizer(tiny_model_dir, tmp_path, **FORMATS[name])
    tokenizer = et.tokenizer
    stop_ids = [et.end_id] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id != et.end_id else [])
    text = (tmp_path / ollama.write_modelfile(str(tmp_path), et, stop_ids, ".")).read_text(encoding="utf-8")
    commands = ollama.parse_modelfile(text)
    assert ("model", ".") in commands
    assert [v for n, v in commands if n == "stop"] == tokenizer.convert_ids_to_tokens(stop_ids)
    assert dict(commands).get("system") == FORMATS[name].get("system_prompt")
    for messages in CONVERSATIONS:
        ours = _our_prompt(et, messages)
        served = ollama.ollama_prompt(text, messages)
        assert served == tokenizer.decode(ours)
        assert tokenizer(served, add_special_tokens=False)["input_ids"] == ours


@pytest.fixture(scope="module")
def template_tokenizer(qwen_tokenizer):
    """A copy of the real tokenizer whose chat_template each test below replaces (one copy: ~2 s each)."""
    import copy

    return copy.deepcopy(qwen_tokenizer)


@pytest.mark.parametrize("template", ["qwen2_5", "qwen3", "qwen3_instruct_2507", "qwen3_5_think", "qwen3_6", "qwen3_8"])
@pytest.mark.parametrize("kwargs", [None, {"enable_thinking": False}])
def test_modelfile_for_qwen_own_templates(template, kwargs, template_tokenizer, tmp_path):
    """instruction_template='tokenizer': the ChatML framing, the system block and the generation prompt of the model's
    own template, read off the saved template; tools and earlier reasoning are named as not reproduced."""
    path = os.path.join(os.path.dirname(QWEN_TOKENIZER_DIR), "qwen-chat-templates", f"{template}.jinja")
    need_shared(path)
    tokenizer = template_tokenizer
    with open(path, encoding="utf-8") as fh:
        tokenizer.chat_template = fh.read()
    for system_prompt in (None, SYSTEM):
        config = make_config(QWEN_TOKENIZER_DIR, None, tmp_path / "unused", instruction_template="tokenizer",
                             chat_template_kwargs=kwargs, system_prompt=system_prompt)
        et = example_tokenizer_for(config, tokenizer)
        text = (tmp_path / ollama.write_modelfile(str(tmp_path), et, [et.end_id], ".")).read_text(encoding="utf-8")
        assert "tool calls" in text  # what a legacy template cannot carry is said in the Modelfile
        for messages in CONVERSATIONS:
            if template == "qwen3_8" and not kwargs and not system_prompt and messages[0]["role"] == "system":
                assert "Also rendered otherwise" in text  # its reasoning-effort line goes in front of a system message
                continue
            assert ollama.ollama_prompt(text, messages) == tokenizer.decode(et.encode_conversation_prompt(messages))


def test_a_system_prompt_a_modelfile_cannot_carry_is_refused():
    ollama.check_modelfile_text("أنت مساعد\nمفيد")
    with pytest.raises(ValueError, match="U\\+200C"):
        ollama.check_modelfile_text("نص\u200cآخر")
    with pytest.raises(ValueError, match='"""'):
        ollama.check_modelfile_text('say """hi"""')


# -- 14. the command line ------------------------------------------------------------------------------------------
def test_export_format_ollama_writes_the_modelfile(exported, chatml_run):
    trainer, _ = chatml_run
    target, _ = exported
    text = (target / "Modelfile").read_text(encoding="utf-8")
    assert ("model", ".") in ollama.parse_modelfile(text)
    assert "normaliz" in text  # says that Ollama does not normalize prompts
    et = trainer.example_tokenizer()
    for messages in CONVERSATIONS:
        assert ollama.ollama_prompt(text, messages) == et.tokenizer.decode(_our_prompt(et, messages))


def test_export_ollama_refuses_a_system_prompt_a_modelfile_cannot_carry_before_merging(chatml_run, tmp_path, capsys):
    _, run_dir = chatml_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    meta = json.loads((run / "sft_metadata.json").read_text(encoding="utf-8"))
    meta["system_prompt"] = "أنت مساعد\u200cمفيد"
    (run / "sft_metadata.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    assert train_sft.main(["export", "--model", str(run), "--to", str(tmp_path / "out"), "--format", "ollama"]) == 2
    err = one_line_error(capsys)
    assert "system_prompt" in err and "U+200C" in err and not (tmp_path / "out").exists()


def _fake_llama_cpp(root, body: str) -> str:
    os.makedirs(os.path.join(root, "gguf-py", "gguf"))
    open(os.path.join(root, "gguf-py", "gguf", "__init__.py"), "w").close()
    with open(os.path.join(root, serving.CONVERTER), "w", encoding="utf-8") as fh:
        fh.write("import sys\nargs = sys.argv[1:]\nout = args[args.index('--outfile') + 1]\n" + body)
    return str(root)


def test_export_gguf_refuses_a_missing_checkout_script_or_gguf_before_any_work(chatml_run, tmp_path, capsys, monkeypatch):
    _, run_dir = chatml_run
    target = tmp_path / "out"
    base = ["export", "--model", str(run_dir), "--to", str(target)]
    assert train_sft.main(base + ["--format", "gguf"]) == 2
    assert "--llama_cpp" in one_line_error(capsys)
    assert train_sft.main(base + ["--format", "gguf", "--llama_cpp", str(tmp_path / "no-such-dir")]) == 2
    assert str(tmp_path / "no-such-dir") in one_line_error(capsys)
    (tmp_path / "empty").mkdir()
    assert train_sft.main(base + ["--format", "gguf", "--llama_cpp", str(tmp_path / "empty")]) == 2
    assert "convert_hf_to_gguf.py" in one_line_error(capsys)
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / serving.CONVERTER).write_text("raise SystemExit(1)\n")
    monkeypatch.setattr(serving, "_importable", lambda python, module: False)
    assert train_sft.main(base + ["--format", "gguf", "--llama_cpp", str(checkout)]) == 2
    assert "pip install gguf" in one_line_error(capsys)
    assert train_sft.main(base + ["--format", "gguf,docker"]) == 2
    assert "--format 'docker'" in one_line_error(capsys)
    assert train_sft.main(base + ["--llama_cpp", str(checkout)]) == 2
    assert "--format gguf" in one_line_error(capsys)
    assert not target.exists()  # all refused before merging


def test_export_gguf_runs_the_converter_and_the_modelfile_points_to_its_file(chatml_run, tmp_path, capsys):
    """The converter's plumbing, with a stand-in converter (the real one: the test below)."""
    _, run_dir = chatml_run
    ok = _fake_llama_cpp(tmp_path / "ok", "import json, os\nconfig = json.load(open(os.path.join(args[0], "
                                          "'tokenizer_config.json')))\nassert 'chat_template' in config\n"
                                          "open(out, 'w').write(json.dumps(args))\n")
    target = tmp_path / "gguf"
    assert train_sft.main(["export", "--model", str(run_dir), "--to", str(target), "--format", "gguf",
                           "--format", "ollama", "--llama_cpp", ok, "--gguf_outtype", "q8_0"]) == 0
    assert "GGUF: " in capsys.readouterr().out
    args = json.loads((target / "model.gguf").read_text())
    assert args[1] == "--outfile" and args[2].endswith("model.gguf") and args[3:] == ["--outtype", "q8_0"]
    assert ("model", "./model.gguf") in ollama.parse_modelfile((target / "Modelfile").read_text(encoding="utf-8"))
    assert not (target / "gguf_conversion.log").exists()
    failing = _fake_llama_cpp(tmp_path / "bad", "print('INFO loading')\nprint('NotImplementedError: BPE pre-tokenizer "
                                                "was not recognized', file=sys.stderr)\nsys.exit(1)\n")
    target = tmp_path / "kept"
    assert train_sft.main(["export", "--model", str(run_dir), "--to", str(target), "--format", "gguf,ollama",
                           "--llama_cpp", failing]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # after progress bars
    assert len(errors) == 1
    err = errors[0]
    assert "BPE pre-tokenizer was not recognized" in err and str(target) in err and "gguf_conversion.log" in err
    assert (target / "model.safetensors").exists() and not (target / "model.gguf").exists()  # the folder is kept
    assert "NotImplementedError" in (target / "gguf_conversion.log").read_text(encoding="utf-8")


def _gguf_module(llama_cpp_dir: str):
    try:
        import gguf
    except ImportError:
        sys.path.insert(0, os.path.join(llama_cpp_dir, "gguf-py"))
        try:
            import gguf
        except ImportError:
            return None
    return gguf


@pytest.mark.slow
def test_llama_cpp_conversion_carries_template_stop_tokens_and_rope_base(tmp_path, capsys):
    """llama.cpp's own converter on an export of a tiny model with the real Qwen2.5 vocabulary (the converter only
    accepts tokenizers it knows); the GGUF is read back with the gguf package."""
    llama_cpp = os.environ.get("LLAMA_CPP_DIR")
    if not llama_cpp or not os.path.isfile(os.path.join(llama_cpp, serving.CONVERTER)):
        pytest.skip("set LLAMA_CPP_DIR to a llama.cpp checkout to test the conversion itself")
    gguf = _gguf_module(llama_cpp)
    if gguf is None:
        pytest.skip("the gguf package is not importable (pip install gguf, or a checkout with gguf-py)")
    # the converter refuses tokenizers it does not know
    need_shared(os.path.join(QWEN_TOKENIZER_DIR, "vocab.json"), "the real Qwen2.5 tokenizer")
    from transformers import AutoTokenizer

    from src.models.tiny import build_tiny_model

    base = tmp_path / "base"
    build_tiny_model("qwen2", output_dir=str(base), tokenizer=AutoTokenizer.from_pretrained(QWEN_TOKENIZER_DIR),
                     hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1)
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    config["rope_parameters"]["rope_theta"] = 1000000.0  # Qwen's RoPE base, where old converters used 10000
    (base / "config.json").write_text(json.dumps(config), encoding="utf-8")
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS[:2])
    run_dir = tmp_path / "run"
    SFTTrainer(make_config(str(base), data, run_dir, max_steps=1, instruction_template="alpaca",
                           system_prompt=SYSTEM)).train()
    target = tmp_path / "export"
    command = ["export", "--model", str(run_dir), "--to", str(target), "--format", "gguf,ollama", "--llama_cpp", llama_cpp]
    if os.environ.get("LLAMA_CPP_PYTHON"):
        command += ["--llama_cpp_python", os.environ["LLAMA_CPP_PYTHON"]]
    assert train_sft.main(command) == 0, capsys.readouterr().err
    reader = gguf.GGUFReader(str(target / "model.gguf"))

    def field(name):
        return reader.fields[name].contents()

    assert field("tokenizer.chat_template") == (target / "chat_template.jinja").read_text(encoding="utf-8")
    assert SYSTEM in field("tokenizer.chat_template")  # the Alpaca format and its system prompt, not ChatML
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    tokens = field("tokenizer.ggml.tokens")
    assert tokens[tokenizer.convert_tokens_to_ids("<|im_end|>")] == "<|im_end|>"
    assert field("qwen2.rope.freq_base") == pytest.approx(1e6)


# -- 12. the hub: a real reachability check, before any work ---------------------------------------------------------
class _Hub(BaseHTTPRequestHandler):
    status = 200

    def do_HEAD(self):  # noqa: N802 - http.server's name
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def local_hub():
    """A hub endpoint on the loopback interface: ``local_hub(status)`` answers every HEAD with ``status``."""
    servers = []

    def start(status: int) -> str:
        handler = type("Hub", (_Hub,), {"status": status})
        server = HTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_hub_check_is_a_real_reachability_check(monkeypatch, local_hub):
    import huggingface_hub.constants

    from src.training.hub import check_hub_reachable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read by the library at import
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"'someone/arabic-sft'.*http://127\.0\.0\.1:9 is unreachable.*huggingface-cli upload"):
        check_hub_reachable("someone/arabic-sft", "out")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=true at import
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        check_hub_reachable("someone/arabic-sft", "out")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert time.monotonic() - start < 5
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", local_hub(503))
    with pytest.raises(ValueError, match="HTTP 503"):
        check_hub_reachable("someone/arabic-sft", "out")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", local_hub(200))
    check_hub_reachable("someone/arabic-sft", "out")  # reachable: no error


def test_push_to_hub_unreachable_refused_before_export_and_before_training(chatml_run, tiny_model_dir, pairs_file,
                                                                          tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    _, run_dir = chatml_run
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    target = tmp_path / "pushed"
    assert train_sft.main(["export", "--model", str(run_dir), "--to", str(target), "--push_to_hub", "--hub_model_id",
                           "someone/arabic-sft"]) == 2
    assert "unreachable" in one_line_error(capsys) and not target.exists()
    out = tmp_path / "run"
    assert train_sft.main(["--model_name", tiny_model_dir, "--dataset_path", pairs_file, "--output_dir", str(out),
                           "--use_lora", "false", "--max_steps", "1", "--push_to_hub", "--hub_model_id",
                           "someone/arabic-sft"]) == 2
    assert "unreachable" in capsys.readouterr().err
    assert not (out / "model.safetensors").exists()  # refused before training, not after


# -- 15. the same normalization before a prompt is sent ---------------------------------------------------------------
RAW_PROMPT = "ﻣﺎ ﻋﺎﺻﻤﺔ ﻣﺼﺮ؟ اكتـــب الجـــواب \u200fبإيجاز"


def _normalize(args: list[str], text: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "src.data.normalization", *args], input=text.encode("utf-8"),
                          capture_output=True, cwd=ROOT, timeout=60)


@pytest.mark.slow  # runs python -m src.data.normalization four times
def test_normalization_filter_makes_served_prompts_equal_trained_ones(exported, chatml_run):
    trainer, _ = chatml_run
    target, _ = exported
    result = _normalize(["--model", str(target)], RAW_PROMPT)
    assert result.returncode == 0, result.stderr
    normalized = result.stdout.decode("utf-8")
    assert normalized == "ما عاصمة مصر؟ اكتب الجواب بإيجاز"
    et = trainer.example_tokenizer()
    modelfile = (target / "Modelfile").read_text(encoding="utf-8")
    ours = et.encode_prompt(RAW_PROMPT)  # training and our generation normalize the prompt themselves
    served = et.tokenizer(ollama.ollama_prompt(modelfile, [{"role": "user", "content": normalized}]),
                          add_special_tokens=False)["input_ids"]
    unnormalized = et.tokenizer(ollama.ollama_prompt(modelfile, [{"role": "user", "content": RAW_PROMPT}]),
                                add_special_tokens=False)["input_ids"]
    assert served == ours and unnormalized != ours
    request = {"model": "x", "messages": [{"role": "user", "content": RAW_PROMPT}], "tools": [{"name": "ﻣﺎ"}]}
    result = _normalize(["--preset", "light", "--jsonl"], json.dumps(request, ensure_ascii=False) + "\n")
    assert json.loads(result.stdout) == {**request, "messages": [{"role": "user", "content": normalized}]}
    assert _normalize(["--model", str(target.parent)], "x").returncode == 2
    bad = _normalize(["--preset", "light", "--jsonl"], "not json\n")
    assert bad.returncode == 2 and b"line 1" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_normalizer_for_run_restores_the_saved_switches(tmp_path):
    from src.data.normalization import build_normalizer, normalizer_for_run

    (tmp_path / "sft_metadata.json").write_text(json.dumps({"normalization": {
        "preset": "light", **build_normalizer("light", remove_diacritics=True).to_dict()}}), encoding="utf-8")
    assert normalizer_for_run(str(tmp_path)) == build_normalizer("light", remove_diacritics=True)
    (tmp_path / "sft_metadata.json").write_text(json.dumps({"config": {}}), encoding="utf-8")
    assert normalizer_for_run(str(tmp_path)).is_identity  # saved before normalization existed: untouched text
