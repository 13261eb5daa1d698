"""How a row is formatted: one message shape, one transform per record shape, one formatter per prompt format.

Validated records (:mod:`src.data.records`) come in three shapes: instruction rows
(``instruction``/``response``/``system``, optional ``reasoning_content``), conversations (``messages``,
optional ``tools``) and pre-formatted ``text``; any of the first two may carry ``chat_template_kwargs``.
Each shape has one transform to the one shape the formatter reads, a :class:`Conversation`
(the anchor: torchtune's ``Message`` and its per-schema message transforms):

- an instruction row is a conversation of an optional system message, a user turn and an assistant turn
  (its ``reasoning_content`` on the assistant turn);
- a conversation is itself;
- a pre-formatted text is a conversation with ``text`` set and no messages: it is already formatted, so
  the formatter only cuts it at the response template.

:class:`Formatter` turns a conversation into *segments*, ``(kind, text, trained)`` with kind "prompt" or
"response", for one :class:`~src.data.templates.PromptFormat`: the prompt texts (masked) and the responses
(trained unless the assistant message says ``"loss": false``, or ``train_on_last_turn_only`` masks all but the
last). ``train_on_prompt`` trains the prompts' message texts too, the template markup around them masked unless
``train_on_prompt_markup`` (:meth:`Formatter.prompt_pieces`). The end token and the format's suffix
after each response are not text here: :mod:`src.data.tokenization` appends their ids, so every prompt and
response is tokenized on its own and their ids concatenated. With ``instruction_template="tokenizer"`` the
model's chat template renders and cuts the conversation (:mod:`src.data.chat_templates`).

``normalize`` (optional) is applied to every piece of user text (instructions, responses, system prompts,
pre-formatted text) before formatting, the same function that generation uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from src.data.chat_templates import reasoning_in_answer
from src.data.records import LOSS_KEYS
from src.data.templates import PromptFormat

Segment = tuple[str, str, bool]  # (kind: "prompt" | "response", text, trained)


@dataclass(frozen=True)
class Conversation:
    """The one shape every record is formatted from.

    ``messages``: ``{"role", "content"}`` dicts (an optional leading system message, then user/assistant turns,
    ``role: tool`` turns after assistant turns with ``tool_calls``; assistant turns may carry
    ``reasoning_content``). ``tools``: the row's tool schemas. ``template_kwargs``: the row's own chat template
    variables. ``text``: a pre-formatted example (then ``messages`` is empty).
    """

    messages: list[dict]
    tools: list | None = None
    template_kwargs: dict | None = None
    text: str | None = None

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in self.messages)


def instruction_to_conversation(record: dict) -> Conversation:
    """An instruction row: [system], user, assistant (with its reasoning when the row has one)."""
    answer = {"role": "assistant", "content": record["response"]}
    if record.get("reasoning_content") is not None:
        answer["reasoning_content"] = record["reasoning_content"]
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return Conversation(system + [{"role": "user", "content": record["instruction"]}, answer],
                        template_kwargs=record.get("chat_template_kwargs"))


def messages_to_conversation(record: dict) -> Conversation:
    return Conversation(list(record["messages"]), record.get("tools"), record.get("chat_template_kwargs"))


def text_to_conversation(record: dict) -> Conversation:
    return Conversation([], template_kwargs=record.get("chat_template_kwargs"), text=record["text"])


def to_conversation(record: dict) -> Conversation:
    """The :class:`Conversation` of a validated record, whatever its shape (the only place that asks)."""
    if record.get("text") is not None:
        return text_to_conversation(record)
    if record.get("messages") is not None:
        return messages_to_conversation(record)
    return instruction_to_conversation(record)


def _with_reasoning(message: dict) -> str:
    """An assistant answer for formats without thinking markup (alpaca, chatml, custom): the reasoning, when
    the turn has one, in Qwen's form ``<think>\\n...\\n</think>\\n\\n`` before the answer, never dropped."""
    reasoning = message.get("reasoning_content")
    return reasoning_in_answer(reasoning, message["content"]) if reasoning else message["content"]


