"""What the safety checks and the thread safety cost, measured against the same work without
them, side by side in one run.

    python -m bench.reliability --out bench/results/reliability-cpu.json

Cases (each prints ours / baseline; < 1 is faster):
- nan_check: the library's NaN/Inf check (`_finite.all_finite`) of a 64 MiB tensor in each
  dtype, and of a [32, 8] weight matrix, against `bool(torch.isfinite(t).all())`; GB/s.
- finite_check: a factored TwinMergedModule forward with check_finite=True (one host sync per
  call) against check_finite=False.
- call_overhead: the wrapper around a single small Linear layer, against the plain layer: the
  per-call cost of routing state, the in-flight count and the checks, which a large model does
  not notice and a microbenchmark does.
- threads_factored / threads_materialize: THREADS threads calling one wrapper, each with its own
  weights, against the same calls made one after another by one thread; materialize with one
  buffer set (calls take turns to merge and serve) and with one set per thread; each with
  torch's intra-op threads on every core and with one.
- merge_finite_check: merging.task_arithmetic of T experts with the NaN/Inf check of every
  tensor read, against the same merge with the check replaced by a no-op.
What verifying a checkpoint's checksums costs a load is measured by bench/checkpoint_io.py.
"""

import argparse
import copy
import statistics
import threading
import time
from pathlib import Path

import torch
from torch import nn

from bench.run import _roberta_config, _synthetic_experts, _write, environment
from bench.timing import measure_all
from twinmerge_ext import TwinCheckpoint, TwinMergedModule, merging
from twinmerge_ext._finite import all_finite

THREADS = 4


def _serving_case(hidden=256, layers=2, T=8, rank=16, seed=0):
    """A small RoBERTa (as bench.run's CPU serving case), its twin and a wrapper factory."""
    transformers = __import__("transformers")
    cfg = _roberta_config(hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=hidden // 64, intermediate_size=4 * hidden)
    torch.manual_seed(seed)
    model = transformers.RobertaModel(cfg).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    changed = [k for k, v in base.items() if v.is_floating_point() and "word_embeddings" not in k]
    experts = _synthetic_experts(base, T, changed, g)
    twin = TwinCheckpoint.build(base, experts, rank=rank)
    return model, twin


def _inputs(B, L, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, L), generator=g)


def _row(case, times, baseline, **extra):
    t = {k: v.as_dict() for k, v in times.items()}
    ratios = {k: times[k].median_ms / times[baseline].median_ms for k in times if k != baseline}
    return dict(case=case, times=t, baseline=baseline, ratios=ratios, **extra)


