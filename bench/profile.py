"""Where the time of each hot op goes: kernel by kernel, under torch.profiler.

    python -m bench.profile [--device cuda] [--out profile.txt]

The runner (bench/run.py) says how far an op is from its floor; this says why: which kernels
ran (cuBLASLt or the cuBLAS fallback, the scaling kernel, copies), how long each took, and
how much of the op's time lies between kernels (launch gaps). Shapes are issue 5's GPU targets
on CUDA and the CPU targets' on CPU.
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import twinmerge_ext as tm


def _inputs(m, n, K, T, dtype, device, rows=None, B=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).to(device)
    d = dict(base=mk(m, n), U=mk(m, K, scale=K**-0.5), S=(torch.rand(K, generator=g) + 0.5).to(dtype).to(device),
             V=mk(n, K, scale=n**-0.5), ranks=[K // T] * T,
             w=torch.softmax(torch.randn(T, generator=g), 0).to(device))
    if rows is not None:
        d["x"] = mk(B, rows // B, n)
        d["rw"] = torch.softmax(torch.randn(B, T, generator=g), 1).to(device)
    return d


def cases(device):
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    big, K, T = (4096, 512, 8) if gpu else (1024, 128, 8)
    merge = _inputs(big, big, K, T, dtype, device)
    out = torch.empty_like(merge["base"])
    yield (f"lowrank_merge_ {big}x{big} K={K} {dtype}",
           lambda d=merge: tm.lowrank_merge_(out, d["base"], d["U"], d["S"], d["V"], d["ranks"], d["w"]))
    if gpu:
        tall = _inputs(11008, 4096, K, T, dtype, device)
        out_tall = torch.empty_like(tall["base"])
        yield (f"lowrank_merge_ 11008x4096 K={K} {dtype}",
               lambda d=tall: tm.lowrank_merge_(out_tall, d["base"], d["U"], d["S"], d["V"], d["ranks"], d["w"]))
    for rows, B in ((32, 32), (32 * 512, 32) if gpu else (32 * 128, 32)):
        mix = _inputs(big, big, K, T, dtype, device, rows=rows, B=B, seed=1)
        yield (f"lowrank_mix_linear {rows} rows B={B} {big}x{big} K={K} {dtype}",
               lambda d=mix: tm.lowrank_mix_linear(d["x"], d["base"], None, d["U"], d["S"], d["V"],
                                                   d["ranks"], d["rw"]))
        yield (f"base GEMM alone, {rows} rows",
               lambda d=mix: torch.nn.functional.linear(d["x"], d["base"]))
    A = torch.randn(8 if gpu else 2, big, big, generator=torch.Generator().manual_seed(2)).to(device)
    yield f"truncated_svd {A.shape[0]}x{big}x{big} rank {K // T} fp32", lambda: tm.truncated_svd(A, K // T)


def profile_case(name, fn, device, reps=5):
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(reps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=70)
    return f"== {name} ({reps} calls)\n{table}\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="also write the tables here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    header = (f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
              f"torch {torch.__version__}, cuda {torch.version.cuda}\n")
    parts = [header]
    sys.stdout.write(header)
    for name, fn in cases(device):
        part = profile_case(name, fn, device)
        sys.stdout.write(part)
        parts.append(part)
    if args.out:
        args.out.write_text("".join(parts))


if __name__ == "__main__":
    main()
