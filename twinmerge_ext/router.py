"""The Twin-Merging router (METHOD.md §1, Stage 2): which experts an input needs, and how much.

- `TwinRouter`: the authors' MLP over pooled features of the shared expert, T logits per input.
  `weights()` turns them into mixing weights `w(x) = softmax(router(x) / temperature)`, with an
  optional top-k renormalization (the paper uses temperature 1 and no top-k).
- `pooled_features`: the router's input, the shared expert's hidden states of one layer (or
  several, concatenated) pooled over the real (non-padding) tokens of each sequence (mean, max,
  first or last token, or several of these concatenated).
- `fit_router`: trains the router with cross-entropy on task ids and selects the epoch on a
  held-out validation split of the given data. The authors' code selects it on the test set
  (METHOD.md §2); this module never sees a test set.
"""

import copy
import math
from abc import ABCMeta, abstractmethod
from contextlib import contextmanager
from numbers import Integral, Real
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twinmerge_ext._finite import all_finite, nonfinite_rows

__all__ = ["Router", "TwinRouter", "fit_router", "pool_hidden_states", "pooled_features",
           "router_from_config"]

_POOLINGS = ("mean", "max", "cls", "last")
_CONFIG_KEYS = ("in_features", "tasks", "hidden", "dropout", "negative_slope", "layer", "pooling",
                "standardize")


def _int_arg(value, arg: str, fn: str, minimum: Optional[int]) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{fn}: {arg} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{fn}: {arg} must be >= {minimum}, got {value!r}")
    return int(value)


def _layer_arg(value, fn: str) -> Union[int, Tuple[int, ...]]:
    """layer: one hidden-state index, or a non-empty sequence of them (features concatenated)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{fn}: layer must be an int or a non-empty sequence of ints, "
                             f"got {value!r}")
        return tuple(_int_arg(v, "layer", fn, None) for v in value)
    return _int_arg(value, "layer", fn, None)


def _pooling_arg(value, fn: str) -> Union[str, Tuple[str, ...]]:
    """pooling: one of _POOLINGS, or a non-empty sequence of them (features concatenated)."""
    items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    bad = [p for p in items if not isinstance(p, str) or p not in _POOLINGS]
    if not items or bad:
        raise ValueError(f"{fn}: pooling must be one of {list(_POOLINGS)} or a non-empty sequence "
                         f"of them, got {value!r}")
    return items if isinstance(value, (list, tuple)) else value


def _bool_arg(value, arg: str, fn: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {arg} must be a bool, got {value!r}")
    return value


def _real_arg(value, arg: str, fn: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{fn}: {arg} must be a real number, got {value!r} "
                        f"({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {arg} must be finite, got {value!r}")
    return value


def _check_finite_rows(x: Tensor, arg: str, fn: str) -> None:
    """Rows of x with NaN/Inf would route to NaN weights (or train a NaN router): named."""
    if not all_finite(x):
        raise ValueError(f"{fn}: {arg} has NaN/Inf entries in {nonfinite_rows(x)}")


def _task_list(tasks, fn: str) -> List[str]:
    tasks = list(tasks)
    bad = [t for t in tasks if not isinstance(t, str)]
    if bad:
        raise TypeError(f"{fn}: task names must be str, got {bad[0]!r} ({type(bad[0]).__name__})")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"{fn}: task names must be unique, got {tasks!r}")
    return tasks


def _tasks_of(data, arg: str, what: str, fn: str) -> List[str]:
    """The task names of a training mapping task name -> `what` (at least 2 to route between)."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{fn}: {arg} must be a mapping task name -> {what}, got "
                        f"{type(data).__name__}")
    tasks = _task_list(data.keys(), fn)
    if len(tasks) < 2:
        raise ValueError(f"{fn}: {arg} must hold at least 2 tasks to route between, got "
                         f"{tasks!r}")
    return tasks


