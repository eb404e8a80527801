"""Subspace energies: how much of each expert's exclusive knowledge an input excites, read from
the twin's own factors in one pass of the shared expert, with no training data.

For a mixed Linear layer whose task-t delta is U_t diag(S_t) V_tᵀ (U_t with orthonormal
columns), the delta's output on a token x has squared norm E_t(x) = ‖S_t ⊙ V_tᵀ x‖²: large when x
lies in the input directions that expert t changed. The factored mode computes x·V_cat for every
Linear anyway, so these energies are nearly free to collect; routing by them (MASS, SiM) needs
no router training data. `subspace_energies` gives them as features, one per (layer, task).
"""

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from twinmerge_ext import _tp
from twinmerge_ext._layers import _EnergyProbe, _TwinLinear
from twinmerge_ext.ops import _per_expert
from twinmerge_ext.router import Router, _int_arg, _real_arg, _router_data, _task_list

__all__ = ["EnergyRouter", "energy_layers", "fit_energy_router", "subspace_energies"]


def energy_layers(served) -> List[str]:
    """The names of the layers subspace_energies can read, in model order: the mixed Linear
    (and Conv1D) layers with a low-rank weight, less row-parallel ones (tensor parallelism: a
    rank sees only part of their input, so its energies would be partial sums)."""
    names = []
    for _, layer, attr, kind in served._mixed:
        if kind == "lowrank" and attr == "weight" and isinstance(layer, _TwinLinear) and \
                layer._twin_name not in names and not _row_parallel(layer):
            names.append(layer._twin_name)
    return names


def _row_parallel(layer) -> bool:
    return layer._twin_tp and _tp.shard_dim(_tp.own(layer, "weight"), layer._twin_name) == 1


def subspace_energies(served, inputs: Mapping[str, Tensor], mask: Optional[Tensor] = None,
                      layers: Optional[Sequence[str]] = None,
                      normalize: bool = True) -> Tuple[Tensor, List[str]]:
    """Each task's subspace energy at each chosen layer, pooled over each row's real tokens.

    Semantics: f[b, i·T + t] = mean over the real tokens x of row b at layer layers[i] of
    E_t(x) = ‖S_t ⊙ V_tᵀ x‖² (module docstring), from one forward of θs (the wrapper's module,
    plain: no mixing); with normalize, log(E / ‖S_t‖² + 1e-12): the share of expert t's delta
    that x excites, comparable across tasks whatever the delta's size.
    Shape: inputs: the module's keyword inputs (e.g. input_ids [B, L], attention_mask [B, L]);
    mask [B, L] (default inputs["attention_mask"], else every position) -> (f [B, n·T]
    float32, the n layer names in column order).
    layers: names from energy_layers(served) (default: all of them).
    The module must be in eval mode (dropout would make the energies random); the call is
    per thread, like any call of the wrapper.
    Errors: TypeError/ValueError naming the argument: a wrapper of another type, inputs not a
    mapping of tensors, an unknown layer, a module in training mode, a chosen layer the forward
    never called.
    """
    fn = "subspace_energies"
    from twinmerge_ext.module import TwinMergedModule
    if not isinstance(served, TwinMergedModule):
        raise TypeError(f"{fn}: served must be a TwinMergedModule, got {type(served).__name__}")
    if not isinstance(inputs, Mapping) or not inputs:
        raise TypeError(f"{fn}: inputs must be a non-empty mapping of the module's keyword "
                        f"inputs, got {type(inputs).__name__}")
    known = energy_layers(served)
    names = known if layers is None else list(layers)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"{fn}: layers must be names of low-rank Linear layers of the twin, "
                         f"not row-parallel (energy_layers(served): {known[:4]}{' ...' if len(known) > 4 else ''}),"
                         f" got {unknown[:3] if unknown else names!r}")
    if mask is None:
        mask = inputs.get("attention_mask")
    if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2):
        raise ValueError(f"{fn}: mask must be a [B, L] tensor, got "
                         f"{list(mask.shape) if isinstance(mask, Tensor) else mask!r}")
    training = [n for n, m in served.module.named_modules() if m.training]
    if training:
        raise ValueError(f"{fn}: the module is in training mode ({training[0] or 'the root'!r}); "
                         f"dropout would make the energies random: call served.eval() first")
    probe = _EnergyProbe(None if mask is None else mask != 0, frozenset(names))
    ctx = served._ctx
    with served._calls(fn):
        saved = ctx.enter()
        ctx.energy = probe
        try:
            with torch.no_grad():
                served.module(**inputs)
        finally:
            ctx.leave(saved)
    missed = [n for n in names if n not in probe.out]
    if missed:
        raise ValueError(f"{fn}: the forward never called layer {missed[0]!r}"
                         + (f" (and {len(missed) - 1} more)" if len(missed) > 1 else ""))
    cols = []
    for name in names:
        e = probe.out[name]
        if normalize:
            layer = served.module.get_submodule(name)
            S = layer._twin_factors("weight")[1].float()
            norm = _per_expert(S * S, layer._twin_ranks["weight"]).to(e.device)
            e = torch.log(e / norm.clamp_min(1e-30) + 1e-12)
        cols.append(e)
    return torch.cat(cols, -1), names