class Formatter:
    """Conversations -> prompt and response texts for one prompt format (see the module docstring).

    ``end_text`` is the end token as text (``<|im_end|>``, or the tokenizer's EOS): a pre-formatted text that
    already ends with it (and the format's suffix), as ``apply_chat_template`` output does, has it removed,
    since tokenization appends it once.
    """

    def __init__(self, fmt: PromptFormat, end_text: str, normalize: Callable[[str], str] | None = None,
                 train_on_last_turn_only: bool = False, train_on_prompt: bool = False,
                 train_on_prompt_markup: bool = False, split_points: Callable[[str], list[int] | None] | None = None):
        self.fmt = fmt
        self.end_text = end_text
        self.normalize = normalize or (lambda text: text)
        self.train_on_last_turn_only = train_on_last_turn_only
        self.train_on_prompt = train_on_prompt
        self.train_on_prompt_markup = train_on_prompt_markup
        self.split_points = split_points  # where a prompt may be cut without changing its ids (the tokenizer's)

    def trained_turns(self, messages: list[dict]) -> list[bool]:
        """Whether each assistant turn is trained: not when its message says ``"loss": false`` (``src.data.records``
        keeps the key only then), nor, under ``train_on_last_turn_only``, when it is not the last one."""
        assistant = [m for m in messages if m["role"] == "assistant"]
        return [m.get("loss") is not False and (not self.train_on_last_turn_only or i == len(assistant) - 1)
                for i, m in enumerate(assistant)]

    def prompt_pieces(self, text: str, contents: list[str], optional: tuple[str, ...] = ()) -> list[Segment]:
        """A prompt as segments. Without ``train_on_prompt``: one masked segment. With it and
        ``train_on_prompt_markup``: one trained segment (every prompt token). With it alone: the messages' texts
        (``contents``, in order; ``optional`` ones may be absent from ``text``, as a system prompt a format does not
        write) trained and the template's markup between them masked. A content the rendered prompt does not hold
        verbatim is an error (the template changed it: there is no exact split), never a guess."""
        if not self.train_on_prompt or not text:
            return [("prompt", text, False)] if text else []
        if self.train_on_prompt_markup:
            return [("prompt", text, True)]
        points = self.split_points(text) if self.split_points is not None else None
        pieces: list[Segment] = []
        cursor = 0
        for content in contents:
            if not content:
                continue
            at = text.find(content, cursor)
            if at < 0:
                if content in optional:
                    continue
                raise ValueError(f"train_on_prompt: the message text {content[:40]!r} is not written verbatim in the "
                                 f"prompt the {self.fmt.name!r} format renders, so its tokens cannot be told from the "
                                 "markup; set train_on_prompt_markup: true to train every prompt token")
            start, end = at, at + len(content)
            if points is not None:
                # Cut only where the tokenizer cuts: a token shared by the text and the markup (".\n\n" before a
                # template's next block) stays masked, so the ids are the same as without train_on_prompt.
                start = next((p for p in points if p >= start), end)
                end = max((p for p in points if p <= end), default=start)
            if start < end:
                if start > cursor:
                    pieces.append(("prompt", text[cursor:start], False))
                pieces.append(("prompt", text[start:end], True))
                cursor = end
            else:
                cursor = max(cursor, at)
        if cursor < len(text):
            pieces.append(("prompt", text[cursor:], False))
        return pieces

    def prompt_text(self, instruction: str, system: str | None = None) -> str:
        """The prompt the model sees, identical at training and generation time."""
        return self.fmt.format_prompt(self.normalize(instruction), self.normalize(system) if system else None)

    def split_text(self, text: str) -> tuple[str, str]:
        """Split a pre-formatted text into (prompt, response) at the first response template."""
        text = self.normalize(text)
        marker = self.normalize(self.fmt.response_template)  # the text was normalized: search for it normalized too
        idx = text.find(marker)
        prompt, response = ("", text) if idx < 0 else (text[: idx + len(marker)], text[idx + len(marker):])
        suffix = self.fmt.end_suffix
        if suffix and response.endswith(self.end_text + suffix):
            response = response[: -len(suffix)]
        if response.endswith(self.end_text):
            response = response[: -len(self.end_text)]
        return prompt, response

    def segments(self, record: dict) -> list[Segment]:
        """The segments of a validated record (any shape)."""
        return self.conversation_segments(to_conversation(record))

    def conversation_segments(self, conversation: Conversation) -> list[Segment]:
        if conversation.template_kwargs and self.fmt.chat is None:
            raise ValueError(f"the row's chat_template_kwargs need instruction_template='tokenizer' (variables of the "
                             f"model's chat template); {self.fmt.name!r} has no template variables")
        if conversation.text is not None:
            prompt, response = self.split_text(conversation.text)
            # (a pre-formatted prompt has no markup we could tell from its text: train_on_prompt trains all of it)
            trained_prompt = self.train_on_prompt
            return [*([("prompt", prompt, trained_prompt)] if prompt else []), ("response", response, True)]
        if self.fmt.chat is not None:
            messages = self.chat_messages(conversation)
            groups: list[list[str]] = [[]]  # the prompt messages' texts before each assistant turn, and after the last
            for message in messages:
                if message["role"] == "assistant":
                    groups.append([])
                elif isinstance(message.get("content"), str):
                    groups[-1].append(message["content"])
            return self.fmt.chat.segments(messages, conversation.tools, template_kwargs=conversation.template_kwargs,
                                          trained_turns=self.trained_turns(conversation.messages),
                                          prompt_pieces=lambda text, turn: self.prompt_pieces(text, groups[turn]))
        if conversation.uses_tools:
            raise ValueError(f"tool definitions, tool calls and tool turns need instruction_template='tokenizer' (the "
                             f"model's chat template writes their markup); {self.fmt.name!r} has none")
        messages = conversation.messages
        system = None
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        n_turns = len(messages) // 2
        trained_turns = self.trained_turns(messages)
        segments: list[Segment] = []
        for turn in range(n_turns):
            user, assistant = messages[2 * turn]["content"], _with_reasoning(messages[2 * turn + 1])
            # The system block (own or configured) opens the first prompt only; "" means "none" later on.
            prompt = self.prompt_text(user, system) if turn == 0 else self.fmt.format_prompt(self.normalize(user), "")
            system_text = (self.normalize(system) if system else self.fmt.system_prompt) if turn == 0 else None
            contents = [system_text, self.normalize(user)] if system_text else [self.normalize(user)]
            segments += [*self.prompt_pieces(prompt, contents, optional=(system_text,) if system_text else ()),
                         ("response", self.normalize(assistant), trained_turns[turn])]
        return segments

    def generation_segments(self, messages: list[dict], template_kwargs: dict | None = None) -> list[Segment]:
        """The segments before the next assistant turn of a conversation that ends with a user turn: exactly what
        precedes that turn's response when the whole conversation is a training example."""
        if not messages or messages[-1].get("role") not in ("user", "tool"):
            raise ValueError("encode_conversation_prompt: the conversation must end with a user message")
        if self.fmt.chat is not None:
            conversation = Conversation(list(messages))
            return [("prompt", self.fmt.chat.render(self.chat_messages(conversation), add_generation_prompt=True,
                                                    template_kwargs=template_kwargs), False)]
        if template_kwargs:
            raise ValueError(f"chat_template_kwargs need instruction_template='tokenizer'; {self.fmt.name!r} has no "
                             "template variables")
        placeholder = {"role": "assistant", "content": "-"}
        return self.conversation_segments(Conversation(list(messages) + [placeholder]))[:-1]

    def chat_messages(self, conversation: Conversation | dict) -> list[dict]:
        """A conversation (or a record) as the messages the tokenizer's template renders: the run's
        ``system_prompt`` (as given) opens conversations without a system message, and every turn's ``content``
        and ``reasoning_content`` is normalized (tool names, arguments and definitions are not)."""
        if isinstance(conversation, dict):
            conversation = to_conversation(conversation)
        out = []
        for message in conversation.messages:
            # (a turn's loss flag is ours, not the template's)
            message = {key: value for key, value in message.items() if value is not None and key not in LOSS_KEYS}
            for key in ("content", "reasoning_content"):
                if isinstance(message.get(key), str):
                    message[key] = self.normalize(message[key])
            if message["role"] == "assistant":
                message = self.fmt.chat.with_reasoning_rendered(message)
            out.append(message)
        if out[0]["role"] != "system" and self.fmt.system_prompt:
            # as given, like every format writes the run's system prompt (and the saved template and generation do)
            out.insert(0, {"role": "system", "content": self.fmt.system_prompt})
        return out


def record_texts(record: dict) -> list[str]:
    """Every piece of text a record holds (contents of its turns, or its pre-formatted text), in order."""
    conversation = to_conversation(record)
    if conversation.text is not None:
        return [conversation.text]
    return [m["content"] for m in conversation.messages]
