"""TwinMergedModule: any nn.Module served as Twin-Merging's input-adaptive model (METHOD.md §1, §3).

The wrapped module holds the shared expert θs. Each batch row b is served by
θ(w_b) = θs + Σt w_b,t·v̂t, exactly, in one of three ways:

- factored: mixing in activation space, nothing materialized. A Linear layer computes
  y = x Wsᵀ + bs + ((x V_cat) ⊙ s(w_b)) U_catᵀ + Σt w_b,t Δb_t (`lowrank_mix_linear`);
  embeddings gather rows of U_cat; LayerNorm weights and biases mix per row. One pass for the
  whole batch, no host synchronization but the NaN check of the weights (`check_finite`),
  differentiable in the weights, torch.compile-able.
- materialize: θ(w) merged into buffers allocated once (`lowrank_merge_`, `dense_merge_`), the
  module run on the rows that share w (one sub-batch per distinct weight row). `merged(w)` keeps
  one merge for the calls of a block.
- group: the paper's group-wise variant: rows binned by the argmax of their weights, KMeans on
  the weights inside each bin (n_groups groups in all), one merge per group with the group's mean
  weights. Approximate by design; exact when n_groups ≥ the number of distinct rows.
- auto: factored or materialize per call, by the cost model of METHOD.md §3.

Layers the factored mode mixes itself: nn.Linear, nn.Embedding (no max_norm), nn.LayerNorm and
transformers' Conv1D. Any other module that owns twin parameters (an RMSNorm, a convolution,
nn.MultiheadAttention) mixes by merging its own parameters, and those of the mixing layers inside
it, per batch row and running on that row: exact, slower.

Task heads (a twin built with `heads=`): the module that holds them runs every task's head and
each row keeps the output of its head task, by default the argmax of its weights (the router's
choice). Heads of different widths are padded on the last dimension with `head_pad_value`.

Threads: calls on one wrapper from several threads are safe and exact. Each call's weights, head
tasks and merged tensors live in per-thread state (`_layers._Routing`) and reach the layers as
served tensors: no call writes θs or swaps the module's parameters. Materialize and group calls
merge into buffer sets lent one call at a time (`buffer_sets` of them; more calls wait).
"""

import math
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from numbers import Integral, Real
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from twinmerge_ext import _tp
from twinmerge_ext._finite import all_finite, nonfinite_rows
from twinmerge_ext._layers import (
    _concat_outputs,
    _kv_cache,
    _kind,
    _map_rows,
    _own,
    _patched_class,
    _Routing,
    _TwinFallback,
    _TwinParams,
    _TwinScale,
)
from twinmerge_ext._merge_pool import BufferSet, MergePool
from twinmerge_ext._prefix import (
    Prefix,
    call_inputs,
    check_mask,
    layer_stack,
    stack_indices,
    stack_reads_hidden_states,
)
from twinmerge_ext._prefix import install as install_prefix
from twinmerge_ext._prefix import uninstall as uninstall_prefix
from twinmerge_ext._prefix import _Stop
from twinmerge_ext.generation import generate as _generate
from twinmerge_ext.checkpoint import TwinCheckpoint
from twinmerge_ext.ops import dense_merge_, lowrank_merge_
from twinmerge_ext.router import Router, _eval_mode, _model_device
from twinmerge_ext.text_router import TextRouter, check_texts

__all__ = ["TwinMergedModule"]

MODES = ("auto", "factored", "materialize", "group")
ROUTINGS = ("two_pass", "self")

# Machine balance used by mode="auto" for CUDA: a materialized merge of an m×n matrix is
# memory-bound below K ≈ 500 (METHOD.md §3), so it costs about 3·m·n·elsize bytes, counted as
# FLOPs at this many FLOP/byte (H100: ~990 TFLOP/s bf16 / 3.35 TB/s ≈ 300).
_CUDA_FLOP_PER_BYTE = 300.0


def _register(layer: nn.Module, name: str, value: Tensor) -> None:
    # Non-persistent: moved by .to(), invisible to state_dict().
    layer.register_buffer(name, value, persistent=False)


def _describe_tensor(v) -> str:
    return f"{v.dtype} {list(v.shape)}" if isinstance(v, Tensor) else repr(v)


def _first_batched(args, kwargs) -> Optional[Tensor]:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, Tensor) and v.dim() >= 1:
            return v
    return None


class _Calls:
    """A wrapper's calls: how many are in flight, whether the wrapper was unwrapped, and each
    caller's merged() block and last call.

    `with calls(fn):` around a call refuses it on an unwrapped wrapper and counts it meanwhile;
    `with calls.idle(fn):` runs something no call may overlap (unwrap, .to()): it refuses while
    calls are in flight and holds off new ones until done. Skipped while torch.compile traces
    (a lock cannot be traced; compiled code runs the checks of the eager call that traced it).
    Blocks and last calls are ContextVars: per thread, and per asyncio task, whose blocks span
    awaits. A plain object, not the wrapper's attributes: nn.Module's __setattr__ would cost
    more than the count.
    """

    def __init__(self, closed: bool = False):
        self._lock = threading.Lock()
        self.in_flight = 0
        self.closed = closed
        self.pinned: ContextVar[Optional[Tensor]] = ContextVar("twinmerge_pinned", default=None)
        self.last: ContextVar[Optional[Dict[str, Any]]] = ContextVar("twinmerge_last_call",
                                                                     default=None)

    def __reduce__(self):  # a copied wrapper: no call in flight, no block, no last call
        return (_Calls, (self.closed,))

    def _refuse_closed(self, fn: str) -> None:
        if self.closed:
            raise ValueError(f"{fn}: this wrapper was unwrapped (unwrap() gave its module back, "
                             f"holding θs, with its layers restored); wrap the module again to "
                             f"serve the twin")

    def __call__(self, fn: str) -> "_Calls":
        if not torch.compiler.is_compiling():
            with self._lock:
                self._refuse_closed(fn)
                self.in_flight += 1
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> bool:
        if not torch.compiler.is_compiling():
            with self._lock:
                self.in_flight -= 1
        return False

    @contextmanager
    def idle(self, fn: str):
        with self._lock:
            if self.in_flight:
                raise ValueError(f"{fn}: {self.in_flight} call(s) or merged() block(s) are in "
                                 f"flight on this wrapper (other threads or tasks); wait until "
                                 f"they have returned")
            yield


