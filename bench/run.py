"""Benchmark runner: correctness first, then ours against the baselines, timed side by side.

    python -m bench.run --suite cpu --out bench/results/cpu.json
    python -m bench.run --suite gpu --cases serve,model_merge --out bench/results/gpu-part2.json

Baselines in every case, as issue #5 names them: (a) the authors' style, dense deltas summed
per sample; (b) a loop of per-expert addmm; (c) the best plain-torch formulation
(pre-concatenated factors, one addmm/matmul); (d) the floor, bytes moved / measured copy bandwidth
and FLOPs / measured GEMM rate, whichever is larger.

Every case has a name (`--list` prints them); `--cases` runs those whose name contains one of
the given comma-separated substrings, so a GPU run can be split. A row carries the issue's
targets that apply to it (`targets`: value, limit, met), and a case that fails is recorded with
its error while the others still run (exit status 1).
"""

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import subprocess
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import twinmerge_ext as tm
from bench.timing import Timing, copy_bandwidth, gemm_rate, measure_all
from twinmerge_ext import TwinCheckpoint, TwinMergedModule, TwinRouter
from twinmerge_ext import reference as ref
from twinmerge_ext.demo.run import authors_deltas, authors_merge

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Relative tolerances of the checks (max abs error / max abs expected value): one op, and a
# whole network whose outputs went through every layer in the storage dtype.
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
MODEL_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}

def _factors(L, m, n, T, r, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).to(device)
    K = T * r
    return dict(base=mk(L, m, n), U=mk(L, m, K, scale=K**-0.5), S=mk(L, K).abs().add_(0.5),
                V=mk(L, n, K), ranks=[r] * T,
                w=torch.softmax(torch.randn(T, generator=g), 0).to(device))


def _check(name, actual, expected, dtype, tol=None):
    """max |actual - expected| / max |expected|, raising above the dtype's tolerance (or `tol`):
    a wrong result is never timed."""
    tol = TOL[dtype] if tol is None else tol
    err = ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()
    if err > tol:
        raise AssertionError(f"{name}: relative error {err:.2e} > {tol:.0e}; not timing a wrong result")
    return err


def bench_merge(m, n, T, r, dtype, device, env):
    """Materialized merge of one m x n matrix (lowrank_merge_) against (a), (b), (c), (d)."""
    f = _factors(1, m, n, T, r, dtype, device)
    base, U, S, V, ranks, w = f["base"][0], f["U"][0], f["S"][0], f["V"][0], f["ranks"], f["w"]
    out = torch.empty_like(base)
    K = T * r
    index = ref.expert_of_col(ranks, device)
    ours = lambda: tm.lowrank_merge_(out, base, U, S, V, ranks, w)
    ours()
    err = _check("lowrank_merge_", out, ref.lowrank_merge(base, U, S, V, ranks, w), dtype)

    dense = tm.reconstruct_delta(U.view(m, T, r).transpose(0, 1), S.view(T, r),
                                 V.view(n, T, r).transpose(0, 1))  # [T, m, n]
    Ut, St, Vt = U.view(m, T, r).unbind(1), S.view(T, r).unbind(0), V.view(n, T, r).unbind(1)

    def authors():  # θs + Σ wt Δt over dense deltas, one tensor op per expert
        o = base.clone()
        for t in range(T):
            o += w[t] * dense[t]
        return o

    def per_expert_addmm():
        o = base.clone()
        for t in range(T):
            o.addmm_(Ut[t] * (w[t] * St[t]), Vt[t].T)
        return o

    def best_torch():
        return torch.addmm(base, U * (w.index_select(0, index).to(dtype) * S), V.T, out=out)

    _check("best plain torch", best_torch(), ref.lowrank_merge(base, U, S, V, ranks, w), dtype)
    fns = {"ours": ours, "a_authors": authors, "b_per_expert_addmm": per_expert_addmm,
           "c_best_torch": best_torch}
    if device.type == "cuda":  # our cuBLAS fallback beside the cuBLASLt path: what Lt is worth
        fns["ours_cublas"] = _cublas_only(ours)
        fns["ours_cublas"]()
        _check("lowrank_merge_ (cuBLAS path)", out, ref.lowrank_merge(base, U, S, V, ranks, w), dtype)
    times = measure_all(fns, device)
    size = base.element_size()
    bytes_moved = size * (2 * m * n + K * (m + n))
    floor_ms = 1e3 * max(bytes_moved / env["copy_bandwidth"], 2 * m * n * K / env["gemm_rate"][str(dtype)])
    return _row("lowrank_merge_", dict(m=m, n=n, T=T, r=r, K=K, dtype=str(dtype)), times, floor_ms, err)


def _cublas_only(fn):
    """fn with the ops' cuBLASLt path switched off (TWINMERGE_CUBLASLT=off, read per call)."""
    def run():
        previous = os.environ.get("TWINMERGE_CUBLASLT")
        os.environ["TWINMERGE_CUBLASLT"] = "off"
        try:
            return fn()
        finally:
            if previous is None:
                del os.environ["TWINMERGE_CUBLASLT"]
            else:
                os.environ["TWINMERGE_CUBLASLT"] = previous
    return run


