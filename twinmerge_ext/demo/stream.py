"""The main job's items and streams: encoded splits, the mixed test stream served in
length-bucketed micro-batches, per-task accuracy, and interleaved timing. Nothing here knows the
model."""

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


@dataclass
class Encoded:
    ids: torch.Tensor       # [N, L]
    mask: torch.Tensor      # [N, L]
    labels: torch.Tensor    # [N]
    texts: Optional[List[str]] = None   # the raw texts (what a text router reads)


def first_items(e: Encoded, n: int) -> Encoded:
    """The first n items (the splits are already shuffled and stratified)."""
    return Encoded(e.ids[:n], e.mask[:n], e.labels[:n],
                   e.texts[:n] if e.texts is not None else None)


def trim_padding(ids: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Drops padding columns every row of the batch has (same outputs, less work)."""
    width = max(1, int(mask.sum(1).max()))
    return ids[:, :width], mask[:, :width]


BUCKET_OVERHEAD = 128


def length_buckets(lengths: Sequence[int], overhead: int = BUCKET_OVERHEAD) -> List[List[int]]:
    """A batch's rows (indices) split into micro-batches of similar length.

    Semantics: the rows sorted by length, cut into contiguous runs minimizing
    Σ_runs (rows · longest) + overhead · runs, the padded tokens computed plus a fixed cost per
    forward (exact dynamic programme, O(n²) for n rows). Each row's output is the one it has in
    the padded batch (padding is masked); only the padding is not computed.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ls = [int(lengths[i]) for i in order]
    best, cut = [0.0] + [math.inf] * len(ls), [0] * (len(ls) + 1)
    for j in range(1, len(ls) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * ls[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs, j = [], len(ls)
    while j > 0:
        runs.append(order[cut[j]:j])
        j = cut[j]
    return runs[::-1]


@dataclass
class Stream:
    """The test (or validation) splits of every task as one shuffled stream."""
    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    tasks: torch.Tensor     # the true task of each item
    texts: Optional[List[str]] = None   # the raw texts, when every part had them

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> "Stream":
        return Stream(self.ids[:n], self.mask[:n], self.labels[:n], self.tasks[:n],
                      self.texts[:n] if self.texts is not None else None)

    def batches(self, size: int, rows: Optional[torch.Tensor] = None):
        """`micro_batches` of the stream (or of `rows` of it, in order)."""
        return micro_batches(self.ids, self.mask, size, rows)


def micro_batches(ids: torch.Tensor, mask: torch.Tensor, size: int,
                  rows: Optional[torch.Tensor] = None):
    """(rows, ids, mask) micro-batches: the items (or `rows` of them, in order) served in
    batches of `size` as they arrive, each run as length-bucketed micro-batches."""
    rows = torch.arange(len(ids)) if rows is None else rows
    lengths = mask.sum(1)
    for s in range(0, len(rows), size):
        batch = rows[s:s + size]
        for run in length_buckets(lengths[batch].tolist()):
            idx = batch[run]
            yield (idx,) + trim_padding(ids[idx], mask[idx])


def make_stream(parts: Sequence[Encoded], seed: int) -> Stream:
    ids = torch.cat([p.ids for p in parts])
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    texts = None
    if all(p.texts is not None for p in parts):
        every = [t for p in parts for t in p.texts]
        texts = [every[i] for i in perm.tolist()]
    return Stream(ids[perm], torch.cat([p.mask for p in parts])[perm],
                  torch.cat([p.labels for p in parts])[perm],
                  torch.cat([torch.full((len(p.labels),), t) for t, p in enumerate(parts)])[perm],
                  texts)


def task_accuracies(pred: torch.Tensor, stream: Stream, T: int) -> List[float]:
    """Per task t < T: the share of the stream's items of task t whose prediction is right."""
    return [float((pred[stream.tasks == t] == stream.labels[stream.tasks == t]).float().mean())
            for t in range(T)]


def time_interleaved(jobs: Dict[str, Tuple[Callable[[Stream], object], Stream]], rounds: int,
                     warmup_items: int = 8) -> Dict[str, Tuple[float, object]]:
    """(seconds, return value) of each job serving its stream in its fastest of `rounds` rounds
    that run every job in turn (so a slow spell of the machine does not fall on one method
    only), after one untimed warm-up of each on its first `warmup_items` items (lazy buffers,
    first merges)."""
    for job, stream in jobs.values():
        job(stream.head(warmup_items))
    best: Dict[str, Tuple[float, object]] = {k: (math.inf, None) for k in jobs}
    for _ in range(rounds):
        for k, (job, stream) in jobs.items():
            t0 = time.perf_counter()
            value = job(stream)
            seconds = time.perf_counter() - t0
            if seconds < best[k][0]:
                best[k] = (seconds, value)
    return best
