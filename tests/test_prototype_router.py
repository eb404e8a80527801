"""PrototypeRouter: nearest task centres on standardized features, fitted by
fit_router(kind="prototype"), saved with a twin, served by TwinMergedModule."""

import pytest
import torch

from twinmerge_ext import (PrototypeRouter, TwinCheckpoint, TwinMergedModule, TwinRouter,
                           fit_router, pooled_features, router_from_config)

from test_module import _bert, _experts

D = 16


def _clusters(centres, n, seed, spread=0.3):
    """Items around the given centres [k, D], n per centre, as batches of 8."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([c + spread * torch.randn(n, D, generator=g) for c in centres])
    return [x[i:i + 8] for i in range(0, x.shape[0], 8)]


def _tasks(seed=0):
    """Task a: two clusters on opposite sides; b and c: one cluster each."""
    e = torch.eye(D) * 4
    return {"a": _clusters([e[0], -e[0]], 60, seed), "b": _clusters([e[1]], 120, seed + 1),
            "c": _clusters([e[2]], 120, seed + 2)}


def _accuracy(router, data):
    right = total = 0
    for t, (task, batches) in enumerate(data.items()):
        x = torch.cat(batches)
        right += int((router(x).argmax(-1) == t).sum())
        total += x.shape[0]
    return right / total


def test_prototypes_separate_tasks_and_more_centres_cover_a_two_cluster_task():
    train, test = _tasks(0), _tasks(10)
    one, rep1 = fit_router(lambda x: x, train, kind="prototype", standardize=False)
    two, rep2 = fit_router(lambda x: x, train, kind="prototype", prototypes=2,
                           standardize=False)
    assert isinstance(two, PrototypeRouter) and two.centres.shape == (3, 2, D)
    assert rep2["kind"] == "prototype" and rep2["val_accuracy"] == 1.0
    assert _accuracy(two, test) == 1.0
    # One centre for task a is the mean of its two clusters, about 0: a is lost.
    assert rep1["val_accuracy_per_task"]["a"] < 0.6 < rep2["val_accuracy_per_task"]["a"]
    assert _accuracy(one, test) < _accuracy(two, test)
    w = two.weights(torch.cat(test["b"]))
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[0])) and (w.argmax(-1) == 1).all()
    assert rep2["scale"] in [pytest.approx(s) for s in __import__(
        "twinmerge_ext.prototype_router", fromlist=["SCALES"]).SCALES]


def test_standardized_prototypes_and_their_config_round_trip():
    router, report = fit_router(lambda x: 100 + 5 * x, _tasks(0), kind="prototype",
                                prototypes=2, seed=3, standardize=True)
    assert router.standardize and report["val_accuracy"] == 1.0
    cfg = router.config()
    assert cfg["kind"] == "prototype" and cfg["prototypes"] == 2
    again = router_from_config(cfg, router.state_dict())
    x = 100 + 5 * torch.cat(_tasks(5)["c"])
    assert isinstance(again, PrototypeRouter) and torch.equal(again(x), router(x))
    mlp = TwinRouter(D, ["a", "b"]).eval()
    assert isinstance(router_from_config(mlp.config(), mlp.state_dict()), TwinRouter)
    assert isinstance(router_from_config({**mlp.config(), "kind": "mlp"}), TwinRouter)


def test_a_twin_saves_and_loads_its_prototype_router(tmp_path):
    _, base, experts = _experts(lambda *_: _bert(), 3, 0)
    twin = TwinCheckpoint.build(base, experts, rank_ratio=0.5)
    model = _bert()
    g = torch.Generator().manual_seed(0)
    data = {t: [{"input_ids": torch.randint(1 + 15 * i, 16 + 15 * i, (8, 6), generator=g),
                 "attention_mask": torch.ones(8, 6, dtype=torch.long)} for _ in range(5)]
            for i, t in enumerate(twin.tasks)}
    router, report = fit_router(model, data, kind="prototype", layer=(0, -1),
                                pooling=("mean", "cls"))
    path = tmp_path / "twin.safetensors"
    twin.with_router(router, info=report).save(path)
    loaded = TwinCheckpoint.load(path)
    assert isinstance(loaded.router, PrototypeRouter)
    assert loaded.router.layer == (0, -1) and loaded.router.pooling == ("mean", "cls")
    for name, t in router.state_dict().items():
        assert torch.equal(loaded.router.state_dict()[name], t), name
    served = TwinMergedModule(_bert(), loaded)
    ids = torch.randint(1, 46, (4, 6), generator=g)
    mask = torch.ones_like(ids)
    feats = pooled_features(served.module, ids, mask, layer=(0, -1), pooling=("mean", "cls"))
    torch.testing.assert_close(served.route(input_ids=ids, attention_mask=mask),
                               router.weights(feats))


def test_bad_prototype_routers_are_refused():
    with pytest.raises(ValueError, match=r"fit_router: kind must be one of \['mlp', "
                                         r"'prototype'\], got 'knn'"):
        fit_router(lambda x: x, _tasks(0), kind="knn")
    with pytest.raises(ValueError, match=r"fit_router: prototypes must be >= 1, got 0"):
        fit_router(lambda x: x, _tasks(0), kind="prototype", prototypes=0)
    with pytest.raises(ValueError, match=r"task 'a' has 96 training items, fewer than "
                                         r"prototypes=100"):
        fit_router(lambda x: x, _tasks(0), kind="prototype", prototypes=100)
    with pytest.raises(ValueError, match=r"router_from_config: cfg\['kind'\] must be one of "
                                         r"\['mlp', 'prototype', 'energy', 'text', 'product'\] "
                                         r"\(absent: 'mlp'\), "
                                         r"got 'knn'"):
        router_from_config({"kind": "knn", "in_features": 2, "tasks": ["a"]})
    with pytest.raises(ValueError, match=r"PrototypeRouter.from_config: cfg is missing keys "
                                         r"\['tasks'\] / has unknown keys \['hidden'\]"):
        router_from_config({"kind": "prototype", "in_features": 2, "hidden": 3})
    router = PrototypeRouter(D, ["a", "b"], prototypes=2)
    with pytest.raises(ValueError, match=r"set_centres: centres must be a tensor of shape "
                                         r"\[2, 2, 16\], got \[2, 16\]"):
        router.set_centres(torch.ones(2, D))
    with pytest.raises(ValueError, match=r"set_centres: centres must be finite and non-zero"):
        router.set_centres(torch.zeros(2, 2, D))
    with pytest.raises(ValueError, match=r"PrototypeRouter.forward: features must have shape "
                                         r"\[B, 16\], got \[3, 4\]"):
        router(torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"PrototypeRouter.weights: features has NaN/Inf"):
        router.weights(torch.full((1, D), float("nan")))
    with pytest.raises(ValueError, match=r"PrototypeRouter: prototypes must be >= 1, got 0"):
        PrototypeRouter(D, ["a"], prototypes=0)
