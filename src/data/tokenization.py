"""Records -> ``input_ids`` + ``labels``, with the prompt masked (-100) and the end token trained.

The steps follow the specification: format the prompt with the template, tokenize, append the
response and the end token, build labels. Prompt and response are tokenized *separately* and their ids
concatenated, so the prompt/response boundary never depends on how BPE merges across it (the
failure of searching a response template inside tokenized text, TRL #598/#1183).

Labels are built by position, never by token id: a padding token that equals EOS can never mask
the trained EOS (TRL #1623).

Conversations (``messages``) are one prompt/response pair per turn; every assistant turn is trained
(or only the last, when asked). With ``instruction_template="tokenizer"`` the model's chat template cuts
them (:mod:`src.data.chat_templates`), with a row's own ``chat_template_kwargs`` over the run's.

A pre-formatted ``text`` record is split at the first occurrence of ``response_template``: the text up
to and including it is the prompt (masked), the rest is the response (trained, then the end token).
Without the response template in the text, the whole text is trained.

Speed and memory (``tokenize_records``): records are tokenized in chunks, all segment texts of a chunk in
one call to the fast tokenizer's Rust backend (``encode_batch``, no Python per-text overhead), on a few
threads (the backend releases the GIL); each chunk is assembled with numpy (the same arithmetic as
:meth:`ExampleTokenizer.assemble`, position by position) and streamed into Arrow record batches, so no
Python list per token is ever built. With ``cache_dir`` the batches go to an Arrow file in a cache entry
keyed by everything that decides the result (see :mod:`src.data.cache`), and a second run with the same
data, tokenizer and settings memory-maps it instead of tokenizing.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from src.data.chat_templates import reasoning_in_answer
from src.data.templates import CHATML_SPECIAL_TOKENS, PromptFormat

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Per-example status recorded while tokenizing, counted afterwards.
FITS, TRUNCATED, DROPPED = 0, 1, 2
# Modules whose tokenizer methods are the library's own: a subclass overriding one of them may change the
# ids, so only then do we skip the direct backend call (see ``fast_backend``).
_LIBRARY_TOKENIZER_MODULES = {"tokenization_utils_base", "tokenization_utils_tokenizers", "tokenization_utils_fast"}
_ENCODE_METHODS = ("__call__", "_call_one", "encode", "encode_plus", "batch_encode_plus", "_encode_plus",
                   "_batch_encode_plus", "_convert_encoding")
# Texts that exercise special tokens, whitespace runs and Arabic: the backend must give what __call__ gives.
_PROBE_TEXTS = ["<|im_start|>user\nمرحبا  بالعالم\n\n<|im_end|>\n", "  Hello, world!\t٣ + ٤ = ٧", "", "<|endoftext|>x"]


class TokenizerMismatchError(ValueError):
    """The tokenizer cannot represent the chosen template (a special token is missing)."""


@dataclass
class TokenizeReport:
    """Counts of what tokenization did to over-long examples, per split.

    Why an over-long example was dropped follows from the policy (:func:`drop_reason`): under ``"drop"`` every
    over-long example goes; under ``"truncate"`` only those with nothing left to train once cut to
    ``max_seq_length`` (the prompt, with any untrained earlier turns, fills it alone)."""

    examples: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    trained_tokens: Counter = field(default_factory=Counter)
    total_tokens: Counter = field(default_factory=Counter)
    overlong_policy: str | None = None  # of the splits counted (set by apply_counts)

    def summary(self) -> str:
        parts = []
        for split in self.examples:
            part = f"{split}: {self.examples[split]} examples, {self.total_tokens[split]} tokens ({self.trained_tokens[split]} trained)"
            if self.truncated[split] or self.dropped[split]:
                part += f", {self.truncated[split]} truncated"
                if self.dropped[split]:
                    part += f", {self.dropped[split]} dropped ({drop_reason(self.overlong_policy)})"
            parts.append(part)
        return "; ".join(parts)


def drop_reason(overlong_policy: str | None) -> str:
    """Why an over-long example is dropped under ``overlong_policy`` (a phrase after "dropped because")."""
    if overlong_policy == "drop":
        return "over-long (overlong_policy='drop' drops every over-long example)"
    if overlong_policy == "truncate":
        return "the prompt alone fills max_seq_length: nothing left to train after truncation"
    return "over-long"


def special_prefix_ids(tokenizer: Any) -> list[int]:
    """Ids the tokenizer adds in front of a text by itself (a BOS for Llama-like tokenizers; none for Qwen)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_special) > len(without) and with_special[-len(without):] == without:
        return list(with_special[: len(with_special) - len(without)])
    return []


