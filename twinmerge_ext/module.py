"""TwinMergedModule: any nn.Module served as Twin-Merging's input-adaptive model (METHOD.md §1, §3).

The wrapped module holds the shared expert θs. Each batch row b is served by
θ(w_b) = θs + Σt w_b,t·v̂t, exactly, in one of three ways:

- factored: mixing in activation space, nothing materialized. A Linear layer computes
  y = x Wsᵀ + bs + ((x V_cat) ⊙ s(w_b)) U_catᵀ + Σt w_b,t Δb_t (`lowrank_mix_linear`);
  embeddings gather rows of U_cat; LayerNorm weights and biases mix per row. One pass for the
  whole batch, no host synchronization, differentiable in the weights, torch.compile-able.
- materialize: θ(w) merged into buffers allocated once (`lowrank_merge_`, `dense_merge_`), the
  module run on the rows that share w (one sub-batch per distinct weight row). `merged(w)` keeps
  one merge for the calls of a block.
- group: the paper's group-wise variant: rows binned by the argmax of their weights, KMeans on
  the weights inside each bin (n_groups groups in all), one merge per group with the group's mean
  weights. Approximate by design; exact when n_groups ≥ the number of distinct rows.
- auto: factored or materialize per call, by the cost model of METHOD.md §3.

Layers the factored mode mixes itself: nn.Linear, nn.Embedding (no max_norm), nn.LayerNorm and
transformers' Conv1D. Any other module that owns twin parameters (an RMSNorm, a convolution)
mixes by merging its own parameters per batch row and running on that row: exact, slower.

Task heads (a twin built with `heads=`): the module that holds them runs every task's head and
each row keeps the output of its head task, by default the argmax of its weights (the router's
choice). Heads of different widths are padded on the last dimension with `head_pad_value`.
"""

from contextlib import contextmanager
from numbers import Integral, Real
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn

from twinmerge_ext.checkpoint import TwinCheckpoint
from twinmerge_ext.ops import _per_column, dense_merge_, lowrank_merge_, lowrank_mix_linear
from twinmerge_ext.router import TwinRouter, pooled_features

__all__ = ["TwinMergedModule"]

MODES = ("auto", "factored", "materialize", "group")

# Machine balance used by mode="auto" for CUDA: a materialized merge of an m×n matrix is
# memory-bound below K ≈ 500 (METHOD.md §3), so it costs about 3·m·n·elsize bytes, counted as
# FLOPs at this many FLOP/byte (H100: ~990 TFLOP/s bf16 / 3.35 TB/s ≈ 300).
_CUDA_FLOP_PER_BYTE = 300.0


class _Routing:
    """Per-call state read by the patched layers. Plain mode (θs, the module's own forward)
    when row_weights and head_tasks are None."""

    __slots__ = ("row_weights", "head_tasks", "reentry", "T")

    def __init__(self, T: int):
        self.T = T
        self.row_weights: Optional[Tensor] = None   # [B, T]: factored mixing is on
        self.head_tasks: Optional[Tensor] = None    # [B] long: which task's head each row uses
        self.reentry = False                        # inside functional_call of a patched layer


def _error(layer, msg: str) -> ValueError:
    return ValueError(f"TwinMergedModule: layer {layer._twin_name!r} "
                      f"({type(layer).__bases__[1].__name__}): {msg}")


def _check_batch(layer, x: Tensor, B: int, allow_one: bool = False) -> None:
    ok = isinstance(x, Tensor) and x.dim() >= 1 and (x.shape[0] == B
                                                      or (allow_one and x.shape[0] == 1))
    if not ok:
        raise _error(layer, f"mixing per row needs the batch (B={B}) as the first dimension of "
                            f"the layer's input, got {list(getattr(x, 'shape', []))}")


def _row_view(v: Tensor, B: int, ndim: int, trailing: Sequence[int]) -> Tensor:
    """[B, *trailing] -> [B, 1, ..., 1, *trailing] broadcastable against an ndim-D tensor."""
    return v.reshape((B,) + (1,) * (ndim - 1 - len(trailing)) + tuple(trailing))


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mix_dense(rw: Tensor, deltas: Tensor) -> Tensor:
    """Σt rw[b, t]·deltas[t] per row, in fp32 (fp64 for fp64): [B, T] × [T, *shape] -> [B, *shape]."""
    T, f = deltas.shape[0], _opmath(deltas.dtype)
    return (rw.to(f) @ deltas.reshape(T, -1).to(f)).reshape((rw.shape[0],) + deltas.shape[1:])


class _TwinLayer:
    """Mixin placed before a layer's class: plain forward unless the routing asks for more."""

    def forward(self, *args, **kwargs):
        ctx: _Routing = self._twin_ctx
        if ctx.reentry or (ctx.row_weights is None and not self._twin_is_head):
            return super().forward(*args, **kwargs)
        return self._twin_forward(ctx, *args, **kwargs)

    def _twin_plain(self, *args, **kwargs):
        """The layer's own forward (with θs, or whatever functional_call put in place)."""
        return super().forward(*args, **kwargs)

    def _twin_factors(self, attr: str):
        U = getattr(self, f"_twin_{attr}_U")
        return U, getattr(self, f"_twin_{attr}_S"), getattr(self, f"_twin_{attr}_V")

    def _twin_dense(self, attr: str) -> Optional[Tensor]:
        return getattr(self, f"_twin_{attr}_deltas", None)


