"""An Ollama ``Modelfile`` that prompts an exported run as training formatted it (``export --format ollama``).

Ollama does not run the Jinja chat template we save; it renders prompts with a Go template (``TEMPLATE``).
We write a *legacy* template, the form Ollama executes once per user turn with ``.System``, ``.Prompt`` and
``.Response`` (``ollama/template/template.go``: the system message opens the first turn only, every earlier
turn is rendered whole, and the last one is cut right after ``{{ .Response }}`` to leave the generation
prompt). That is exactly how our formats write a conversation:

==========================  ==========================================================================
ChatML (``chatml``)         ``<|im_start|>system\\n{S}<|im_end|>\\n`` once, ``<|im_start|>user\\n{P}<|im_end|>\\n``,
                            ``<|im_start|>assistant\\n{R}<|im_end|>\\n``
Alpaca / custom             ``{S}\\n\\n`` once, the template around ``{P}``, then ``{R}`` and the EOS token
``tokenizer`` (Qwen's own)  the same ChatML framing, read off the saved template by rendering probe
                            conversations, with its generation prompt (``<think>\\n`` ...) on the turn being
                            answered only; tool definitions, tool calls and tool results, and the reasoning of
                            earlier turns are not reproduced (Ollama hands a legacy template text only): serve
                            tool-using runs with a stack that runs the saved Jinja template (llama-server
                            ``--jinja``, vLLM, transformers)
==========================  ==========================================================================

``SYSTEM`` is the run's system prompt (what our template writes when a conversation has none; Ollama uses it
when a request has no system message), ``PARAMETER stop`` the run's end tokens. Arabic normalization is not
part of any template: prompts must be normalized before they are sent (``python -m src.data.normalization``).

A small renderer of the Go-template subset we emit and of Ollama's legacy execution (:func:`ollama_prompt`),
with a parser of the Modelfile syntax as Ollama's ``parser/parser.go`` reads it, checks every Modelfile we
write against the saved chat template on probe conversations before it is written, and the tests check both
against renderings Ollama itself produces.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable

from transformers.utils.chat_template_utils import render_jinja_template

from src.data.templates import chat_template

MODELFILE = "Modelfile"

# -- the Go-template subset ------------------------------------------------------------------------------------------
_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _go_string(body: str) -> str:
    """The value of a Go interpreted string literal (without its quotes)."""
    out, i = [], 0
    simple = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "v": "\v", "'": "'"}
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = body[i + 1]
        if e in simple:
            out.append(simple[e])
            i += 2
        elif e in "uUx":
            n = {"u": 4, "U": 8, "x": 2}[e]
            out.append(chr(int(body[i + 2:i + 2 + n], 16)))
            i += 2 + n
        else:
            raise ValueError(f"unsupported escape \\{e} in a Go string literal")
    return "".join(out)


def _parse_expr(expr: str) -> tuple:
    expr = expr.strip()
    if expr.startswith('"') and expr.endswith('"') and len(expr) >= 2:
        return ("str", _go_string(expr[1:-1]))
    if re.fullmatch(r"\.[A-Za-z_]\w*", expr):
        return ("field", expr[1:])
    if re.fullmatch(r"not\s+\.[A-Za-z_]\w*", expr):
        return ("not", expr.split()[1][1:])
    raise ValueError(f"unsupported Go template expression {{{{ {expr} }}}} (the subset: .Field, not .Field, \"text\")")


def parse_go_template(text: str) -> list:
    """Nodes of a Go template in the subset we emit: text, ``{{ .Field }}``, ``{{ "literal" }}``,
    ``{{ if .F }}``/``{{ if not .F }}`` with ``{{ else }}`` and ``{{ end }}``, and ``{{-``/``-}}`` trimming."""
    root: list = []
    stack: list[tuple[list, list | None]] = []  # (enclosing list, the if node being filled)
    current = root
    pos = 0
    pending_trim = False
    for match in _ACTION.finditer(text):
        literal = text[pos:match.start()]
        if pending_trim:
            literal = literal.lstrip(" \t\r\n")
        if match.group(1):
            literal = literal.rstrip(" \t\r\n")
        if literal:
            current.append(("text", literal))
        pending_trim = bool(match.group(3))
        pos = match.end()
        body = match.group(2)
        if body.startswith("if "):
            node = ["if", _parse_expr(body[3:]), [], None]
            current.append(node)
            stack.append((current, node))
            current = node[2]
        elif body == "else":
            if not stack or stack[-1][1][3] is not None:
                raise ValueError("{{ else }} outside an {{ if }}")
            node = stack[-1][1]
            node[3] = []
            current = node[3]
        elif body == "end":
            if not stack:
                raise ValueError("{{ end }} without an {{ if }}")
            current = stack.pop()[0]
        elif body.startswith("/*"):
            continue
        else:
            current.append(("action", _parse_expr(body)))
    if stack:
        raise ValueError("unclosed {{ if }} in the template")
    literal = text[pos:]
    if pending_trim:
        literal = literal.lstrip(" \t\r\n")
    if literal:
        root.append(("text", literal))
    return root


def _identifiers(nodes: list) -> set[str]:
    names: set[str] = set()
    for node in nodes:
        if node[0] == "action" and node[1][0] in ("field", "not"):
            names.add(node[1][1].lower())
        elif node[0] == "if":
            if node[1][0] in ("field", "not"):
                names.add(node[1][1].lower())
            names |= _identifiers(node[2]) | _identifiers(node[3] or [])
    return names


def _value(expr: tuple, values: dict) -> Any:
    kind, arg = expr
    if kind == "str":
        return arg
    if kind == "field":
        return values.get(arg, "")
    return not values.get(arg, "")


def _execute(nodes: list, values: dict) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "action":
            out.append(str(_value(node[1], values)))
        else:
            branch = node[2] if _value(node[1], values) else (node[3] or [])
            out.append(_execute(branch, values))
    return "".join(out)


def _cut_after_response(nodes: list) -> list:
    """Ollama's ``deleteNode``: everything after the first ``{{ .Response }}`` (in document order, ``if`` conditions
    not looked at) is removed; an ``{{ else }}`` branch after it crashes Ollama (a nil list), so it is refused here."""
    cut = False

    def walk(items: list) -> list:
        nonlocal cut
        kept = []
        for node in items:
            if cut:
                continue
            if node[0] == "action" and node[1] == ("field", "Response"):
                cut = True
                kept.append(node)
            elif node[0] == "if":
                then = walk(node[2])
                if node[3] is not None and cut:
                    raise ValueError("an {{ else }} after {{ .Response }} makes Ollama's legacy template execution crash")
                kept.append(["if", node[1], then, walk(node[3]) if node[3] is not None else None])
            else:
                kept.append(node)
        return kept

    return walk(nodes)


def ollama_execute(template: str, messages: list[dict]) -> str:
    """What Ollama's ``Template.Execute`` renders for ``messages`` with a legacy template (one without
    ``.Messages``): consecutive messages of one role merged, the template executed per user turn, the system
    message in the turn that follows it only, the last turn cut after ``{{ .Response }}``. A template that names
    neither ``.Messages`` nor ``.Response`` gets ``{{ .Response }}`` appended, as Ollama's ``Parse`` does."""
    nodes = parse_go_template(template)
    names = _identifiers(nodes)
    if "messages" in names:
        raise ValueError("templates that range over .Messages are not in the subset this renderer implements")
    if "response" not in names:
        nodes.append(("action", ("field", "Response")))
    collated: list[dict] = []
    for message in messages:
        if collated and collated[-1]["role"] == message["role"] and message["role"] != "tool":
            collated[-1] = {**collated[-1], "content": collated[-1]["content"] + "\n\n" + message["content"]}
        else:
            collated.append(dict(message))
    out: list[str] = []
    state = {"System": "", "Prompt": "", "Response": ""}

    def execute() -> None:
        out.append(_execute(nodes, state))
        state.update(System="", Prompt="", Response="")

    for message in collated:
        role, content = message["role"], message.get("content") or ""
        if role == "system":
            if state["Prompt"] or state["Response"]:
                execute()
            state["System"] = content
        elif role == "user":
            if state["Response"]:
                execute()
            state["Prompt"] = content
        elif role == "assistant":
            state["Response"] = content
    out.append(_execute(_cut_after_response(nodes), state))
    return "".join(out)


