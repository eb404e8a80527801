"""The twin checkpoint of Twin-Merging (METHOD.md §1, stage 1): a shared expert plus each task's
exclusive knowledge, compressed.

`TwinCheckpoint.build` computes the shared expert θs with one of the static merges of
`twinmerge_ext.merging`, then, per selected floating parameter, the T exclusive deltas
vt = θt − θs (relative to the SHARED expert, METHOD.md §2). Matrices (every 2-D tensor: Linear
weights and embeddings alike) are stored as truncated SVD factors, concatenated over the experts
in the layout the merge ops take:

    U_cat [m, K] = [U1 … UT],  S_cat [K] = [S1 … ST],  V_cat [n, K] = [V1 … VT],  K = Σt rt

so that Σt wt Ut diag(St) Vtᵀ = U_cat diag(w[expert(k)] S_cat[k]) V_catᵀ (`lowrank_merge_`,
`lowrank_mix_linear`). Every other selected floating parameter (1-D, 0-D, ≥ 3-D, and empty
matrices) is stored dense as deltas [T, *shape] (`dense_merge_`). Parameters that include/exclude
do not select, and non-floating tensors, are not twin parameters: they live in the shared state
only, with the base's values (the rule of `merging`). A selected non-empty parameter that no expert
changes (every vt exactly 0, e.g. word embeddings frozen during fine-tuning) is stored in the
shared state only and listed in compression.unchanged: θs serves it exactly, with no factors to
store and nothing to mix per input.

Devices and dtypes: the SVDs run on `device` (default: the device of each base tensor) in float32
(float64 for float64 parameters); every stored tensor (shared state, factors, dense deltas) goes
back to the device of the shared expert, which is the base's (CPU for a file), in the parameter's
dtype. `TwinCheckpoint.to(device)` moves a whole twin.

Task heads (`heads=` regexes, e.g. a classifier whose width differs per task) are neither
merged nor compressed: each task keeps its own tensors, and whoever serves the twin picks one
task's head per input (`TwinMergedModule`: the router's argmax).

A trained router (any kind) can travel in the same file (`with_router`), so one file serves.

File format (version 1): one .safetensors file holding the tensors `shared/<name>`,
`lowrank/<name>/U_cat`, `lowrank/<name>/S_cat`, `lowrank/<name>/V_cat`, `dense/<name>/deltas`,
`heads/<task>/<name>` and `router/<name>` (the router's state dict), and in its metadata header
two keys. `twinmerge` holds JSON:

    {"format_version": 1, "library_version": "0.1.0", "tasks": [...],
     "shared": {"method": "task_arithmetic", "kwargs": {"scale": 0.3}},
     "compression": {"rank": null, "rank_ratio": 0.1, "lora_exact_rank": false,
                     "oversample": 10, "n_iter": 2, "seed": 0, "include": null, "exclude": null,
                     "unchanged": [names of selected parameters no expert changes]},
     "tensors": {"shared": {name: {"shape": [...], "dtype": "float32"}, ...},
                 "lowrank": {name: {"shape": [m, n], "dtype": ..., "ranks": [T ints],
                                    "errors": [T floats]}, ...},
                 "dense": {name: {"shape": [...], "dtype": ...}, ...},
                 "heads": {task: {name: {"shape": [...], "dtype": ...}, ...}, ...}},
     "heads": null or [regex, ...],
     "router": null or {"config": router.config(), "info": {...}}}

`twinmerge.checksums` holds JSON:

    {"algorithm": "sha256", "metadata": sha256 of the `twinmerge` string (UTF-8, hex),
     "tensors": {file tensor name: sha256 of its bytes in the file (hex), ...}}

`load` always checks the metadata against its checksum, and with verify=True (the default) every
tensor against its own. Files written before heads existed (no "heads" keys) load with no heads.
Files written before checksums existed (no `twinmerge.checksums`) load too, with a warning when
verify=True. The format version is still 1: the checksums are a key older readers ignore.

Every floating tensor of a file is finite: `build` and `save` refuse NaN/Inf, `load` rejects them.
`save` replaces a file atomically, through a private temporary directory next to it,
`.<name>.<16 hex digits>.tmpdir/`, that only saves to the same path look at (`save` says how).
"""

import copy
import inspect
import json
import math
import os
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral, Real
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

import twinmerge_ext
from twinmerge_ext import _tp, merging
from twinmerge_ext._finite import all_finite, non_finite
from twinmerge_ext._twin_file import (FORMAT_VERSION, SHARED_METHODS, dtype_name, read_twin,
                                      write_twin)
from twinmerge_ext.lora import LoraExpert
from twinmerge_ext.merging import Patterns, StateSource
# _MAX_EXPERTS: the merge ops' limit (csrc/checks.h, kMaxExperts), checked before a long build.
from twinmerge_ext.ops import (_MAX_EXPERTS, dense_merge_, lowrank_merge_, reconstruct_delta,
                               truncated_svd)
from twinmerge_ext.router import Router

__all__ = ["FORMAT_VERSION", "LowRankDelta", "TwinCheckpoint"]

# Arguments build() passes itself, so shared_kwargs may not carry them.
_RESERVED_SHARED_KWARGS = ("base", "experts", "include", "exclude", "progress")


@dataclass(frozen=True, eq=False)
class LowRankDelta:
    """The T experts' compressed deltas of one matrix, factors concatenated over the experts.

    Semantics: Σt wt·v̂t = U_cat diag(w[expert(k)] ⊙ S_cat[k]) V_catᵀ, v̂t = Ut diag(St) Vtᵀ.

    Shape:
        U_cat: [m, K], S_cat: [K], V_cat: [n, K], all in the parameter's dtype
        ranks: T ints summing to K; expert t owns columns sum(ranks[:t]) .. sum(ranks[:t+1])
    """

    U_cat: Tensor
    S_cat: Tensor
    V_cat: Tensor
    ranks: Tuple[int, ...]

    @property
    def shape(self) -> Tuple[int, int]:
        """(m, n), the shape of the matrix."""
        return self.U_cat.shape[0], self.V_cat.shape[0]

    def factors(self, t: int) -> Tuple[Tensor, Tensor, Tensor]:
        """Expert t's factors (views): Ut [m, rt], St [rt], Vt [n, rt]."""
        if not 0 <= t < len(self.ranks):
            raise IndexError(f"LowRankDelta.factors: t must be in [0, {len(self.ranks)}), got {t}")
        start = sum(self.ranks[:t])
        r = self.ranks[t]
        return (self.U_cat[:, start:start + r], self.S_cat[start:start + r],
                self.V_cat[:, start:start + r])

    def delta(self, t: int) -> Tensor:
        """v̂t = Ut diag(St) Vtᵀ [m, n], in the parameter's dtype."""
        return reconstruct_delta(*self.factors(t))


