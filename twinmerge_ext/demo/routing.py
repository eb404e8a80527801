"""The main job's router: every candidate (features × router kind × learning rate) fitted on the
training items, chosen on the validation stream, and scored on the test stream too (reported,
never used to choose)."""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from twinmerge_ext import (energy_layers, fit_energy_router, fit_product_alpha, fit_router,
                           fit_text_router, subspace_energies)


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
    "prototypes", "lr", "val_accuracy", "test_accuracy"}, and its test argmax [N] under
    "test_routed" (`public` drops it).
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
                    routed = router(test[name]).argmax(-1)
                record = {"features": candidate_label(name, standardize, kind, prototypes),
                          "kind": kind, "prototypes": prototypes if kind == "prototype" else None,
                          "lr": lr, "val_accuracy": val_acc,
                          "test_accuracy": float((routed == test_tasks).float().mean()),
                          "test_routed": routed}
                records.append(record)
                log(f"router {record['features']}" + (f" lr={lr}" if lr is not None else "")
                    + f": validation accuracy {val_acc:.3f} (test {record['test_accuracy']:.3f})")
                if best is None or val_acc > best[2]["val_accuracy"]:
                    best = (router, rep, record)
    return (*best, records)


def _energies(served, ids: torch.Tensor, mask: torch.Tensor, layers: List[str],
              size: int = 64) -> torch.Tensor:
    return torch.cat([subspace_energies(served, {"input_ids": ids[i:i + size],
                                                 "attention_mask": mask[i:i + size]},
                                        layers=layers)[0] for i in range(0, len(ids), size)])


def energy_layer_set(served, prefixes: Optional[Sequence[str]]) -> List[str]:
    """The low-rank Linear layers whose names start with one of `prefixes` (None: all)."""
    names = energy_layers(served)
    return names if prefixes is None else [n for n in names
                                           if any(n.startswith(p) for p in prefixes)]


def energy_pass(served, router, stream, layers: List[str], size: int = 32) -> torch.Tensor:
    """An EnergyRouter's weights for the stream in batches of `size`: what its router pass
    costs (a plain pass of θs reading the energies, then the router)."""
    out = []
    with torch.inference_mode():
        for _, ids, mask in stream.batches(size):
            out.append(router.weights(subspace_energies(
                served, {"input_ids": ids, "attention_mask": mask}, layers=layers)[0]))
    return torch.cat(out)


