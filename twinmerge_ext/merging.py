"""Static merges of fine-tuned experts: the shared expert θs of Twin-Merging (METHOD.md §1).

Task arithmetic (the paper's default), TIES, DARE (+ task arithmetic or TIES) and weight
averaging, over state dicts or safetensors files.

Every method works one parameter at a time: it reads that parameter from the base and from each
expert, merges it, and moves on. Safetensors files are opened lazily (`safe_open`, which reads a
tensor only when asked), so with file inputs peak memory is the output model plus one tensor per
expert (TIES stacks the T task vectors of one parameter), never T + 1 full models.

Common rules:
- A parameter is merged iff its name matches (`re.search`) some `include` pattern (default: every
  name) and no `exclude` pattern. Biases are merged like any other parameter (METHOD.md §2).
  Parameters that are not selected, and tensors that are not floating point (integer buffers
  such as position_ids, bool masks), are copied from the base.
- Arithmetic is in float32 (float64 for float64 parameters); each result is cast back to the
  base's dtype and lives on the base tensor's device. Experts are moved there one tensor at a
  time. Inputs are never modified; every output tensor owns its memory.
- Every expert must have exactly the base's parameter names, shapes and dtypes.
- Every floating tensor read (each of the base's, each selected one of every expert) must be
  finite, and so must scale, density and drop_rate: a NaN would spread into task arithmetic and
  averaging, and would silently drop the whole expert from TIES and DARE (their magnitude
  threshold would be NaN). The check costs one read of each tensor, and a host sync per tensor
  on CUDA.
"""

import abc
import hashlib
import json
import math
import os
import re
from contextlib import ExitStack
from fractions import Fraction
from numbers import Integral, Real
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from safetensors import safe_open
from torch import Tensor

from twinmerge_ext._finite import all_finite

__all__ = ["average", "dare", "task_arithmetic", "ties"]

StateSource = Union[Mapping[str, Tensor], str, os.PathLike]
Experts = Union[Sequence[StateSource], Mapping[str, StateSource]]
Patterns = Optional[Union[str, Sequence[str]]]

# safetensors header dtype names, so a file's dtypes are known without reading its data.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class _Derived(abc.ABC):
    """A state computed from other sources, tensor by tensor (heads filtered out, LoRA products);
    `_Source` accepts it like a state dict."""

    @abc.abstractmethod
    def open(self, fn: str, label: str, stack: ExitStack):
        """An object with keys(), meta(name) -> (shape, dtype) and get(name) -> Tensor, its
        inputs opened on `stack`."""

    def file_of(self, name: str) -> Optional[str]:
        """The file(s) parameter `name` is read from, for errors; None if not a file."""
        return None


