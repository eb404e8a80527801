"""Routing from the first layers of the model: the router's hidden states read as they enter
the model's layer stack, instead of from a whole forward pass.

A router reading pooled hidden states (`TwinRouter`, `PrototypeRouter`) needs hidden_states[i]
for the indices in its `layer`. For a transformers model, hidden_states[i] with i < n (n layers)
is exactly the tensor that enters layer i of the model's stack (index 0: the embeddings' output),
so once layer k = max(indices) is about to run, everything the router reads is known. Two uses:

- `prefix_weights` (the two-pass scheme's first pass, cut short): a forward of θs that stops
  at layer k. Same weights as a whole pass (the same tensors are pooled), for k/n of its cost.
- self-routing (`routing="self"`): one forward whose layers before k run θs, the router
  computed at layer k, and layers k.. (and the heads) serving θ(w_b) per row. This is not the
  paper's model: the paper serves every layer with θ(w_b) after a separate pass of θs; here the
  first k layers (and the embeddings) stay θs, which is what their hidden states were anyway
  for the router.

Forward pre-hooks on the stack's layers read the calling thread's `_Routing.prefix` (None
outside these calls: the hooks do nothing), so threads and plain calls are unaffected.
"""

import functools
import inspect
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from twinmerge_ext._layers import _Routing
from twinmerge_ext.router import _check_rows, _describe, _layer_arg, _pool_layers


class _Stop(Exception):
    """Raised from layer k's pre-hook when only the weights were wanted (a cut-short pass)."""


def layer_stack(module: nn.Module) -> Optional[Tuple[str, nn.ModuleList]]:
    """The model's stack of layers: (qualified name, ModuleList) or None.

    A transformers model names its layer classes in `_no_split_modules`; the ModuleList whose
    elements are all such layers is its stack (bert.encoder.layer, model.layers, transformer.h).
    Without that attribute, or with several such lists (an encoder-decoder), there is no unique
    stack and None is returned.
    """
    names = set(getattr(module, "_no_split_modules", None) or ())
    found = [(name, m) for name, m in module.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0
             and all(type(x).__name__ in names for x in m)]
    return found[0] if len(found) == 1 else None


def stack_indices(layer, n: int, fn: str) -> List[int]:
    """A router's hidden-state indices as non-negative ones into n + 1 hidden states."""
    layers = _layer_arg(layer, fn)
    layers = layers if isinstance(layers, tuple) else (layers,)
    out = []
    for i in layers:
        if not -(n + 1) <= i <= n:
            raise ValueError(f"{fn}: layer must be in [{-(n + 1)}, {n + 1}) for {n + 1} hidden "
                             f"states, got {i}")
        out.append(i % (n + 1))
    return out


@functools.lru_cache(maxsize=64)
def _signature(func) -> inspect.Signature:
    return inspect.signature(func)


def call_inputs(module: nn.Module, args, kwargs) -> Tuple[Any, Any]:
    """(input_ids, attention_mask) of a call of `module`, positional or keyword, bound to its
    forward's signature (a mask passed positionally is still the mask)."""
    forward = module.forward
    try:
        func = getattr(forward, "__func__", None)  # a method: its signature, cached
        bound = (_signature(func).bind_partial(module, *args, **kwargs) if func is not None
                 else inspect.signature(forward).bind_partial(*args, **kwargs)).arguments
    except (TypeError, ValueError):
        bound = kwargs
    ids = bound.get("input_ids", args[0] if args else None)
    return ids, bound.get("attention_mask")


def stack_reads_hidden_states(served, ids: Tensor, mask: Tensor) -> bool:
    """Whether hidden_states[i] of the module's output is the input of its stack's layer i, for
    every i < n: true of transformers' encoders and decoders, not of models that record each
    layer's output (Mamba, RWKV). Checked on one row, in a pass of θs with every input captured
    (per thread, through the same hooks). An error of that pass propagates: nothing is
    concluded from a call that failed."""
    stack = served.module.get_submodule(served._stack_name)
    n = len(stack)
    p = Prefix(served, list(range(n)), mask[:1], stop=False, check_only=True)
    ctx = served._ctx
    ctx.prefix = p
    try:
        with torch.no_grad():
            out = served.module(input_ids=ids[:1], attention_mask=mask[:1],
                                output_hidden_states=True)
    finally:
        ctx.prefix = None
    hs = out.get("hidden_states") if isinstance(out, dict) else getattr(out, "hidden_states", None)
    return hs is not None and len(hs) == n + 1 and all(
        i in p.states and p.states[i].shape == hs[i].shape and torch.equal(p.states[i], hs[i])
        for i in range(n))


