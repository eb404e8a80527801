"""Benchmark runner: correctness first, then ours against the baselines, timed side by side.

    python -m bench.run --suite cpu --out bench/results/cpu.json

Baselines in every case, as issue #5 names them: (a) the authors' style, dense deltas summed
per sample; (b) a loop of per-expert addmm; (c) the best plain-torch formulation
(pre-concatenated factors, one addmm/matmul); (d) the floor, bytes moved / measured copy bandwidth
and FLOPs / measured GEMM rate, whichever is larger.
"""

import argparse
import datetime
import json
import platform
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

import twinmerge_ext as tm
from bench.timing import copy_bandwidth, gemm_rate, measure_all
from twinmerge_ext import reference as ref

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _factors(L, m, n, T, r, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).to(device)
    K = T * r
    return dict(base=mk(L, m, n), U=mk(L, m, K, scale=K**-0.5), S=mk(L, K).abs().add_(0.5),
                V=mk(L, n, K), ranks=[r] * T,
                w=torch.softmax(torch.randn(T, generator=g), 0).to(device))


def _check(name, actual, expected, dtype):
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
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
    times = measure_all({"ours": ours, "a_authors": authors, "b_per_expert_addmm": per_expert_addmm,
                         "c_best_torch": best_torch}, device)
    size = base.element_size()
    bytes_moved = size * (2 * m * n + K * (m + n))
    floor_ms = 1e3 * max(bytes_moved / env["copy_bandwidth"], 2 * m * n * K / env["gemm_rate"][str(dtype)])
    return _row("lowrank_merge_", dict(m=m, n=n, T=T, r=r, K=K, dtype=str(dtype)), times, floor_ms, err)


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
    times = measure_all({"ours": ours, "base_gemm": lambda: F.linear(x, W),
                         "c_best_torch": best_torch}, device)
    bound_ms = times["base_gemm"].median_ms * (1 + K * (m + n) / (m * n))
    return _row("lowrank_mix_linear", dict(rows=B * rows_per_b, B=B, m=m, n=n, T=T, r=r, K=K,
                                           dtype=str(dtype)), times, bound_ms, err,
                floor_name="flop_bound")


def bench_svd(batch, m, n, r, device, env):
    """truncated_svd against the full SVD and torch.svd_lowrank, with the error ratio."""
    g = torch.Generator().manual_seed(2)
    k = min(m, n)
    Uo = torch.linalg.qr(torch.randn(batch, m, k, generator=g))[0]
    Vo = torch.linalg.qr(torch.randn(batch, n, k, generator=g))[0]
    A = ((Uo * torch.arange(1, k + 1) ** -0.5) @ Vo.mT).to(device)
    err = lambda U, S, V: (A - (U * S.unsqueeze(-2)) @ V.mT).norm(dim=(-2, -1))
    optimal = err(*ref.truncated_svd(A, r)).double()
    ratio = (err(*tm.truncated_svd(A, r)).double() / optimal).max().item()
    lowrank = torch.svd_lowrank(A, q=r + 10, niter=2)
    ratio_lowrank = (err(lowrank[0][..., :r], lowrank[1][..., :r], lowrank[2][..., :r]).double()
                     / optimal).max().item()
    times = measure_all({"ours": lambda: tm.truncated_svd(A, r),
                         "full_svd": lambda: torch.linalg.svd(A, full_matrices=False),
                         "torch_svd_lowrank": lambda: torch.svd_lowrank(A, q=r + 10, niter=2)},
                        device, rounds=3, runs=3)
    row = _row("truncated_svd", dict(batch=batch, m=m, n=n, r=r), times, None, None)
    row.update(error_ratio=ratio, error_ratio_svd_lowrank=ratio_lowrank)
    return row


def _row(op, shape, times, floor_ms, err, floor_name="floor"):
    ours = times["ours"].median_ms
    row = dict(op=op, shape=shape, times={k: t.as_dict() for k, t in times.items()},
               max_rel_error=err, speedup={k: t.median_ms / ours for k, t in times.items() if k != "ours"})
    if floor_ms is not None:
        row[floor_name + "_ms"] = floor_ms
        row["ours_over_" + floor_name] = ours / floor_ms
    return row


def suites(device):
    cpu = [
        lambda env: bench_merge(1024, 1024, 8, 16, torch.float32, device, env),
        lambda env: bench_mix(128, 32, 1024, 1024, 8, 16, torch.float32, device, env),
        lambda env: bench_mix(1, 32, 1024, 1024, 8, 16, torch.float32, device, env),
        lambda env: bench_svd(4, 1024, 1024, 16, device, env),
    ]
    gpu = [lambda env, r=r: bench_merge(4096, 4096, 8, r, torch.bfloat16, device, env) for r in (1, 16, 64, 128)]
    gpu += [lambda env: bench_merge(11008, 4096, 8, 64, torch.bfloat16, device, env),
            lambda env: bench_mix(1, 32, 4096, 4096, 8, 64, torch.bfloat16, device, env),
            lambda env: bench_mix(512, 32, 4096, 4096, 8, 64, torch.bfloat16, device, env),
            lambda env: bench_svd(8, 4096, 4096, 64, device, env)]
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


def print_table(rows):
    print(f"{'op':<20}{'shape':<52}{'ours ms':>9}{'vs floor':>10}  speedup of ours over baselines")
    for row in rows:
        shape = " ".join(f"{k}={v}" for k, v in row["shape"].items() if k != "dtype")
        bound = next((row[k] for k in row if k.startswith("ours_over_")), None)
        speed = "  ".join(f"{k}: {v:.2f}x" for k, v in row["speedup"].items())
        extra = f"  error ratio {row['error_ratio']:.4f}" if "error_ratio" in row else ""
        print(f"{row['op']:<20}{shape:<52}{row['times']['ours']['median_ms']:>9.3f}"
              f"{'' if bound is None else f'{bound:>9.2f}x':>10}  {speed}{extra}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["cpu", "gpu", "all"], default="cpu")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    names = ["cpu", "gpu"] if args.suite == "all" else [args.suite]
    if "gpu" in names and not torch.cuda.is_available():
        parser.error("--suite gpu needs a CUDA device")
    results = {}
    for name in names:
        device = torch.device("cuda" if name == "gpu" else "cpu")
        env = environment(device)
        rows = [case(env) for case in suites(device)[name]]
        print(f"\n{name} suite on {env['device']} (torch {env['torch']}, {env['threads']} threads, "
              f"copy {env['copy_bandwidth'] / 1e9:.1f} GB/s)")
        print_table(rows)
        results[name] = dict(environment=env, results=rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(args.out)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
