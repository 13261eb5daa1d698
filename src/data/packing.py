"""Packing examples into rows, and the collator that batches rows exactly.

Packing places tokenized examples into rows of at most ``max_seq_length`` tokens. Best-fit
decreasing (each example goes into the fullest row that still has room; longest examples first)
decides how many rows are needed; the examples are then spread evenly over that many rows when they
fit, so rows have nearly equal lengths and batches (padded to their longest row) carry almost no
padding.
Each example keeps its own ``position_ids`` starting at 0. transformers' SDPA and eager attention then
build a block-diagonal causal mask from the restarting ``position_ids`` when the batch carries *no*
2-D ``attention_mask`` and no KV cache (``find_packed_sequence_indices`` in
``transformers/masking_utils.py``); FlashAttention-2 takes its varlen path from the same
``position_ids``. So a packed batch never carries an ``attention_mask``.

The first label of every packed example is set to -100. That label is never a prediction target of
the example itself (position 0 has nothing before it), so the example alone trains exactly the same
tokens; inside a row it stops the previous example's last token from being trained to predict the
next example's first token across the seam.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from itertools import chain
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from src.data.tokenization import IGNORE_INDEX


def decreasing_order(lengths: Sequence[int]) -> list[int]:
    """Example indices, longest first, ties by index: ``sorted(range(n), key=lambda i: (-lengths[i], i))`` without
    a key tuple per example (a stable numpy sort; a tenth of the memory for large datasets)."""
    return np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable").tolist()


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins of total length <= ``capacity`` (best-fit decreasing).

    Deterministic: ties are broken by example index. Returns bins ordered by first placement, each
    listing its examples in placement order. O(n log n) lookups over a sorted list of free space.
    """
    order = decreasing_order(lengths)
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"example {i} has {size} tokens, more than the row capacity {capacity}")
        pos = bisect.bisect_left(free, (size, -1))
        if pos < len(free):
            remaining, b = free.pop(pos)
            bins[b].append(i)
            remaining -= size
        else:
            b = len(bins)
            bins.append([i])
            remaining = capacity - size
        if remaining > 0:
            bisect.insort(free, (remaining, b))
    return bins


def balanced_bins(lengths: Sequence[int], n_bins: int, max_rounds: int | None = None) -> list[list[int]]:
    """Spread examples over ``n_bins`` bins with nearly equal totals.

    Longest first onto the lightest bin, then swaps between the heaviest and the lightest bin while
    a swap narrows their gap (bounded by ``max_rounds``, default ``2 * n_bins``).
    """
    import heapq

    heap = [(0, b) for b in range(n_bins)]
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    loads = [0] * n_bins
    for i in decreasing_order(lengths):
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        loads[b] = load + lengths[i]
        heapq.heappush(heap, (loads[b], b))
    # Lazy max- and min-heaps of (load, bin): stale entries are skipped when popped.
    heaviest = [(-load, b) for b, load in enumerate(loads)]
    lightest = [(load, b) for b, load in enumerate(loads)]
    heapq.heapify(heaviest)
    heapq.heapify(lightest)

    def top(heap, sign):
        while heap and sign * heap[0][0] != loads[heap[0][1]]:
            heapq.heappop(heap)
        return heap[0][1]

    for _ in range(max_rounds if max_rounds is not None else 2 * n_bins):
        hi, lo = top(heaviest, -1), top(lightest, 1)
        gap = loads[hi] - loads[lo]
        best = None  # (new gap, a, b): swap item a of the heavy bin with item b of the light bin
        for a in bins[hi]:
            for b in bins[lo]:
                delta = lengths[a] - lengths[b]
                if 0 < delta < gap and (best is None or abs(gap - 2 * delta) < best[0]):
                    best = (abs(gap - 2 * delta), a, b)
        if best is None:
            break
        _, a, b = best
        bins[hi][bins[hi].index(a)] = b
        bins[lo][bins[lo].index(b)] = a
        delta = lengths[a] - lengths[b]
        loads[hi] -= delta
        loads[lo] += delta
        for b in (hi, lo):
            heapq.heappush(heaviest, (-loads[b], b))
            heapq.heappush(lightest, (loads[b], b))
    return [b for b in bins if b]