def _file_of(source: "StateSource", name: str) -> Optional[str]:
    """The file holding parameter `name` of a source, for errors: the safetensors file, a
    sharded checkpoint's shard (from its index), what a derived source reads; None for a state
    dict, or where it cannot tell (it never raises: it runs while an error is being reported)."""
    try:
        if isinstance(source, _Derived):
            return source.file_of(name)
        if not isinstance(source, (str, os.PathLike)):
            return None
        path = os.fspath(source)
        index = _checkpoint_index(path)
        if index is not None:
            with open(index) as f:
                shard = json.load(f)["weight_map"].get(name)
            return None if shard is None else os.path.join(os.path.dirname(index), shard)
        if os.path.isdir(path):
            return os.path.join(path, "model.safetensors")
        return path
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class _Source:
    """A state dict or a lazily opened safetensors file, read one tensor at a time."""

    def __init__(self, source: StateSource, label: str, fn: str, stack: ExitStack):
        self.label = label
        self._dict: Optional[Mapping[str, Tensor]] = None
        self._derived = None
        if isinstance(source, torch.nn.Module):
            raise TypeError(f"{fn}: {label} must be a state dict or a .safetensors path, got an "
                            f"nn.Module ({type(source).__name__}); pass module.state_dict()")
        if isinstance(source, _Derived):
            self._derived = source.open(fn, label, stack)
            self._keys = list(self._derived.keys())
        elif isinstance(source, Mapping):
            for key, value in source.items():
                if not isinstance(key, str) or not isinstance(value, Tensor):
                    raise TypeError(f"{fn}: {label} must map parameter names to tensors, got "
                                    f"{key!r}: {type(value).__name__}")
            self._dict = source
            self._keys = list(source.keys())
        elif isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if not os.path.exists(path):
                raise ValueError(f"{fn}: {label} path {path!r} does not exist")
            index = _checkpoint_index(path)
            if index is not None:
                self._file = _ShardedCheckpoint(index, label, fn, stack)
            else:
                self._file = _open_file(path, label, fn, stack)
            self._keys = list(self._file.keys())
        elif hasattr(source, "bind"):
            raise TypeError(f"{fn}: {label} is a {type(source).__name__}, an adapter without its "
                            f"base: pass {label}.bind(base) (TwinCheckpoint.build binds it itself)")
        else:
            raise TypeError(f"{fn}: {label} must be a state dict (a mapping name -> Tensor) or a "
                            f"path to a .safetensors file, got {type(source).__name__}")

    def keys(self) -> List[str]:
        return self._keys

    def meta(self, name: str) -> Tuple[Tuple[int, ...], torch.dtype]:
        """(shape, dtype) of a parameter, from the file header when the source is a file."""
        if self._derived is not None:
            return self._derived.meta(name)
        if self._dict is not None:
            t = self._dict[name]
            return tuple(t.shape), t.dtype
        view = self._file.get_slice(name)
        dtype = _SAFETENSORS_DTYPES.get(view.get_dtype())
        if dtype is None:  # rare dtypes (float8, complex): read the tensor once to learn it
            dtype = self._file.get_tensor(name).dtype
        return tuple(view.get_shape()), dtype

    def get(self, name: str) -> Tensor:
        """The tensor, read-only: a state dict's own tensor, or a fresh one read from the file."""
        if self._derived is not None:
            return self._derived.get(name)
        return self._dict[name] if self._dict is not None else self._file.get_tensor(name)

    def get_copy(self, name: str) -> Tensor:
        """A tensor the caller may keep: safetensors reads are already fresh copies."""
        if self._dict is None and self._derived is None:
            return self._file.get_tensor(name)
        return self.get(name).clone()


_INDEX_NAMES = ("model.safetensors.index.json",)


def _checkpoint_index(path: str) -> Optional[str]:
    """The index of a sharded checkpoint at `path` (the index itself, or a directory holding
    model.safetensors.index.json), or None; a directory holding model.safetensors is that file."""
    if path.endswith(".safetensors.index.json") and os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in _INDEX_NAMES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
    return None


def _open_file(path: str, label: str, fn: str, stack: ExitStack):
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model.safetensors")):
        path = os.path.join(path, "model.safetensors")
    try:
        return stack.enter_context(safe_open(path, framework="pt", device="cpu"))
    except Exception as e:  # SafetensorError for a bad header, OSError for a directory
        raise ValueError(f"{fn}: {label} path {path!r} is not a safetensors file, a sharded "
                         f"checkpoint's index or a directory holding one "
                         f"({type(e).__name__}: {e})") from e


class _ShardedCheckpoint:
    """A sharded safetensors checkpoint (transformers' layout: an index JSON whose weight_map
    names the file of each tensor), read like one file: each shard is opened when one of its
    tensors is first asked for, so a process reading some tensors opens only their files."""

    def __init__(self, index: str, label: str, fn: str, stack: ExitStack):
        self.dir, self.label, self.fn, self.stack = os.path.dirname(index), label, fn, stack
        try:
            with open(index) as f:
                self.map = json.load(f)["weight_map"]
            if not isinstance(self.map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in self.map.items()):
                raise ValueError("weight_map must map tensor names to file names")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{fn}: {label} index {index!r} is not a valid sharded checkpoint "
                             f"index ({type(e).__name__}: {e})") from e
        self.files: Dict[str, object] = {}

    def keys(self) -> List[str]:
        return list(self.map)

    def _file(self, name: str):
        shard = self.map[name]
        if shard not in self.files:
            path = os.path.join(self.dir, shard)
            if not os.path.isfile(path):
                raise ValueError(f"{self.fn}: {self.label}: shard {path!r}, which holds "
                                 f"{name!r}, does not exist")
            f = _open_file(path, self.label, self.fn, self.stack)
            self.files[shard] = (f, set(f.keys()))
        f, held = self.files[shard]
        if name not in held:
            raise ValueError(f"{self.fn}: {self.label}: shard {shard!r} does not hold {name!r}, "
                             f"which the index places there")
        return f

    def get_slice(self, name: str):
        return self._file(name).get_slice(name)

    def get_tensor(self, name: str) -> Tensor:
        return self._file(name).get_tensor(name)


