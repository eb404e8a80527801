"""TwinMergedModule.generate and the drop-in wrapper: every request's tokens equal those of a
plain model loaded with twin.merged_state_dict(w_b), for every decoding strategy and mode."""

import threading

import pytest
import torch
import torch.nn.functional as F

from twinmerge_ext import LoraExpert, TwinCheckpoint, TwinMergedModule, TwinRouter

from test_module import VOCAB, _llama

transformers = pytest.importorskip("transformers")

NEW = 6
STRATEGIES = {
    "greedy": dict(do_sample=False),
    "beam": dict(num_beams=3, do_sample=False),
    "beam_sequences": dict(num_beams=3, num_return_sequences=2, do_sample=False),
}


def _prompts(B=3, L=6, seed=0):
    """A mixed batch with left padding (rows 1 and 2 shorter)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for b in range(1, B):
        mask[b, :b] = 0
        ids[b, :b] = 0
    return ids, mask


def _mixed(B=3, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.softmax(3 * torch.randn(B, T, generator=g), -1)
    w[0] = F.one_hot(torch.tensor(B % T), T).float()  # one request on an expert alone
    return w


def _pad(t, width):
    return F.pad(t, (0, width - t.shape[1]), value=0)


def _reference(make, twin, w, ids, mask, seed=None, **kw):
    """Request b's sequences from a plain model θ(w_b) run on the same batch."""
    outs = []
    for b in range(w.shape[0]):
        model = make()
        model.load_state_dict(twin.merged_state_dict(w[b]))
        if seed is not None:
            torch.manual_seed(seed)
        outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0,
                                   **kw))
    r = outs[0].shape[0] // w.shape[0]
    width = max(o.shape[1] for o in outs)
    return torch.cat([_pad(o[b * r:(b + 1) * r], width) for b, o in enumerate(outs)])


def _same_tokens(got, want):
    width = max(got.shape[1], want.shape[1])
    assert got.shape[0] == want.shape[0]
    assert torch.equal(_pad(got, width), _pad(want, width)), (got, want)


