"""Subspace energies: how much of each expert's exclusive knowledge an input excites, read from
the twin's own factors in one pass of the shared expert, with no training data.

For a mixed Linear layer whose task-t delta is U_t diag(S_t) V_tᵀ (U_t with orthonormal
columns), the delta's output on a token x has squared norm E_t(x) = ‖S_t ⊙ V_tᵀ x‖²: large when x
lies in the input directions that expert t changed. The factored mode computes x·V_cat for every
Linear anyway, so these energies are nearly free to collect; routing by them (MASS, SiM) needs
no router training data. `subspace_energies` gives them as features, one per (layer, task).
"""

from typing import List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from twinmerge_ext._layers import _EnergyProbe, _TwinLinear
from twinmerge_ext.ops import _per_expert

__all__ = ["energy_layers", "subspace_energies"]


def energy_layers(served) -> List[str]:
    """The names of the layers subspace_energies can read, in model order: the mixed Linear
    (and Conv1D) layers with a low-rank weight."""
    names = []
    for _, layer, attr, kind in served._mixed:
        if kind == "lowrank" and attr == "weight" and isinstance(layer, _TwinLinear) and \
                layer._twin_name not in names:
            names.append(layer._twin_name)
    return names


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
        raise ValueError(f"{fn}: layers must be names of low-rank Linear layers of the twin "
                         f"(energy_layers(served): {known[:4]}{' ...' if len(known) > 4 else ''}),"
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
        saved = ctx.energy
        ctx.energy = probe
        try:
            with torch.no_grad():
                served.module(**inputs)
        finally:
            ctx.energy = saved
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
