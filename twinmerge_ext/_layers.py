"""The layers a TwinMergedModule patches, and the per-thread state they read.

The wrapper swaps the class of every module that owns a twin tensor for a subclass with one of
these mixins in front of its own class (`unwrap()` swaps it back):

- mixing layers (`_TwinLinear`, `_TwinConv1D`, `_TwinEmbedding`, `_TwinLayerNorm`,
  `_TwinFallback`) compute their own per-row mix when a factored call is under way;
- the task head (`_TwinHead`) runs every task's head and keeps each row's;
- `_TwinParams` alone patches the submodules of a head, so that their tensors can be served.

Nothing here writes to a module during a call. What a call needs (its mixing weights, its head
tasks, the tensors to serve instead of a module's own) lives in `_Routing`, a threading.local:
two threads calling one wrapper each see only their own. Served tensors reach the layers through
`__getattr__` (a module's parameters and buffers are not in its `__dict__`, so every read of them
by name goes there), never by swapping them into the module as torch.func.functional_call
does, which two threads would undo for each other.

In a factored call a mixed tensor read by code outside its layer (a tied output projection
written as F.linear(h, emb.weight), a fused fast path) is handed out as a `_ForeignRead`: its
metadata is θs's, and any computation with it raises, since each row needs its own tensor and
only the layer's forward applies them.
"""

import copy
import re
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn

from twinmerge_ext import _tp
from twinmerge_ext.ops import _per_column, _per_expert, lowrank_mix_linear

# {module: {attribute: tensor}}: what a call serves instead of a module's own tensors.
Overrides = Dict[nn.Module, Dict[str, Tensor]]


class _Routing(threading.local):
    """What the patched layers of one wrapper read during a call, per thread.

    Plain mode (θs, every layer's own forward) when row_weights, head_tasks and overrides are
    None. threading.local runs __init__ again, with the same T, in every thread that touches it.
    A call sets and clears it without returning to an event loop in between, so a thread is
    fine-grained enough here (merged() blocks, which span awaits, keep theirs in a ContextVar).
    """

    def __init__(self, T: int):
        self.T = T
        self.row_weights: Optional[Tensor] = None   # [B, T]: factored mixing is on
        self.head_tasks: Optional[Tensor] = None    # [B] or [B, H] long: each row's head task
        self.overrides: Optional[Overrides] = None  # tensors served instead of the modules' own
        self.reentry = False        # inside a fallback row or a head: patched layers run plain
        self.current: Optional[nn.Module] = None    # the layer whose _twin_forward runs
        self.rows: Optional["_Rows"] = None         # a generate() call: rows expand in the model
        self.energy: Optional["_EnergyProbe"] = None  # a subspace_energies() pass of θs
        self.prefix: Optional[Any] = None  # routing from the first layers (`_prefix.Prefix`)

    def __reduce__(self):  # a copied wrapper gets fresh state (thread-locals cannot be copied)
        return (_Routing, (self.T,))

    def enter(self) -> tuple:
        """A call of the wrapper begins on this thread: the state of any call it runs inside (a
        logits processor calling the wrapper during generate, a router pass) is put aside, and
        the call starts plain. Returns what `leave` restores."""
        saved = (self.row_weights, self.head_tasks, self.overrides, self.reentry, self.current,
                 self.rows, self.energy, self.prefix)
        self.row_weights = self.head_tasks = self.overrides = self.current = None
        self.rows = self.energy = self.prefix = None
        self.reentry = False
        return saved

    def leave(self, saved: tuple) -> None:
        (self.row_weights, self.head_tasks, self.overrides, self.reentry, self.current,
         self.rows, self.energy, self.prefix) = saved


