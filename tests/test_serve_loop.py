"""ServeLoop: continuous batching, each request's tokens equal to it served alone, whatever
joins and leaves around it."""

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from twinmerge_ext import ServeLoop, TwinMergedModule, TwinRouter

transformers = pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "serve_loop.py"


def _requests(n, seed=0, T=3, vocab=61):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(1, 9, (1,), generator=g))
        new = int(torch.randint(1, 10, (1,), generator=g))
        w = torch.softmax(3 * torch.randn(T, generator=g), -1)
        out.append((torch.randint(1, vocab, (length,), generator=g), new, w))
    return out


def _alone(served, prompt, new, w, eos=None):
    seq = served.generate(prompt[None], mix_weights=w[None], max_new_tokens=new,
                          do_sample=False, pad_token_id=0, eos_token_id=eos)
    return seq[0, prompt.numel():]


def _serve_interleaved(loop, requests, arrivals):
    """Adds requests[i] before step arrivals[i]; {request index: tokens}."""
    ids, done, step = {}, {}, 0
    while len(ids) < len(requests) or loop.in_flight:
        for i, at in enumerate(arrivals):
            if at == step:
                ids[loop.add(requests[i][0], requests[i][1], mix_weights=requests[i][2])] = i
        loop.step()
        done.update(loop.pop_finished())
        step += 1
    return {ids[rid]: tokens for rid, tokens in done.items()}


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_interleaved_requests_get_their_tokens_alone(lm_twins, model):
    make, twin = lm_twins[model]
    served = TwinMergedModule(make(), twin, mode="factored")
    requests = _requests(7, seed=1 if model == "gpt2" else 2)
    arrivals = [0, 0, 1, 3, 3, 6, 9]
    got = _serve_interleaved(ServeLoop(served, eos_token_id=None), requests, arrivals)
    assert sorted(got) == list(range(len(requests)))
    for i, (prompt, new, w) in enumerate(requests):
        assert len(got[i]) == new
        assert torch.equal(got[i], _alone(served, prompt, new, w)), i


def test_eos_ends_a_request_early_and_the_batch_shrinks(lm_twins):
    make, twin = lm_twins["llama"]
    served = TwinMergedModule(make(), twin, mode="auto")
    requests = [(p, 9, w) for p, _, w in _requests(5, seed=3)]
    free = [_alone(served, p, 9, w) for p, _, w in requests]
    eos = int(free[0][2])  # request 0 ends early; others where they meet it, if they do
    loop = ServeLoop(served, eos_token_id=eos)
    got = _serve_interleaved(loop, requests, [0, 0, 1, 2, 2])
    for i, (prompt, new, w) in enumerate(requests):
        want = free[i]
        if (want == eos).any():  # up to and with the first eos, as generate stops
            want = want[:int((want == eos).nonzero()[0]) + 1]
        assert torch.equal(got[i], want), i
        assert torch.equal(got[i], _alone(served, prompt, new, w, eos=eos)[:len(want)]), i
    assert len(got[0]) <= 3 < len(free[0])
    assert loop._cache is None and loop.in_flight == []  # nothing left behind


def test_the_router_runs_once_per_request_on_its_prompt(lm_twins):
    make, twin = lm_twins["gpt2"]
    torch.manual_seed(5)
    served = TwinMergedModule(make(), twin, router=TwinRouter(32, twin.tasks).eval(),
                              mode="factored")
    prompt = torch.randint(1, 61, (5,))
    loop = ServeLoop(served, eos_token_id=None)
    calls = []
    route = served.route
    served.route = lambda *a, **k: calls.append(a) or route(*a, **k)
    rid = loop.add(prompt, 4)
    tokens = loop.run()[rid]
    assert len(calls) == 1
    w = route(prompt[None], attention_mask=torch.ones(1, 5, dtype=torch.long))[0]
    assert torch.equal(tokens, _alone(served, prompt, 4, w))


def test_loops_in_threads_share_one_wrapper(lm_twins):
    make, twin = lm_twins["llama"]
    served = TwinMergedModule(make(), twin, mode="factored")
    batches = [_requests(4, seed=10 + i) for i in range(3)]
    want = [[_alone(served, p, n, w) for p, n, w in reqs] for reqs in batches]
    got = [None] * 3
    start = threading.Barrier(3)

    def work(i):
        start.wait()
        got[i] = _serve_interleaved(ServeLoop(served, eos_token_id=None), batches[i],
                                    [0, 1, 1, 2])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        for j, w in enumerate(want[i]):
            assert torch.equal(got[i][j], w), (i, j)


