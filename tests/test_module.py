"""TwinMergedModule: the exactness oracle on small transformers models built from configs, the
modes against each other, heads, the router path, and the wrapper's contract."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twinmerge_ext as tm
from twinmerge_ext import TwinCheckpoint, TwinMergedModule, TwinRouter

transformers = pytest.importorskip("transformers")

VOCAB, L = 61, 7
NUM_LABELS = (3, 2, 4)  # one head per task, of different widths
TOL = dict(rtol=1e-5, atol=2e-5)


def _bert(num_labels=3):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48,
                                  max_position_embeddings=32, num_labels=num_labels)
    return transformers.BertForSequenceClassification(cfg).eval()


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                  n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=48, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _experts(make, T, seed, heads=False):
    """T experts = the base with random perturbations of every floating tensor (heads: each
    task's own freshly initialized classifier)."""
    torch.manual_seed(seed)
    base = make()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    experts = {}
    for t in range(T):
        m = make(NUM_LABELS[t]) if heads else copy.deepcopy(base)
        sd = m.state_dict()
        with torch.no_grad():
            # Through parameters(), so tied tensors (GPT-2's wte and lm_head) stay tied.
            for name, p in m.named_parameters():
                if heads and name.startswith("classifier"):
                    continue
                p.copy_(base_sd[name] + 0.05 * torch.randn_like(p))
        experts[f"task{t}"] = {k: v.clone() for k, v in sd.items()}
    return base, base_sd, experts


@pytest.fixture(scope="module")
def bert_case():
    base, base_sd, experts = _experts(_bert, 3, 0, heads=True)
    twin = TwinCheckpoint.build(base_sd, experts, rank_ratio=1.0, heads=r"^classifier\.")
    return base_sd, experts, twin


@pytest.fixture(scope="module")
def gpt2_case():
    base, base_sd, experts = _experts(lambda *_: _gpt2(), 3, 1)
    return base_sd, experts, TwinCheckpoint.build(base_sd, experts, rank_ratio=1.0)


@pytest.fixture(scope="module")
def llama_case():
    base, base_sd, experts = _experts(lambda *_: _llama(), 3, 2)
    return base_sd, experts, TwinCheckpoint.build(base_sd, experts, rank_ratio=1.0)


def _inputs(B, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if pad and B > 1:
        mask[1, L - 2:] = 0  # right padding on one row
    return ids, mask


def _weights(B, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.softmax(3 * torch.randn(B, T, generator=g), -1)
    w[0] = F.one_hot(torch.tensor(1), T).float()
    return w


def _reference_bert(twin, ids, mask, rw, head_tasks=None):
    """Row by row: a fresh model loaded with twin.merged_state_dict(w_b) and its head."""
    outs = []
    for b in range(rw.shape[0]):
        h = int(rw[b].argmax()) if head_tasks is None else int(head_tasks[b])
        m = _bert(NUM_LABELS[h])
        m.load_state_dict(twin.merged_state_dict(rw[b], head=h))
        with torch.no_grad():
            y = m(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits
        outs.append(F.pad(y, (0, max(NUM_LABELS) - y.shape[-1]), value=float("-inf")))
    return torch.cat(outs)


def _reference_lm(make, twin, ids, mask, rw):
    outs = []
    for b in range(rw.shape[0]):
        m = make()
        m.load_state_dict(twin.merged_state_dict(rw[b]))
        with torch.no_grad():
            outs.append(m(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1],
                          use_cache=False).logits)
    return torch.cat(outs)


def _logits(wrapped, ids, mask, **kw):
    with torch.no_grad():
        return wrapped(input_ids=ids, attention_mask=mask, **kw).logits


def _close(a, b, **tol):
    # -inf padding must sit in the same places; the rest must agree.
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    torch.testing.assert_close(a.nan_to_num(neginf=0.0), b.nan_to_num(neginf=0.0),
                               **(tol or TOL))


# --- the exactness oracle -----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["factored", "materialize", "group", "auto"])
def test_bert_every_row_is_its_own_merged_model(bert_case, mode):
    _, _, twin = bert_case
    wrapped = TwinMergedModule(_bert(), twin, mode=mode)
    ids, mask = _inputs(6)
    rw = _weights(6)
    _close(_logits(wrapped, ids, mask, mix_weights=rw), _reference_bert(twin, ids, mask, rw))
    assert wrapped.last_call["mode"] in ("factored", "materialize", "group")


@pytest.mark.parametrize("mode", ["factored", "materialize"])
def test_frozen_word_embeddings_are_served_by_the_shared_expert(mode):
    # The demo's experts: word embeddings frozen during fine-tuning, so no expert changes them.
    base, base_sd, experts = _experts(_bert, 3, 3, heads=True)
    for sd in experts.values():
        sd["bert.embeddings.word_embeddings.weight"] = base_sd[
            "bert.embeddings.word_embeddings.weight"].clone()
    twin = TwinCheckpoint.build(base_sd, experts, rank_ratio=1.0, heads=r"^classifier\.")
    assert twin.report()["unchanged"] == ["bert.embeddings.word_embeddings.weight"]
    wrapped = TwinMergedModule(_bert(), twin, mode=mode)
    embeddings = wrapped.module.bert.embeddings
    assert type(embeddings.word_embeddings) is nn.Embedding            # not patched
    assert type(embeddings.position_embeddings) is not nn.Embedding    # mixes per row
    ids, mask = _inputs(5, seed=3)
    rw = _weights(5, seed=3)
    _close(_logits(wrapped, ids, mask, mix_weights=rw), _reference_bert(twin, ids, mask, rw))


@pytest.mark.parametrize("make, case", [(_gpt2, "gpt2_case"), (_llama, "llama_case")])
@pytest.mark.parametrize("mode", ["factored", "materialize"])
def test_causal_lm_every_row_is_its_own_merged_model(make, case, mode, request):
    _, _, twin = request.getfixturevalue(case)
    wrapped = TwinMergedModule(make(), twin, mode=mode)
    ids, mask = _inputs(4, seed=1)
    rw = _weights(4, seed=1)
    got = _logits(wrapped, ids, mask, mix_weights=rw, use_cache=False)
    torch.testing.assert_close(got, _reference_lm(make, twin, ids, mask, rw), **TOL)


def test_llama_norms_scale_each_row_by_its_weight(llama_case):
    _, _, twin = llama_case
    wrapped = TwinMergedModule(_llama(), twin)
    kinds = {type(layer).__mro__[1].__name__ for layer, _ in wrapped._patched}
    assert kinds == {"_TwinLinear", "_TwinEmbedding", "_TwinScale"}  # RMSNorm: weight ⊙ f(x)


class _GemmaNorm(nn.Module):
    """y = (1 + weight) ⊙ x / rms(x): affine in the weight, but not weight ⊙ f(x)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class _AbsGain(nn.Module):
    """|weight| ⊙ x: weight ⊙ f(x) for positive weights only, so mixed weights of either sign
    break it."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight.abs() * x


class _NeedsMask(nn.Module):
    """weight ⊙ x, but its forward needs a second input: the probe cannot run it."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x, mask):
        return self.weight * x * mask


@pytest.mark.parametrize("norm, kind", [(lambda d: nn.RMSNorm(d), "_TwinScale"),
                                        (_GemmaNorm, "_TwinFallback"),
                                        (_AbsGain, "_TwinFallback"),
                                        (_NeedsMask, "_TwinFallback")])
def test_a_weight_scaled_layer_is_proven_on_a_probe_and_exact_either_way(norm, kind):
    d = 8

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin, self.norm = nn.Linear(d, d), norm(d)

        def forward(self, x):
            h = self.lin(x)
            return self.norm(h, torch.ones_like(h)) if norm is _NeedsMask else self.norm(h)

    base = Net().state_dict()
    g = torch.Generator().manual_seed(1)
    experts = {t: {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
               for t in "abc"}
    twin = TwinCheckpoint.build(base, experts, rank_ratio=1.0)
    wrapped = TwinMergedModule(Net(), twin, mode="factored")
    assert type(wrapped.module.norm).__mro__[1].__name__ == kind
    x = torch.randn(3, 5, d, generator=g)
    rw = _weights(3)
    with torch.no_grad():
        got = wrapped(x, mix_weights=rw)
        for b in range(3):
            ref = Net()
            ref.load_state_dict(twin.merged_state_dict(rw[b]))
            torch.testing.assert_close(got[b], ref(x[b:b + 1])[0], **TOL)


def test_gpt2_uses_conv1d_and_keeps_tied_weights_tied(gpt2_case):
    _, _, twin = gpt2_case
    model = _gpt2()
    wrapped = TwinMergedModule(model, twin, mode="materialize")
    kinds = {type(layer).__mro__[1].__name__ for layer, _ in wrapped._patched}
    assert "_TwinConv1D" in kinds
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head.weight" not in [name for name, *_ in wrapped._mixed]  # merged once


def test_one_hot_weights_reproduce_each_expert(bert_case):
    _, experts, twin = bert_case
    wrapped = TwinMergedModule(_bert(), twin, mode="factored")
    ids, mask = _inputs(3, seed=2)
    for t, (name, sd) in enumerate(experts.items()):
        expert = _bert(NUM_LABELS[t])
        expert.load_state_dict(sd)
        with torch.no_grad():
            want = expert(input_ids=ids, attention_mask=mask).logits
        got = _logits(wrapped, ids, mask, mix_weights=F.one_hot(torch.tensor(t), 3).float())
        torch.testing.assert_close(got[:, :NUM_LABELS[t]], want, rtol=1e-4, atol=1e-4)


def test_truncated_one_hot_stays_within_the_truncation_error():
    base, base_sd, experts = _experts(lambda *_: _gpt2(), 2, 3)
    ids, mask = _inputs(3, seed=3)
    expert = _gpt2()
    expert.load_state_dict(experts["task0"])
    with torch.no_grad():
        want = expert(input_ids=ids, attention_mask=mask, use_cache=False).logits
    errors = []
    for rank in (2, 8, 32):
        twin = TwinCheckpoint.build(base_sd, experts, rank=rank)
        wrapped = TwinMergedModule(_gpt2(), twin, mode="factored")
        got = _logits(wrapped, ids, mask, mix_weights=torch.tensor([1.0, 0.0]), use_cache=False)
        # Exactly the truncated expert, whose distance to the expert shrinks with the rank.
        torch.testing.assert_close(got, _reference_lm(_gpt2, twin, ids, mask,
                                                      torch.tensor([[1.0, 0.0]] * 3)), **TOL)
        errors.append((got - want).norm() / want.norm())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-4  # rank 32 = full rank of the 32-wide model


def test_group_with_enough_groups_is_exact_and_fewer_groups_use_group_means(bert_case):
    _, _, twin = bert_case
    ids, mask = _inputs(8, seed=4)
    rw = _weights(8, seed=4)
    rw[5] = rw[2]  # a repeated row: 7 distinct rows
    exact = TwinMergedModule(_bert(), twin, mode="group", n_groups=7)
    _close(_logits(exact, ids, mask, mix_weights=rw), _reference_bert(twin, ids, mask, rw))
    assert int(exact.last_call["groups"].max()) + 1 == 7

    coarse = TwinMergedModule(_bert(), twin, mode="group", n_groups=3)
    got = _logits(coarse, ids, mask, mix_weights=rw)
    groups = coarse.last_call["groups"]
    n_groups = int(groups.max()) + 1
    assert len(set(rw.argmax(-1).tolist())) <= n_groups <= 3
    means = torch.stack([rw[groups == g].mean(0) for g in range(n_groups)])
    for g in range(n_groups):  # every group shares one argmax (binned first)
        assert len(set(rw[groups == g].argmax(-1).tolist())) == 1
    _close(got, _reference_bert(twin, ids, mask, means[groups], head_tasks=rw.argmax(-1)))


def test_groups_is_the_plan_of_group_mode_and_serving_it_by_hand_gives_the_same_output(
        bert_case):
    _, _, twin = bert_case
    ids, mask = _inputs(8, seed=14)
    rw = _weights(8, seed=14)
    wrapped = TwinMergedModule(_bert(), twin, mode="group", n_groups=4)
    want = _logits(wrapped, ids, mask, mix_weights=rw)
    member, centers = wrapped.groups(rw)
    assert torch.equal(member, wrapped.last_call["groups"])
    assert centers.shape == (int(member.max()) + 1, 3)
    # A server's own execution of the plan: each group's rows in one-row calls, one merge.
    for g in range(centers.shape[0]):
        with wrapped.merged(centers[g]):
            for b in (member == g).nonzero().flatten().tolist():
                got = _logits(wrapped, ids[b:b + 1], mask[b:b + 1],
                              head_tasks=rw[b:b + 1].argmax(-1))
                _close(got, want[b:b + 1])
    with pytest.raises(ValueError, match=r"groups: weights must be a floating tensor \[B, T=3\]"):
        wrapped.groups(rw[0])
    with pytest.raises(ValueError, match=r"n_groups must be None or an int >= 1, got 0"):
        wrapped.groups(rw, 0)
    with pytest.raises(ValueError, match="NaN"):
        wrapped.groups(torch.full((2, 3), float("nan")))


def test_merged_block_merges_once_serves_its_weights_and_survives_other_calls(
        bert_case, monkeypatch):
    _, _, twin = bert_case
    ids, mask = _inputs(3, seed=15)
    w = torch.tensor([0.2, 0.5, 0.3])
    other = torch.tensor([0.6, 0.2, 0.2])
    wrapped = TwinMergedModule(_bert(), twin, mode="factored")
    calls = []
    real = tm.module.lowrank_merge_
    monkeypatch.setattr(tm.module, "lowrank_merge_", lambda *a: calls.append(1) or real(*a))
    want = _reference_bert(twin, ids, mask, w.expand(3, 3))
    with wrapped.merged(w):
        per_merge = len(calls)
        assert per_merge > 0
        for _ in range(3):
            _close(_logits(wrapped, ids, mask), want)
        assert len(calls) == per_merge  # served from the block's merge
        assert wrapped.last_call["mode"] == "materialize" and wrapped.last_call["merged_block"]
        # Rows one at a time (the batches a server cuts), still no merge.
        _close(_logits(wrapped, ids[1:2], mask[1:2]), want[1:2])
        assert len(calls) == per_merge
        # Another call that merges other weights into the same buffers: correct, and the block's
        # weights are merged again at its next call.
        wrapped.mode = "materialize"
        _close(_logits(wrapped, ids, mask, mix_weights=other),
               _reference_bert(twin, ids, mask, other.expand(3, 3)))
        _close(_logits(wrapped, ids, mask), want)
        assert len(calls) == 3 * per_merge
        with pytest.raises(ValueError, match="blocks do not nest"):
            with wrapped.merged(other):
                pass
    with pytest.raises(ValueError, match="no router"):  # the block's weights are gone
        _logits(wrapped, ids, mask)
    with pytest.raises(ValueError, match=r"merged: weights must be a floating tensor of shape "
                                         r"\[T=3\], got torch.float32 \[2, 3\]"):
        with wrapped.merged(torch.ones(2, 3)):
            pass
    with pytest.raises(ValueError, match="NaN"):
        with wrapped.merged(torch.tensor([float("nan"), 0.5, 0.5])):
            pass


def test_one_vector_equals_the_same_row_everywhere(bert_case):
    _, _, twin = bert_case
    ids, mask = _inputs(4, seed=5)
    w = torch.tensor([0.2, 0.5, 0.3])
    for mode in ("factored", "materialize", "group", "auto"):
        wrapped = TwinMergedModule(_bert(), twin, mode=mode)
        _close(_logits(wrapped, ids, mask, mix_weights=w),
               _logits(wrapped, ids, mask, mix_weights=w.expand(4, 3).clone()))


def test_head_tasks_override_the_argmax(bert_case):
    _, _, twin = bert_case
    ids, mask = _inputs(4, seed=6)
    rw = _weights(4, seed=6)
    oracle = torch.tensor([2, 0, 1, 2])
    for mode in ("factored", "materialize"):
        wrapped = TwinMergedModule(_bert(), twin, mode=mode)
        _close(_logits(wrapped, ids, mask, mix_weights=rw, head_tasks=oracle),
               _reference_bert(twin, ids, mask, rw, head_tasks=oracle))


def test_several_heads_per_row_in_one_pass(bert_case):
    _, _, twin = bert_case
    ids, mask = _inputs(5, seed=16)
    rw = _weights(5, seed=16)
    both = torch.stack([rw.argmax(-1), torch.tensor([2, 0, 1, 1, 0])], 1)   # [B, 2]
    for mode in ("factored", "group"):
        wrapped = TwinMergedModule(_bert(), twin, mode=mode)
        got = _logits(wrapped, ids, mask, mix_weights=rw, head_tasks=both)
        assert got.shape == (5, 2, max(NUM_LABELS))
        for h in range(2):
            _close(got[:, h], _logits(wrapped, ids, mask, mix_weights=rw, head_tasks=both[:, h]))


# --- the router path ----------------------------------------------------------------------------

def test_router_weights_are_used_when_none_are_given(bert_case):
    _, _, twin = bert_case
    torch.manual_seed(0)
    router = TwinRouter(32, twin.tasks).eval()
    wrapped = TwinMergedModule(_bert(), twin.with_router(router), mode="factored")
    ids, mask = _inputs(5, seed=7)
    w = wrapped.route(input_ids=ids, attention_mask=mask)
    assert w.shape == (5, 3) and torch.allclose(w.sum(-1), torch.ones(5))
    # Features of θs: pooled_features of the wrapped module outside any mixing.
    plain = _bert()
    plain.load_state_dict({**twin.shared, **{k: v for k, v in plain.state_dict().items()
                                             if k.startswith("classifier")}})
    feats = tm.pooled_features(plain, ids, mask)
    torch.testing.assert_close(w, router.weights(feats))
    _close(_logits(wrapped, ids, mask), _logits(wrapped, ids, mask, mix_weights=w))


def test_no_router_and_no_weights_is_an_error(bert_case):
    _, _, twin = bert_case
    wrapped = TwinMergedModule(_bert(), twin)
    ids, mask = _inputs(2)
    with pytest.raises(ValueError, match="no router"):
        wrapped(input_ids=ids, attention_mask=mask)


# --- the wrapper's contract ---------------------------------------------------------------------

def test_state_dict_is_the_shared_expert_and_unwrap_restores_classes(gpt2_case):
    _, _, twin = gpt2_case
    model = _gpt2()
    classes = {name: type(m) for name, m in model.named_modules()}
    wrapped = TwinMergedModule(model, twin)
    sd = model.state_dict()
    assert sd.keys() == twin.shared.keys()
    for k, v in twin.shared.items():
        assert torch.equal(sd[k], v), k
    assert all(not k.startswith("_twin") for k in wrapped.state_dict())
    assert wrapped.unwrap() is model
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert not [k for k, _ in model.named_buffers() if "_twin" in k]
    TwinMergedModule(model, twin)  # and it can be wrapped again


def test_materialize_buffers_are_allocated_once(bert_case):
    _, _, twin = bert_case
    wrapped = TwinMergedModule(_bert(), twin, mode="materialize")
    ids, mask = _inputs(4, seed=8)
    _logits(wrapped, ids, mask, mix_weights=_weights(4, seed=8))
    (buffers,) = wrapped._pool._free
    ptrs = [b.data_ptr() for b in buffers.tensors.values()]
    assert len(ptrs) == len(twin.lowrank) + len(twin.dense)
    with torch.inference_mode():
        wrapped(input_ids=ids, attention_mask=mask, mix_weights=_weights(4, seed=9))
    _logits(wrapped, ids, mask, mix_weights=_weights(4, seed=10))
    assert wrapped._pool.sets_made == 1
    assert [b.data_ptr() for b in buffers.tensors.values()] == ptrs


def test_to_float64_moves_factors_and_keeps_exactness(bert_case):
    _, _, twin = bert_case
    wrapped = TwinMergedModule(_bert(), twin, mode="factored").to(torch.float64)
    layer = wrapped.module.bert.encoder.layer[0].attention.self.query
    assert layer._twin_weight_U.dtype == torch.float64
    ids, mask = _inputs(3, seed=11)
    rw = _weights(3, seed=11).double()
    got = _logits(wrapped, ids, mask, mix_weights=rw)
    _close(got.float(), _reference_bert(twin, ids, mask, rw.float()), rtol=1e-5, atol=1e-5)


def test_factored_mode_is_differentiable_in_the_weights(bert_case):
    _, _, twin = bert_case
    wrapped = TwinMergedModule(_bert(), twin, mode="factored").double()
    ids, mask = _inputs(2, seed=12)
    rw = _weights(2, seed=12).double().requires_grad_()

    def f(w):
        return wrapped(input_ids=ids, attention_mask=mask, mix_weights=w).logits[:, :2].sum()

    f(rw).backward()
    # Central differences along one direction agree with the gradient.
    d = torch.randn_like(rw)
    eps = 1e-6
    with torch.no_grad():
        fd = (f(rw + eps * d) - f(rw - eps * d)) / (2 * eps)
    torch.testing.assert_close((rw.grad * d).sum(), fd, rtol=1e-5, atol=1e-7)


def test_torch_compile_in_factored_mode(bert_case):
    _, _, twin = bert_case
    wrapped = TwinMergedModule(_bert(), twin, mode="factored")
    compiled = torch.compile(wrapped)
    ids, mask = _inputs(4, seed=13)
    for seed in (13, 14):  # new weights, same graph
        rw = _weights(4, seed=seed)
        _close(_logits(compiled, ids, mask, mix_weights=rw),
               _logits(wrapped, ids, mask, mix_weights=rw), rtol=1e-4, atol=1e-5)


def test_auto_mode_follows_the_cost_model(gpt2_case):
    _, _, twin = gpt2_case
    wrapped = TwinMergedModule(_gpt2(), twin, mode="auto")
    # 32×32 matrices: a merge pays for itself after mn/(m+n) = 16 tokens.
    with torch.no_grad():
        ids = torch.randint(1, VOCAB, (16, 30))
        wrapped(input_ids=ids, mix_weights=torch.tensor([0.5, 0.25, 0.25]), use_cache=False)
        assert wrapped.last_call["mode"] == "materialize"  # one model for 480 tokens
        ids = torch.randint(1, VOCAB, (16, 4))
        wrapped(input_ids=ids, mix_weights=torch.softmax(torch.randn(16, 3), -1),
                use_cache=False)
        assert wrapped.last_call["mode"] == "factored"  # 16 models for 4 tokens each
    plan = wrapped.last_call
    assert plan["distinct_rows"] == 16 and plan["tokens"] == 64
    assert plan["factored_flops"] < plan["materialize_flops"]


def test_sub_batches_cannot_reassemble_a_cache(gpt2_case):
    _, _, twin = gpt2_case
    wrapped = TwinMergedModule(_gpt2(), twin, mode="materialize")
    ids, mask = _inputs(3)
    with torch.no_grad(), pytest.raises(ValueError, match="use_cache=False"):
        wrapped(input_ids=ids, attention_mask=mask, mix_weights=_weights(3), use_cache=True)
    wrapped.mode = "factored"  # one pass: the cache comes back
    with torch.no_grad():
        out = wrapped(input_ids=ids, attention_mask=mask, mix_weights=_weights(3), use_cache=True)
    assert out.past_key_values is not None


# --- errors -------------------------------------------------------------------------------------

def test_argument_errors(bert_case, gpt2_case):
    _, _, twin = bert_case
    with pytest.raises(ValueError, match="mode must be one of"):
        TwinMergedModule(_bert(), twin, mode="fast")
    with pytest.raises(TypeError, match="twin must be a TwinCheckpoint"):
        TwinMergedModule(_bert(), {"a": 1})
    with pytest.raises(ValueError, match="n_groups must be"):
        TwinMergedModule(_bert(), twin, n_groups=0)
    with pytest.raises(ValueError, match="router.tasks must be"):
        TwinMergedModule(_bert(), twin, router=TwinRouter(32, ["x", "y", "z"]))
    with pytest.raises(ValueError, match="that the module does not have"):
        TwinMergedModule(_gpt2(), twin)
    wrapped = TwinMergedModule(_bert(), twin)
    with pytest.raises(ValueError, match="already wrapped"):
        TwinMergedModule(wrapped.module, twin)
    ids, mask = _inputs(2)
    with pytest.raises(ValueError, match=r"mix_weights must have shape \[B, T=3\]"):
        wrapped(input_ids=ids, attention_mask=mask, mix_weights=torch.ones(2, 4))
    with pytest.raises(ValueError, match="mix_weights has 3 rows but the batch has B=2"):
        wrapped(input_ids=ids, attention_mask=mask, mix_weights=torch.ones(3, 3))
    with pytest.raises(TypeError, match="mix_weights must be a floating tensor"):
        wrapped(input_ids=ids, attention_mask=mask, mix_weights=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="head_tasks must be in \\[0, 3\\), got 3 at row 1"):
        wrapped(input_ids=ids, attention_mask=mask, mix_weights=_weights(2),
                head_tasks=torch.tensor([0, 3]))
    wrapped.mode = "materialize"
    with pytest.raises(ValueError, match="NaN"):
        wrapped(input_ids=ids, attention_mask=mask, mix_weights=torch.full((2, 3), float("nan")))
    _, _, lm_twin = gpt2_case
    lm = TwinMergedModule(_gpt2(), lm_twin)
    with pytest.raises(ValueError, match="no task heads"):
        lm(input_ids=ids, mix_weights=_weights(2), head_tasks=torch.tensor([0, 1]))


class _Flattening(nn.Module):
    """A model that flattens the batch before its Linear layer."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, x):
        return self.proj(x.reshape(-1, 4))


def test_factored_mode_names_a_layer_whose_input_is_not_batch_first():
    torch.manual_seed(0)
    base = _Flattening().state_dict()
    experts = {t: {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for t in "ab"}
    twin = TwinCheckpoint.build(base, experts, rank_ratio=1.0)
    wrapped = TwinMergedModule(_Flattening(), twin, mode="factored")
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"layer 'proj' \(Linear\).*B=2.*\[10, 4\]"):
        wrapped(x, mix_weights=torch.rand(2, 2))
    wrapped.mode = "materialize"  # one merged model: whatever the layers do inside
    w = torch.tensor([0.3, 0.7])
    torch.testing.assert_close(wrapped(x, mix_weights=w), F.linear(
        x.reshape(-1, 4), *(twin.merged_state_dict(w)[k] for k in ("proj.weight", "proj.bias"))))
    with pytest.raises(ValueError, match="output leaf 0 .* is not batched along dimension 0"):
        wrapped(x, mix_weights=torch.rand(2, 2))  # but its output cannot be split by row


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["factored", "materialize", "group"])
def test_cuda_serves_the_same_rows_as_cpu(bert_case, mode):
    _, _, twin = bert_case
    ids, mask = _inputs(6, seed=15)
    rw = _weights(6, seed=15)
    cpu = _logits(TwinMergedModule(_bert(), twin, mode=mode), ids, mask, mix_weights=rw)
    gpu_model = TwinMergedModule(_bert().cuda(), twin.to("cuda"), mode=mode)
    got = _logits(gpu_model, ids.cuda(), mask.cuda(), mix_weights=rw.cuda())
    _close(got.cpu(), cpu, rtol=1e-4, atol=1e-4)


class _Encoder(nn.Module):
    """nn.TransformerEncoderLayer: nn.MultiheadAttention reads its out_proj's weight itself,
    and in eval mode without grad the layer would take a fused path that reads every weight
    itself; a tied output projection reads the embedding's weight."""

    def __init__(self, tied=False):
        super().__init__()
        self.tied = tied
        self.embed = nn.Embedding(VOCAB, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0,
                                                batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, ids):
        h = self.layer(self.embed(ids))
        if self.tied:  # the parent computes with a mixed tensor, and reads its metadata
            assert self.embed.weight.dtype == h.dtype and self.embed.weight.shape[1] == 16
            return F.linear(h, self.embed.weight)
        return self.out(h)


def _encoder_case(tied):
    torch.manual_seed(0)
    base = _Encoder(tied).eval().state_dict()
    experts = {t: {k: v + 0.05 * torch.randn_like(v) for k, v in base.items()} for t in "abc"}
    twin = TwinCheckpoint.build(base, experts, rank_ratio=1.0)
    ids, _ = _inputs(3, seed=21)
    rw = _weights(3, seed=21)
    outs = []
    for b in range(3):
        m = _Encoder(tied).eval()
        m.load_state_dict(twin.merged_state_dict(rw[b]))
        with torch.no_grad():
            outs.append(m(ids[b:b + 1]))
    return twin, ids, rw, torch.cat(outs)


def test_layers_read_by_their_parent_mix_exactly():
    twin, ids, rw, want = _encoder_case(tied=False)
    wrapped = TwinMergedModule(_Encoder().eval(), twin, mode="factored")
    kinds = {type(layer).__mro__[1].__name__ for layer, _ in wrapped._patched}
    assert "_TwinFallback" in kinds  # nn.MultiheadAttention and its out_proj
    # The attention merges its own and its out_proj's tensors per row; without grad, the fused
    # path sees tensors it cannot take (the mixed ones read from outside their layer) and the
    # layer runs module by module.
    _close(wrapped(ids, mix_weights=rw).detach(), want)
    with torch.no_grad():
        _close(wrapped(ids, mix_weights=rw), want)
    wrapped.mode = "materialize"  # merged tensors are served to whoever reads them
    with torch.no_grad():
        _close(wrapped(ids, mix_weights=rw), want)


def test_computing_with_a_mixed_tensor_outside_its_layer_is_refused_in_factored_mode():
    twin, ids, rw, want = _encoder_case(tied=True)
    wrapped = TwinMergedModule(_Encoder(tied=True).eval(), twin, mode="factored")
    with torch.no_grad(), pytest.raises(ValueError, match=r"layer 'embed' \(Embedding\): its "
                                                          r"mixed tensor 'weight' is used by code "
                                                          r"outside the layer \(linear"):
        wrapped(ids, mix_weights=rw)
    wrapped.mode = "materialize"
    with torch.no_grad():
        _close(wrapped(ids, mix_weights=rw), want)
    wrapped.mode = "factored"  # one weight vector for the batch: still one tensor per row
    with torch.no_grad(), pytest.raises(ValueError, match="used by code outside the layer"):
        wrapped(ids, mix_weights=rw[0])


class _Scaled(nn.Module):
    """A tensor at the root (so the whole model is a fallback layer) around a task head."""

    def __init__(self, num_labels=3):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))
        self.fc = nn.Linear(8, 8)
        self.classifier = nn.Linear(8, num_labels)

    def forward(self, x):
        return self.classifier(torch.tanh(self.fc(x) * self.scale))