def _twin_tensors(twin: TwinCheckpoint):
    """(name, tensor) of every tensor the twin holds."""
    yield from ((f"shared/{k}", v) for k, v in twin.shared.items())
    for k, lr in twin.lowrank.items():
        yield from ((f"lowrank/{k}/{f}", t) for f, t in zip(("U_cat", "S_cat", "V_cat"),
                                                            (lr.U_cat, lr.S_cat, lr.V_cat)))
    yield from ((f"dense/{k}/deltas", v) for k, v in twin.dense.items())
    for task, head in twin.heads.items():
        yield from ((f"heads/{task}/{k}", v) for k, v in head.items())


def _head_path(names: List[str]) -> str:
    """The deepest module path that holds every head tensor ('' if none but the root)."""
    parts = [n.split(".")[:-1] for n in names]
    prefix = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix)


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
        router: the router (any kind) for calls without mix_weights (default: twin.router).
        mode: "auto", "factored", "materialize" or "group" (module docstring).
        filter_fn: (layer, qualified name) -> bool, which layers mix; the others serve θs.
        n_groups: groups of mode="group" (the paper: 20); at least one per argmax bin.
        temperature, top_k: of router.weights.
        router_features: (module, args, kwargs) -> [B, d] features for the router; default:
            the router's own (`router.features`: `pooled_features` of the module (θs) with the
            router's layer and pooling, or an EnergyRouter's subspace energies), from the
            input_ids and attention_mask arguments.
        head_pad_value: fills the last dimension of a narrower task head's output.
        seed: of KMeans in mode="group".
        buffer_sets: how many materialize/group calls may merge at once (threads); each set is
            one merged copy of the mixed tensors, allocated on first use. Further calls wait.
        check_finite: reject mix_weights (and the router's weights) with NaN/Inf entries in every
            mode, at the cost of one host synchronization per call. Pass False only where a
            call must not synchronize (CUDA-graph capture, torch.compile(fullgraph=True)): NaN
            weights then give NaN outputs in factored mode.
        routing: how calls without mix_weights get their weights. "two_pass" (the paper): a
            router pass of θs, then the served pass; the router pass stops at the last hidden
            state the router reads (a router on early layers costs a fraction of a pass).
            "self": one factored pass; the embeddings and the layers before the router's last
            hidden state run θs, the router runs where that state enters the model's stack of
            layers, and the later layers and the heads serve θ(w_b). Not the paper's model (its
            first layers are θs, not θ(w_b)); needs a router on pooled hidden states before the
            last layer (TwinRouter, PrototypeRouter), the default router features, a module
            with one stack of layers (a transformers model), and mode "factored" or "auto".
            The router pools the states of the call as made (token_type_ids and any other
            input included), where a router pass reads input_ids and attention_mask only.
            generate() routes each request once on its prompt in two passes whatever this
            says (a decode step's single token is nothing to route on). A TextRouter routes
            before the pass either way (it runs no pass of θs).

    Call: wrapped(*args, mix_weights=None, head_tasks=None, router_text=None, **kwargs) -> the
    module's output.
        mix_weights: [B, T] (row b gets its own model, B = the first dimension of the batched
            inputs), [T] (one model for the call), or None (the router computes [B, T] from a
            forward pass of θs: two passes, as in the paper; or inside the pass, routing="self").
        head_tasks: [B] task indices choosing each row's head (only for twins with heads), or
            [B, H] for H heads per row (the head's output gains a dimension: [B, H, ...], e.g.
            logits [B, H, width]; one body pass scores several head choices). Passing the true
            tasks is the protocol of the authors' evaluation and of standard
            merging benchmarks (METHOD.md §2): an oracle a deployed router does not have.
        router_text: the rows' raw texts (B strings) for a router that reads them (TextRouter:
            the weights from the texts alone, no pass of θs; ProductRouter: with the pooled
            states of the router pass or of the self-routed pass); required by those routers,
            refused by the others and alongside mix_weights.
    Tensor inputs whose first dimension is B are the batched ones (sliced per sub-batch in the
    materialize and group modes); outputs are returned in input order.

    `with wrapped.merged(w):` merges [T] weights once for every call of this thread (or asyncio
    task) in the block that passes no mix_weights; `groups(weights)` is mode="group"'s plan, for
    servers that batch groups themselves.

    Threads: any number of threads may call one wrapper at once, each with its own weights
    (module docstring). `last_call` is per thread and asyncio task: {"mode", "weights" [B, T],
    "head_tasks", and for auto the cost estimates, for group the group of each row} of its last
    call. unwrap() and .to() refuse while a call is in flight; after `unwrap()` every call raises.

    Errors: ValueError/TypeError naming the argument and its value (bad mode, a twin that does not
    fit the module, a module or twin on the meta device, weights of the wrong shape, with NaN, or
    requiring grad outside the factored mode; in the factored mode a layer whose input is not
    batch-first, per-row weights for a layer without a batch dimension, or code outside a layer
    computing with its mixed tensor), raised before anything changes.
    """

    def __init__(self, module: nn.Module, twin: TwinCheckpoint, router: Optional[Router] = None,
                 mode: str = "auto", filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                 n_groups: int = 20, temperature: float = 1.0, top_k: Optional[int] = None,
                 router_features: Optional[Callable[[nn.Module, tuple, dict], Tensor]] = None,
                 head_pad_value: float = float("-inf"), seed: int = 0, buffer_sets: int = 1,
                 check_finite: bool = True, routing: str = "two_pass"):
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
            if not isinstance(router, Router):
                raise TypeError(f"{fn}: router must be a Router (TwinRouter, PrototypeRouter) or "
                                f"None, got {type(router).__name__}")
            if list(router.tasks) != twin.tasks:
                raise ValueError(f"{fn}: router.tasks must be the twin's tasks in order, "
                                 f"{twin.tasks}, got {list(router.tasks)}")
        if filter_fn is not None and not callable(filter_fn):
            raise TypeError(f"{fn}: filter_fn must be callable (layer, name) -> bool, got "
                            f"{type(filter_fn).__name__}")
        if router_features is not None and not callable(router_features):
            raise TypeError(f"{fn}: router_features must be callable, got "
                            f"{type(router_features).__name__}")
        n_groups = self._int_arg(n_groups, "n_groups", fn)
        buffer_sets = self._int_arg(buffer_sets, "buffer_sets", fn)
        if isinstance(temperature, bool) or not isinstance(temperature, Real) or \
                not 0 < temperature < math.inf:
            raise ValueError(f"{fn}: temperature must be a finite number > 0, got "
                             f"{temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral)
                                  or not 1 <= top_k <= len(twin.tasks)):
            raise ValueError(f"{fn}: top_k must be None or an int in [1, {len(twin.tasks)}], "
                             f"got {top_k!r}")
        if isinstance(head_pad_value, bool) or not isinstance(head_pad_value, Real) or \
                math.isnan(head_pad_value):
            raise ValueError(f"{fn}: head_pad_value must be a number (not NaN: the argmax of a "
                             f"padded row would be undefined), got {head_pad_value!r}")
        if isinstance(seed, bool) or not isinstance(seed, Integral):
            raise TypeError(f"{fn}: seed must be an int, got {seed!r}")
        if not isinstance(check_finite, bool):
            raise TypeError(f"{fn}: check_finite must be a bool, got {check_finite!r}")
        if routing not in ROUTINGS:
            raise ValueError(f"{fn}: routing must be one of {list(ROUTINGS)}, got {routing!r}")
        stack = layer_stack(module)
        if routing == "self" and stack is None:
            raise ValueError(f"{fn}: routing='self' needs the module's stack of layers (one "
                             f"ModuleList of the classes in its _no_split_modules, as a "
                             f"transformers model has); {type(module).__name__} has none")
        if any(isinstance(m, _TwinParams) for m in module.modules()):
            raise ValueError(f"{fn}: module is already wrapped by a TwinMergedModule; unwrap() it "
                             f"first")
        self._check_data(module, twin, fn)
        self._check_shared(module, twin, fn)
        head = self._head_plan(module, twin, fn)
        chosen = self._choose_layers(module, twin, filter_fn)  # runs filter_fn, which may raise
        kinds = {path: _kind(layer, path, attrs) for path, (layer, attrs) in chosen.items()}
        # Tensor-parallel layers (DTensor tensors, `_tp`): checked here, before any change.
        tp_layers = {path: _tp.check_layer(layer, kinds[path], list(attrs), path)
                     for path, (layer, attrs) in chosen.items()}
        _tp.check_twin(module, twin)
        if any(tp_layers.values()) and routing == "self":
            raise ValueError(f"{fn}: routing='self' is not served on a tensor-parallel module "
                             f"(its router reads hidden states inside the stack); use "
                             f"routing='two_pass'")

        self.module = module
        self.router = router
        self.mode = mode
        self.n_groups = n_groups
        self.temperature = float(temperature)
        self.top_k = top_k
        self.router_features = router_features
        self.head_pad_value = float(head_pad_value)
        self.seed = int(seed)
        self.check_finite = check_finite
        self.routing = routing
        self.tasks = twin.tasks
        self._ctx = _Routing(len(self.tasks))
        self._stack_name = None if stack is None else stack[0]
        self._pool = MergePool(buffer_sets)
        self._calls = _Calls()
        self._patched: List[Tuple[nn.Module, type]] = []
        # (name of a mixed tensor, its layer, attribute, "lowrank"/"dense"): one per distinct
        # tensor, merged into one buffer of a set.
        self._mixed: List[Tuple[str, nn.Module, str, str]] = []
        # (layer, attribute, index into _mixed): every name a merged buffer is served under
        # (tied tensors, GPT-2's wte and lm_head, have two).
        self._served: List[Tuple[nn.Module, str, int]] = []
        with torch.no_grad():  # θs into the module: from here on nothing can fail
            own = module.state_dict(keep_vars=True)
            for name, value in twin.shared.items():
                _tp.local(own[name]).copy_(_tp.local_part(value, own[name], name))
        self._patch_layers(twin, chosen, kinds, tp_layers)
        self._patch_heads(twin, head)
        if stack is not None:
            install_prefix(self._ctx, stack[1])

    @staticmethod
    def _int_arg(value, arg: str, fn: str) -> int:
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(f"{fn}: {arg} must be an int >= 1, got {value!r}")
        return int(value)

    # --- construction ---------------------------------------------------------------------------

    @staticmethod
    def _check_data(module: nn.Module, twin: TwinCheckpoint, fn: str) -> None:
        """Tensors on the meta device hold no data: copying θs into them, or factors out of
        them, would fail later with torch's generic error (or serve nothing)."""
        own = module.state_dict(keep_vars=True)
        for name in twin.shared:
            t = own.get(name)
            if isinstance(t, Tensor) and t.device.type == "meta":
                raise ValueError(f"{fn}: module tensor {name!r} is on the meta device (it holds "
                                 f"no data); materialize the module first, e.g. "
                                 f"module.to_empty(device='cpu'), then wrap it")
        for name, t in _twin_tensors(twin):
            if t.device.type == "meta":
                raise ValueError(f"{fn}: twin tensor {name!r} is on the meta device (it holds no "
                                 f"data); load the twin onto a real device")

    @staticmethod
    def _check_shared(module: nn.Module, twin: TwinCheckpoint, fn: str) -> None:
        """The twin's shared tensors are exactly the module's (less the task heads), shape by
        shape."""
        own = module.state_dict(keep_vars=True)
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

    def _patch(self, layer: nn.Module, kind: str, name: str, mixed_attrs=()) -> None:
        self._patched.append((layer, type(layer)))
        layer._twin_class = type(layer)
        layer.__class__ = _patched_class(kind, type(layer))
        layer._twin_ctx = self._ctx
        layer._twin_name = name
        layer._twin_is_head = kind == "head"
        layer._twin_mixed_attrs = frozenset(mixed_attrs)
        layer._twin_tp = False  # tensor-parallel (DTensor tensors): set by _patch_layers

    @staticmethod
    def _choose_layers(module: nn.Module, twin: TwinCheckpoint,
                       filter_fn) -> Dict[str, Tuple[nn.Module, Dict[str, str]]]:
        """path -> (layer, {attribute: "lowrank"/"dense"}) of the layers that will mix."""
        by_layer: Dict[str, Dict[str, str]] = {}
        for name in list(twin.lowrank) + list(twin.dense):
            path, _, attr = name.rpartition(".")
            by_layer.setdefault(path, {})[attr] = "lowrank" if name in twin.lowrank else "dense"
        layers = {path: (module.get_submodule(path), attrs) for path, attrs in by_layer.items()}
        return {path: (layer, attrs) for path, (layer, attrs) in layers.items()
                if filter_fn is None or filter_fn(layer, path)}

    def _patch_layers(self, twin: TwinCheckpoint,
                      layers: Dict[str, Tuple[nn.Module, Dict[str, str]]],
                      kinds: Dict[str, str], tp_layers: Dict[str, bool]) -> None:
        chosen: Dict[str, nn.Module] = {}
        for path, (layer, attrs) in layers.items():
            chosen[path] = layer
            self._patch(layer, kinds[path], path, attrs)
            layer._twin_tp = tp_layers[path]
            layer._twin_lowrank = {a for a, k in attrs.items() if k == "lowrank"}
            layer._twin_attrs = list(attrs)
            layer._twin_ranks = {}
            if isinstance(layer, _TwinScale):
                _register(layer, "_twin_unit", torch.ones_like(_own(layer, "weight")))
            for attr, k in attrs.items():
                p = _own(layer, attr)
                full = f"{path}.{attr}" if path else attr
                # A tensor-parallel layer keeps the slices of its rank's shard (`_tp`).
                if k == "lowrank":
                    lr = twin.lowrank[full]
                    for f, t in zip("USV", (lr.U_cat, lr.S_cat, lr.V_cat)):
                        t = _tp.shard_twin_tensor(t, p, f, full)
                        _register(layer, f"_twin_{attr}_{f}", t.to(device=p.device, dtype=p.dtype))
                    layer._twin_ranks[attr] = list(lr.ranks)
                else:
                    t = twin.dense[full]
                    t = _tp.shard_twin_tensor(t, p, "dense", full)
                    _register(layer, f"_twin_{attr}_deltas", t.to(device=p.device, dtype=p.dtype))
        mixing = {id(layer) for layer in chosen.values()}
        for layer in chosen.values():
            # The mixing layers inside it (itself first): a fallback serves them per row too.
            layer._twin_subtree = [m for m in layer.modules() if id(m) in mixing]
        tensors = dict(self.module.named_parameters(remove_duplicate=False))
        tensors.update(self.module.named_buffers(remove_duplicate=False))
        index: Dict[int, int] = {}
        for name in list(twin.lowrank) + list(twin.dense):
            path, _, attr = name.rpartition(".")
            if path not in chosen:
                continue
            # Tied tensors mix under each name but are merged once.
            key = id(tensors[name])
            if key not in index:
                index[key] = len(self._mixed)
                self._mixed.append((name, chosen[path], attr,
                                    "lowrank" if name in twin.lowrank else "dense"))
            self._served.append((chosen[path], attr, index[key]))

    @staticmethod
    def _head_plan(module: nn.Module, twin: TwinCheckpoint, fn: str):
        """(path, head layer, relative names) of the task heads, checked before anything
        changes; None without heads."""
        if not twin.heads:
            return None
        names = list(next(iter(twin.heads.values())))
        path = _head_path(names)
        try:
            layer = module.get_submodule(path)
        except AttributeError as e:
            raise ValueError(f"{fn}: the twin's head tensors {names} are not in one submodule of "
                             f"the module: {e}") from e
        if path == "" or layer is module:
            raise ValueError(f"{fn}: the twin's head tensors {names} must sit in one submodule "
                             f"(e.g. 'classifier'), not across the model")
        mixed = [n for n in list(twin.lowrank) + list(twin.dense) if n.startswith(path + ".")]
        if mixed:
            raise ValueError(f"{fn}: the head module {path!r} also holds mixed twin parameters "
                             f"({mixed[0]!r})")
        rel = [n[len(path) + 1:] for n in names]
        for r in rel:
            sub = r.rpartition(".")[0]
            try:
                layer.get_submodule(sub)
            except AttributeError as e:
                raise ValueError(f"{fn}: head tensor {path}.{r!r} has no module in the module: "
                                 f"{e}") from e
        return path, layer, rel

    def _patch_heads(self, twin: TwinCheckpoint, head) -> None:
        # In __dict__, not as a submodule: it is already inside self.module.
        self.__dict__["_head_layer"] = None
        if head is None:
            return
        path, layer, rel = head
        self._patch(layer, "head", path)
        targets = []
        for r in rel:
            sub, _, attr = r.rpartition(".")
            owner = layer.get_submodule(sub)
            if not isinstance(owner, _TwinParams):  # serves its head tensors per task
                self._patch(owner, "params", f"{path}.{sub}")
            targets.append((owner, attr))
        layer._twin_head_targets = targets
        layer._twin_head_pad = self.head_pad_value
        device = next(iter(layer.parameters()), torch.empty(0)).device
        names = list(next(iter(twin.heads.values())))
        for t, task in enumerate(self.tasks):
            for i, n in enumerate(names):
                _register(layer, f"_twin_head_{t}_{i}", twin.heads[task][n].to(device))
        self.__dict__["_head_layer"] = layer

    def unwrap(self) -> nn.Module:
        """Restores the module's layers (classes, no twin buffers) and returns it; it keeps θs.
        The wrapper refuses every call afterwards. Calling it again returns the module.

        Errors: ValueError while calls (another thread's, a merged() block) are in flight."""
        with self._calls.idle("TwinMergedModule.unwrap"):
            self._calls.closed = True  # from here on every call is refused
            for layer, cls in reversed(self._patched):
                for key in [k for k in layer._buffers if k.startswith("_twin_")]:
                    del layer._buffers[key]
                for attr in [a for a in vars(layer) if a.startswith("_twin_")]:
                    delattr(layer, attr)
                layer.__class__ = cls
            self._patched.clear()
            if self._stack_name is not None:
                uninstall_prefix(self.module.get_submodule(self._stack_name))
            self._mixed.clear()
            self._served.clear()
            self._pool.clear()
        return self.module

    def _apply(self, fn, recurse=True):
        # .to(), .half(), ...: never under a call, which would merge from half-moved tensors;
        # merged copies belong to the old device and dtype.
        if "_calls" not in self.__dict__:  # during __init__ (nn.Module registers tensors)
            return super()._apply(fn, recurse)
        with self._calls.idle("TwinMergedModule.to"):
            self._pool.clear()
            return super()._apply(fn, recurse)

    def __getattr__(self, name: str):
        """Names the wrapper does not have fall through to the wrapped module (config, device,
        dtype, generation_config, can_generate(), get_input_embeddings(), ...), as PEFT's
        PeftModel does; the wrapper's own names win. Setting one sets it on the wrapper: set
        the module's on wrapped.module."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__["_modules"].get("module")
            if module is None or name.startswith("__"):
                raise
            return getattr(module, name)

    def generate(self, input_ids: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, mix_weights: Optional[Tensor] = None,
                 head_tasks: Optional[Tensor] = None,
                 router_text: Optional[Sequence[str]] = None, **generate_kwargs):
        """transformers' generate with each request served by its own model θ(w_b).

        Semantics: out[b·k + j] = the plain model θ(mix_weights[b]).generate(...)'s j-th
        sequence for request b, k = max(num_beams, num_return_sequences): every strategy and
        option of the module's generate (greedy, sampling, beam search, KV caches dynamic and
        static, stopping criteria, streamers, return_dict_in_generate).
        Shape: input_ids [B, L] (left padding, with attention_mask [B, L]); mix_weights [B, T]
        (a model per request), [T] (one for all), or None: the router, once per request on the
        prompt (one pass of θs, or none for a TextRouter, which reads router_text, one string
        per request; its time is last_call["route_s"]); the weights stay fixed for every step.
        head_tasks [B] (twins with task heads; default argmax of the weights).
        Mode: factored runs one generate for the batch; materialize merges once per distinct
        weight row and runs one generate per row group (sequences padded on the right with the
        pad token); auto chooses by the cost model with prefill and decode tokens counted
        (last_call: "prefill_tokens", "decode_tokens", the estimates, "generate_s"). Inside a
        merged(w) block, a call without mix_weights serves the block's merge. No gradients are
        recorded. Errors: TypeError for a module without generate; ValueError for bad prompts or
        weights (as a call), and for return_dict_in_generate or a streamer when materialize or
        group mode must split the batch.
        """
        return _generate(self, input_ids, attention_mask, mix_weights, head_tasks,
                         router_text=router_text, **generate_kwargs)

    @property
    def last_call(self) -> Dict[str, Any]:
        """This thread's (or asyncio task's) last call: {"mode", "weights", "head_tasks", ...}
        (class docstring); {} before the first. Calls run by torch.compile'd code leave it
        as it was (Dynamo cannot trace a ContextVar's set)."""
        return self._calls.last.get() or {}

    # --- routing --------------------------------------------------------------------------------

    def route(self, *args, router_text: Optional[Sequence[str]] = None, **kwargs) -> Tensor:
        """The router's mixing weights for a batch: softmax(router(features)/temperature) [B, T].

        Features come from a forward pass of θs (`router_features`, default the router's own:
        pooled hidden states, or subspace energies for an EnergyRouter, from input_ids and
        attention_mask). This is the first of the paper's two passes; call it yourself
        to time it separately, then pass the result as mix_weights. A router that reads text
        (TextRouter, ProductRouter) needs router_text, the batch's rows' texts; a TextRouter
        runs no pass of θs at all.
        """
        fn = "TwinMergedModule.route"
        with self._calls(fn):
            saved = self._ctx.enter()
            try:
                return self._route(args, kwargs, fn, router_text)
            finally:
                self._ctx.leave(saved)

    @staticmethod
    def _refuse_unread_text(router_text, routed: bool, pinned: bool, fn: str) -> None:
        """router_text on a call whose weights are given (mix_weights, or a merged() block)
        would be ignored: refused."""
        if router_text is not None and not routed:
            raise ValueError(f"{fn}: router_text is given, but the weights are "
                             + ("the merged() block's" if pinned else "given (mix_weights)")
                             + ", so no router would read it; pass one or the other")

    def _router_texts(self, router_text, B: Optional[int], fn: str) -> Optional[List[str]]:
        """The call's router_text, checked against the router: required by one that reads
        text, refused by one that does not (it would be ignored), one string per row."""
        reads = getattr(self.router, "reads_text", False)
        if router_text is None:
            if reads:
                raise ValueError(f"{fn}: the router ({type(self.router).__name__}) reads each "
                                 f"row's text: pass router_text=[one string per row], or "
                                 f"mix_weights")
            return None
        if not reads:
            raise ValueError(f"{fn}: router_text is given, but the router "
                             f"({type(self.router).__name__}) does not read text; drop it, or "
                             f"route with a TextRouter or ProductRouter")
        return check_texts(router_text, fn, "router_text", rows=B)

    def _route(self, args, kwargs, fn: str, router_text=None) -> Tensor:
        if self.router is None:
            raise ValueError(f"{fn}: no router: pass mix_weights, or give the wrapper a "
                             f"router (or a twin with one attached)")
        first = _first_batched(args, kwargs)
        texts = self._router_texts(router_text, first.shape[0] if first is not None else None,
                                   fn)
        if isinstance(self.router, TextRouter):
            if self.router_features is not None:
                raise ValueError(f"{fn}: router_features= is given, but the router (TextRouter) "
                                 f"reads router_text, not features; drop one")
            with torch.no_grad():
                return self.router.weights(texts, self.temperature, self.top_k)
        if self.router_features is not None:
            feats = self.router_features(self.module, args, kwargs)
        else:
            ids, mask = call_inputs(self.module, args, kwargs)
            if not isinstance(ids, Tensor):
                raise ValueError(f"{fn}: the default router features need input_ids (a "
                                 f"[B, L] tensor, first positional or keyword argument); "
                                 f"pass router_features= for other inputs")
            if mask is None:
                mask = torch.ones_like(ids)
            indices = self._prefix_indices(fn, required=False)
            if indices is not None and self._stack_checked(ids, mask, fn):
                return self._prefix_route(ids, mask, indices, fn, texts)
            feats = self.router.features(self, ids, mask)
        if texts is not None:
            feats = (feats, texts)
        with torch.no_grad():
            return self.router.weights(feats, self.temperature, self.top_k)

    def _prefix_indices(self, fn: str, required: bool) -> Optional[List[int]]:
        """The router's hidden-state indices when it can route from the first layers of the
        stack (a pooled-states router, default features, every index before the last layer's
        output); else None, or a ValueError saying why when `required` (routing="self")."""
        router, why = self.router, None
        if router is None:
            why = "there is no router (give the wrapper one, or a twin with one attached)"
        elif self.router_features is not None:
            why = "router_features= replaces the router's own features"
        elif type(router).features is not Router.features:
            why = (f"a {type(router).__name__} does not read pooled hidden states (TwinRouter "
                   f"and PrototypeRouter do)")
        elif self._stack_name is None:
            why = f"{type(self.module).__name__} has no stack of layers to read them from"
        else:
            n = len(self.module.get_submodule(self._stack_name))
            indices = stack_indices(router.layer, n, fn)
            if max(indices) < n:
                return indices
            why = (f"the router reads hidden state {n} (the last layer's output, "
                   f"layer={router.layer!r}), so it needs the whole pass; fit it on layers "
                   f"< {n}")
        if required:
            raise ValueError(f"{fn}: routing='self' computes the weights inside the pass, "
                             f"from the hidden states entering the first layers, but {why}")
        return None

    def _stack_checked(self, ids: Tensor, mask: Tensor, fn: str) -> bool:
        """Whether the stack's layer inputs are the module's hidden states (checked once, on
        the first call that routes from them; `_prefix.stack_reads_hidden_states`)."""
        ok = self.__dict__.get("_stack_ok")
        if ok is None:
            mask = check_mask(ids, mask, fn)
            with _eval_mode(self.module):
                ok = stack_reads_hidden_states(self, ids, mask)
            self.__dict__["_stack_ok"] = ok
        return ok

    def _prefix_route(self, ids: Tensor, mask: Tensor, indices: List[int], fn: str,
                      texts: Optional[List[str]] = None) -> Tensor:
        """The router pass cut short: θs runs up to the last layer the router reads."""
        mask = check_mask(ids, mask, fn)
        p = Prefix(self, indices, mask, stop=True, texts=texts)
        self._ctx.prefix = p
        try:
            with _eval_mode(self.module), torch.no_grad():
                device = _model_device(self.module)
                self.module(input_ids=ids.to(device), attention_mask=mask.to(device))
        except _Stop:
            pass
        finally:
            self._ctx.prefix = None
        if p.weights is None:
            raise ValueError(f"{fn}: layer {p.k} of the module's stack "
                             f"({self._stack_name!r}) never ran in the forward pass")
        return p.weights

    def _check_weights(self, w, B: Optional[int], fn: str, routed: bool = False,
                       values: bool = True) -> Tensor:
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
        elif w.dim() != 2 or w.shape[1] != T:
            raise ValueError(f"{fn}: mix_weights must have shape [B, T={T}] or [T={T}], got "
                             f"{list(w.shape)}")
        elif B is not None and w.shape[0] != B:
            raise ValueError(f"{fn}: mix_weights has {w.shape[0]} rows but the batch has B={B} "
                             f"(the first dimension of the first tensor input)")
        if values and self.check_finite and not all_finite(w):
            what = ("the router's weights have NaN/Inf entries (NaN/Inf in the router's "
                    "features: check the inputs and router_features)" if routed else
                    "mix_weights has NaN/Inf entries")
            raise ValueError(f"{fn}: {what} in {nonfinite_rows(w.reshape(-1, T))}")
        return w.unsqueeze(0).expand(B, T) if w.dim() == 1 else w

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
                head_tasks: Optional[Tensor] = None, router_text: Optional[Sequence[str]] = None,
                **kwargs):
        fn = "TwinMergedModule"
        with self._calls(fn):
            saved = self._ctx.enter()
            try:
                return self._forward(args, kwargs, mix_weights, head_tasks, fn, router_text)
            finally:
                self._ctx.leave(saved)

    def _forward(self, args, kwargs, mix_weights, head_tasks, fn: str, router_text=None):
        first = _first_batched(args, kwargs)
        B = first.shape[0] if first is not None else None
        block = self._calls.pinned.get()
        pinned = block is not None and mix_weights is None
        routed = mix_weights is None and not pinned
        self._refuse_unread_text(router_text, routed, pinned, fn)
        if pinned:
            mix_weights = block
        elif routed and self.routing == "self" and not isinstance(self.router, TextRouter):
            return self._self_routed(args, kwargs, head_tasks, B, fn, router_text)
        elif routed:
            mix_weights = self.route(*args, router_text=router_text, **kwargs)
        one_vector = isinstance(mix_weights, Tensor) and mix_weights.dim() == 1
        # A block's weights were checked when it began.
        rw = self._check_weights(mix_weights, B, fn, routed, values=not pinned)
        B = rw.shape[0]
        if head_tasks is not None:
            head_tasks = self._check_head_tasks(head_tasks, B, rw.device, fn)
        elif self._head_layer is not None:
            head_tasks = rw.argmax(-1)

        mode = "materialize" if pinned else self.mode
        plan: Dict[str, Any] = {"merged_block": True} if pinned else {}
        # Merges run under no_grad: only the factored mode carries gradients to the weights.
        needs_grad = torch.is_grad_enabled() and rw.requires_grad
        if B == 0:
            mode, plan = "factored", {"empty_batch": True}  # one pass, nothing to merge
        elif mode == "auto":
            mode, plan = ("factored", {"weights_require_grad": True}) if needs_grad else \
                self._plan(rw, one_vector, first)
            if mode == "materialize" and plan["distinct_rows"] > 1 and \
                    _kv_cache((args, kwargs)) is not None:
                mode, plan["kv_cache"] = "factored", True  # one pass: the cache is whole
        elif needs_grad and mode != "factored":
            raise ValueError(f"{fn}: mix_weights requires grad, but mode {mode!r} merges "
                             f"without recording gradients, so none would reach the "
                             f"weights; use mode='factored' (or 'auto') to train through "
                             f"them, or pass mix_weights.detach()")
        elif mode == "group" and one_vector:
            mode = "materialize"
        if not torch.compiler.is_compiling():  # Dynamo cannot trace ContextVar.set
            self._calls.last.set({"mode": mode, "weights": rw, "head_tasks": head_tasks,
                                  **plan})
        if mode == "factored":
            return self._run(args, kwargs, rw, head_tasks)
        return self._run_merged(args, kwargs, rw, head_tasks, one_vector,
                                group=mode == "group", pinned=pinned)

    def _self_routed(self, args, kwargs, head_tasks, B: Optional[int], fn: str,
                     router_text=None):
        """routing="self": one factored pass; the layers before the router's last hidden state
        run θs, the router runs where that state enters the stack, the rest serve θ(w_b)
        (`_prefix`)."""
        if self.mode in ("materialize", "group"):
            raise ValueError(f"{fn}: routing='self' computes the weights inside a factored pass, "
                             f"but mode is {self.mode!r} (it merges before the pass); use "
                             f"mode='factored' or 'auto', or routing='two_pass'")
        indices = self._prefix_indices(fn, required=True)
        ids, mask = call_inputs(self.module, args, kwargs)
        mask = check_mask(ids, mask, fn)
        texts = self._router_texts(router_text, ids.shape[0], fn)
        if any(m.training for m in self.module.modules()):
            raise ValueError(f"{fn}: routing='self' routes on this pass's hidden states, but the "
                             f"module is in training mode (dropout would make the weights "
                             f"random); call eval() first, or pass mix_weights")
        if not self._stack_checked(ids, mask, fn):
            raise ValueError(f"{fn}: routing='self' reads the hidden states as they enter the "
                             f"layers of {self._stack_name!r}, but this model's hidden_states "
                             f"are not those inputs (a model that records each layer's output, "
                             f"as Mamba does); use routing='two_pass'")
        if head_tasks is not None:
            head_tasks = self._check_head_tasks(head_tasks, ids.shape[0], ids.device, fn)
        ctx = self._ctx
        p = Prefix(self, indices, mask, stop=False, head_tasks=head_tasks, texts=texts)
        ctx.prefix = p
        try:
            out = self.module(*args, **kwargs)
        finally:
            ctx.prefix = ctx.row_weights = ctx.head_tasks = None
        if p.weights is None:
            raise ValueError(f"{fn}: layer {p.k} of the module's stack "
                             f"({self._stack_name!r}) never ran in the forward pass")
        if not torch.compiler.is_compiling():
            self._calls.last.set({"mode": "factored", "weights": p.weights,
                                  "head_tasks": p.used_heads, "self_routed": True,
                                  "routed_at_layer": p.k})
        return out

    def _check_no_checkpointing(self, fn: str) -> None:
        """Activation checkpointing recomputes layers in backward, after the call has cleared
        its weights: the recomputation would serve θs and the gradients would be wrong."""
        if torch.is_grad_enabled() and self.module.training and any(
                getattr(m, "gradient_checkpointing", False) is True and m.training
                for m in self.module.modules()):
            raise ValueError(f"{fn}: the module has activation (gradient) checkpointing on, "
                             f"whose backward recomputes layers after this call has cleared its "
                             f"per-row weights (the gradients would be those of θs); turn it "
                             f"off (activation_checkpointing_disable()), or serve under "
                             f"torch.no_grad()")

    def _run(self, args, kwargs, rw: Tensor, head_tasks: Optional[Tensor]):
        self._check_no_checkpointing("TwinMergedModule")
        ctx = self._ctx
        ctx.row_weights, ctx.head_tasks = rw, head_tasks
        try:
            return self.module(*args, **kwargs)
        finally:
            ctx.row_weights = ctx.head_tasks = None

    # --- materialize / group ----------------------------------------------------------------------

    def _merge_into(self, s: BufferSet, w: Tensor) -> None:
        """θ(w) into the set's buffers (allocated on first use, or again after .to())."""
        s.holds = None  # a merge cut short leaves a set that holds nothing
        fresh = s.overrides is None
        on_device: Dict[torch.device, Tensor] = {}
        with torch.no_grad():
            for i, (_, layer, attr, kind) in enumerate(self._mixed):
                p, buf = _own(layer, attr), s.tensors.get(i)
                if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or \
                        buf.device != p.device:
                    with torch.inference_mode(False):  # tensor-parallel: a shard, placed as p
                        buf = _tp.like(torch.empty_like(
                            _tp.local(p), memory_format=torch.contiguous_format), p)
                    s.tensors[i] = buf
                    s.overrides = None  # until rebuilt below: never serve a dropped buffer
                    fresh = True
                wd = on_device.get(p.device)
                if wd is None:
                    wd = on_device[p.device] = w.to(p.device)
                bl, pl = _tp.local(buf), _tp.local(p)  # each rank merges its own slices
                if kind == "lowrank":
                    U, S, V = layer._twin_factors(attr)
                    lowrank_merge_(bl, pl, U, S, V, layer._twin_ranks[attr], wd)
                else:
                    dense_merge_(bl, pl, layer._twin_dense(attr), wd)
        if fresh:
            over: Dict[nn.Module, Dict[str, Tensor]] = {}
            for layer, attr, i in self._served:
                over.setdefault(layer, {})[attr] = s.tensors[i]
            s.overrides = over
            s.cuda_devices = {t.device for t in s.tensors.values() if t.is_cuda}
        s.holds = w

    def _serve_merged(self, w: Tensor, pinned: bool, head_tasks, run: Callable[[], Any],
                      rows=None):
        """run() (the module on some rows, or its generate) with θ(w) served, from a buffer set
        of this call alone; `rows` fits head tasks to a generate's expanded rows."""
        ctx = self._ctx
        with self._pool.take(w if pinned else None) as s:
            if s.holds is not w:
                self._merge_into(s, w)
            saved = ctx.overrides, ctx.head_tasks, ctx.rows
            ctx.overrides, ctx.head_tasks, ctx.rows = s.overrides, head_tasks, rows
            try:
                return run()
            finally:
                ctx.overrides, ctx.head_tasks, ctx.rows = saved

    @contextmanager
    def merged(self, weights: Tensor):
        """One merge for several calls with the same weights (a group's rows served in several
        length-bucketed batches, a request's generation steps).

        Semantics: on entry θ(weights) is merged into a buffer set; inside the block a call of
        this thread (or asyncio task) without mix_weights serves these weights on every row
        (materialize mode, whatever `mode` is) and does not merge again while a set still holds
        them. A call with mix_weights runs as usual; if other calls merged into the sets
        meanwhile, the block's weights are merged again at its next call. Blocks belong to the
        thread or task that opened them (a ContextVar): other threads' and tasks' calls do not
        see them. The block must not change θs or the twin's tensors: what was merged is what
        is served.
        Shape: weights [T]. Blocks do not nest (in one thread or task).
        Errors: ValueError for weights not of shape [T], with NaN/Inf, or a nested block.
        """
        fn = "TwinMergedModule.merged"
        with self._calls(fn):
            if self._calls.pinned.get() is not None:
                raise ValueError(f"{fn}: already inside a merged() block; blocks do not nest")
            T = len(self.tasks)
            if not isinstance(weights, Tensor) or not weights.is_floating_point() or \
                    weights.shape != (T,):
                raise ValueError(f"{fn}: weights must be a floating tensor of shape [T={T}], "
                                 f"got {_describe_tensor(weights)}")
            if not all_finite(weights):
                raise ValueError(f"{fn}: weights has NaN/Inf entries: {weights.tolist()}")
            pinned = weights.detach().clone()  # its identity marks the block's merge
            with self._pool.take() as s:
                self._merge_into(s, pinned)
            token = self._calls.pinned.set(pinned)
            try:
                yield self
            finally:
                self._calls.pinned.reset(token)

    def _run_merged(self, args, kwargs, rw: Tensor, head_tasks: Optional[Tensor],
                    one_vector: bool, group: bool, pinned: bool = False):
        B = rw.shape[0]
        if one_vector:
            groups = [(None, self._calls.pinned.get() if pinned else rw[0])]
        else:
            if group:
                member, centers = self.groups(rw)
                self._calls.last.get()["groups"] = member
            else:
                centers, member = torch.unique(rw, dim=0, return_inverse=True)
            groups = [((member == g).nonzero().flatten(), centers[g])
                      for g in range(centers.shape[0])]
            groups = [(idx, c) for idx, c in groups if idx.numel()]
            cache = _kv_cache((args, kwargs)) if len(groups) > 1 else None
            if cache is not None:
                raise ValueError(f"TwinMergedModule: mode {'group' if group else 'materialize'!r} "
                                 f"serves each of the {len(groups)} distinct weight rows as a "
                                 f"sub-batch, but the call passes a KV cache ({cache}) that holds "
                                 f"every row and cannot be split; use mode='factored' or 'auto' "
                                 f"(one pass for all rows), or one weight vector per call")
        outs, counts, order = [], [], []
        for idx, w in groups:
            if idx is not None and idx.numel() == B:
                idx = None  # one group holds every row: no slicing
            if idx is None:
                a, k, h = args, kwargs, head_tasks
            else:
                a, k = _map_rows(lambda v: v[idx.to(v.device)], B, (args, kwargs))
                h = head_tasks[idx.to(head_tasks.device)] if head_tasks is not None else None
            outs.append(self._serve_merged(w, pinned, h, lambda a=a, k=k: self.module(*a, **k)))
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
        if not all_finite(weights):
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
        """The cost model of one call: its tokens are the batched input's (all but the feature
        dimension of a floating input)."""
        if first is None:
            tokens = rw.shape[0]
        elif first.is_floating_point():
            tokens = first.numel() // max(1, first.shape[-1])
        else:
            tokens = first.numel()
        return self._cost_plan(rw, one_vector, tokens)

    def _cost_plan(self, rw: Tensor, one_vector: bool, tokens: int, passes: int = 1,
                   rows: Optional[int] = None, distinct: Optional[int] = None):
        """METHOD.md §3: factored costs 2K(m+n) extra FLOPs per token and matrix; materializing
        costs one merge per distinct weight row (2mnK FLOPs, or on CUDA at least the memory
        traffic of reading Ws and writing W(w), whichever is larger), once for all `passes`
        (forward calls: a generation's prefill and decode steps) over `rows` rows each. Dense
        tensors mix per row and pass; a fallback layer merges per row and pass."""
        if distinct is None:
            distinct = 1 if one_vector else int(torch.unique(rw, dim=0).shape[0])
        B = rw.shape[0] if rows is None else rows
        factored = materialize = 0.0
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
                extra = 2.0 * p.numel() * len(self.tasks) * B * passes
            if isinstance(layer, _TwinFallback):
                extra = merge * (1 if one_vector else B) * passes
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
