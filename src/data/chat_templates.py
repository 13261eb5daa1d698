"""The model's own chat template as the training format (``instruction_template="tokenizer"``).

Every Qwen generation (Qwen2.5, Qwen3, Qwen3-Instruct-2507, Qwen3.5, Qwen3.6, Qwen3.8) frames turns the
same way, ``<|im_start|>ROLE\\n ... <|im_end|>\\n``; what differs is what goes *inside* an assistant turn
(``<think>`` blocks, tool-call markup) and the generation prompt. We render each conversation with the
tokenizer's template (transformers' own renderer, exactly what ``apply_chat_template`` renders) and cut
the rendered text into untrained prompt pieces and trained assistant pieces. Masks never depend on
``{% generation %}`` markers, which the shipped Qwen templates do not have.

How each assistant turn is trained (the choices, written down):

- **As the template renders the whole conversation.** The conversation is rendered once, as inference
  would render it as history. Templates that are not prefix-preserving (Qwen3 and Qwen3.5 drop the
  reasoning of assistant turns before the last user query) therefore train earlier turns *without*
  their reasoning and the turns after the last user query *with* it, exactly as the template writes
  them; nothing is trained that the template does not render.
- **What the model generates, nothing it is given.** The assistant header ``<|im_start|>assistant\\n`` is
  prompt. So is whatever the template's *generation prompt* adds after the header, where the turn
  starts with it: ``<think>\\n`` for Qwen3.5/3.6/3.8 (thinking on), ``<think>\\n\\n</think>\\n\\n`` with
  ``enable_thinking=False``. Everything after that up to and including ``<|im_end|>`` is trained:
  reasoning, ``</think>``, the answer, the tool calls, the end token.
- **An empty thinking block is not trained** (``ignore_empty_think=True``, the default, as ms-swift's
  ``ignore_empty_think``). For a row without reasoning a thinking template writes ``<think>\\n\\n</think>\\n\\n``
  at the start of the turn (Qwen3 in the last turn, Qwen3.5/3.6 after the last user query, Qwen3.8 in every
  turn): the block is prompt text, masked, and training starts at the answer. Training it would teach the
  model to skip thinking in thinking mode, on every row that happens to have no reasoning. Where the
  generation prompt is ``<think>\\n`` (Qwen3.5/3.6/3.8, thinking on) the prompt still ends at ``<think>\\n``
  and the rest of the block, ``\\n</think>\\n\\n``, is a second masked piece (the token split below is
  unchanged); with ``enable_thinking=False`` the whole block is the generation prompt already. A non-empty
  reasoning block is always trained. ``ignore_empty_think=False`` trains the empty block (what the model
  produces at inference for such rows, under the same settings). One exception keeps the ids exact: when the
  answer itself starts with whitespace holding a line break, which the pre-tokenizer would merge with the
  block's closing newlines into one token, the block stays trained (the Qwen3.5+ templates trim answers;
  Qwen3 strips their leading newlines).
- **Per-row template variables.** A row may carry ``chat_template_kwargs`` (e.g. ``{"enable_thinking": false}``):
  they override the run's ``chat_template_kwargs`` for that row only, so thinking and non-thinking rows mix in
  one run, each rendered (and its generation prompt found) with its merged variables. With any other
  ``instruction_template`` such a row is an error naming the row (those formats have no template variables).
- **Tool responses** (``role: tool``) render inside user turns and are never trained; the assistant's
  tool calls are trained as the template renders them (JSON for Qwen2.5/Qwen3, XML-like parameters for
  Qwen3.5+; tool arguments are rendered by the template's ``tojson``, which keeps Arabic unescaped).
- The newline after each ``<|im_end|>`` belongs to the template's framing and is not trained, as with
  ``instruction_template="chatml"``.

Prompt and trained pieces are tokenized separately and their ids concatenated, like every other format
(:mod:`src.data.tokenization`); their boundaries fall on special tokens or after newlines, where Qwen's
pre-tokenizer always splits, so the ids equal ``apply_chat_template(..., tokenize=True)`` (tested for every
shipped template).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ASSISTANT_HEADER = IM_START + "assistant\n"
TURN_END = IM_END + "\n"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
EMPTY_THINK = THINK_OPEN + "\n\n" + THINK_CLOSE + "\n\n"  # what the thinking templates write for no reasoning
# Text that Qwen's pre-tokenizer (``\s*[\r\n]+``) would join with the newlines before it into one token.
_JOINS_PRECEDING_NEWLINES = re.compile(r"\s*[\r\n]")
_PROBE = [{"role": "user", "content": "x"}]


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be used as a training format (or fails on a row)."""