def energy_candidates(served, train: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
                      val: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                      test: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                      layer_sets: Dict[str, Optional[Sequence[str]]], seed: int,
                      log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Records (as select_router's, plus "calibrated" and the uncalibrated validation accuracy)
    of EnergyRouters on each set of layers: label -> layer-name prefixes (None: every low-rank
    Linear). train: task -> (ids, mask) of its router items; val/test: (ids, mask, tasks).
    Reported beside the other kinds; the main job serves the pooled-feature kinds. Each record
    keeps its router under "router", its layers under "layers" and its test argmax under
    "test_routed" (`public` drops them)."""
    records = []
    for label, prefixes in layer_sets.items():
        layers = energy_layer_set(served, prefixes)
        data = {t: [{"input_ids": ids[i:i + 64], "attention_mask": mask[i:i + 64]}
                    for i in range(0, len(ids), 64)] for t, (ids, mask) in train.items()}
        router, rep = fit_energy_router(served, data, layers=layers, seed=seed)
        with torch.no_grad():
            routed = [router(_energies(served, ids, mask, layers)).argmax(-1)
                      for ids, mask, _ in (val, test)]
        accs = [float((r == tasks).float().mean()) for r, (_, _, tasks) in zip(routed, (val, test))]
        record = {"features": f"subspace energies, {label}"
                              + (" (calibrated)" if rep["calibrated"] else ""),
                  "kind": "energy", "prototypes": None, "lr": None, "calibrated":
                  rep["calibrated"], "val_accuracy": accs[0], "test_accuracy": accs[1],
                  "val_accuracy_uncalibrated": rep["val_accuracy_uncalibrated"],
                  "router": router, "layers": layers, "test_routed": routed[1]}
        log(f"router {record['features']}: validation accuracy {accs[0]:.3f} (test "
            f"{accs[1]:.3f}; uncalibrated on the router's own split "
            f"{rep['val_accuracy_uncalibrated']:.3f})")
        records.append(record)
    return records


def text_routers(train_texts: Dict[str, List[str]], states_router, name: str, val, val_feats,
                 test, test_feats, seed: int, max_chars: Optional[int],
                 log: Callable[[str], None]) -> Dict[str, Any]:
    """The text router (character n-grams of the raw text, no pass of θs) fitted on the
    training texts, and its product with the chosen hidden-state router (alpha chosen on the
    validation stream). val/test: streams with texts; *_feats[name]: the states router's
    features of their items. Returns {"text", "product": (router, record, test weights [N, T])}
    with records as select_router's (plus "C" or "alpha")."""
    text, rep = fit_text_router(train_texts, seed=seed, max_chars=max_chars)
    product, prep = fit_product_alpha(states_router, text, val_feats[name], val.texts, val.tasks)
    out = {}
    with torch.no_grad():
        for kind, router, inputs, extra in (
                ("text", text, lambda st, f: st.texts, {"C": rep["C"]}),
                ("product", product, lambda st, f: (f[name], st.texts),
                 {"alpha": prep["alpha"]})):
            w_val = router.weights(inputs(val, val_feats))
            w_test = router.weights(inputs(test, test_feats))
            record = {"features": "n-grams of the raw text" + (
                          f" (first {max_chars} characters)" if max_chars else "")
                      if kind == "text" else
                      f"product: {name} × text^{prep['alpha']:g}",
                      "kind": kind, "prototypes": None, "lr": None, **extra,
                      "val_accuracy": float((w_val.argmax(-1) == val.tasks).float().mean()),
                      "test_accuracy": float((w_test.argmax(-1) == test.tasks).float().mean())}
            log(f"router {record['features']}: validation accuracy "
                f"{record['val_accuracy']:.3f} (test {record['test_accuracy']:.3f})")
            out[kind] = (router, record, w_test)
    return out


def text_pass(router, stream, size: int = 32) -> torch.Tensor:
    """A TextRouter's weights for the stream in batches of `size`: what routing by the text
    costs (no pass of θs)."""
    with torch.inference_mode():
        return torch.cat([router.weights(stream.texts[s:s + size])
                          for s in range(0, len(stream), size)])


def confusion(routed: torch.Tensor, tasks: torch.Tensor, T: int) -> List[List[int]]:
    """counts[i][j]: items of task i routed (argmax) to task j."""
    return torch.bincount(tasks * T + routed, minlength=T * T).reshape(T, T).tolist()


_PRIVATE = ("router", "layers", "test_routed")


def public(record: Dict[str, Any]) -> Dict[str, Any]:
    """A candidate record as written to JSON: without its router, layers and test argmax."""
    return {k: v for k, v in record.items() if k not in _PRIVATE}


def best_of_each_kind(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The record of best validation accuracy (ties: the first) of each kind, in the order the
    kinds first appear: what each kind would give if it were the one chosen."""
    best: Dict[str, Dict[str, Any]] = {}
    for r in records:
        if r["kind"] not in best or r["val_accuracy"] > best[r["kind"]]["val_accuracy"]:
            best[r["kind"]] = r
    return list(best.values())


def routing_summary(record: Dict[str, Any], routed: torch.Tensor, tasks: torch.Tensor,
                    names: List[str]) -> Dict[str, Any]:
    """One router's test routing: its kind, validation and test accuracy, accuracy per true
    task, and the confusion (rows: true task, columns: argmax task)."""
    counts = confusion(routed, tasks, len(names))
    return {"kind": record["kind"], "val_accuracy": record["val_accuracy"],
            "test_accuracy": float((routed == tasks).float().mean()),
            "per_task": {n: row[t] / max(1, sum(row))
                         for t, (n, row) in enumerate(zip(names, counts))},
            "test_confusion": counts}


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
    if rt.get("pass_seconds_per_1000"):
        lines += ["Router pass per 1000 items (timed with the methods): " + "; ".join(
            f"{k} {v:.2f} s" for k, v in rt["pass_seconds_per_1000"].items()), ""]
    lines += ["Test accuracy per task:", "",
              "| " + " | ".join(names) + " |", "|" + "---|" * len(names),
              "| " + " | ".join(f"{rt['test_accuracy_per_task'][n]:.3f}" for n in names) + " |",
              ""]
    by = rt.get("by_router") or {}
    if by:
        lines += ["Test routing accuracy per task, by router (the best of each kind on "
                  "validation):", "",
                  "| router | kind | validation | " + " | ".join(names) + " | test |",
                  "|---|---|---|" + "---|" * (len(names) + 1)]
        lines += [f"| {label} | {r.get('kind', '–')} | "
                  + (f"{r['val_accuracy']:.3f}" if "val_accuracy" in r else "–") + " | "
                  + " | ".join(f"{r['per_task'][n]:.3f}" for n in names)
                  + f" | {r['test_accuracy']:.3f} |" for label, r in by.items()]
        lines.append("")
    confusions = {label: r["test_confusion"] for label, r in by.items() if "test_confusion" in r}
    if not confusions and rt.get("test_confusion"):
        confusions = {"the chosen router": rt["test_confusion"]}
    if confusions:
        lines += ["Test routing (rows: true task; columns: the router's argmax), by router:", ""]
        for label, counts in confusions.items():
            lines += [f"{label}:", "", "| task | " + " | ".join(names) + " |",
                      "|---|" + "---|" * len(names)]
            lines += [f"| {n} | " + " | ".join(str(c) for c in row) + " |"
                      for n, row in zip(names, counts)]
            lines.append("")
    return lines


def serve_self(wrapped, stream, size: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """(predictions [N, 2] (true task's head, the router's argmax task's head), weights [N, T])
    of a wrapper with routing="self": one pass per batch, the weights computed inside it. Every
    head runs on every row anyway (`_TwinHead`), so each row asks for its true task's and all T
    heads, and keeps the head of its routed task once the pass has routed it. A router that
    reads text (ProductRouter) gets each row's text."""
    T = len(wrapped.tasks)
    reads = getattr(wrapped.router, "reads_text", False)
    pred = torch.empty(len(stream), 2, dtype=torch.long)
    weights = torch.empty(len(stream), T)
    with torch.inference_mode():
        for idx, ids, mask in stream.batches(size):
            heads = torch.cat([stream.tasks[idx, None], torch.arange(T).expand(len(idx), T)], 1)
            text = {"router_text": [stream.texts[i] for i in idx.tolist()]} if reads else {}
            logits = wrapped(input_ids=ids, attention_mask=mask, head_tasks=heads, **text).logits
            w = wrapped.last_call["weights"]
            rows = torch.arange(len(idx))
            pred[idx, 0] = logits[:, 0].argmax(-1)
            pred[idx, 1] = logits[rows, 1 + w.argmax(-1)].argmax(-1)
            weights[idx] = w
    return pred, weights


def select_self_routing(cands: Sequence[Tuple[Any, Any, bool]], lr: float,
                        feature_name: Callable[[Tuple[Any, Any]], str],
                        train: Dict[str, Dict[str, torch.Tensor]], val_feats, val_tasks,
                        test_feats, test_tasks, score_val: Callable[[Any], float],
                        fit_kwargs: Dict[str, Any], log: Callable[[str], None]):
    """(router, its record, every record) for self-routing: an MLP router per feature set of
    early layers, the one whose self-routed twin scores best on the validation stream
    (`score_val(router)`: mean accuracy; the fewer layers a router reads, the more layers
    serve θ(w), so the choice trades routing accuracy against mixed layers)."""
    best, records = None, []
    for layer, pooling, standardize in cands:
        name = feature_name((layer, pooling))
        router, _ = fit_router(lambda f: f, {n: [train[n][name]] for n in train}, layer=layer,
                               pooling=pooling, standardize=standardize, lr=lr, **fit_kwargs)
        with torch.no_grad():
            accs = [float((router(f[name]).argmax(-1) == t).float().mean())
                    for f, t in ((val_feats, val_tasks), (test_feats, test_tasks))]
        score = score_val(router)
        k = max(layer) if isinstance(layer, tuple) else layer
        record = {"features": candidate_label(name, standardize, "mlp", 0), "kind": "mlp",
                  "prototypes": None, "lr": lr, "routed_at_layer": k,
                  "val_accuracy": accs[0], "test_accuracy": accs[1], "val_twin_score": score}
        records.append(record)
        log(f"self-routing router {record['features']}: routing accuracy validation "
            f"{accs[0]:.3f} (test {accs[1]:.3f}); self-routed twin, validation mean accuracy "
            f"{score:.4f}")
        if best is None or score > best[1]["val_twin_score"]:
            best = (router, record)
    return (*best, records)


def self_routing_markdown(sr: Optional[Dict[str, Any]], names: List[str]) -> List[str]:
    """The report's self-routing section."""
    if not sr:
        return []
    k = sr["routed_at_layer"]
    lines = ["## Self-routing (one pass)", "",
             f"The router reads the hidden states entering layers {sr['layer']} inside the "
             f"served pass: the embeddings and "
             + ("layer 0" if k == 1 else f"layers 0–{k - 1}")
             + f" run θs, the router runs where layer {k}'s input is known, and layer {k} on "
             f"(and the heads) serve θ(w) per row. "
             f"Chosen by the self-routed twin's mean accuracy on the validation grid items: "
             f"{sr['features']} (routing accuracy: validation {sr['val_accuracy']:.3f}, "
             f"test {sr['test_accuracy']:.3f}).", "",
             "| router features | routed at layer | routing validation | routing test | "
             "self-routed twin, validation mean accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {c['features']} | {c['routed_at_layer']} | {c['val_accuracy']:.3f} | "
              f"{c['test_accuracy']:.3f} | {c['val_twin_score']:.4f} |"
              for c in sr["candidates"]]
    lines += ["", "Test routing accuracy per task:", "",
              "| " + " | ".join(names) + " |", "|" + "---|" * len(names),
              "| " + " | ".join(f"{sr['test_accuracy_per_task'][n]:.3f}" for n in names) + " |",
              ""]
    return lines
