"""TextRouter (character n-grams of the raw text) and ProductRouter (a hidden-state router's
probabilities times a TextRouter's): fitted, saved with a twin, served by TwinMergedModule
from the call's router_text, refused with clear errors when misused."""

import random

import pytest
import torch

from twinmerge_ext import (ProductRouter, TextRouter, TwinCheckpoint, TwinRouter,
                           fit_product_alpha, fit_text_router, router_from_config)

from test_module import _experts
from test_self_routing import MAKERS, _batch, _router, _wrapped

NF = 2 ** 12


def _texts(n, seed):
    """Three sources told apart by style only: the same words in lower case, in UPPER CASE,
    and as @handles with #tags."""
    rng = random.Random(seed)
    words = ["fox", "river", "market", "plan", "light", "stone", "music", "garden", "letter"]

    def sentence():
        return [rng.choice(words) for _ in range(rng.randint(3, 7))]
    return {"a": [" ".join(sentence()) + "." for _ in range(n)],
            "b": [" ".join(sentence()).upper() + "." for _ in range(n)],
            "c": [" ".join("@" + w if i % 2 else "#" + w for i, w in enumerate(sentence()))
                  for _ in range(n)]}


@pytest.fixture(scope="module")
def twins():
    """Twins of three experts of a small BERT classifier (with heads) and a small Llama."""
    out = {}
    for i, name in enumerate(("bert", "llama")):
        _, base_sd, experts = _experts(MAKERS[name], 3, 40 + i, heads=name == "bert")
        out[name] = TwinCheckpoint.build(base_sd, experts, rank_ratio=1.0,
                                         heads=r"^classifier\." if name == "bert" else None)
    return out


@pytest.fixture(scope="module")
def text_router():
    router, report = fit_text_router(_texts(40, 0), n_features=NF, seed=1)
    return router, report


def _accuracy(router, data):
    texts = [t for items in data.values() for t in items]
    tasks = torch.cat([torch.full((len(v),), i) for i, v in enumerate(data.values())])
    return float((router(texts).argmax(-1) == tasks).float().mean())


def test_text_router_separates_sources_by_their_style(text_router):
    router, report = text_router
    assert isinstance(router, TextRouter) and not router.training
    assert report["kind"] == "text" and report["C"] in report["val_accuracy_per_C"]
    assert report["scale"] in __import__("twinmerge_ext.text_router",
                                          fromlist=["SCALES"]).SCALES
    assert report["n_items_per_task"] == {"a": 40, "b": 40, "c": 40}
    assert report["n_train"] + report["n_val"] == 120 and report["n_val"] == 24
    assert report["val_accuracy"] == 1.0
    assert _accuracy(router, _texts(30, 7)) == 1.0   # unseen sentences of the same sources
    w = router.weights(["river stone.", "RIVER STONE.", "@river #stone"])
    assert torch.allclose(w.sum(-1), torch.ones(3)) and w.argmax(-1).tolist() == [0, 1, 2]
    # Only case tells a from b; a router that folds case cannot.
    folded, _ = fit_text_router(_texts(40, 0), n_features=NF, lowercase=True, seed=1)
    assert _accuracy(folded, _texts(30, 7)) < 0.8


def test_the_logits_are_a_linear_model_on_tfidf_of_hashed_ngrams(text_router):
    """Against scikit-learn's pieces written out: hashed character and word counts, sublinear
    tf-idf per block, l2-normalized per block, a linear model."""
    import numpy as np
    from sklearn.feature_extraction.text import HashingVectorizer

    router, _ = text_router
    texts = ["garden letter.", "MUSIC!", "@fox #plan", "  spaced   out\ttext "]
    idf = router.idf.double().numpy()
    blocks = []
    for i, kw in enumerate(({"analyzer": "char", "ngram_range": (1, 4)},
                            {"analyzer": "word", "ngram_range": (1, 2),
                             "token_pattern": r"\S+"})):
        x = HashingVectorizer(lowercase=False, n_features=NF, alternate_sign=False, norm=None,
                              **kw).transform(texts).toarray()
        x[x > 0] = 1 + np.log(x[x > 0])
        x = x * idf[i * NF:(i + 1) * NF]
        blocks.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    expected = np.hstack(blocks) @ router.weight.double().numpy().T + router.bias.double().numpy()
    torch.testing.assert_close(router(texts).double(), torch.from_numpy(expected),
                               rtol=1e-5, atol=1e-5)
    chars = TextRouter(["a", "b"], n_features=NF, word_ngram_range=None)
    assert chars.weight.shape == (2, NF) and chars.config()["word_ngram_range"] is None
    # max_chars: only the first characters are read.
    short = TextRouter(["a", "b"], n_features=NF, max_chars=5)
    assert (short.counts(["abcdefgh"])[0] != short.counts(["abcdeXYZ"])[0]).nnz == 0
    assert (router.counts(["abcdefgh"])[0] != router.counts(["abcdeXYZ"])[0]).nnz > 0