def parse_template_kwargs(value: Any) -> dict[str, Any]:
    """``SFTConfig.chat_template_kwargs`` as a dict: a dict, JSON text of an object, or None (empty)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON object ({exc.msg}); expected e.g. '{{\"enable_thinking\": false}}'") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"expected a mapping of template variable names to values, got {value!r}")
    import keyword

    bad = sorted(k for k in value if not k.isidentifier() or keyword.iskeyword(k)
                 or k in ("true", "false", "none", "True", "False", "None"))
    if bad:
        raise ValueError(f"{bad} cannot be template variable names (letters, digits and '_', not starting with a digit)")
    reserved = sorted({"messages", "tools", "add_generation_prompt", "documents"} & set(value))
    if reserved:
        raise ValueError(f"{reserved} are set by the trainer for each conversation; they cannot be chat_template_kwargs")
    return dict(value)


def reasoning_in_answer(reasoning: str, answer: str) -> str:
    """Reasoning written in front of an answer as Qwen's thinking templates write it (for formats that have no
    place for ``reasoning_content``)."""
    return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{answer}"


def split_reasoning(text: str) -> tuple[str, str]:
    """``(reasoning, answer)`` of a generated text: what precedes ``</think>`` (without ``<think>``), and
    what follows it; ``("", text)`` when the text has no ``</think>``."""
    if THINK_CLOSE not in text:
        return "", text
    reasoning, answer = text.split(THINK_CLOSE, 1)
    reasoning = reasoning.split(THINK_OPEN, 1)[-1]
    return reasoning.strip("\n"), answer.lstrip("\n")


def jinja_literal(value: Any) -> str:
    """``value`` (JSON data) as a Jinja expression."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(jinja_literal, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {jinja_literal(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"chat_template_kwargs: {value!r} is not JSON data")