# -- the Modelfile syntax (ollama/parser/parser.go) -------------------------------------------------------------------
_COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter", "message",
             "requires")


def go_is_print(ch: str) -> bool:
    """Go's ``strconv.IsPrint``: letters, marks, numbers, punctuation, symbols and the ASCII space. Ollama's
    Modelfile parser drops every other character of a value (other than the newlines and tabs inside quotes)."""
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """``(command, value)`` pairs of a Modelfile as Ollama's parser reads them (``FROM`` is ``model``, a
    ``PARAMETER`` is named by its parameter); raises ``ValueError`` where Ollama's parser fails."""
    commands: list[tuple[str, str]] = []
    name, curr, buf, role, line = "", "nil", [], "", 1

    def step(r: str, state: str) -> tuple[str, str]:
        space, newline = r in " \t", r in "\r\n"
        if state == "nil":
            return ("comment", "") if r == "#" else ("nil", "") if space or newline else ("name", r)
        if state == "name":
            if r.isascii() and r.isalpha():
                return "name", r
            if space:
                return "value", ""
            raise ValueError(f"Modelfile line {line}: a command must be one of {_COMMANDS}")
        if state == "value":
            return ("nil", r) if space or newline else ("value", r)
        if state in ("parameter", "message"):
            if r.isascii() and (r.isalnum() or (r == "_" and state == "parameter")):
                return state, r
            if space:
                return "value", ""
            raise ValueError(f"Modelfile line {line}: unexpected {r!r} in a {state.upper()} line")
        return ("nil", "") if newline else ("comment", "")

    for ch in text:
        if ch in "\r\n":
            line += 1
        nxt, r = step(ch, curr)
        if nxt != curr:
            if curr == "name":
                word = "".join(buf).lower()
                if word not in _COMMANDS:
                    raise ValueError(f"Modelfile line {line}: {word!r} is not a command")
                if word == "parameter":
                    nxt = "parameter"
                elif word == "message":
                    nxt, name = "message", word
                else:
                    name = "model" if word == "from" else word
            elif curr == "parameter":
                name = "".join(buf)
            elif curr == "message":
                role = "".join(buf)
            elif curr == "value":
                value, ok = _unquote("".join(buf).strip())
                if not ok or r in " \t":
                    buf.append(r)
                    continue
                commands.append((name, f"{role}: {value}" if role else value))
                role = ""
            buf = []
            curr = nxt
        if r and go_is_print(r):
            buf.append(r)
    if curr == "value":
        value, ok = _unquote("".join(buf).strip())
        if not ok:
            raise ValueError("Modelfile: unexpected end of file inside a quoted value")
        commands.append((name, f"{role}: {value}" if role else value))
    elif curr not in ("nil", "comment"):
        raise ValueError("Modelfile: unexpected end of file")
    if not any(n == "model" for n, _ in commands):
        raise ValueError("Modelfile: no FROM line")
    return commands


