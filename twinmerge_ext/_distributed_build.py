"""`TwinCheckpoint.build_distributed`: the twin built by the processes of a torch.distributed
group, each on its share of the parameters, written as a sharded twin.

Every rank checks the same arguments, partitions the base's parameters over the ranks (largest
first, each to the least-loaded rank: the same plan on every rank, from the files' headers), and
builds its share as `TwinCheckpoint.build` would build it (θs by the shared merge, the deltas
and their truncated SVDs), reading only its tensors from the base and expert files. It writes
its shard file; rank 0 then publishes the index (`_twin_file.write_index`). A parameter's result
does not depend on the others built with it, so the twin is the single-process build's, bit for
bit on CPU with the same thread count.

Failures: each step ends with every rank telling the others how it went (one `all_gather_object`
of a status per step, reached by every rank whatever happened), so a failure on one rank stops
all of them, each raising the same error naming the rank, the step, the parameter (and the
files it is read from) and the message, and removing the shard it wrote; none waits forever
for a rank that failed. (A rank killed outright is torchrun's to handle: the others'
collective times out.)

Progress (`progress=True`): every rank counts what it has done into the group's key-value store
and rank 0 shows one bar for all of them (`_Progress`).
"""

import builtins
import inspect
import os
import threading
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from twinmerge_ext._twin_file import INDEX_NAME, write_index, write_shard


def partition(sizes: List[Tuple[str, int]], world: int) -> Dict[str, int]:
    """name -> rank: largest first, each to the rank with the fewest elements so far (the
    lowest rank on ties); the same on every rank."""
    load = [0] * world
    owner = {}
    for i, (name, n) in sorted(enumerate(sizes), key=lambda e: (-e[1][1], e[0])):
        r = min(range(world), key=lambda k: (load[k], k))
        owner[name] = r
        load[r] += max(n, 1)
    return owner


class _Ranks:
    """Runs one step on every rank and makes every rank agree on how it went."""

    def __init__(self, fn: str, group):
        import torch.distributed as dist
        self.dist, self.fn, self.group = dist, fn, group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.where: Optional[str] = None  # the parameter the step is at, for errors
        self.files_of: Callable[[str], str] = lambda name: ""  # its files, for errors
        self.counter: Optional["_Progress"] = None

    def track(self, names):
        """The names of a pass over this rank's parameters (the shared merge's, then the
        compression's: `merging._progress` hands them here): each is where an error happens
        until the next is asked for, and is then counted for the progress bar."""
        for name in names:
            self.where = name
            yield name
            if self.counter is not None:
                self.counter.count(name)
        self.where = None

    def gather(self, value: Any) -> List[Any]:
        """Every rank's (small, picklable) value, in rank order."""
        everyone: List[Any] = [None] * self.world
        self.dist.all_gather_object(everyone, value, group=self.group)
        return everyone

    def step(self, what: str, work: Callable[[], Any], undo: Callable[[], None] = lambda: None
             ) -> Any:
        """work() on this rank, returned once every rank succeeded in its own (only how each
        went is sent). If any rank failed, every rank runs undo() and raises the error of the
        first rank that failed."""
        self.where = None
        result = None
        try:
            result = work()
            out = None
        except Exception as e:  # told to every rank below, re-raised there
            where = ""
            if self.where:
                files = self.files_of(self.where)
                where = f", parameter {self.where!r}" + (f" (read from {files})" if files else "")
            out = (type(e).__name__, f"{type(e).__name__}: {e}", where)
            mine = e
        else:
            mine = None
        failed = [(r, o) for r, o in enumerate(self.gather(out)) if o is not None]
        if not failed:
            return result
        undo()
        r, (kind, message, where) = failed[0]
        others = f" (ranks {[f for f, _ in failed[1:]]} failed too)" if len(failed) > 1 else ""
        error = getattr(builtins, kind, None)  # the failing rank's kind, if a builtin one
        if not (isinstance(error, type) and issubclass(error, (ValueError, TypeError, OSError))):
            error = RuntimeError
        raise error(f"{self.fn}: rank {r} of {self.world} failed while {what}{where}: "
                    f"{message}{others}") from mine