class EnergyRouter(Router):
    """Routing by subspace energies, from the twin's own factors (module docstring).

    Semantics: logits[b, t] = scale · mean_ℓ f[b, ℓ, t] + bias[t], with f the normalized
    subspace energies (`subspace_energies`) at the router's `energy_layers`: the task whose
    subspaces the input excites most, on average over the layers. Uncalibrated (scale 1, bias 0)
    it needs no training data; `fit_energy_router` calibrates scale and bias (T + 1 numbers) on
    labelled items.
    Shape: features [B, n·T] (n layers, as subspace_energies orders them) -> logits [B, T].
    Its features come from a plain pass of θs through the wrapper that serves it
    (`features(served, input_ids, attention_mask)`), as the MLP's do.
    """

    kind = "energy"

    def __init__(self, tasks: Sequence[str], energy_layers: Sequence[str]):
        super().__init__()
        fn = "EnergyRouter"
        if isinstance(energy_layers, str) or not all(isinstance(n, str) for n in energy_layers) \
                or not list(energy_layers):
            raise ValueError(f"{fn}: energy_layers must be a non-empty list of layer names, got "
                             f"{energy_layers!r}")
        self.energy_layers = list(energy_layers)
        tasks = list(tasks)
        self._init_common(len(self.energy_layers) * max(1, len(tasks)), tasks, -1, "mean",
                          False, fn)
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("bias", torch.zeros(len(self.tasks)))

    def _logits(self, features: Tensor, fn: str) -> Tensor:
        self._check_features(features, fn)
        f = features.to(self.scale.device).float()
        f = f.reshape(f.shape[0], len(self.energy_layers), self.num_tasks).mean(1)
        return self.scale * f + self.bias

    def features(self, served, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return subspace_energies(served, {"input_ids": input_ids,
                                          "attention_mask": attention_mask},
                                 layers=self.energy_layers)[0]

    def config(self) -> Dict[str, Any]:
        return {"kind": self.kind, "tasks": list(self.tasks),
                "energy_layers": list(self.energy_layers)}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any],
                    state_dict: Optional[Mapping[str, Tensor]] = None) -> "EnergyRouter":
        fn = "EnergyRouter.from_config"
        if cfg.get("kind") != cls.kind or set(cfg) != {"kind", "tasks", "energy_layers"}:
            raise ValueError(f"{fn}: cfg must have exactly the keys ['kind', 'tasks', "
                             f"'energy_layers'] with kind 'energy', got {sorted(cfg)} "
                             f"(kind {cfg.get('kind')!r})")
        router = cls(cfg["tasks"], cfg["energy_layers"])
        if state_dict is not None:
            router.load_state_dict(state_dict, strict=True)
        return router.eval()


