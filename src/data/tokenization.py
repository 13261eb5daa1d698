"""Records -> ``input_ids`` + ``labels``, with the prompt masked (-100) and the end token trained.

The steps follow the specification: format the prompt with the template, tokenize, append the
response and the end token, build labels. Prompt and response are tokenized *separately* and their ids
concatenated, so the prompt/response boundary never depends on how BPE merges across it (the
failure of searching a response template inside tokenized text, TRL #598/#1183).

Labels are built by position, never by token id: a padding token that equals EOS can never mask
the trained EOS (TRL #1623).

Conversations (``messages``) are one prompt/response pair per turn; every assistant turn is trained
(or only the last, when asked).

A pre-formatted ``text`` record is split at the first occurrence of ``response_template``: the text up
to and including it is the prompt (masked), the rest is the response (trained, then the end token).
Without the response template in the text, the whole text is trained.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from src.data.templates import CHATML_SPECIAL_TOKENS, PromptFormat

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Per-example status recorded while tokenizing, counted afterwards.
FITS, TRUNCATED, DROPPED = 0, 1, 2


class TokenizerMismatchError(ValueError):
    """The tokenizer cannot represent the chosen template (a special token is missing)."""


@dataclass
class TokenizeReport:
    """Counts of what tokenization did to over-long examples, per split."""

    examples: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    trained_tokens: Counter = field(default_factory=Counter)
    total_tokens: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        parts = []
        for split in self.examples:
            part = f"{split}: {self.examples[split]} examples, {self.total_tokens[split]} tokens ({self.trained_tokens[split]} trained)"
            if self.truncated[split] or self.dropped[split]:
                part += f", {self.truncated[split]} truncated, {self.dropped[split]} dropped as over-long"
            parts.append(part)
        return "; ".join(parts)


def special_prefix_ids(tokenizer: Any) -> list[int]:
    """Ids the tokenizer adds in front of a text by itself (a BOS for Llama-like tokenizers; none for Qwen)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_special) > len(without) and with_special[-len(without):] == without:
        return list(with_special[: len(with_special) - len(without)])
    return []


def end_token_id(tokenizer: Any, fmt: PromptFormat) -> int:
    """The id of the token that ends a response: ``<|im_end|>`` for ChatML, else the tokenizer's EOS."""
    if fmt.name == "chatml":
        check_chatml_tokens(tokenizer)
        return tokenizer.convert_tokens_to_ids(fmt.end_token)
    if tokenizer.eos_token_id is None:
        raise TokenizerMismatchError(
            "the tokenizer has no EOS token, so the model cannot learn to stop; set tokenizer.eos_token "
            "or use instruction_template='chatml' (ends with <|im_end|>)"
        )
    return tokenizer.eos_token_id


def check_chatml_tokens(tokenizer: Any) -> None:
    for token in CHATML_SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise TokenizerMismatchError(
                f"instruction_template='chatml' needs {token} as a single special token, but this tokenizer "
                f"splits it into {len(ids)} tokens; use a Qwen tokenizer or add the token (tokenizer.add_special_tokens)"
            )