class Router(nn.Module, metaclass=ABCMeta):
    """What every router kind offers, and all that TwinMergedModule and the twin file use.

    A router maps pooled features of the shared expert (made as its `layer` and `pooling` say,
    `pooled_features`) to one logit per task; `weights()` turns them into mixing weights. Kinds:
    `TwinRouter` (the paper's MLP, kind "mlp") and `PrototypeRouter` (nearest task prototypes,
    kind "prototype"); `EnergyRouter` (kind "energy") reads the twin's subspace energies instead,
    `TextRouter` (kind "text") the request's raw text, and `ProductRouter` (kind "product") a
    pooled-state router's features and the text (`reads_text`). `config()` holds the constructor arguments (and "kind" but for the MLP,
    whose files predate kinds); `router_from_config` rebuilds any kind from it.
    """

    kind = ""

    def _init_common(self, in_features, tasks, layer, pooling, standardize, fn: str) -> None:
        in_features = _int_arg(in_features, "in_features", fn, 1)
        tasks = _task_list(tasks, fn)
        if not tasks:
            raise ValueError(f"{fn}: tasks must name at least one task, got []")
        self.in_features = in_features
        self.tasks = tasks
        self.layer = _layer_arg(layer, fn)
        self.pooling = _pooling_arg(pooling, fn)
        self.standardize = _bool_arg(standardize, "standardize", fn)
        if self.standardize:
            self.register_buffer("feature_mean", torch.zeros(in_features))
            self.register_buffer("feature_std", torch.ones(in_features))

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def _common_config(self) -> Dict[str, Any]:
        return {"in_features": self.in_features, "tasks": list(self.tasks),
                "layer": list(self.layer) if isinstance(self.layer, tuple) else self.layer,
                "pooling": list(self.pooling) if isinstance(self.pooling, tuple)
                else self.pooling}

    def _check_features(self, features: Tensor, fn: str) -> None:
        if not isinstance(features, Tensor):
            raise TypeError(f"{fn}: features must be a Tensor, got {type(features).__name__}")
        if features.dim() != 2 or features.shape[1] != self.in_features:
            raise ValueError(f"{fn}: features must have shape [B, {self.in_features}], "
                             f"got {list(features.shape)}")
        if not features.is_floating_point():
            raise TypeError(f"{fn}: features must be floating point, got {features.dtype}")
        _check_finite_rows(features, "features", fn)

    def _standardized(self, features: Tensor, device) -> Tensor:
        """The features on `device`, standardized (in float32 whatever the router's dtype: the
        large-scale features are the reason to standardize, and their mean cancels badly in 16
        bits) when the router standardizes."""
        x = features.to(device=device)
        if self.standardize:
            x = (x.float() - self.feature_mean.float()) / self.feature_std.float()
        return x

    def set_standardization(self, features: Tensor) -> None:
        """feature_mean/std from these (training) features: a feature constant there (std ≤
        1e-6·max(|mean|, 1)) gets std 1, as scikit-learn's StandardScaler does, since dividing
        by a std of rounding size would turn one ulp of difference at serving time into a unit
        step."""
        mean, std = features.mean(dim=0), features.std(dim=0, unbiased=False)
        constant = std <= 1e-6 * mean.abs().clamp_min(1.0)
        with torch.no_grad():
            self.feature_mean.copy_(mean)
            self.feature_std.copy_(torch.where(constant, torch.ones_like(std), std))

    @abstractmethod
    def _logits(self, features: Tensor, fn: str) -> Tensor:
        """logits [B, T] of features [B, in_features], checked (fn names the caller)."""

    @abstractmethod
    def config(self) -> Dict[str, Any]:
        """The constructor arguments (and "kind" but for the MLP) as a JSON-serializable dict."""

    def features(self, served: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """This router's input for a batch served by `served` (a TwinMergedModule): the shared
        expert's hidden states pooled as `layer` and `pooling` say."""
        return pooled_features(served.module, input_ids, attention_mask, layer=self.layer,
                               pooling=self.pooling)

    def forward(self, features: Tensor) -> Tensor:
        """Semantics: logits[b, t] = router score of task t for input b.
        Shape: features [B, d] -> logits [B, T].
        """
        return self._logits(features, f"{type(self).__name__}.forward")

    def weights(self, features: Tensor, temperature: float = 1.0,
                top_k: Optional[int] = None) -> Tensor:
        """Mixing weights for the experts.

        Semantics: w = softmax(logits / temperature); with top_k, w[b, t] = 0 outside the k
        largest logits of row b and the rest renormalized to sum 1 (= softmax over those k).
        Shape: features [B, d] -> w [B, T], rows sum to 1.
        Errors: ValueError for temperature <= 0 or top_k outside [1, T].
        """
        fn = f"{type(self).__name__}.weights"
        temperature = _real_arg(temperature, "temperature", fn)
        if temperature <= 0:
            raise ValueError(f"{fn}: temperature must be > 0, got {temperature!r}")
        if top_k is not None:
            top_k = _int_arg(top_k, "top_k", fn, 1)
            if top_k > self.num_tasks:
                raise ValueError(f"{fn}: top_k must be in [1, T={self.num_tasks}], got {top_k}")
        logits = self._logits(features, fn) / temperature
        if top_k is None or top_k == self.num_tasks:
            return torch.softmax(logits, dim=-1)
        # Renormalizing the softmax over the kept entries is exactly a softmax over their
        # logits; computing it that way avoids dividing by a tiny sum of probabilities.
        top, idx = logits.topk(top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))