def bench_mix(rows_per_b, B, m, n, T, r, dtype, device, env):
    """Factored mixing (lowrank_mix_linear), every batch entry with its own weights."""
    f = _factors(1, m, n, T, r, dtype, device, seed=1)
    U, S, V, ranks = f["U"][0], f["S"][0], f["V"][0], f["ranks"]
    W = (torch.randn(m, n) / n**0.5).to(dtype).to(device)
    x = torch.randn(B, rows_per_b, n).to(dtype).to(device)
    rw = torch.softmax(torch.randn(B, T), 1).to(device)
    K = T * r
    index = ref.expert_of_col(ranks, device)
    ours = lambda: tm.lowrank_mix_linear(x, W, None, U, S, V, ranks, rw)
    err = _check("lowrank_mix_linear", ours(), ref.lowrank_mix_linear(x, W, None, U, S, V, ranks, rw), dtype)

    def best_torch():
        coef = (rw.index_select(1, index) * S).to(dtype).unsqueeze(1)  # [B, 1, K]
        return F.linear(x, W) + ((x @ V) * coef) @ U.T

    _check("best plain torch", best_torch(), ref.lowrank_mix_linear(x, W, None, U, S, V, ranks, rw), dtype)
    fns = {"ours": ours, "base_gemm": lambda: F.linear(x, W), "c_best_torch": best_torch}
    if device.type == "cuda":
        fns["ours_cublas"] = _cublas_only(ours)
        _check("lowrank_mix_linear (cuBLAS path)", fns["ours_cublas"](),
               ref.lowrank_mix_linear(x, W, None, U, S, V, ranks, rw), dtype)
    times = measure_all(fns, device)
    bound_ms = times["base_gemm"].median_ms * (1 + K * (m + n) / (m * n))
    row = _row("lowrank_mix_linear", dict(rows=B * rows_per_b, B=B, m=m, n=n, T=T, r=r, K=K,
                                          dtype=str(dtype)), times, bound_ms, err,
               floor_name="flop_bound")
    row["ours_over_base_gemm"] = times["ours"].median_ms / times["base_gemm"].median_ms
    return row


def bench_svd(batch, m, n, r, device, env, rounds=3, runs=3, warmup=3):
    """truncated_svd against the full SVD and torch.svd_lowrank, with the error ratio (to the
    optimal rank-r error, Eckart–Young: the norm of the singular values past r)."""
    g = torch.Generator().manual_seed(2)
    k = min(m, n)
    # On the device: the QR of 8 4096 x 4096 matrices takes the host seconds.
    Uo = torch.linalg.qr(torch.randn(batch, m, k, generator=g).to(device))[0]
    Vo = torch.linalg.qr(torch.randn(batch, n, k, generator=g).to(device))[0]
    sigma = torch.arange(1, k + 1, dtype=torch.float64) ** -0.5
    A = (Uo * sigma.to(device, torch.float32)) @ Vo.mT
    err = lambda U, S, V: (A - (U * S.unsqueeze(-2)) @ V.mT).norm(dim=(-2, -1))
    # A's singular values are sigma up to fp32 rounding (~1e-6 of ||A||, far below the 0.5% the
    # ratio is judged at), so the optimal error is known without an fp64 SVD, which would cost
    # the GPU run tens of seconds at 8 x 4096^2.
    optimal = sigma[r:].norm().to(device)
    ratio = (err(*tm.truncated_svd(A, r)).double() / optimal).max().item()
    lowrank = torch.svd_lowrank(A, q=r + 10, niter=2)
    ratio_lowrank = (err(lowrank[0][..., :r], lowrank[1][..., :r], lowrank[2][..., :r]).double()
                     / optimal).max().item()
    times = measure_all({"ours": lambda: tm.truncated_svd(A, r),
                         "full_svd": lambda: torch.linalg.svd(A, full_matrices=False),
                         "torch_svd_lowrank": lambda: torch.svd_lowrank(A, q=r + 10, niter=2)},
                        device, rounds=rounds, runs=runs, warmup=warmup)
    row = _row("truncated_svd", dict(batch=batch, m=m, n=n, r=r), times, None, None)
    row.update(error_ratio=ratio, error_ratio_svd_lowrank=ratio_lowrank,
               ours_ms_per_matrix=times["ours"].median_ms / batch)
    return row


def _randn(shape, g, dtype, device, scale=1.0):
    """Normal samples drawn on `device` in `dtype` directly (no float32 or host copy of a
    whole-model tensor)."""
    return torch.randn(shape, generator=g, dtype=dtype, device=device).mul_(scale)


def _scaled(t: Timing, factor: float) -> Timing:
    return Timing(t.median_ms * factor, t.p10_ms * factor, t.p90_ms * factor, t.runs)


