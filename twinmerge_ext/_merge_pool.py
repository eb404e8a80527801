"""Buffers for the merged tensors θ(w) of materialize and group mode, lent one call at a time.

A set holds one merged copy of every mixed tensor. A call takes a set, merges its weights into
it (unless the set still holds them), serves its rows from it and gives it back; no two calls
ever hold the same set, so threads cannot overwrite each other's merge. At most `size` sets
exist (each is one copy of the mixed tensors): a call that finds none free waits for one.
"""

import threading
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional

from torch import Tensor

from twinmerge_ext._layers import Overrides


class BufferSet:
    """One merged copy of the mixed tensors. `tensors` maps a mixed tensor's index to its buffer;
    `overrides` serves them to the layers; `holds` is the weight tensor merged into it last
    (by identity: a merged() block's weights are recognised without comparing values)."""

    __slots__ = ("tensors", "overrides", "holds")

    def __init__(self):
        self.tensors: Dict[int, Tensor] = {}
        self.overrides: Optional[Overrides] = None
        self.holds: Optional[Tensor] = None


class MergePool:
    def __init__(self, size: int):
        self.size = size
        self._cond = threading.Condition()
        self._free: List[BufferSet] = []
        self._made = 0
        self._generation = 0

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
        try:
            yield pick
        finally:
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
            self._made -= len(self._free)
            self._free.clear()
            self._generation += 1
            self._cond.notify_all()
