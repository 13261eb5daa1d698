"""Edge cases of ``train_sft.py generate`` and ``train_sft.py chat``: resume checks its rows against the input,
damaged output files, over-long prompts found before anything is generated, a chat session that survives a bad
line, and Ctrl-C (one line, exit 130, generated rows kept)."""

import io
import json
import os
import sys

import pytest

import train_sft
from src.training.chat import ChatSession
from src.training.sft_trainer import SFTTrainer
from tests.helpers import PAIRS, make_config, write_jsonl

LONG = "اكتب مقالًا طويلًا عن تاريخ القاهرة وأحيائها القديمة. " * 400  # far beyond the tiny model's 4096 positions


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edges")
    data = write_jsonl(tmp / "d.jsonl", PAIRS[:4])
    out = tmp / "run"
    SFTTrainer(make_config(tiny_model_dir, data, out, max_steps=20, per_device_train_batch_size=4,
                           instruction_template="chatml")).train()
    return out


def _generate(run_dir, source, output, *extra):
    args = ["generate", "--model", str(run_dir), "--input", str(source), "--output", str(output), "--batch_size", "2",
            "--max_length", "8", *extra]
    try:
        return train_sft.main(args)
    except KeyboardInterrupt:  # escaping it would end the pytest session instead of failing this test
        pytest.fail("KeyboardInterrupt escaped train_sft.main")


def _error_line(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error:", "interrupted"))]
    assert len(err) == 1, err
    return err[0]


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- 1. resume checks each kept row against the input; --output must not be --input ------------------------------

def test_resume_refuses_an_output_written_for_other_input_rows(run_dir, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    write_jsonl(source, [{"instruction": p["instruction"]} for p in PAIRS[:3]])  # ids are line numbers
    output = tmp_path / "out.jsonl"
    assert _generate(run_dir, source, output) == 0
    capsys.readouterr()
    before = output.read_bytes()
    # a question inserted at the top: every line number now names another question
    write_jsonl(source, [{"instruction": PAIRS[5]["instruction"]}] + [{"instruction": p["instruction"]} for p in PAIRS[:3]])
    assert _generate(run_dir, source, output) == 2
    err = _error_line(capsys)
    assert f"{output}, line 1" in err and f"{source}, line 1" in err and "id 1" in err
    assert "--output" in err and "delete" in err
    assert output.read_bytes() == before  # nothing generated, nothing dropped
    # an output row whose id the input does not have at all is refused too
    write_jsonl(source, [{"id": "a", "instruction": PAIRS[0]["instruction"]}])
    assert _generate(run_dir, source, output) == 2
    assert f"{output}, line 1" in _error_line(capsys)
    # the same rows in the same places resume
    write_jsonl(source, [{"instruction": p["instruction"]} for p in PAIRS[:4]])
    assert _generate(run_dir, source, output) == 0
    assert "Generated 1 rows" in capsys.readouterr().out
    assert [r["instruction"] for r in _rows(output)] == [p["instruction"] for p in PAIRS[:4]]


@pytest.mark.parametrize("how", ["same", "dotted", "symlink", "hardlink"])
def test_output_that_is_the_input_file_is_refused(run_dir, tmp_path, capsys, how):
    (tmp_path / "sub").mkdir()
    source = tmp_path / "in.jsonl"
    write_jsonl(source, [{"id": f"q{i}", "instruction": p["instruction"]} for i, p in enumerate(PAIRS[:3])])
    before = source.read_bytes()
    output = {"same": source, "dotted": tmp_path / "sub" / ".." / "in.jsonl", "symlink": tmp_path / "link.jsonl",
              "hardlink": tmp_path / "hard.jsonl"}[how]
    if how == "symlink":
        os.symlink(source, output)
    elif how == "hardlink":
        os.link(source, output)
    assert _generate(tmp_path / "no-model-needed", source, output) == 2  # refused before the model is loaded
    err = _error_line(capsys)
    assert "--output" in err and "--input" in err and str(output) in err
    assert source.read_bytes() == before


# -- 2. an output file cut inside an Arabic character resumes; a bad byte inside it is named ---------------------

def test_output_cut_inside_a_multibyte_character_is_resumed(run_dir, tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"instruction": p["instruction"]} for p in PAIRS[:4]])
    output = tmp_path / "out.jsonl"
    assert _generate(run_dir, source, output) == 0
    complete = output.read_bytes()
    lines = complete.splitlines(keepends=True)
    third = lines[2]
    lead = next(i for i, b in enumerate(third) if b >= 0xC0)  # first byte of a 2-byte Arabic character
    assert third[lead + 1] & 0xC0 == 0x80
    output.write_bytes(b"".join(lines[:2]) + third[:lead + 1])  # a killed run: the file ends inside a character
    capsys.readouterr()
    assert _generate(run_dir, source, output) == 0
    assert "Generated 2 rows" in capsys.readouterr().out
    assert output.read_bytes() == complete