def _free(device):
    """Returns a finished case's memory to the device, so that the next one starts empty."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_model_merge(layers, hidden, intermediate, T, r, dtype, device, env, rounds=7, runs=20,
                      warmup=3, check_per_shape=2):
    """Whole-model merge: every matrix of a Llama-shaped model (per layer q, k, v, o
    hidden x hidden, gate and up intermediate x hidden, down hidden x intermediate) merged into
    its preallocated buffer, against (a) per-expert reconstruct-and-sum, (b) a per-expert addmm
    loop and (c) one addmm with pre-scaled concatenated factors, each per matrix, and the floor.

    Storage is one stacked tensor per distinct shape; the library's way (`ours`) is one
    lowrank_merge_ per parameter (its view), `ours_stacked` one call per shape with the L
    matrices as leading dims. Checked against the reference on `check_per_shape` matrices of
    each shape (first and last), for every implementation, before timing."""
    g = torch.Generator(device=device).manual_seed(3)
    K = T * r
    ranks = [r] * T
    groups = []
    for L, m, n in ((4 * layers, hidden, hidden), (2 * layers, intermediate, hidden),
                    (layers, hidden, intermediate)):
        groups.append(dict(base=_randn((L, m, n), g, dtype, device),
                           out=torch.empty((L, m, n), dtype=dtype, device=device),
                           U=_randn((L, m, K), g, dtype, device, K**-0.5),
                           S=_randn((L, K), g, dtype, device).abs_().add_(0.5),
                           V=_randn((L, n, K), g, dtype, device)))
    w = torch.softmax(torch.randn(T, generator=g, device=device), 0)
    index = ref.expert_of_col(ranks, device)
    params = [{k: v[i] for k, v in grp.items()} for grp in groups for i in range(grp["base"].shape[0])]
    for p in params:
        p["experts"] = [(p["U"][:, t * r:(t + 1) * r], p["S"][t * r:(t + 1) * r],
                         p["V"][:, t * r:(t + 1) * r]) for t in range(T)]
    checked = [{k: v[i] for k, v in grp.items()} for grp in groups
               for i in sorted({0, grp["base"].shape[0] - 1})[:check_per_shape]]
    expected = [ref.lowrank_merge(p["base"], p["U"], p["S"], p["V"], ranks, w) for p in checked]

    def ours():
        for p in params:
            tm.lowrank_merge_(p["out"], p["base"], p["U"], p["S"], p["V"], ranks, w)

    def ours_stacked():
        for grp in groups:
            tm.lowrank_merge_(grp["out"], grp["base"], grp["U"], grp["S"], grp["V"], ranks, w)

    def reconstruct_and_sum():  # every expert's dense delta materialized, then summed
        for p in params:
            p["out"].copy_(p["base"])
            for t, (Ut, St, Vt) in enumerate(p["experts"]):
                p["out"] += w[t] * ((Ut * St) @ Vt.T)

    def per_expert_addmm():
        for p in params:
            p["out"].copy_(p["base"])
            for t, (Ut, St, Vt) in enumerate(p["experts"]):
                p["out"].addmm_(Ut * (w[t] * St), Vt.T)

    def best_torch():
        scale = w.index_select(0, index).to(dtype)
        for p in params:
            torch.addmm(p["base"], p["U"] * (scale * p["S"]), p["V"].T, out=p["out"])

    fns = {"ours": ours, "ours_stacked": ours_stacked, "a_reconstruct_and_sum": reconstruct_and_sum,
           "b_per_expert_addmm": per_expert_addmm, "c_best_torch": best_torch}
    errors = {}
    for name, fn in fns.items():
        for grp in groups:
            grp["out"].fill_(float("nan"))  # a matrix an implementation skips cannot pass
        fn()
        errors[name] = max(_check(f"model merge {name}", p["out"], e, dtype)
                           for p, e in zip(checked, expected))
    del expected
    times = measure_all(fns, device, rounds=rounds, runs=runs, warmup=warmup)
    size = groups[0]["base"].element_size()
    mn = sum(grp["base"][0].numel() * grp["base"].shape[0] for grp in groups)
    m_plus_n = sum((grp["U"].shape[1] + grp["V"].shape[1]) * grp["base"].shape[0] for grp in groups)
    bytes_moved = size * (2 * mn + K * m_plus_n)
    floor_ms = 1e3 * max(bytes_moved / env["copy_bandwidth"], 2 * mn * K / env["gemm_rate"][str(dtype)])
    row = _row("model_merge", dict(layers=layers, hidden=hidden, intermediate=intermediate,
                                   matrices=len(params), T=T, r=r, K=K, dtype=str(dtype)),
               times, floor_ms, errors["ours"])
    row.update(ours_stacked_over_floor=times["ours_stacked"].median_ms / floor_ms,
               bytes_moved=bytes_moved, max_rel_error_stacked=errors["ours_stacked"])
    return row


def _roberta_config(**overrides):
    from transformers import RobertaConfig
    return RobertaConfig(**overrides)


def _synthetic_experts(base, T, changed, g, signal_rank=8, scale=0.01, noise=0.2):
    """T experts = base + a task vector on the tensors named in `changed`: on a matrix a random
    rank-`signal_rank` delta of RMS `scale` plus dense noise of RMS noise·scale (a fine-tuning
    delta is dominated by a few directions, not exactly low-rank); on other tensors dense noise
    of RMS scale. Unchanged tensors are the base's own (shared, not copied)."""
    experts = {}
    for t in range(T):
        sd = {}
        for name, p in base.items():
            if name not in changed:
                sd[name] = p
                continue
            if p.dim() == 2:
                m, n = p.shape
                a = torch.randn(m, signal_rank, generator=g, device=p.device)
                b = torch.randn(signal_rank, n, generator=g, device=p.device)
                d = (a @ b).mul_(scale / signal_rank**0.5)
                d += torch.randn(m, n, generator=g, device=p.device).mul_(noise * scale)
            else:
                d = torch.randn(p.shape, generator=g, device=p.device).mul_(scale)
            sd[name] = (p.float() + d).to(p.dtype)
        experts[f"task{t}"] = sd
    return experts