class _Rows:
    """A generate() call's weights and head tasks per request, fitted to the rows a layer sees.

    transformers' generate expands each request's row into k consecutive rows (beams, returned
    sequences: `repeat_interleave`, k = max(num_beams, num_return_sequences)), and beam search
    only ever reorders rows within a request's k. So a layer whose input has n = k·B rows serves
    row i with request i // k's weights, whichever module called it (a decoder, an encoder of B
    rows, a model's own sub-calls). An input of one row (position ids [1, L], broadcast by the
    layer) keeps the current fit.
    """

    def __init__(self, weights: Optional[Tensor], heads: Optional[Tensor]):
        self.B = (weights if weights is not None else heads).shape[0]
        self.base = (weights, heads)
        self.n = self.B
        self._fits: Dict[int, Tuple[Optional[Tensor], Optional[Tensor]]] = {self.B: self.base}

    def fit(self, ctx: "_Routing", layer: nn.Module, args, kwargs) -> None:
        x = next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor) and v.dim() >= 1),
                 None)
        if x is None:
            return
        n = x.shape[0]
        if n == self.n or (n == 1 and self.n != 1):
            return
        if n % self.B:
            raise _error(layer, f"its input has {n} rows, not a multiple of the {self.B} "
                                f"requests of the generate() call (generate expands each "
                                f"request into consecutive rows: beams, returned sequences)")
        fit = self._fits.get(n)
        if fit is None:
            k = n // self.B
            fit = self._fits[n] = tuple(None if t is None else t.repeat_interleave(k, dim=0)
                                        for t in self.base)
        ctx.row_weights, ctx.head_tasks = fit
        self.n = n


class _EnergyProbe:
    """What a `subspace_energies` pass of θs collects: for each low-rank Linear (or Conv1D) it
    passes through, each task's energy ‖S_t ⊙ V_tᵀ x‖² (the squared norm of what the task's
    exclusive knowledge would add to the layer's output: U_t has orthonormal columns), pooled
    over the real tokens of each row."""

    def __init__(self, mask: Optional[Tensor], names: Optional[frozenset]):
        self.mask = mask        # [B, L] bool, or None: every position counts
        self.names = names      # the layers to read, None: all
        self.out: Dict[str, Tensor] = {}    # layer name -> [B, T] float32

    def record(self, layer: "_TwinLinear", x: Tensor) -> None:
        if "weight" not in layer._twin_lowrank or (
                self.names is not None and layer._twin_name not in self.names):
            return
        _, _, S, V = layer._twin_as_linear()
        if layer._twin_tp:
            if _tp.shard_dim(_own(layer, "weight"), layer._twin_name) == 1:
                raise _error(layer, "subspace energies of a row-parallel layer would be partial "
                                    "sums on each rank; read energies from column-parallel or "
                                    "replicated layers (e.g. the attention's q/k/v projections)")
            x = _tp.local(x)
        h = (x.float() @ V.float()) * S.float()                           # [B, ..., K]
        e = _per_expert(h * h, layer._twin_ranks["weight"])               # [B, ..., T]
        e = e.reshape(e.shape[0], -1, e.shape[-1])                         # [B, L, T]
        m = self.mask
        if m is not None and m.shape == e.shape[:2]:
            m = m.to(e.device, e.dtype).unsqueeze(-1)
            pooled = (e * m).sum(1) / m.sum(1).clamp_min(1.0)
        else:
            pooled = e.mean(1)
        self.out[layer._twin_name] = pooled


def _own(module: nn.Module, name: str):
    """The module's own parameter, buffer or submodule `name`, never a served override."""
    return nn.Module.__getattr__(module, name)


def _error(layer, msg: str) -> ValueError:
    return ValueError(f"TwinMergedModule: layer {layer._twin_name!r} "
                      f"({layer._twin_class.__name__}): {msg}")


# What code outside a layer may ask of its mixed tensor during a factored call: metadata only.
_METADATA = frozenset(f for f in (
    *(getattr(Tensor, a).__get__ for a in ("dtype", "device", "shape", "ndim", "requires_grad",
                                           "is_cuda", "is_meta", "layout", "is_sparse",
                                           "is_quantized", "is_leaf")),
    Tensor.size, Tensor.dim, Tensor.numel, Tensor.nelement, Tensor.element_size,
    Tensor.is_floating_point, Tensor.is_complex, Tensor.is_contiguous, Tensor.get_device,
    Tensor.__len__, Tensor.__repr__, Tensor.__format__))