def test_fitting_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    one, _ = fit_text_router(_texts(20, 3), n_features=NF, seed=5)
    two, _ = fit_text_router(_texts(20, 3), n_features=NF, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    for k, v in one.state_dict().items():
        assert torch.equal(v, two.state_dict()[k]), k


def test_config_and_twin_file_round_trip(tmp_path, twins, text_router):
    router, report = text_router
    again = router_from_config(router.config(), router.state_dict())
    assert isinstance(again, TextRouter) and again.config() == router.config()
    texts = ["fox river.", "FOX."]
    assert torch.equal(again(texts), router(texts))
    twin = twins["bert"]
    renamed = TextRouter(twin.tasks, n_features=NF)
    renamed.load_state_dict(router.state_dict())
    path = tmp_path / "twin.safetensors"
    twin.with_router(renamed, info={"val_accuracy": report["val_accuracy"]}).save(path)
    loaded = TwinCheckpoint.load(path)
    assert isinstance(loaded.router, TextRouter)
    assert loaded.router.config() == renamed.config()
    assert torch.equal(loaded.router(texts), renamed(texts))


def _task_router(twin, text):
    """text's weights under the twin's task names."""
    out = TextRouter(twin.tasks, n_features=NF)
    out.load_state_dict(text.state_dict())
    return out.eval()


def test_the_wrapper_routes_by_router_text_without_a_pass_of_the_shared_expert(twins, text_router):
    twin = twins["bert"]
    router = _task_router(twin, text_router[0])
    wrapped = _wrapped("bert", twin, router)
    ids, mask = _batch(B=3)
    texts = ["market light.", "PLAN STONE.", "@music #garden"]
    calls = []
    hook = wrapped.module.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            out = wrapped(input_ids=ids, attention_mask=mask, router_text=texts).logits
    finally:
        hook.remove()
    assert len(calls) == 1   # the served pass only
    w = router.weights(texts)
    assert torch.equal(wrapped.last_call["weights"], w)
    assert torch.equal(wrapped.route(input_ids=ids, router_text=texts), w)
    with torch.no_grad():
        ref = wrapped(input_ids=ids, attention_mask=mask, mix_weights=w).logits
    assert torch.equal(out, ref)
    # routing="self" has no pass to save: the text router routes before it all the same.
    selfish = _wrapped("bert", twin, router, routing="self")
    with torch.no_grad():
        assert torch.equal(selfish(input_ids=ids, attention_mask=mask, router_text=texts).logits,
                           ref)


def test_product_router_multiplies_the_two_routers_probabilities(twins, text_router):
    twin = twins["bert"]
    states = _router(twin, (0, 1))
    text = _task_router(twin, text_router[0])
    product = ProductRouter(states, text, alpha=2.0).eval()
    z = torch.randn(3, states.in_features)
    texts = ["fox.", "FOX.", "@fox"]
    expected = torch.log_softmax(states(z), -1) + 2.0 * torch.log_softmax(text(texts), -1)
    torch.testing.assert_close(product((z, texts)), expected)
    assert product.layer == (0, 1) and product.pooling == ("mean", "cls")
    again = router_from_config(product.config(), product.state_dict())
    assert isinstance(again, ProductRouter) and again.alpha == 2.0
    assert torch.equal(again((z, texts)), product((z, texts)))


def test_product_router_serves_two_pass_and_self_routed(twins, text_router):
    twin = twins["bert"]
    states = _router(twin, (0, 1))
    product = ProductRouter(states, _task_router(twin, text_router[0]), alpha=1.5).eval()
    ids, mask = _batch(B=3)
    texts = ["market light.", "PLAN STONE.", "@music #garden"]
    two = _wrapped("bert", twin, product)
    w = two.route(input_ids=ids, attention_mask=mask, router_text=texts)
    # The router pass is cut short at layer 1; its states are the whole pass's.
    plain = _wrapped("bert", twin, states)
    z = __import__("twinmerge_ext").pooled_features(plain.module, ids, mask, layer=(0, 1),
                                                     pooling=("mean", "cls"))
    torch.testing.assert_close(w, product.weights((z, texts)))
    selfish = _wrapped("bert", twin, product, routing="self")
    with torch.no_grad():
        selfish(input_ids=ids, attention_mask=mask, router_text=texts)
    assert selfish.last_call["self_routed"]
    torch.testing.assert_close(selfish.last_call["weights"], w)


def test_fit_product_alpha_chooses_on_validation(twins, text_router):
    twin = twins["bert"]
    states = _router(twin, 0)
    text = _task_router(twin, text_router[0])
    val = _texts(10, 11)
    texts = [t for v in val.values() for t in v]
    tasks = torch.arange(3).repeat_interleave(10)
    z = torch.randn(30, states.in_features)   # an untrained states router: noise
    product, rep = fit_product_alpha(states, text, z, texts, tasks, alphas=(0.0, 1.0, 4.0))
    assert rep["val_accuracy_per_alpha"][0.0] < 1.0 == rep["val_accuracy_per_alpha"][4.0]
    assert rep["alpha"] in (1.0, 4.0) and product.alpha == rep["alpha"]
    assert rep["val_accuracy"] == max(rep["val_accuracy_per_alpha"].values())


def test_bad_text_routing_input_is_refused_before_anything_runs(twins, text_router):
    router, _ = text_router
    with pytest.raises(TypeError, match=r"TextRouter.forward: texts must be a list of strings"):
        router("one string")
    with pytest.raises(TypeError, match=r"texts must hold strings, got int at row 1"):
        router(["ok", 3])
    with pytest.raises(ValueError, match=r"fit_text_router: texts must hold at least 2 tasks"):
        fit_text_router({"a": ["x", "y"]})
    with pytest.raises(ValueError, match=r"task 'b' has 1 texts"):
        fit_text_router({"a": ["x", "y"], "b": ["z"]})
    with pytest.raises(ValueError, match=r"Cs must be a non-empty list of positive numbers"):
        fit_text_router(_texts(5, 0), Cs=[0.0])
    with pytest.raises(ValueError, match=r"TextRouter: ngram_range must be \(min, max\)"):
        TextRouter(["a", "b"], ngram_range=(3, 1))
    with pytest.raises(ValueError, match=r"TextRouter.from_config: cfg must have exactly"):
        router_from_config({**router.config(), "extra": 1})
    with pytest.raises(ValueError, match=r"TextRouter.features: a TextRouter reads"):
        router.features(None, torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2))

    twin = twins["bert"]
    text = _task_router(twin, router)
    with pytest.raises(TypeError, match=r"ProductRouter: states must be a router on pooled"):
        ProductRouter(text, text)
    with pytest.raises(ValueError, match=r"ProductRouter: alpha must be finite and >= 0"):
        ProductRouter(_router(twin, 0), text, alpha=-1.0)
    with pytest.raises(ValueError, match=r"states and text must route the same tasks"):
        ProductRouter(TwinRouter(64, ["x", "y", "z"], layer=0, pooling=("mean", "cls")), text)

    ids, mask = _batch(B=3)
    wrapped = _wrapped("bert", twin, text)
    with torch.no_grad():
        wrapped(input_ids=ids, attention_mask=mask, mix_weights=torch.eye(3))
    before = wrapped.last_call
    for kwargs, match in (
            ({}, r"TwinMergedModule.route: the router \(TextRouter\) reads each row's text: "
                 r"pass router_text="),
            ({"router_text": ["a", "b"]}, r"router_text has 2 rows but the batch has B=3"),
            ({"router_text": "abc"}, r"router_text must be a list of strings"),
            ({"router_text": ["a"] * 3, "mix_weights": torch.eye(3)},
             r"TwinMergedModule: router_text is given, but the weights are given")):
        with pytest.raises((ValueError, TypeError), match=match), torch.no_grad():
            wrapped(input_ids=ids, attention_mask=mask, **kwargs)
        assert wrapped.last_call is before
    plain = _wrapped("bert", twin, _router(twin, 0))
    with pytest.raises(ValueError, match=r"router_text is given, but the router \(TwinRouter\) "
                                         r"does not read text"), torch.no_grad():
        plain(input_ids=ids, attention_mask=mask, router_text=["a"] * 3)