# --- build-time argument checks -----------------------------------------------------------------

def _task_names(experts, fn: str) -> List[str]:
    if not isinstance(experts, Mapping):
        raise TypeError(f"{fn}: experts must be a mapping task name -> state dict or .safetensors "
                        f"path (the names are the twin's task names), got "
                        f"{type(experts).__name__}")
    names = list(experts.keys())
    bad = [k for k in names if not isinstance(k, str)]
    if bad:
        raise TypeError(f"{fn}: task names (the keys of experts) must be str, got {bad[0]!r} "
                        f"({type(bad[0]).__name__})")
    if not names:
        raise ValueError(f"{fn}: experts must hold at least one expert, got 0")
    if len(names) > _MAX_EXPERTS:
        raise ValueError(f"{fn}: at most {_MAX_EXPERTS} experts are supported by the merge ops, "
                         f"got {len(names)}")
    return names


def _int_arg(value, arg: str, fn: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{fn}: {arg} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{fn}: {arg} must be >= {minimum}, got {value!r}")
    return int(value)


def _shared_config(shared: str, shared_kwargs: Optional[Mapping[str, Any]],
                   fn: str) -> Tuple[Any, Dict[str, Any]]:
    """The merge function and its effective keyword arguments (defaults filled in, for the
    metadata), checked to be JSON-serializable before any work is done."""
    if not isinstance(shared, str) or shared not in SHARED_METHODS:
        raise ValueError(f"{fn}: shared must be one of {sorted(SHARED_METHODS)}, got {shared!r}")
    if shared_kwargs is None:
        shared_kwargs = {}
    if not isinstance(shared_kwargs, Mapping):
        raise TypeError(f"{fn}: shared_kwargs must be a mapping or None, got "
                        f"{type(shared_kwargs).__name__}")
    reserved = sorted(set(shared_kwargs) & set(_RESERVED_SHARED_KWARGS))
    if reserved:
        raise TypeError(f"{fn}: shared_kwargs may not set {reserved}: build() passes base, "
                        f"experts, include, exclude and progress to the shared merge itself")
    method = SHARED_METHODS[shared]
    effective: Dict[str, Any] = {}
    for p in inspect.signature(method).parameters.values():
        if p.name not in _RESERVED_SHARED_KWARGS and p.default is not inspect.Parameter.empty:
            effective[p.name] = p.default
    if shared == "dare":  # dare's `then` method keeps its defaults in a table, not its signature
        effective.update(merging._DARE_THEN.get(shared_kwargs.get("then", effective["then"]), {}))
    effective.update(shared_kwargs)
    try:
        json.dumps(effective, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{fn}: shared_kwargs must be JSON-serializable (they are saved in the "
                        f"checkpoint), got {dict(shared_kwargs)!r}: {e}") from e
    return method, effective


def _pattern_list(patterns: Patterns) -> Optional[List[str]]:
    """include/exclude as saved: None or a list of regex strings (already validated)."""
    if patterns is None:
        return None
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _rank_for(m: int, n: int, rank: Optional[int], rank_ratio: float) -> int:
    """r = rank, or floor(rank_ratio·min(m, n)) for the ratio as written in decimal (0.29 of 100
    is 29, where float arithmetic gives 28.999…), clamped to [1, min(m, n)]: a 1×n matrix keeps
    rank 1 instead of vanishing (METHOD.md §2)."""
    k = min(m, n)
    r = rank if rank is not None else math.floor(Fraction(repr(rank_ratio)) * k)
    return min(max(r, 1), k)


def _relative_errors(deltas: Tensor, U: Tensor, S: Tensor, V: Tensor, name: str,
                     tasks: List[str], fn: str) -> List[float]:
    """||vt − Ut diag(St) Vtᵀ||_F / ||vt||_F per task, with the factors as stored (in the
    parameter's dtype), in deltas' dtype. One residual at a time, so that the transient memory
    is one matrix, not T; the norms reach the host together (one device sync, not 2T)."""
    norms = torch.empty(len(tasks), 2, dtype=deltas.dtype, device=deltas.device)
    for t in range(len(tasks)):
        v = deltas[t]
        norms[t, 0] = torch.linalg.norm(v)
        norms[t, 1] = torch.linalg.norm(v - reconstruct_delta(U[t].to(v.dtype), S[t].to(v.dtype),
                                                              V[t].to(v.dtype)))
    errors = []
    for task, (v_norm, resid) in zip(tasks, norms.tolist()):
        if not (math.isfinite(v_norm) and math.isfinite(resid)):
            # The delta was checked finite: a non-converged CUDA SVD may still return NaN.
            raise ValueError(f"{fn}: parameter {name!r} of task {task!r}: the SVD of a finite "
                             f"delta is not finite (||v||_F = {v_norm}, ||v − v̂||_F = {resid}); "
                             f"an overflow in the parameter's dtype?")
        # A zero delta (the expert equals the shared expert) is reproduced exactly by zero factors.
        errors.append(resid / v_norm if v_norm > 0 else (0.0 if resid == 0 else math.inf))
    return errors


def _extract_heads(experts: Mapping[str, StateSource], is_head, patterns: Patterns,
                   fn: str) -> Dict[str, Dict[str, Tensor]]:
    """Each expert's head tensors (copies), checked to have the same names in every expert."""
    out: Dict[str, Dict[str, Tensor]] = {}
    with ExitStack() as stack:
        for label, task, src in merging._open_experts(experts, fn, stack):
            names = [k for k in src.keys() if is_head(k)]
            if not names:
                raise ValueError(f"{fn}: heads {patterns!r} match no tensor of {label}")
            out[task] = {name: src.get_copy(name) for name in names}
            for name, t in out[task].items():
                problem = non_finite(t)
                if problem is not None:
                    raise ValueError(f"{fn}: head tensor {name!r} of {label} must be finite, got "
                                     f"{problem}")
    first_task, first = next(iter(out.items()))
    for task, head in out.items():
        if set(head) != set(first):
            raise ValueError(f"{fn}: experts must have the same head tensors; "
                             f"{first_task!r} has {sorted(first)}, {task!r} has {sorted(head)}")
    # One order for every task (files, e.g. safetensors, may list tensors in another order).
    return {task: {name: head[name] for name in first} for task, head in out.items()}


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _read_sharded(path: str, device, verify: bool, like: torch.nn.Module, fn: str):
    """read_twin's result for one tensor-parallel rank of `like`: the tensors that mix into its
    sharded tensors read in part and returned as DTensors on its mesh, the rest whole, all on
    the mesh's device unless `device` says otherwise. Every rank of the mesh reads at once, and
    a failure on any (a damaged slice, NaN in one) stops all of them with its error."""
    parts = _tp.file_parts(like, fn)
    mesh = next(iter(parts.values()))[0].device_mesh
    local_device = next(iter(parts.values()))[0].to_local().device
    if device is not None and torch.device(device).type != local_device.type:
        raise ValueError(f"{fn}: device={device!r}, but like='s tensors live on "
                         f"{local_device.type} (its mesh); leave device out")
    whole: Dict[str, List[int]] = {}  # the global shapes of the tensors read in part

    def slices(key: str, shape: List[int]):
        if key not in parts:
            return None
        whole[key] = shape
        try:
            return _tp.read_part(*parts[key], key, shape)
        except ValueError as e:
            raise ValueError(f"{fn}: {path!r}: {e}") from e

    def read():
        out = read_twin(path, device or local_device, verify, fn, slices)
        for key, shape in whole.items():
            out[3][key] = _tp.sharded(out[3][key], *parts[key], shape)
        return out
    from twinmerge_ext._distributed_build import _Ranks
    return _Ranks(fn, mesh.get_group()).step("reading its slices", read)


class _BuildPlan:
    """`TwinCheckpoint.build`'s arguments, checked, and its work on any subset of the parameters
    (`part`): the whole model in one process, or one rank's share (`build_distributed`). A
    parameter's results do not depend on which others are built with it (each SVD is seeded
    alone, DARE's generators per parameter): the parts of a partition are the whole's."""

    def __init__(self, base, experts, shared="task_arithmetic", shared_kwargs=None, rank=None,
                 rank_ratio=None, include=None, exclude=None, device=None, oversample=10,
                 n_iter=2, seed=0, heads=None, fn="TwinCheckpoint.build"):
        self.fn = fn
        self.tasks = _task_names(experts, fn)
        self.shared, (self.method, self.effective_kwargs) = shared, _shared_config(
            shared, shared_kwargs, fn)
        self.shared_kwargs = shared_kwargs
        if rank is not None:
            rank = _int_arg(rank, "rank", fn, 1)
        self.rank = rank
        self.loras = [e if isinstance(e, LoraExpert) else None for e in experts.values()]
        self.lora_exact = (rank is None and rank_ratio is None and all(self.loras)
                           and shared in ("task_arithmetic", "average"))
        rank_ratio = merging._real(0.1 if rank_ratio is None else rank_ratio, "rank_ratio", fn)
        if not 0.0 < rank_ratio <= 1.0:
            raise ValueError(f"{fn}: rank_ratio must be in (0, 1], got {rank_ratio!r}")
        self.rank_ratio = rank_ratio
        experts = {task: e.bind(base) if isinstance(e, LoraExpert) else e
                   for task, e in experts.items()}
        self.oversample = _int_arg(oversample, "oversample", fn, 0)
        self.n_iter = _int_arg(n_iter, "n_iter", fn, 0)
        self.seed = _int_arg(seed, "seed", fn, 0)
        self.work_device = torch.device(device) if device is not None else None
        self.include, self.exclude, self.heads = include, exclude, heads
        self.selected = merging._selector(include, exclude, fn)
        head_patterns = merging._patterns(heads, "heads", fn)
        self.task_heads: Dict[str, Dict[str, Tensor]] = {}
        if head_patterns:
            def is_head(name: str) -> bool:
                return any(p.search(name) for p in head_patterns)

            self.task_heads = _extract_heads(experts, is_head, heads, fn)
            base = merging._Subset(base, is_head)
            experts = {task: merging._Subset(src, is_head) for task, src in experts.items()}
        self.base, self.experts = base, experts

    def files_of(self, name: str) -> str:
        """Which files parameter `name` is read from ("base <path>, expert 't' <path>, ..."),
        for errors; empty where every source is in memory."""
        sources = [("base", self.base)] + [(f"expert {t!r}", s) for t, s in self.experts.items()]
        found = [(label, merging._file_of(src, name)) for label, src in sources]
        return ", ".join(f"{label} {path}" for label, path in found if path)

    def sizes(self) -> List[Tuple[str, int]]:
        """(name, number of elements) of the base's tensors (less task heads), in its order,
        from the files' headers (nothing is read)."""
        with ExitStack() as stack:
            src = merging._Source(self.base, "base", self.fn, stack)
            return [(name, math.prod(src.meta(name)[0])) for name in src.keys()]

    def part(self, keep: Optional[Callable[[str], bool]], progress):
        """(θs, lowrank, dense, errors, unchanged) of the parameters `keep` accepts (None: all),
        in the base's order. progress: a bool, or what `merging._progress` also takes (an object
        whose track(names) follows both passes over the parameters)."""
        fn, T = self.fn, len(self.tasks)
        base, experts = self.base, self.experts
        if keep is not None:
            base = merging._Subset(base, lambda n: not keep(n))
            experts = {task: merging._Subset(src, lambda n: not keep(n))
                       for task, src in experts.items()}
        shared_sd = self.method(base=base, experts=experts, include=self.include,
                                exclude=self.exclude, progress=progress,
                                **(self.shared_kwargs or {}))
        lowrank: Dict[str, LowRankDelta] = {}
        dense: Dict[str, Tensor] = {}
        errors: Dict[str, List[float]] = {}
        unchanged: List[str] = []
        tasks, shared, loras = self.tasks, self.shared, self.loras
        with ExitStack() as stack:
            # The shared merge already checked every expert against the base.
            named = merging._open_experts(experts, fn, stack)
            for name in merging._progress(list(shared_sd), progress, fn):
                s = shared_sd[name]
                if not (s.is_floating_point() and self.selected(name)):
                    continue
                dev = self.work_device or s.device
                s_c = s.to(device=dev, dtype=merging._compute_dtype(s.dtype))
                deltas = torch.empty((T,) + tuple(s.shape), dtype=s_c.dtype, device=dev)
                for t, (_, _, src) in enumerate(named):
                    torch.sub(src.get(name).to(device=dev, dtype=s_c.dtype), s_c, out=deltas[t])
                # The merge refused NaN/Inf inputs, but θs and θt − θs can still overflow the
                # dtype; checked here to name the parameter and the tasks. A min/max per task
                # (NaN propagates into both) reads each delta once, where isfinite writes a
                # mask; the flags reach the host together (one sync).
                if s.numel():
                    lo, hi = torch.aminmax(deltas.reshape(T, -1), dim=1)
                    s_lo, s_hi = torch.aminmax(s_c.reshape(1, -1), dim=1)
                    ok = torch.isfinite(torch.cat([s_lo, lo])) & \
                        torch.isfinite(torch.cat([s_hi, hi]))
                else:
                    ok = torch.ones(T + 1, dtype=torch.bool, device=dev)
                shared_ok, *finite, changed = torch.cat([ok, deltas.any().view(1)]).tolist()
                del s_c
                if not shared_ok:
                    raise ValueError(f"{fn}: parameter {name!r}: the shared expert has NaN/Inf "
                                     f"entries (a NaN/Inf in the base or an expert propagates "
                                     f"into the {shared} merge)")
                if not all(finite):
                    bad = [task for task, ok in zip(tasks, finite) if not ok]
                    raise ValueError(f"{fn}: parameter {name!r}: the deltas of tasks {bad} have "
                                     f"NaN/Inf entries")
                if s.numel() > 0 and not changed:
                    # No expert changes it (e.g. frozen word embeddings): θs serves it exactly,
                    # with no factors to store and nothing to mix per row.
                    unchanged.append(name)
                    continue
                if s.dim() == 2 and s.numel() > 0:
                    m, n = s.shape
                    lora_ranks = [lora.rank(name) for lora in loras] if self.lora_exact else [None]
                    if None in lora_ranks:
                        r = _rank_for(m, n, self.rank, self.rank_ratio)
                    else:  # the span of the adapters' products: exact at rank Σ rt
                        r = _rank_for(m, n, sum(lora_ranks), self.rank_ratio)
                    U, S, V = truncated_svd(deltas, r, self.oversample, self.n_iter, self.seed)
                    U, S, V = U.to(s.dtype), S.to(s.dtype), V.to(s.dtype)
                    errors[name] = _relative_errors(deltas, U, S, V, name, tasks, fn)
                    # [T, m, r] -> [m, T·r]: expert t's columns are t·r .. (t+1)·r.
                    lowrank[name] = LowRankDelta(
                        U_cat=U.permute(1, 0, 2).reshape(m, T * r).to(s.device).contiguous(),
                        S_cat=S.reshape(T * r).to(s.device).contiguous(),
                        V_cat=V.permute(1, 0, 2).reshape(n, T * r).to(s.device).contiguous(),
                        ranks=(r,) * T)
                else:
                    dense[name] = deltas.to(device=s.device, dtype=s.dtype)
                del deltas
        return shared_sd, lowrank, dense, errors, unchanged

    def info(self, unchanged: List[str]) -> Dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "library_version": twinmerge_ext.__version__,
            "shared": {"method": self.shared, "kwargs": self.effective_kwargs},
            "compression": {"rank": self.rank, "rank_ratio": self.rank_ratio,
                            "lora_exact_rank": self.lora_exact, "oversample": self.oversample,
                            "n_iter": self.n_iter, "seed": self.seed,
                            "include": _pattern_list(self.include),
                            "exclude": _pattern_list(self.exclude), "unchanged": unchanged},
            "heads": _pattern_list(self.heads),
            "router": None,
        }


class TwinCheckpoint:
    """A shared expert θs and T tasks' exclusive deltas, matrices compressed to low rank.

    Semantics: θ(w) = θs + Σt wt·v̂t, v̂t = Ut diag(St) Vtᵀ ≈ θt − θs for matrices, = θt − θs for
    dense parameters.

    Create with `build` or `load`. Read-only views:
        tasks: the T task names, in order (the order of the mixing weights).
        shared: name -> tensor, θs (every tensor of the model, base's names and order).
        lowrank: name -> LowRankDelta (U_cat [m, K], S_cat [K], V_cat [n, K], ranks).
        dense: name -> deltas [T, *shape].
        heads: task -> {name: tensor}, each task's own head (empty without `heads=`).
        router: the attached router (any kind, eval mode), or None.
        metadata: the JSON metadata (a fresh copy), as `save` writes it.
    """

    def __init__(self, tasks: Sequence[str], shared: Mapping[str, Tensor],
                 lowrank: Mapping[str, LowRankDelta], dense: Mapping[str, Tensor],
                 errors: Mapping[str, Sequence[float]], info: Mapping[str, Any],
                 heads: Optional[Mapping[str, Mapping[str, Tensor]]] = None,
                 router: Optional[Router] = None):
        """Low level: use `build` or `load`. `info` is the metadata without its "tensors"
        section, which is derived from the tensors and `errors` (name -> T floats)."""
        self._tasks = list(tasks)
        self._shared = dict(shared)
        self._lowrank = dict(lowrank)
        self._dense = dict(dense)
        self._heads = {task: dict(h) for task, h in (heads or {}).items()}
        self._router = router
        self._errors = {name: [float(e) for e in errs] for name, errs in errors.items()}
        self._info = copy.deepcopy(dict(info))
        self._info.setdefault("heads", None)

    # --- read API -------------------------------------------------------------------------------

    @property
    def tasks(self) -> List[str]:
        return list(self._tasks)

    @property
    def shared(self) -> Mapping[str, Tensor]:
        return MappingProxyType(self._shared)

    @property
    def lowrank(self) -> Mapping[str, LowRankDelta]:
        return MappingProxyType(self._lowrank)

    @property
    def dense(self) -> Mapping[str, Tensor]:
        return MappingProxyType(self._dense)

    @property
    def heads(self) -> Mapping[str, Mapping[str, Tensor]]:
        return MappingProxyType({t: MappingProxyType(h) for t, h in self._heads.items()})

    @property
    def router(self) -> Optional[Router]:
        return self._router

    def with_router(self, router: Router,
                    info: Optional[Mapping[str, Any]] = None) -> "TwinCheckpoint":
        """A twin sharing this one's tensors, with `router` attached (saved with it).

        `router` must route exactly this twin's tasks, in order; a deep copy in eval mode is
        kept. `info` is any JSON-serializable summary kept next to it (e.g. fit_router's
        validation accuracy).

        Raises:
            TypeError: router not a Router (TwinRouter, PrototypeRouter), or info not
                JSON-serializable.
            ValueError: router.tasks differ from the twin's tasks; a router tensor with NaN/Inf
                (a twin is saved only finite).
        """
        fn = "TwinCheckpoint.with_router"
        if not isinstance(router, Router):
            raise TypeError(f"{fn}: router must be a Router (TwinRouter, PrototypeRouter), got "
                            f"{type(router).__name__}")
        if list(router.tasks) != self._tasks:
            raise ValueError(f"{fn}: router.tasks must be the twin's tasks in order, "
                             f"{self._tasks}, got {list(router.tasks)}")
        for name, t in router.state_dict().items():
            problem = non_finite(t)
            if problem is not None:
                raise ValueError(f"{fn}: router tensor {name!r} must be finite, got {problem}")
        try:
            info = json.loads(json.dumps(dict(info or {}), allow_nan=False))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{fn}: info must be JSON-serializable, got {info!r}: {e}") from e
        new_info = copy.deepcopy(self._info)
        new_info["router"] = {"config": router.config(), "info": info}
        return type(self)(self._tasks, self._shared, self._lowrank, self._dense, self._errors,
                          new_info, self._heads, copy.deepcopy(router).eval())

    @property
    def metadata(self) -> Dict[str, Any]:
        info = copy.deepcopy(self._info)
        meta = {key: info.pop(key) for key in ("format_version", "library_version")}
        meta["tasks"] = list(self._tasks)
        meta.update((key, info.pop(key)) for key in ("shared", "compression"))
        meta["tensors"] = {
            "shared": {name: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
                       for name, t in self._shared.items()},
            "lowrank": {name: {"shape": list(self._shared[name].shape),
                               "dtype": dtype_name(self._shared[name].dtype),
                               "ranks": list(lr.ranks), "errors": list(self._errors[name])}
                        for name, lr in self._lowrank.items()},
            "dense": {name: {"shape": list(self._shared[name].shape),
                             "dtype": dtype_name(self._shared[name].dtype)}
                      for name in self._dense},
            "heads": {task: {name: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
                             for name, t in head.items()}
                      for task, head in self._heads.items()},
        }
        meta["heads"] = info.pop("heads")
        meta["router"] = info.pop("router")
        meta.update(info)  # keys this version does not know, kept from a loaded file
        return meta

    def __repr__(self) -> str:
        heads = f", heads={len(next(iter(self._heads.values())))} tensors/task" \
            if self._heads else ""
        router = ", router" if self._router is not None else ""
        return (f"TwinCheckpoint(tasks={self._tasks}, shared={len(self._shared)} tensors, "
                f"lowrank={len(self._lowrank)} matrices, dense={len(self._dense)} tensors"
                f"{heads}{router}, method={self._info['shared']['method']!r})")

    # --- build ----------------------------------------------------------------------------------

    @classmethod
    def build(cls, base: StateSource, experts: Mapping[str, StateSource],
              shared: str = "task_arithmetic", shared_kwargs: Optional[Mapping[str, Any]] = None,
              rank: Optional[int] = None, rank_ratio: Optional[float] = None,
              include: Patterns = None,
              exclude: Patterns = None, device: Optional[Union[str, torch.device]] = None,
              oversample: int = 10, n_iter: int = 2, seed: int = 0, heads: Patterns = None,
              progress: bool = False) -> "TwinCheckpoint":
        """Builds the twin: shared expert, exclusive deltas, low-rank compression.

        Semantics: θs = merging.<shared>(θ0, {θt}); vt = θt − θs per selected floating parameter;
        2-D vt -> truncated SVD, rank r = clamp(rank or floor(rank_ratio·min(m, n)), 1, min(m, n)).
        LoRA experts (`LoraExpert`) enter as θ0 + scale·B A, products, never A and B merged
        apart. When every expert is a LoRA adapter and the shared merge is linear
        (task_arithmetic, average), each vt of a matrix lies in the span of the adapters'
        products, of rank R ≤ Σt rt: with neither rank nor rank_ratio given it is stored at
        rank R, exactly; it is re-truncated only if asked (rank or rank_ratio).
        A non-empty parameter whose T deltas are all exactly 0 is not stored at all (θs serves it; its
        name is listed in `info["compression"]["unchanged"]` and `report()["unchanged"]`).

        Works one parameter at a time: peak memory is the shared model plus one parameter's T
        deltas (in float32) and their factors. The T deltas of a matrix are decomposed in one
        batched `truncated_svd` call ([T, m, n]).

        Args:
            base: θ0, a state dict or a .safetensors path.
            experts: task name -> θt (a state dict or a .safetensors path); names kept in order.
            shared: "task_arithmetic", "ties", "dare" or "average".
            shared_kwargs: keyword arguments of that merge (e.g. {"scale": 0.3}); saved, with
                the method's defaults filled in, in the metadata.
            rank: the rank of every matrix (clamped to [1, min(m, n)]); overrides rank_ratio.
            rank_ratio: in (0, 1]; r = floor(rank_ratio·min(m, n)), at least 1. The paper's
                "90% sparsity" is 0.1, the default (except for the exact LoRA case above).
            include, exclude: regexes selecting the twin parameters, as in `merging` (they are
                also passed to the shared merge: unselected parameters keep the base's values).
            device: where the SVDs run (default: each base tensor's device); results are stored
                on the shared expert's (= base's) device.
            oversample, n_iter, seed: of `truncated_svd` (rank ≥ min(m, n) is exact).
            heads: regexes (re.search) naming each task's own head tensors, e.g. r"^classifier\\.".
                They are taken from each expert as they are (shapes may differ between tasks,
                e.g. a different number of labels), never merged; the base's tensors of those
                names are dropped, so the shared state has none. Every expert must have the
                same head names.
            progress: tqdm progress bars (the shared merge, then the compression).

        Returns:
            A TwinCheckpoint with per-matrix relative errors in its metadata.

        Raises:
            TypeError: experts not a mapping, a non-str task name, shared_kwargs that the method
                does not take or that are not JSON-serializable, non-int rank/oversample/...
            ValueError: unknown shared method, no experts, rank < 1, rank_ratio not in (0, 1],
                a delta or a head tensor with NaN/Inf, heads patterns matching nothing in an
                expert or different names in two experts; and whatever `merging` rejects
                (missing or extra parameters, shape/dtype mismatches, bad paths, bad regexes).
        """
        fn = "TwinCheckpoint.build"
        plan = _BuildPlan(base, experts, shared, shared_kwargs, rank, rank_ratio, include,
                          exclude, device, oversample, n_iter, seed, heads, fn)
        shared_sd, lowrank, dense, errors, unchanged = plan.part(None, progress)
        return cls(plan.tasks, shared_sd, lowrank, dense, errors, plan.info(unchanged),
                   plan.task_heads)

    @classmethod
    def build_distributed(cls, path: Union[str, os.PathLike], base: StateSource,
                          experts: Mapping[str, StateSource], group=None, progress: bool = False,
                          **kwargs) -> str:
        """`build` by every process of a torch.distributed group, each on its share of the
        parameters, written as a sharded twin in the directory `path`. Collective: every rank
        calls it with the same arguments (the keyword arguments of `build`: shared, rank, ...).

        Semantics: the twin `build(base, experts, **kwargs)` would return, bit for bit on CPU
        with the same thread count: the parameters are partitioned over the ranks (largest
        first, balanced by size), each rank computes θs, the deltas and their truncated SVDs for
        its share, reading only its tensors from the base and expert files (safetensors files,
        or sharded checkpoints: a `model.safetensors.index.json` or its directory), and writes
        them to its shard file. Memory per process: its share plus one parameter's T deltas.

        Output: `path/twin.safetensors.index.json` (the metadata, the checksums and which file
        holds each tensor) and one `twin-<build>-<r>-of-<N>.safetensors` per rank. The index is
        renamed into place last: readers of `path` see the previous twin or the new one, never
        a part of one; the previous twin's shard files are then removed. `path` must be on a
        file system every rank sees (one machine, or a shared one). Load the result with
        `TwinCheckpoint.load(path)` (whole) or `TwinCheckpoint.load(path, like=module)` (one
        tensor-parallel rank's slices).

        Errors: a failure on any rank (bad arguments, a damaged file, NaN in a delta) stops every
        rank with the same error, naming the rank, the step, the parameter, the files it is read
        from and the message (a ValueError, TypeError or OSError subclass as `build` raises it,
        else RuntimeError);
        each rank removes the shard it wrote, and no rank waits on a rank that failed.
        RuntimeError without an initialized process group.

        progress: rank 0 shows one tqdm bar for the whole build: every rank's elements done
        (its share's parameters, once by the shared merge and once by the compression) against
        the total, each rank's percentage beside it, counted in the process group's store. The
        other ranks print nothing.

        Returns the index's path.
        """
        from twinmerge_ext._distributed_build import build_distributed
        return build_distributed(cls, path, base, experts, group, progress, kwargs)

    # --- use ------------------------------------------------------------------------------------

    def _weights(self, weights, fn: str) -> Tensor:
        if isinstance(weights, Tensor):
            w = weights
            if not w.is_floating_point():
                raise TypeError(f"{fn}: weights must be a floating tensor, got {w.dtype}")
        elif isinstance(weights, (list, tuple)):
            bad = [x for x in weights if isinstance(x, bool) or not isinstance(x, Real)]
            if bad:
                raise TypeError(f"{fn}: weights must hold real numbers, got {bad[0]!r}")
            w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
        else:
            raise TypeError(f"{fn}: weights must be a tensor [T] or a list of T floats, got "
                            f"{type(weights).__name__}")
        if w.shape != (len(self._tasks),):
            raise ValueError(f"{fn}: weights must have shape [T={len(self._tasks)}] (one per task "
                             f"{self._tasks}), got {list(w.shape)}")
        if not all_finite(w):
            raise ValueError(f"{fn}: weights has NaN/Inf entries: {w.tolist()}")
        return w

    def task_index(self, task: Union[str, int], fn: str = "TwinCheckpoint.task_index") -> int:
        """The position of a task given by name or index (errors name the known tasks)."""
        if isinstance(task, str):
            if task not in self._tasks:
                raise ValueError(f"{fn}: unknown task {task!r}; the twin's tasks are "
                                 f"{self._tasks}")
            return self._tasks.index(task)
        if isinstance(task, bool) or not isinstance(task, Integral):
            raise TypeError(f"{fn}: a task must be a name or an index, got {task!r}")
        if not 0 <= task < len(self._tasks):
            raise ValueError(f"{fn}: task index must be in [0, {len(self._tasks)}), got {task}")
        return int(task)

    def merged_state_dict(self, weights: Union[Tensor, Sequence[float]],
                          head: Optional[Union[str, int]] = None) -> Dict[str, Tensor]:
        """The merged model for one mixing-weight vector.

        Semantics: θ(w) = θs + Σt w[t]·v̂t (non-twin tensors: θs), plus the head of task `head`
        (default: argmax w, the router's choice) when the twin has task heads.

        Shape:
            weights: [T] (a floating tensor, moved to each parameter's device, or a list)
            head: a task name or index (only for a twin with heads)
            returns: a new state dict with the shared expert's names, order, shapes, dtypes and
                devices, then the head's tensors; every tensor owns its memory.

        Each parameter is one `lowrank_merge_` or `dense_merge_` call (no loop over experts).
        """
        fn = "TwinCheckpoint.merged_state_dict"
        w = self._weights(weights, fn)
        if head is not None and not self._heads:
            raise ValueError(f"{fn}: head={head!r} given, but the twin has no task heads")
        on_device: Dict[torch.device, Tensor] = {}
        out: Dict[str, Tensor] = {}
        loc = _tp.local  # a sharded twin (load(like=)): each rank merges its own slices
        for name, s in self._shared.items():
            if name not in self._lowrank and name not in self._dense:
                out[name] = s.clone()
                continue
            # The ops write into `out` and reject a non-contiguous one.
            buf = torch.empty_like(loc(s), memory_format=torch.contiguous_format)
            wd = on_device.setdefault(s.device, w.to(s.device))
            if name in self._lowrank:
                lr = self._lowrank[name]
                merged = lowrank_merge_(buf, loc(s), loc(lr.U_cat), loc(lr.S_cat),
                                        loc(lr.V_cat), lr.ranks, wd)
            else:
                merged = dense_merge_(buf, loc(s), loc(self._dense[name]), wd)
            out[name] = _tp.like(merged, s)
        if self._heads:
            t = self.task_index(head, fn) if head is not None else int(w.argmax())
            out.update((name, h.clone()) for name, h in self._heads[self._tasks[t]].items())
        return out

    @property
    def sharded(self) -> bool:
        """Whether the twin holds one rank's shards (`load(like=)` on a tensor-parallel module):
        its sharded tensors are DTensors; it serves and merges, but is neither saved nor moved."""
        return any(_tp.is_dtensor(t) for _, t in self._tensors())

    def _tensors(self):
        yield from self._shared.items()
        for name, lr in self._lowrank.items():
            yield from ((name, t) for t in (lr.U_cat, lr.S_cat, lr.V_cat))
        yield from self._dense.items()

    def _refuse_sharded(self, fn: str) -> None:
        if self.sharded:
            raise ValueError(f"{fn}: the twin holds this rank's shards (loaded with like= a "
                             f"tensor-parallel module); load it whole to save or move it")

    def to(self, device: Union[str, torch.device]) -> "TwinCheckpoint":
        """A copy of the twin with every tensor on `device` (tensors already there are shared)."""
        self._refuse_sharded("TwinCheckpoint.to")
        lowrank = {name: LowRankDelta(lr.U_cat.to(device), lr.S_cat.to(device),
                                      lr.V_cat.to(device), lr.ranks)
                   for name, lr in self._lowrank.items()}
        heads = {task: {k: v.to(device) for k, v in h.items()} for task, h in self._heads.items()}
        router = copy.deepcopy(self._router).to(device) if self._router is not None else None
        return type(self)(self._tasks, {k: v.to(device) for k, v in self._shared.items()},
                          lowrank, {k: v.to(device) for k, v in self._dense.items()},
                          self._errors, self._info, heads, router)

    def report(self) -> Dict[str, Any]:
        """Compression quality and storage.

        Returns a dict:
            tasks: the task names.
            errors: name -> {task: ||vt − v̂t||_F / ||vt||_F} per compressed matrix (computed at
                build time with the factors as stored; 0 for a zero delta).
            ranks: name -> the T ranks.
            unchanged: selected parameters that no expert changes (served by θs, not stored).
            storage: bytes of the shared expert (`shared_bytes`), of the factors, of the dense
                deltas and of the T task heads; `twin_bytes` (their sum, i.e. θs + Σt rt(m+n+1)
                elements per matrix + T·numel per dense parameter + the heads);
                `one_model_bytes` = θs plus one task's head (the mean head size): one full model;
                `experts_bytes` = T full models; `storage_ratio` = twin_bytes / one_model_bytes;
                `ratio_vs_experts` = twin_bytes / experts_bytes.
        """
        shared_bytes = sum(_nbytes(t) for t in self._shared.values())
        lowrank_bytes = sum(_nbytes(lr.U_cat) + _nbytes(lr.S_cat) + _nbytes(lr.V_cat)
                            for lr in self._lowrank.values())
        dense_bytes = sum(_nbytes(d) for d in self._dense.values())
        heads_bytes = sum(_nbytes(t) for h in self._heads.values() for t in h.values())
        twin_bytes = shared_bytes + lowrank_bytes + dense_bytes + heads_bytes
        # An expert is the shared architecture plus its own head.
        T = len(self._tasks)
        one_model_bytes = shared_bytes + heads_bytes / T
        experts_bytes = T * shared_bytes + heads_bytes
        return {
            "tasks": list(self._tasks),
            "errors": {name: dict(zip(self._tasks, errs)) for name, errs in self._errors.items()},
            "ranks": {name: list(lr.ranks) for name, lr in self._lowrank.items()},
            "unchanged": list(self._info.get("compression", {}).get("unchanged", [])),
            "storage": {
                "shared_bytes": shared_bytes,
                "one_model_bytes": one_model_bytes,
                "lowrank_bytes": lowrank_bytes,
                "dense_bytes": dense_bytes,
                "heads_bytes": heads_bytes,
                "twin_bytes": twin_bytes,
                "experts_bytes": experts_bytes,
                "storage_ratio": twin_bytes / one_model_bytes if one_model_bytes else math.nan,
                "ratio_vs_experts": twin_bytes / experts_bytes if experts_bytes else math.nan,
            },
        }

    # --- save / load ----------------------------------------------------------------------------

    def _file_tensors(self) -> Dict[str, Tensor]:
        tensors = {f"shared/{name}": t for name, t in self._shared.items()}
        for name, lr in self._lowrank.items():
            tensors[f"lowrank/{name}/U_cat"] = lr.U_cat
            tensors[f"lowrank/{name}/S_cat"] = lr.S_cat
            tensors[f"lowrank/{name}/V_cat"] = lr.V_cat
        for name, d in self._dense.items():
            tensors[f"dense/{name}/deltas"] = d
        for task, head in self._heads.items():
            for name, t in head.items():
                tensors[f"heads/{task}/{name}"] = t
        if self._router is not None:
            for name, t in self._router.state_dict().items():
                tensors[f"router/{name}"] = t
        return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes the twin to one .safetensors file (layout in the module docstring), atomically.

        The file carries the sha256 of every tensor and of the metadata (`load` checks them). A
        twin holding NaN/Inf in any floating tensor is refused before anything is written.

        Atomic: the file is written in a private temporary directory next to `path`,
        `.<name>.<16 hex digits>.tmpdir/`, fsynced, renamed onto `path` (os.replace), and the
        directory is fsynced and the temporary one removed. Readers of `path` see the previous
        file or the new one, never a part; a save that fails leaves nothing behind. A save
        killed on the way can leave its temporary directory: the writer holds an exclusive
        flock on it throughout, and the next save to the same path removes every such directory
        whose lock is free (its writer is dead), never one a live save is writing. Concurrent
        saves to one path each write their own file; the last rename wins. Without fcntl
        (Windows), and on file systems without flock, stale directories are not removed.

        Permissions: a file that replaces a regular file keeps that file's permission bits (a
        private twin stays private); a new file gets those of any new file, 0o666 less the
        umask (0o644 under the usual umask 0o022). The path itself is replaced: a symlink there
        becomes a regular file, owned by the saving user.

        Raises:
            TypeError: path not a str or os.PathLike.
            ValueError: a floating tensor with NaN/Inf (named, with its first such entry).
            OSError: the subclass and errno of the failure, with a message naming the path and
                the problem: path is a directory (IsADirectoryError), its directory does not
                exist (FileNotFoundError), a component of it is a file (NotADirectoryError), it
                is not writable (PermissionError, or EROFS), or writing failed (e.g. ENOSPC).
        """
        fn = "TwinCheckpoint.save"
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"{fn}: path must be a str or os.PathLike, got {type(path).__name__}")
        self._refuse_sharded(fn)
        path = os.fspath(path)
        write_twin(path, self._file_tensors(), self.metadata, fn)

    @classmethod
    def load(cls, path: Union[str, os.PathLike],
             device: Optional[Union[str, torch.device]] = None,
             verify: bool = True, like: Optional[torch.nn.Module] = None) -> "TwinCheckpoint":
        """Reads a twin saved by `save`, validating it against its metadata and checksums.

        The metadata's own checksum is always checked (it costs microseconds). With verify=True
        every tensor's bytes are hashed and compared with the checksum written at save time:
        sha256 at about 1.8 GB/s on one core, 0.4 s per 700 MB (a RoBERTa-base twin of 4 tasks
        loads in 0.47 s from the page cache, 0.07 s without verification; 0.58 s and 0.18 s
        after its pages were evicted; bench/checkpoint_io.py on a 2-core EPYC VM).
        verify=False skips the tensors' checksums: faster, but a damaged tensor then loads as
        plausible wrong weights. A file written before checksums existed (no
        `twinmerge.checksums` metadata) still loads; with verify=True it warns (UserWarning)
        that nothing could be verified. Saving it again adds the checksums.

        Every floating tensor is checked finite whatever `verify` says (`build` and `save`
        refuse NaN/Inf, so a file holding one was not written by them): one min/max pass at
        memory speed (~20 GB/s here), most of what a load without verification costs.

        Tensor parallelism: with like= a module parallelized by torch (`parallelize_module`,
        ColwiseParallel / RowwiseParallel), each rank reads only its slices of the tensors that
        mix into the module's sharded tensors (safetensors' get_slice): θs as the module's
        tensor is sharded, U_cat's rows where it is sharded along its rows (column-parallel),
        V_cat's rows where along its columns (row-parallel), dense deltas likewise; the rest
        whole. Those tensors are DTensors on the module's mesh (`sharded` is True), every tensor
        on the mesh's device; wrap the same module with TwinMergedModule. verify still checks
        every whole tensor's checksum (and that it is finite), streaming a sliced one from the
        file in 64 MiB blocks (memory: the slice and a block). The call is collective: every
        rank of the mesh loads at once, and a failure on any rank raises the same error on all
        (without verify, only a rank's own slices are checked finite).

        Sharded twins (`build_distributed`): path is their directory, or its
        `twin.safetensors.index.json`; the index holds the metadata and checksums, each tensor
        is read from the shard file it names.

        Args:
            path: the .safetensors file, or a sharded twin's directory (or index).
            device: where to put every tensor (default: CPU).
            verify: hash every tensor and compare with its checksum (default True).
            like: a tensor-parallel module: read this rank's slices only (above).

        Raises:
            TypeError: path not a str or os.PathLike; verify not a bool.
            OSError (the subclass and errno, naming the path and the problem): no such file
                (FileNotFoundError), a directory (IsADirectoryError), not readable
                (PermissionError).
            ValueError (naming the path and the problem): not a regular file; not a safetensors
                file or truncated; no `twinmerge` metadata or invalid JSON in it; the metadata,
                or with verify a tensor, not matching its checksum (both digests named);
                malformed checksums; an unknown format version; malformed metadata; a tensor
                listed in the metadata missing from the file, or an unexpected extra tensor; a
                shape or dtype that disagrees with the metadata; ranks whose count is not T or
                whose sum is not the factors' K; a floating tensor with NaN/Inf (named, with its
                first such entry).
        """
        fn = "TwinCheckpoint.load"
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"{fn}: path must be a str or os.PathLike, got {type(path).__name__}")
        path = os.fspath(path)

        if not isinstance(verify, bool):
            raise TypeError(f"{fn}: verify must be a bool, got {verify!r}")
        if like is not None and not isinstance(like, torch.nn.Module):
            raise TypeError(f"{fn}: like must be an nn.Module (tensor-parallel) or None, got "
                            f"{type(like).__name__}")
        if like is None:
            info, tasks, specs, tensors, router, digests = read_twin(path, device, verify, fn)
        else:
            info, tasks, specs, tensors, router, digests = _read_sharded(path, device, verify,
                                                                         like, fn)
        shared = {name: tensors[f"shared/{name}"] for name in specs["shared"]}
        lowrank = {name: LowRankDelta(tensors[f"lowrank/{name}/U_cat"],
                                      tensors[f"lowrank/{name}/S_cat"],
                                      tensors[f"lowrank/{name}/V_cat"], tuple(spec["ranks"]))
                   for name, spec in specs["lowrank"].items()}
        dense = {name: tensors[f"dense/{name}/deltas"] for name in specs["dense"]}
        heads = {task: {name: tensors[f"heads/{task}/{name}"] for name in head}
                 for task, head in specs["heads"].items()}
        if router is not None:
            router.load_state_dict({k[len("router/"):]: v for k, v in tensors.items()
                                    if k.startswith("router/")})
            router.to(device or "cpu").eval()
        errors = {name: spec["errors"] for name, spec in specs["lowrank"].items()}
        if digests is None and verify:
            warnings.warn(f"{fn}: {path!r} has no checksums (written before they were added): "
                          f"its contents could not be verified; save it again to add them",
                          UserWarning, stacklevel=2)
        return cls(tasks, shared, lowrank, dense, errors, info, heads, router)