class TwinRouter(Router):
    """The router MLP of METHOD.md §1: pooled features -> one logit per task.

    Semantics: logits = L3(drop(act(bn2(L2(drop(act(bn1(L1(z))))))))), act = LeakyReLU,
    z = (x − feature_mean) / feature_std with standardize=True, else z = x.
    Shape: features [B, in_features] (floating) -> logits [B, T], T = len(tasks).

    Args:
        in_features: d, the width of the pooled features.
        tasks: the task names, in logit order (logit t scores task tasks[t]).
        hidden: h, the width of both hidden layers; None -> 2·d (the authors' size).
        dropout: p of both Dropout layers, in [0, 1).
        negative_slope: of both LeakyReLUs (0.01 as in the authors' code).
        layer, pooling: how its features are made from the shared expert (`pooled_features`;
            layer and pooling may be sequences, their pooled states concatenated); kept with the
            router so that whoever serves it (TwinMergedModule) pools the same way.
        standardize: keep buffers feature_mean, feature_std [in_features] (0 and 1 until set;
            `fit_router(standardize=True)` sets them to the training features' statistics)
            and standardize the features with them. Pooled hidden states have a few dimensions
            of much larger scale than the rest; standardized, they do not dominate the first
            layer.

    BatchNorm1d makes the output depend on the batch in training mode; call `.eval()` (as
    `fit_router` and `from_config` return it) before routing inputs.
    Errors: TypeError/ValueError naming the argument and its value; features with NaN/Inf
    (their rows named) in forward and weights.
    """

    def __init__(self, in_features: int, tasks: Sequence[str], hidden: Optional[int] = None,
                 dropout: float = 0.5, negative_slope: float = 0.01,
                 layer: Union[int, Sequence[int]] = -1,
                 pooling: Union[str, Sequence[str]] = "mean", standardize: bool = False):
        super().__init__()
        fn = "TwinRouter"
        self._init_common(in_features, tasks, layer, pooling, standardize, fn)
        in_features = self.in_features
        hidden = 2 * in_features if hidden is None else _int_arg(hidden, "hidden", fn, 1)
        dropout = _real_arg(dropout, "dropout", fn)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{fn}: dropout must be in [0, 1), got {dropout!r}")
        negative_slope = _real_arg(negative_slope, "negative_slope", fn)
        self.hidden = hidden
        self.dropout = dropout
        self.negative_slope = negative_slope
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden),
            nn.LeakyReLU(negative_slope), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden),
            nn.LeakyReLU(negative_slope), nn.Dropout(dropout),
            nn.Linear(hidden, len(tasks)),
        )

    def _logits(self, features: Tensor, fn: str) -> Tensor:
        self._check_features(features, fn)
        weight = self.net[0].weight
        return self.net(self._standardized(features, weight.device).to(weight.dtype))

    def config(self) -> Dict[str, Any]:
        """The constructor arguments as a JSON-serializable dict (for checkpoints; "standardize"
        only when True)."""
        return {**self._common_config(), "hidden": self.hidden, "dropout": self.dropout,
                "negative_slope": self.negative_slope,
                # Written only when set, so readers that predate it still load other routers.
                **({"standardize": True} if self.standardize else {})}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any],
                    state_dict: Optional[Mapping[str, Tensor]] = None) -> "TwinRouter":
        """Rebuilds a router from `config()` and (optionally) its `state_dict()`, in eval mode.

        Errors: ValueError for missing or unknown config keys; load_state_dict's RuntimeError for
        a state dict that does not fit (strict loading).
        """
        fn = "TwinRouter.from_config"
        if not isinstance(cfg, Mapping):
            raise TypeError(f"{fn}: cfg must be a mapping, got {type(cfg).__name__}")
        missing = [k for k in ("in_features", "tasks") if k not in cfg]
        unknown = sorted(set(cfg) - set(_CONFIG_KEYS))
        if missing or unknown:
            raise ValueError(f"{fn}: cfg is missing keys {missing} / has unknown keys {unknown}; "
                             f"expected keys {list(_CONFIG_KEYS)}")
        router = cls(**dict(cfg))
        if state_dict is not None:
            router.load_state_dict(state_dict, strict=True)
        return router.eval()


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"{list(x.shape)} {x.dtype}"
    return type(x).__name__


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextmanager
def _eval_mode(model: nn.Module):
    """The model in eval mode for the block (its dropout would make features random). A model
    already in eval mode, as a served one is, is never written to, so threads can run it at
    once; one in training mode is switched to eval and back."""
    flags = [(m, m.training) for m in model.modules()]
    switch = any(training for _, training in flags)
    if switch:
        model.eval()
    try:
        yield
    finally:
        if switch:
            for m, training in flags:
                m.training = training