def test_bad_requests_are_refused_before_they_join(lm_twins):
    make, twin = lm_twins["gpt2"]
    served = TwinMergedModule(make(), twin, mode="factored")
    loop = ServeLoop(served)
    with pytest.raises(ValueError, match=r"ServeLoop.add: input_ids must be a non-empty 1-D "
                                         r"integer tensor \[L\], got torch.int64 \[1, 3\]"):
        loop.add(torch.ones(1, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"input_ids must be .* got torch.int64 \[0\]"):
        loop.add(torch.ones(0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"max_new_tokens must be an int >= 1, got 0"):
        loop.add(torch.ones(3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match=r"mix_weights must be a floating tensor \[T=3\]"):
        loop.add(torch.ones(3, dtype=torch.long), 2, mix_weights=torch.ones(2))
    with pytest.raises(ValueError, match=r"NaN/Inf"):
        loop.add(torch.ones(3, dtype=torch.long), 2, mix_weights=torch.tensor([float("nan"), 0, 0]))
    with pytest.raises(ValueError, match=r"no router"):
        loop.add(torch.ones(3, dtype=torch.long), 2)
    assert loop.in_flight == []
    served.mode = "materialize"
    with pytest.raises(ValueError, match=r"ServeLoop: served.mode must be 'factored' or 'auto'"):
        ServeLoop(served)
    with pytest.raises(TypeError, match=r"ServeLoop: served must be a TwinMergedModule or a "
                                        r"causal LM with generate .*, got Linear"):
        ServeLoop(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"ServeLoop: stop must be callable .* got int"):
        ServeLoop(TwinMergedModule(make(), twin), stop=3)
    plain = ServeLoop(make())
    with pytest.raises(ValueError, match=r"ServeLoop.add: mix_weights needs a TwinMergedModule; "
                                         r"this loop serves a plain GPT2LMHeadModel"):
        plain.add(torch.ones(3, dtype=torch.long), 2, mix_weights=torch.tensor([1.0, 0, 0]))
    assert plain.in_flight == []
    with pytest.raises(TypeError, match=r"eos_token_id must be an int, a list of ints or None"):
        ServeLoop(TwinMergedModule(make(), twin), eos_token_id="</s>")


def test_the_example_runs_and_every_request_matches():
    run = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("request ")]
    assert len(lines) == 5 and all("equal its tokens served alone" in ln for ln in lines)
    assert "batch [0, 1, 2, 3, 4]" in run.stdout  # the requests really shared steps


def test_a_failed_step_changes_nothing_and_can_be_retried(lm_twins):
    make, twin = lm_twins["llama"]
    served = TwinMergedModule(make(), twin, mode="factored")
    requests = _requests(3, seed=7)
    calls = {"n": 0, "fail": {1, 4}}  # the first prefill, and a decode step, fail once

    def flaky(logits):
        calls["n"] += 1
        if calls["n"] in calls["fail"]:
            raise RuntimeError("out of memory (simulated)")
        return logits.argmax(-1)

    loop = ServeLoop(served, eos_token_id=None, select=flaky)
    ids = [loop.add(p, n, mix_weights=w) for p, n, w in requests]
    done, failures = {}, 0
    while loop.in_flight:
        try:
            loop.step()
        except RuntimeError:
            failures += 1
            assert sorted(loop.in_flight + list(done)) == ids  # nobody lost
        done.update(loop.pop_finished())
    assert failures == 2
    for rid, (prompt, new, w) in zip(ids, requests):
        assert torch.equal(done[rid], _alone(served, prompt, new, w)), rid


def test_select_must_return_one_token_per_request(lm_twins):
    make, twin = lm_twins["gpt2"]
    served = TwinMergedModule(make(), twin, mode="factored")
    loop = ServeLoop(served, select=lambda logits: logits.argmax(-1, keepdim=True))
    loop.add(torch.ones(3, dtype=torch.long), 2, mix_weights=torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"ServeLoop.step: select must return an integer tensor "
                                         r"\[N=1\] of next tokens, got torch.int64 \[1, 1\]"):
        loop.step()
    assert len(loop.in_flight) == 1  # still waiting to join


def _plain_alone(model, prompt, new, eos=None):
    seq = model.generate(prompt[None], max_new_tokens=new, do_sample=False, pad_token_id=0,
                         eos_token_id=eos)
    return seq[0, prompt.numel():]


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_a_plain_model_is_served_alike(lm_twins, model):
    """A plain causal LM (here the twin's θs as a merged model) in the same loop: each
    request's tokens are its own generate's, whatever joins and leaves around it."""
    make, twin = lm_twins[model]
    plain = make()
    plain.load_state_dict(twin.merged_state_dict(torch.zeros(len(twin.tasks))), strict=False)
    requests = _requests(6, seed=3)
    loop = ServeLoop(plain, eos_token_id=None)
    ids, done, step = {}, {}, 0
    while len(ids) < len(requests) or loop.in_flight:
        if step < len(requests):
            prompt, new, _ = requests[step]
            ids[loop.add(prompt, new)] = step
        loop.step()
        done.update(loop.pop_finished())
        step += 1
    assert sorted(ids[r] for r in done) == list(range(len(requests)))
    for rid, tokens in done.items():
        prompt, new, _ = requests[ids[rid]]
        assert torch.equal(tokens, _plain_alone(plain, prompt, new)), ids[rid]


def test_a_stop_rule_ends_each_request_where_it_says(lm_twins):
    """stop(tokens) ends a request with the token that satisfied it: its tokens are its
    generate's, cut after the first position where the rule holds (the rule here: a token
    divisible by 4 after at least two tokens)."""
    make, twin = lm_twins["llama"]
    served = TwinMergedModule(make(), twin, mode="factored")
    requests = [(p, 9, w) for p, _, w in _requests(6, seed=5)]
    seen = []

    def rule(tokens):
        seen.append(list(tokens))
        return len(tokens) >= 2 and tokens[-1] % 4 == 0
    loop = ServeLoop(served, eos_token_id=None, stop=rule)
    ids = [loop.add(p, n, mix_weights=w) for p, n, w in requests]
    done = loop.run()
    stopped = 0
    for rid, (prompt, new, w) in zip(ids, requests):
        full = _alone(served, prompt, new, w).tolist()
        cut = next((i + 1 for i in range(1, len(full)) if full[i] % 4 == 0), len(full))
        stopped += cut < len(full)
        assert done[rid].tolist() == full[:cut], rid
    assert stopped >= 2  # the rule really ended requests early
    assert all(s[:-1] in seen or len(s) == 1 for s in seen)  # called on every prefix


def test_a_failing_stop_rule_changes_nothing(lm_twins):
    make, twin = lm_twins["llama"]
    served = TwinMergedModule(make(), twin, mode="factored")
    requests = _requests(3, seed=7)
    calls = {"n": 0}

    def flaky(tokens):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyError("the rule's own bug")
        return False
    loop = ServeLoop(served, eos_token_id=None, stop=flaky)
    ids = [loop.add(p, n, mix_weights=w) for p, n, w in requests]
    done, failures = {}, 0
    while loop.in_flight:
        try:
            loop.step()
        except KeyError:
            failures += 1
        done.update(loop.pop_finished())
    assert failures == 1
    for rid, (prompt, new, w) in zip(ids, requests):
        assert torch.equal(done[rid], _alone(served, prompt, new, w)), rid


def test_a_prefill_failing_after_the_decode_keeps_the_decode(lm_twins):
    """The stop rule fails on a joiner's first token (in the prefill) while other requests have
    just decoded: those keep their tokens (a request that finished there leaves, with exactly
    its max_new_tokens), the joiner waits, and every request ends with its tokens served alone."""
    make, twin = lm_twins["llama"]
    served = TwinMergedModule(make(), twin, mode="factored")
    requests = [(p, n, w) for (p, _, w), n in zip(_requests(4, seed=11), (2, 5, 4, 3))]
    state = {"failed": False, "armed": False}

    def rule(tokens):
        if state["armed"] and len(tokens) == 1 and not state["failed"]:
            state["failed"] = True
            raise KeyError("the rule's own bug, on a joiner's first token")
        return False
    loop = ServeLoop(served, eos_token_id=None, stop=rule)
    ids = [loop.add(p, n, mix_weights=w) for p, n, w in requests[:2]]
    loop.step()  # both joined: one token each
    ids.append(loop.add(*requests[2][:2], mix_weights=requests[2][2]))
    state["armed"] = True
    with pytest.raises(KeyError):
        loop.step()  # the decode gives request 0 its 2nd and last token; the prefill fails
    assert state["failed"] and ids[2] in loop.in_flight and ids[0] not in loop.in_flight
    done = loop.pop_finished()
    assert list(done) == [ids[0]] and len(done[ids[0]]) == 2
    ids.append(loop.add(*requests[3][:2], mix_weights=requests[3][2]))
    done.update(loop.run())
    for rid, (prompt, new, w) in zip(ids, requests):
        assert torch.equal(done[rid], _alone(served, prompt, new, w)), rid
