"""Interactive chat with a trained run (``train_sft.py chat``).

Each turn's prompt is the whole conversation so far, formatted and tokenized exactly as a multi-turn
training example (``ExampleTokenizer.encode_conversation_prompt``: the system block opens the first
prompt, every earlier answer ends with the end token). Answers stream token by token as they are
generated and stop at the template's end token. Commands: ``/reset`` (forget the conversation),
``/system TEXT`` (set the system prompt and start over), ``/exit`` (or end of input). Works on a terminal
and with piped input (one user message per line).

A message the session cannot send (a line that is not valid UTF-8, a conversation that with it leaves no room for
``max_length`` new tokens in the model's context, one that cannot be formatted) is reported on one line, starting
``error:``, and the session goes on with the conversation as it was (:class:`MessageRejected`).
"""

from __future__ import annotations

import sys
from typing import Any, Optional, TextIO

from src.training.generation import check_prompt_lengths

HELP = "commands: /reset (new conversation), /system TEXT (set the system prompt), /exit"


class MessageRejected(ValueError):
    """A user message that was not sent; the conversation is unchanged."""


class ChatSession:
    """A conversation with ``trainer``'s model (an :class:`~src.training.sft_trainer.SFTTrainer` after load_model)."""

    def __init__(self, trainer: Any, system: Optional[str] = None, max_length: int = 512, **generation_kwargs: Any):
        self.trainer = trainer
        self.system = system
        self.max_length = max_length
        self.generation_kwargs = generation_kwargs
        self.messages: list[dict] = []

    def reset(self, system: Optional[str] = None, keep_system: bool = True) -> None:
        self.messages = []
        if not keep_system:
            self.system = system

    def prompt_ids(self, user: str) -> list[int]:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        return self.trainer.example_tokenizer().encode_conversation_prompt(messages + [{"role": "user", "content": user}])

    def checked_prompt_ids(self, user: str) -> list[int]:
        """:meth:`prompt_ids`, refused with :class:`MessageRejected` when it cannot be formatted or leaves no room for
        ``max_length`` new tokens in the model's context (``generation.check_prompt_lengths``)."""
        keep = "the conversation so far is kept"
        try:
            prompt = self.prompt_ids(user)
        except ValueError as exc:
            raise MessageRejected(f"message not sent, it cannot be formatted: {exc}; {keep}") from None
        try:
            check_prompt_lengths(getattr(self.trainer, "model", None), [prompt], self.max_length)
        except ValueError as exc:
            reason = str(exc)
            if reason.startswith("prompt 0 is"):
                reason = "the conversation with it is" + reason[len("prompt 0 is"):]
            raise MessageRejected(f"message not sent: {reason}; {keep} (/reset starts a new one)") from None
        return prompt

    def reply(self, user: str, out: Optional[TextIO] = None) -> str:
        """Generate the answer to ``user``, writing it to ``out`` as it is generated; remember the turn."""
        prompt = self.checked_prompt_ids(user)
        streamer = _Streamer(self.trainer.tokenizer, out) if out is not None else None
        extra = {"streamer": streamer} if streamer is not None else {}
        answer = self.trainer.generate_from_prompts([prompt], max_length=self.max_length, batch_size=1,
                                                    **extra, **self.generation_kwargs)[0]
        if streamer is not None:
            streamer.end()
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return answer


class _Streamer:
    """Writes decoded text as tokens arrive (transformers' TextStreamer, to any text stream)."""

    def __init__(self, tokenizer: Any, out: TextIO):
        from transformers import TextStreamer

        class ToStream(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                out.write(text)
                out.flush()

        self.streamer = ToStream(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def put(self, value: Any) -> None:
        self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()
        self.out.write("\n")
        self.out.flush()


def chat_loop(session: ChatSession, inp: Optional[TextIO] = None, out: Optional[TextIO] = None) -> int:
    """Read user messages from ``inp`` (default: ``sys.stdin`` at the time of the call) until ``/exit`` or end of
    input; stream answers to ``out`` (default: ``sys.stdout``). A message that cannot be sent is reported and skipped."""
    inp = sys.stdin if inp is None else inp
    out = sys.stdout if out is None else out
    interactive = inp.isatty()
    if interactive:
        out.write(HELP + "\n")
    while True:
        if interactive:
            out.write("\n> ")
            out.flush()
        try:
            line = inp.readline()
        except UnicodeDecodeError as exc:  # a stream decoded strictly; the command line decodes with surrogateescape
            out.write(f"error: input that is not valid UTF-8 was skipped ({exc.reason}); the conversation is kept\n")
            continue
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        bad = next((c for c in text if "\udc80" <= c <= "\udcff"), None)  # undecodable bytes, surrogate-escaped
        if bad is not None:
            out.write(f"error: that line is not valid UTF-8 (byte 0x{ord(bad) - 0xDC00:02x}); not sent, the "
                      "conversation is kept\n")
            continue
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            out.write("(new conversation)\n")
            continue
        if text == "/system" or text.startswith("/system "):
            session.reset(text[len("/system"):].strip() or None, keep_system=False)
            out.write(f"(system prompt {'set' if session.system else 'back to the run default'}; new conversation)\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        if not interactive:
            out.write("> " + text + "\n")
        try:
            session.reply(text, out=out)
        except MessageRejected as exc:
            out.write(f"error: {exc}\n")
        out.flush()
    return 0