def end_token_id(tokenizer: Any, fmt: PromptFormat) -> int:
    """The id of the token that ends a response: ``<|im_end|>`` for ChatML, else the tokenizer's EOS."""
    if fmt.name in ("chatml", "tokenizer"):
        check_chatml_tokens(tokenizer, fmt.name)
        return tokenizer.convert_tokens_to_ids(fmt.end_token)
    if tokenizer.eos_token_id is None:
        raise TokenizerMismatchError(
            "the tokenizer has no EOS token, so the model cannot learn to stop; set tokenizer.eos_token "
            "or use instruction_template='chatml' (ends with <|im_end|>)"
        )
    return tokenizer.eos_token_id


def check_chatml_tokens(tokenizer: Any, template: str = "chatml") -> None:
    for token in CHATML_SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise TokenizerMismatchError(
                f"instruction_template={template!r} needs {token} as a single special token, but this tokenizer "
                f"splits it into {len(ids)} tokens; use a Qwen tokenizer or add the token (tokenizer.add_special_tokens)"
            )


def fast_backend(tokenizer: Any) -> Any | None:
    """The ``tokenizers.Tokenizer`` behind a fast tokenizer whose encoding is the library's own, else None.

    ``tokenizer(texts, add_special_tokens=False)`` on such a tokenizer is ``backend.encode_batch(texts)``
    plus Python bookkeeping (attention masks, ``BatchEncoding``); calling the backend directly gives the
    same ids without it. A tokenizer class that overrides any encoding method keeps the ordinary call.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False) or not hasattr(backend, "encode_batch"):
        return None
    cls = type(tokenizer)
    for name in _ENCODE_METHODS:
        impl = getattr(cls, name, None)
        if impl is not None and getattr(impl, "__module__", "").rsplit(".", 1)[-1] not in _LIBRARY_TOKENIZER_MODULES:
            return None
    return backend


def _with_reasoning(message: dict) -> str:
    """An assistant answer for formats without thinking markup (alpaca, chatml, custom): the reasoning, when
    the row has one, in Qwen's form ``<think>\\n...\\n</think>\\n\\n`` before the answer, never dropped."""
    reasoning = message.get("reasoning_content")
    return reasoning_in_answer(reasoning, message["content"]) if reasoning else message["content"]


def _exclusive_cumsum(values: np.ndarray) -> np.ndarray:
    out = np.zeros(len(values), dtype=np.int64)
    if len(values) > 1:
        np.cumsum(values[:-1], out=out[1:])
    return out


@dataclass
class _Plan:
    """The segments of a chunk of records, flattened: one entry per segment text."""

    start: int  # index of the chunk's first record
    n_records: int
    texts: list[str]
    is_response: np.ndarray  # bool per segment
    trained: np.ndarray  # bool per segment
    record: np.ndarray  # record index (within the chunk) per segment


@dataclass
class _Chunk:
    """Tokenized, assembled and policy-applied examples of one chunk (flat arrays, example lengths)."""

    input_ids: np.ndarray  # int64, concatenated examples
    labels: np.ndarray  # int64
    lengths: np.ndarray  # int64 per kept example
    truncated: int
    dropped: int
    trained_tokens: int

    def count_into(self, counts: dict[str, int]) -> None:
        """Add this chunk to the report counts of its split (see :func:`empty_counts`)."""
        counts["examples"] += len(self.lengths)
        counts["truncated"] += self.truncated
        counts["dropped"] += self.dropped
        counts["trained_tokens"] += self.trained_tokens
        counts["total_tokens"] += int(self.lengths.sum())