class _TwinLinear(_TwinLayer):
    def _twin_as_linear(self):
        """(W [m, n], U_cat [m, K], S_cat, V_cat [n, K]) of y = x Wᵀ + b, the op's layout."""
        U, S, V = self._twin_factors("weight")
        return self.weight, U, S, V

    def _twin_forward(self, ctx, x):
        rw = ctx.row_weights
        B = rw.shape[0]
        _check_batch(self, x, B)
        db = self._twin_dense("bias")
        lowrank = "weight" in self._twin_lowrank
        if not lowrank:
            y = self._twin_plain(x)
        else:
            W, U, S, V = self._twin_as_linear()
            # With a mixed bias, the shared bias joins the per-row one ([B, m], small) below:
            # one pass over y adds both, where the op's bias (copied into y first) and then the
            # per-row delta took two.
            y = lowrank_mix_linear(x, W, self.bias if db is None else None, U, S, V,
                                   self._twin_ranks["weight"], rw)
        if db is None:
            return y
        rb = _mix_dense(rw, db)
        if lowrank and self.bias is not None:
            rb = rb + self.bias.to(rb.dtype)
        rb = _row_view(rb, B, y.dim(), db.shape[1:]).to(y.dtype)
        # In place when nothing is recorded for backward (autograd forbids modifying a custom
        # op's output in place): serving spares a y-sized allocation per layer.
        return y + rb if y.requires_grad else y.add_(rb)


class _TwinConv1D(_TwinLinear):
    """transformers' Conv1D: y = x W + b with W [n_in, n_out], a transposed Linear."""

    def _twin_as_linear(self):
        # W = U diag(s) Vᵀ with U [n_in, K], V [n_out, K]: as a Linear the factors swap roles.
        U, S, V = self._twin_factors("weight")
        return self.weight.T, V, S, U


class _TwinEmbedding(_TwinLayer):
    def _twin_forward(self, ctx, ids):
        rw = ctx.row_weights
        B = rw.shape[0]
        # Position ids are often [1, L], broadcast over the batch later: the output becomes [B, ...].
        _check_batch(self, ids, B, allow_one=True)
        y = self._twin_plain(ids)
        U, S, V = self._twin_factors("weight")
        f = _opmath(U.dtype)
        s = _per_column(rw.to(f), self._twin_ranks["weight"]) * S.to(f)              # [B, K]
        h = F.embedding(ids, U).to(f)                                                 # [b, ..., K]
        delta = (h * _row_view(s, B, h.dim(), s.shape[1:])) @ V.to(f).T
        return (y + delta).to(y.dtype)


class _TwinLayerNorm(_TwinLayer):
    def _twin_forward(self, ctx, x):
        rw = ctx.row_weights
        B = rw.shape[0]
        _check_batch(self, x, B)
        shape = tuple(self.normalized_shape)
        y = F.layer_norm(x, shape, None, None, self.eps)
        f = _opmath(y.dtype)
        v = {}
        for attr in ("weight", "bias"):
            p = getattr(self, attr)
            if p is None:
                continue
            d = self._twin_dense(attr)
            v[attr] = _row_view((p.to(f) + _mix_dense(rw, d).to(f)) if d is not None
                                else p.to(f).expand((B,) + shape), B, y.dim(), shape)
        y = y.to(f)
        if len(v) == 2:  # one pass: bias + y·weight
            y = torch.addcmul(v["bias"], y, v["weight"])
        elif "weight" in v:
            y = y * v["weight"]
        elif "bias" in v:
            y = y + v["bias"]
        return y.to(x.dtype)


def _map_rows(fn: Callable[[Tensor], Tensor], B: int, tree):
    """Applies fn to every tensor leaf whose first dimension is B (the batched ones)."""
    return pytree.tree_map(lambda v: fn(v) if isinstance(v, Tensor) and v.dim() >= 1
                           and v.shape[0] == B else v, tree)


class _TwinFallback(_TwinLayer):
    """Any other layer: its own parameters merged per batch row, the row run alone (or the whole
    batch once when every row has the same weights)."""

    def _twin_forward(self, ctx, *args, **kwargs):
        rw = ctx.row_weights
        B = rw.shape[0]
        rows = [slice(0, B)] if self._twin_same_rows(rw) else [slice(b, b + 1) for b in range(B)]
        outs = []
        for sl in rows:
            params = {attr: self._twin_merged(attr, rw[sl.start]) for attr in self._twin_attrs}
            a, k = _map_rows(lambda v: v[sl], B, (args, kwargs))
            ctx.reentry = True
            try:
                outs.append(torch.func.functional_call(self, params, a, k))
            finally:
                ctx.reentry = False
        if len(outs) == 1:
            return outs[0]
        return _concat_outputs(outs, [1] * B, f"layer {self._twin_name!r}")

    @staticmethod
    def _twin_same_rows(rw: Tensor) -> bool:
        # Rows given as one [T] vector expanded to [B, T] have stride 0: no need to compare.
        return rw.shape[0] == 1 or rw.stride(0) == 0

    def _twin_merged(self, attr: str, w: Tensor) -> Tensor:
        """θs + Σt w[t]·v̂t for one parameter, differentiable, accumulated in fp32."""
        p = getattr(self, attr)
        f = _opmath(p.dtype)
        if attr in self._twin_lowrank:
            U, S, V = self._twin_factors(attr)
            s = _per_column(w.to(f), self._twin_ranks[attr]) * S.to(f)
            return (p.to(f) + (U.to(f) * s) @ V.to(f).T).to(p.dtype)
        d = self._twin_dense(attr)
        return (p.to(f) + torch.tensordot(w.to(f), d.to(f), 1)).to(p.dtype)