class _ForeignRead(Tensor):
    """θs's tensor, as handed to code outside its layer during a factored call. Its metadata
    answers as θs's; anything else raises, naming the layer: with a weight row per input there
    is no one tensor to compute with, and computing with θs would be a silent wrong answer."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        found = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, _ForeignRead)]
        layer, attr = found[0]._twin_read
        raise _error(layer, f"its mixed tensor {attr!r} is used by code outside the layer "
                            f"({getattr(func, '__name__', func)}: e.g. a tied projection "
                            f"F.linear(h, emb.weight), or a fused path). In factored mode each "
                            f"row has its own tensor, which only the layer's forward applies; "
                            f"serve this model with mode='materialize', or let it call the layer")


class _TwinParams:
    """Serves the calling thread's overrides of this module's tensors; in a factored call, hands
    code outside the layer a _ForeignRead of a mixed tensor."""

    def __getattr__(self, name: str):
        ctx = self.__dict__.get("_twin_ctx")
        if ctx is not None:
            over = ctx.overrides
            if over is not None:
                mine = over.get(self)
                if mine is not None and name in mine:
                    return mine[name]
            if ctx.row_weights is not None and ctx.current is not self and \
                    name in self.__dict__["_twin_mixed_attrs"]:
                guarded = super().__getattr__(name).detach().as_subclass(_ForeignRead)
                guarded._twin_read = (self, name)
                return guarded
        return super().__getattr__(name)


def _serve_plain(ctx: _Routing, layer: nn.Module, over: Overrides, args, kwargs):
    """layer's own forward with `over` served on top of the call's overrides; patched layers
    inside it run plain (their tensors are in `over` when they must be mixed)."""
    saved = ctx.overrides, ctx.reentry
    ctx.overrides = {**saved[0], **over} if saved[0] else over
    ctx.reentry = True
    try:
        return layer._twin_plain(*args, **kwargs)
    finally:
        ctx.overrides, ctx.reentry = saved


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


class _TwinLayer(_TwinParams):
    """Mixin placed before a layer's class: plain forward unless the routing asks for more."""

    def forward(self, *args, **kwargs):
        ctx: _Routing = self._twin_ctx
        if ctx.rows is not None and not ctx.reentry and not isinstance(self, _TwinBatchless):
            ctx.rows.fit(ctx, self, args, kwargs)
        if ctx.energy is not None and isinstance(self, _TwinLinear) and args:
            ctx.energy.record(self, args[0])
        # A head picks each row's task even inside a fallback layer's rows (reentry).
        if self._twin_is_head:
            if ctx.head_tasks is None:
                return super().forward(*args, **kwargs)
        elif ctx.reentry or ctx.row_weights is None:
            return super().forward(*args, **kwargs)
        outer, ctx.current = ctx.current, self
        try:
            return self._twin_forward(ctx, *args, **kwargs)
        finally:
            ctx.current = outer

    def _twin_plain(self, *args, **kwargs):
        """The layer's own forward (with θs, or whatever the call serves)."""
        return super().forward(*args, **kwargs)

    def _twin_factors(self, attr: str):
        return tuple(_own(self, f"_twin_{attr}_{f}") for f in "USV")

    def _twin_dense(self, attr: str) -> Optional[Tensor]:
        return self._buffers.get(f"_twin_{attr}_deltas")

    def _twin_merged(self, attr: str, w: Tensor) -> Tensor:
        """θs + Σt w[t]·v̂t for one tensor and one weight vector [T], differentiable in w,
        accumulated in fp32 (fp64 for fp64)."""
        dp = _own(self, attr)
        p = _tp.local(dp)  # a tensor-parallel layer: its shard, merged with its factors' slices
        f = _opmath(p.dtype)
        if attr in self._twin_lowrank:
            U, S, V = self._twin_factors(attr)
            s = _per_column(w.to(f), self._twin_ranks[attr]) * S.to(f)
            out = (p.to(f) + (U.to(f) * s) @ V.to(f).T).to(p.dtype)
        else:
            d = self._twin_dense(attr)
            out = (p.to(f) + torch.tensordot(w.to(f), d.to(f), 1)).to(p.dtype)
        return _tp.like(out, dp)