def empty_counts() -> dict[str, int]:
    """The report counts of a split before any chunk (what ``TokenizeReport`` and cache entries record)."""
    return {"examples": 0, "truncated": 0, "dropped": 0, "trained_tokens": 0, "total_tokens": 0}


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
        self.normalize_spec = normalize  # as given (None: no normalization); the cache key describes it
        self.normalize = normalize or (lambda text: text)
        self.train_on_last_turn_only = train_on_last_turn_only
        self.prefix_ids = special_prefix_ids(tokenizer)
        self.end_id = end_token_id(tokenizer, fmt)
        self.suffix_ids = self._encode(fmt.end_suffix) if fmt.end_suffix else []
        self._backend = fast_backend(tokenizer)
        if self._backend is not None and self._backend_ids(_PROBE_TEXTS) != self._call_ids(_PROBE_TEXTS):
            self._backend = None  # pragma: no cover - a backend that disagrees with __call__ is not used

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- encoding --------------------------------------------------------------------------------
    def _call_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _backend_ready(self) -> Any | None:
        """The backend, once its state is what ``tokenizer(...)`` would set (no padding or truncation)."""
        backend = self._backend
        if backend is None:
            return None
        split_special = bool(getattr(self.tokenizer, "split_special_tokens", False))
        for attempt in range(2):
            if backend.padding is None and backend.truncation is None and \
                    getattr(backend, "encode_special_tokens", split_special) == split_special:
                return backend
            if attempt == 0:
                self._call_ids(["a"])  # __call__ resets padding, truncation and special-token splitting
        return None  # pragma: no cover

    def _backend_ids(self, texts: list[str]) -> list[list[int]]:
        encode = getattr(self._backend, "encode_batch_fast", None) or self._backend.encode_batch
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """``tokenizer(texts, add_special_tokens=False)["input_ids"]``, through the fast backend when it has one."""
        if not texts:
            return []
        if self._backend_ready() is not None:
            return self._backend_ids(texts)
        return self._call_ids(texts)

    def _encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All ids of ``texts`` concatenated (int64), and the number of ids per text."""
        ids = self.encode_texts(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        return flat, lengths

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
        if record.get("chat_template_kwargs") and self.fmt.chat is None:
            raise ValueError(f"the row's chat_template_kwargs need instruction_template='tokenizer' (variables of the "
                             f"model's chat template); {self.fmt.name!r} has no template variables")
        if record.get("text") is not None:
            prompt, response = self.split_text(record["text"])
            return [("prompt", prompt, False), ("response", response, True)]
        if self.fmt.chat is not None:
            return self._chat_segments(record)
        if record.get("tools") or (record.get("messages") and any(
                m["role"] == "tool" or m.get("tool_calls") for m in record["messages"])):
            raise ValueError(f"tool definitions, tool calls and tool turns need instruction_template='tokenizer' (the "
                             f"model's chat template writes their markup); {self.fmt.name!r} has none")
        if record.get("messages") is not None:
            messages = record["messages"]
            system = None
            if messages[0]["role"] == "system":
                system, messages = messages[0]["content"], messages[1:]
            n_turns = len(messages) // 2
            segments = []
            for turn in range(n_turns):
                user, assistant = messages[2 * turn]["content"], _with_reasoning(messages[2 * turn + 1])
                # The system block (own or configured) opens the first prompt only; "" means "none" later on.
                prompt = self.prompt_text(user, system) if turn == 0 else self.fmt.format_prompt(self.normalize(user), "")
                trained = not self.train_on_last_turn_only or turn == n_turns - 1
                segments += [("prompt", prompt, False), ("response", self.normalize(assistant), trained)]
            return segments
        return [("prompt", self.prompt_text(record["instruction"], record.get("system")), False),
                ("response", self.normalize(_with_reasoning({"content": record["response"],
                                                             "reasoning_content": record.get("reasoning_content")})), True)]

    def chat_messages(self, record: dict) -> list[dict]:
        """A record as the messages the tokenizer's template renders: instruction rows become a user and an
        assistant turn, the run's ``system_prompt`` (as given) opens conversations without a system message, and
        every row's ``content`` and ``reasoning_content`` is normalized (tool names, arguments and definitions are
        not)."""
        if record.get("messages") is not None:
            messages = record["messages"]
        else:
            messages = ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + [
                {"role": "user", "content": record["instruction"]},
                {"role": "assistant", "content": record["response"], "reasoning_content": record.get("reasoning_content")}]
        out = []
        for message in messages:
            message = {key: value for key, value in message.items() if value is not None}
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

    def _chat_segments(self, record: dict) -> list[tuple[str, str, bool]]:
        return self.fmt.chat.segments(self.chat_messages(record), record.get("tools"), self.train_on_last_turn_only,
                                      template_kwargs=record.get("chat_template_kwargs"))

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
            raise ValueError(self._overlong_message(where, len(ids)))
        ids, labels = ids[: self.max_seq_length], labels[: self.max_seq_length]
        if self.overlong_policy == "drop" or all(label == IGNORE_INDEX for label in labels[1:]):
            return [], [], DROPPED
        # Truncated: the cut response keeps no end token, since the answer does not end here.
        return ids, labels, TRUNCATED

    def _overlong_message(self, where: str, length: int) -> str:
        return (f"{where or 'an example'} is {length} tokens long, over max_seq_length={self.max_seq_length}; "
                "raise max_seq_length or set overlong_policy to 'truncate' or 'drop'")

    def tokenize_batch(self, records: list[dict], where: list[str] | None = None) -> list[tuple[list[int], list[int], int]]:
        all_segments = [self.segments(r) for r in records]
        texts = [text for segments in all_segments for _, text, _ in segments]
        encoded = iter(self.encode_texts(texts))
        where = where or [""] * len(records)
        return [
            self.assemble([(kind, next(encoded), trained) for kind, _, trained in segments], w)
            for segments, w in zip(all_segments, where)
        ]

    def encode_prompt(self, instruction: str, system: str | None = None) -> list[int]:
        """Prompt ids for generation: exactly the ids an example's prompt has at training time."""
        return self.prefix_ids + self._encode(self.prompt_text(instruction, system))

    def encode_conversation_prompt(self, messages: list[dict], template_kwargs: dict | None = None) -> list[int]:
        """Prompt ids for the next assistant turn of a conversation (``messages``: optional system message,
        then alternating user/assistant turns, ending with a user turn): exactly the ids that precede that
        turn's response when the whole conversation is a training example. ``template_kwargs``: a row's own
        chat template variables (``instruction_template="tokenizer"``), over the run's."""
        if not messages or messages[-1].get("role") not in ("user", "tool"):
            raise ValueError("encode_conversation_prompt: the conversation must end with a user message")
        if self.fmt.chat is not None:
            text = self.fmt.chat.render(self.chat_messages({"messages": list(messages)}), add_generation_prompt=True,
                                        template_kwargs=template_kwargs)
            return self.prefix_ids + self._encode(text)
        if template_kwargs:
            raise ValueError(f"chat_template_kwargs need instruction_template='tokenizer'; {self.fmt.name!r} has no "
                             "template variables")
        segments = self.segments({"messages": list(messages) + [{"role": "assistant", "content": "-"}]})[:-1]
        ids = list(self.prefix_ids)
        for (kind, _, _), tokens in zip(segments, self.encode_texts([text for _, text, _ in segments])):
            ids += tokens if kind == "prompt" else list(tokens) + [self.end_id] + self.suffix_ids
        return ids

    def lengths(self, records: Iterable[dict], batch_size: int = 1000) -> list[tuple[int, int]]:
        """``(prompt_tokens, response_tokens)`` per record, before any over-long policy.

        The arithmetic of :meth:`assemble`: the tokenizer's prefix ids count with the prompt, each response
        counts its end token and the format's suffix ids; their sum is the example's full length.
        """
        result: list[tuple[int, int]] = []
        records = list(records)
        extra = 1 + len(self.suffix_ids)
        for start in range(0, len(records), batch_size):
            plan = self._plan(records[start : start + batch_size], start)
            _, token_counts = self._encode_flat(plan.texts)
            n = plan.n_records
            prompt = np.bincount(plan.record, weights=np.where(plan.is_response, 0, token_counts), minlength=n)
            response = np.bincount(plan.record, weights=np.where(plan.is_response, token_counts + extra, 0), minlength=n)
            prompt = prompt.astype(np.int64) + len(self.prefix_ids)
            result.extend(zip(prompt.tolist(), response.astype(np.int64).tolist()))
        return result

    # -- the vectorized path (tokenize_records) --------------------------------------------------------
    def _plan(self, records: list[dict], start: int = 0, split: str = "") -> _Plan:
        texts: list[str] = []
        is_response: list[bool] = []
        trained: list[bool] = []
        record_index: list[int] = []
        for r, record in enumerate(records):
            try:
                segments = self.segments(record)
            except ValueError as exc:
                raise type(exc)(f"{split or 'dataset'} row {start + r}: {exc}") from None
            for kind, text, is_trained in segments:
                texts.append(text)
                is_response.append(kind != "prompt")
                trained.append(is_trained)
                record_index.append(r)
        return _Plan(start, len(records), texts, np.array(is_response, dtype=bool), np.array(trained, dtype=bool),
                     np.array(record_index, dtype=np.int64))

    def _tokenize_plan(self, plan: _Plan, split: str) -> _Chunk:
        """Tokenize and assemble a chunk: :meth:`assemble` for every record at once, on flat numpy arrays."""
        tokens, token_counts = self._encode_flat(plan.texts)
        n, n_prefix = plan.n_records, len(self.prefix_ids)
        tail = np.array([self.end_id] + list(self.suffix_ids), dtype=np.int64)  # what follows every response
        # Every segment is its tokens, and for a response the end token and the suffix after them.
        pieces = token_counts + np.where(plan.is_response, len(tail), 0)
        seg_start = _exclusive_cumsum(pieces) + n_prefix * (plan.record + 1)  # output offset of each segment
        record_lengths = np.bincount(plan.record, weights=pieces, minlength=n).astype(np.int64) + n_prefix
        record_start = _exclusive_cumsum(record_lengths)
        total = int(record_lengths.sum())
        ids = np.empty(total, dtype=np.int64)
        labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
        if n_prefix:
            positions = (record_start[:, None] + np.arange(n_prefix)).ravel()
            ids[positions] = np.tile(np.array(self.prefix_ids, dtype=np.int64), n)
        positions = np.repeat(seg_start - _exclusive_cumsum(token_counts), token_counts) + np.arange(len(tokens))
        ids[positions] = tokens
        trained_segments = plan.is_response & plan.trained
        trained_tokens = np.repeat(trained_segments, token_counts)
        labels[positions[trained_tokens]] = tokens[trained_tokens]
        responses = np.flatnonzero(plan.is_response)
        if len(responses):
            positions = ((seg_start + token_counts)[responses][:, None] + np.arange(len(tail))).ravel()
            ids[positions] = np.tile(tail, len(responses))
            end_positions = (seg_start + token_counts)[responses[trained_segments[responses]]]
            labels[end_positions] = self.end_id

        # The over-long policy, as in assemble().
        limit = self.max_seq_length
        over = record_lengths > limit
        if over.any() and self.overlong_policy == "error":
            first = int(np.flatnonzero(over)[0])
            raise ValueError(self._overlong_message(f"{split} row {plan.start + first}", int(record_lengths[first])))
        position_in_record = np.arange(total) - np.repeat(record_start, record_lengths)
        window = position_in_record < limit
        trained_in_window = (labels != IGNORE_INDEX) & window & (position_in_record >= 1)
        record_of_position = np.repeat(np.arange(n), record_lengths)
        trained_per_record = np.bincount(record_of_position, weights=trained_in_window, minlength=n)
        dropped = over & ((self.overlong_policy == "drop") | (trained_per_record == 0))
        keep = window & ~np.repeat(dropped, record_lengths)
        kept_lengths = np.minimum(record_lengths, limit)[~dropped]
        return _Chunk(ids[keep], labels[keep], kept_lengths, truncated=int((over & ~dropped).sum()),
                      dropped=int(dropped.sum()), trained_tokens=int(trained_per_record[~dropped].sum()))

    def tokenize_chunks(self, records: list[dict], split: str, batch_size: int = 1000,
                        num_threads: int | None = None, progress: bool = False) -> Iterator[_Chunk]:
        """Tokenized chunks of ``batch_size`` records, in order, computed on ``num_threads`` threads.

        The Rust backend releases the GIL while it encodes, so the threads overlap encoding with each
        other and with the Python side (segments, numpy). ``num_threads=None``: the CPU count, at most 4.
        Errors (an over-long example under ``overlong_policy="error"``) surface for the first failing
        row, as in a sequential run.
        """
        from tqdm.auto import tqdm

        starts = range(0, len(records), batch_size)
        threads = min(4, os.cpu_count() or 1) if num_threads is None else max(1, num_threads)
        if self._backend_ready() is None:
            threads = 1  # the transformers call path mutates tokenizer state: keep it on one thread
        threads = min(threads, len(starts))
        bar = tqdm(total=len(starts), desc=f"Tokenizing {split}", disable=not progress)
        try:
            if threads <= 1:
                for start in starts:
                    yield self._tokenize_plan(self._plan(records[start : start + batch_size], start, split), split)
                    bar.update()
                return
            pending = []
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokenize") as pool:
                try:
                    for start in starts:
                        plan = self._plan(records[start : start + batch_size], start, split)
                        pending.append(pool.submit(self._tokenize_plan, plan, split))
                        while len(pending) > threads:
                            yield pending.pop(0).result()
                            bar.update()
                    while pending:
                        yield pending.pop(0).result()
                        bar.update()
                finally:
                    for future in pending:
                        future.cancel()
        finally:
            bar.close()