class _TwinHead(_TwinLayer):
    """A task head: every task's head runs on the rows, each row keeps its head task's output."""

    def _twin_forward(self, ctx, *args, **kwargs):
        if ctx.head_tasks is None:
            return self._twin_plain(*args, **kwargs)
        outs = []
        ctx.reentry = True
        try:
            for t in range(ctx.T):
                params = {n: getattr(self, f"_twin_head_{t}_{i}")
                          for i, n in enumerate(self._twin_head_names)}
                outs.append(torch.func.functional_call(self, params, args, kwargs))
        finally:
            ctx.reentry = False
        bad = [type(o).__name__ for o in outs if not isinstance(o, Tensor)]
        if bad:
            raise _error(self, f"a task head must return one tensor, got {bad[0]}")
        width = max(o.shape[-1] for o in outs)
        shapes = {tuple(o.shape[:-1]) for o in outs}
        if len(shapes) != 1:
            raise _error(self, f"task heads disagree on their output shape except the last "
                               f"dimension: {sorted(shapes)}")
        outs = [F.pad(o, (0, width - o.shape[-1]), value=self._twin_head_pad)
                if o.shape[-1] < width else o for o in outs]
        stacked = torch.stack(outs)                                    # [T, B, ..., width]
        B = stacked.shape[1]
        heads = ctx.head_tasks
        _check_batch(self, stacked[0], heads.shape[0])
        rows = torch.arange(B, device=stacked.device)
        if heads.dim() == 1:
            return stacked[heads, rows]
        # Several heads per row: [B, H, ..., width].
        return stacked[heads.T, rows].movedim(0, 1)


_KIND_MIXINS = {"linear": _TwinLinear, "conv1d": _TwinConv1D, "embedding": _TwinEmbedding,
                "layernorm": _TwinLayerNorm, "fallback": _TwinFallback, "head": _TwinHead}
_PATCHED_CLASSES: Dict[Tuple[str, type], type] = {}


def _patched_class(kind: str, cls: type) -> type:
    key = (kind, cls)
    if key not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[key] = type(f"Twin{cls.__name__}", (_KIND_MIXINS[kind], cls),
                                     {"__module__": __name__})
    return _PATCHED_CLASSES[key]


def _conv1d_class() -> Optional[type]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _kind(layer: nn.Module, attrs: Dict[str, str]) -> str:
    """The factored implementation for a layer owning twin parameters attr -> "lowrank"/"dense"."""
    lowrank = {a for a, k in attrs.items() if k == "lowrank"}
    dense = {a for a, k in attrs.items() if k == "dense"}
    cls = type(layer)
    conv1d = _conv1d_class()
    if cls is nn.Linear and lowrank <= {"weight"} and dense <= {"bias"}:
        return "linear"
    if conv1d is not None and cls is conv1d and lowrank <= {"weight"} and dense <= {"bias"}:
        return "conv1d"
    if cls is nn.Embedding and lowrank == {"weight"} and not dense and layer.max_norm is None:
        return "embedding"
    if cls is nn.LayerNorm and not lowrank and dense <= {"weight", "bias"}:
        return "layernorm"
    return "fallback"


def _register(layer: nn.Module, name: str, value: Tensor) -> None:
    # Non-persistent: moved by .to(), invisible to state_dict().
    layer.register_buffer(name, value, persistent=False)


def _concat_outputs(outs: List[Any], counts: List[int], what: str):
    """Concatenates sub-batch outputs (same structure) along the batch dimension."""
    flat = [pytree.tree_flatten(o) for o in outs]
    spec = flat[0][1]
    for leaves, s in flat[1:]:
        if s != spec:
            raise ValueError(f"TwinMergedModule: {what}: sub-batches returned outputs of "
                             f"different structure ({spec} vs {s})")
    merged = []
    for i in range(len(flat[0][0])):
        leaves = [f[0][i] for f in flat]
        if all(isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == c
               for v, c in zip(leaves, counts)):
            merged.append(torch.cat(leaves))
        elif all(v is None for v in leaves):
            merged.append(None)
        else:
            kinds = sorted({type(v).__name__ if not isinstance(v, Tensor) else
                            f"Tensor{list(v.shape)}" for v in leaves})
            raise ValueError(f"TwinMergedModule: {what}: output leaf {i} ({kinds}) is not "
                             f"batched along dimension 0, so it cannot be reassembled from "
                             f"sub-batches; use mode='factored' (one pass) or drop that output "
                             f"(e.g. use_cache=False)")
    return pytree.tree_unflatten(merged, spec)


def _describe_tensor(v) -> str:
    return f"{v.dtype} {list(v.shape)}" if isinstance(v, Tensor) else repr(v)


def _first_batched(args, kwargs) -> Optional[Tensor]:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, Tensor) and v.dim() >= 1:
            return v
    return None