def _scaled_twin(**build):
    torch.manual_seed(0)
    base = _Scaled().state_dict()
    experts = {t: {k: v + 0.5 * torch.randn_like(v) for k, v in base.items()} for t in "ab"}
    return TwinCheckpoint.build(base, experts, rank_ratio=1.0, **build)


def test_a_head_inside_a_fallback_layer_keeps_each_rows_task():
    twin = _scaled_twin(heads=r"^classifier\.")
    x, rw = torch.randn(3, 8), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7]])
    want = []
    for b in range(3):
        m = _Scaled()
        m.load_state_dict(twin.merged_state_dict(rw[b]))
        want.append(m(x[b:b + 1]).detach())
    for mode in ("factored", "materialize"):
        with torch.no_grad():
            _close(TwinMergedModule(_Scaled(), twin, mode=mode)(x, mix_weights=rw),
                   torch.cat(want))


def test_an_empty_batch_passes_through_a_fallback_layer():
    wrapped = TwinMergedModule(_Scaled(), _scaled_twin(), mode="factored")
    with torch.no_grad():
        assert wrapped(torch.randn(0, 8), mix_weights=torch.zeros(0, 2)).shape == (0, 3)
        assert wrapped(torch.randn(0, 8), mix_weights=torch.tensor([0.5, 0.5])).shape == (0, 3)