def ollama_prompt(modelfile: str, messages: list[dict]) -> str:
    """The prompt Ollama's ``/api/chat`` builds from ``messages`` with this Modelfile: its ``SYSTEM`` first where the
    request has no system message (``server/routes.go``), then the legacy ``TEMPLATE`` (:func:`ollama_execute`)."""
    commands = parse_modelfile(modelfile)
    template = next((v for n, v in reversed(commands) if n == "template"), "{{ .Prompt }}")
    system = next((v for n, v in reversed(commands) if n == "system"), "")
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}] + list(messages)
    return ollama_execute(template, messages)


# -- what we write ----------------------------------------------------------------------------------------------------
def _go_quoted(ch: str) -> str:
    """One character as a Go string action: ``{{ "\\u200f" }}``."""
    if ch in '"\\':
        return '{{ "\\' + ch + '" }}'
    if go_is_print(ch):
        return '{{ "' + ch + '" }}'
    return '{{ "' + (f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}") + '" }}'


def go_literal(text: str) -> str:
    """``text`` as Go-template source that survives the Modelfile's ``\"\"\"`` quoting: plain where it can be, a
    ``{{ "..." }}`` string action for ``{{`` (and a last ``{``, which an action follows), for a quote that would close the value (a third ``"`` in a row), and
    for characters the Modelfile parser would drop (:func:`go_is_print`; newlines and tabs are kept)."""
    out: list[str] = []
    quotes = 0  # plain quotes just written
    for i, ch in enumerate(text):
        unsafe = (not go_is_print(ch) and ch not in "\n\t") or (ch == "{" and text[i + 1:i + 2] in ("{", "")) \
            or (ch == '"' and quotes == 2)
        out.append(_go_quoted(ch) if unsafe else ch)
        quotes = quotes + 1 if ch == '"' and not unsafe else 0
    return "".join(out)