class _Subset(_Derived):
    """`source` without the tensors whose names `drop` accepts (task heads, for the shared merge)."""

    def __init__(self, source: StateSource, drop: Callable[[str], bool]):
        self.source, self.drop = source, drop

    def open(self, fn: str, label: str, stack: ExitStack) -> "_Source":
        inner = _Source(self.source, label, fn, stack)
        inner._keys = [k for k in inner.keys() if not self.drop(k)]
        return inner

    def file_of(self, name: str) -> Optional[str]:
        return _file_of(self.source, name)


_Expert = Tuple[str, str, _Source]  # (label for errors, key for DARE's generators, source)


def _open_experts(experts: Experts, fn: str, stack: ExitStack) -> List[_Expert]:
    if isinstance(experts, (str, os.PathLike, Tensor, torch.nn.Module)):
        raise TypeError(f"{fn}: experts must be a sequence of state dicts or paths, or a mapping "
                        f"name -> state dict or path, got a single {type(experts).__name__}; "
                        f"wrap it in a list")
    if isinstance(experts, Mapping):
        if any(isinstance(v, Tensor) for v in experts.values()):
            raise TypeError(f"{fn}: experts must be a sequence or a mapping of experts, got a "
                            f"single state dict (its values are tensors); wrap it in a list")
        items = [(f"experts[{k!r}]", str(k), v) for k, v in experts.items()]
    elif isinstance(experts, Sequence):
        items = [(f"experts[{i}]", str(i), v) for i, v in enumerate(experts)]
    else:
        raise TypeError(f"{fn}: experts must be a sequence of state dicts or paths, or a mapping "
                        f"name -> state dict or path, got {type(experts).__name__}")
    if not items:
        raise ValueError(f"{fn}: experts must hold at least one expert, got {len(items)}")
    return [(label, key, _Source(src, label, fn, stack)) for label, key, src in items]


def _check_compatible(ref: _Source, experts: List[_Expert], fn: str) -> None:
    """Names, shapes and dtypes from metadata only, so a mismatch fails before any arithmetic."""
    ref_keys = ref.keys()
    ref_meta = {name: ref.meta(name) for name in ref_keys}
    for label, _, src in experts:
        if src is ref:
            continue
        have = set(src.keys())
        missing = [k for k in ref_keys if k not in have]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"{fn}: {label} is missing parameter {missing[0]!r} that {ref.label} "
                             f"has{more}")
        extra = [k for k in src.keys() if k not in ref_meta]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise ValueError(f"{fn}: {label} has parameter {extra[0]!r} that {ref.label} does "
                             f"not have{more}")
        for name in ref_keys:
            (rs, rd), (es, ed) = ref_meta[name], src.meta(name)
            if rs != es:
                raise ValueError(f"{fn}: parameter {name!r} has shape {list(rs)} in {ref.label} "
                                 f"but {list(es)} in {label}")
            if rd != ed:
                raise ValueError(f"{fn}: parameter {name!r} has dtype {rd} in {ref.label} but "
                                 f"{ed} in {label}")


def _patterns(patterns: Patterns, arg: str, fn: str) -> Optional[List["re.Pattern[str]"]]:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{fn}: {arg} must be a regex string or a list of them, got {patterns!r}")
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{fn}: {arg} pattern {p!r} is not a valid regex: {e}") from e
    return compiled


def _selector(include: Patterns, exclude: Patterns, fn: str) -> Callable[[str], bool]:
    inc = _patterns(include, "include", fn)
    exc = _patterns(exclude, "exclude", fn) or []
    return lambda name: ((inc is None or any(p.search(name) for p in inc))
                         and not any(p.search(name) for p in exc))


def _real(value, arg: str, fn: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{fn}: {arg} must be a real number, got {value!r} "
                        f"({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {arg} must be finite, got {value!r}")
    return float(value)


def _check_finite(t: Tensor, name: str, label: str, fn: str) -> Tensor:
    """t, after checking it has no NaN/Inf: one would spread into the merge (task arithmetic,
    averaging) or silently drop the whole expert (TIES' and DARE's magnitude threshold is NaN,
    and every comparison with it false)."""
    if not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{fn}: parameter {name!r} of {label} has {bad} NaN/Inf entries (of "
                         f"{t.numel()})")
    return t


def _density(value, fn: str) -> float:
    density = _real(value, "density", fn)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"{fn}: density must be in (0, 1], got {value!r}")
    return density