def fit_energy_router(served, data: Mapping[str, Iterable[Any]],
                      layers: Optional[Sequence[str]] = None, max_items_per_task: int = 1000,
                      val_fraction: float = 0.2, seed: int = 0,
                      steps: int = 100) -> Tuple[EnergyRouter, Dict[str, Any]]:
    """An EnergyRouter for `served`'s twin, calibrated on labelled items if that helps.

    Semantics: features = subspace_energies at `layers` (default: every low-rank Linear); the
    uncalibrated router (scale 1, bias 0) and the calibrated one (scale and bias minimizing the
    cross-entropy on the training split, L-BFGS, `steps` iterations) are scored on the validation
    split; the better (ties: uncalibrated) is returned. Data: task name -> iterable of batches
    {"input_ids", "attention_mask"}, split as fit_router does (balanced, seeded, stratified).
    Returns (router in eval mode, report {"tasks", "kind", "calibrated", "val_accuracy",
    "val_accuracy_uncalibrated", "val_accuracy_calibrated", "val_accuracy_per_task", "scale",
    "bias", "n_train", "n_val", "n_items_per_task"}).
    Errors: as fit_router's, and subspace_energies' for the layers.
    """
    fn = "fit_energy_router"
    if not isinstance(data, Mapping):
        raise TypeError(f"{fn}: data must be a mapping task name -> iterable of batches, got "
                        f"{type(data).__name__}")
    tasks = _task_list(data.keys(), fn)
    if tasks != list(served.tasks):
        raise ValueError(f"{fn}: data must hold the twin's tasks in order, {served.tasks}, got "
                         f"{tasks}")
    names = energy_layers(served) if layers is None else list(layers)
    router = EnergyRouter(tasks, names).to(next(served.module.parameters()).device)

    def extract(batch):
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError(f"{fn}: a batch must be a mapping with input_ids (and "
                             f"attention_mask), got {type(batch).__name__}")
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(batch["input_ids"])
        return router.features(served, batch["input_ids"], mask)

    x_tr, y_tr, x_va, y_va, n_per_task, _ = _router_data(
        extract, data, tasks, -1, "mean", _int_arg(max_items_per_task, "max_items_per_task", fn,
                                                    2),
        _real_arg(val_fraction, "val_fraction", fn), _int_arg(seed, "seed", fn, 0), None, fn)
    router = router.to(x_tr.device)

    def accuracy():
        with torch.no_grad():
            correct = router(x_va).argmax(-1) == y_va
        return correct.float().mean().item(), correct

    plain_acc, plain_correct = accuracy()
    scale = torch.zeros((), device=x_tr.device, requires_grad=True)   # log scale
    bias = torch.zeros(len(tasks), device=x_tr.device, requires_grad=True)
    mean_f = x_tr.reshape(x_tr.shape[0], len(names), len(tasks)).mean(1)
    opt = torch.optim.LBFGS([scale, bias], max_iter=_int_arg(steps, "steps", fn, 1),
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(scale.exp() * mean_f + bias, y_tr)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        router.scale.copy_(scale.exp())
        router.bias.copy_(bias)
    cal_acc, cal_correct = accuracy()
    calibrated = cal_acc > plain_acc
    if not calibrated:
        with torch.no_grad():
            router.scale.fill_(1.0)
            router.bias.zero_()
    correct = cal_correct if calibrated else plain_correct
    report = {"tasks": tasks, "kind": "energy", "calibrated": calibrated,
              "val_accuracy": max(cal_acc, plain_acc), "val_accuracy_uncalibrated": plain_acc,
              "val_accuracy_calibrated": cal_acc,
              "val_accuracy_per_task": {t: correct[y_va == i].float().mean().item()
                                        for i, t in enumerate(tasks)},
              "scale": float(router.scale), "bias": router.bias.tolist(),
              "n_train": x_tr.shape[0], "n_val": x_va.shape[0], "n_items_per_task": n_per_task}
    return router.eval(), report
