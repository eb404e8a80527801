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
from bench.run import _factors


def _one_matrix(m, n, T, r, dtype, device, seed):
    """The runner's factors (bench.run._factors) for one m x n matrix: base, U, S, V, ranks, w."""
    f = _factors(1, m, n, T, r, dtype, device, seed)
    return {k: v[0] if k in ("base", "U", "S", "V") else v for k, v in f.items()}


def cases(device):
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    big, T, r = (4096, 8, 64) if gpu else (1024, 8, 16)
    K = T * r
    for m, n in [(big, big)] + ([(11008, 4096)] if gpu else []):
        d = _one_matrix(m, n, T, r, dtype, device, seed=0)
        out = torch.empty_like(d["base"])
        yield (f"lowrank_merge_ {m}x{n} K={K} {dtype}",
               lambda d=d, out=out: tm.lowrank_merge_(out, d["base"], d["U"], d["S"], d["V"],
                                                      d["ranks"], d["w"]))
    d = _one_matrix(big, big, T, r, dtype, device, seed=1)  # base: the layer's weight
    g = torch.Generator().manual_seed(1)
    for rows, B in ((32, 32), (32 * 512, 32) if gpu else (32 * 128, 32)):
        x = torch.randn(B, rows // B, big, generator=g).to(dtype).to(device)
        rw = torch.softmax(torch.randn(B, T, generator=g), 1).to(device)
        yield (f"lowrank_mix_linear {rows} rows B={B} {big}x{big} K={K} {dtype}",
               lambda x=x, rw=rw: tm.lowrank_mix_linear(x, d["base"], None, d["U"], d["S"], d["V"],
                                                        d["ranks"], rw))
        yield f"base GEMM alone, {rows} rows", lambda x=x: torch.nn.functional.linear(x, d["base"])
    A = torch.randn(8 if gpu else 2, big, big,
                    generator=torch.Generator().manual_seed(2)).to(device)
    yield f"truncated_svd {A.shape[0]}x{big}x{big} rank {r} fp32", lambda: tm.truncated_svd(A, r)


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