def test_generate_routes_each_request_by_its_text(twins, text_router):
    twin = twins["llama"]
    router = _task_router(twin, text_router[0])
    wrapped = _wrapped("llama", twin, router)
    ids, mask = _batch(B=3)
    texts = ["market light.", "PLAN STONE.", "@music #garden"]
    kw = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    out = wrapped.generate(ids, router_text=texts, **kw)
    assert torch.equal(wrapped.last_call["weights"], router.weights(texts))
    assert "route_s" in wrapped.last_call
    assert torch.equal(out, wrapped.generate(ids, mix_weights=router.weights(texts), **kw))
    with pytest.raises(ValueError, match=r"reads each row's text: pass router_text="):
        wrapped.generate(ids, **kw)
    with pytest.raises(ValueError, match=r"generate: router_text is given, but the weights are "
                                         r"given \(mix_weights\)"):
        wrapped.generate(ids, router_text=texts, mix_weights=torch.eye(3), **kw)


def test_two_tasks_get_both_logits():
    """scikit-learn keeps one row of coefficients for two classes; the router has two."""
    data = {k: v for k, v in _texts(40, 0).items() if k != "c"}
    router, report = fit_text_router(data, n_features=NF, seed=1)
    assert report["val_accuracy"] == 1.0 and report["val_accuracy_per_task"] == {"a": 1.0,
                                                                                   "b": 1.0}
    w = router.weights(["river stone.", "RIVER STONE."])
    assert w.argmax(-1).tolist() == [0, 1] and (w.max(-1).values > 0.5).all()
    torch.testing.assert_close(router.weight[0], -router.weight[1])


