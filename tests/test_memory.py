"""Long runs hold no memory they do not need: after a warm-up, 10,000 merges and 2,000 wrapped
forwards (every mode, router and merged() blocks included) leave the process's resident set
where the warm-up left it. A leak of one small tensor per call would add megabytes."""

import os

import pytest
import torch

import twinmerge_ext as tm
from twinmerge_ext import TwinCheckpoint, TwinMergedModule, TwinRouter

from test_module import _bert, _experts, _inputs, _weights

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                                reason="reads the resident set from /proc (Linux)")

# Growth allowed after warm-up: allocator noise, not a per-call leak (10,000 calls leaking a
# 64-element fp32 tensor each would be 2.4 MiB; a leaked output of these calls far more).
SLACK = 1 << 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _growth(step, warmup: int, runs: int) -> int:
    for i in range(warmup):
        step(i)
    before = _rss()
    for i in range(runs):
        step(warmup + i)
    return _rss() - before


def test_ten_thousand_merges_hold_no_memory():
    T, m, n, r = 4, 32, 24, 4
    g = torch.Generator().manual_seed(0)
    base = torch.randn(m, n, generator=g)
    U, S, V = torch.randn(m, T * r, generator=g), torch.rand(T * r, generator=g), \
        torch.randn(n, T * r, generator=g)
    deltas = torch.randn(T, n, generator=g)
    out, out1 = torch.empty_like(base), torch.empty(n)
    weights = torch.softmax(torch.randn(64, T, generator=g), -1)

    def step(i):
        w = weights[i % 64]
        tm.lowrank_merge_(out, base, U, S, V, [r] * T, w)
        tm.dense_merge_(out1, base[0], deltas, w)

    assert _growth(step, 1000, 10_000) <= SLACK


def test_two_thousand_wrapped_forwards_hold_no_memory():
    _, base_sd, experts = _experts(_bert, 3, 0, heads=True)
    twin = TwinCheckpoint.build(base_sd, experts, rank_ratio=0.5, heads=r"^classifier\.")
    torch.manual_seed(0)
    router = TwinRouter(32, twin.tasks).eval()
    wrapped = TwinMergedModule(_bert(), twin, router=router, mode="factored")
    batches = [(_inputs(3, seed=s), _weights(3, seed=s)) for s in range(8)]
    modes = ["factored", "materialize", "group", "auto"]

    def step(i):
        (ids, mask), rw = batches[i % 8]
        wrapped.mode = modes[i % 4]
        with torch.no_grad():
            if i % 10 == 0:
                wrapped(input_ids=ids, attention_mask=mask)          # the router's weights
            elif i % 10 == 1:
                with wrapped.merged(rw[1]):
                    wrapped(input_ids=ids, attention_mask=mask)
            else:
                wrapped(input_ids=ids, attention_mask=mask, mix_weights=rw)

    assert _growth(step, 100, 2_000) <= SLACK