def tokenize_records(
    records: list[dict], example_tokenizer: ExampleTokenizer, split: str, report: TokenizeReport | None = None,
    batch_size: int = 1000, *, packing: bool = False, cache_dir: str | os.PathLike | None = None,
    num_threads: int | None = None,
) -> "Dataset":  # noqa: F821
    """Tokenize validated records into a ``datasets.Dataset`` with ``input_ids``, ``labels``, ``length``.

    Over-long examples follow the configured policy; truncated/dropped counts go to ``report`` and the log.

    ``packing=True`` also packs the examples (exactly :func:`src.data.packing.pack_dataset`, which then must
    not be applied again) and returns the packed rows with ``position_ids`` and ``num_examples``.

    ``cache_dir`` (None: no cache) keeps the result on disk, keyed by the records' content, the tokenizer,
    the template, normalization, ``max_seq_length``, ``overlong_policy``, ``train_on_last_turn_only``,
    ``packing`` and the code version (:mod:`src.data.cache`); an unchanged second run memory-maps it and
    restores ``report`` exactly, without tokenizing. Without ``cache_dir`` the result is an in-memory
    Arrow table. ``num_threads``: tokenizer threads (None: CPU count, at most 4).
    """
    report = report if report is not None else TokenizeReport()
    if cache_dir is not None:
        from src.data.cache import tokenize_cached

        return tokenize_cached(records, example_tokenizer, split, report, cache_dir, packing=packing,
                               batch_size=batch_size, num_threads=num_threads)
    from src.data.cache import ArrowSink

    sink = ArrowSink(None, packed=packing)
    counts = write_tokenized(records, example_tokenizer, split, sink, packing=packing, batch_size=batch_size,
                             num_threads=num_threads)
    apply_counts(report, split, counts, example_tokenizer, len(records))
    return sink.dataset()