def _progress(names: Iterable[str], enabled: bool, fn: str) -> Iterable[str]:
    """The names, under a tqdm bar if enabled. `enabled` may also be an object with
    `track(names)` (a rank of a distributed build: it follows where an error happens and counts
    for the bar rank 0 shows)."""
    if not enabled:
        return names
    if hasattr(enabled, "track"):
        return enabled.track(names)
    try:
        from tqdm.auto import tqdm
    except ImportError as e:
        raise ImportError(f"{fn}: progress=True needs tqdm (pip install tqdm)") from e
    return tqdm(names, desc=fn, unit="tensor")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _merge_per_tensor(fn: str, ref: _Source, experts: List[_Expert], include: Patterns,
                      exclude: Patterns, progress: bool,
                      merge: Callable[[str, Tensor], Tensor]) -> Dict[str, Tensor]:
    """Runs merge(name, ref tensor in compute dtype) on every selected floating parameter."""
    selected = _selector(include, exclude, fn)
    _check_compatible(ref, experts, fn)
    out: Dict[str, Tensor] = {}
    for name in _progress(ref.keys(), progress, fn):
        _, dtype = ref.meta(name)
        if not (dtype.is_floating_point and selected(name)):
            out[name] = _check_finite(ref.get_copy(name), name, ref.label, fn)
            continue
        b = _check_finite(ref.get(name), name, ref.label, fn)
        out[name] = merge(name, b.to(_compute_dtype(dtype))).to(dtype)
    return out


def _expert_tensors(name: str, like: Tensor, experts: List[_Expert], fn: str):
    """Yields (key, expert tensor) on like's device and in its dtype, one expert at a time,
    each checked finite."""
    for label, key, src in experts:
        t = _check_finite(src.get(name), name, label, fn)
        yield key, t.to(device=like.device, dtype=like.dtype)


def _kept_count(numel: int, density: float) -> int:
    # ceil(density·numel) on the decimal the caller wrote: in binary, 0.07·100 = 7.000000000000001
    # would keep 8 of 100. Ceil rather than round so that any density > 0 keeps at least one entry.
    return min(numel, math.ceil(Fraction(repr(density)) * numel))


def _trim_stack(taus: Tensor, density: float) -> Tensor:
    """Each task vector of a stack [T, ...] with all but its ceil(density·numel) largest-magnitude
    entries set to zero.

    Exactly that many entries are kept: among entries tied with the smallest kept magnitude, the
    lowest flat indices win, so the result never depends on how a sort orders equal values. The
    thresholds of the experts that change the tensor come from one batched kthvalue (parallel
    over the experts); an all-zero task vector (an expert that leaves the tensor alone) is
    skipped."""
    T, n = taus.shape[0], taus[0].numel()
    k = _kept_count(n, density)
    if k >= n:
        return taus
    mag = taus.abs().reshape(T, n)
    rows = mag.any(1).nonzero().flatten()
    out = torch.zeros_like(taus)
    if rows.numel() == 0:
        return out
    m = mag[rows]
    thresholds = m.kthvalue(n - k + 1, dim=1).values   # each row's k-th largest magnitude
    keep = m > thresholds[:, None]
    short = (keep.sum(1) < k) & (thresholds > 0)   # ties at the threshold: lowest indices win
    for i in short.nonzero().flatten().tolist():
        tied = (m[i] == thresholds[i]).nonzero().squeeze(1)
        keep[i, tied[: k - int(keep[i].sum())]] = True
    out[rows] = torch.where(keep.view((-1,) + tuple(taus.shape[1:])), taus[rows], 0)
    return out


def _ties_merge(trimmed: Tensor) -> Tensor:
    """Sign election by summed mass and disjoint mean over a stack [T, ...] of trimmed vectors."""
    elected = torch.sign(trimmed.sum(0))
    agree = (trimmed != 0) & (torch.sign(trimmed) == elected)
    total = torch.where(agree, trimmed, 0).sum(0)
    return total / agree.sum(0).clamp_min(1)


