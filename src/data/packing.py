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
import heapq
from dataclasses import dataclass
from itertools import chain
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow.compute as pc
import torch
from torch.nn.functional import pad
from torch.nn.utils.rnn import pad_sequence

from src.data.arrow import IGNORE_INDEX, SOURCES_COLUMN, dataset_from_batches, packed_batch


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


def packed_batches(input_ids: np.ndarray, labels: np.ndarray | None, lengths: np.ndarray, max_seq_length: int,
                   rows_per_batch: int = 256, trained: np.ndarray | None = None,
                   sources: np.ndarray | None = None) -> Iterator[Any]:
    """Pack examples given as flat ``input_ids``/``labels`` and their ``lengths`` into Arrow record batches.

    The rows are those of :func:`pack_examples` (best-fit decreasing, then balanced); each row holds its
    examples in bin order with their own ``position_ids`` from 0 and the first label of every example set
    to -100, as :func:`pack_dataset` documents. Built with numpy gathers, ``rows_per_batch`` rows at a time.
    Instead of ``labels``, a boolean ``trained`` mask may be given: labels are then the ids where it is
    set and -100 elsewhere (a quarter of the memory while everything waits to be packed). ``sources`` (a mixture:
    the source id of every example) gives each row the ids of its examples, in row order (the ``sources`` column).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.min() <= 0:
        raise ValueError(f"example {int(np.argmin(lengths))} is empty; packing needs at least one token per example")
    starts = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], out=starts[1:])
    bins = pack_examples(lengths.tolist(), max_seq_length)
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
        yield packed_batch(ids, lab, positions, row_lengths, sizes, None if sources is None else sources[members])


def pack_dataset(dataset: Any, max_seq_length: int) -> Any:
    """Pack a tokenized ``datasets.Dataset`` (``input_ids``, ``labels``) into rows with ``position_ids``.

    Rows come from :func:`pack_examples` over the example lengths; a row concatenates its examples (in bin
    order), restarts ``position_ids`` at 0 for each, and sets each example's first label to -100. Columns:
    ``input_ids``, ``labels``, ``position_ids``, ``length`` (tokens in the row), ``num_examples``.
    """
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

    Rows of a mixture (a ``sources`` column: each document's source id) also give ``source_ids``, the source of every
    token (a document's id over its tokens, found by the restarts of ``position_ids`` in packed rows; 0 on padding,
    which is never trained), shaped like ``labels``. It is for the loss per source only: the trainer takes it out of
    the batch before the model's forward (``src.training.hf_trainer``).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    flatten_packed: bool = False
    boundaries: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        packed = "position_ids" in features[0]
        sources = SOURCES_COLUMN in features[0]
        if packed and self.flatten_packed:
            batch = {key: torch.tensor([[v for f in features for v in f[key]]], dtype=torch.long)
                     for key in ("input_ids", "labels", "position_ids")}
            if sources:
                batch["source_ids"] = torch.cat([token_sources(f) for f in features]).unsqueeze(0)
            return {**batch, **document_boundaries(batch["position_ids"])} if self.boundaries else batch
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of

        def padded(key: str, value: int) -> torch.Tensor:
            rows = pad_sequence([torch.as_tensor(f[key], dtype=torch.long) for f in features], batch_first=True,
                                padding_value=value, padding_side="right")
            return pad(rows, (0, longest - rows.shape[1]), value=value)

        batch = {"input_ids": padded("input_ids", self.pad_token_id), "labels": padded("labels", IGNORE_INDEX)}
        if packed:  # the padding restarts its positions: one more short sequence, isolated like the examples
            batch["position_ids"] = torch.stack([
                torch.cat([torch.as_tensor(f["position_ids"], dtype=torch.long),
                           torch.arange(longest - len(f["position_ids"]), dtype=torch.long)]) for f in features])
        else:
            lengths = torch.tensor([len(f["input_ids"]) for f in features])
            batch["attention_mask"] = (torch.arange(longest)[None, :] < lengths[:, None]).long()
        if sources:
            batch["source_ids"] = torch.stack([pad(token_sources(f), (0, longest - len(f["input_ids"])))
                                               for f in features])
        return batch


def token_sources(row: dict[str, Any]) -> torch.Tensor:
    """The source id of every token of a tokenized row (its ``sources``: one id per document, in order): a packed
    row's documents start where its ``position_ids`` restart at 0; an unpacked row is one document."""
    ids = torch.as_tensor(row[SOURCES_COLUMN], dtype=torch.long)
    if "position_ids" not in row:
        return ids[:1].expand(len(row["input_ids"])).clone()
    document = torch.cumsum(torch.as_tensor(row["position_ids"], dtype=torch.long).eq(0), 0) - 1
    if int(document[0]) < 0 or int(document[-1]) + 1 != len(ids):
        raise ValueError(f"a packed row holds {int(document[-1]) + 1} documents by its position_ids but "
                         f"{len(ids)} source ids")
    return ids[document]


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