class _TwinLinear(_TwinLayer):
    def _twin_as_linear(self):
        """(W [m, n], U_cat [m, K], S_cat, V_cat [n, K]) of y = x Wᵀ + b, the op's layout."""
        return (_own(self, "weight"),) + self._twin_factors("weight")

    def _twin_forward(self, ctx, x):
        rw = ctx.row_weights
        _check_batch(self, x, rw.shape[0])
        # Read once per call; a tensor-parallel layer's factors are already its rank's slices.
        if "weight" in self._twin_lowrank:
            W, *factors = self._twin_as_linear()
        else:  # only the bias mixes: the layer's own forward computes x Wᵀ
            W, factors = None, None
        if self._twin_tp:  # tensor-parallel: the same computation on this rank's shards
            return _tp.linear(self, x, lambda xl, Wl, bias, add_bias: self._twin_local(
                xl, Wl, factors, bias, rw,
                lambda v: F.linear(v, Wl, bias if add_bias else None), add_bias))
        return self._twin_local(x, W, factors, _own(self, "bias"), rw, self._twin_plain)

    def _twin_local(self, x, W, factors, bias, rw, plain, add_bias: bool = True):
        """x Wᵀ + bias + ((x V_cat) ⊙ s(w_b)) U_catᵀ + Σt w_b,t Δb_t on the given tensors
        (factors: (U_cat, S_cat, V_cat) in the op's layout, None without a low-rank weight;
        add_bias False: without the bias
        and its per-row deltas: a row-parallel rank but the first). plain(x) is the layer's
        computation without the mix (with the bias if any)."""
        B = rw.shape[0]
        db = self._twin_dense("bias") if add_bias else None
        bias = bias if add_bias else None
        lowrank = "weight" in self._twin_lowrank
        if not lowrank:
            y = plain(x)
        else:
            U, S, V = factors
            # With a mixed bias, the shared bias joins the per-row one ([B, m], small) below:
            # one pass over y adds both, where the op's bias (copied into y first) and then the
            # per-row delta took two.
            y = lowrank_mix_linear(x, W, bias if db is None else None, U, S, V,
                                   self._twin_ranks["weight"], rw)
        if db is None:
            return y
        rb = _mix_dense(rw, db)
        if lowrank and bias is not None:
            rb = rb + bias.to(rb.dtype)
        rb = _row_view(rb, B, y.dim(), db.shape[1:]).to(y.dtype)
        # In place when nothing is recorded for backward (autograd forbids modifying a custom
        # op's output in place): serving spares a y-sized allocation per layer.
        return y + rb if y.requires_grad else y.add_(rb)


class _TwinConv1D(_TwinLinear):
    """transformers' Conv1D: y = x W + b with W [n_in, n_out], a transposed Linear."""

    def _twin_as_linear(self):
        # W = U diag(s) Vᵀ with U [n_in, K], V [n_out, K]: as a Linear the factors swap roles.
        U, S, V = self._twin_factors("weight")
        return _own(self, "weight").T, V, S, U


class _TwinEmbedding(_TwinLayer):
    def _twin_forward(self, ctx, ids):
        rw = ctx.row_weights
        B = rw.shape[0]
        # Position ids are often [1, L], broadcast over the batch later: the output becomes [B, ...].
        _check_batch(self, ids, B, allow_one=True)
        U, S, V = self._twin_factors("weight")
        f = _opmath(U.dtype)
        s = _per_column(rw.to(f), self._twin_ranks["weight"]) * S.to(f)              # [B, K]

        def mixed(i: Tensor, y: Tensor) -> Tensor:
            h = F.embedding(i, U).to(f)                                               # [b, ..., K]
            return (y + (h * _row_view(s, B, h.dim(), s.shape[1:])) @ V.to(f).T).to(y.dtype)
        if self._twin_tp:  # tensor-parallel: this rank's rows or columns
            return _tp.embedding(self, ids, lambda i, W: mixed(i, F.embedding(i, W)))
        return mixed(ids, self._twin_plain(ids))


