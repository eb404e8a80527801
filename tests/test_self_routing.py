"""Routing from the first layers: the router pass cut short, and self-routing (one pass).

`route()` with a router on hidden states before the last layer runs θs only up to the last
state it reads: the same weights, bit for bit, as the whole pass. `routing="self"` serves the
model with the embeddings and the layers before the router's last state on θs and the rest on
θ(w_b), w_b computed inside the pass: checked row by row against plain models loaded that way.
"""

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
import transformers

from twinmerge_ext import EnergyRouter, TwinCheckpoint, TwinMergedModule, TwinRouter
from twinmerge_ext._prefix import _Hook, layer_stack
from twinmerge_ext.prototype_router import PrototypeRouter
from twinmerge_ext.router import pooled_features

from test_module import NUM_LABELS, VOCAB, _close, _experts

LAYERS = 3


def _bert(num_labels=3):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, intermediate_size=48,
                                  max_position_embeddings=32, num_labels=num_labels)
    return transformers.BertForSequenceClassification(cfg).eval()


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=48, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4,
                                  n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


MAKERS = {"bert": _bert, "llama": _llama, "gpt2": _gpt2}
# The tensors before layer k of the stack: they serve θs in a self-routed pass.
PREFIX = {"bert": ("bert.embeddings.", "bert.encoder.layer.{i}."),
          "llama": ("model.embed_tokens.", "model.layers.{i}.")}


@pytest.fixture(scope="module")
def twins():
    out = {}
    for i, (name, make) in enumerate(MAKERS.items()):
        _, base_sd, experts = _experts(make, 3, 20 + i, heads=name == "bert")
        out[name] = TwinCheckpoint.build(base_sd, experts, rank_ratio=1.0,
                                         heads=r"^classifier\." if name == "bert" else None)
    return out


def _router(twin, layer, seed=0):
    torch.manual_seed(seed)
    n = len(layer) if isinstance(layer, tuple) else 1
    return TwinRouter(32 * n * 2, twin.tasks, layer=layer, pooling=("mean", "cls")).eval()


def _batch(B=5, L=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, L), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0   # left padding
    mask[2, 5:] = 0   # right padding
    return ids, mask


def _wrapped(name, twin, router, **kw):
    torch.manual_seed(0)
    return TwinMergedModule(MAKERS[name](), twin, router=router, mode="factored", **kw)


def _reference(name, twin, ids, mask, rw, k, head_tasks=None):
    """Row by row: a plain model with θ(w_b) everywhere but the embeddings and layers < k,
    which hold θs."""
    before = PREFIX[name]
    prefix = (before[0],) + tuple(before[1].format(i=i) for i in range(k))
    outs = []
    for b in range(rw.shape[0]):
        h = None
        if name == "bert":
            h = int(rw[b].argmax()) if head_tasks is None else int(head_tasks[b])
            m = _bert(NUM_LABELS[h])
            kw = {"head": h}
        else:
            m, kw = MAKERS[name](), {}
        merged = twin.merged_state_dict(rw[b], **kw)
        shared = twin.merged_state_dict(torch.zeros_like(rw[b]), **kw)
        m.load_state_dict({n: shared[n] if n.startswith(prefix) else v for n, v in merged.items()})
        with torch.no_grad():
            y = m(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits
        if name == "bert":
            y = F.pad(y, (0, max(NUM_LABELS) - y.shape[-1]), value=float("-inf"))
        outs.append(y)
    return torch.cat(outs)


# --- the stack --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,stack", [("bert", "bert.encoder.layer"), ("llama", "model.layers"),
                                        ("gpt2", "transformer.h")])
def test_layer_stack_of_transformers_models(name, stack):
    found = layer_stack(MAKERS[name]())
    assert found is not None and found[0] == stack and len(found[1]) == LAYERS


