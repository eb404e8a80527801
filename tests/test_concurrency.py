"""Many threads on one TwinMergedModule: every call, whatever its mode and whatever the other
threads do meanwhile, returns exactly (bit for bit) what the same call returns alone, and θs is
untouched afterwards."""

import sys
import threading
from contextlib import contextmanager

import pytest
import torch

from twinmerge_ext import TwinCheckpoint, TwinMergedModule, TwinRouter

from test_module import _bert, _experts, _gpt2, _inputs, _llama, _weights

transformers = pytest.importorskip("transformers")

THREADS = 8
ROUNDS = 4


@pytest.fixture(autouse=True)
def _switch_often():
    """Threads switch every microsecond instead of every 5 ms: interleavings a test of a few
    seconds would otherwise rarely see."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def _run_together(calls):
    """Runs calls[i] in thread i, all released at once; returns their results in order and
    re-raises the first error a thread met."""
    barrier = threading.Barrier(len(calls))
    results, errors = [None] * len(calls), []

    def run(i):
        barrier.wait()
        try:
            results[i] = calls[i]()
        except BaseException as e:  # noqa: BLE001 (re-raised in the main thread)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _case(kind):
    if kind == "bert":
        _, base_sd, experts = _experts(_bert, 3, 0, heads=True)
        twin = TwinCheckpoint.build(base_sd, experts, rank_ratio=1.0, heads=r"^classifier\.")
        return twin, _bert, {}
    make = _gpt2 if kind == "gpt2" else _llama
    _, base_sd, experts = _experts(lambda *_: make(), 3, 3)
    return TwinCheckpoint.build(base_sd, experts, rank_ratio=0.5), make, {"use_cache": False}


@pytest.fixture(scope="module", params=["bert", "gpt2", "llama"])
def case(request):
    return _case(request.param)


def _jobs(extra):
    """Per thread and round: (inputs, mix_weights, mode). Every thread has weights of its own,
    batch sizes differ, and modes alternate so that factored, materialize and group calls
    overlap."""
    modes = ["factored", "materialize", "group", "auto"]
    jobs = []
    for i in range(THREADS):
        rounds = []
        for r in range(ROUNDS):
            B = 2 + (i + r) % 3
            ids, mask = _inputs(B, seed=100 * i + r)
            w = _weights(B, seed=100 * i + r)
            w = w[0] if (i + r) % 4 == 3 else w  # some calls with one [T] vector
            rounds.append(({"input_ids": ids, "attention_mask": mask, **extra}, w,
                           modes[(i + r) % 4]))
        jobs.append(rounds)
    return jobs


def _serve(wrapped, inputs, w, mode):
    """One call in `mode` on a wrapper whose mode is fixed: its own wrapper per mode."""
    with torch.no_grad():
        return wrapped[mode](**inputs, mix_weights=w).logits


@pytest.mark.parametrize("buffer_sets", [1, 3])
def test_threads_get_exactly_their_own_rows_and_shared_expert_is_untouched(case, buffer_sets):
    twin, make, extra = case
    # A module can be wrapped once, and a wrapper has one mode: one model per mode, each
    # called from every thread.
    wrapped = {mode: TwinMergedModule(make(), twin, mode=mode, buffer_sets=buffer_sets)
               for mode in ("factored", "materialize", "group", "auto")}
    jobs = _jobs(extra)
    want = [[_serve(wrapped, *job) for job in rounds] for rounds in jobs]

    def thread(i):
        return [_serve(wrapped, *job) for job in jobs[i]]

    got = _run_together([lambda i=i: thread(i) for i in range(THREADS)])
    for i in range(THREADS):
        for r in range(ROUNDS):
            assert torch.equal(got[i][r], want[i][r]), f"thread {i}, round {r} ({jobs[i][r][2]})"
    for w in wrapped.values():
        state = w.module.state_dict()
        for name, value in twin.shared.items():
            assert torch.equal(state[name], value), name
        assert w._pool.sets_made <= buffer_sets


def test_one_auto_wrapper_serves_many_threads_with_and_without_blocks(case):
    """The same wrapper for all threads; each thread's calls pass their own weights, half of them
    inside a merged() block of their own."""
    twin, make, extra = case
    wrapped = TwinMergedModule(make(), twin, mode="auto", buffer_sets=2)
    jobs = _jobs(extra)

    def serve(inputs, w, block):
        with torch.no_grad():
            if block and w.dim() == 1:
                with wrapped.merged(w):
                    return wrapped(**inputs).logits, wrapped(**inputs).logits
            out = wrapped(**inputs, mix_weights=w).logits
            return out, wrapped.last_call["weights"]

    want = [[serve(inputs, w, r % 2) for r, (inputs, w, _) in enumerate(rounds)]
            for rounds in jobs]
    got = _run_together([lambda i=i: [serve(inputs, w, r % 2)
                                      for r, (inputs, w, _) in enumerate(jobs[i])]
                         for i in range(THREADS)])
    for i in range(THREADS):
        for r in range(ROUNDS):
            for a, b in zip(got[i][r], want[i][r]):
                assert torch.equal(a, b), f"thread {i}, round {r}"
    state = wrapped.module.state_dict()
    for name, value in twin.shared.items():
        assert torch.equal(state[name], value), name


def test_router_calls_from_many_threads_route_each_batch_alone():
    twin, make, _ = _case("bert")
    torch.manual_seed(0)
    router = TwinRouter(32, twin.tasks, layer=-1).eval()
    wrapped = TwinMergedModule(make(), twin, router=router, mode="factored")
    inputs = [_inputs(2 + i % 3, seed=i) for i in range(THREADS)]

    def serve(ids, mask):
        with torch.no_grad():
            out = wrapped(input_ids=ids, attention_mask=mask).logits
            return out, wrapped.last_call["weights"]

    want = [serve(*x) for x in inputs]
    got = _run_together([lambda x=x: serve(*x) for x in inputs])
    for (a, wa), (b, wb) in zip(got, want):
        assert torch.equal(a, b) and torch.equal(wa, wb)


@contextmanager
def _block_in_another_thread(wrapped):
    """A merged() block held open by another thread while the with-statement runs."""
    inside, release = threading.Event(), threading.Event()

    def block():
        with wrapped.merged(torch.tensor([0.2, 0.3, 0.5])):
            inside.set()
            release.wait(30)

    t = threading.Thread(target=block)
    t.start()
    assert inside.wait(30)
    try:
        yield
    finally:
        release.set()
        t.join()


def test_unwrap_refuses_while_calls_are_in_flight_and_then_every_call_refuses():
    twin, make, _ = _case("bert")
    wrapped = TwinMergedModule(make(), twin, mode="materialize")
    ids, mask = _inputs(2)
    with _block_in_another_thread(wrapped), \
            pytest.raises(ValueError, match=r"unwrap: 1 call\(s\) or merged\(\) block\(s\) are "
                                            r"in flight"):
        wrapped.unwrap()
    module = wrapped.unwrap()
    assert not any(type(m).__name__.startswith("Twin") for m in module.modules())
    assert wrapped.unwrap() is module
    for call in (lambda: wrapped(input_ids=ids, attention_mask=mask,
                                 mix_weights=torch.tensor([1.0, 0.0, 0.0])),
                 lambda: wrapped.route(input_ids=ids),
                 lambda: wrapped.merged(torch.tensor([1.0, 0.0, 0.0])).__enter__()):
        with pytest.raises(ValueError, match="this wrapper was unwrapped"):
            call()
    state = module.state_dict()
    for name, value in twin.shared.items():
        assert torch.equal(state[name], value), name


def test_merged_blocks_belong_to_their_asyncio_task():
    """Two tasks on one event loop, each inside its own block across awaits."""
    import asyncio

    twin, make, _ = _case("bert")
    wrapped = TwinMergedModule(make(), twin, mode="factored")
    ids, mask = _inputs(2)
    weights = [torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.1, 0.1, 0.8])]
    want = []
    for w in weights:  # each block alone
        with torch.no_grad(), wrapped.merged(w):
            want.append(wrapped(input_ids=ids, attention_mask=mask).logits)

    async def serve(w):
        with wrapped.merged(w):  # (grad mode is per thread, not per task: set around the loop)
            await asyncio.sleep(0)  # the other task opens its block meanwhile
            first = wrapped(input_ids=ids, attention_mask=mask).logits
            await asyncio.sleep(0)
            return first, wrapped(input_ids=ids, attention_mask=mask).logits, wrapped.last_call

    async def both():
        return await asyncio.gather(*(serve(w) for w in weights))

    with torch.no_grad():
        results = asyncio.run(both())
    for (first, second, last), w, expected in zip(results, weights, want):
        assert torch.equal(first, expected) and torch.equal(second, expected)
        assert torch.equal(last["weights"][0], w) and last["merged_block"]


def test_moving_a_wrapper_waits_for_no_call_and_refuses_under_one():
    twin, make, _ = _case("bert")
    wrapped = TwinMergedModule(make(), twin, mode="materialize")
    ids, mask = _inputs(2)
    with _block_in_another_thread(wrapped), \
            pytest.raises(ValueError, match=r"TwinMergedModule.to: 1 call\(s\) or merged\(\) "
                                            r"block\(s\) are in flight"):
        wrapped.double()
    wrapped.double()
    with torch.no_grad():
        out = wrapped(input_ids=ids, attention_mask=mask, mix_weights=torch.ones(3).double() / 3)
    assert out.logits.dtype == torch.float64
