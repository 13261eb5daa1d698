"""Records -> ``input_ids`` + ``labels``, with the prompt masked (-100) and the end token trained.

:class:`ExampleTokenizer` is a :class:`~src.data.formatting.Formatter` (records -> prompt and response texts)
composed with an encoder and the one token-assembly arithmetic: prompt and response texts are tokenized
*separately* and their ids concatenated, so the prompt/response boundary never depends on how BPE merges
across it (the failure of searching a response template inside tokenized text, TRL #598/#1183). Each
response is followed by the end token (trained) and the format's suffix (masked).

Labels are built by position, never by token id: a padding token that equals EOS can never mask
the trained EOS (TRL #1623).

Speed and memory: records are tokenized in chunks, all segment texts of a chunk in one call to the fast
tokenizer's Rust backend (``encode_batch``, no Python per-text overhead), on a few threads (the backend
releases the GIL); each chunk is assembled with numpy (:func:`assemble`, the only place the ids of an
example are put together: training, the audit's lengths and generation prompts all use it), so no Python
list per token is ever built. Writing the chunks to Arrow, packing and caching them is
:mod:`src.data.preprocess`.
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from src.data.arrow import IGNORE_INDEX
from src.data.formatting import Formatter, Segment
from src.data.templates import CHATML_SPECIAL_TOKENS, PromptFormat

logger = logging.getLogger(__name__)

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


def plan_segments(segments_per_record: Iterable[list[Segment]], start: int = 0) -> _Plan:
    """Flatten the segments of consecutive records (the first one is record ``start``) into a :class:`_Plan`."""
    texts: list[str] = []
    is_response: list[bool] = []
    trained: list[bool] = []
    record_index: list[int] = []
    n = 0
    for r, segments in enumerate(segments_per_record):
        n += 1
        for kind, text, is_trained in segments:
            texts.append(text)
            is_response.append(kind != "prompt")
            trained.append(is_trained)
            record_index.append(r)
    return _Plan(start, n, texts, np.array(is_response, dtype=bool), np.array(trained, dtype=bool),
                 np.array(record_index, dtype=np.int64))


@dataclass
class Assembled:
    """The examples of a plan put together, before any over-long policy: flat ids and labels, and per record its
    length, where it starts, and how many of its tokens belong to prompts (the tokenizer's prefix ids included)."""

    input_ids: np.ndarray  # int64
    labels: np.ndarray  # int64
    record_lengths: np.ndarray  # int64
    record_start: np.ndarray  # int64
    prompt_lengths: np.ndarray  # int64


def assemble(plan: _Plan, tokens: np.ndarray, token_counts: np.ndarray, prefix_ids: list[int], end_id: int,
             suffix_ids: list[int], *, ids: bool = True) -> Assembled:
    """The token arithmetic, for every record of a plan at once: each example is the tokenizer's prefix ids
    (masked), then per segment its tokens, trained where the segment is (a response, or a prompt piece under
    ``train_on_prompt``) and masked otherwise, and after
    every response the end token (trained when the response is) and the format's suffix ids (masked).

    ``tokens``: the ids of every segment text, concatenated; ``token_counts``: how many per text.
    ``ids=False`` computes only the lengths (what the audit reports).
    """
    n, n_prefix = plan.n_records, len(prefix_ids)
    tail = np.array([end_id] + list(suffix_ids), dtype=np.int64)  # what follows every response
    # Every segment is its tokens, and for a response the end token and the suffix after them.
    pieces = token_counts + np.where(plan.is_response, len(tail), 0)
    record_lengths = np.bincount(plan.record, weights=pieces, minlength=n).astype(np.int64) + n_prefix
    prompt_lengths = np.bincount(plan.record, weights=np.where(plan.is_response, 0, token_counts),
                                 minlength=n).astype(np.int64) + n_prefix
    record_start = _exclusive_cumsum(record_lengths)
    if not ids:
        empty = np.empty(0, dtype=np.int64)
        return Assembled(empty, empty, record_lengths, record_start, prompt_lengths)
    seg_start = _exclusive_cumsum(pieces) + n_prefix * (plan.record + 1)  # output offset of each segment
    total = int(record_lengths.sum())
    input_ids = np.empty(total, dtype=np.int64)
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    if n_prefix:
        positions = (record_start[:, None] + np.arange(n_prefix)).ravel()
        input_ids[positions] = np.tile(np.array(prefix_ids, dtype=np.int64), n)
    positions = np.repeat(seg_start - _exclusive_cumsum(token_counts), token_counts) + np.arange(len(tokens))
    input_ids[positions] = tokens
    trained_segments = plan.is_response & plan.trained
    trained_tokens = np.repeat(plan.trained, token_counts)  # a trained prompt piece too (train_on_prompt)
    labels[positions[trained_tokens]] = tokens[trained_tokens]
    responses = np.flatnonzero(plan.is_response)
    if len(responses):
        positions = ((seg_start + token_counts)[responses][:, None] + np.arange(len(tail))).ravel()
        input_ids[positions] = np.tile(tail, len(responses))
        end_positions = (seg_start + token_counts)[responses[trained_segments[responses]]]
        labels[end_positions] = end_id
    return Assembled(input_ids, labels, record_lengths, record_start, prompt_lengths)


@dataclass
class _Chunk:
    """Tokenized, assembled and policy-applied examples of one chunk (flat arrays, example lengths)."""

    input_ids: np.ndarray  # int64, concatenated examples
    labels: np.ndarray  # int64
    lengths: np.ndarray  # int64 per kept example
    truncated: int
    dropped: int
    trained_tokens: int
    status: np.ndarray  # FITS, TRUNCATED or DROPPED per record of the chunk

    def count_into(self, counts: dict[str, int]) -> None:
        """Add this chunk to the report counts of its split (see ``src.data.preprocess.empty_counts``)."""
        counts["examples"] += len(self.lengths)
        counts["truncated"] += self.truncated
        counts["dropped"] += self.dropped
        counts["trained_tokens"] += self.trained_tokens
        counts["total_tokens"] += int(self.lengths.sum())


class TextEncoder:
    """``tokenizer(texts, add_special_tokens=False)["input_ids"]``, through the fast backend when it has one
    (see :func:`fast_backend`; a backend that disagrees with ``__call__`` on probe texts is not used)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._backend = fast_backend(tokenizer)
        if self._backend is not None and self._backend_ids(_PROBE_TEXTS) != self._call_ids(_PROBE_TEXTS):
            self._backend = None  # pragma: no cover - a backend that disagrees with __call__ is not used

    def _call_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _backend_ids(self, texts: list[str]) -> list[list[int]]:
        encode = getattr(self._backend, "encode_batch_fast", None) or self._backend.encode_batch
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]

    def split_points(self, text: str) -> list[int] | None:
        """Where ``text`` may be cut without changing its ids (each side tokenized alone gives the ids of the whole):
        the ends of added tokens (``<|im_end|>``) and of the pre-tokenizer's pieces, which BPE merges never cross.
        None without a fast backend (then :class:`~src.data.formatting.Formatter` cuts at the message texts)."""
        backend = self.ready()
        pre_tokenizer = getattr(backend, "pre_tokenizer", None) if backend is not None else None
        if pre_tokenizer is None:
            return None
        specials = sorted(getattr(self.tokenizer, "added_tokens_encoder", {}), key=len, reverse=True)
        points = {0, len(text)}
        spans, position = [], 0
        if specials:
            for match in re.finditer("|".join(map(re.escape, specials)), text):
                spans.append((position, match.start()))
                points |= {match.start(), match.end()}
                position = match.end()
        spans.append((position, len(text)))
        for start, end in spans:
            for _, (a, b) in pre_tokenizer.pre_tokenize_str(text[start:end]):
                points |= {start + a, start + b}
        return sorted(points)

    def ready(self) -> Any | None:
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

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.ready() is not None:
            return self._backend_ids(texts)
        return self._call_ids(texts)


class ExampleTokenizer:
    """Turns records into ``input_ids``/``labels`` for one tokenizer and prompt format.

    Formatting is its :attr:`formatter` (:class:`~src.data.formatting.Formatter`: records -> prompt and
    response texts); encoding its :class:`TextEncoder`; the ids of an example come from :func:`assemble`, then
    the over-long policy (``truncate``, ``drop`` or ``error`` at ``max_seq_length``).

    ``normalize`` (optional) is applied to every piece of user text before formatting, the same function that
    generation uses; ``train_on_last_turn_only`` masks all but the last response of a conversation;
    ``train_on_prompt`` (and ``train_on_prompt_markup``) train the prompts too (:class:`Formatter`).
    """

    def __init__(self, tokenizer: Any, fmt: PromptFormat, max_seq_length: int, overlong_policy: str = "truncate",
                 normalize: Callable[[str], str] | None = None, train_on_last_turn_only: bool = False,
                 train_on_prompt: bool = False, train_on_prompt_markup: bool = False):
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.max_seq_length = max_seq_length
        self.overlong_policy = overlong_policy
        self.normalize_spec = normalize  # as given (None: no normalization); the cache key describes it
        self.train_on_last_turn_only = train_on_last_turn_only
        self.train_on_prompt, self.train_on_prompt_markup = train_on_prompt, train_on_prompt_markup
        self.prefix_ids = special_prefix_ids(tokenizer)
        self.end_id = end_token_id(tokenizer, fmt)
        self.suffix_ids = tokenizer(fmt.end_suffix, add_special_tokens=False)["input_ids"] if fmt.end_suffix else []
        self.encoder = TextEncoder(tokenizer)
        self.formatter = Formatter(fmt, tokenizer.convert_ids_to_tokens(self.end_id), normalize,
                                   train_on_last_turn_only, train_on_prompt, train_on_prompt_markup,
                                   split_points=self.encoder.split_points)

    # -- encoding --------------------------------------------------------------------------------
    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """``tokenizer(texts, add_special_tokens=False)["input_ids"]``, through the fast backend when it has one."""
        return self.encoder.encode(texts)

    def _encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All ids of ``texts`` concatenated (int64), and the number of ids per text."""
        ids = self.encode_texts(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        return flat, lengths

    @property
    def normalize(self) -> Callable[[str], str]:
        """The text normalization every piece of user text goes through (identity when none is set)."""
        return self.formatter.normalize

    def prompt_text(self, instruction: str, system: str | None = None) -> str:
        """The prompt the model sees, identical at training and generation time (the formatter's)."""
        return self.formatter.prompt_text(instruction, system)

    # -- assembly --------------------------------------------------------------------------------
    def _plan(self, records: list[dict], start: int = 0, split: str = "") -> _Plan:
        def segments(r: int, record: dict) -> list[Segment]:
            try:
                return self.formatter.segments(record)
            except ValueError as exc:
                raise type(exc)(f"{split or 'dataset'} row {start + r}: {exc}") from None

        return plan_segments((segments(r, record) for r, record in enumerate(records)), start)

    def _assemble(self, plan: _Plan, ids: bool = True) -> Assembled:
        tokens, token_counts = self._encode_flat(plan.texts)
        return assemble(plan, tokens, token_counts, self.prefix_ids, self.end_id, self.suffix_ids, ids=ids)

    def _tokenize_plan(self, plan: _Plan, split: str) -> _Chunk:
        """Tokenize and assemble a chunk (:func:`assemble`), then apply the over-long policy to every record."""
        done = self._assemble(plan)
        n, limit, record_lengths, record_start = plan.n_records, self.max_seq_length, done.record_lengths, done.record_start
        over = record_lengths > limit
        if over.any() and self.overlong_policy == "error":
            first = int(np.flatnonzero(over)[0])
            raise ValueError(self._overlong_message(f"{split} row {plan.start + first}", int(record_lengths[first])))
        total = len(done.input_ids)
        position_in_record = np.arange(total) - np.repeat(record_start, record_lengths)
        window = position_in_record < limit
        # Truncated: the cut response keeps no end token, since the answer does not end here. An example with
        # nothing trained left in the window (position 0 is never a target) is dropped.
        trained_in_window = (done.labels != IGNORE_INDEX) & window & (position_in_record >= 1)
        record_of_position = np.repeat(np.arange(n), record_lengths)
        trained_per_record = np.bincount(record_of_position, weights=trained_in_window, minlength=n)
        dropped = over & ((self.overlong_policy == "drop") | (trained_per_record == 0))
        keep = window & ~np.repeat(dropped, record_lengths)
        kept_lengths = np.minimum(record_lengths, limit)[~dropped]
        status = np.where(dropped, DROPPED, np.where(over, TRUNCATED, FITS))
        return _Chunk(done.input_ids[keep], done.labels[keep], kept_lengths, truncated=int((over & ~dropped).sum()),
                      dropped=int(dropped.sum()), trained_tokens=int(trained_per_record[~dropped].sum()), status=status)

    def _overlong_message(self, where: str, length: int) -> str:
        return (f"{where or 'an example'} is {length} tokens long, over max_seq_length={self.max_seq_length}; "
                "raise max_seq_length or set overlong_policy to 'truncate' or 'drop'")

    def tokenize_batch(self, records: list[dict], split: str = "dataset") -> list[tuple[list[int], list[int], int]]:
        """``(input_ids, labels, status)`` per record (status ``FITS``, ``TRUNCATED`` or ``DROPPED``, whose ids and
        labels are empty), as Python lists: the examples of :meth:`tokenize_chunks`, one by one."""
        chunk = self._tokenize_plan(self._plan(records, 0, split), split)
        ids, labels = chunk.input_ids.tolist(), chunk.labels.tolist()
        out, offset, kept = [], 0, iter(chunk.lengths.tolist())
        for status in chunk.status.tolist():
            if status == DROPPED:
                out.append(([], [], DROPPED))
                continue
            length = next(kept)
            out.append((ids[offset : offset + length], labels[offset : offset + length], status))
            offset += length
        return out

    def lengths(self, records: Iterable[dict], batch_size: int = 1000) -> list[tuple[int, int]]:
        """``(prompt_tokens, response_tokens)`` per record, before any over-long policy (:func:`assemble`'s: the
        tokenizer's prefix ids count with the prompt, each response its end token and the format's suffix ids;
        their sum is the example's full length)."""
        result: list[tuple[int, int]] = []
        records = list(records)
        for start in range(0, len(records), batch_size):
            done = self._assemble(self._plan(records[start : start + batch_size], start), ids=False)
            result.extend(zip(done.prompt_lengths.tolist(), (done.record_lengths - done.prompt_lengths).tolist()))
        return result

    # -- generation prompts ----------------------------------------------------------------------------
    def _prompt_ids(self, segments: list[Segment]) -> list[int]:
        return self._assemble(plan_segments([segments])).input_ids.tolist()

    def encode_prompt(self, instruction: str, system: str | None = None) -> list[int]:
        """Prompt ids for generation: exactly the ids an example's prompt has at training time."""
        return self._prompt_ids([("prompt", self.prompt_text(instruction, system), False)])

    def encode_conversation_prompt(self, messages: list[dict], template_kwargs: dict | None = None) -> list[int]:
        """Prompt ids for the next assistant turn of a conversation (``messages``: optional system message,
        then alternating user/assistant turns, ending with a user turn): exactly the ids that precede that
        turn's response when the whole conversation is a training example. ``template_kwargs``: a row's own
        chat template variables (``instruction_template="tokenizer"``), over the run's."""
        return self._prompt_ids(self.formatter.generation_segments(messages, template_kwargs))

    # -- many records -------------------------------------------------------------------------------
    def tokenize_chunks(self, records: list[dict], split: str, batch_size: int = 1000,
                        num_threads: int | None = None, progress: bool = False) -> Iterator[_Chunk]:
        """Tokenized chunks of ``batch_size`` records, in order, computed on ``num_threads`` threads.

        The Rust backend releases the GIL while it encodes, so the threads overlap encoding with each
        other and with the Python side (segments, numpy). ``num_threads=None``: the CPU count, at most 4.
        Errors (an over-long example under ``overlong_policy="error"``) surface for the first failing
        row, as in a sequential run.
        """
        starts = range(0, len(records), batch_size)
        threads = min(4, os.cpu_count() or 1) if num_threads is None else max(1, num_threads)
        if self.encoder.ready() is None:
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