def test_no_stack_without_transformers_layers():
    assert layer_stack(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None


# --- the router pass cut short ------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("layer", [0, (0, 1), (0, 2), -2, (0, LAYERS)])
def test_route_cut_short_equals_the_whole_pass(twins, name, layer):
    twin = twins[name]
    router = _router(twin, layer)
    wrapped = _wrapped(name, twin, router)
    ids, mask = _batch()
    whole = router.weights(pooled_features(wrapped.module, ids, mask, layer=layer,
                                           pooling=("mean", "cls")))
    assert torch.equal(wrapped.route(input_ids=ids, attention_mask=mask), whole)


def test_route_cut_short_stops_at_the_last_layer_read(twins):
    twin = twins["bert"]
    wrapped = _wrapped("bert", twin, _router(twin, (0, 1)))
    ran = []
    for i, layer in enumerate(wrapped.module.bert.encoder.layer):
        layer.register_forward_hook(lambda *a, i=i: ran.append(i))
    wrapped.route(*_batch())  # the first call checks the stack once, in a whole pass of one row
    assert ran == list(range(LAYERS)) + [0]
    ran.clear()
    wrapped.route(*_batch())
    assert ran == [0]  # layer 1's input is hidden state 1: layer 1 itself never runs
    ran.clear()
    wrapped.router = _router(twin, LAYERS)  # the last layer's output: the whole pass
    wrapped.route(*_batch())
    assert ran == list(range(LAYERS))


# --- self-routing -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert", "llama"])
@pytest.mark.parametrize("layer,k", [(0, 0), ((0, 1), 1), ((1, 2), 2)])
def test_self_routing_serves_prefix_on_shared_and_the_rest_mixed(twins, name, layer, k):
    twin = twins[name]
    router = _router(twin, layer)
    wrapped = _wrapped(name, twin, router, routing="self")
    ids, mask = _batch()
    w = wrapped.route(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        out = wrapped(input_ids=ids, attention_mask=mask).logits
    last = wrapped.last_call
    assert last["self_routed"] and last["routed_at_layer"] == k and last["mode"] == "factored"
    assert torch.equal(last["weights"], w)
    _close(out, _reference(name, twin, ids, mask, w, k))


def test_self_routing_with_explicit_head_tasks(twins):
    twin = twins["bert"]
    wrapped = _wrapped("bert", twin, _router(twin, (0, 1)), routing="self")
    ids, mask = _batch()
    heads = torch.tensor([2, 0, 1, 1, 0])
    w = wrapped.route(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        out = wrapped(input_ids=ids, attention_mask=mask, head_tasks=heads).logits
    assert torch.equal(wrapped.last_call["head_tasks"], heads)
    _close(out, _reference("bert", twin, ids, mask, w, 1, head_tasks=heads))


def test_given_weights_and_merged_blocks_ignore_self_routing(twins):
    twin = twins["llama"]
    ids, mask = _batch()
    two = _wrapped("llama", twin, _router(twin, (0, 1)))
    one = _wrapped("llama", twin, _router(twin, (0, 1)), routing="self")
    w = torch.softmax(torch.randn(5, 3), -1)
    with torch.no_grad():
        assert torch.equal(one(input_ids=ids, attention_mask=mask, mix_weights=w).logits,
                           two(input_ids=ids, attention_mask=mask, mix_weights=w).logits)
        with one.merged(w[0]), two.merged(w[0]):
            assert torch.equal(one(input_ids=ids, attention_mask=mask).logits,
                               two(input_ids=ids, attention_mask=mask).logits)
    assert "self_routed" not in one.last_call


def test_self_routing_in_threads_equals_one_by_one(twins):
    twin = twins["llama"]
    wrapped = _wrapped("llama", twin, _router(twin, (0, 1)), routing="self")
    batches = [_batch(B=3 + i, seed=i) for i in range(4)]
    with torch.no_grad():
        alone = [wrapped(input_ids=i, attention_mask=m).logits for i, m in batches]
    got, errors = [None] * 4, []

    def serve(j):
        try:
            with torch.no_grad():
                for _ in range(3):
                    got[j] = wrapped(input_ids=batches[j][0], attention_mask=batches[j][1]).logits
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=serve, args=(j,)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for a, b in zip(got, alone):
        assert torch.equal(a, b)


def test_copies_route_with_their_own_state_and_unwrap_removes_the_hooks(twins):
    twin = twins["llama"]
    wrapped = _wrapped("llama", twin, _router(twin, (0, 1)), routing="self")
    ids, mask = _batch()
    copied = copy.deepcopy(wrapped)
    with torch.no_grad():
        a = wrapped(input_ids=ids, attention_mask=mask).logits
        b = copied(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b) and copied.last_call["self_routed"]
    module = wrapped.unwrap()
    assert not any(isinstance(h, _Hook) for layer in module.model.layers
                   for h in layer._forward_pre_hooks.values())
    with torch.no_grad():
        assert torch.equal(copied(input_ids=ids, attention_mask=mask).logits, b)


# --- refused ------------------------------------------------------------------------------------

def test_bad_routing_values_are_refused(twins):
    twin = twins["llama"]
    with pytest.raises(ValueError, match="routing must be one of"):
        _wrapped("llama", twin, None, routing="one_pass")
    seq = torch.nn.Sequential(torch.nn.Linear(4, 4))
    seq_twin = TwinCheckpoint.build(seq.state_dict(), {"a": seq.state_dict(),
                                                       "b": seq.state_dict()}, rank=1)
    with pytest.raises(ValueError, match="routing='self' needs the module's stack"):
        TwinMergedModule(seq, seq_twin, routing="self")


@pytest.mark.parametrize("case,match", [
    ("last_layer", "reads hidden state 3"),
    ("energy", "EnergyRouter does not read pooled hidden states"),
    ("router_features", "router_features= replaces"),
    ("no_router", "there is no router"),
    ("materialize", "mode is 'materialize'"),
    ("mask", "attention_mask must be a tensor of input_ids' shape"),
    ("empty_row", r"attention_mask rows \[1\] have no non-padding token"),
    ("float_ids", r"input_ids must be a 2-D integer tensor \[B, L\], got \[5, 7\] torch.float32"),
])
def test_self_routing_refuses_what_it_cannot_do(twins, case, match):
    twin = twins["llama"]
    wrapped = _wrapped("llama", twin, _router(twin, (0, 1)), routing="self")
    ids, mask = _batch()
    if case == "last_layer":
        wrapped.router = _router(twin, (0, LAYERS))
    elif case == "energy":
        wrapped.router = EnergyRouter(twin.tasks, ["model.layers.0.mlp.up_proj"])
    elif case == "router_features":
        wrapped.router_features = lambda m, a, k: torch.zeros(5, 128)
    elif case == "no_router":
        wrapped.router = None
    elif case == "materialize":
        wrapped.mode = "materialize"
    elif case == "mask":
        mask = mask[:, :4]
    elif case == "float_ids":
        ids = ids.float()
    elif case == "empty_row":
        mask = mask.clone()
        mask[1] = 0
    before = {k: v.clone() for k, v in wrapped.module.state_dict().items()}
    with pytest.raises(ValueError, match=match) as err:
        wrapped(input_ids=ids, attention_mask=mask)
    assert str(err.value).startswith("TwinMergedModule:")
    for k, v in wrapped.module.state_dict().items():
        assert torch.equal(v, before[k])
    wrapped.router, wrapped.router_features, wrapped.mode = _router(twin, (0, 1)), None, "factored"
    with torch.no_grad():  # the wrapper serves again after a refused call
        wrapped(*_batch())
    assert wrapped.last_call["self_routed"]


def test_prototype_routers_self_route(twins):
    twin = twins["llama"]
    router = PrototypeRouter(32, twin.tasks, prototypes=1, layer=1, pooling="mean")
    router.set_centres(torch.randn(3, 1, 32))
    router.eval()
    wrapped = _wrapped("llama", twin, router, routing="self")
    ids, mask = _batch()
    w = wrapped.route(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        out = wrapped(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(wrapped.last_call["weights"], w)
    _close(out, _reference("llama", twin, ids, mask, w, 1))


def test_a_cut_short_route_checks_its_inputs(twins):
    twin = twins["bert"]
    wrapped = _wrapped("bert", twin, _router(twin, (0, 1)))
    ids, mask = _batch()
    with pytest.raises(ValueError, match=r"TwinMergedModule.route: attention_mask must be"):
        wrapped.route(input_ids=ids, attention_mask=mask[:, :3])
    with pytest.raises(ValueError, match=r"TwinMergedModule.route: input_ids must be a 2-D"):
        wrapped.route(input_ids=ids[0], attention_mask=mask[0])


def _mamba():
    cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS,
                                   state_size=4, expand=2, conv_kernel=3, pad_token_id=0)
    return transformers.MambaModel(cfg).eval()


def test_a_model_whose_hidden_states_are_layer_outputs_gets_the_whole_pass():
    # Mamba records each layer's output as hidden_states[i] (no embeddings entry): the inputs of
    # its layers are not what a router on hidden states was fitted on.
    _, base_sd, experts = _experts(_mamba, 3, 30)
    twin = TwinCheckpoint.build(base_sd, experts, rank_ratio=1.0)
    router = TwinRouter(32 * 2, twin.tasks, layer=(0, 1), pooling="mean").eval()
    torch.manual_seed(0)
    wrapped = TwinMergedModule(_mamba(), twin, router=router, mode="factored", routing="self")
    ids = torch.randint(1, VOCAB, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    whole = router.weights(pooled_features(wrapped.module, ids, mask, layer=(0, 1)))
    assert torch.equal(wrapped.route(input_ids=ids, attention_mask=mask), whole)
    with pytest.raises(ValueError, match="hidden_states are not those inputs"):
        wrapped(input_ids=ids, attention_mask=mask)


def test_a_positional_mask_is_the_mask_the_router_pools_with(twins):
    twin = twins["bert"]
    wrapped = _wrapped("bert", twin, _router(twin, (0, 1)), routing="self")
    ids, mask = _batch()
    w = wrapped.route(input_ids=ids, attention_mask=mask)
    assert torch.equal(wrapped.route(ids, mask), w)
    with torch.no_grad():
        wrapped(ids, mask)
    assert torch.equal(wrapped.last_call["weights"], w)


def test_self_routing_refuses_a_module_in_training_mode(twins):
    twin = twins["bert"]
    wrapped = _wrapped("bert", twin, _router(twin, (0, 1)), routing="self").train()
    with pytest.raises(ValueError, match="in training mode"):
        wrapped(*_batch())
    with torch.no_grad():  # given weights still serve in training mode
        wrapped(*_batch(), mix_weights=torch.full((5, 3), 1 / 3))


def test_gradient_checkpointing_is_refused_where_backward_would_recompute(twins):
    twin = twins["bert"]
    wrapped = _wrapped("bert", twin, None).train()
    module = wrapped.module
    (getattr(module, "activation_checkpointing_enable", None)
     or module.gradient_checkpointing_enable)()
    w = torch.full((5, 3), 1 / 3, requires_grad=True)
    with pytest.raises(ValueError, match="activation \\(gradient\\) checkpointing on"):
        wrapped(*_batch(), mix_weights=w)
    with torch.no_grad():  # nothing is recomputed without a backward
        wrapped(*_batch(), mix_weights=w)
