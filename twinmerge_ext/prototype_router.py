"""Routing by nearest task prototypes: the shared expert's pooled features compared with a few
centres per task (Auto-Switch-style routing on frozen features, without its memory of every
training item).

Semantics: logits[b, t] = scale · max_p cos(z_b, c_{t,p}), z = the standardized features,
c_{t,p} the p-th centre of task t's standardized training features (their mean with one
prototype per task; KMeans centres with more). `fit_router(kind="prototype")` fits the centres
on the training split and chooses the scale (the softmax's sharpness) on the validation split.
Memory: T·P·d floats (plus 2·d for the standardization), against the MLP's 2·d·h + h² + h·T.
"""

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from twinmerge_ext.router import Router, _int_arg

__all__ = ["PrototypeRouter"]

_CONFIG_KEYS = ("kind", "in_features", "tasks", "prototypes", "layer", "pooling", "standardize")
# The scales fit_router tries (log-spaced), the one of least validation cross-entropy kept.
SCALES = tuple(float(s) for s in torch.logspace(0, 2.5, 26).tolist())


class PrototypeRouter(Router):
    """Nearest task prototypes by cosine similarity (module docstring).

    Args:
        in_features: d, the width of the pooled features.
        tasks: the task names, in logit order.
        prototypes: P, centres per task.
        layer, pooling: how its features are made from the shared expert (as TwinRouter's).
        standardize: standardize the features with buffers feature_mean/std (set by fit_router).
    Buffers: centres [T, P, d] (unit rows), scale [] (the logits' scale), and the
    standardization's. A new router has zero centres: fit it (fit_router(kind="prototype")) or
    load its state dict.
    Errors: TypeError/ValueError naming the argument and its value; features with NaN/Inf.
    """

    kind = "prototype"

    def __init__(self, in_features: int, tasks: Sequence[str], prototypes: int = 1,
                 layer: Union[int, Sequence[int]] = -1,
                 pooling: Union[str, Sequence[str]] = "mean", standardize: bool = True):
        super().__init__()
        fn = "PrototypeRouter"
        self._init_common(in_features, tasks, layer, pooling, standardize, fn)
        self.prototypes = _int_arg(prototypes, "prototypes", fn, 1)
        self.register_buffer("centres", torch.zeros(len(self.tasks), self.prototypes,
                                                    self.in_features))
        self.register_buffer("scale", torch.tensor(10.0))

    def _logits(self, features: Tensor, fn: str) -> Tensor:
        self._check_features(features, fn)
        z = F.normalize(self._standardized(features, self.centres.device).float(), dim=-1)
        sims = torch.einsum("bd,tpd->btp", z, self.centres.float())
        return (self.scale.float() * sims.amax(-1)).to(self.centres.dtype)

    def set_centres(self, centres: Tensor) -> None:
        """centres [T, P, d] (in standardized feature space), normalized to unit rows."""
        fn = "PrototypeRouter.set_centres"
        if not isinstance(centres, Tensor) or tuple(centres.shape) != tuple(self.centres.shape):
            raise ValueError(f"{fn}: centres must be a tensor of shape "
                             f"{list(self.centres.shape)}, got "
                             f"{list(centres.shape) if isinstance(centres, Tensor) else centres!r}")
        norms = centres.norm(dim=-1)
        if not torch.isfinite(centres).all() or (norms == 0).any():
            raise ValueError(f"{fn}: centres must be finite and non-zero")
        with torch.no_grad():
            self.centres.copy_(centres / norms.unsqueeze(-1))

    def config(self) -> Dict[str, Any]:
        return {"kind": self.kind, **self._common_config(), "prototypes": self.prototypes,
                "standardize": self.standardize}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any],
                    state_dict: Optional[Mapping[str, Tensor]] = None) -> "PrototypeRouter":
        """A router from `config()` and optionally its state dict (strict), in eval mode."""
        fn = "PrototypeRouter.from_config"
        missing = [k for k in ("in_features", "tasks") if k not in cfg]
        unknown = sorted(set(cfg) - set(_CONFIG_KEYS))
        if missing or unknown or cfg.get("kind") != cls.kind:
            raise ValueError(f"{fn}: cfg is missing keys {missing} / has unknown keys {unknown} "
                             f"/ kind {cfg.get('kind')!r}; expected keys {list(_CONFIG_KEYS)} "
                             f"with kind {cls.kind!r}")
        router = cls(**{k: v for k, v in cfg.items() if k != "kind"})
        if state_dict is not None:
            router.load_state_dict(state_dict, strict=True)
        return router.eval()


def _fit_prototypes(x_tr: Tensor, y_tr: Tensor, x_va: Tensor, y_va: Tensor, tasks: List[str],
                    layer, pooling, standardize: bool, prototypes: int,
                    seed: int) -> Tuple[PrototypeRouter, Dict[str, Any]]:
    """fit_router(kind="prototype") on its splits: centres from the training split, the scale
    of least cross-entropy on the validation split."""
    router = PrototypeRouter(x_tr.shape[1], tasks, prototypes, layer=layer, pooling=pooling,
                             standardize=standardize).to(x_tr.device)
    if standardize:
        router.set_standardization(x_tr)
    z = router._standardized(x_tr, x_tr.device).float()
    centres = []
    for t in range(len(tasks)):
        zt = z[y_tr == t]
        if prototypes == 1:
            centres.append(zt.mean(0, keepdim=True))
            continue
        if zt.shape[0] < prototypes:
            raise ValueError(f"fit_router: task {tasks[t]!r} has {zt.shape[0]} training items, "
                             f"fewer than prototypes={prototypes}")
        from sklearn.cluster import KMeans
        km = KMeans(n_clusters=prototypes, n_init=4, random_state=seed).fit(zt.cpu().numpy())
        centres.append(torch.as_tensor(km.cluster_centers_, dtype=torch.float32,
                                       device=z.device))
    router.set_centres(torch.stack(centres))
    best = None
    for scale in SCALES:
        router.scale.fill_(scale)
        with torch.no_grad():
            logits = router(x_va)
        loss = F.cross_entropy(logits.float(), y_va).item()
        if best is None or loss < best[0] - 1e-9:
            best = (loss, scale, logits)
    loss, scale, logits = best
    router.scale.fill_(scale)
    correct = logits.argmax(-1) == y_va
    report = {"tasks": list(tasks), "kind": "prototype", "scale": scale, "val_loss": loss,
              "val_accuracy": correct.float().mean().item(),
              "val_accuracy_per_task": {t: correct[y_va == i].float().mean().item()
                                        for i, t in enumerate(tasks)}}
    return router.eval(), report
