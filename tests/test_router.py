"""TwinRouter, pooled_features and fit_router.

METHOD.md §1 Stage 2 (the router), §2 (the epoch is selected on a validation split, never on a
test set).
"""

import json

import pytest
import torch

from twinmerge_ext.router import TwinRouter, fit_router, pool_hidden_states, pooled_features

TASKS = ["a", "b", "c", "d"]


def _clusters(n_per_task=150, d=32, spread=0.6, seed=1, batch=25):
    """Gaussian clusters, one per task, as {task: [feature batches [batch, d]]}."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(len(TASKS), d, generator=g)
    data = {}
    for i, t in enumerate(TASKS):
        x = centers[i] + spread * torch.randn(n_per_task, d, generator=g)
        data[t] = list(x.split(batch))
    return data


def identity(batch):
    return batch


# ---------------------------------------------------------------- fit_router on synthetic features

def test_fit_separable_reaches_95_percent():
    router, report = fit_router(identity, _clusters(), epochs=8, batch_size=32)
    assert report["val_accuracy"] >= 0.95
    assert set(report["val_accuracy_per_task"]) == set(TASKS)
    assert min(report["val_accuracy_per_task"].values()) >= 0.9
    assert report["n_val"] == 4 * 30 and report["n_train"] == 4 * 120
    assert len(report["train_loss"]) == len(report["val_accuracy_per_epoch"]) == 8
    assert not router.training
    # The returned router is usable as is (eval mode) on all items, train and validation.
    items = _clusters()
    x = torch.cat([torch.cat(items[t]) for t in TASKS])
    y = torch.arange(len(TASKS)).repeat_interleave(150)
    assert (router(x).argmax(-1) == y).float().mean() >= 0.95


def test_selected_epoch_is_argmax_of_val_accuracy():
    # Noisy clusters and a high lr so the per-epoch accuracy is not monotone.
    data = _clusters(n_per_task=60, spread=3.0)
    router, report = fit_router(identity, data, epochs=12, lr=3e-2, batch_size=16, dropout=0.5)
    accs = report["val_accuracy_per_epoch"]
    best = report["best_epoch"]
    assert accs[best] == max(accs)
    assert all(a < accs[best] for a in accs[:best])  # ties -> earliest
    assert report["val_accuracy"] == accs[best]
    # The returned weights are those of the best epoch: re-evaluating them on the validation
    # split gives its accuracy. Rebuild the split the way fit_router documents it.
    g = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for i, t in enumerate(TASKS):
        f = torch.cat(data[t])
        perm = torch.randperm(f.shape[0], generator=g)[:60]
        xs.append(f[perm[:12]])
        ys.append(torch.full((12,), i))
    with torch.no_grad():
        acc = (router(torch.cat(xs)).argmax(-1) == torch.cat(ys)).float().mean().item()
    assert acc == pytest.approx(accs[best])
    # This data has a later epoch tying the best one (the test is about ties, make sure of it)...
    assert accs[best] in accs[best + 1:]
    # ...and the returned state is the earliest best epoch's: with the same seed, training stops
    # there gives bit-identical weights.
    short, short_report = fit_router(identity, data, epochs=best + 1, lr=3e-2, batch_size=16)
    assert short_report["best_epoch"] == best
    for k, v in router.state_dict().items():
        assert torch.equal(v, short.state_dict()[k]), k


def test_same_seed_same_router_and_global_rng_untouched():
    data = _clusters(n_per_task=40)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    r1, rep1 = fit_router(identity, data, epochs=3, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    r2, rep2 = fit_router(identity, data, epochs=3, seed=7)
    r3, _ = fit_router(identity, data, epochs=3, seed=8)
    for k, v in r1.state_dict().items():
        assert torch.equal(v, r2.state_dict()[k]), k
    assert rep1 == rep2
    assert any(not torch.equal(v, r3.state_dict()[k]) for k, v in r1.state_dict().items())


def test_balanced_and_capped():
    data = _clusters(n_per_task=100)
    data["a"] = data["a"][:2]  # 50 items
    _, report = fit_router(identity, data, epochs=1, max_items_per_task=80)
    assert report["n_items_per_task"] == 50
    assert report["n_val"] == 4 * 10 and report["n_train"] == 4 * 40
    _, report = fit_router(identity, _clusters(n_per_task=100), epochs=1, max_items_per_task=30)
    assert report["n_items_per_task"] == 30


# ---------------------------------------------------------------- TwinRouter

def _router(d=8, tasks=TASKS, **kw):
    torch.manual_seed(0)
    return TwinRouter(d, tasks, **kw).eval()


def test_architecture_defaults():
    r = _router(d=8)
    layers = list(r.net)
    kinds = [type(m).__name__ for m in layers]
    assert kinds == ["Linear", "BatchNorm1d", "LeakyReLU", "Dropout", "Linear", "BatchNorm1d",
                     "LeakyReLU", "Dropout", "Linear"]
    assert (layers[0].in_features, layers[0].out_features) == (8, 16)
    assert (layers[4].in_features, layers[4].out_features) == (16, 16)
    assert (layers[8].in_features, layers[8].out_features) == (16, 4)
    assert layers[2].negative_slope == 0.01 and layers[3].p == 0.5
    assert r.in_features == 8 and r.tasks == TASKS
    r = TwinRouter(8, TASKS, hidden=5, dropout=0.1)
    assert r.net[0].out_features == 5 and r.net[7].p == 0.1
    assert r(torch.randn(3, 8)).shape == (3, 4)


def test_weights_softmax_temperature_topk():
    r = _router()
    x = torch.randn(6, 8)
    with torch.no_grad():
        logits = r(x)
        w = r.weights(x)
        torch.testing.assert_close(w, torch.softmax(logits, -1))
        torch.testing.assert_close(w.sum(-1), torch.ones(6))
        sharp, flat = r.weights(x, temperature=0.1), r.weights(x, temperature=10.0)
        # Lower temperature concentrates mass on the argmax; higher flattens toward uniform.
        assert (sharp.max(-1).values > w.max(-1).values).all()
        assert (flat.max(-1).values < w.max(-1).values).all()
        ent = lambda p: -(p * p.log()).sum(-1)
        assert (ent(flat) > ent(w)).all() and (ent(sharp) < ent(w)).all()

        w2 = r.weights(x, top_k=2)
        torch.testing.assert_close(w2.sum(-1), torch.ones(6))
        assert ((w2 > 0).sum(-1) == 2).all()
        top = logits.topk(2, -1).indices
        expected = torch.zeros_like(w).scatter(-1, top, w.gather(-1, top))
        torch.testing.assert_close(w2, expected / expected.sum(-1, keepdim=True))
        torch.testing.assert_close(r.weights(x, top_k=4), w)
        w1 = r.weights(x, top_k=1)
        assert torch.equal(w1, torch.nn.functional.one_hot(logits.argmax(-1), 4).float())


def test_config_round_trip():
    r = TwinRouter(8, TASKS, hidden=12, dropout=0.3)
    # Train a step so the BatchNorm running stats are not the defaults.
    r.train()
    r(torch.randn(16, 8)).sum().backward()
    r.eval()
    cfg = json.loads(json.dumps(r.config()))
    r2 = TwinRouter.from_config(cfg, r.state_dict())
    assert not r2.training and r2.config() == r.config()
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(r(x), r2(x))
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        TwinRouter.from_config({**cfg, "bogus": 1})
    with pytest.raises(ValueError, match=r"missing keys \['tasks'\]"):
        TwinRouter.from_config({"in_features": 8})
    with pytest.raises(RuntimeError, match="size mismatch"):
        TwinRouter.from_config({**cfg, "hidden": 13}, r.state_dict())


def test_router_errors():
    r = _router()
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"temperature must be > 0, got 0.0"):
        r.weights(x, temperature=0)
    with pytest.raises(ValueError, match=r"temperature must be > 0, got -1.0"):
        r.weights(x, temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_k must be >= 1, got 0"):
        r.weights(x, top_k=0)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, T=4\], got 5"):
        r.weights(x, top_k=5)
    with pytest.raises(TypeError, match=r"top_k must be an int, got 1.5"):
        r.weights(x, top_k=1.5)
    with pytest.raises(ValueError, match=r"features must have shape \[B, 8\], got \[2, 7\]"):
        r(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        TwinRouter(8, TASKS, dropout=1.0)
    with pytest.raises(ValueError, match=r"task names must be unique"):
        TwinRouter(8, ["a", "a"])
    with pytest.raises(ValueError, match=r"in_features must be >= 1, got 0"):
        TwinRouter(0, TASKS)


def test_standardize_uses_the_training_statistics_and_makes_scale_irrelevant():
    data = _clusters(n_per_task=80)
    # One feature a thousand times larger than the rest: standardized, the router sees the same
    # problem as on the unscaled features.
    scale = torch.ones(32)
    scale[3] = 1000.0
    scaled = {t: [b * scale + 50.0 for b in batches] for t, batches in data.items()}
    plain, rep_plain = fit_router(identity, data, epochs=4, standardize=True)
    router, report = fit_router(identity, scaled, epochs=4, standardize=True)
    assert router.standardize and "feature_mean" in router.state_dict()
    # The statistics are those of the training split (the items not held out for validation).
    g = torch.Generator().manual_seed(0)
    x_tr = []
    for t in TASKS:
        x = torch.cat(scaled[t])
        perm = torch.randperm(80, generator=g)[:80]
        x_tr.append(x[perm[16:]])
    x_tr = torch.cat(x_tr)
    torch.testing.assert_close(router.feature_mean, x_tr.mean(0))
    torch.testing.assert_close(router.feature_std, x_tr.std(0, unbiased=False))
    # Rounding differs, so training does not repeat bit for bit, but it learns as on the
    # unscaled features; without standardizing, the large feature drowns the others.
    assert report["val_accuracy"] >= 0.9 and rep_plain["val_accuracy"] >= 0.9
    _, unstandardized = fit_router(identity, scaled, epochs=4)
    assert unstandardized["val_accuracy"] < 0.6
    x = torch.cat([torch.cat(data[t]) for t in TASKS])
    # Round trip through config and state dict; a constant feature gets std 1, not 0.
    again = TwinRouter.from_config(json.loads(json.dumps(router.config())), router.state_dict())
    torch.testing.assert_close(again(x * scale + 50.0), router(x * scale + 50.0))
    # 0.1 is not exact in binary: its std over many items is ~1e-8, not 0, and must still count
    # as constant (a one-ulp change at serving time must not move the standardized value by 1).
    const = {t: [torch.cat([b[:, :31], torch.full((b.shape[0], 1), 0.1)], 1) for b in batches]
             for t, batches in data.items()}
    r_const, _ = fit_router(identity, const, epochs=1, standardize=True)
    assert r_const.feature_std[31] == 1.0 and torch.isfinite(r_const(torch.cat(const["a"]))).all()
    nudged = torch.cat(const["a"])
    nudged[:, 31] = torch.nextafter(nudged[:, 31], torch.tensor(1.0))
    torch.testing.assert_close(r_const(nudged), r_const(torch.cat(const["a"])))


def test_standardize_is_in_the_config_only_when_set():
    # Without it the config is what readers that predate standardize expect.
    r = TwinRouter(8, ["a", "b"])
    assert "standardize" not in r.config() and "feature_mean" not in r.state_dict()
    loaded = TwinRouter.from_config(r.config(), r.state_dict())
    assert loaded.standardize is False
    s = TwinRouter(8, ["a", "b"], standardize=True)
    assert s.config()["standardize"] is True
    assert TwinRouter.from_config(s.config(), s.state_dict()).standardize is True
    with pytest.raises(TypeError, match=r"standardize must be a bool, got 'yes'"):
        TwinRouter(8, ["a", "b"], standardize="yes")


def test_standardized_half_router_standardizes_in_float32():
    torch.manual_seed(0)
    r = TwinRouter(4, ["a", "b"], standardize=True).eval()
    r.feature_mean.copy_(torch.tensor([1000.0, 1000.5, 0.0, 0.0]))
    r.feature_std.copy_(torch.tensor([0.25, 0.25, 1.0, 1.0]))
    x = torch.tensor([[1000.25, 1000.25, 0.5, -0.5]])
    want = r(x)
    # In fp16 1000.25 - 1000.5 would round to a multiple of 0.5; standardized in fp32 the
    # half router sees exactly (1, -1, 0.5, -0.5).
    half = TwinRouter.from_config(r.config(), r.state_dict()).half()
    seen = {}
    half.net[0].register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    torch.testing.assert_close(half(x).float(), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(seen["x"], torch.tensor([[1.0, -1.0, 0.5, -0.5]]).half())


def test_fit_errors():
    data = _clusters(n_per_task=20)
    with pytest.raises(ValueError, match=r"at least 2 tasks.*\['a'\]"):
        fit_router(identity, {"a": data["a"]})
    small = dict(data, c=[torch.randn(2, 32)])
    with pytest.raises(ValueError, match=r"task 'c' has 2 items, too few"):
        fit_router(identity, small)
    with pytest.raises(ValueError, match=r"task 'b' has 0 items"):
        fit_router(identity, dict(data, b=[]))
    bad = [("epochs", 0, r"epochs must be >= 1, got 0"),
           ("lr", 0.0, r"lr must be > 0, got 0.0"),
           ("lr", float("nan"), r"lr must be finite, got nan"),
           ("weight_decay", -0.1, r"weight_decay must be >= 0, got -0.1"),
           ("batch_size", 1, r"batch_size must be >= 2, got 1"),
           ("val_fraction", 0.0, r"val_fraction must be in \(0, 1\), got 0.0"),
           ("val_fraction", 1.0, r"val_fraction must be in \(0, 1\), got 1.0"),
           ("dropout", 1.5, r"dropout must be in \[0, 1\), got 1.5"),
           ("hidden", 0, r"hidden must be >= 1, got 0"),
           ("max_items_per_task", 1, r"max_items_per_task must be >= 2, got 1"),
           ("pooling", "median", r"pooling must be one of \['mean', 'max', 'cls', 'last'\] or a "
                                 r"non-empty sequence of them, got 'median'"),
           ("pooling", [], r"pooling must be one of .*, got \[\]")]
    for arg, value, msg in bad:
        with pytest.raises(ValueError, match=msg):
            fit_router(identity, data, **{arg: value})
    with pytest.raises(TypeError, match=r"epochs must be an int, got 2.0"):
        fit_router(identity, data, epochs=2.0)
    with pytest.raises(TypeError, match=r"standardize must be a bool, got 1"):
        fit_router(identity, data, standardize=1)
    with pytest.raises(ValueError, match=r"one width"):
        fit_router(identity, dict(data, d=[torch.randn(20, 16)]))
    with pytest.raises(ValueError, match=r"features of task 'a' must be a floating 2-D tensor"):
        fit_router(lambda b: b[0], data)


# ---------------------------------------------------------------- transformers

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert():
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.BertModel(cfg).train()  # train mode: features must still be exact


def _padded(lengths, low, high, L=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (len(lengths), L), generator=g)
    mask = (torch.arange(L) < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask  # pad id 0


def test_pooled_features_masked_mean(bert):
    ids, mask = _padded([3, 10, 6, 1], 1, 100)
    f = pooled_features(bert, ids, mask)
    assert bert.training and bert.encoder.layer[0].training  # mode restored
    with torch.no_grad():
        bert.eval()
        h = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        bert.train()
    m = mask.unsqueeze(-1).float()
    expected = (h[-1] * m).sum(1) / m.sum(1)
    torch.testing.assert_close(f, expected)
    assert f.shape == (4, 32) and f.dtype == torch.float32
    # An unmasked mean differs for padded rows, so the check above can tell them apart.
    assert not torch.allclose(f[0], h[-1][0].mean(0), atol=1e-4)
    # Padding ignored: other ids (and garbage) at padded positions give the same features.
    ids2 = torch.where(mask.bool(), ids, torch.randint(1, 100, ids.shape))
    torch.testing.assert_close(pooled_features(bert, ids2, mask), f)
    # Other layers and poolings.
    torch.testing.assert_close(pooled_features(bert, ids, mask, layer=0),
                               (h[0] * m).sum(1) / m.sum(1))
    torch.testing.assert_close(pooled_features(bert, ids, mask, pooling="cls"), h[-1][:, 0])
    last = torch.tensor([2, 9, 5, 0])
    torch.testing.assert_close(pooled_features(bert, ids, mask, pooling="last"),
                               h[-1][torch.arange(4), last])
    # max: over the real tokens only (a padded row's garbage never wins).
    expected_max = torch.stack([h[-1][b, :n].amax(0) for b, n in enumerate([3, 10, 6, 1])])
    torch.testing.assert_close(pooled_features(bert, ids, mask, pooling="max"), expected_max)
    torch.testing.assert_close(pooled_features(bert, ids2, mask, pooling="max"), expected_max)


def test_several_poolings_concatenate_pooling_major_and_travel_in_the_config(bert):
    ids, mask = _padded([3, 9, 5, 1], 1, 100)
    got = pooled_features(bert, ids, mask, layer=[0, -1], pooling=["mean", "max", "cls"])
    assert got.shape == (4, 6 * 32)
    parts = [pooled_features(bert, ids, mask, layer=[0, -1], pooling=p)
             for p in ("mean", "max", "cls")]
    torch.testing.assert_close(got, torch.cat(parts, 1))
    r = TwinRouter(6 * 32, ["a", "b"], layer=[0, -1], pooling=["mean", "max", "cls"])
    assert r.pooling == ("mean", "max", "cls")
    cfg = json.loads(json.dumps(r.config()))
    assert cfg["pooling"] == ["mean", "max", "cls"] and "standardize" not in cfg
    assert TwinRouter.from_config(cfg, r.state_dict()).pooling == ("mean", "max", "cls")


def test_pooled_features_of_several_layers_concatenate_and_travel_in_the_config(bert):
    ids, mask = _padded([3, 9, 5, 1], 1, 100)
    one = [pooled_features(bert, ids, mask, layer=i) for i in (0, -1)]
    both = pooled_features(bert, ids, mask, layer=[0, -1])
    assert both.shape == (4, 64)
    torch.testing.assert_close(both, torch.cat(one, 1))
    torch.testing.assert_close(pooled_features(bert, ids, mask, layer=(-1, 0), pooling="cls"),
                               torch.cat([pooled_features(bert, ids, mask, layer=i,
                                                          pooling="cls") for i in (-1, 0)], 1))
    r = TwinRouter(64, ["a", "b"], layer=[0, -1])
    assert r.layer == (0, -1)
    cfg = json.loads(json.dumps(r.config()))
    assert cfg["layer"] == [0, -1]
    assert TwinRouter.from_config(cfg, r.state_dict()).layer == (0, -1)
    with pytest.raises(ValueError, match=r"layer must be in \[-3, 3\) for 3 hidden states, got 5"):
        pooled_features(bert, ids, mask, layer=[0, 5])
    with pytest.raises(ValueError, match=r"layer must be an int or a non-empty sequence"):
        TwinRouter(64, ["a", "b"], layer=[])
    with pytest.raises(TypeError, match=r"layer must be an int, got 1.5"):
        fit_router(lambda f: f, {"a": [torch.randn(4, 8)], "b": [torch.randn(4, 8)]},
                   layer=[0, 1.5])


def test_pooled_features_left_padding(bert):
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        bert.eval()
        h = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        bert.train()
    torch.testing.assert_close(pooled_features(bert, ids, mask, pooling="cls"), h[[0, 1], [2, 0]])
    torch.testing.assert_close(pooled_features(bert, ids, mask, pooling="last"), h[:, 4])


def test_pooled_features_errors(bert):
    ids, mask = _padded([3, 4, 2], 1, 100)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"attention_mask rows \[1\] have no non-padding token"):
        pooled_features(bert, ids, mask)
    mask[1] = 1
    with pytest.raises(ValueError, match=r"pooling must be one of .* got 'median'"):
        pooled_features(bert, ids, mask, pooling="median")
    # On states already computed too: a row with no real token has nothing to pool (its max
    # would be -inf, its mean NaN).
    states = [torch.randn(3, 4, 8)]
    empty_row = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    for p in ("mean", "max", ("mean", "max")):
        with pytest.raises(ValueError, match=r"pool_hidden_states: attention_mask rows \[1\] have "
                                             r"no non-padding token"):
            pool_hidden_states(states, empty_row, 0, p)
    assert pool_hidden_states([torch.randn(0, 0, 8)], torch.zeros(0, 0), 0,
                              ("mean", "max")).shape == (0, 16)
    with pytest.raises(ValueError, match=r"pooling must be one of .* got \('mean', 'sum'\)"):
        pooled_features(bert, ids, mask, pooling=("mean", "sum"))
    with pytest.raises(ValueError, match=r"layer must be in \[-3, 3\) for 3 hidden states, got 3"):
        pooled_features(bert, ids, mask, layer=3)
    with pytest.raises(ValueError, match=r"attention_mask must be a tensor of input_ids' shape"):
        pooled_features(bert, ids, mask[:, :5])


def test_fit_router_tiny_bert_end_to_end(bert):
    # Two tasks whose token ids come from disjoint halves of the vocabulary, variable lengths.
    def batches(low, high, seed):
        g = torch.Generator().manual_seed(seed)
        out = []
        for k in range(8):
            lengths = torch.randint(2, 11, (16,), generator=g).tolist()
            ids, mask = _padded(lengths, low, high, seed=seed * 100 + k)
            out.append({"input_ids": ids, "attention_mask": mask})
        return out

    data = {"low": batches(1, 50, 1), "high": batches(50, 100, 2)}
    router, report = fit_router(bert, data, epochs=20, lr=1e-2, batch_size=32, hidden=32)
    assert report["val_accuracy"] > 0.9
    assert report["n_val"] == 2 * round(128 * 0.2)
    assert router.tasks == ["low", "high"]
