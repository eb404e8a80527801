"""pytest-benchmark microbenchmarks of every op and its best plain-torch twin, side by side.

    pytest bench/ --benchmark-only --benchmark-group-by=param:case

Each op's result is checked against twinmerge_ext.reference before it is timed. bench/run.py
is the runner that reports ratios against the floors; this file keeps the ops under
pytest-benchmark's statistics and regression tracking.
"""

import pytest
import torch
import torch.nn.functional as F

import twinmerge_ext as tm
from twinmerge_ext import reference as ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _sync(device):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _setup(device, m=1024, n=1024, T=8, r=16, rows=512, B=32):
    g = torch.Generator().manual_seed(0)
    K = T * r
    d = dict(base=torch.randn(m, n, generator=g), U=torch.randn(m, K, generator=g) / K**0.5,
             S=torch.rand(K, generator=g) + 0.5, V=torch.randn(n, K, generator=g),
             w=torch.softmax(torch.randn(T, generator=g), 0), x=torch.randn(B, rows // B, n, generator=g),
             rw=torch.softmax(torch.randn(B, T, generator=g), 1), bias=torch.randn(m, generator=g),
             deltas=torch.randn(T, m, generator=g))
    d = {k: v.to(device) for k, v in d.items()}
    d["ranks"], d["index"] = [r] * T, ref.expert_of_col([r] * T, device)
    return d


def _run(benchmark, fn, device):
    sync = _sync(device)

    def timed():
        result = fn()
        sync()
        return result

    return benchmark.pedantic(timed, rounds=30, warmup_rounds=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["twinmerge", "torch"])
def test_lowrank_merge(benchmark, device, impl):
    benchmark.group = f"lowrank_merge_ {device} 1024x1024 T=8 r=16"
    d = _setup(device)
    out = torch.empty_like(d["base"])
    if impl == "twinmerge":
        fn = lambda: tm.lowrank_merge_(out, d["base"], d["U"], d["S"], d["V"], d["ranks"], d["w"])
    else:
        fn = lambda: torch.addmm(d["base"], d["U"] * (d["w"][d["index"]] * d["S"]), d["V"].T, out=out)
    _run(benchmark, fn, device)
    torch.testing.assert_close(out, ref.lowrank_merge(d["base"], d["U"], d["S"], d["V"], d["ranks"], d["w"]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["twinmerge", "torch", "base_gemm_only"])
def test_lowrank_mix_linear(benchmark, device, impl):
    benchmark.group = f"lowrank_mix_linear {device} 512 rows B=32 1024x1024 T=8 r=16"
    d = _setup(device)
    args = (d["x"], d["base"], d["bias"], d["U"], d["S"], d["V"], d["ranks"], d["rw"])
    if impl == "twinmerge":
        fn = lambda: tm.lowrank_mix_linear(*args)
    elif impl == "torch":
        fn = lambda: (F.linear(d["x"], d["base"], d["bias"])
                      + ((d["x"] @ d["V"]) * (d["rw"][:, d["index"]] * d["S"]).unsqueeze(1)) @ d["U"].T)
    else:
        fn = lambda: F.linear(d["x"], d["base"], d["bias"])
    y = _run(benchmark, fn, device)
    if impl != "base_gemm_only":
        torch.testing.assert_close(y, ref.lowrank_mix_linear(*args), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["twinmerge", "torch"])
def test_dense_merge(benchmark, device, impl):
    benchmark.group = f"dense_merge_ {device} 1024 T=8"
    d = _setup(device)
    out = torch.empty_like(d["bias"])
    if impl == "twinmerge":
        fn = lambda: tm.dense_merge_(out, d["bias"], d["deltas"], d["w"])
    else:
        fn = lambda: torch.addmv(d["bias"], d["deltas"].T, d["w"], out=out)
    _run(benchmark, fn, device)
    torch.testing.assert_close(out, ref.dense_merge(d["bias"], d["deltas"], d["w"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["twinmerge", "torch_svd_lowrank"])
def test_truncated_svd(benchmark, device, impl):
    benchmark.group = f"truncated_svd {device} 4x512x512 r=16"
    A = torch.randn(4, 512, 512, generator=torch.Generator().manual_seed(0)).to(device)
    if impl == "twinmerge":
        fn = lambda: tm.truncated_svd(A, 16)
    else:
        fn = lambda: torch.svd_lowrank(A, q=26, niter=2)
    U, S, V = _run(benchmark, fn, device)
    assert S.shape[-1] >= 16