def pack_examples(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing fixes the number of rows; then the same number of rows is re-filled evenly.

    Batches are padded to their longest row, so rows of nearly equal length waste almost nothing,
    where best-fit alone leaves full rows next to a few part-filled ones. The balanced layout is used
    only when every row still fits ``capacity``; otherwise the best-fit rows are kept.
    """
    n_bins = len(best_fit_decreasing(lengths, capacity))  # only the count is kept: half the peak memory
    balanced = balanced_bins(lengths, n_bins)
    if len(balanced) == n_bins and all(sum(lengths[i] for i in b) <= capacity for b in balanced):
        return balanced
    del balanced
    return best_fit_decreasing(lengths, capacity)


# Column types exactly as ``Dataset.from_dict`` infers them from Python lists (``input_ids`` is narrowed
# to int32 by ``datasets``, the rest stay int64), so the Arrow-built datasets equal the list-built ones.
UNPACKED_COLUMNS = ("input_ids", "labels", "length")
PACKED_COLUMNS = ("input_ids", "labels", "position_ids", "length", "num_examples")


def features(packed: bool) -> Any:
    from datasets import Features, List, Value

    columns = {"input_ids": List(Value("int32")), "labels": List(Value("int64"))}
    if packed:
        columns["position_ids"] = List(Value("int64"))
    columns["length"] = Value("int64")
    if packed:
        columns["num_examples"] = Value("int64")
    return Features(columns)


def _list_array(values: np.ndarray, lengths: np.ndarray, dtype: Any) -> Any:
    import pyarrow as pa

    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:  # pragma: no cover - a batch is at most a thousand rows
        raise ValueError("an Arrow batch of more than 2**31 tokens; lower the batch size")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32), type=pa.int32()), pa.array(values, type=dtype))


def _int32_ids(values: np.ndarray) -> np.ndarray:
    if len(values) and (values.min() < -(2**31) or values.max() >= 2**31):
        raise ValueError("token ids do not fit in int32")
    return values.astype(np.int32, copy=False)


def unpacked_batch(input_ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> Any:
    """One Arrow record batch of unpacked examples from flat ids/labels and example lengths."""
    import pyarrow as pa

    schema = features(False).arrow_schema
    return pa.RecordBatch.from_arrays(
        [_list_array(_int32_ids(input_ids), lengths, pa.int32()), _list_array(labels.astype(np.int64, copy=False), lengths, pa.int64()),
         pa.array(lengths.astype(np.int64, copy=False), type=pa.int64())], schema=schema)


def packed_batches(input_ids: np.ndarray, labels: np.ndarray | None, lengths: np.ndarray, max_seq_length: int,
                   rows_per_batch: int = 256, trained: np.ndarray | None = None) -> Iterator[Any]:
    """Pack examples given as flat ``input_ids``/``labels`` and their ``lengths`` into Arrow record batches.

    The rows are those of :func:`pack_examples` (best-fit decreasing, then balanced); each row holds its
    examples in bin order with their own ``position_ids`` from 0 and the first label of every example set
    to -100, as :func:`pack_dataset` documents. Built with numpy gathers, ``rows_per_batch`` rows at a time.
    Instead of ``labels``, a boolean ``trained`` mask may be given: labels are then the ids where it is
    set and -100 elsewhere (a quarter of the memory while everything waits to be packed).
    """
    import pyarrow as pa

    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.min() <= 0:
        raise ValueError(f"example {int(np.argmin(lengths))} is empty; packing needs at least one token per example")
    starts = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], out=starts[1:])
    bins = pack_examples(lengths.tolist(), max_seq_length)
    schema = features(True).arrow_schema
    for first in range(0, len(bins), rows_per_batch):
        group = bins[first : first + rows_per_batch]
        sizes = np.fromiter(map(len, group), dtype=np.int64, count=len(group))
        members = np.fromiter(chain.from_iterable(group), dtype=np.int64, count=int(sizes.sum()))
        member_lengths = lengths[members]
        member_out = np.zeros(len(members), dtype=np.int64)  # where each example starts in the batch's values
        np.cumsum(member_lengths[:-1], out=member_out[1:])
        total = int(member_lengths.sum())
        source = np.repeat(starts[members] - member_out, member_lengths) + np.arange(total)
        ids = input_ids[source]
        if labels is not None:
            lab = labels[source].astype(np.int64)
        else:
            lab = np.where(trained[source], ids, IGNORE_INDEX).astype(np.int64)
        lab[member_out] = IGNORE_INDEX  # nothing is trained across a seam
        positions = np.arange(total) - np.repeat(member_out, member_lengths)
        row_lengths = np.add.reduceat(member_lengths, np.concatenate(([0], np.cumsum(sizes[:-1]))))
        yield pa.RecordBatch.from_arrays(
            [_list_array(_int32_ids(ids), row_lengths, pa.int32()), _list_array(lab, row_lengths, pa.int64()),
             _list_array(positions, row_lengths, pa.int64()), pa.array(row_lengths, type=pa.int64()),
             pa.array(sizes, type=pa.int64())], schema=schema)


def dataset_from_batches(batches: list, packed: bool) -> Any:
    """An in-memory ``datasets.Dataset`` over Arrow record batches (types of :func:`features`)."""
    import pyarrow as pa
    from datasets import Dataset
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.table import InMemoryTable

    table = pa.Table.from_batches(batches, schema=features(packed).arrow_schema)
    # An explicit fingerprint: deriving one would pickle and hash the whole table (a full copy in memory).
    return Dataset(InMemoryTable(table), fingerprint=generate_random_fingerprint())


def pack_dataset(dataset: Any, max_seq_length: int) -> Any:
    """Pack a tokenized ``datasets.Dataset`` (``input_ids``, ``labels``) into rows with ``position_ids``.

    Rows come from :func:`pack_examples` over the example lengths; a row concatenates its examples (in bin
    order), restarts ``position_ids`` at 0 for each, and sets each example's first label to -100. Columns:
    ``input_ids``, ``labels``, ``position_ids``, ``length`` (tokens in the row), ``num_examples``.
    """
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]  # the rows in dataset order (any indices mapping applied)
    ids_column = table.column("input_ids").combine_chunks()
    labels_column = table.column("labels").combine_chunks()
    lengths = pc.list_value_length(ids_column).to_numpy(zero_copy_only=False).astype(np.int64)
    label_lengths = pc.list_value_length(labels_column).to_numpy(zero_copy_only=False)
    if not np.array_equal(lengths, label_lengths):
        raise ValueError("every example needs as many labels as input_ids")
    input_ids = ids_column.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    labels = labels_column.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return dataset_from_batches(list(packed_batches(input_ids, labels, lengths, max_seq_length)), packed=True)


def flattens_packed_batches(attn_implementation: str | None) -> bool:
    """Whether packed batches must be one flattened row for this attention implementation.

    transformers' FlashAttention paths detect packed sequences from ``position_ids`` only when the
    batch has a single row (``_is_packed_sequence`` in ``modeling_flash_attention_utils``): with several
    packed rows they silently attend across examples. SDPA and eager isolate per row, where keeping
    rows of ``max_seq_length`` is also cheaper (no attention over the whole batch at once).
    """
    return "flash" in (attn_implementation or "")


@dataclass
class SFTDataCollator:
    """Pads a list of rows into a batch, masking padding by position.

    Unpacked rows get right padding to the longest row in the batch (rounded up to
    ``pad_to_multiple_of``), an ``attention_mask`` that is 0 exactly on the padded positions, and labels
    -100 there. Packed rows (they carry ``position_ids``) get no ``attention_mask``: padding becomes one
    more short sequence with its own restarting ``position_ids`` and -100 labels, so it is isolated by the
    same mechanism that isolates the packed examples. With ``flatten_packed`` (FlashAttention), the
    packed rows of a batch are concatenated into one row instead, with no padding at all; with ``boundaries``
    too (hybrid linear-attention models, ``src.models.architectures``), that row also carries its documents'
    boundaries as transformers' kernels take them: ``cu_seq_lens_q``/``_k`` (int32 offsets), ``max_length_q``/``_k``
    and ``seq_idx`` (int32, the document index of each token, for causal-conv1d).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    flatten_packed: bool = False
    boundaries: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        packed = "position_ids" in features[0]
        if packed and self.flatten_packed:
            batch = {key: torch.tensor([[v for f in features for v in f[key]]], dtype=torch.long)
                     for key in ("input_ids", "labels", "position_ids")}
            return {**batch, **document_boundaries(batch["position_ids"])} if self.boundaries else batch
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(features)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        position_ids = torch.zeros((n, longest), dtype=torch.long)
        for row, f in enumerate(features):
            length = len(f["input_ids"])
            input_ids[row, :length] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention_mask[row, :length] = 1
            if packed:
                position_ids[row, :length] = torch.as_tensor(f["position_ids"], dtype=torch.long)
                position_ids[row, length:] = torch.arange(longest - length)
        batch = {"input_ids": input_ids, "labels": labels}
        if packed:
            batch["position_ids"] = position_ids
        else:
            batch["attention_mask"] = attention_mask
        return batch


def document_boundaries(position_ids: torch.Tensor) -> dict[str, Any]:
    """The boundary arguments of one flattened packed row (``[1, tokens]`` positions restarting at 0 per document)."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        raise ValueError(f"document boundaries need one flattened row, got position_ids of shape {tuple(position_ids.shape)}")
    starts = (position_ids[0] == 0).nonzero().squeeze(1)
    if starts.numel() == 0 or starts[0] != 0:
        raise ValueError("a flattened packed row must start a document at position 0")
    cu = torch.cat([starts, torch.tensor([position_ids.shape[1]])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    seq_idx = (torch.cumsum((position_ids == 0).to(torch.int32), dim=1) - 1).to(torch.int32)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest, "seq_idx": seq_idx}


def padding_efficiency(batch_lengths: Sequence[Sequence[int]], pad_to_multiple_of: int | None = None) -> float:
    """Real tokens / tokens computed, for batches given as lists of row lengths."""
    real = computed = 0
    for lengths in batch_lengths:
        if not lengths:
            continue
        longest = max(lengths)
        if pad_to_multiple_of:
            longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        real += sum(lengths)
        computed += longest * len(lengths)
    return real / computed if computed else 1.0