def _same_rows(rw: Tensor) -> bool:
    """Whether every row has the same weights, known without comparing values: one row, or one
    [T] vector expanded to [B, T] (stride 0)."""
    return rw.shape[0] == 1 or rw.stride(0) == 0


class _TwinBatchless(_TwinLayer):
    """A layer whose input has no batch dimension, shared by every row: T5's relative position
    bias (an Embedding of [query length, key length] buckets). Its output cannot differ per row,
    so a call whose rows have different weights is refused; one weight vector for the whole
    batch is served exactly, by the layer's forward on θ(w)."""

    def _twin_forward(self, ctx, *args, **kwargs):
        rw = ctx.row_weights
        if not _same_rows(rw):
            raise _error(self, "its input has no batch dimension (its output is shared by every "
                               "row), so its rows cannot have weights of their own; pass one "
                               "weight vector [T] for the call, or use mode='materialize'")
        over = {self: {attr: self._twin_merged(attr, rw[0]) for attr in self._twin_attrs}}
        return _serve_plain(ctx, self, over, args, kwargs)


# Layers that take no batch dimension, by the name the model gives them.
_BATCHLESS_NAMES = re.compile(r"(^|\.)relative_attention_bias$")


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
            p = _own(self, attr)
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


class _TwinScale(_TwinLayer):
    """A layer whose output is its weight times what it computes with a weight of ones,
    y = weight ⊙ f(x) (LlamaRMSNorm, T5LayerNorm, torch's RMSNorm): each row's weight scales
    f(x), computed once for the batch. `_scales_by_weight` proves the form on a probe before
    a layer gets this kind."""

    def _twin_forward(self, ctx, x, *args, **kwargs):
        rw = ctx.row_weights
        B = rw.shape[0]
        _check_batch(self, x, B)
        unit = _serve_plain(ctx, self, {self: {"weight": _own(self, "_twin_unit")}},
                            (x,) + args, kwargs)
        p = _own(self, "weight")
        wb = (p.to(_opmath(p.dtype)) + _mix_dense(rw, self._twin_dense("weight"))).to(p.dtype)
        return unit * _row_view(wb, B, unit.dim(), p.shape)


def _scales_by_weight(layer: nn.Module) -> bool:
    """Whether layer(x) == weight ⊙ layer_{weight=1}(x), bit for bit, on a random probe (a copy
    of the layer runs it: the module is never touched)."""
    p = layer._parameters.get("weight")
    if p is None or p.dim() != 1 or not p.is_floating_point() or p.device.type == "meta" or \
            len(list(layer.parameters())) != 1:
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, p.numel(), generator=g).to(device=p.device, dtype=p.dtype)
    # Signed, away from 0: a layer that uses |weight| or clamps it must fail the probe.
    scale = torch.randn(p.numel(), generator=g)
    scale = (scale + scale.sign() * 0.25).to(device=p.device, dtype=p.dtype)
    try:
        probe = copy.deepcopy(layer)
        with torch.no_grad():
            probe.weight.copy_(scale)
            y = probe(x)
            probe.weight.fill_(1)
            unit = probe(x)
    except Exception:  # a forward that needs more than x: served by the fallback
        return False
    return isinstance(y, Tensor) and isinstance(unit, Tensor) and y.shape == x.shape and \
        torch.equal(y, scale * unit)


def _map_rows(fn: Callable[[Tensor], Tensor], B: int, tree):
    """Applies fn to every tensor leaf whose first dimension is B (the batched ones)."""
    return pytree.tree_map(lambda v: fn(v) if isinstance(v, Tensor) and v.dim() >= 1
                           and v.shape[0] == B else v, tree)