def bench_compress(config, T, device, env, rounds=3, warmup=0, check=("query.weight",
                                                                      "intermediate.dense.weight")):
    """End-to-end compression: TwinCheckpoint.build of T RoBERTa-shaped fp32 experts (state
    dicts already on `device`; every floating tensor changed) at the library's defaults (task
    arithmetic λ = 0.3, rank ratio 0.1), against (c) the same pipeline in plain torch with
    torch.svd_lowrank (shared expert, deltas, randomized SVD at the same rank and oversampling,
    no error report).

    Checked before timing on the first matrix whose name ends with each of `check`: θs against
    task arithmetic computed here, every task's compression error against the report and
    against the optimal rank-r error (Eckart–Young, from the singular values in fp64)."""
    from transformers import RobertaModel
    cfg = _roberta_config(**config)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in RobertaModel(cfg).state_dict().items()
                  if v.is_floating_point()}
    g = torch.Generator(device=device).manual_seed(4)
    base = {k: _randn(s, g, torch.float32, device, 0.02) for k, s in shapes.items()}
    experts = _synthetic_experts(base, T, set(base), g)
    build = lambda: TwinCheckpoint.build(base, experts)
    twin = build()
    scale = twin.metadata["shared"]["kwargs"]["scale"]
    rank_ratio = twin.metadata["compression"]["rank_ratio"]
    report = twin.report()
    err = 0.0
    worst_ratio = 0.0
    for suffix in check:
        name = next(k for k in twin.lowrank if k.endswith(suffix))
        deltas = torch.stack([e[name].double() - base[name].double() for e in experts.values()])
        shared = base[name].double() + scale * deltas.sum(0)
        err = max(err, _check(f"shared expert {name}", twin.shared[name], shared, torch.float32))
        v = deltas - (shared - base[name].double())                          # θt − θs
        sv = torch.linalg.svdvals(v)
        r = twin.lowrank[name].ranks[0]
        optimal = sv[:, r:].square().sum(-1).sqrt() / sv.square().sum(-1).sqrt()
        for t, task in enumerate(twin.tasks):
            Ut, St, Vt = (f.double() for f in twin.lowrank[name].factors(t))
            got = ((v[t] - (Ut * St) @ Vt.T).norm() / v[t].norm()).item()
            reported = report["errors"][name][task]
            if abs(got - reported) > 1e-3 * got + 1e-6:
                raise AssertionError(f"compression {name} {task}: the report says relative error "
                                     f"{reported:.6f}, recomputed {got:.6f}")
            worst_ratio = max(worst_ratio, got / optimal[t].item())
        if worst_ratio > 1.05:
            raise AssertionError(f"compression {name}: error {worst_ratio:.4f}x the optimal "
                                 f"rank-{r} error > 1.05x; not timing a wrong result")
    errors = [e for per_task in report["errors"].values() for e in per_task.values()]
    rank_of = {name: lr.ranks[0] for name, lr in twin.lowrank.items()}
    del twin

    def torch_pipeline():
        out = {}
        for name, b in base.items():
            deltas = torch.stack([e[name] - b for e in experts.values()])
            v = deltas - scale * deltas.sum(0)
            if name in rank_of:
                r = rank_of[name]
                U, S, V = torch.svd_lowrank(v, q=min(r + 10, *v.shape[1:]), niter=2)
                out[name] = (U[..., :r], S[..., :r], V[..., :r])
            else:
                out[name] = v
        return out

    times = measure_all({"ours": build, "c_torch_svd_lowrank_pipeline": torch_pipeline}, device,
                        rounds=rounds, runs=1, warmup=warmup)
    row = _row("compress_build", dict(layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                                      vocab=cfg.vocab_size, experts=T, matrices=len(rank_of),
                                      params_per_expert=sum(s.numel() for s in shapes.values()),
                                      rank_ratio=rank_ratio, dtype="torch.float32"), times, None, err)
    row.update(seconds=times["ours"].median_ms / 1e3,
               mean_compression_error=sum(errors) / len(errors),
               max_compression_error=max(errors), error_ratio=worst_ratio,
               delta="rank-8 signal + dense noise of 0.2x its RMS, on every floating tensor")
    return row