class Prefix:
    """One call's capture: the hidden states entering layers `wanted`, pooled and routed when
    layer k = max(wanted) is about to run (`check_only`: captured, never routed)."""

    def __init__(self, served, indices: List[int], mask: Tensor, stop: bool,
                 head_tasks: Optional[Tensor] = None, check_only: bool = False,
                 texts: Optional[List[str]] = None):
        self.served = served
        self.texts = texts  # a ProductRouter's other input
        self.wanted = set(indices)
        self.indices = indices
        self.k = max(indices)
        self.mask = mask
        self.stop = stop
        self.head_tasks = head_tasks
        self.states: Dict[int, Tensor] = {}
        self.weights: Optional[Tensor] = None
        self.used_heads: Optional[Tensor] = None
        self.check_only = check_only

    def enter_layer(self, ctx: _Routing, i: int, x: Tensor) -> None:
        if i in self.wanted:
            self.states[i] = x
        if i != self.k or self.check_only:
            return
        served = self.served
        router = served.router
        states = [self.states.get(j) for j in range(self.k + 1)]
        mask = self.mask.to(x.device) != 0
        with torch.no_grad():
            feats = _pool_layers(states, mask, tuple(self.indices), router.pooling, self.fn)
            w = router.weights(feats if self.texts is None else (feats, self.texts),
                               served.temperature, served.top_k)
        self.weights = w
        if self.stop:
            raise _Stop()
        served._check_weights(w, x.shape[0], self.fn, routed=True)
        ctx.row_weights = w
        ctx.head_tasks = self.used_heads = self.head_tasks if self.head_tasks is not None else (
            w.argmax(-1) if served._head_layer is not None else None)

    @property
    def fn(self) -> str:
        return "TwinMergedModule.route" if self.stop else "TwinMergedModule"


class _Hook:
    """Layer i's pre-hook. An object, not a closure, so that a deep copy of the wrapper gets
    hooks reading the copy's `_Routing` (deepcopy shares closures but copies objects)."""

    def __init__(self, ctx: _Routing, i: int):
        self.ctx, self.i = ctx, i

    def __call__(self, module, args, kwargs):
        ctx = self.ctx
        p = ctx.prefix
        if p is None or ctx.reentry:
            return None
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, Tensor):
            raise ValueError(f"{p.fn}: layer {self.i} of the model's stack got no hidden states "
                             f"tensor (first argument or hidden_states=)")
        p.enter_layer(ctx, self.i, x)
        return None


def install(ctx: _Routing, stack: nn.ModuleList) -> None:
    """Pre-hooks on every layer of the stack, reading the thread's `_Routing.prefix`."""
    for i, layer in enumerate(stack):
        layer.register_forward_pre_hook(_Hook(ctx, i), with_kwargs=True)


def uninstall(stack: nn.ModuleList) -> None:
    for layer in stack:
        for key in [k for k, h in layer._forward_pre_hooks.items() if isinstance(h, _Hook)]:
            del layer._forward_pre_hooks[key]
            layer._forward_pre_hooks_with_kwargs.pop(key, None)


def check_mask(ids: Tensor, mask: Optional[Tensor], fn: str) -> Tensor:
    """The attention mask of input_ids [B, L] (ones if None), checked: its shape, and a real
    token in every row (there is nothing to pool otherwise)."""
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point() or \
            ids.is_complex():
        raise ValueError(f"{fn}: input_ids must be a 2-D integer tensor [B, L], got "
                         f"{_describe(ids)}")
    if mask is None:
        return torch.ones_like(ids)
    if not isinstance(mask, Tensor) or mask.shape != ids.shape:
        raise ValueError(f"{fn}: attention_mask must be a tensor of input_ids' shape "
                         f"{list(ids.shape)}, got {_describe(mask)}")
    _check_rows(mask != 0, fn)
    return mask