class TwinMergedModule(nn.Module):
    """A module serving Twin-Merging: every batch row runs θs + Σt w[b, t]·v̂t.

    Semantics: wrapped(x, mix_weights=w)[b] = module_{θ(w[b])}(x[b]) with
        θ(w) = θs + Σt w[t]·Ut diag(St) Vtᵀ (matrices), θs + Σt w[t]·Δt (dense parameters),
    and the head of task head_tasks[b] (default argmax w[b]) when the twin has task heads.

    Args:
        module: the architecture of the experts (e.g. a transformers model built from their
            config). Its tensors named in twin.shared are overwritten with θs; from then on it
            holds the shared expert, and `module.state_dict()` is θs. Its layers are patched in
            place (their class is swapped for a subclass; `unwrap()` restores them).
        twin: the TwinCheckpoint (its tensors are copied to the module's devices and dtypes).
        router: the TwinRouter for calls without mix_weights (default: twin.router).
        mode: "auto", "factored", "materialize" or "group" (module docstring).
        filter_fn: (layer, qualified name) -> bool, which layers mix; the others serve θs.
        n_groups: groups of mode="group" (the paper: 20); at least one per argmax bin.
        temperature, top_k: of router.weights.
        router_features: (module, args, kwargs) -> [B, d] features for the router; default:
            `pooled_features` of the module (θs) with the router's layer and pooling, from the
            input_ids and attention_mask keyword arguments.
        head_pad_value: fills the last dimension of a narrower task head's output.
        seed: of KMeans in mode="group".

    Call: wrapped(*args, mix_weights=None, head_tasks=None, **kwargs) -> the module's output.
        mix_weights: [B, T] (row b gets its own model, B = the first dimension of the batched
            inputs), [T] (one model for the call), or None (the router computes [B, T] from a
            forward pass of θs: two passes, as in the paper).
        head_tasks: [B] task indices choosing each row's head (only for twins with heads), or
            [B, H] for H heads per row (the head's output gains a dimension: [B, H, ...], e.g.
            logits [B, H, width]; one body pass scores several head choices). Passing the true
            tasks is the protocol of the authors' evaluation and of standard
            merging benchmarks (METHOD.md §2): an oracle a deployed router does not have.
    Tensor inputs whose first dimension is B are the batched ones (sliced per sub-batch in the
    materialize and group modes); outputs are returned in input order.

    `with wrapped.merged(w):` merges [T] weights once for every call in the block that passes no
    mix_weights; `groups(weights)` is mode="group"'s plan, for servers that batch groups
    themselves.

    One call at a time per wrapper: the routing state of a call lives on the wrapper (use one
    wrapper per thread). After a call, `last_call` holds {"mode", "weights" [B, T], "head_tasks", and for auto the
    cost estimates, for group the group of each row}.

    Errors: ValueError/TypeError naming the argument and its value (bad mode, a twin that does not
    fit the module, weights of the wrong shape or with NaN, a layer whose input is not batch-first
    in the factored mode).
    """

    def __init__(self, module: nn.Module, twin: TwinCheckpoint, router: Optional[TwinRouter] = None,
                 mode: str = "auto", filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                 n_groups: int = 20, temperature: float = 1.0, top_k: Optional[int] = None,
                 router_features: Optional[Callable[[nn.Module, tuple, dict], Tensor]] = None,
                 head_pad_value: float = float("-inf"), seed: int = 0):
        super().__init__()
        fn = "TwinMergedModule"
        if not isinstance(module, nn.Module):
            raise TypeError(f"{fn}: module must be an nn.Module, got {type(module).__name__}")
        if not isinstance(twin, TwinCheckpoint):
            raise TypeError(f"{fn}: twin must be a TwinCheckpoint, got {type(twin).__name__}")
        if mode not in MODES:
            raise ValueError(f"{fn}: mode must be one of {list(MODES)}, got {mode!r}")
        if router is None:
            router = twin.router
        if router is not None:
            if not isinstance(router, TwinRouter):
                raise TypeError(f"{fn}: router must be a TwinRouter or None, got "
                                f"{type(router).__name__}")
            if list(router.tasks) != twin.tasks:
                raise ValueError(f"{fn}: router.tasks must be the twin's tasks in order, "
                                 f"{twin.tasks}, got {list(router.tasks)}")
        if filter_fn is not None and not callable(filter_fn):
            raise TypeError(f"{fn}: filter_fn must be callable (layer, name) -> bool, got "
                            f"{type(filter_fn).__name__}")
        if router_features is not None and not callable(router_features):
            raise TypeError(f"{fn}: router_features must be callable, got "
                            f"{type(router_features).__name__}")
        if isinstance(n_groups, bool) or not isinstance(n_groups, Integral) or n_groups < 1:
            raise ValueError(f"{fn}: n_groups must be an int >= 1, got {n_groups!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, Real) or \
                not temperature > 0:
            raise ValueError(f"{fn}: temperature must be a number > 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral)
                                  or not 1 <= top_k <= len(twin.tasks)):
            raise ValueError(f"{fn}: top_k must be None or an int in [1, {len(twin.tasks)}], "
                             f"got {top_k!r}")
        if any(isinstance(m, _TwinLayer) for m in module.modules()):
            raise ValueError(f"{fn}: module is already wrapped by a TwinMergedModule; unwrap() it "
                             f"first")

        self.module = module
        self.router = router
        self.mode = mode
        self.n_groups = int(n_groups)
        self.temperature = float(temperature)
        self.top_k = top_k
        self.router_features = router_features
        self.head_pad_value = float(head_pad_value)
        self.seed = seed
        self.tasks = twin.tasks
        self.last_call: Dict[str, Any] = {}
        self._ctx = _Routing(len(self.tasks))
        self._patched: List[Tuple[nn.Module, type]] = []
        # (name of a mixed tensor, its layer, attribute, "lowrank"/"dense"); canonical names only.
        self._mixed: List[Tuple[str, nn.Module, str, str]] = []
        self._load_shared(twin, fn)
        self._patch_layers(twin, filter_fn, fn)
        self._patch_heads(twin, fn)
        self._buffers_ready = False
        self._merge_buffers = nn.Module()
        self._pinned: Optional[Tensor] = None       # the weights of a merged() block
        self._buffers_hold: Optional[Tensor] = None  # the weights the buffers were merged with

    # --- construction ---------------------------------------------------------------------------

    def _load_shared(self, twin: TwinCheckpoint, fn: str) -> None:
        own = self.module.state_dict(keep_vars=True)
        unknown = [k for k in twin.shared if k not in own]
        if unknown:
            raise ValueError(f"{fn}: the twin has tensor {unknown[0]!r} that the module does not "
                             f"have" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1
                                        else "") + "; is it the experts' architecture?")
        head_names = set(next(iter(twin.heads.values()))) if twin.heads else set()
        missing = [k for k in own if k not in twin.shared and k not in head_names]
        if missing:
            raise ValueError(f"{fn}: the module has tensor {missing[0]!r} that the twin does not "
                             f"have" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                        else ""))
        for name, value in twin.shared.items():
            if tuple(own[name].shape) != tuple(value.shape):
                raise ValueError(f"{fn}: tensor {name!r} has shape {list(own[name].shape)} in "
                                 f"the module but {list(value.shape)} in the twin")
        with torch.no_grad():
            for name, value in twin.shared.items():
                own[name].copy_(value)

    def _patch(self, layer: nn.Module, kind: str, name: str) -> None:
        self._patched.append((layer, type(layer)))
        layer.__class__ = _patched_class(kind, type(layer))
        layer._twin_ctx = self._ctx
        layer._twin_name = name
        layer._twin_is_head = kind == "head"

    def _patch_layers(self, twin: TwinCheckpoint, filter_fn, fn: str) -> None:
        by_layer: Dict[str, Dict[str, str]] = {}
        canonical: List[Tuple[str, str, str]] = []
        seen = set()
        tensors = dict(self.module.named_parameters(remove_duplicate=False))
        tensors.update(self.module.named_buffers(remove_duplicate=False))
        for name in list(twin.lowrank) + list(twin.dense):
            path, _, attr = name.rpartition(".")
            by_layer.setdefault(path, {})[attr] = "lowrank" if name in twin.lowrank else "dense"
            # Tied tensors (GPT-2's lm_head and wte) mix under each name, but are merged once.
            if id(tensors[name]) not in seen:
                seen.add(id(tensors[name]))
                canonical.append((name, path, attr))
        chosen = set()
        for path, attrs in by_layer.items():
            layer = self.module.get_submodule(path)
            if filter_fn is not None and not filter_fn(layer, path):
                continue
            chosen.add(path)
            kind = _kind(layer, attrs)
            self._patch(layer, kind, path)
            layer._twin_lowrank = {a for a, k in attrs.items() if k == "lowrank"}
            layer._twin_attrs = list(attrs)
            layer._twin_ranks = {}
            for attr, k in attrs.items():
                p = getattr(layer, attr)
                full = f"{path}.{attr}" if path else attr
                if k == "lowrank":
                    lr = twin.lowrank[full]
                    for f, t in zip("USV", (lr.U_cat, lr.S_cat, lr.V_cat)):
                        _register(layer, f"_twin_{attr}_{f}", t.to(device=p.device, dtype=p.dtype))
                    layer._twin_ranks[attr] = list(lr.ranks)
                else:
                    _register(layer, f"_twin_{attr}_deltas",
                              twin.dense[full].to(device=p.device, dtype=p.dtype))
        for name, path, attr in canonical:
            if path in chosen:
                self._mixed.append((name, self.module.get_submodule(path), attr,
                                    "lowrank" if name in twin.lowrank else "dense"))

    def _patch_heads(self, twin: TwinCheckpoint, fn: str) -> None:
        # In __dict__, not as a submodule: it is already inside self.module.
        self.__dict__["_head_layer"] = None
        if not twin.heads:
            return
        names = list(next(iter(twin.heads.values())))
        parts = [n.split(".")[:-1] for n in names]
        prefix = []
        for level in zip(*parts):
            if len(set(level)) != 1:
                break
            prefix.append(level[0])
        path = ".".join(prefix)
        try:
            layer = self.module.get_submodule(path)
        except AttributeError as e:
            raise ValueError(f"{fn}: the twin's head tensors {names} are not in one submodule of "
                             f"the module: {e}") from e
        if path == "" or layer is self.module:
            raise ValueError(f"{fn}: the twin's head tensors {names} must sit in one submodule "
                             f"(e.g. 'classifier'), not across the model")
        if isinstance(layer, _TwinLayer) or any(isinstance(m, _TwinLayer) for m in layer.modules()):
            raise ValueError(f"{fn}: the head module {path!r} also holds mixed twin parameters")
        self._patch(layer, "head", path)
        rel = [n[len(path) + 1:] for n in names]
        layer._twin_head_names = rel
        layer._twin_head_pad = self.head_pad_value
        device = next(iter(layer.parameters()), torch.empty(0)).device
        for t, task in enumerate(self.tasks):
            for i, n in enumerate(names):
                _register(layer, f"_twin_head_{t}_{i}", twin.heads[task][n].to(device))
        self.__dict__["_head_layer"] = layer

    def unwrap(self) -> nn.Module:
        """Restores the module's layers (classes, no twin buffers) and returns it; it keeps θs."""
        for layer, cls in reversed(self._patched):
            for key in [k for k in layer._buffers if k.startswith("_twin_")]:
                del layer._buffers[key]
            for attr in [a for a in vars(layer) if a.startswith("_twin_")]:
                delattr(layer, attr)
            layer.__class__ = cls
        self._patched.clear()
        self._mixed.clear()
        return self.module

    # --- routing --------------------------------------------------------------------------------

    def route(self, *args, **kwargs) -> Tensor:
        """The router's mixing weights for a batch: softmax(router(features)/temperature) [B, T].

        Features come from a forward pass of θs (`router_features`, default pooled_features on
        input_ids/attention_mask). This is the first of the paper's two passes; call it yourself
        to time it separately, then pass the result as mix_weights.
        """
        fn = "TwinMergedModule.route"
        if self.router is None:
            raise ValueError(f"{fn}: no router: pass mix_weights, or give the wrapper a router "
                             f"(or a twin with one attached)")
        if self.router_features is not None:
            feats = self.router_features(self.module, args, kwargs)
        else:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if not isinstance(ids, Tensor):
                raise ValueError(f"{fn}: the default router features need input_ids (a [B, L] "
                                 f"tensor, first positional or keyword argument); pass "
                                 f"router_features= for other inputs")
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(ids)
            feats = pooled_features(self.module, ids, mask, layer=self.router.layer,
                                    pooling=self.router.pooling)
        with torch.no_grad():
            return self.router.weights(feats, self.temperature, self.top_k)

    def _check_weights(self, w, B: Optional[int], fn: str) -> Tensor:
        T = len(self.tasks)
        if not isinstance(w, Tensor) or not w.is_floating_point():
            raise TypeError(f"{fn}: mix_weights must be a floating tensor [B, T] or [T], got "
                            f"{w.dtype if isinstance(w, Tensor) else type(w).__name__}")
        if w.dim() == 1:
            if w.shape[0] != T:
                raise ValueError(f"{fn}: mix_weights must have shape [B, T={T}] or [T={T}], got "
                                 f"{list(w.shape)}")
            if B is None:
                raise ValueError(f"{fn}: no batched tensor input to take B from")
            return w.unsqueeze(0).expand(B, T)
        if w.dim() != 2 or w.shape[1] != T:
            raise ValueError(f"{fn}: mix_weights must have shape [B, T={T}] or [T={T}], got "
                             f"{list(w.shape)}")
        if B is not None and w.shape[0] != B:
            raise ValueError(f"{fn}: mix_weights has {w.shape[0]} rows but the batch has B={B} "
                             f"(the first dimension of the first tensor input)")
        return w

    def _check_head_tasks(self, head_tasks, B: int, device, fn: str) -> Tensor:
        if self._head_layer is None:
            raise ValueError(f"{fn}: head_tasks given, but the twin has no task heads")
        if not isinstance(head_tasks, Tensor) or head_tasks.dtype not in (
                torch.int64, torch.int32) or head_tasks.dim() not in (1, 2) or \
                head_tasks.shape[0] != B:
            got = (f"{head_tasks.dtype} {list(head_tasks.shape)}"
                   if isinstance(head_tasks, Tensor) else repr(head_tasks))
            raise ValueError(f"{fn}: head_tasks must be an int tensor of shape [B={B}] or "
                             f"[B={B}, H], got {got}")
        if not torch.compiler.is_compiling():
            bad = ((head_tasks < 0) | (head_tasks >= len(self.tasks))).nonzero().flatten()
            if bad.numel():
                i = int(bad[0])
                raise ValueError(f"{fn}: head_tasks must be in [0, {len(self.tasks)}), got "
                                 f"{head_tasks[i].tolist()} at row {i}")
        return head_tasks.to(device=device, dtype=torch.long)

    # --- call -----------------------------------------------------------------------------------

    def forward(self, *args, mix_weights: Optional[Tensor] = None,
                head_tasks: Optional[Tensor] = None, **kwargs):
        fn = "TwinMergedModule"
        first = _first_batched(args, kwargs)
        B = first.shape[0] if first is not None else None
        pinned = mix_weights is None and self._pinned is not None
        if pinned:
            mix_weights = self._pinned
        elif mix_weights is None:
            mix_weights = self.route(*args, **kwargs)
        one_vector = isinstance(mix_weights, Tensor) and mix_weights.dim() == 1
        rw = self._check_weights(mix_weights, B, fn)
        B = rw.shape[0]
        if head_tasks is not None:
            head_tasks = self._check_head_tasks(head_tasks, B, rw.device, fn)
        elif self._head_layer is not None:
            head_tasks = rw.argmax(-1)

        mode = "materialize" if pinned else self.mode
        plan: Dict[str, Any] = {"merged_block": True} if pinned else {}
        if mode == "auto":
            mode, plan = self._plan(rw, one_vector, first)
        elif mode == "group" and one_vector:
            mode = "materialize"
        self.last_call = {"mode": mode, "weights": rw, "head_tasks": head_tasks, **plan}
        if mode == "factored":
            return self._run(args, kwargs, rw, head_tasks)
        return self._run_merged(args, kwargs, rw, head_tasks, one_vector, group=mode == "group",
                                pinned=pinned)

    def _run(self, args, kwargs, rw: Optional[Tensor], head_tasks: Optional[Tensor]):
        ctx = self._ctx
        ctx.row_weights, ctx.head_tasks = rw, head_tasks
        try:
            return self.module(*args, **kwargs)
        finally:
            ctx.row_weights = ctx.head_tasks = None

    # --- materialize / group ----------------------------------------------------------------------

    def _merge_targets(self) -> Dict[str, Tensor]:
        """One buffer per mixed tensor, allocated on first use and reused by every call."""
        if not self._buffers_ready:
            with torch.inference_mode(False), torch.no_grad():
                for i, (name, layer, attr, _) in enumerate(self._mixed):
                    p = getattr(layer, attr)
                    _register(self._merge_buffers, f"b{i}",
                              torch.empty_like(p, memory_format=torch.contiguous_format))
            self._buffers_ready = True
        return {name: getattr(self._merge_buffers, f"b{i}")
                for i, (name, _, _, _) in enumerate(self._mixed)}

    def _merge_into(self, buffers: Dict[str, Tensor], w: Tensor) -> Dict[str, Tensor]:
        self._buffers_hold = w  # which weights the buffers hold (by identity), for merged()
        with torch.no_grad():
            for name, layer, attr, kind in self._mixed:
                p, buf = getattr(layer, attr), buffers[name]
                wd = w.to(p.device)
                if kind == "lowrank":
                    U, S, V = layer._twin_factors(attr)
                    lowrank_merge_(buf, p, U, S, V, layer._twin_ranks[attr], wd)
                else:
                    dense_merge_(buf, p, layer._twin_dense(attr), wd)
        return buffers

    @contextmanager
    def merged(self, weights: Tensor):
        """One merge for several calls with the same weights (a group's rows served in several
        length-bucketed batches, a request's generation steps).

        Semantics: on entry θ(weights) is merged into the wrapper's buffers; inside the block a
        call without mix_weights serves these weights on every row (materialize mode, whatever
        `mode` is) and does not merge again. A call with mix_weights runs as usual; if it
        merges (materialize, group), the block's weights are merged again at its next call.
        The block must not change θs or the twin's tensors: what was merged is what is served.
        Shape: weights [T]. Blocks do not nest.
        Errors: ValueError for weights not of shape [T], with NaN/Inf, or a nested block.
        """
        fn = "TwinMergedModule.merged"
        if self._pinned is not None:
            raise ValueError(f"{fn}: already inside a merged() block; blocks do not nest")
        T = len(self.tasks)
        if not isinstance(weights, Tensor) or not weights.is_floating_point() or \
                weights.shape != (T,):
            raise ValueError(f"{fn}: weights must be a floating tensor of shape [T={T}], got "
                             f"{_describe_tensor(weights)}")
        if not torch.isfinite(weights).all():
            raise ValueError(f"{fn}: weights has NaN/Inf entries: {weights.tolist()}")
        pinned = weights.detach().clone()  # its identity marks the block's merge
        self._merge_into(self._merge_targets(), pinned)
        self._pinned = pinned
        try:
            yield self
        finally:
            self._pinned = None

    def _run_merged(self, args, kwargs, rw: Tensor, head_tasks: Optional[Tensor],
                    one_vector: bool, group: bool, pinned: bool = False):
        fn = "TwinMergedModule"
        if not torch.isfinite(rw).all():
            raise ValueError(f"{fn}: mix_weights has NaN/Inf entries")
        B = rw.shape[0]
        if one_vector:
            groups = [(None, self._pinned if pinned else rw[0])]
        else:
            if group:
                member, centers = self.groups(rw)
                self.last_call["groups"] = member
            else:
                centers, member = torch.unique(rw, dim=0, return_inverse=True)
            groups = [((member == g).nonzero().flatten(), centers[g])
                      for g in range(centers.shape[0])]
            groups = [(idx, c) for idx, c in groups if idx.numel()]
        buffers = self._merge_targets()
        outs, counts, order = [], [], []
        for idx, w in groups:
            if idx is not None and idx.numel() == B:
                idx = None  # one group holds every row: no slicing
            if idx is None:
                a, k, h = args, kwargs, head_tasks
            else:
                a, k = _map_rows(lambda v: v[idx.to(v.device)], B, (args, kwargs))
                h = head_tasks[idx.to(head_tasks.device)] if head_tasks is not None else None
            if pinned and self._buffers_hold is w:
                params = buffers  # the block's merge, still in the buffers
            else:
                params = self._merge_into(buffers, w)
            ctx = self._ctx
            ctx.head_tasks = h
            try:
                outs.append(torch.func.functional_call(self.module, params, a, k,
                                                       tie_weights=True, strict=False))
            finally:
                ctx.head_tasks = None
            counts.append(B if idx is None else idx.numel())
            order.append(idx)
        if len(outs) == 1:
            return outs[0]
        out = _concat_outputs(outs, counts, "mode " + ("'group'" if group else "'materialize'"))
        perm = torch.cat(order)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(B, device=perm.device)
        return _map_rows(lambda v: v[inverse.to(v.device)], B, out)

    def groups(self, weights: Tensor, n_groups: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """The groups of mode="group": the paper's group-wise variant, as a plan a server can
        run itself (e.g. each group's rows in several length-bucketed batches inside one
        `merged(centers[g])` block: one merge per group).

        Semantics: rows binned by the argmax of their weights, KMeans on the weights inside each
        bin, n_groups groups in all (default: the wrapper's; at least one per bin; a bin with no
        more distinct rows than its share keeps each distinct row as its own group, exactly).
        Shape: weights [B, T] -> (group of each row [B] int64, group mean weights [G, T]).
        Deterministic for the wrapper's seed. Errors: ValueError for weights that are not a
        floating [B, T] tensor, have NaN/Inf, or n_groups < 1.
        """
        fn = "TwinMergedModule.groups"
        T = len(self.tasks)
        if not isinstance(weights, Tensor) or not weights.is_floating_point() or \
                weights.dim() != 2 or weights.shape[1] != T or weights.shape[0] == 0:
            raise ValueError(f"{fn}: weights must be a floating tensor [B, T={T}] with B >= 1, "
                             f"got {_describe_tensor(weights)}")
        if not torch.isfinite(weights).all():
            raise ValueError(f"{fn}: weights has NaN/Inf entries")
        if n_groups is None:
            n_groups = self.n_groups
        elif isinstance(n_groups, bool) or not isinstance(n_groups, Integral) or n_groups < 1:
            raise ValueError(f"{fn}: n_groups must be None or an int >= 1, got {n_groups!r}")
        w = weights.detach().double().cpu()
        bins = w.argmax(-1)
        uniques = {}
        for t in bins.unique().tolist():
            rows = (bins == t).nonzero().flatten()
            u, inv = torch.unique(w[rows], dim=0, return_inverse=True)
            uniques[t] = (rows, u, inv)
        share = {t: 1 for t in uniques}
        spare = n_groups - len(uniques)
        while spare > 0:
            # D'Hondt: the next group goes to the bin with the most distinct rows per group.
            open_bins = [t for t in uniques if share[t] < uniques[t][1].shape[0]]
            if not open_bins:
                break
            t = max(open_bins, key=lambda b: (uniques[b][1].shape[0] / share[b], -b))
            share[t] += 1
            spare -= 1
        member = torch.empty(w.shape[0], dtype=torch.long)
        centers = []
        for t, (rows, u, inv) in uniques.items():
            k = share[t]
            if k >= u.shape[0]:
                labels = torch.arange(u.shape[0])
            else:
                labels = torch.as_tensor(self._kmeans(u, inv, k), dtype=torch.long)
            for g in range(int(labels.max()) + 1):
                in_g = labels[inv] == g
                if in_g.any():
                    member[rows[in_g]] = len(centers)
                    centers.append(w[rows[in_g]].mean(0))
        return member.to(weights.device), torch.stack(centers).to(device=weights.device,
                                                                  dtype=weights.dtype)

    def _kmeans(self, u: Tensor, inv: Tensor, k: int):
        try:
            from sklearn.cluster import KMeans
        except ImportError as e:
            raise ImportError("TwinMergedModule: mode='group' needs scikit-learn for KMeans "
                              "(pip install scikit-learn)") from e
        counts = torch.bincount(inv, minlength=u.shape[0]).double().numpy()
        km = KMeans(n_clusters=k, n_init=4, random_state=self.seed)
        return km.fit_predict(u.numpy(), sample_weight=counts)

    # --- auto -----------------------------------------------------------------------------------

    def _plan(self, rw: Tensor, one_vector: bool, first: Optional[Tensor]):
        """METHOD.md §3: factored costs 2K(m+n) extra FLOPs per token and matrix; materializing
        costs one merge per distinct weight row (2mnK FLOPs, or on CUDA at least the memory
        traffic of reading Ws and writing W(w), whichever is larger)."""
        distinct = 1 if one_vector else int(torch.unique(rw, dim=0).shape[0])
        if first is None:
            tokens = rw.shape[0]
        elif first.is_floating_point():
            tokens = first.numel() // max(1, first.shape[-1])
        else:
            tokens = first.numel()
        factored = materialize = 0.0
        B = rw.shape[0]
        for _, layer, attr, kind in self._mixed:
            p = getattr(layer, attr)
            if kind == "lowrank":
                m, n = p.shape
                K = sum(layer._twin_ranks[attr])
                merge = 2.0 * m * n * K
                if p.is_cuda:
                    merge = max(merge, 3.0 * m * n * p.element_size() * _CUDA_FLOP_PER_BYTE)
                extra = 2.0 * K * (m + n) * tokens
            else:
                merge = 2.0 * p.numel() * len(self.tasks)
                extra = 2.0 * p.numel() * len(self.tasks) * B
            if isinstance(layer, _TwinFallback):
                extra = merge * (1 if one_vector else B)
            factored += extra
            materialize += merge * distinct
        mode = "materialize" if materialize < factored else "factored"
        return mode, {"distinct_rows": distinct, "tokens": tokens,
                      "factored_flops": factored, "materialize_flops": materialize}

    def extra_repr(self) -> str:
        kinds: Dict[str, int] = {}
        for layer, _ in self._patched:
            k = type(layer).__mro__[1].__name__.removeprefix("_Twin").lower()
            kinds[k] = kinds.get(k, 0) + 1
        return f"mode={self.mode!r}, tasks={self.tasks}, layers={kinds}"