@pytest.mark.parametrize("mode", ["factored", "materialize", "auto"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_every_request_gets_its_models_tokens(lm_twins, model, strategy, mode):
    make, twin = lm_twins[model]
    wrapped = TwinMergedModule(make(), twin, mode=mode)
    ids, mask = _prompts()
    w = _mixed()
    kw = STRATEGIES[strategy]
    got = wrapped.generate(ids, attention_mask=mask, mix_weights=w, max_new_tokens=NEW,
                           pad_token_id=0, **kw)
    _same_tokens(got, _reference(make, twin, w, ids, mask, **kw))
    last = wrapped.last_call
    assert last["mode"] in ("factored", "materialize")
    k = kw.get("num_beams", 1)
    assert last["rows_per_request"] == k
    assert last["prefill_tokens"] == 3 * k * ids.shape[1]
    assert last["decode_tokens"] == 3 * k * NEW


def test_sampling_draws_what_each_requests_model_draws(lm_twins):
    make, twin = lm_twins["llama"]
    wrapped = TwinMergedModule(make(), twin, mode="factored")
    ids, mask = _prompts()
    w = _mixed(seed=1)
    kw = dict(do_sample=True, top_k=0, temperature=1.5, num_return_sequences=2)
    torch.manual_seed(7)
    got = wrapped.generate(ids, attention_mask=mask, mix_weights=w, max_new_tokens=NEW,
                           pad_token_id=0, **kw)
    assert got.shape[0] == 6
    _same_tokens(got, _reference(make, twin, w, ids, mask, seed=7, **kw))


def test_lora_experts_generate_exactly(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _llama()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    experts = {}
    for t, r in enumerate((2, 4, 3)):
        model = peft.get_peft_model(_llama(), peft.LoraConfig(
            r=r, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        model.base_model.model.load_state_dict(base_sd, strict=False)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.3)
        model.save_pretrained(tmp_path / f"t{t}")
        experts[f"t{t}"] = LoraExpert(tmp_path / f"t{t}")
    twin = TwinCheckpoint.build(base_sd, experts)
    wrapped = TwinMergedModule(_llama(), twin, mode="factored")
    ids, mask = _prompts()
    w = _mixed(seed=2)
    for kw in (STRATEGIES["greedy"], STRATEGIES["beam"]):
        got = wrapped.generate(ids, attention_mask=mask, mix_weights=w, max_new_tokens=NEW,
                               pad_token_id=0, **kw)
        _same_tokens(got, _reference(_llama, twin, w, ids, mask, **kw))


def test_static_cache_and_dynamic_cache_agree(lm_twins):
    make, twin = lm_twins["llama"]
    wrapped = TwinMergedModule(make(), twin, mode="factored")
    ids, mask = _prompts()
    w = _mixed()
    dynamic = wrapped.generate(ids, attention_mask=mask, mix_weights=w, max_new_tokens=NEW,
                               pad_token_id=0, do_sample=False)
    static = wrapped.generate(ids, attention_mask=mask, mix_weights=w, max_new_tokens=NEW,
                              pad_token_id=0, do_sample=False, cache_implementation="static")
    _same_tokens(static, dynamic)
    _same_tokens(static, _reference(make, twin, w, ids, mask, do_sample=False))


def test_num_beams_from_a_generation_config(lm_twins):
    make, twin = lm_twins["gpt2"]
    wrapped = TwinMergedModule(make(), twin, mode="factored")
    ids, mask = _prompts()
    w = _mixed()
    config = transformers.GenerationConfig(num_beams=2, num_return_sequences=2, do_sample=False,
                                           max_new_tokens=NEW, pad_token_id=0)
    got = wrapped.generate(ids, attention_mask=mask, mix_weights=w, generation_config=config)
    assert wrapped.last_call["rows_per_request"] == 2
    _same_tokens(got, _reference(make, twin, w, ids, mask, num_beams=2, num_return_sequences=2,
                                 do_sample=False))


def test_streamer_stopping_criteria_and_dict_outputs_keep_working(lm_twins):
    make, twin = lm_twins["gpt2"]
    wrapped = TwinMergedModule(make(), twin, mode="factored")
    ids, mask = _prompts(B=1)
    w = _mixed(B=1)

    class Collect(transformers.generation.BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.flatten())

        def end(self):
            self.chunks.append(None)

    class StopAfter(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + 3,
                              dtype=torch.bool)

    streamer = Collect()
    out = wrapped.generate(ids, attention_mask=mask, mix_weights=w, max_new_tokens=NEW,
                           pad_token_id=0, streamer=streamer, return_dict_in_generate=True,
                           output_scores=True,
                           stopping_criteria=transformers.StoppingCriteriaList([StopAfter()]))
    seq = out.sequences
    assert seq.shape[1] <= ids.shape[1] + 3 and len(out.scores) == seq.shape[1] - ids.shape[1]
    assert streamer.chunks[-1] is None
    assert torch.equal(torch.cat(streamer.chunks[:-1]), seq[0])
    _same_tokens(seq, _reference(make, twin, w, ids, mask, do_sample=False,
                                 stopping_criteria=transformers.StoppingCriteriaList(
                                     [StopAfter()])))


def test_router_runs_once_on_the_prompt(lm_twins):
    make, twin = lm_twins["gpt2"]
    torch.manual_seed(3)
    router = TwinRouter(32, twin.tasks).eval()
    wrapped = TwinMergedModule(make(), twin, router=router, mode="factored")
    ids, mask = _prompts()
    calls = []
    route = wrapped.route
    wrapped.route = lambda *a, **k: calls.append(a) or route(*a, **k)
    got = wrapped.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0)
    assert len(calls) == 1
    last = wrapped.last_call
    assert last["route_s"] > 0 and last["generate_s"] > 0
    w = route(ids, attention_mask=mask)
    torch.testing.assert_close(last["weights"], w)
    assert not torch.equal(w[0], w[1])  # the requests really are routed apart
    _same_tokens(got, wrapped.generate(ids, attention_mask=mask, mix_weights=w,
                                       max_new_tokens=NEW, pad_token_id=0))


def test_one_weight_vector_and_a_merged_block(lm_twins):
    make, twin = lm_twins["llama"]
    wrapped = TwinMergedModule(make(), twin)
    ids, mask = _prompts()
    w = torch.tensor([0.2, 0.5, 0.3])
    want = _reference(make, twin, w.expand(3, 3), ids, mask, do_sample=False)
    got = wrapped.generate(ids, attention_mask=mask, mix_weights=w, max_new_tokens=NEW,
                           pad_token_id=0)
    _same_tokens(got, want)
    got = wrapped.generate(inputs=ids, attention_mask=mask, mix_weights=w, max_new_tokens=NEW,
                           pad_token_id=0)  # transformers' name for the prompt
    _same_tokens(got, want)
    with wrapped.merged(w):
        got = wrapped.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0)
        assert wrapped.last_call["merged_block"]
    _same_tokens(got, want)


def test_group_mode_generates_per_group(lm_twins):
    make, twin = lm_twins["gpt2"]
    wrapped = TwinMergedModule(make(), twin, mode="group", n_groups=3)
    ids, mask = _prompts()
    w = _mixed()
    got = wrapped.generate(ids, attention_mask=mask, mix_weights=w, max_new_tokens=NEW,
                           pad_token_id=0)
    assert wrapped.last_call["groups"].tolist() == [0, 1, 2] or \
        len(set(wrapped.last_call["groups"].tolist())) == 3
    _same_tokens(got, _reference(make, twin, w, ids, mask, do_sample=False))


def test_threads_generate_with_their_own_weights(lm_twins):
    make, twin = lm_twins["llama"]
    wrapped = TwinMergedModule(make(), twin, mode="factored")
    ids, mask = _prompts()
    ws = [_mixed(seed=s) for s in range(4)]
    want = [wrapped.generate(ids, attention_mask=mask, mix_weights=w, max_new_tokens=NEW,
                             pad_token_id=0) for w in ws]
    got = [None] * len(ws)
    start = threading.Barrier(len(ws))

    def work(i):
        start.wait()
        for _ in range(3):
            got[i] = wrapped.generate(ids, attention_mask=mask, mix_weights=ws[i],
                                      max_new_tokens=NEW, pad_token_id=0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(ws))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        _same_tokens(g, w)


def test_drop_in_attributes_fall_through(lm_twins):
    make, twin = lm_twins["gpt2"]
    model = make()
    wrapped = TwinMergedModule(model, twin)
    assert wrapped.config is model.config
    assert wrapped.generation_config is model.generation_config
    assert wrapped.device == model.device and wrapped.dtype == model.dtype
    assert wrapped.can_generate()
    assert wrapped.get_input_embeddings() is model.get_input_embeddings()
    # The wrapper's own names win.
    assert wrapped.mode == "auto" and wrapped.tasks == twin.tasks
    assert wrapped.forward.__func__ is TwinMergedModule.forward
    with pytest.raises(AttributeError, match="no_such_attribute"):
        wrapped.no_such_attribute
    assert not hasattr(wrapped, "__no_such_dunder__")


def test_bad_generate_calls_raise_before_anything_runs(lm_twins):
    make, twin = lm_twins["gpt2"]
    wrapped = TwinMergedModule(make(), twin, mode="materialize")
    ids, mask = _prompts()
    w = _mixed()
    with pytest.raises(ValueError, match=r"generate: input_ids must be an integer tensor"):
        wrapped.generate(ids.float(), mix_weights=w)
    with pytest.raises(ValueError, match=r"generate: attention_mask must be a tensor of "
                                         r"input_ids' shape"):
        wrapped.generate(ids, attention_mask=mask[:, 1:], mix_weights=w)
    with pytest.raises(ValueError, match=r"mix_weights has 2 rows but the batch has B=3"):
        wrapped.generate(ids, attention_mask=mask, mix_weights=w[:2])
    with pytest.raises(ValueError, match=r"NaN/Inf"):
        wrapped.generate(ids, attention_mask=mask, mix_weights=torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match=r"no router"):
        wrapped.generate(ids, attention_mask=mask)
    with pytest.raises(TypeError, match=r"unexpected argument 'mode'"):
        wrapped.generate(ids, attention_mask=mask, mix_weights=w, mode="factored")
    with pytest.raises(ValueError, match=r"return_dict_in_generate=True needs one generate for "
                                         r"the whole batch, but mode 'materialize' runs one per "
                                         r"distinct weight row"):
        wrapped.generate(ids, attention_mask=mask, mix_weights=w, max_new_tokens=NEW,
                         pad_token_id=0, return_dict_in_generate=True)
    assert wrapped._ctx.rows is None and wrapped._ctx.overrides is None
    with pytest.raises(TypeError, match=r"the wrapped module \(Linear\) has no generate"):
        TwinMergedModule(torch.nn.Linear(2, 2), TwinCheckpoint.build(
            torch.nn.Linear(2, 2).state_dict(), {"a": torch.nn.Linear(2, 2).state_dict()})
        ).generate(ids, mix_weights=torch.ones(1))


def test_a_kv_cache_is_never_split_into_sub_batches(lm_twins):
    make, twin = lm_twins["gpt2"]
    wrapped = TwinMergedModule(make(), twin, mode="materialize")
    ids, mask = _prompts()
    w = _mixed()
    cache = transformers.DynamicCache()
    with torch.no_grad(), pytest.raises(ValueError, match=r"passes a KV cache \(DynamicCache\)"):
        wrapped(input_ids=ids, attention_mask=mask, mix_weights=w, past_key_values=cache)
    wrapped.mode = "auto"
    with torch.no_grad():
        wrapped(input_ids=ids, attention_mask=mask, mix_weights=w, past_key_values=cache)
    assert wrapped.last_call["mode"] == "factored"


def _allow_own_tokens(batch_id, ids):
    """Request b may only produce tokens 10 + b, 20 + b and 30 + b: a per-row constraint."""
    return [10 + batch_id, 20 + batch_id, 30 + batch_id]


@pytest.mark.parametrize("option", ["streamer", "return_dict_in_generate",
                                    "prefix_allowed_tokens_fn", "cache"])
def test_options_that_see_the_whole_batch_keep_one_generate(lm_twins, option):
    """auto serves them factored even where it would merge per row; materialize refuses."""
    make, twin = lm_twins["gpt2"]
    ids, mask = _prompts()
    w = _mixed()
    wrapped = TwinMergedModule(make(), twin, mode="factored")

    def options():
        kw = dict(max_new_tokens=24, pad_token_id=0, do_sample=False)  # long: auto would merge
        if option == "streamer":
            kw["streamer"] = transformers.generation.BaseStreamer()
            kw["streamer"].put = kw["streamer"].end = lambda *a: None
        elif option == "return_dict_in_generate":
            kw["return_dict_in_generate"] = True
        elif option == "prefix_allowed_tokens_fn":
            kw["prefix_allowed_tokens_fn"] = _allow_own_tokens
        else:  # the prompt's first tokens already in a cache, each row with its weights
            with torch.no_grad():
                kw["past_key_values"] = wrapped(input_ids=ids[:, :3], attention_mask=mask[:, :3],
                                                mix_weights=w, use_cache=True).past_key_values
        return kw

    kw = options()
    wrapped.mode = "materialize"
    with pytest.raises(ValueError, match=r"needs one generate for the whole batch, but mode "
                                         r"'materialize' runs one per distinct weight row"):
        wrapped.generate(ids, attention_mask=mask, mix_weights=w, **kw)
    wrapped.mode = "factored"
    kw = options()
    wrapped.mode = "auto"
    out = wrapped.generate(ids, attention_mask=mask, mix_weights=w, **kw)
    assert wrapped.last_call["mode"] == "factored" and wrapped.last_call["whole_batch"]
    if option == "prefix_allowed_tokens_fn":  # each request kept its own constraint
        new = out[:, ids.shape[1]:]
        assert all(set(new[b].tolist()) <= {0, 10 + b, 20 + b, 30 + b} for b in range(3)), new


def test_a_call_inside_generate_is_its_own_and_leaves_generate_alone(lm_twins):
    """A logits processor that calls the wrapper (with its own weights, on its own rows) during a
    factored generate gets what the same call gets outside, and generate's tokens are unchanged."""
    make, twin = lm_twins["llama"]
    wrapped = TwinMergedModule(make(), twin, mode="factored")
    ids, mask = _prompts()
    w = _mixed()
    probe_ids = torch.randint(1, VOCAB, (6, 4), generator=torch.Generator().manual_seed(9))
    probe_w = _mixed(B=6, seed=4)
    with torch.no_grad():
        want = wrapped(input_ids=probe_ids, mix_weights=probe_w, use_cache=False).logits
    seen = []

    class Probe(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            with torch.no_grad():
                seen.append(wrapped(input_ids=probe_ids, mix_weights=probe_w,
                                    use_cache=False).logits)
            return scores

    got = wrapped.generate(ids, attention_mask=mask, mix_weights=w, max_new_tokens=NEW,
                           pad_token_id=0, do_sample=False,
                           logits_processor=transformers.LogitsProcessorList([Probe()]))
    assert len(seen) == NEW and all(torch.equal(s, want) for s in seen)
    _same_tokens(got, _reference(make, twin, w, ids, mask, do_sample=False))