def _dare_seed(seed: int, name: str, key: str) -> int:
    # blake2b, not hash(): Python salts str hashes per process, and the masks must be the same
    # in every run and independent of the order in which experts and parameters are visited.
    digest = hashlib.blake2b(repr((seed, name, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _dare_drop(tau: Tensor, name: str, key: str, seed: int, drop_rate: float) -> Tensor:
    if drop_rate == 0.0:
        return tau
    # Drawn on the CPU so that the masks do not depend on the device the merge runs on.
    g = torch.Generator().manual_seed(_dare_seed(seed, name, key))
    keep = (torch.rand(tau.shape, generator=g) >= drop_rate).to(tau.device)
    return torch.where(keep, tau / (1.0 - drop_rate), 0)


def _task_arithmetic_delta(taus: Iterable[Tensor], like: Tensor) -> Tensor:
    total = torch.zeros_like(like)
    for tau in taus:
        total += tau
    return total


Combine = Callable[[Iterable[Tensor], Tensor], Tensor]


def _sum_combine(scale: float) -> Combine:
    return lambda taus, b: scale * _task_arithmetic_delta(taus, b)


def _ties_combine(density: float, scale: float) -> Combine:
    return lambda taus, b: scale * _ties_merge(_trim_stack(torch.stack(list(taus)), density))


def _merge_task_vectors(fn: str, base: StateSource, experts: Experts, include: Patterns,
                        exclude: Patterns, progress: bool, combine: Combine,
                        transform: Callable[[str, str, Tensor], Tensor] = lambda n, k, tau: tau,
                        ) -> Dict[str, Tensor]:
    """θ = θ0 + combine(τ1..τT) per selected parameter, with τt = transform(name, key, θt − θ0)."""
    with ExitStack() as stack:
        ref = _Source(base, "base", fn, stack)
        named = _open_experts(experts, fn, stack)

        def merge(name: str, b: Tensor) -> Tensor:
            taus = (transform(name, key, e - b) for key, e in _expert_tensors(name, b, named, fn))
            return b + combine(taus, b)

        return _merge_per_tensor(fn, ref, named, include, exclude, progress, merge)


def task_arithmetic(base: StateSource, experts: Experts, scale: float = 0.3, *,
                    include: Patterns = None, exclude: Patterns = None,
                    progress: bool = False) -> Dict[str, Tensor]:
    """Task arithmetic: add the scaled sum of the experts' task vectors to the base.

    Semantics: θ = θ0 + scale · Σt (θt − θ0), per selected floating parameter.

    Args:
        base: θ0, a state dict or a path to a .safetensors file.
        experts: θ1..θT, a sequence of state dicts or paths, or a mapping name -> one of those.
        scale: λ (the paper uses 0.3, and 0.29 for its 8 GLUE experts).
        include, exclude: regexes (a string or a list), matched with re.search against each
            parameter name; a parameter is merged iff it matches some include (default: all)
            and no exclude. Others, and non-floating tensors, are copied from the base.
        progress: show a tqdm progress bar over the parameters.

    Returns:
        A new state dict with the base's names, order, dtypes and devices.

    Raises:
        TypeError: a base, expert, scale or pattern of the wrong type.
        ValueError: no experts; an expert missing a parameter of the base or having an extra
            one; a shape or dtype mismatch; a path that does not exist or is not a safetensors
            file; an invalid regex; NaN/Inf in a tensor read or in scale (named).
    """
    fn = "task_arithmetic"
    combine = _sum_combine(_real(scale, "scale", fn))
    return _merge_task_vectors(fn, base, experts, include, exclude, progress, combine)


def ties(base: StateSource, experts: Experts, density: float = 0.2, scale: float = 1.0, *,
         include: Patterns = None, exclude: Patterns = None,
         progress: bool = False) -> Dict[str, Tensor]:
    """TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint mean.

    Semantics: θ = θ0 + scale · mean{τ̂t : τ̂t ≠ 0, sign(τ̂t) = sign(Σs τ̂s)} (0 where the set is
    empty), with τ̂t = τt = θt − θ0 trimmed to its top ceil(density·numel) entries by magnitude,
    per parameter and per expert.

    The kept count is ceil(density·numel) of the density as written in decimal (0.07 of 100
    keeps 7), so density = 1 keeps every entry and any density > 0 keeps at least one. Exactly
    that many entries are kept; ties at the threshold magnitude go to the lowest flat indices.
    The sign is elected by summed mass, not by a count of experts; where the trimmed values sum
    to exactly 0, no expert agrees with the elected sign 0 and the entry stays at the base.

    Args:
        base, experts, include, exclude, progress: as in task_arithmetic.
        density: fraction of each task vector kept, in (0, 1].
        scale: λ applied to the merged task vector.

    Returns:
        A new state dict with the base's names, order, dtypes and devices.

    Raises:
        TypeError, ValueError: as in task_arithmetic; ValueError if density is not in (0, 1].
    """
    fn = "ties"
    combine = _ties_combine(_density(density, fn), _real(scale, "scale", fn))
    return _merge_task_vectors(fn, base, experts, include, exclude, progress, combine)


_DARE_THEN = {"task_arithmetic": {"scale": 0.3}, "ties": {"density": 0.2, "scale": 1.0}}


def dare(base: StateSource, experts: Experts, drop_rate: float, seed: int,
         then: str = "task_arithmetic", *, include: Patterns = None, exclude: Patterns = None,
         progress: bool = False, **then_kwargs) -> Dict[str, Tensor]:
    """DARE (Yu et al., 2024): drop task-vector entries at random, rescale, then merge.

    Semantics: τ̃t = mt ⊙ (θt − θ0) / (1 − p), mt ~ Bernoulli(1 − p) per entry; then
    θ = θ0 + scale · Σt τ̃t (then="task_arithmetic") or TIES on the τ̃t (then="ties").

    Masks are reproducible and do not depend on the order of experts or parameters: each
    (seed, parameter name, expert key) gets its own CPU torch.Generator, seeded with a blake2b
    hash of the three. The expert key is the name when experts is a mapping and the position
    when it is a sequence. With then="ties", TIES trims the rescaled vectors again to `density`
    (pass density=1.0 for sign election and disjoint mean only).

    Args:
        base, experts, include, exclude, progress: as in task_arithmetic.
        drop_rate: p, the probability of dropping each entry, in [0, 1). p = 0 gives the `then`
            method exactly.
        seed: an int.
        then: "task_arithmetic" (kwargs: scale=0.3) or "ties" (kwargs: density=0.2, scale=1.0).
        then_kwargs: passed to the `then` method.

    Returns:
        A new state dict with the base's names, order, dtypes and devices.

    Raises:
        TypeError: as in task_arithmetic; a seed that is not an int; a keyword that the `then`
            method does not take.
        ValueError: as in task_arithmetic and ties; drop_rate not in [0, 1); an unknown `then`.
    """
    fn = "dare"
    drop_rate = _real(drop_rate, "drop_rate", fn)
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"{fn}: drop_rate must be in [0, 1), got {drop_rate!r}")
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise TypeError(f"{fn}: seed must be an int, got {seed!r} ({type(seed).__name__})")
    seed = int(seed)
    if then not in _DARE_THEN:
        raise ValueError(f"{fn}: then must be one of {sorted(_DARE_THEN)}, got {then!r}")
    unknown = sorted(set(then_kwargs) - set(_DARE_THEN[then]))
    if unknown:
        raise TypeError(f"{fn}: then={then!r} takes {sorted(_DARE_THEN[then])}, got unexpected "
                        f"{unknown}")
    kwargs = {**_DARE_THEN[then], **then_kwargs}
    scale = _real(kwargs["scale"], "scale", fn)
    combine = (_ties_combine(_density(kwargs["density"], fn), scale) if then == "ties"
               else _sum_combine(scale))
    return _merge_task_vectors(fn, base, experts, include, exclude, progress, combine,
                               lambda name, key, tau: _dare_drop(tau, name, key, seed, drop_rate))


def average(experts: Experts, base: Optional[StateSource] = None, *, include: Patterns = None,
            exclude: Patterns = None, progress: bool = False) -> Dict[str, Tensor]:
    """Weight averaging of the experts.

    Semantics: θ = (1/T) · Σt θt, per selected floating parameter.

    The base is optional. Given, it is the reference: the experts must match its names, shapes
    and dtypes, and non-selected and non-floating tensors, the output dtypes and the devices come
    from it. Without it, the first expert (in the order of `experts`) plays that role.

    Args:
        experts: θ1..θT, a sequence of state dicts or paths, or a mapping name -> one of those.
        base: θ0 (optional), a state dict or a path to a .safetensors file.
        include, exclude, progress: as in task_arithmetic.

    Returns:
        A new state dict with the reference's names, order, dtypes and devices.

    Raises:
        TypeError, ValueError: as in task_arithmetic.
    """
    fn = "average"
    with ExitStack() as stack:
        named = _open_experts(experts, fn, stack)
        ref = _Source(base, "base", fn, stack) if base is not None else named[0][2]

        def merge(name: str, b: Tensor) -> Tensor:
            total = torch.zeros_like(b)
            for _, e in _expert_tensors(name, b, named, fn):
                total += e
            return total / len(named)

        return _merge_per_tensor(fn, ref, named, include, exclude, progress, merge)