class _Progress:
    """Every rank's progress, shown by rank 0 as one bar.

    A rank's work is its share's elements twice (the shared merge passes over each of its
    parameters, then the compression). Each rank adds a parameter's elements to its own counter
    in the group's store (the key-value store of torch.distributed's rendezvous, which its own
    barriers use) as it finishes it; rank 0 reads every counter a few times a second and shows
    their sum against the total, each rank's percentage as the bar's postfix. The other ranks
    print nothing: torchrun would interleave their bars with rank 0's on one terminal. Counting
    costs one small store request per parameter and no collective (the bar's start is one more
    status exchange of the build's steps), so a rank that fails leaves no rank waiting on a
    counter. The bar never changes how the build ends: a store error while counting or showing
    is a warning, and the counting or the bar stops there.
    """

    POLL_S = 0.25

    def __init__(self, ranks: _Ranks, build_id: str, sizes: List[Tuple[str, int]],
                 owner: Dict[str, int]):
        from torch.distributed import distributed_c10d as c10d
        self.size = dict(sizes)
        self.rank, self.world = ranks.rank, ranks.world
        self.totals = [0] * self.world
        for name, n in sizes:
            self.totals[owner[name]] += 2 * n
        group = ranks.group if ranks.group is not None else c10d._get_default_group()
        self.store = c10d._get_process_group_store(group)
        self.key = f"twinmerge_ext/build/{build_id}/"
        self.bar = self.thread = None
        self.done = [0] * self.world  # every rank's count, as rank 0 last read it
        self.counting = True
        self.stop = threading.Event()
        if self.rank == 0:
            try:
                from tqdm.auto import tqdm
            except ImportError as e:
                raise ImportError(f"{ranks.fn}: progress=True needs tqdm (pip install tqdm)") from e
            self.bar = tqdm(total=sum(self.totals), desc=f"{ranks.fn} ({self.world} rank"
                            f"{'s' if self.world > 1 else ''})",
                            unit="el", unit_scale=True)
            self.thread = threading.Thread(target=self._watch, daemon=True,
                                           name="twinmerge_ext build progress")
            self.thread.start()

    def count(self, name: str) -> None:
        """This rank has done a pass over parameter `name`."""
        if self.counting:
            self.counting = self._safely(
                lambda: self.store.add(f"{self.key}{self.rank}", self.size.get(name, 0)),
                f"counting rank {self.rank}'s progress")

    def _show(self) -> None:
        self.done = [int(self.store.add(f"{self.key}{r}", 0)) for r in range(self.world)]
        self.bar.update(sum(self.done) - self.bar.n)
        self.bar.set_postfix_str(", ".join(
            f"rank {r} {100 * d / max(t, 1):.0f}%"
            for r, (d, t) in enumerate(zip(self.done, self.totals))))

    def _watch(self) -> None:
        while not self.stop.wait(self.POLL_S):
            if not self._safely(self._show, "reading the ranks' counters"):
                return

    def _safely(self, work: Callable[[], None], what: str) -> bool:
        try:
            work()
            return True
        except Exception as e:  # the bar is a view: it must not change how the build ends
            import warnings
            warnings.warn(f"TwinCheckpoint.build_distributed: the progress bar stopped: "
                          f"{what} failed ({type(e).__name__}: {e})", RuntimeWarning)
            return False

    def close(self) -> None:
        """Rank 0: the last count (every rank has finished its share, or failed), then the bar
        is closed and the counters removed. Other ranks: nothing."""
        if self.bar is None:
            return
        self.stop.set()
        self.thread.join()
        try:
            if self._safely(self._show, "reading the ranks' counters"):
                self._safely(lambda: [self.store.delete_key(f"{self.key}{r}")
                                      for r in range(self.world)], "removing the counters")
        finally:
            self.bar.close()