@dataclass(frozen=True)
class TurnTemplate:
    """The pieces of one turn as Ollama's legacy template writes it (module docstring)."""

    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_header: str
    turn_end: str
    generation_opening: str = ""  # after the header of the turn to be answered (Qwen3.5: "<think>\n")
    history_opening: str = ""  # after the header of an earlier, answered turn
    default_system: str = ""

    def go_template(self) -> str:
        lit = go_literal
        if self.generation_opening == self.history_opening:
            opening = lit(self.generation_opening)
        elif not self.history_opening:
            opening = "{{ if not .Response }}" + lit(self.generation_opening) + "{{ end }}"
        else:
            opening = ("{{ if .Response }}" + lit(self.history_opening) + "{{ else }}" + lit(self.generation_opening)
                       + "{{ end }}")
        return ("{{ if .System }}" + lit(self.system_prefix) + "{{ .System }}" + lit(self.system_suffix) + "{{ end }}"
                "{{ if .Prompt }}" + lit(self.user_prefix) + "{{ .Prompt }}" + lit(self.user_suffix) + "{{ end }}"
                + lit(self.assistant_header) + opening + "{{ .Response }}" + lit(self.turn_end))


IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_SYSTEM = (IM_START + "system\n", IM_END + "\n")
# distinct words no template changes (no spaces to strip, no markup)
_S, _U1, _X1, _U2, _X2, _U3 = "sysqprobe", "userqprobe1", "answerqprobe1", "userqprobe2", "answerqprobe2", "userqprobe3"


def probe_conversations() -> dict[str, list[dict]]:
    """Conversations every Modelfile is checked on: one and three turns, with and without a system message."""
    return {
        "one turn": [{"role": "user", "content": _U1}],
        "one turn, system": [{"role": "system", "content": _S}, {"role": "user", "content": _U1}],
        "two turns": [{"role": "user", "content": _U1}, {"role": "assistant", "content": _X1},
                      {"role": "user", "content": _U2}],
        "three turns, system": [{"role": "system", "content": _S}, {"role": "user", "content": _U1},
                                {"role": "assistant", "content": _X1}, {"role": "user", "content": _U2},
                                {"role": "assistant", "content": _X2}, {"role": "user", "content": _U3}],
    }


def _between(text: str, start: str | None, end: str | None) -> str:
    i = 0 if start is None else text.index(start) + len(start)
    j = len(text) if end is None else text.index(end, i)
    return text[i:j]


def turn_template(fmt: Any, end_text: str, render: Callable[[list[dict]], str]) -> TurnTemplate:
    """The :class:`TurnTemplate` of a run's :class:`~src.data.templates.PromptFormat` (``end_text``: its end token).

    ``render(messages)`` is the saved chat template's rendering with the generation prompt; the formats we write
    ourselves are taken from ``fmt``, the model's own template (``instruction_template='tokenizer'``) is read off
    ``render`` on probe conversations, cut at its ChatML framing."""
    if fmt.chat is None:
        before, after = fmt.template.split("{instruction}", 1)
        header = fmt.response_template if after.endswith(fmt.response_template) else after
        system = CHATML_SYSTEM if fmt.name == "chatml" else ("", "\n\n")
        return TurnTemplate(system[0], system[1], before, after[:len(after) - len(header)], header,
                            end_text + fmt.end_suffix, default_system=fmt.system_prompt or "")
    user, header = IM_START + "user\n", IM_START + "assistant\n"
    probes = probe_conversations()
    try:
        with_system = render(probes["one turn, system"])
        system_prefix = _between(with_system, None, _S)
        system_suffix = _between(with_system, _S, _U1)
        if not system_suffix.endswith(user):
            raise ValueError("the user turn does not open with '<|im_start|>user\\n'")
        system_suffix = system_suffix[:-len(user)]
        after_user = _between(with_system, _U1, None)
        if header not in after_user:
            raise ValueError("no '<|im_start|>assistant\\n' after the user turn")
        user_suffix, generation_opening = after_user.split(header, 1)
        history = render(probes["two turns"])
        history_opening = _between(history, _U1, _X1)[len(user_suffix) + len(header):]
        turn_end = _between(history, _X1, _U2)[:-len(user)]
        plain = render(probes["one turn"])
        default = ""
        if not plain.startswith(user):
            head = _between(plain, None, _U1)[:-len(user)]
            if head.startswith(system_prefix) and head.endswith(system_suffix):
                default = head[len(system_prefix):len(head) - len(system_suffix)]
            elif head.startswith(CHATML_SYSTEM[0]) and head.endswith(CHATML_SYSTEM[1]):
                # e.g. Qwen3.8's reasoning-effort line: its own system block without a system message, in front of
                # one otherwise. A legacy template cannot do both; conversations without one stay exact.
                system_prefix, system_suffix = CHATML_SYSTEM
                default = head[len(system_prefix):len(head) - len(system_suffix)]
            else:
                raise ValueError(f"the template opens a conversation without a system message with {head!r}")
    except ValueError as exc:
        raise ValueError(f"export --format ollama: this run's chat template cannot be written as an Ollama template "
                         f"({exc}); serve it with llama-server --jinja, vLLM or transformers instead") from None
    return TurnTemplate(system_prefix, system_suffix, user, user_suffix, header, turn_end, generation_opening,
                        history_opening, default)