def test_a_wrapper_can_be_deep_copied_and_both_serve(bert_case):
    _, _, twin = bert_case
    wrapped = TwinMergedModule(_bert(), twin, mode="materialize")
    ids, mask = _inputs(3, seed=31)
    rw = _weights(3, seed=31)
    want = _logits(wrapped, ids, mask, mix_weights=rw)
    copied = copy.deepcopy(wrapped)
    _close(_logits(copied, ids, mask, mix_weights=rw), want)
    with copied.merged(rw[1]):  # the copy's state is its own
        _close(_logits(copied, ids, mask), _logits(wrapped, ids, mask, mix_weights=rw[1]))
    assert copied.unwrap() is copied.module and wrapped.unwrap() is wrapped.module


def test_torch_compile_fullgraph_in_factored_mode_without_the_nan_check(bert_case):
    _, _, twin = bert_case
    wrapped = TwinMergedModule(_bert(), twin, mode="factored", check_finite=False)
    compiled = torch.compile(wrapped, fullgraph=True, backend="aot_eager")
    ids, mask = _inputs(4, seed=13)
    rw = _weights(4, seed=13)
    _close(_logits(compiled, ids, mask, mix_weights=rw),
           _logits(wrapped, ids, mask, mix_weights=rw), rtol=1e-4, atol=1e-5)