def test_serve_loop_routes_each_request_by_its_text(twins, text_router):
    from twinmerge_ext import ServeLoop

    twin = twins["llama"]
    router = _task_router(twin, text_router[0])
    wrapped = _wrapped("llama", twin, router)
    loop = ServeLoop(wrapped, eos_token_id=None)
    ids, _ = _batch(B=3)
    rid = loop.add(ids[1], 2, router_text="PLAN STONE.")
    assert torch.equal(loop._waiting[-1].weights, router.weights(["PLAN STONE."])[0])
    with pytest.raises(ValueError, match=r"reads each row's text: pass router_text="):
        loop.add(ids[1], 2)
    with pytest.raises(TypeError, match=r"ServeLoop.add: router_text must be a str"):
        loop.add(ids[1], 2, router_text=["PLAN STONE."])
    assert [r.id for r in loop._waiting] == [rid]


def test_idf_and_weights_are_scikit_learns_fitted_on_every_text():
    """After choosing C and the scale, the router is refitted on all the texts: its idf is
    TfidfTransformer's per block and its weights are the scale times LinearSVC's."""
    import numpy as np
    from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
    from sklearn.svm import LinearSVC

    data = _texts(30, 2)
    router, report = fit_text_router(data, n_features=NF, seed=3)
    texts = [t for v in data.values() for t in v]
    labels = np.repeat(np.arange(3), 30)
    blocks = []
    for i, kw in enumerate(({"analyzer": "char", "ngram_range": (1, 4)},
                            {"analyzer": "word", "ngram_range": (1, 2),
                             "token_pattern": r"\S+"})):
        counts = HashingVectorizer(lowercase=False, n_features=NF, alternate_sign=False,
                                   norm=None, **kw).transform(texts)
        tf = TfidfTransformer(sublinear_tf=True).fit(counts)
        torch.testing.assert_close(router.idf[i * NF:(i + 1) * NF].double(),
                                   torch.from_numpy(tf.idf_), rtol=1e-6, atol=1e-6)
        blocks.append(tf.transform(counts))
    svm = LinearSVC(C=report["C"], max_iter=2000, random_state=3).fit(
        __import__("scipy.sparse", fromlist=["hstack"]).hstack(blocks).tocsr(), labels)
    # The router saw its items in another order (held-out ones last): liblinear's coordinate
    # descent then stops at a slightly different point.
    for got, want in ((router.weight, svm.coef_), (router.bias, svm.intercept_)):
        want = torch.from_numpy(report["scale"] * want)
        torch.testing.assert_close(got.double(), want, rtol=0,
                                   atol=1e-3 * float(want.abs().max()))