def test_an_undecodable_byte_inside_the_output_names_file_and_line(run_dir, tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"instruction": p["instruction"]} for p in PAIRS[:4]])
    output = tmp_path / "out.jsonl"
    assert _generate(run_dir, source, output) == 0
    lines = output.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1][:20] + b"\xff" + lines[1][21:]
    damaged = b"".join(lines)
    output.write_bytes(damaged)
    capsys.readouterr()
    assert _generate(run_dir, source, output) == 2
    err = _error_line(capsys)
    assert f"{output}, line 2" in err and "UTF-8" in err
    assert output.read_bytes() == damaged


def test_an_undecodable_input_line_is_named(run_dir, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_bytes('{"instruction": "ما عاصمة مصر؟"}\n'.encode() + b'{"instruction": "\xd9"}\n')
    assert _generate(run_dir, source, tmp_path / "out.jsonl") == 2
    err = _error_line(capsys)
    assert f"{source}, line 2" in err and "UTF-8" in err


# -- 3. every row is formatted and measured before the first one is generated -------------------------------------

def test_a_too_long_prompt_is_named_by_line_before_anything_is_generated(run_dir, tmp_path, capsys):
    rows = [{"instruction": p["instruction"]} for p in PAIRS[:5]] + [{"id": "long", "instruction": LONG}]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    output = tmp_path / "out.jsonl"
    assert _generate(run_dir, source, output) == 2
    err = _error_line(capsys)
    assert f"{source}, line 6" in err and "tokens" in err and "prompt 1" not in err
    assert not output.exists() or output.read_text(encoding="utf-8") == ""  # nothing generated


# -- 5. Ctrl-C: one line, exit 130, the rows written so far kept and resumable ---------------------------------------

def test_ctrl_c_during_generate_keeps_the_rows_and_exits_130(run_dir, tmp_path, capsys, monkeypatch):
    source = write_jsonl(tmp_path / "in.jsonl", [{"instruction": p["instruction"]} for p in PAIRS[:5]])
    reference = tmp_path / "ref.jsonl"
    assert _generate(run_dir, source, reference) == 0
    original = SFTTrainer.generate_from_prompts
    calls = []

    def interrupted_on_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "generate_from_prompts", interrupted_on_the_second_batch)
    output = tmp_path / "out.jsonl"
    capsys.readouterr()
    assert _generate(run_dir, source, output) == 130
    err = _error_line(capsys)
    assert "interrupted" in err and "2 of 5 rows" in err and str(output) in err and "again" in err
    assert len(_rows(output)) == 2
    monkeypatch.setattr(SFTTrainer, "generate_from_prompts", original)
    assert _generate(run_dir, source, output) == 0
    assert output.read_bytes() == reference.read_bytes()


def _chat(monkeypatch, run_dir, stdin: bytes, *extra):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="latin-1"))
    try:
        return train_sft.main(["chat", "--model", str(run_dir), "--max_length", "16", *extra])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped train_sft.main")