def pooled_features(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                    layer: Union[int, Sequence[int]] = -1,
                    pooling: Union[str, Sequence[str]] = "mean") -> Tensor:
    """The router's input: a transformers model's hidden states, pooled per sequence.

    Semantics (mean): f[b] = Σ_l m[b,l]·H[b,l,:] / Σ_l m[b,l], H = hidden_states[layer];
    "max": max over the non-padding tokens, per feature; "cls": H at the first non-padding
    token; "last": H at the last non-padding token. With a sequence of layers, f = the
    concatenation of each layer's pooled state, in that order; with a sequence of poolings, the
    concatenation over poolings (each over every layer): [p1(l1), p1(l2), p2(l1), p2(l2)].
    Shape: input_ids [B, L] (int), attention_mask [B, L] (0 = padding) ->
    f [B, d·len(layers)·len(poolings)], float32.

    `model` is any module whose forward takes input_ids, attention_mask and
    output_hidden_states=True and returns `hidden_states` (index 0 = embeddings, -1 = last layer).
    It runs under torch.no_grad and in eval mode (its dropout would make features random); each
    submodule's train/eval flag is restored afterwards. Inputs are moved to the model's device.
    Errors: ValueError for bad shapes, an unknown pooling, a layer out of range, or rows whose
    mask is all zero (named).
    """
    fn = "pooled_features"
    pooling = _pooling_arg(pooling, fn)
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or \
            input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError(f"{fn}: input_ids must be a 2-D integer tensor [B, L], got "
                         f"{_describe(input_ids)}")
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"{fn}: attention_mask must be a tensor of input_ids' shape "
                         f"{list(input_ids.shape)}, got "
                         f"{_describe(attention_mask)}")
    layer = _layer_arg(layer, fn)
    mask = attention_mask != 0
    _check_rows(mask, fn)

    device = _model_device(model)
    with _eval_mode(model), torch.no_grad():
        out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    output_hidden_states=True)
    if isinstance(out, Mapping):
        hidden_states = out.get("hidden_states")
    else:
        hidden_states = getattr(out, "hidden_states", None)
    if hidden_states is None:
        raise ValueError(f"{fn}: the model's output has no hidden_states "
                         f"(got {type(out).__name__}); it must honour output_hidden_states=True")
    return _pool_layers(hidden_states, mask, layer, pooling, fn)


