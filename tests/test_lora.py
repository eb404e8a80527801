"""PEFT LoRA adapters as experts: products, never A and B merged apart (METHOD.md §2)."""

import json

import pytest
import torch

from twinmerge_ext import LoraExpert, TwinCheckpoint, TwinMergedModule

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TASKS = ["a", "b", "c"]


def _bert():
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48,
                                  max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def _adapter(path, seed, **config):
    """A LoRA adapter with random (non-zero) A and B, saved by PEFT."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(_bert(), peft.LoraConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    common = dict(target_modules=["query", "value", "word_embeddings"], lora_alpha=8)
    return {
        "a": _adapter(root / "a", 1, r=2, **common),
        "b": _adapter(root / "b", 2, r=4, use_rslora=True, **common),
        "c": _adapter(root / "c", 3, r=3, rank_pattern={"value": 1}, alpha_pattern={"query": 2},
                      **common),
    }


def _peft_merged(path):
    """The expert as PEFT itself merges it: θ0 + scale·B A on every target."""
    model = peft.PeftModel.from_pretrained(_bert(), path).merge_and_unload()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_expert_is_the_base_plus_the_product_as_peft_merges_it(adapters):
    base = _bert().state_dict()
    for task, path in adapters.items():
        expert = LoraExpert(path)
        want = _peft_merged(path)
        twin = TwinCheckpoint.build(base, {task: expert, "zero": base}, shared="average",
                                    rank_ratio=1.0)
        got = twin.merged_state_dict(torch.tensor([1.0, 0.0]))
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5, msg=k)


def test_lora_twin_is_exact_at_the_adapters_rank_and_merges_products(adapters):
    base = _bert().state_dict()
    experts = {t: LoraExpert(p) for t, p in adapters.items()}
    twin = TwinCheckpoint.build(base, experts)  # task arithmetic, rank rule: exact
    assert twin.metadata["compression"]["lora_exact_rank"] is True
    q = "bert.encoder.layer.0.attention.self.query.weight"
    v = "bert.encoder.layer.0.attention.self.value.weight"
    assert twin.lowrank[q].ranks == (2 + 4 + 3,) * 3
    assert twin.lowrank[v].ranks == (2 + 4 + 1,) * 3  # c's rank_pattern
    # No adapter targets it: every delta is 0, so it is not stored (θs serves it).
    out = "bert.encoder.layer.0.attention.output.dense.weight"
    assert out not in twin.lowrank and out in twin.report()["unchanged"]
    assert max(e for errs in twin.report()["errors"].values() for e in errs.values()) < 1e-5

    dense = {t: _peft_merged(p) for t, p in adapters.items()}
    w = torch.tensor([0.5, 0.3, 0.2])
    got = twin.merged_state_dict(w)
    # θs + Σ w_t (θ_t − θs) with θs = θ0 + 0.3 Σ (θ_t − θ0), all from the dense products.
    for k in (q, v, "bert.embeddings.word_embeddings.weight"):
        tau = [dense[t][k] - base[k] for t in TASKS]
        shared = base[k] + 0.3 * sum(tau)
        want = shared + sum(wt * (dense[t][k] - shared) for wt, t in zip(w, TASKS))
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-5)


def test_truncated_only_if_asked(adapters):
    base = _bert().state_dict()
    experts = {t: LoraExpert(p) for t, p in adapters.items()}
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert TwinCheckpoint.build(base, experts, rank=2).lowrank[q].ranks == (2, 2, 2)
    assert TwinCheckpoint.build(base, experts, rank_ratio=0.5).lowrank[q].ranks == (16,) * 3
    # TIES is not linear in the deltas: no exact rank, the default ratio applies.
    ties = TwinCheckpoint.build(base, experts, shared="ties")
    assert ties.metadata["compression"]["lora_exact_rank"] is False
    assert ties.lowrank[q].ranks == (3,) * 3


def test_lora_twin_serves_exactly(adapters):
    base = _bert().state_dict()
    twin = TwinCheckpoint.build(base, {t: LoraExpert(p) for t, p in adapters.items()})
    wrapped = TwinMergedModule(_bert(), twin, mode="factored")
    ids = torch.randint(0, 50, (2, 6))
    w = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.2, 0.6]])
    with torch.no_grad():
        got = wrapped(input_ids=ids, mix_weights=w).logits
        for b in range(2):
            m = _bert()
            m.load_state_dict(twin.merged_state_dict(w[b]))
            torch.testing.assert_close(got[b:b + 1], m(input_ids=ids[b:b + 1]).logits,
                                       rtol=1e-5, atol=1e-5)
        expert = peft.PeftModel.from_pretrained(_bert(), adapters["b"]).merge_and_unload()
        torch.testing.assert_close(got[:1], expert(input_ids=ids[:1]).logits,
                                   rtol=1e-4, atol=1e-4)


def test_merging_takes_a_bound_adapter(adapters):
    from twinmerge_ext import merging
    base = _bert().state_dict()
    lora = LoraExpert(adapters["a"])
    with pytest.raises(TypeError, match=r"experts\['a'\] is a LoraExpert, an adapter without its "
                                        r"base: pass experts\['a'\].bind\(base\)"):
        merging.task_arithmetic(base, {"a": lora})
    merged = merging.task_arithmetic(base, {"a": lora.bind(base)}, scale=1.0)
    want = _peft_merged(adapters["a"])
    for k, v in want.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-5, msg=k)


def test_lora_errors(adapters, tmp_path):
    with pytest.raises(ValueError, match="not a PEFT adapter directory"):
        LoraExpert(tmp_path)
    with pytest.raises(TypeError, match="adapter directory"):
        LoraExpert(3)
    dora = _adapter(tmp_path / "dora", 4, r=2, target_modules=["query"], use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        LoraExpert(dora)
    other = {k: v for k, v in _bert().state_dict().items() if "query" not in k}
    with pytest.raises(ValueError, match="the adapter .* has tensor .*query.weight.* that the "
                                         "base does not have"):
        TwinCheckpoint.build(other, {"a": LoraExpert(adapters["a"]), "b": other})
    cfg = json.load(open(f"{adapters['a']}/adapter_config.json"))
    cfg["r"] = 5
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    import shutil
    shutil.copy(f"{adapters['a']}/adapter_model.safetensors", bad)
    with pytest.raises(ValueError, match="the config says rank 5"):
        LoraExpert(bad)


def test_errors_can_name_the_files_a_parameter_is_read_from(adapters, tmp_path):
    """merging._file_of (used by the distributed build's errors): an adapter's targets come from
    the adapter on its base's file, other parameters from the base's file; a state dict has
    none; a sharded checkpoint names the shard."""
    from safetensors.torch import save_file

    from twinmerge_ext import merging
    base = {k: v.contiguous() for k, v in _bert().state_dict().items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    lora = LoraExpert(adapters["a"])
    target = next(iter(lora.targets))
    other = next(k for k in base if k not in lora.targets)
    bound = lora.bind(str(tmp_path / "base.safetensors"))
    assert merging._file_of(bound, target) == f"{adapters['a']} on {tmp_path / 'base.safetensors'}"
    assert merging._file_of(bound, other) == str(tmp_path / "base.safetensors")
    assert merging._file_of(lora.bind(base), target) == adapters["a"]
    assert merging._file_of(base, other) is None
    _bert().save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    assert merging._file_of(str(tmp_path / "sharded"), name) == str(tmp_path / "sharded" / shard)
    assert merging._file_of(str(tmp_path / "sharded"), "no.such.tensor") is None
    assert merging._file_of(merging._Subset(str(tmp_path / "sharded"), lambda n: False),
                            name) == str(tmp_path / "sharded" / shard)