def test_ctrl_c_during_chat_is_one_line_and_exit_130(run_dir, capsys, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SFTTrainer, "generate_from_prompts", interrupted)
    assert _chat(monkeypatch, run_dir, (PAIRS[0]["instruction"] + "\n").encode()) == 130
    assert "interrupted" in _error_line(capsys)


# -- 4. a chat session survives an undecodable line and an over-long message, conversation intact -----------------

def test_chat_reports_a_bad_line_and_keeps_the_conversation(run_dir, capsys, monkeypatch):
    reference = SFTTrainer(make_config(str(run_dir), None, str(run_dir) + "-ref"))
    reference.load_model(str(run_dir))
    session = ChatSession(reference, max_length=16)
    first = session.reply(PAIRS[0]["instruction"])
    second = session.reply(PAIRS[1]["instruction"])  # answered with the first turn as history
    stdin = "\n".join([PAIRS[0]["instruction"], LONG]).encode() + b"\n\xd9\xff bad bytes\n" + \
        (PAIRS[1]["instruction"] + "\n/exit\n").encode()
    assert _chat(monkeypatch, run_dir, stdin) == 0
    out = [line for line in capsys.readouterr().out.splitlines() if line]
    errors = [line for line in out if line.startswith("error:")]
    assert len(errors) == 2, out
    assert "UTF-8" in errors[1] and "tokens" in errors[0] and "/reset" in errors[0]
    assert out[:2] == [f"> {PAIRS[0]['instruction']}", first]
    assert out[-2:] == [f"> {PAIRS[1]['instruction']}", second]


def test_check_output_reads_without_changing_and_names_lines(tmp_path):
    from src.training.batch_generation import check_output, read_input_rows, repair_output

    source = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "instruction": "س1"}, {"id": "b", "instruction": "س2"}])
    rows = read_input_rows(source)
    output = tmp_path / "out.jsonl"
    row_a = json.dumps({"id": "a", "instruction": "س1", "response": "ج"}, ensure_ascii=False)
    output.write_text(row_a, encoding="utf-8")  # complete, but its newline was never written
    state = check_output(rows, source, str(output))
    assert [r["id"] for r in state.rows] == ["a"] and output.read_text(encoding="utf-8") == row_a
    repair_output(str(output), state)
    assert output.read_text(encoding="utf-8") == row_a + "\n"
    output.write_text(row_a + "\n" + row_a + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"out\.jsonl, lines 1 and 2: id \"a\" appears twice"):
        check_output(rows, source, str(output))
    output.write_text(row_a + "\n" + '{"id": "b"}\n' + row_a + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"out\.jsonl, line 2: not a generated row"):
        check_output(rows, source, str(output))
    with pytest.raises(ValueError, match=r"is a directory"):
        check_output(rows, source, str(tmp_path))
    # only a cut-off write of ours is ever dropped: another program's last line (whole or not) is an error
    for foreign in ("notes, no newline", '{"id": "b", "instruction": "س2"}\n', "\u0000\u0000"):
        output.write_text(row_a + "\n" + foreign, encoding="utf-8")
        with pytest.raises(ValueError, match=r"out\.jsonl, line 2: "):
            check_output(rows, source, str(output))
    output.write_bytes((row_a + "\n").encode() + b'{"i')  # cut in the first bytes of a row
    state = check_output(rows, source, str(output))
    assert [r["id"] for r in state.rows] == ["a"] and state.dropped_line == 2
    repair_output(str(output), state)
    assert output.read_text(encoding="utf-8") == row_a + "\n"


def test_bad_sizes_are_one_line_errors(run_dir, tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"instruction": PAIRS[0]["instruction"]}])
    assert _generate(run_dir, source, tmp_path / "o.jsonl", "--batch_size", "0") == 2
    assert "--batch_size" in _error_line(capsys)