@dataclass(frozen=True)
class TokenizerChatFormat:
    """A tokenizer's chat template with the run's template variables (``enable_thinking``, ``reasoning_effort``...).

    ``kwargs`` and ``special_tokens`` are tuples of items so the format is hashable and fingerprints
    itself in the tokenized-data cache key (``dataclasses.asdict``); so does ``ignore_empty_think`` (mask an
    empty thinking block at the start of an assistant turn, see the module docstring).
    """

    template: str
    kwargs: tuple = ()
    special_tokens: tuple = ()
    ignore_empty_think: bool = True

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, template_kwargs: dict | None = None,
                       ignore_empty_think: bool = True) -> "TokenizerChatFormat":
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
        if not isinstance(template, str) or not template.strip():
            raise ChatTemplateError(
                "instruction_template='tokenizer' needs a tokenizer with a chat template, but this tokenizer has none; "
                "use a model whose tokenizer_config.json has one (every Qwen2.5/Qwen3 model does) or choose "
                "'chatml', 'alpaca' or 'custom'")
        special = tuple(sorted((k, str(v)) for k, v in getattr(tokenizer, "special_tokens_map", {}).items()
                               if isinstance(v, str)))
        fmt = cls(template, tuple(sorted((template_kwargs or {}).items(), key=lambda kv: kv[0])), special,
                  bool(ignore_empty_think))
        fmt.check()
        return fmt

    @property
    def template_kwargs(self) -> dict[str, Any]:
        return dict(self.kwargs)

    @property
    def reads_reasoning(self) -> bool:
        """Whether the template renders ``reasoning_content`` (Qwen3 and later do; Qwen2.5 and Qwen3-2507 do not)."""
        return "reasoning_content" in self.template

    def with_reasoning_rendered(self, message: dict) -> dict:
        """An assistant message whose reasoning the template will render, never drop.

        For a template that reads ``reasoning_content``, reasoning written inside the answer
        (``<think>...</think>answer``) moves to ``reasoning_content``, as Qwen3's template does by itself (Qwen3.8's
        does not, and would render the block twice). For a template that ignores ``reasoning_content`` (Qwen2.5,
        Qwen3-2507), the reasoning goes in front of the answer as ``<think>\\n...\\n</think>\\n\\n``, the form the
        thinking templates write; it is trained like the rest of the answer.
        """
        reasoning, content = message.get("reasoning_content"), message.get("content") or ""
        if self.reads_reasoning:
            if reasoning is None and THINK_CLOSE in content:
                reasoning, content = split_reasoning(content)
                return {**message, "content": content, "reasoning_content": reasoning}
            return message
        if reasoning is None:
            return message
        message = {k: v for k, v in message.items() if k != "reasoning_content"}
        return {**message, "content": reasoning_in_answer(reasoning, content)}

    def merged_kwargs(self, row_kwargs: dict | None = None) -> dict[str, Any]:
        """The run's template variables with a row's own ``chat_template_kwargs`` over them."""
        return {**self.template_kwargs, **row_kwargs} if row_kwargs else self.template_kwargs

    def render(self, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False,
               template_kwargs: dict | None = None) -> str:
        """The template's text for ``messages`` (what ``apply_chat_template(..., tokenize=False)`` returns);
        ``template_kwargs``: a row's variables, over the run's."""
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template([messages], tools=tools or None, chat_template=self.template,
                                                add_generation_prompt=add_generation_prompt,
                                                **dict(self.special_tokens), **self.merged_kwargs(template_kwargs))
        except Exception as exc:  # jinja2 errors and the template's own raise_exception
            raise ChatTemplateError(f"the chat template failed on this conversation: {type(exc).__name__}: {exc}") from None
        return rendered[0]

    def check(self) -> None:
        """Refuse templates whose turns are not ChatML-framed (we cut the rendered text at the framing)."""
        rendered = self.render(_PROBE + [{"role": "assistant", "content": "y"}])
        if ASSISTANT_HEADER not in rendered or not rendered.endswith("y" + TURN_END):
            raise ChatTemplateError(
                "instruction_template='tokenizer' supports ChatML-framed templates (every Qwen generation: "
                "'<|im_start|>assistant\\n...<|im_end|>\\n'); this tokenizer's template renders a turn as "
                f"{rendered[-80:]!r}")
        self.generation_opening  # noqa: B018 - validates the generation prompt too

    @cached_property
    def generation_opening(self) -> str:
        """What ``add_generation_prompt`` writes after the assistant header (``""``, ``"<think>\\n"``, ...)."""
        return self.opening_for(None)

    def opening_for(self, row_kwargs: dict | None) -> str:
        """:attr:`generation_opening` under a row's ``chat_template_kwargs`` (over the run's), computed once per
        set of merged variables (``{"enable_thinking": false}`` turns ``"<think>\\n"`` into the whole empty block)."""
        key = json.dumps(self.merged_kwargs(row_kwargs), sort_keys=True, ensure_ascii=False, default=repr)
        openings = self.__dict__.setdefault("_openings", {})  # not a field: outside eq, hash and asdict
        if key not in openings:
            without = self.render(_PROBE, template_kwargs=row_kwargs)
            with_prompt = self.render(_PROBE, add_generation_prompt=True, template_kwargs=row_kwargs)
            added = with_prompt[len(without):]
            if not with_prompt.startswith(without) or not added.startswith(ASSISTANT_HEADER):
                raise ChatTemplateError(f"the chat template's generation prompt is {added!r}, not "
                                        "'<|im_start|>assistant\\n...'")
            openings[key] = added[len(ASSISTANT_HEADER):]
        return openings[key]

    def empty_think_end(self, full: str, turn_start: int, turn_end: int) -> int:
        """Where the masked empty thinking block of the assistant turn ``full[turn_start:turn_end]`` ends
        (``turn_start``: none to mask)."""
        if not self.ignore_empty_think or not full.startswith(EMPTY_THINK, turn_start):
            return turn_start
        block_end = turn_start + len(EMPTY_THINK)
        if block_end > turn_end or _JOINS_PRECEDING_NEWLINES.match(full, block_end, turn_end):
            return turn_start  # the answer's leading line break and the block's "\n\n" are one token: not cut there
        return block_end

    def segments(self, messages: list[dict], tools: list | None = None, train_on_last_turn_only: bool = False,
                 template_kwargs: dict | None = None, trained_turns: list[bool] | None = None,
                 prompt_pieces: Any = None) -> list[tuple[str, str, bool]]:
        """``(kind, text, trained)`` pieces of a conversation: prompts and the responses *without* their closing
        ``<|im_end|>\\n`` (the caller appends the end token, trained, and the newline, untrained).
        ``template_kwargs``: the row's own template variables, over the run's. ``trained_turns``: whether each
        assistant turn is trained (default: all, or the last one under ``train_on_last_turn_only``).
        ``prompt_pieces(text, k)``: the segments of the prompt text before assistant turn ``k`` (``k`` = the number
        of turns: the text after the last); default one masked segment."""
        full = self.render(messages, tools, template_kwargs=template_kwargs)
        n_assistant = sum(1 for m in messages if m["role"] == "assistant")
        pieces = prompt_pieces or (lambda text, _turn: [("prompt", text, False)] if text else [])
        opening = self.opening_for(template_kwargs)
        segments: list[tuple[str, str, bool]] = []
        done = 0  # end of the text already cut into segments
        for turn in range(n_assistant):
            header = full.find(ASSISTANT_HEADER, done)
            if header < 0:
                raise ChatTemplateError(f"the chat template rendered {turn} assistant turns for {n_assistant} assistant "
                                        "messages")
            turn_start = start = header + len(ASSISTANT_HEADER)
            if opening and full.startswith(opening, start):
                start += len(opening)
            end = full.find(IM_END, start)
            if end < 0 or not full.startswith(TURN_END, end):
                raise ChatTemplateError("an assistant turn of the rendered conversation does not end with '<|im_end|>\\n'")
            trained = trained_turns[turn] if trained_turns is not None else (
                not train_on_last_turn_only or turn == n_assistant - 1)
            segments += pieces(full[done:start], turn)
            block_end = self.empty_think_end(full, turn_start, end)
            if block_end > start:  # the empty block, or the rest of it after a "<think>\n" generation prompt
                segments.append(("prompt", full[start:block_end], False))
                start = block_end
            segments.append(("response", full[start:end], trained))
            done = end + len(TURN_END)
        if full.find(ASSISTANT_HEADER, done) >= 0:
            raise ChatTemplateError(f"the chat template rendered more assistant turns than the {n_assistant} assistant "
                                    "messages")
        if full[done:]:
            segments += pieces(full[done:], n_assistant)
        return segments

    def saved_template(self, system_prompt: str | None = None) -> str:
        """The template to save with a trained model: the original, with this run's template variables and
        system prompt as defaults, so a plain ``apply_chat_template(messages, add_generation_prompt=True)``
        renders the prompts training rendered. A caller's explicit variable or system message still wins."""
        lines = []
        for name, value in self.kwargs:
            lines.append(f"{{%- if {name} is not defined %}}{{%- set {name} = {jinja_literal(value)} %}}{{%- endif %}}")
        if system_prompt:
            system = jinja_literal({"role": "system", "content": system_prompt})
            lines.append("{%- if not messages or messages[0]['role'] != 'system' %}"
                         f"{{%- set messages = [{system}] + messages %}}{{%- endif %}}")
        prefix = "".join(lines)
        return self.template if self.template.startswith(prefix) else prefix + self.template