def test_a_product_router_travels_in_the_twin_file(tmp_path, twins, text_router):
    twin = twins["bert"]
    product = ProductRouter(_router(twin, (0, 1)), _task_router(twin, text_router[0]), 2.0)
    path = tmp_path / "twin.safetensors"
    twin.with_router(product).save(path)
    loaded = TwinCheckpoint.load(path).router
    assert isinstance(loaded, ProductRouter) and loaded.config() == product.config()
    assert set(loaded.state_dict()) == set(product.state_dict())
    z, texts = torch.randn(2, product.in_features), ["fox.", "FOX."]
    assert torch.equal(loaded((z, texts)), product.eval()((z, texts)))


def test_more_misuse_is_refused(twins, text_router):
    router, _ = text_router
    # A held-out share that would leave a task nothing to train on keeps one training text.
    small, rep = fit_text_router({"a": ["x y", "x z"], "b": ["Q R", "Q S"]}, n_features=NF,
                                 val_fraction=0.9)
    assert rep["n_train"] == 2 and rep["n_val"] == 2
    twin = twins["bert"]
    states, text = _router(twin, 0), _task_router(twin, router)
    tasks = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"fit_product_alpha: val_states must be a tensor "
                                         r"\[N=2, d\] \(one row per text\), got \[1, 64\]"):
        fit_product_alpha(states, text, torch.randn(1, 64), ["a", "b"], tasks)
    with pytest.raises(ValueError, match=r"fit_product_alpha: alphas must be finite, got nan"):
        fit_product_alpha(states, text, torch.randn(2, 64), ["a", "b"], tasks,
                          alphas=(1.0, float("nan")))
    with pytest.raises(ValueError, match=r"alphas must be a non-empty list of finite numbers "
                                         r">= 0, got \[1.0, -2.0\]"):
        fit_product_alpha(states, text, torch.randn(2, 64), ["a", "b"], tasks, alphas=(1, -2))
    states.train()
    before = {k: v.clone() for k, v in states.state_dict().items()}
    fit_product_alpha(states, text, torch.randn(2, 64), ["a", "b"], tasks)
    assert states.training and all(torch.equal(v, before[k])
                                   for k, v in states.state_dict().items())  # no BN update
    with pytest.raises(TypeError, match=r"TextRouter.from_config: cfg must be a mapping"):
        TextRouter.from_config(["text"])
    from twinmerge_ext import ServeLoop
    loop = ServeLoop(_wrapped("llama", twins["llama"], _task_router(twins["llama"], router)),
                     eos_token_id=None)
    with pytest.raises(ValueError, match=r"ServeLoop.add: router_text is given, but the weights "
                                         r"are given \(mix_weights\)"):
        loop.add(torch.tensor([1, 2]), 2, mix_weights=torch.ones(3) / 3, router_text="fox")
    assert not loop._waiting
    ids, mask = _batch(B=3)
    wrapped = _wrapped("bert", twin, text, router_features=lambda m, a, k: torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"router_features= is given, but the router "
                                         r"\(TextRouter\) reads router_text"), torch.no_grad():
        wrapped(input_ids=ids, attention_mask=mask, router_text=["a", "b", "c"])