def nan_check(env):
    times, rates = {}, {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16),
                        ("bf16", torch.bfloat16), ("fp64", torch.float64)):
        t = torch.randn(64 << 20 >> {2: 1, 4: 2, 8: 3}[torch.finfo(dtype).bits // 8],
                        dtype=torch.float32).to(dtype)
        got = measure_all({f"ours_{name}": lambda t=t: all_finite(t),
                           f"isfinite_{name}": lambda t=t: bool(torch.isfinite(t).all())},
                          rounds=3, runs=3, warmup=1)
        times.update(got)
        rates.update({k: t.numel() * t.element_size() / (v.median_ms * 1e-3) / 1e9
                      for k, v in got.items()})
    w = torch.softmax(torch.randn(32, 8), -1)
    small = measure_all({"ours_weights": lambda: all_finite(w),
                         "isfinite_weights": lambda: bool(torch.isfinite(w).all())},
                        rounds=5, runs=50)
    times.update(small)
    ratios = {k: times[k].median_ms / times[k.replace("ours", "isfinite")].median_ms
              for k in times if k.startswith("ours")}
    return dict(case="nan_check", times={k: v.as_dict() for k, v in times.items()},
                baseline="isfinite", ratios=ratios, gb_per_s=rates,
                shape=dict(bytes=64 << 20, weights=[32, 8]))


def finite_check(env):
    model, twin = _serving_case()
    ids = _inputs(4, 32, model.config.vocab_size, 0)
    rw = torch.softmax(torch.randn(4, len(twin.tasks)), -1)
    on = TwinMergedModule(copy.deepcopy(model), twin, mode="factored")
    off = TwinMergedModule(copy.deepcopy(model), twin, mode="factored", check_finite=False)

    def run(w):
        return lambda: w(input_ids=ids, mix_weights=rw)

    with torch.inference_mode():
        times = measure_all({"check_finite": run(on), "unchecked": run(off)}, rounds=7, runs=10)
    return _row("finite_check", times, "unchecked", shape=dict(B=4, L=32, hidden=256, T=8, r=16))


def call_overhead(env):
    torch.manual_seed(0)
    base = {"lin.weight": torch.randn(8, 8), "lin.bias": torch.randn(8)}
    experts = {t: {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for t in "abcd"}
    twin = TwinCheckpoint.build(base, experts, rank=2)
    plain = nn.Sequential()
    plain.add_module("lin", nn.Linear(8, 8))
    wrapped = TwinMergedModule(copy.deepcopy(plain), twin, mode="factored")
    unchecked = TwinMergedModule(copy.deepcopy(plain), twin, mode="factored", check_finite=False)
    x = torch.randn(2, 8)
    rw = torch.softmax(torch.randn(2, 4), -1)
    with torch.inference_mode():
        times = measure_all({"wrapped": lambda: wrapped(x, mix_weights=rw),
                             "wrapped_unchecked": lambda: unchecked(x, mix_weights=rw),
                             "plain_linear": lambda: plain(x)}, rounds=7, runs=50)
    return _row("call_overhead", times, "plain_linear", shape=dict(B=2, m=8, n=8, T=4, r=2))


def _threaded(calls, threads):
    """Wall time (ms) of calls split over `threads` threads (1: in order, this thread)."""
    if threads == 1:
        t0 = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t0) * 1e3
    chunks = [calls[i::threads] for i in range(threads)]
    barrier = threading.Barrier(threads + 1)

    def run(chunk):
        barrier.wait()
        with torch.inference_mode():  # grad mode is per thread: as the one-thread variant runs
            for c in chunk:
                c()

    workers = [threading.Thread(target=run, args=(c,)) for c in chunks]
    for w in workers:
        w.start()
    barrier.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    return (time.perf_counter() - t0) * 1e3


def _thread_case(name, mode, rounds=5):
    """Both with torch's intra-op threads on every core (its default) and with one each: with
    OpenMP, every serving thread has its own team of intra-op threads, and a team that just
    finished spins on the cores the next thread's team needs."""
    default = torch.get_num_threads()
    rows = {}
    for intra in sorted({default, 1}, reverse=True):
        torch.set_num_threads(intra)
        try:
            rows[f"intra_op_threads_{intra}"] = _thread_runs(mode, rounds)
        finally:
            torch.set_num_threads(default)
    first = rows[f"intra_op_threads_{default}"]
    return dict(case=name, baseline="one_thread", ratios=first["ratios"], by_intra_op_threads=rows,
                shape=first["shape"])


def _thread_runs(mode, rounds):
    model, twin = _serving_case()
    T = len(twin.tasks)
    jobs = [(_inputs(2, 32, model.config.vocab_size, i), torch.softmax(torch.randn(T), -1))
            for i in range(8 * THREADS)]
    variants = {"one_thread": (1, 1), f"{THREADS}_threads": (THREADS, 1)}
    if mode == "materialize":
        variants = {"one_thread": (1, 1), f"{THREADS}_threads_one_set": (THREADS, 1),
                    f"{THREADS}_threads_{THREADS}_sets": (THREADS, THREADS)}
    wrappers = {sets: TwinMergedModule(copy.deepcopy(model), twin, mode=mode, buffer_sets=sets)
                for sets in {s for _, s in variants.values()}}
    raw = {k: [] for k in variants}
    with torch.inference_mode():
        for _ in range(rounds + 1):  # the first round warms up
            for k, (threads, sets) in variants.items():
                w = wrappers[sets]
                calls = [lambda ids=ids, v=v, w=w: w(input_ids=ids, mix_weights=v)
                         for ids, v in jobs]
                raw[k].append(_threaded(calls, threads))
    med = {k: statistics.median(v[1:]) for k, v in raw.items()}
    return dict(times_ms=med,
                ratios={k: v / med["one_thread"] for k, v in med.items() if k != "one_thread"},
                shape=dict(calls=len(jobs), B=2, L=32, hidden=256, T=T, threads=THREADS))


def threads_factored(env):
    return _thread_case("threads_factored", "factored")


def threads_materialize(env):
    return _thread_case("threads_materialize", "materialize")


def merge_finite_check(env):
    model, _ = _serving_case(hidden=384)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    experts = _synthetic_experts(base, 8, [k for k, v in base.items() if v.is_floating_point()],
                                 g)
    checked = merging._check_finite

    def unchecked():
        merging._check_finite = lambda t, *a: t
        try:
            return merging.task_arithmetic(base, experts)
        finally:
            merging._check_finite = checked

    times = measure_all({"checked": lambda: merging.task_arithmetic(base, experts),
                         "unchecked": unchecked}, rounds=5, runs=3, warmup=1)
    return _row("merge_finite_check", times, "unchecked", shape=dict(T=8, hidden=384))


CASES = [nan_check, finite_check, call_overhead, threads_factored, threads_materialize, merge_finite_check]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cases", default="", help="comma-separated substrings of case names")
    args = parser.parse_args(argv)
    patterns = [p for p in args.cases.split(",") if p]
    env = environment(torch.device("cpu"))
    results = dict(environment=env, results=[])
    for case in CASES:
        if patterns and not any(p in case.__name__ for p in patterns):
            continue
        row = case(env)
        results["results"].append(row)
        for label, sub in row.get("by_intra_op_threads", {"": row}).items():
            ratios = "  ".join(f"{k}: {v:.3f}x" for k, v in sub["ratios"].items())
            print(f"{row['case']:<22} against {row['baseline']:<14} {ratios}  {label}",
                  flush=True)
        if args.out:
            _write(args.out, results)
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