class _TwinFallback(_TwinLayer):
    """Any other layer: its tensors, and those of the mixing layers inside it, merged per batch
    row and served to its own forward on that row (the whole batch at once when every row has
    the same weights). Serving the layers inside it too keeps a module that reads a child's
    tensors itself (nn.MultiheadAttention reads out_proj.weight) exact."""

    def _twin_forward(self, ctx, *args, **kwargs):
        rw, heads = ctx.row_weights, ctx.head_tasks
        B = rw.shape[0]
        if B == 0:  # nothing to mix
            return self._twin_plain(*args, **kwargs)
        rows = [slice(0, B)] if _same_rows(rw) else [slice(b, b + 1) for b in range(B)]
        outs = []
        try:
            for sl in rows:
                w = rw[sl.start]
                over = {layer: {attr: layer._twin_merged(attr, w) for attr in layer._twin_attrs}
                        for layer in self._twin_subtree}
                a, k = _map_rows(lambda v: v[sl], B, (args, kwargs))
                ctx.head_tasks = heads[sl] if heads is not None else None  # a head inside
                outs.append(_serve_plain(ctx, self, over, a, k))
        finally:
            ctx.head_tasks = heads
        if len(outs) == 1:
            return outs[0]
        return _concat_outputs(outs, [1] * B, f"layer {self._twin_name!r}")


class _TwinHead(_TwinLayer):
    """A task head: every task's head runs on the rows, each row keeps its head task's output.
    Its tensors are not mixed: nothing in it is a _ForeignRead."""

    def _twin_task_head(self, t: int) -> Overrides:
        over: Overrides = {}
        for i, (module, attr) in enumerate(self._twin_head_targets):
            over.setdefault(module, {})[attr] = _own(self, f"_twin_head_{t}_{i}")
        return over

    def _twin_forward(self, ctx, *args, **kwargs):
        outs = [_serve_plain(ctx, self, self._twin_task_head(t), args, kwargs)
                for t in range(ctx.T)]
        bad = [type(o).__name__ for o in outs if not isinstance(o, Tensor)]
        if bad:
            raise _error(self, f"a task head must return one tensor, got {bad[0]}")
        width = max(o.shape[-1] for o in outs)
        # A list, not a set: traced sizes (SymInt, under torch.export) are not hashable.
        shapes = [tuple(o.shape[:-1]) for o in outs]
        if any(s != shapes[0] for s in shapes[1:]):
            raise _error(self, f"task heads disagree on their output shape except the last "
                               f"dimension: {shapes}")
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
                "layernorm": _TwinLayerNorm, "fallback": _TwinFallback, "head": _TwinHead,
                "batchless": _TwinBatchless, "params": _TwinParams, "scale": _TwinScale}
_PATCHED_CLASSES: Dict[Tuple[str, type], type] = {}
_PATCHED_LOCK = threading.Lock()


def _patched_class(kind: str, cls: type) -> type:
    with _PATCHED_LOCK:  # one class per (kind, cls), whichever thread wraps first
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


def _kind(layer: nn.Module, name: str, attrs: Dict[str, str]) -> str:
    """The factored implementation for a layer owning twin tensors attr -> "lowrank"/"dense"."""
    if _BATCHLESS_NAMES.search(name):
        return "batchless"
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
    if not lowrank and dense == {"weight"} and _scales_by_weight(layer):
        return "scale"
    return "fallback"


def _kv_cache(tree) -> Optional[str]:
    """The type name of a transformers KV cache among the call's inputs, or None. A cache holds
    every row's keys and values and is written by the call: it cannot be split into sub-batches."""
    for leaf in pytree.tree_leaves(tree):
        if not isinstance(leaf, Tensor) and any(
                c.__name__ == "Cache" and c.__module__.startswith("transformers")
                for c in type(leaf).__mro__):
            return type(leaf).__name__
    return None


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
