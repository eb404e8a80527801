"""Buffers for the merged tensors θ(w) of materialize and group mode, lent one call at a time.

A set holds one merged copy of every mixed tensor. A call takes a set, merges its weights into
it (unless the set still holds them), serves its rows from it and gives it back; no two calls
ever hold the same set, so threads cannot overwrite each other's merge. At most `size` sets
exist (each is one copy of the mixed tensors): a call that finds none free waits for one.

On CUDA a call returns before its kernels have run: a set given back carries an event per
device, recorded on the stream that used it, and the next call's stream waits for it before
merging into the set (threads serving on streams of their own), as does clear() before the
buffers are freed.
"""

import threading
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import Tensor

from twinmerge_ext._layers import Overrides


class BufferSet:
    """One merged copy of the mixed tensors. `tensors` maps a mixed tensor's index to its buffer;
    `overrides` serves them to the layers; `holds` is the weight tensor merged into it last
    (by identity: a merged() block's weights are recognised without comparing values)."""

    __slots__ = ("tensors", "overrides", "holds", "cuda_devices", "ready")

    def __init__(self):
        self.tensors: Dict[int, Tensor] = {}
        self.overrides: Optional[Overrides] = None
        self.holds: Optional[Tensor] = None
        self.cuda_devices: Set[torch.device] = set()  # where its buffers are, for the events
        self.ready: List[Tuple[torch.device, "torch.cuda.Event"]] = []  # its last use's end

    def given_back(self) -> None:
        """Records, on each device's current stream, the end of the work that used the set."""
        self.ready = []
        for device in self.cuda_devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self.ready.append((device, event))

    def taken(self) -> None:
        """Makes each device's current stream wait for the work that used the set last."""
        for device, event in self.ready:
            torch.cuda.current_stream(device).wait_event(event)


class MergePool:
    def __init__(self, size: int):
        self.size = size
        self._cond = threading.Condition()
        self._free: List[BufferSet] = []
        self._made = 0
        self._generation = 0

    def __reduce__(self):  # a copied wrapper allocates its own sets
        return (MergePool, (self.size,))

    @property
    def sets_made(self) -> int:
        """Sets allocated so far (at most `size`; clear() forgets them)."""
        return self._made

    @contextmanager
    def take(self, prefer: Optional[Tensor] = None) -> Iterator[BufferSet]:
        """A set for this call alone: one that holds `prefer` if there is one, else the one
        given back last, else a new one while fewer than `size` exist; otherwise waits."""
        with self._cond:
            while not self._free and self._made >= self.size:
                self._cond.wait()
            if self._free:
                pick = next((s for s in self._free if prefer is not None and s.holds is prefer),
                            self._free[-1])
                self._free.remove(pick)
            else:
                pick = BufferSet()
                self._made += 1
            generation = self._generation
        pick.taken()
        try:
            yield pick
        finally:
            pick.given_back()
            with self._cond:
                if generation == self._generation:
                    self._free.append(pick)
                else:  # cleared while lent: the set belongs to a former device or dtype
                    self._made -= 1
                self._cond.notify()

    def clear(self) -> None:
        """Drops the free sets (their memory goes back); sets lent now are dropped when given
        back. The next call allocates anew."""
        with self._cond:
            for s in self._free:  # their buffers are freed: their last kernels must be done
                for _, event in s.ready:
                    event.synchronize()
            self._made -= len(self._free)
            self._free.clear()
            self._generation += 1
            self._cond.notify_all()