def _linear_rows(model, inputs):
    """(qualified name, rows, m, n) of every nn.Linear call in one forward of `model`."""
    calls = []
    hooks = [mod.register_forward_hook(
        lambda mod, args, out, name=name: calls.append(
            (name, args[0].numel() // args[0].shape[-1], mod.out_features, mod.in_features)))
        for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    try:
        model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return calls


def bench_serving(config, T, rank, batch, seq, dtype, device, env, check_rows=2,
                  authors_samples=4, rounds=7, runs=20, warmup=3):
    """TwinMergedModule serving a batch in factored mode, every row with its own softmax
    weights, on a RobertaModel built from `config` (random init, no download): T synthetic
    experts (low-rank-ish deltas on every Linear weight, dense noise on its bias), the twin
    built at `rank` (None: the library's default rank ratio 0.1).

    Timed side by side: the dynamic forward (`ours`), the shared model's plain forward, the
    router pass (an untrained TwinRouter of the authors' shape: its cost is a trained one's),
    group mode (KMeans plan, one merge and one sub-batch forward per group), and (a) the
    authors' style, per sample θs + Σt w_t·Δt over dense deltas then a batch-1 forward, on
    the first `authors_samples` rows, scaled to the batch; `a_authors` merges every parameter
    (zero deltas of unchanged tensors too, as their code keeps a delta per parameter),
    `a_authors_nonzero` only the twin's. The FLOP bound is the plain forward times
    1 + Σ K(m+n)·rows / Σ m·n·rows over the Linear calls of that forward.

    Checked before timing: `check_rows` rows of the batch, and the authors' style on them,
    against the model with twin.merged_state_dict(that row's weights) loaded."""
    from transformers import RobertaModel
    cfg = _roberta_config(**config)
    torch.manual_seed(5)
    with torch.device(device):
        model = RobertaModel(cfg).to(dtype).eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    linear = {f"{name}.{attr}" for name, mod in model.named_modules() if isinstance(mod, nn.Linear)
              for attr in ("weight", "bias")}
    g = torch.Generator(device=device).manual_seed(5)
    experts = _synthetic_experts(base, T, linear, g)
    twin = TwinCheckpoint.build(base, experts, rank=rank)
    del experts
    router = TwinRouter(cfg.hidden_size, twin.tasks).to(device).eval()
    wrapped = TwinMergedModule(copy.deepcopy(model), twin, router=router, mode="factored")
    # Self-routing: a router on the hidden state entering layer k (the first third on θs).
    self_layer = cfg.num_hidden_layers // 3
    selfish = TwinMergedModule(copy.deepcopy(model), twin, mode="factored", routing="self",
                               router=TwinRouter(cfg.hidden_size, twin.tasks, layer=self_layer)
                               .to(device).eval())
    plain = model
    plain.load_state_dict(twin.shared)
    authors_model = copy.deepcopy(plain)
    ids = torch.randint(3, cfg.vocab_size, (batch, seq), generator=g, device=device)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    row_in = lambda b: {k: v[b:b + 1] for k, v in inputs.items()}
    rw = torch.softmax(2 * torch.randn(batch, T, generator=g, device=device), -1)
    dense = authors_deltas(twin)
    unchanged = set(twin.report()["unchanged"])
    dense_nonzero = {k: v for k, v in dense.items() if k not in unchanged}
    n_authors = min(authors_samples, batch)

    def authors(deltas):
        def job():
            for i in range(n_authors):
                authors_model.load_state_dict(authors_merge(twin, deltas, rw[i]), strict=False)
                authors_model(**row_in(i))
        return job

    def group():
        wrapped.mode = "group"
        try:
            return wrapped(**inputs, mix_weights=rw)
        finally:
            wrapped.mode = "factored"

    tol = MODEL_TOL[dtype]
    with torch.inference_mode():
        got = wrapped(**inputs, mix_weights=rw).last_hidden_state
        shared_out = plain(**row_in(0)).last_hidden_state
        err, effect = 0.0, None
        for b in range(min(check_rows, batch)):
            plain.load_state_dict(twin.merged_state_dict(rw[b]))
            want = plain(**row_in(b)).last_hidden_state
            err = max(err, _check(f"TwinMergedModule row {b}", got[b:b + 1], want, dtype, tol))
            authors_model.load_state_dict(authors_merge(twin, dense, rw[b]), strict=False)
            _check(f"authors' style row {b}", authors_model(**row_in(b)).last_hidden_state, want,
                   dtype, tol)
            if b == 0:  # how far the row's own model is from θs: what the check can tell apart
                effect = ((want.double() - shared_out.double()).abs().max()
                          / want.double().abs().max()).item()
        plain.load_state_dict(twin.shared)
        calls = _linear_rows(plain, inputs)
        times = measure_all({
            "ours": lambda: wrapped(**inputs, mix_weights=rw),
            "plain_forward": lambda: plain(**inputs),
            "router_pass": lambda: wrapped.route(**inputs),
            "self_routed": lambda: selfish(**inputs),
            "router_pass_cut_short": lambda: selfish.route(**inputs),
            "group": group,
            "a_authors": authors(dense),
            "a_authors_nonzero": authors(dense_nonzero)}, device, rounds=rounds, runs=runs,
            warmup=warmup)
    for k in ("a_authors", "a_authors_nonzero"):
        times[k] = _scaled(times[k], batch / n_authors)
    K = {name: sum(lr.ranks) for name, lr in twin.lowrank.items()}
    base_flops = sum(rows * m * n for _, rows, m, n in calls)
    extra_flops = sum(rows * K.get(f"{name}.weight", 0) * (m + n) for name, rows, m, n in calls)
    bound = 1 + extra_flops / base_flops
    bound_ms = times["plain_forward"].median_ms * bound
    r = sorted({x for lr in twin.lowrank.values() for x in lr.ranks})
    row = _row("twin_serving", dict(model="roberta", layers=cfg.num_hidden_layers,
                                    hidden=cfg.hidden_size, T=T, r=r[0] if len(r) == 1 else r,
                                    B=batch, seq=seq, dtype=str(dtype)),
               times, bound_ms, err, floor_name="flop_bound")
    plain_ms = times["plain_forward"].median_ms
    row.update(ours_over_plain=times["ours"].median_ms / plain_ms,
               two_pass_over_plain=(times["router_pass"].median_ms + times["ours"].median_ms)
               / plain_ms,
               self_routed_over_plain=times["self_routed"].median_ms / plain_ms,
               cut_short_two_pass_over_plain=(times["router_pass_cut_short"].median_ms
                                              + times["ours"].median_ms) / plain_ms,
               self_routed_at_layer=self_layer,
               flop_bound_over_plain=bound, mixing_effect=effect, check_tolerance=tol,
               patched_linear_calls=sum(1 for name, *_ in calls if f"{name}.weight" in K),
               authors_samples_timed=n_authors, authors_times_scaled_by=batch / n_authors,
               router="untrained TwinRouter(hidden, tasks), layer -1 mean pooling: the first "
                      "pass, timed alone; self_routed: one pass, a TwinRouter on the hidden "
                      "state entering layer self_routed_at_layer inside it (the layers before "
                      "on θs), two_pass: router pass + ours, cut_short_two_pass: that router's "
                      "pass (stopped at its layer) + ours",
               group=f"mode='group', n_groups={wrapped.n_groups}: KMeans plan on the host, one "
                     f"merge and one sub-batch forward per group (approximate by design)")
    return row


def _skipped(op, shape, why):
    return dict(op=op, shape=shape, skipped=why)


def _peak_extra_bytes(fn, device):
    """Peak memory a call allocates beyond what was held before it, less its output (after one
    untimed call, so that one-time workspaces are already held)."""
    fn()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before - out.numel() * out.element_size()


def bench_mix_memory(rows_per_b, B, m, n, T, r, dtype, device, env):
    """Peak extra memory of factored mixing (lowrank_mix_linear), against the budget
    K(m+n) + rows·max(m, n) elements of the storage dtype (the factors' size once more, plus one
    activation-sized buffer), and against (c) plain torch. CUDA only (torch.cuda statistics)."""
    K = T * r
    rows = B * rows_per_b
    shape = dict(rows=rows, B=B, m=m, n=n, T=T, r=r, K=K, dtype=str(dtype))
    if device.type != "cuda":
        return _skipped("mix_peak_memory", shape, "needs a CUDA device (torch.cuda memory statistics)")
    f = _factors(1, m, n, T, r, dtype, device, seed=5)
    U, S, V, ranks = f["U"][0], f["S"][0], f["V"][0], f["ranks"]
    g = torch.Generator(device=device).manual_seed(5)
    W = _randn((m, n), g, dtype, device, n**-0.5)
    x = _randn((B, rows_per_b, n), g, dtype, device)
    rw = torch.softmax(torch.randn(B, T, generator=g, device=device), 1)
    index = ref.expert_of_col(ranks, device)
    ours = lambda: tm.lowrank_mix_linear(x, W, None, U, S, V, ranks, rw)

    def best_torch():
        coef = (rw.index_select(1, index) * S).to(dtype).unsqueeze(1)
        return F.linear(x, W) + ((x @ V) * coef) @ U.T

    expected = ref.lowrank_mix_linear(x, W, None, U, S, V, ranks, rw)
    err = _check("lowrank_mix_linear", ours(), expected, dtype)
    _check("best plain torch", best_torch(), expected, dtype)
    del expected
    extra = _peak_extra_bytes(ours, device)
    extra_torch = _peak_extra_bytes(best_torch, device)
    size = x.element_size()
    budget = size * (K * (m + n) + rows * max(m, n))
    return dict(op="mix_peak_memory", shape=shape, max_rel_error=err, peak_extra_bytes=extra,
                budget_bytes=budget, ours_over_budget=extra / budget,
                c_best_torch_peak_extra_bytes=extra_torch,
                budget="K(m+n) + rows*max(m,n) elements of the storage dtype; the output and "
                       "what was held before the call (inputs, one-time workspaces) excluded")


def _capture(fn):
    """A CUDA graph of fn() (warmed up on a side stream, as torch.cuda.graphs asks) and the
    output tensor its replays write."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def bench_mix_graph(rows_per_b, B, m, n, T, r, dtype, device, env):
    """lowrank_mix_linear captured once in a CUDA graph and replayed with new row weights
    (copied into the captured tensor) against the eager call and the base GEMM, both ways;
    lowrank_merge_ of the m x n matrix captured and replayed with new weights too. Capture
    fails on any host synchronisation; every replay is checked against the reference."""
    K = T * r
    shape = dict(rows=B * rows_per_b, B=B, m=m, n=n, T=T, r=r, K=K, dtype=str(dtype))
    if device.type != "cuda":
        return _skipped("mix_cuda_graph", shape, "needs a CUDA device (CUDA graphs)")
    f = _factors(1, m, n, T, r, dtype, device, seed=6)
    base, U, S, V, ranks = f["base"][0], f["U"][0], f["S"][0], f["V"][0], f["ranks"]
    g = torch.Generator(device=device).manual_seed(6)
    W = _randn((m, n), g, dtype, device, n**-0.5)
    x = _randn((B, rows_per_b, n), g, dtype, device)
    rw = torch.softmax(torch.randn(B, T, generator=g, device=device), 1)
    w = f["w"].clone()
    merged = torch.empty_like(base)
    eager = lambda: tm.lowrank_mix_linear(x, W, None, U, S, V, ranks, rw)
    base_gemm = lambda: F.linear(x, W)
    mix_graph, y = _capture(eager)
    base_graph, _ = _capture(base_gemm)
    merge_graph, _ = _capture(lambda: tm.lowrank_merge_(merged, base, U, S, V, ranks, w))
    rw.copy_(torch.softmax(torch.randn(B, T, generator=g, device=device), 1))
    w.copy_(torch.softmax(torch.randn(T, generator=g, device=device), 0))
    mix_graph.replay()
    merge_graph.replay()
    err = _check("lowrank_mix_linear graph replay", y,
                 ref.lowrank_mix_linear(x, W, None, U, S, V, ranks, rw), dtype)
    err_merge = _check("lowrank_merge_ graph replay", merged,
                       ref.lowrank_merge(base, U, S, V, ranks, w), dtype)
    times = measure_all({"ours": mix_graph.replay, "eager": eager,
                         "base_gemm_graph": base_graph.replay, "base_gemm_eager": base_gemm}, device)
    row = _row("mix_cuda_graph", shape, times, None, err)
    row.update(ours_over_base_gemm_graph=times["ours"].median_ms / times["base_gemm_graph"].median_ms,
               merge_graph_max_rel_error=err_merge)
    return row


def _target(row, label, key, op, limit):
    """Adds one of issue 5's targets to a row: the row's value at `key` (dotted for nested
    dicts), compared with `limit` by `op` ("<=" or ">=")."""
    value = row
    for part in key.split("."):
        value = value[part]
    met = value <= limit if op == "<=" else value >= limit
    row.setdefault("targets", []).append(dict(target=label, metric=key, value=value,
                                              limit=f"{op} {limit:g}", met=bool(met)))


def _with_targets(case, *targets):
    """The case, with these (label, key, op, limit) targets added to its row when it ran."""
    def run(env):
        row = case(env)
        if "skipped" not in row:
            for target in targets:
                _target(row, *target)
        return row
    return run


def _row(op, shape, times, floor_ms, err, floor_name="floor"):
    ours = times["ours"].median_ms
    row = dict(op=op, shape=shape, times={k: t.as_dict() for k, t in times.items()},
               max_rel_error=err, speedup={k: t.median_ms / ours for k, t in times.items() if k != "ours"})
    if floor_ms is not None:
        row[floor_name + "_ms"] = floor_ms
        row["ours_over_" + floor_name] = ours / floor_ms
    return row


# The CPU analogues of the GPU-sized model cases: seconds each on 2 cores.
CPU_ROBERTA = dict(num_hidden_layers=2, hidden_size=256, num_attention_heads=4,
                   intermediate_size=1024, vocab_size=1000, max_position_embeddings=66)
CPU_ROBERTA_COMPRESS = dict(num_hidden_layers=2, hidden_size=384, num_attention_heads=6,
                            intermediate_size=1536, vocab_size=2000)

# Issue 5's targets, as (label, row key, op, limit).
T1 = (("1: <= 1.4x the bandwidth floor", "ours_over_floor", "<=", 1.4),
      ("1: >= 3x (c) best plain torch", "speedup.c_best_torch", ">=", 3.0))
T3 = (("3: <= 1.3x the base GEMM", "ours_over_base_gemm", "<=", 1.3),)
T5 = (("5: <= 1.15x the FLOP bound", "ours_over_flop_bound", "<=", 1.15),
      ("5: >= 50x (a) the authors' style", "speedup.a_authors", ">=", 50.0))
T6_MERGE = (("6: within 1.1x of (c) best plain torch", "speedup.c_best_torch", ">=", 1 / 1.1),)
T6_MIX = (("6: within 1.5x of the base matmul", "ours_over_base_gemm", "<=", 1.5),)
T7 = (("7: peak extra <= K(m+n) + one activation", "ours_over_budget", "<=", 1.0),)


def _mix_cases(rows_per_b, n, r, dtype, device, targets):
    """Factored mixing of an n x n layer, T = 8, for a batch of 32 entries of rows_per_b rows
    each (1: decode), every entry with its own weights."""
    return [(f"mix_{'decode' if rows == 1 else 'prefill'}_{32 * rows}rows_{n}_r{r}", _with_targets(
        lambda env, rows=rows: bench_mix(rows, 32, n, n, 8, r, dtype, device, env), *targets))
        for rows in rows_per_b]


def suites(device):
    """(name, case) per suite; a case takes the environment and returns its row."""
    f32, bf16 = torch.float32, torch.bfloat16
    cpu = [("merge_1024x1024_r16", _with_targets(
        lambda env: bench_merge(1024, 1024, 8, 16, f32, device, env), *T6_MERGE))]
    cpu += _mix_cases((128, 1), 1024, 16, f32, device, T6_MIX)
    cpu += [
        ("svd_4x1024_r16", lambda env: bench_svd(4, 1024, 1024, 16, device, env)),
        # Each call takes 0.1-0.5 s here and the CPU timer runs two calls a round at least.
        ("model_merge_2L_h1024_r32", lambda env: bench_model_merge(
            2, 1024, 2752, 8, 32, f32, device, env, rounds=3, warmup=0)),
        ("compress_roberta_2L_h384", lambda env: bench_compress(
            CPU_ROBERTA_COMPRESS, 8, device, env, rounds=2)),
    ]
    # rank None: the library's default rank ratio 0.1 (r = 25 here, 76 on RoBERTa-base).
    cpu += [(f"serve_roberta_2L_h256_{label}", lambda env, rank=rank: bench_serving(
        CPU_ROBERTA, 8, rank, 4, 32, f32, device, env, authors_samples=2, rounds=3, warmup=1))
        for label, rank in (("r16", 16), ("r10pct", None))]
    # Rounds and runs keep the whole GPU suite near 3 minutes on an H100: the default 7 x 20
    # runs where a call takes under a millisecond; where a call takes 10 ms to seconds (the
    # full SVD baseline ~9 s, a whole-model merge 10-200 ms, a build ~1.5 s, the authors' style
    # ~25 ms a sample, group mode ~0.5 s), a few runs, which still give medians of every
    # implementation in the same interleaved rounds.
    gpu = [(f"merge_4096x4096_r{r}", _with_targets(
        lambda env, r=r: bench_merge(4096, 4096, 8, r, bf16, device, env), *T1)) for r in (1, 16, 64, 128)]
    gpu += [
        ("merge_11008x4096_r64", _with_targets(
            lambda env: bench_merge(11008, 4096, 8, 64, bf16, device, env), *T1))]
    gpu += _mix_cases((1, 512), 4096, 64, bf16, device, T3)
    gpu += [
        ("svd_8x4096_r64", _with_targets(
            lambda env: bench_svd(8, 4096, 4096, 64, device, env, rounds=2, runs=1, warmup=0),
            ("4: <= 1 ms per matrix", "ours_ms_per_matrix", "<=", 1.0),
            ("4: error <= 1.005x the optimal", "error_ratio", "<=", 1.005))),
        ("model_merge_llama7b_r32", _with_targets(
            lambda env: bench_model_merge(32, 4096, 11008, 8, 32, bf16, device, env, rounds=5,
                                          runs=3, warmup=1),
            ("2: <= 1.2x the bandwidth floor", "ours_over_floor", "<=", 1.2))),
        ("compress_roberta_base", _with_targets(
            lambda env: bench_compress({}, 8, device, env, rounds=2),
            ("4: compression end to end <= 2 s", "seconds", "<=", 2.0))),
    ]
    gpu += [(f"serve_roberta_base_{label}", _with_targets(
        lambda env, rank=rank: bench_serving({}, 8, rank, 64, 128, bf16, device, env, check_rows=3,
                                             authors_samples=8, rounds=3, runs=3, warmup=1), *T5))
        for label, rank in (("r16", 16), ("r76", None))]
    gpu += [
        ("mix_memory_decode_32rows_4096_r64", _with_targets(
            lambda env: bench_mix_memory(1, 32, 4096, 4096, 8, 64, bf16, device, env), *T7)),
        ("mix_memory_prefill_16384rows_4096_r64", _with_targets(
            lambda env: bench_mix_memory(512, 32, 4096, 4096, 8, 64, bf16, device, env), *T7)),
        ("mix_cuda_graph_decode_32rows_4096_r64", lambda env: bench_mix_graph(
            1, 32, 4096, 4096, 8, 64, bf16, device, env)),
    ]
    return {"cpu": cpu, "gpu": gpu}


def environment(device):
    def git_rev():
        try:
            return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
               torch=torch.__version__, cuda=torch.version.cuda, threads=torch.get_num_threads(),
               git=git_rev(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               copy_bandwidth=copy_bandwidth(device))
    dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, torch.bfloat16, torch.float16]
    env["gemm_rate"] = {str(d): gemm_rate(d, device) for d in dtypes}
    return env


# Row values printed after the speedups, when a row has them: (key, format, scale).
_EXTRAS = (("error_ratio", "error ratio {:.4f}", 1), ("ours_over_base_gemm", "{:.2f}x base GEMM", 1),
           ("ours_stacked_over_floor", "stacked {:.2f}x floor", 1), ("seconds", "{:.2f} s", 1),
           ("mean_compression_error", "mean rel. error {:.4f}", 1),
           ("ours_over_plain", "{:.2f}x plain forward", 1),
           ("flop_bound_over_plain", "(bound {:.2f}x)", 1),
           ("two_pass_over_plain", "router pass + ours {:.2f}x", 1),
           ("self_routed_over_plain", "self-routed {:.2f}x", 1),
           ("cut_short_two_pass_over_plain", "cut-short router + ours {:.2f}x", 1),
           ("ours_over_base_gemm_graph", "graph {:.2f}x base GEMM graph", 1),
           ("peak_extra_bytes", "peak extra {:.1f} MB", 1e-6), ("budget_bytes", "budget {:.1f} MB", 1e-6),
           ("ours_over_budget", "= {:.2f}x budget", 1),
           ("c_best_torch_peak_extra_bytes", "(c) {:.1f} MB", 1e-6))


def print_table(rows):
    print(f"{'op':<20}{'shape':<52}{'ours ms':>9}{'vs floor':>10}  speedup of ours over baselines")
    for row in rows:
        shape = " ".join(f"{k}={v}" for k, v in row["shape"].items() if k != "dtype")
        if "skipped" in row or "error" in row:
            why = f"skipped: {row['skipped']}" if "skipped" in row else f"FAILED: {row['error']}"
            print(f"{row['op']:<20}{shape:<52}  {why}")
            continue
        bound = next((row[k] for k in row if k.startswith("ours_over_") and k.endswith(("floor", "bound"))), None)
        speed = "  ".join(f"{k}: {v:.2f}x" for k, v in row.get("speedup", {}).items())
        extra = "".join(f"  {fmt.format(row[k] * scale)}" for k, fmt, scale in _EXTRAS if row.get(k) is not None)
        ms = f"{row['times']['ours']['median_ms']:>9.3f}" if "times" in row else f"{'':>9}"
        print(f"{row['op']:<20}{shape:<52}{ms}{'' if bound is None else f'{bound:>9.2f}x':>10}"
              f"  {speed}{extra}")
        for t in row.get("targets", []):
            print(f"{'':<20}target {t['target']}: {t['value']:.3f} ({t['limit']}) "
                  f"{'met' if t['met'] else 'NOT MET'}")


def _select(cases, patterns):
    return [(name, case) for name, case in cases if not patterns or any(p in name for p in patterns)]


def _write(path, results):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["cpu", "gpu", "all"], default="cpu")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (after every case)")
    parser.add_argument("--cases", default="",
                        help="comma-separated substrings: run only the cases whose name contains one")
    parser.add_argument("--list", action="store_true", help="print the suites' case names and exit")
    args = parser.parse_args(argv)
    names = ["cpu", "gpu"] if args.suite == "all" else [args.suite]
    patterns = [p.strip() for p in args.cases.split(",") if p.strip()]
    devices = {name: torch.device("cuda" if name == "gpu" else "cpu") for name in names}
    chosen = {name: _select(suites(devices[name])[name], patterns) for name in names}
    if args.list:
        for name in names:
            for case, _ in chosen[name]:
                print(f"{name} {case}")
        return 0
    unmatched = [p for p in patterns if not any(p in case for cases in chosen.values() for case, _ in cases)]
    if unmatched:
        known = ", ".join(case for name in names for case, _ in suites(devices[name])[name])
        parser.error(f"--cases {unmatched} match no case of the suite(s) {names}; cases: {known}")
    if "gpu" in names and not torch.cuda.is_available():
        parser.error("--suite gpu needs a CUDA device")
    results, failed = {}, 0
    start = time.perf_counter()
    for name in names:
        device = devices[name]
        env = environment(device)
        rows = []
        results[name] = dict(environment=env, cases=[case for case, _ in chosen[name]], results=rows)
        for i, (case, run) in enumerate(chosen[name], 1):
            t0 = time.perf_counter()
            try:
                row = run(env)
            except Exception as e:  # recorded, and the other cases still run
                failed += 1
                traceback.print_exc()
                row = dict(op=case, shape={}, error=f"{type(e).__name__}: {e}")
            _free(device)
            row["case"] = case
            row["case_seconds"] = time.perf_counter() - t0
            rows.append(row)
            print(f"[{name} {i}/{len(chosen[name])}] {case}: {row['case_seconds']:.1f} s "
                  f"(elapsed {time.perf_counter() - start:.1f} s)" + (" FAILED" if "error" in row else ""),
                  flush=True)
            if args.out:
                _write(args.out, results)
        print(f"\n{name} suite on {env['device']} (torch {env['torch']}, {env['threads']} threads, "
              f"copy {env['copy_bandwidth'] / 1e9:.1f} GB/s)")
        print_table(rows)
    if args.out:
        print(f"\nwrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