def write_tokenized(records: list[dict], example_tokenizer: ExampleTokenizer, split: str, sink: Any, *,
                    packing: bool, batch_size: int = 1000, num_threads: int | None = None) -> dict[str, int]:
    """Tokenize ``records`` into ``sink`` (packed or not); return the report counts of this split."""
    from src.data.packing import packed_batches, unpacked_batch

    counts = empty_counts()
    pending = _PackingBuffer(len(records)) if packing else None
    for chunk in example_tokenizer.tokenize_chunks(records, split, batch_size, num_threads, progress=len(records) > 5000):
        chunk.count_into(counts)
        if not len(chunk.lengths):
            continue
        if pending is not None:
            pending.add(chunk)
        else:
            sink.write(unpacked_batch(chunk.input_ids, chunk.labels, chunk.lengths))
    if pending is not None and counts["examples"]:
        input_ids, trained, lengths = pending.arrays()
        del pending
        for batch in packed_batches(input_ids, None, lengths, example_tokenizer.max_seq_length, trained=trained):
            sink.write(batch)
    return counts


class _PackingBuffer:
    """Examples waiting to be packed, 5 bytes per token: ids (int32) and whether each is trained.

    Labels are the id or -100 (see ``_tokenize_plan``), so the mask holds them exactly. The buffers are
    sized from the first chunk's tokens per record and grown when needed, so no list of chunk copies
    and no final concatenation (twice the memory at once) is needed.
    """

    def __init__(self, n_records: int):
        self.n_records = n_records
        self.records_seen = 0
        self.size = 0
        self.ids = np.empty(0, dtype=np.int32)
        self.trained = np.empty(0, dtype=bool)
        self.lengths: list[np.ndarray] = []

    def add(self, chunk: _Chunk) -> None:
        n = len(chunk.input_ids)
        self.records_seen += len(chunk.lengths) + chunk.dropped
        if self.size + n > len(self.ids):
            per_record = (self.size + n) / max(1, self.records_seen)
            capacity = max(self.size + n, int(per_record * self.n_records * 1.05) + 1024, int(len(self.ids) * 1.25))
            self.ids = np.resize(self.ids, capacity)  # copies once per growth; rare after the first estimate
            self.trained = np.resize(self.trained, capacity)
        self.ids[self.size : self.size + n] = chunk.input_ids
        self.trained[self.size : self.size + n] = chunk.labels != IGNORE_INDEX
        self.size += n
        self.lengths.append(chunk.lengths)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.ids[: self.size], self.trained[: self.size], np.concatenate(self.lengths)


def apply_counts(report: TokenizeReport, split: str, counts: dict[str, int], example_tokenizer: ExampleTokenizer,
                 n_records: int) -> None:
    """Add a split's counts to ``report``, log over-long handling, refuse a split left empty."""
    for name in ("dropped", "truncated", "trained_tokens", "total_tokens"):
        if counts[name]:  # as the per-example loop did: a split with none gets no entry
            getattr(report, name)[split] += counts[name]
    report.examples[split] = counts["examples"]
    report.overlong_policy = example_tokenizer.overlong_policy
    truncated, dropped = report.truncated[split], report.dropped[split]
    if truncated or dropped:
        # Counted by reason: under "truncate" a row is dropped (not truncated) when its prompt alone fills the window.
        reason = f"; dropped: {dropped} because {drop_reason(example_tokenizer.overlong_policy)}" if dropped else ""
        logger.warning(
            "%s: %d examples longer than max_seq_length=%d were truncated and %d dropped (overlong_policy=%r)%s",
            split, truncated, example_tokenizer.max_seq_length, dropped, example_tokenizer.overlong_policy, reason,
        )
    if not counts["examples"]:
        raise ValueError(f"{split}: no examples left after applying overlong_policy (all {n_records} were over-long)")
