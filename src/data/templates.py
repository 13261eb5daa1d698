"""Instruction templates, exactly as the specification writes them.

A template turns one instruction into the prompt text; the response follows it
directly, and the template's *end token* closes the response. The end token is
trained: a model that never sees it as a target never learns to stop.

- ``alpaca``: ``"### Instruction:\\n{instruction}\\n\\n### Response:\\n"``, end token = the tokenizer's EOS.
- ``chatml``: ``"<|im_start|>user\\n{instruction}<|im_end|>\\n<|im_start|>assistant\\n"``, end token =
  ``<|im_end|>`` followed by an *untrained* ``"\\n"`` so that a formatted example is byte-for-byte what
  Qwen's chat template writes for the same turn.
- ``custom``: ``SFTConfig.custom_template`` (must contain ``{instruction}``), end token = EOS.
- ``tokenizer``: the model's own chat template (Qwen2.5 through Qwen3.8: thinking, tool calls), rendered
  by transformers and cut into prompt and trained pieces (:mod:`src.data.chat_templates`); end token =
  ``<|im_end|>``, the newline after it untrained. Not the default: the specification's default is
  ``alpaca``, and Qwen2.5's own template injects an English system prompt that the other formats do not.

With a ``system_prompt`` set, ChatML prompts start with a system block written as Qwen writes it
(``<|im_start|>system\\n...<|im_end|>\\n``); alpaca and custom prompts start with the system prompt
followed by a blank line. Unset, the prompt is exactly the specification's template (no system block;
unlike Qwen's own chat template, no English default system prompt is injected: an English identity
statement in front of every Arabic example is a choice the user should make, not a default; use
``QWEN_DEFAULT_SYSTEM_PROMPT`` to reproduce Qwen2.5-Instruct exactly).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
CHATML_TEMPLATE = "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"

TEMPLATES = {"alpaca": ALPACA_TEMPLATE, "chatml": CHATML_TEMPLATE}
TEMPLATE_NAMES = ("alpaca", "chatml", "custom", "tokenizer")
DEFAULT_RESPONSE_TEMPLATES = {"alpaca": "### Response:\n", "chatml": "<|im_start|>assistant\n",
                              "tokenizer": "<|im_start|>assistant\n"}

CHATML_END = "<|im_end|>"
# What Qwen2.5-Instruct's chat template inserts when a conversation has no system message. Ours inserts
# nothing (the specification's template has no system block); set system_prompt to this string to
# format byte-for-byte as Qwen2.5-Instruct's apply_chat_template does.
QWEN_DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CHATML_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class PromptFormat:
    """Everything needed to turn (instruction, response) into training or generation text.

    ``end_token`` is ``None`` for "the tokenizer's EOS token"; ``end_suffix`` is text after the end
    token that belongs to the format but is never trained (ChatML's newline after ``<|im_end|>``).
    """

    name: str
    template: str
    response_template: str
    end_token: str | None
    end_suffix: str = ""
    system_prompt: str | None = None
    chat: Any = None  # the TokenizerChatFormat of instruction_template="tokenizer"

    def format_prompt(self, instruction: str, system_prompt: str | None = None) -> str:
        """The prompt text for one instruction: everything the model reads before it answers."""
        system = self.system_prompt if system_prompt is None else system_prompt
        if self.chat is not None:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": instruction}]
            return self.chat.render(messages, add_generation_prompt=True)
        prompt = self.template.replace("{instruction}", instruction)
        if system:
            prompt = self.format_system(system) + prompt
        return prompt

    def format_system(self, system: str) -> str:
        if self.name == "chatml":
            return f"<|im_start|>system\n{system}<|im_end|>\n"
        return f"{system}\n\n"


def check_template_settings(instruction_template: str, custom_template: str | None = None,
                            response_template: str | None = None) -> None:
    """Raise ``ValueError`` naming the setting when these template settings cannot work."""
    if instruction_template not in TEMPLATE_NAMES:
        raise ValueError(f"instruction_template={instruction_template!r} is invalid: expected one of {TEMPLATE_NAMES}.")
    if instruction_template == "custom" and (not isinstance(custom_template, str) or "{instruction}" not in custom_template):
        raise ValueError("custom_template must be a string containing '{instruction}' when "
                         f"instruction_template='custom' (got {custom_template!r}).")
    if response_template is not None and (not isinstance(response_template, str) or not response_template):
        raise ValueError(f"response_template={response_template!r} is invalid: expected a non-empty string.")


def default_response_template(name: str, custom_template: str | None = None) -> str:
    """The response prefix of a template: the text that ends every prompt.

    For a custom template it is whatever follows ``{instruction}``.
    """
    check_template_settings(name, custom_template)
    if name == "custom":
        return custom_template.split("{instruction}", 1)[1]
    return DEFAULT_RESPONSE_TEMPLATES[name]


def get_prompt_format(
    name: str,
    custom_template: str | None = None,
    response_template: str | None = None,
    system_prompt: str | None = None,
    chat: Any = None,
) -> PromptFormat:
    """Build the :class:`PromptFormat` for a template name (``alpaca``, ``chatml``, ``custom``, or ``tokenizer``
    with ``chat``, the :class:`~src.data.chat_templates.TokenizerChatFormat` of the tokenizer's template)."""
    check_template_settings(name, custom_template, response_template)
    rt = response_template or default_response_template(name, custom_template)
    if name == "tokenizer":
        if chat is None:
            raise ValueError("instruction_template='tokenizer' needs the tokenizer's chat template (chat=...)")
        return PromptFormat(name, "", rt, end_token=CHATML_END, end_suffix="\n", system_prompt=system_prompt, chat=chat)
    template = custom_template if name == "custom" else TEMPLATES[name]
    if name == "chatml":
        return PromptFormat(name, template, rt, end_token=CHATML_END, end_suffix="\n", system_prompt=system_prompt)
    return PromptFormat(name, template, rt, end_token=None, system_prompt=system_prompt)


def chat_template(fmt: PromptFormat, end_text: str) -> str:
    """A Jinja chat template that renders conversations exactly as training formats them with ``fmt``.

    Saved with every trained model, so serving stacks that call ``apply_chat_template`` build the prompts
    the model saw: the system block (the conversation's own, else the run's ``system_prompt``) opens the
    first user turn only, each assistant answer ends with ``end_text`` (the end token) and the format's
    suffix. In these formats the assistant header (``"<|im_start|>assistant\\n"``, ``"### Response:\\n"``)
    is part of every user turn, so ``add_generation_prompt`` changes nothing. Text normalization (Arabic
    presets) is the caller's: the template renders text as given.

    For ``instruction_template="tokenizer"`` it is the model's own template with the run's template
    variables and system prompt as defaults (:meth:`TokenizerChatFormat.saved_template`).
    """
    if fmt.chat is not None:
        return fmt.chat.saved_template(fmt.system_prompt)
    before, after = fmt.template.split("{instruction}", 1)

    def literal(text: str) -> str:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"

    if fmt.name == "chatml":
        system_block = literal("<|im_start|>system\n") + "{{ system }}" + literal("<|im_end|>\n")
    else:
        system_block = "{{ system }}" + literal("\n\n")
    default_system = json.dumps(fmt.system_prompt or "", ensure_ascii=False)
    return (
        "{%- set ns = namespace(first=true) -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = " + default_system + " -%}{%- set turns = messages -%}{%- endif -%}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- if ns.first and system -%}" + system_block + "{%- endif -%}"
        + literal(before) + "{{ message['content'] }}" + literal(after) +
        "{%- set ns.first = false -%}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ message['content'] }}" + literal(end_text + fmt.end_suffix) +
        "{%- endif -%}"
        "{%- endfor -%}"
    )
