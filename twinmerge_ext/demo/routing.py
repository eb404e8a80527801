"""The main job's router: every candidate (features × router kind × learning rate) fitted on the
training items, chosen on the validation stream, and scored on the test stream too (reported,
never used to choose)."""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from twinmerge_ext import energy_layers, fit_energy_router, fit_router, subspace_energies


def candidate_label(features: str, standardize: bool, kind: str, prototypes: int) -> str:
    return (features + (" standardized" if standardize else "")
            + (f" prototype×{prototypes}" if kind == "prototype" else ""))


def select_router(cands: Sequence[Tuple[Any, Any, bool]], kinds: Sequence[Tuple[str, int]],
                  lrs: Sequence[float], feature_name: Callable[[Tuple[Any, Any]], str],
                  train: Dict[str, Dict[str, torch.Tensor]], val: Dict[str, torch.Tensor],
                  val_tasks: torch.Tensor, test: Dict[str, torch.Tensor],
                  test_tasks: torch.Tensor, fit_kwargs: Dict[str, Any],
                  log: Callable[[str], None]):
    """(router, its fit report, its candidate record, every candidate record).

    cands: (layer, pooling, standardize) feature sets; kinds: (kind, prototypes) router kinds
    ("mlp" tries every lr, "prototype" has none); train: task -> {feature name: [n, d]};
    val/test: feature name -> [N, d] of the streams, with their true tasks. The chosen one has
    the best validation accuracy (ties: the first tried). A record: {"features", "kind",
    "prototypes", "lr", "val_accuracy", "test_accuracy"}.
    """
    best, records = None, []
    for layer, pooling, standardize in cands:
        name = feature_name((layer, pooling))
        for kind, prototypes in kinds:
            for lr in (lrs if kind == "mlp" else (None,)):
                router, rep = fit_router(
                    lambda f: f, {n: [train[n][name]] for n in train}, layer=layer,
                    pooling=pooling, standardize=standardize, kind=kind,
                    prototypes=max(1, prototypes), **({"lr": lr} if lr is not None else {}),
                    **fit_kwargs)
                with torch.no_grad():
                    val_acc = float((router(val[name]).argmax(-1) == val_tasks).float().mean())
                    test_acc = float((router(test[name]).argmax(-1) == test_tasks).float().mean())
                record = {"features": candidate_label(name, standardize, kind, prototypes),
                          "kind": kind, "prototypes": prototypes if kind == "prototype" else None,
                          "lr": lr, "val_accuracy": val_acc, "test_accuracy": test_acc}
                records.append(record)
                log(f"router {record['features']}" + (f" lr={lr}" if lr is not None else "")
                    + f": validation accuracy {val_acc:.3f} (test {test_acc:.3f})")
                if best is None or val_acc > best[2]["val_accuracy"]:
                    best = (router, rep, record)
    return (*best, records)


def _energies(served, ids: torch.Tensor, mask: torch.Tensor, layers: List[str],
              size: int = 64) -> torch.Tensor:
    return torch.cat([subspace_energies(served, {"input_ids": ids[i:i + size],
                                                 "attention_mask": mask[i:i + size]},
                                        layers=layers)[0] for i in range(0, len(ids), size)])


def energy_candidates(served, train: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
                      val: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                      test: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                      layer_sets: Dict[str, Optional[Sequence[str]]], seed: int,
                      log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Records (as select_router's, plus "calibrated" and the uncalibrated validation accuracy)
    of EnergyRouters on each set of layers: label -> layer-name prefixes (None: every low-rank
    Linear). train: task -> (ids, mask) of its router items; val/test: (ids, mask, tasks).
    Reported beside the other kinds; the main job serves the pooled-feature kinds."""
    records = []
    names = energy_layers(served)
    for label, prefixes in layer_sets.items():
        layers = names if prefixes is None else [n for n in names
                                                 if any(n.startswith(p) for p in prefixes)]
        data = {t: [{"input_ids": ids[i:i + 64], "attention_mask": mask[i:i + 64]}
                    for i in range(0, len(ids), 64)] for t, (ids, mask) in train.items()}
        router, rep = fit_energy_router(served, data, layers=layers, seed=seed)
        with torch.no_grad():
            accs = [float((router(_energies(served, ids, mask, layers)).argmax(-1) == tasks)
                          .float().mean()) for ids, mask, tasks in (val, test)]
        record = {"features": f"subspace energies, {label}"
                              + (" (calibrated)" if rep["calibrated"] else ""),
                  "kind": "energy", "prototypes": None, "lr": None, "calibrated":
                  rep["calibrated"], "val_accuracy": accs[0], "test_accuracy": accs[1],
                  "val_accuracy_uncalibrated": rep["val_accuracy_uncalibrated"]}
        log(f"router {record['features']}: validation accuracy {accs[0]:.3f} (test "
            f"{accs[1]:.3f}; uncalibrated on the router's own split "
            f"{rep['val_accuracy_uncalibrated']:.3f})")
        records.append(record)
    return records


def confusion(routed: torch.Tensor, tasks: torch.Tensor, T: int) -> List[List[int]]:
    """counts[i][j]: items of task i routed (argmax) to task j."""
    return torch.bincount(tasks * T + routed, minlength=T * T).reshape(T, T).tolist()


def router_markdown(rt: Dict[str, Any], names: List[str]) -> List[str]:
    """The report's router section."""
    lines = ["## Router", "",
             f"chosen on validation: {rt.get('kind', 'mlp')}"
             + (f" with {rt['prototypes']} prototypes per task" if rt.get("kind") == "prototype"
                else f", lr {rt['lr']}")
             + f"; features: layer {rt['layer']}, {rt['pooling']} pooling"
             + (", standardized" if rt.get("standardize") else "")
             + f"; validation accuracy {rt['val_accuracy']:.3f}", ""]
    if rt.get("candidates"):
        lines += ["| candidate | validation | test |", "|---|---|---|"]
        lines += [f"| {c['features']}" + (f", lr {c['lr']}" if c.get("lr") else "")
                  + f" | {c['val_accuracy']:.3f} | "
                  + (f"{c['test_accuracy']:.3f}" if "test_accuracy" in c else "–") + " |"
                  for c in rt["candidates"]]
        lines.append("")
    lines += ["Test accuracy per task:", "",
              "| " + " | ".join(names) + " |", "|" + "---|" * len(names),
              "| " + " | ".join(f"{rt['test_accuracy_per_task'][n]:.3f}" for n in names) + " |",
              ""]
    if rt.get("test_confusion"):
        lines += ["Test routing (rows: true task; columns: the router's argmax):", "",
                  "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {n} | " + " | ".join(str(c) for c in row) + " |"
                  for n, row in zip(names, rt["test_confusion"])]
        lines.append("")
    return lines