def build_distributed(cls, path, base, experts, group, progress: bool, kwargs: Dict[str, Any]
                      ) -> str:
    from twinmerge_ext.checkpoint import _BuildPlan
    fn = "TwinCheckpoint.build_distributed"
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{fn}: needs an initialized process group (launch with torchrun and "
                           f"call torch.distributed.init_process_group()); for one process use "
                           f"TwinCheckpoint.build")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: path must be a str or os.PathLike (a directory), got "
                        f"{type(path).__name__}")
    path = os.fspath(path)
    known = set(inspect.signature(_BuildPlan).parameters) - {"base", "experts", "fn"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"{fn}: unexpected keyword argument {unknown[0]!r}; it takes build's: "
                        f"{sorted(known)}")
    ranks = _Ranks(fn, group)
    rank, world = ranks.rank, ranks.world

    def plan_it():
        plan = _BuildPlan(base, experts, fn=fn, **kwargs)
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{fn}: path {path!r} exists and is not a directory")
        os.makedirs(path, exist_ok=True)
        sizes = plan.sizes()
        return plan, sizes, partition(sizes, world)
    plan, sizes, owner = ranks.step("checking the arguments", plan_it)
    ranks.files_of = plan.files_of
    build_id = ranks.gather(uuid.uuid4().hex[:12])[0]  # rank 0's, everywhere
    name = f"twin-{build_id}-{rank + 1:05d}-of-{world:05d}.safetensors"
    written: List[str] = []
    counter = None
    if progress:
        made: List[_Progress] = []
        counter = ranks.step("starting the progress bar",
                             lambda: made.append(_Progress(ranks, build_id, sizes, owner))
                             or made[0], lambda: [c.close() for c in made])
    ranks.counter = counter
    try:
        return _build_and_publish(cls, path, plan, owner, ranks, build_id, name, written)
    finally:
        if counter is not None:
            counter.close()


def _build_and_publish(cls, path, plan, owner, ranks, build_id, name, written) -> str:
    fn, rank, world = ranks.fn, ranks.rank, ranks.world

    def build_share():
        part = plan.part(lambda n: owner[n] == rank, ranks)  # ranks.track: errors, the bar
        twin = cls(plan.tasks, part[0], part[1], part[2], part[3], plan.info(part[4]),
                   plan.task_heads if rank == 0 else {})
        tensors = twin._file_tensors()
        written.append(os.path.join(path, name))
        digests = write_shard(written[0], tensors, fn)
        return twin.metadata, part[4], digests, sorted(tensors)

    def remove_mine():
        for f in written:
            try:
                os.remove(f)
            except OSError:
                pass
    shares = ranks.gather(ranks.step("building its share", build_share, remove_mine))

    def publish():
        if rank != 0:
            return None
        order = {n: i for i, (n, _) in enumerate(plan.sizes())}
        meta = shares[0][0]
        for section in ("shared", "lowrank", "dense"):
            merged = {k: v for share in shares for k, v in share[0]["tensors"][section].items()}
            meta["tensors"][section] = dict(sorted(merged.items(), key=lambda kv: order[kv[0]]))
        meta["compression"]["unchanged"] = sorted(
            (n for share in shares for n in share[1]), key=order.__getitem__)
        digests = {k: v for share in shares for k, v in share[2].items()}
        files = [f"twin-{build_id}-{r + 1:05d}-of-{world:05d}.safetensors" for r in range(world)]
        weight_map = {k: files[r] for r, share in enumerate(shares) for k in share[3]}
        write_index(path, weight_map, digests, meta, fn)
        return None
    ranks.step("publishing the index", publish, remove_mine)
    return os.path.join(path, INDEX_NAME)