class ExampleTokenizer:
    """Turns records into ``input_ids``/``labels`` for one tokenizer and prompt format.

    Every record becomes a list of segments: prompt text (masked) and response text (trained, then the
    end token, trained, then the format's end suffix, masked). A single-turn record is one prompt and one
    response; a conversation is one per turn, the system block (its own, or ``system_prompt``) in the
    first prompt; ``train_on_last_turn_only`` masks all but the last response. All segment texts of a
    batch are tokenized in one call, each separately, and their ids concatenated.

    ``normalize`` (optional) is applied to every piece of user text (instructions, responses, system
    prompts, pre-formatted text) before formatting, the same function that generation uses.
    """

    def __init__(self, tokenizer: Any, fmt: PromptFormat, max_seq_length: int, overlong_policy: str = "truncate",
                 normalize: Callable[[str], str] | None = None, train_on_last_turn_only: bool = False):
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.max_seq_length = max_seq_length
        self.overlong_policy = overlong_policy
        self.normalize = normalize or (lambda text: text)
        self.train_on_last_turn_only = train_on_last_turn_only
        self.prefix_ids = special_prefix_ids(tokenizer)
        self.end_id = end_token_id(tokenizer, fmt)
        self.suffix_ids = self._encode(fmt.end_suffix) if fmt.end_suffix else []

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- text ------------------------------------------------------------------------------------
    def prompt_text(self, instruction: str, system: str | None = None) -> str:
        """The prompt the model sees, identical at training and generation time."""
        return self.fmt.format_prompt(self.normalize(instruction), self.normalize(system) if system else None)

    def split_text(self, text: str) -> tuple[str, str]:
        """Split a pre-formatted text into (prompt, response) at the first response template.

        A text that already ends with the end token (and the format's suffix), as
        ``apply_chat_template`` output does, has it removed here: ``assemble`` appends it once.
        """
        text = self.normalize(text)
        marker = self.normalize(self.fmt.response_template)  # the text was normalized: search for it normalized too
        idx = text.find(marker)
        prompt, response = ("", text) if idx < 0 else (text[: idx + len(marker)], text[idx + len(marker):])
        end_text = self.tokenizer.convert_ids_to_tokens(self.end_id)
        suffix = self.fmt.end_suffix
        if suffix and response.endswith(end_text + suffix):
            response = response[: -len(suffix)]
        if response.endswith(end_text):
            response = response[: -len(end_text)]
        return prompt, response

    def segments(self, record: dict) -> list[tuple[str, str, bool]]:
        """``(kind, text, trained)`` segments of a record; kind is "prompt" or "response"."""
        if record.get("text") is not None:
            prompt, response = self.split_text(record["text"])
            return [("prompt", prompt, False), ("response", response, True)]
        if record.get("messages") is not None:
            messages = record["messages"]
            system = None
            if messages[0]["role"] == "system":
                system, messages = messages[0]["content"], messages[1:]
            n_turns = len(messages) // 2
            segments = []
            for turn in range(n_turns):
                user, assistant = messages[2 * turn]["content"], messages[2 * turn + 1]["content"]
                # The system block (own or configured) opens the first prompt only; "" means "none" later on.
                prompt = self.prompt_text(user, system) if turn == 0 else self.fmt.format_prompt(self.normalize(user), "")
                trained = not self.train_on_last_turn_only or turn == n_turns - 1
                segments += [("prompt", prompt, False), ("response", self.normalize(assistant), trained)]
            return segments
        return [("prompt", self.prompt_text(record["instruction"], record.get("system")), False),
                ("response", self.normalize(record["response"]), True)]

    # -- ids -------------------------------------------------------------------------------------
    def assemble(self, segments: list[tuple[str, list[int], bool]], where: str = "") -> tuple[list[int], list[int], int]:
        """Concatenate segment ids into (input_ids, labels, status), applying the over-long policy."""
        ids = list(self.prefix_ids)
        labels = [IGNORE_INDEX] * len(ids)
        for kind, tokens, trained in segments:
            if kind == "prompt":
                ids += tokens
                labels += [IGNORE_INDEX] * len(tokens)
            else:
                response = list(tokens) + [self.end_id]
                ids += response + self.suffix_ids
                labels += (response if trained else [IGNORE_INDEX] * len(response)) + [IGNORE_INDEX] * len(self.suffix_ids)
        if len(ids) <= self.max_seq_length:
            return ids, labels, FITS
        if self.overlong_policy == "error":
            raise ValueError(
                f"{where or 'an example'} is {len(ids)} tokens long, over max_seq_length={self.max_seq_length}; "
                "raise max_seq_length or set overlong_policy to 'truncate' or 'drop'"
            )
        ids, labels = ids[: self.max_seq_length], labels[: self.max_seq_length]
        if self.overlong_policy == "drop" or all(label == IGNORE_INDEX for label in labels[1:]):
            return [], [], DROPPED
        # Truncated: the cut response keeps no end token, since the answer does not end here.
        return ids, labels, TRUNCATED

    def tokenize_batch(self, records: list[dict], where: list[str] | None = None) -> list[tuple[list[int], list[int], int]]:
        all_segments = [self.segments(r) for r in records]
        texts = [text for segments in all_segments for _, text, _ in segments]
        encoded = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        where = where or [""] * len(records)
        return [
            self.assemble([(kind, next(encoded), trained) for kind, _, trained in segments], w)
            for segments, w in zip(all_segments, where)
        ]

    def encode_prompt(self, instruction: str, system: str | None = None) -> list[int]:
        """Prompt ids for generation: exactly the ids an example's prompt has at training time."""
        return self.prefix_ids + self._encode(self.prompt_text(instruction, system))


def tokenize_records(
    records: list[dict], example_tokenizer: ExampleTokenizer, split: str, report: TokenizeReport | None = None,
    batch_size: int = 1000,
) -> "Dataset":  # noqa: F821
    """Tokenize validated records into a ``datasets.Dataset`` with ``input_ids``, ``labels``, ``length``.

    Over-long examples follow the configured policy; truncated/dropped counts go to ``report`` and the log.
    """
    from datasets import Dataset
    from tqdm.auto import tqdm

    report = report if report is not None else TokenizeReport()
    columns: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    show = len(records) > 5000
    for start in tqdm(range(0, len(records), batch_size), desc=f"Tokenizing {split}", disable=not show):
        chunk = records[start : start + batch_size]
        where = [f"{split} row {start + i}" for i in range(len(chunk))]
        for ids, labels, status in example_tokenizer.tokenize_batch(chunk, where):
            if status == DROPPED:
                report.dropped[split] += 1
                continue
            if status == TRUNCATED:
                report.truncated[split] += 1
            columns["input_ids"].append(ids)
            columns["labels"].append(labels)
            columns["length"].append(len(ids))
            report.trained_tokens[split] += sum(1 for label in labels[1:] if label != IGNORE_INDEX)
            report.total_tokens[split] += len(ids)
    report.examples[split] = len(columns["input_ids"])
    if report.truncated[split] or report.dropped[split]:
        logger.warning(
            "%s: %d examples longer than max_seq_length=%d were truncated and %d dropped (overlong_policy=%r)",
            split, report.truncated[split], example_tokenizer.max_seq_length, report.dropped[split],
            example_tokenizer.overlong_policy,
        )
    if not columns["input_ids"]:
        raise ValueError(f"{split}: no examples left after applying overlong_policy (all {len(records)} were over-long)")
    return Dataset.from_dict(columns)