def check_modelfile_text(system_prompt: str | None) -> None:
    """Refuse a system prompt a Modelfile cannot carry: Ollama's parser drops characters that are not printable and
    ends a ``\"\"\"`` value at the first ``\"\"\"``."""
    if not system_prompt:
        return
    dropped = sorted({f"U+{ord(c):04X}" for c in system_prompt if not go_is_print(c) and c not in "\n\t"})
    if dropped or '"""' in system_prompt:
        what = f"characters Ollama's Modelfile parser drops ({', '.join(dropped)})" if dropped else '\'"""\''
        raise ValueError(f"export --format ollama: the run's system_prompt contains {what}, so a Modelfile SYSTEM cannot "
                         "carry it as trained; serve the run with a stack that reads the saved chat template instead")


def modelfile(turns: TurnTemplate, stops: list[str], source: str, *, format_name: str, normalization: str = "none",
              notes: list[str] | None = None) -> str:
    """The Modelfile text: comments, ``FROM source``, ``TEMPLATE``, ``SYSTEM`` (when the run has one) and one
    ``PARAMETER stop`` per end token."""
    check_modelfile_text(turns.default_system)
    lines = ["# Ollama Modelfile written by `train_sft.py export --format ollama`. Create the model in this folder:",
             "#   ollama create NAME -f Modelfile",
             f"# TEMPLATE writes prompts as training formatted them ({format_name}); SYSTEM is the run's system prompt,",
             "# used when a request has none; generation stops at the run's end tokens."]
    if normalization != "none":
        lines.append(f"# Ollama does not apply the run's Arabic normalization ({normalization!r}): normalize prompts "
                     "first (python -m src.data.normalization --model RUN_DIR).")
    lines += [f"# {note}" for note in notes or []]
    lines += [f"FROM {source}", f'TEMPLATE """{turns.go_template()}"""']
    if turns.default_system:
        lines.append(f'SYSTEM """{turns.default_system}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"


TOKENIZER_NOTES = [
    "Not reproduced by this TEMPLATE (Ollama gives a legacy template the text of each turn only): tool definitions,",
    "tool calls and tool results, the reasoning of earlier assistant turns, and the trimming some Qwen templates apply",
    "to earlier answers. For tools, serve the exported folder with a stack that runs its saved Jinja chat template",
    "(llama-server --jinja, vLLM, transformers).",
]


def check_rendering(text: str, render: Callable[[list[dict]], str]) -> list[str]:
    """Names of the probe conversations on which the Modelfile ``text`` renders otherwise than ``render``."""
    return [name for name, messages in probe_conversations().items() if ollama_prompt(text, messages) != render(messages)]


def write_modelfile(folder: str, example_tokenizer: Any, stop_ids: list[int], source: str, *,
                    normalization: str = "none") -> str:
    """Write ``folder/Modelfile`` for the run that ``example_tokenizer`` formats, after checking that Ollama would
    render the probe conversations exactly as the saved chat template does; returns its path."""
    tokenizer, fmt = example_tokenizer.tokenizer, example_tokenizer.fmt
    end_text = tokenizer.convert_ids_to_tokens(example_tokenizer.end_id)
    saved = chat_template(fmt, end_text)
    special = dict(fmt.chat.special_tokens) if fmt.chat is not None else {}

    def render(messages: list[dict]) -> str:
        return render_jinja_template([messages], chat_template=saved, add_generation_prompt=True, **special)[0][0]

    turns = turn_template(fmt, end_text, render)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_ids]

    def text_with(notes: list[str] | None) -> str:
        return modelfile(turns, stops, source, format_name=fmt.name, normalization=normalization, notes=notes)

    differs = check_rendering(text_with(None), render)
    if differs and fmt.chat is None:  # our own formats are always reproduced: anything else is a bug
        raise ValueError(f"export --format ollama: the Ollama template would render {', '.join(differs)} otherwise than "
                         "the run's chat template; serve this run with llama-server --jinja, vLLM or transformers")
    notes = None
    if fmt.chat is not None:
        notes = list(TOKENIZER_NOTES)
        if differs:
            notes += [f"Also rendered otherwise than the saved chat template: {'; '.join(differs)} (e.g. a template that "
                      "writes its own text into the system block, like Qwen3.8's reasoning effort: send it in front of "
                      "your system message yourself)."]
    text = text_with(notes)
    path = os.path.join(folder, MODELFILE)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path