def test_a_refused_filter_fn_changes_nothing(bert_case):
    _, _, twin = bert_case
    module = _bert()
    before = copy.deepcopy(module.state_dict())

    def picky(layer, name):
        if name.endswith("output.dense"):
            raise RuntimeError("picky: no")
        return True

    with pytest.raises(RuntimeError, match="picky: no"):
        TwinMergedModule(module, twin, filter_fn=picky)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(type(m).__name__.startswith("Twin") for m in module.modules())


def _t5():
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=1,
                                num_decoder_layers=1, num_heads=2,
                                relative_attention_num_buckets=8, decoder_start_token_id=0,
                                pad_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


def test_t5_relative_position_bias_has_no_rows_of_its_own():
    """Its input is [query length, key length]: with B equal to the length it would look
    batched. Per-row weights are refused whatever B is; one vector, and materialize, are exact."""
    _, base_sd, experts = _experts(lambda *_: _t5(), 3, 4)
    twin = TwinCheckpoint.build(base_sd, experts, rank_ratio=1.0)
    ids, mask = _inputs(L, seed=41)  # B == L
    rw = _weights(L, seed=41)

    def logits(model, **kw):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids,
                         use_cache=False, **kw).logits

    def reference(rows):
        outs = []
        for b in range(L):
            m = _t5()
            m.load_state_dict(twin.merged_state_dict(rows[b]))
            with torch.no_grad():
                outs.append(m(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1],
                              decoder_input_ids=ids[b:b + 1], use_cache=False).logits)
        return torch.cat(outs)

    wrapped = TwinMergedModule(_t5(), twin, mode="factored")
    kinds = {type(layer).__mro__[1].__name__ for layer, _ in wrapped._patched}
    assert "_TwinBatchless" in kinds
    with pytest.raises(ValueError, match=r"relative_attention_bias' \(Embedding\): its input has "
                                         r"no batch dimension"):
        logits(wrapped, mix_weights=rw)
    torch.testing.assert_close(logits(wrapped, mix_weights=rw[2]), reference(rw[2].expand(L, 3)),
                               **TOL)
    wrapped.mode = "materialize"
    torch.testing.assert_close(logits(wrapped, mix_weights=rw), reference(rw), **TOL)