def _check_rows(mask: Tensor, fn: str) -> None:
    """Every row must have a real token: its mean would be NaN, its max -inf, its "last" a
    padding token."""
    if not bool(mask.any(dim=1).all()):
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"{fn}: attention_mask rows {empty} have no non-padding token; "
                         "there is nothing to pool")


def pool_hidden_states(hidden_states: Sequence[Tensor], attention_mask: Tensor,
                       layer: Union[int, Sequence[int]] = -1,
                       pooling: Union[str, Sequence[str]] = "mean",
                       fn: str = "pool_hidden_states") -> Tensor:
    """The pooling of `pooled_features`, on hidden states already computed (one forward can
    serve several (layer, pooling) choices).

    Shape: hidden_states: a sequence of [B, L, d] (index 0 = embeddings); attention_mask [B, L]
    -> [B, d] float32 ([B, d·len(layer)·len(pooling)] for sequences of layers and poolings).
    Errors: ValueError for an unknown pooling, a layer out of range, or rows whose mask is all
    zero (named).
    """
    mask = attention_mask != 0
    _check_rows(mask, fn)
    return _pool_layers(hidden_states, mask, layer, pooling, fn)


def _pool_layers(hidden_states: Sequence[Tensor], mask: Tensor, layer, pooling,
                 fn: str) -> Tensor:
    """pool_hidden_states after its row check: mask [B, L] bool, every row non-empty."""
    poolings = _pooling_arg(pooling, fn)
    poolings = poolings if isinstance(poolings, tuple) else (poolings,)
    layers = _layer_arg(layer, fn)
    layers = layers if isinstance(layers, tuple) else (layers,)
    n = len(hidden_states)
    for i in layers:
        if not -n <= i < n:
            raise ValueError(f"{fn}: layer must be in [{-n}, {n}) for {n} hidden states, "
                             f"got {i}")
    mask = mask.to(hidden_states[layers[0]].device)
    parts = [_pool(hidden_states[i].float(), mask, p) for p in poolings for i in layers]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _pool(h: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """h [B, L, d] pooled over the tokens where mask [B, L] (bool, on h's device) is set."""
    if h.shape[1] == 0:  # only an empty batch gets here (_check_rows): nothing to pool
        return h.new_zeros(h.shape[0], h.shape[2])
    if pooling == "mean":
        m = mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(dim=1) / m.sum(dim=1)
    if pooling == "max":
        return h.masked_fill(~mask.unsqueeze(-1), -math.inf).amax(dim=1)
    positions = torch.arange(mask.shape[1], device=h.device).expand_as(mask)
    if pooling == "cls":
        # The first real token, so left-padded batches pool the same token as right-padded ones.
        idx = torch.where(mask, positions, mask.shape[1]).min(dim=1).values
    else:
        idx = torch.where(mask, positions, -1).max(dim=1).values
    return h[torch.arange(h.shape[0], device=h.device), idx]


def _task_features(extract: Callable[[Any], Tensor], batches: Iterable[Any], task: str,
                   limit: int, fn: str) -> Tensor:
    chunks, count = [], 0
    for batch in batches:
        f = extract(batch)
        if not isinstance(f, Tensor) or f.dim() != 2 or not f.is_floating_point():
            raise ValueError(f"{fn}: features of task {task!r} must be a floating 2-D tensor "
                             f"[b, d], got {_describe(f)}")
        _check_finite_rows(f, f"features of task {task!r} (batch {len(chunks)})", fn)
        chunks.append(f.detach())
        count += f.shape[0]
        # Features cost a forward pass of the shared model: stop once there are enough.
        if count >= limit:
            break
    if not chunks:
        return torch.empty(0, 0)
    if len({c.shape[1] for c in chunks}) != 1:
        raise ValueError(f"{fn}: features of task {task!r} have varying widths "
                         f"{sorted({c.shape[1] for c in chunks})}")
    return torch.cat([c.to(chunks[0].device) for c in chunks])[:limit]


def _router_data(features_fn_or_model, data, tasks: List[str], layer, pooling,
                 max_items_per_task: int, val_fraction: float, seed: int, device, fn: str):
    """(x_train, y_train, x_val, y_val, items per task, generator) of fit_router: features
    computed once, every task subsampled (seeded) to the same count and split (seeded,
    stratified) into validation and training items, all float32 on `device` (None: the
    features'); the generator that drew the splits, to draw on."""

    def extract(batch):
        if (isinstance(features_fn_or_model, nn.Module) and isinstance(batch, Mapping)
                and "input_ids" in batch and "attention_mask" in batch):
            return pooled_features(features_fn_or_model, batch["input_ids"],
                                   batch["attention_mask"], layer=layer, pooling=pooling)
        with torch.no_grad():
            return features_fn_or_model(batch)

    feats = {t: _task_features(extract, data[t], t, max_items_per_task, fn) for t in tasks}
    for t in tasks:
        n = feats[t].shape[0]
        n_val = round(n * val_fraction)
        if n_val < 1 or n - n_val < 1:
            raise ValueError(f"{fn}: task {t!r} has {n} items, too few for non-empty train and "
                             f"validation splits at val_fraction={val_fraction} "
                             f"(round({n}·{val_fraction}) = {n_val} validation items)")
    widths = {t: feats[t].shape[1] for t in tasks}
    if len(set(widths.values())) != 1:
        raise ValueError(f"{fn}: all tasks must give features of one width, got {widths}")
    device = torch.device(device) if device is not None else feats[tasks[0]].device

    g = torch.Generator().manual_seed(seed)
    n_per_task = min(f.shape[0] for f in feats.values())
    n_val = round(n_per_task * val_fraction)
    x_tr, y_tr, x_va, y_va = [], [], [], []
    for i, t in enumerate(tasks):
        f = feats[t].to(device=device, dtype=torch.float32)
        perm = torch.randperm(f.shape[0], generator=g)[:n_per_task].to(device)
        x_va.append(f[perm[:n_val]])
        x_tr.append(f[perm[n_val:]])
        y_va.append(torch.full((n_val,), i, dtype=torch.long, device=device))
        y_tr.append(torch.full((n_per_task - n_val,), i, dtype=torch.long, device=device))
    return (*(torch.cat(v) for v in (x_tr, y_tr, x_va, y_va)), n_per_task, g)


ROUTER_KINDS = ("mlp", "prototype")  # fit_router's; an EnergyRouter is fitted by fit_energy_router


def fit_router(features_fn_or_model: Union[nn.Module, Callable[[Any], Tensor]],
               data: Mapping[str, Iterable[Any]], epochs: int = 10, lr: float = 5e-4,
               weight_decay: float = 0.01, batch_size: int = 64, val_fraction: float = 0.2,
               hidden: Optional[int] = None, dropout: float = 0.5, seed: int = 0,
               max_items_per_task: int = 1000, device: Optional[Union[str, torch.device]] = None,
               progress: bool = False, layer: Union[int, Sequence[int]] = -1,
               pooling: Union[str, Sequence[str]] = "mean",
               standardize: bool = False, kind: str = "mlp",
               prototypes: int = 1) -> Tuple[Router, Dict[str, Any]]:
    """Fits a router of `kind` to predict each input's task, chosen on held-out data.

    Semantics, kind "mlp" (a `TwinRouter`, the paper's): minimize CE(router(f(x)), task(x))
    with AdamW over the train split; return the state after the epoch of highest validation
    accuracy (ties -> the earliest epoch). Kind "prototype" (a `PrototypeRouter`): each task's
    `prototypes` centres of its (standardized) training features (their mean for 1, KMeans
    centres for more), the logit scale that minimizes the validation cross-entropy; no
    training epochs (epochs, lr, weight_decay, batch_size, hidden, dropout unused).
    Shape: features f(x) [b, d] per batch; the router maps [B, d] -> [B, T], T = len(data).

    Features: if `features_fn_or_model` is an nn.Module and a batch is a mapping with
    "input_ids" and "attention_mask", f = pooled_features(model, ..., layer, pooling) (the shared
    expert stays frozen); otherwise f = features_fn_or_model(batch). Features are computed once.
    Data: task name -> iterable of batches; the task order gives the logit order. Batches are
    read until max_items_per_task items are featurized; every task is then subsampled (seeded)
    to the same count, min over tasks of min(items, max_items_per_task), so classes are
    balanced. Each task's items are split (seeded, stratified) into round(n·val_fraction)
    validation and the rest training items.
    Determinism: the same seed, data and device give the same router; shuffles and splits use a
    private torch.Generator, and init/dropout run inside torch.random.fork_rng, so the global
    RNG state is untouched.
    device: where the router trains; None -> where the features were computed.
    standardize: the router standardizes its input with the training split's per-feature mean
    and standard deviation (a feature constant there, std ≤ 1e-6·max(|mean|, 1), gets std 1),
    kept in the router (`TwinRouter(standardize=True)`).

    Returns (router in eval mode, report) with report = {"tasks", "kind", "val_accuracy",
    "val_accuracy_per_task", "n_train", "n_val", "n_items_per_task"} and for "mlp"
    "best_epoch" (0-based index into the per-epoch lists), "train_loss" (mean per epoch),
    "val_accuracy_per_epoch"; for "prototype" "scale", "val_loss".
    Errors: ValueError for fewer than 2 tasks, a task too small for non-empty train and
    validation splits (named), or bad hyper-parameters (named, with the value); TypeError for
    wrongly typed arguments.
    """
    fn = "fit_router"
    tasks = _tasks_of(data, "data", "iterable of batches", fn)
    epochs = _int_arg(epochs, "epochs", fn, 1)
    batch_size = _int_arg(batch_size, "batch_size", fn, 2)
    max_items_per_task = _int_arg(max_items_per_task, "max_items_per_task", fn, 2)
    seed = _int_arg(seed, "seed", fn, 0)
    lr = _real_arg(lr, "lr", fn)
    if lr <= 0:
        raise ValueError(f"{fn}: lr must be > 0, got {lr!r}")
    weight_decay = _real_arg(weight_decay, "weight_decay", fn)
    if weight_decay < 0:
        raise ValueError(f"{fn}: weight_decay must be >= 0, got {weight_decay!r}")
    val_fraction = _real_arg(val_fraction, "val_fraction", fn)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"{fn}: val_fraction must be in (0, 1), got {val_fraction!r}")
    if hidden is not None:
        _int_arg(hidden, "hidden", fn, 1)
    dropout = _real_arg(dropout, "dropout", fn)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{fn}: dropout must be in [0, 1), got {dropout!r}")
    pooling = _pooling_arg(pooling, fn)
    standardize = _bool_arg(standardize, "standardize", fn)
    layer = _layer_arg(layer, fn)
    if not callable(features_fn_or_model):
        raise TypeError(f"{fn}: features_fn_or_model must be an nn.Module or a callable, "
                        f"got {type(features_fn_or_model).__name__}")

    if kind not in ROUTER_KINDS:
        raise ValueError(f"{fn}: kind must be one of {list(ROUTER_KINDS)}, got {kind!r}")
    prototypes = _int_arg(prototypes, "prototypes", fn, 1)
    x_tr, y_tr, x_va, y_va, n_per_task, g = _router_data(
        features_fn_or_model, data, tasks, layer, pooling, max_items_per_task, val_fraction,
        seed, device, fn)
    if kind == "prototype":
        from twinmerge_ext.prototype_router import _fit_prototypes
        router, report = _fit_prototypes(x_tr, y_tr, x_va, y_va, tasks, layer, pooling,
                                         standardize, prototypes, seed)
        report.update(n_train=x_tr.shape[0], n_val=x_va.shape[0], n_items_per_task=n_per_task)
        return router, report
    d, device, n_train = x_tr.shape[1], x_tr.device, x_tr.shape[0]

    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    train_loss, val_acc_per_epoch = [], []
    best_epoch, best_state, best_per_task = 0, None, None
    with torch.random.fork_rng(devices=fork_devices):
        # Seed only the generators that fork_rng restores (torch.manual_seed would also reseed
        # every other GPU's generator, which fork_rng does not save).
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        router = TwinRouter(d, tasks, hidden=hidden, dropout=dropout, layer=layer,
                            pooling=pooling, standardize=standardize).to(device)
        if standardize:
            router.set_standardization(x_tr)
        opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=weight_decay)
        epoch_iter = range(epochs)
        if progress:
            from tqdm.auto import tqdm
            epoch_iter = tqdm(epoch_iter, desc=fn, unit="epoch")
        for epoch in epoch_iter:
            router.train()
            perm = torch.randperm(n_train, generator=g).to(device)
            starts = list(range(0, n_train, batch_size))
            # BatchNorm cannot train on a batch of one item: fold a trailing singleton into
            # the previous batch.
            if len(starts) > 1 and n_train - starts[-1] == 1:
                starts.pop()
            total = 0.0
            for j, s in enumerate(starts):
                e = starts[j + 1] if j + 1 < len(starts) else n_train
                idx = perm[s:e]
                loss = F.cross_entropy(router(x_tr[idx]), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * idx.numel()
            train_loss.append(total / n_train)

            router.eval()
            with torch.no_grad():
                correct = router(x_va).argmax(dim=-1) == y_va
            acc = correct.float().mean().item()
            val_acc_per_epoch.append(acc)
            if progress:
                epoch_iter.set_postfix(train_loss=train_loss[-1], val_acc=acc)
            # Strictly greater: ties keep the earliest epoch.
            if best_state is None or acc > val_acc_per_epoch[best_epoch]:
                best_epoch = epoch
                best_state = copy.deepcopy(router.state_dict())
                best_per_task = {t: correct[y_va == i].float().mean().item()
                                 for i, t in enumerate(tasks)}

    router.load_state_dict(best_state)
    router.eval()
    report = {
        "tasks": list(tasks),
        "kind": "mlp",
        "best_epoch": best_epoch,
        "val_accuracy": val_acc_per_epoch[best_epoch],
        "val_accuracy_per_task": best_per_task,
        "train_loss": train_loss,
        "val_accuracy_per_epoch": val_acc_per_epoch,
        "n_train": n_train,
        "n_val": x_va.shape[0],
        "n_items_per_task": n_per_task,
    }
    return router, report


def router_from_config(cfg: Mapping[str, Any],
                       state_dict: Optional[Mapping[str, Tensor]] = None) -> Router:
    """Any kind of router from its `config()` (its "kind", absent for the MLP) and optionally
    its state dict, in eval mode. Errors: ValueError for an unknown kind or a bad config."""
    fn = "router_from_config"
    if not isinstance(cfg, Mapping):
        raise TypeError(f"{fn}: cfg must be a mapping, got {type(cfg).__name__}")
    kind = cfg.get("kind", "mlp")
    if kind == "prototype":
        from twinmerge_ext.prototype_router import PrototypeRouter
        return PrototypeRouter.from_config(cfg, state_dict)
    if kind == "energy":
        from twinmerge_ext.energy import EnergyRouter
        return EnergyRouter.from_config(cfg, state_dict)
    if kind in ("text", "product"):
        from twinmerge_ext.text_router import ProductRouter, TextRouter
        return (TextRouter if kind == "text" else ProductRouter).from_config(cfg, state_dict)
    if kind != "mlp":
        raise ValueError(f"{fn}: cfg['kind'] must be one of "
                         f"{list(ROUTER_KINDS) + ['energy', 'text', 'product']} "
                         f"(absent: 'mlp'), got {kind!r}")
    return TwinRouter.from_config({k: v for k, v in cfg.items() if k != "kind"}, state_dict)
