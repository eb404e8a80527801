"""TwinCheckpoint: exactness at full rank, compression error, rank rule, save/load, validation,
checksums."""

import errno
import hashlib
import json
import os
import stat
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from twinmerge_ext import TwinRouter, _files, _twin_file, checkpoint, merging
from twinmerge_ext.checkpoint import FORMAT_VERSION, TwinCheckpoint

from conftest import HAS_CUDA, assert_close

try:
    import fcntl
except ImportError:  # Windows: saves take no locks and remove no stale temporaries
    fcntl = None
needs_flock = pytest.mark.skipif(fcntl is None, reason="no fcntl.flock on this platform")

TASKS = ["sst2", "mnli", "qqp"]


def random_model(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(6, 5, generator=g).to(dtype),     # Linear weight
        "embed.weight": torch.randn(12, 4, generator=g).to(dtype),    # embedding (tall)
        "layer.bias": torch.randn(6, generator=g).to(dtype),          # 1-D
        "conv.weight": torch.randn(3, 2, 2, generator=g).to(dtype),   # 3-D
        "logit_scale": torch.randn((), generator=g).to(dtype),        # 0-D
        "position_ids": torch.arange(7).unsqueeze(0),                 # int buffer
    }


def make_experts(base, seed=1, scale=0.1):
    """Experts = base + a random task vector; non-floating tensors equal to the base's."""
    experts = {}
    for i, task in enumerate(TASKS):
        noise = random_model(seed + i)
        experts[task] = {k: (v + scale * noise[k].to(v.dtype)) if v.is_floating_point()
                         else v.clone() for k, v in base.items()}
    return experts


@pytest.fixture
def setup():
    base = random_model(0)
    return base, make_experts(base)


def one_hot(t, T=len(TASKS)):
    w = torch.zeros(T)
    w[t] = 1.0
    return w


def twin_tensors(twin):
    """Every tensor of a twin under its file name (for bit-exact comparisons)."""
    out = {f"shared/{k}": v for k, v in twin.shared.items()}
    for k, lr in twin.lowrank.items():
        out.update({f"lowrank/{k}/U_cat": lr.U_cat, f"lowrank/{k}/S_cat": lr.S_cat,
                    f"lowrank/{k}/V_cat": lr.V_cat})
    out.update({f"dense/{k}/deltas": v for k, v in twin.dense.items()})
    out.update({f"heads/{t}/{k}": v for t, h in twin.heads.items() for k, v in h.items()})
    if twin.router is not None:
        out.update({f"router/{k}": v for k, v in twin.router.state_dict().items()})
    return out


def assert_twins_equal(a, b, ordered=True):
    """Same tensors bit for bit (in the same order if ordered), ranks, tasks and metadata."""
    ta, tb = twin_tensors(a), twin_tensors(b)
    assert list(ta) == list(tb) if ordered else sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, k
        assert torch.equal(ta[k], tb[k]), k
    assert {k: v.ranks for k, v in a.lowrank.items()} == {k: v.ranks for k, v in b.lowrank.items()}
    assert a.tasks == b.tasks
    assert a.metadata == b.metadata


# --- structure and exactness --------------------------------------------------------------------

def test_layout_matrices_lowrank_others_dense(setup):
    base, experts = setup
    twin = TwinCheckpoint.build(base, experts, rank_ratio=0.5)
    assert twin.tasks == TASKS
    assert list(twin.shared) == list(base)
    assert sorted(twin.lowrank) == ["embed.weight", "layer.weight"]
    assert sorted(twin.dense) == ["conv.weight", "layer.bias", "logit_scale"]
    lr = twin.lowrank["layer.weight"]            # 6×5, r = floor(0.5·5) = 2
    assert lr.ranks == (2, 2, 2)
    assert lr.U_cat.shape == (6, 6) and lr.S_cat.shape == (6,) and lr.V_cat.shape == (5, 6)
    assert twin.lowrank["embed.weight"].ranks == (2, 2, 2)
    assert twin.dense["conv.weight"].shape == (3, 3, 2, 2)
    assert twin.dense["layer.bias"].shape == (3, 6)
    assert twin.dense["logit_scale"].shape == (3,)
    # Expert t owns columns t·r .. (t+1)·r, and its factors reconstruct its own delta.
    U1, S1, V1 = lr.factors(1)
    assert torch.equal(U1, lr.U_cat[:, 2:4]) and torch.equal(S1, lr.S_cat[2:4])
    assert S1[0] >= S1[1]
    assert_close(lr.delta(1), lr.U_cat[:, 2:4].double() @ torch.diag(S1.double()) @ V1.double().T)
    with pytest.raises(IndexError, match=r"t must be in \[0, 3\), got -1"):
        lr.factors(-1)


def test_full_rank_one_hot_reproduces_each_expert(setup):
    base, experts = setup
    twin = TwinCheckpoint.build(base, experts, rank=1000)
    for t, task in enumerate(TASKS):
        merged = twin.merged_state_dict(one_hot(t))
        assert list(merged) == list(base)
        for name, expected in experts[task].items():
            assert merged[name].dtype == expected.dtype, name
            if expected.is_floating_point():
                assert_close(merged[name], expected)
            else:
                assert torch.equal(merged[name], expected), name


def test_full_rank_mixed_weights_equal_shared_plus_weighted_deltas(setup):
    base, experts = setup
    twin = TwinCheckpoint.build(base, experts, shared_kwargs={"scale": 0.4}, rank=1000)
    shared = merging.task_arithmetic(base, experts, scale=0.4)
    for name in base:
        assert torch.equal(twin.shared[name], shared[name]), name
    w = [0.5, -0.25, 1.5]
    merged = twin.merged_state_dict(w)
    for name, s in shared.items():
        if not s.is_floating_point():
            continue
        expected = s.double() + sum(wt * (experts[task][name].double() - s.double())
                                    for wt, task in zip(w, TASKS))
        assert_close(merged[name], expected, torch.float32)
    # A tensor of weights gives the same model as the list.
    again = twin.merged_state_dict(torch.tensor(w))
    for name in merged:
        assert torch.equal(again[name], merged[name]), name


def test_deltas_are_relative_to_the_shared_expert_not_the_base(setup):
    base, experts = setup
    twin = TwinCheckpoint.build(base, experts, rank=1000)
    shared = twin.shared
    for t, task in enumerate(TASKS):
        bias = experts[task]["layer.bias"]
        assert torch.equal(twin.dense["layer.bias"][t], bias - shared["layer.bias"])
        assert not torch.allclose(twin.dense["layer.bias"][t], bias - base["layer.bias"],
                                  atol=1e-3)
        w = experts[task]["layer.weight"]
        delta = twin.lowrank["layer.weight"].delta(t)
        assert_close(delta, (w - shared["layer.weight"]).double())
        assert not torch.allclose(delta, w - base["layer.weight"], atol=1e-3)


def test_non_floating_tensors_stay_the_base_in_shared_and_merges(setup):
    base, experts = setup
    for i, task in enumerate(TASKS):
        experts[task]["position_ids"] = base["position_ids"] + i + 1
    twin = TwinCheckpoint.build(base, experts, rank=1000)
    assert torch.equal(twin.shared["position_ids"], base["position_ids"])
    assert "position_ids" not in twin.lowrank and "position_ids" not in twin.dense
    merged = twin.merged_state_dict(one_hot(2))
    assert torch.equal(merged["position_ids"], base["position_ids"])
    merged["position_ids"] += 1       # the merged model owns its memory
    assert torch.equal(twin.shared["position_ids"], base["position_ids"])


def test_include_exclude_select_twin_parameters(setup):
    base, experts = setup
    twin = TwinCheckpoint.build(base, experts, include=["layer", "conv"], exclude="bias", rank=1000)
    assert list(twin.lowrank) == ["layer.weight"]
    assert list(twin.dense) == ["conv.weight"]
    # Unselected parameters are not merged either (the merging rule): they keep the base.
    for name in ("embed.weight", "layer.bias"):
        assert torch.equal(twin.shared[name], base[name]), name
    merged = twin.merged_state_dict(one_hot(0))
    assert torch.equal(merged["layer.bias"], base["layer.bias"])
    assert_close(merged["layer.weight"], experts["sst2"]["layer.weight"].double())
    assert twin.metadata["compression"]["include"] == ["layer", "conv"]
    assert twin.metadata["compression"]["exclude"] == ["bias"]


@pytest.mark.parametrize("shared,kwargs,call", [
    ("task_arithmetic", {}, lambda b, e: merging.task_arithmetic(b, e, scale=0.3)),
    ("ties", {"density": 0.5}, lambda b, e: merging.ties(b, e, density=0.5)),
    ("dare", {"drop_rate": 0.2, "seed": 3}, lambda b, e: merging.dare(b, e, 0.2, 3)),
    ("average", {}, lambda b, e: merging.average(e, base=b)),
])
def test_shared_methods_and_effective_kwargs_in_metadata(setup, shared, kwargs, call):
    base, experts = setup
    twin = TwinCheckpoint.build(base, experts, shared=shared, shared_kwargs=kwargs, rank=1)
    expected = call(base, experts)
    for name in base:
        assert torch.equal(twin.shared[name], expected[name]), name
    meta = twin.metadata["shared"]
    assert meta["method"] == shared
    assert meta["kwargs"].items() >= kwargs.items()
    if shared == "task_arithmetic":
        assert meta["kwargs"] == {"scale": 0.3}
    if shared == "dare":
        assert meta["kwargs"] == {"drop_rate": 0.2, "seed": 3, "then": "task_arithmetic",
                                  "scale": 0.3}


# --- compression --------------------------------------------------------------------------------

def test_low_rank_error_is_recorded_and_near_optimal():
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(40, 30, generator=g)}
    experts = {t: {"w": base["w"] + torch.randn(40, 30, generator=g)} for t in TASKS}
    twin = TwinCheckpoint.build(base, experts, rank_ratio=0.1)
    lr = twin.lowrank["w"]
    assert lr.ranks == (3, 3, 3)
    errors = twin.report()["errors"]["w"]
    assert list(errors) == TASKS
    assert twin.metadata["tensors"]["lowrank"]["w"]["errors"] == [errors[t] for t in TASKS]
    for t, task in enumerate(TASKS):
        v = experts[task]["w"].double() - twin.shared["w"].double()
        U, S, V = (x.double() for x in lr.factors(t))
        independent = (torch.linalg.norm(v - U @ torch.diag(S) @ V.T) / torch.linalg.norm(v)).item()
        s = torch.linalg.svdvals(v)
        optimal = (torch.linalg.norm(s[3:]) / torch.linalg.norm(s)).item()
        assert errors[task] == pytest.approx(independent, rel=1e-4)
        assert optimal * (1 - 1e-6) <= errors[task] <= 1.05 * optimal, (errors[task], optimal)


def test_empty_matrix_is_kept_dense_and_round_trips(tmp_path):
    base = {"w": torch.zeros(0, 4), "v": torch.ones(3, 2)}
    experts = {t: {"w": torch.zeros(0, 4), "v": torch.full((3, 2), float(i))}
               for i, t in enumerate(TASKS)}
    twin = TwinCheckpoint.build(base, experts, rank=1)
    assert list(twin.lowrank) == ["v"] and twin.dense["w"].shape == (3, 0, 4)
    twin.save(tmp_path / "t.safetensors")
    assert_twins_equal(twin, TwinCheckpoint.load(tmp_path / "t.safetensors"))
    # Rank-1 deltas are reproduced exactly at rank 1; an expert equal to θs has error 0.
    assert_close(twin.merged_state_dict(one_hot(2))["v"], experts["qqp"]["v"].double())
    assert all(e < 1e-6 for e in twin.report()["errors"]["v"].values())


def test_full_rank_errors_are_zero_up_to_rounding(setup):
    base, experts = setup
    twin = TwinCheckpoint.build(base, experts, rank=1000)
    for name, per_task in twin.report()["errors"].items():
        assert all(0 <= e < 1e-5 for e in per_task.values()), (name, per_task)


@pytest.mark.parametrize("rank,rank_ratio,expected", [
    (None, 0.1, {"row": 1, "mat": 3}),        # 1×20 would get int(0.1) = 0: clamped to 1
    (None, 1.0, {"row": 1, "mat": 30}),
    (None, 0.5, {"row": 1, "mat": 15}),
    (5, 0.1, {"row": 1, "mat": 5}),           # explicit rank clamped to min(m, n)
    (1000, 0.1, {"row": 1, "mat": 30}),
])
def test_rank_rule(rank, rank_ratio, expected):
    g = torch.Generator().manual_seed(0)
    base = {"row": torch.randn(1, 20, generator=g), "mat": torch.randn(40, 30, generator=g)}
    experts = {t: {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
               for t in TASKS}
    twin = TwinCheckpoint.build(base, experts, rank=rank, rank_ratio=rank_ratio)
    for name, r in expected.items():
        assert twin.lowrank[name].ranks == (r,) * 3, name
        assert twin.metadata["tensors"]["lowrank"][name]["ranks"] == [r] * 3


@pytest.mark.parametrize("ratio,k,r", [(0.29, 100, 29), (0.07, 100, 7), (0.1, 9, 1), (1.0, 7, 7)])
def test_rank_ratio_is_the_decimal_as_written(ratio, k, r):
    assert checkpoint._rank_for(k, 1000, None, ratio) == r


def test_bf16_parameters_store_bf16_factors(setup):
    base = random_model(0, torch.bfloat16)
    experts = make_experts(base)
    twin = TwinCheckpoint.build(base, experts, rank=1000)
    for lr in twin.lowrank.values():
        assert lr.U_cat.dtype == lr.S_cat.dtype == lr.V_cat.dtype == torch.bfloat16
    assert all(d.dtype == torch.bfloat16 for d in twin.dense.values())
    for t, task in enumerate(TASKS):
        merged = twin.merged_state_dict(one_hot(t))
        for name, expected in experts[task].items():
            assert merged[name].dtype == expected.dtype
            if expected.is_floating_point():
                assert_close(merged[name], expected.double(), torch.bfloat16)
    for per_task in twin.report()["errors"].values():
        assert all(e < 2e-2 for e in per_task.values())


def test_parameters_no_expert_changes_are_not_stored(setup, tmp_path):
    # Frozen during fine-tuning (e.g. word embeddings): every delta is exactly 0.
    base, experts = setup
    for sd in experts.values():
        sd["embed.weight"] = base["embed.weight"].clone()
        sd["layer.bias"] = base["layer.bias"].clone()
    twin = TwinCheckpoint.build(base, experts, rank=2)
    assert "embed.weight" not in twin.lowrank and "layer.bias" not in twin.dense
    assert sorted(twin.lowrank) == ["layer.weight"]
    assert twin.report()["unchanged"] == ["embed.weight", "layer.bias"]
    assert twin.metadata["compression"]["unchanged"] == ["embed.weight", "layer.bias"]
    merged = twin.merged_state_dict(torch.tensor([0.2, 0.5, 0.3]))
    assert torch.equal(merged["embed.weight"], base["embed.weight"])
    assert torch.equal(merged["layer.bias"], base["layer.bias"])
    # Nothing stored for them: only layer.weight's factors and the dense deltas of the others.
    storage = twin.report()["storage"]
    assert storage["lowrank_bytes"] == 3 * 2 * (6 + 5 + 1) * 4
    assert storage["dense_bytes"] == 3 * (3 * 2 * 2 + 1) * 4   # conv.weight, logit_scale
    twin.save(tmp_path / "twin.safetensors")
    loaded = TwinCheckpoint.load(tmp_path / "twin.safetensors")
    assert_twins_equal(twin, loaded)
    assert loaded.report()["unchanged"] == ["embed.weight", "layer.bias"]


def test_a_delta_zero_for_some_experts_only_is_kept(setup):
    base, experts = setup
    experts["mnli"]["layer.weight"] = base["layer.weight"].clone()
    twin = TwinCheckpoint.build(base, experts, rank=1000)
    assert "layer.weight" in twin.lowrank and twin.report()["unchanged"] == []
    for t, task in enumerate(TASKS):
        assert_close(twin.merged_state_dict(one_hot(t))["layer.weight"],
                     experts[task]["layer.weight"])


def test_storage_ratio_on_a_known_example():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(40, 30, generator=g), "b": torch.randn(30, generator=g),
            "ids": torch.arange(10)}
    experts = {t: {"w": base["w"] + 1, "b": base["b"] - 1, "ids": base["ids"]} for t in TASKS}
    storage = TwinCheckpoint.build(base, experts, rank=2).report()["storage"]
    one = (40 * 30 + 30) * 4 + 10 * 8
    twin = one + 3 * 2 * (40 + 30 + 1) * 4 + 3 * 30 * 4   # θs + Σt r(m+n+1) + T dense biases
    assert storage["one_model_bytes"] == one
    assert storage["lowrank_bytes"] == 3 * 2 * (40 + 30 + 1) * 4
    assert storage["dense_bytes"] == 3 * 30 * 4
    assert storage["twin_bytes"] == twin
    assert storage["experts_bytes"] == 3 * one
    assert storage["storage_ratio"] == pytest.approx(twin / one)
    assert storage["ratio_vs_experts"] == pytest.approx(twin / (3 * one))


def test_safetensors_path_experts_equal_dict_experts(setup, tmp_path):
    base, experts = setup
    save_file(base, tmp_path / "base.safetensors")
    paths = {}
    for task, sd in experts.items():
        paths[task] = str(tmp_path / f"{task}.safetensors")
        save_file(sd, paths[task])
    a = TwinCheckpoint.build(base, experts, rank=2, shared="ties")
    b = TwinCheckpoint.build(str(tmp_path / "base.safetensors"), paths, rank=2, shared="ties")
    assert_twins_equal(a, b, ordered=False)   # a file lists its tensors in its own order


def test_svd_device_argument_on_cpu_gives_the_same_twin(setup):
    base, experts = setup
    assert_twins_equal(TwinCheckpoint.build(base, experts, rank=2),
                       TwinCheckpoint.build(base, experts, rank=2, device="cpu"))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_svd_on_cuda_results_stored_on_the_base_device(setup):
    base, experts = setup
    twin = TwinCheckpoint.build(base, experts, rank=1000, device="cuda")
    assert all(t.device.type == "cpu" for t in
               [*twin.shared.values(), *twin.dense.values(),
                *(x for lr in twin.lowrank.values() for x in (lr.U_cat, lr.S_cat, lr.V_cat))])
    merged = twin.merged_state_dict(one_hot(1))
    for name, expected in experts["mnli"].items():
        if expected.is_floating_point():
            assert_close(merged[name], expected.double())
    on_gpu = twin.to("cuda").merged_state_dict(one_hot(1).cuda())
    assert all(t.is_cuda for t in on_gpu.values())


def test_progress_bar(setup, capsys):
    base, experts = setup
    TwinCheckpoint.build(base, experts, rank=1, progress=True)
    assert "TwinCheckpoint.build" in capsys.readouterr().err


# --- build and merge errors ---------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    ({"shared": "slerp"}, ValueError, r"shared must be one of \['average', 'dare', 'task_arith"),
    ({"rank": 0}, ValueError, "rank must be >= 1, got 0"),
    ({"rank": 2.0}, TypeError, "rank must be an int"),
    ({"rank_ratio": 0.0}, ValueError, r"rank_ratio must be in \(0, 1\], got 0.0"),
    ({"rank_ratio": 1.5}, ValueError, r"rank_ratio must be in \(0, 1\], got 1.5"),
    ({"shared_kwargs": {"include": "x"}}, TypeError, r"shared_kwargs may not set \['include'\]"),
    ({"shared_kwargs": {"density": 0.5}}, TypeError, "density"),
    ({"shared_kwargs": {"scale": torch.tensor(0.3)}}, TypeError, "JSON-serializable"),
    ({"include": "("}, ValueError, "not a valid regex"),
    ({"oversample": -1}, ValueError, "oversample must be >= 0"),
])
def test_build_argument_errors(setup, kwargs, exc, match):
    base, experts = setup
    with pytest.raises(exc, match=match):
        TwinCheckpoint.build(base, experts, **kwargs)


def test_build_expert_errors(setup):
    base, experts = setup
    with pytest.raises(ValueError, match="at least one expert, got 0"):
        TwinCheckpoint.build(base, {})
    with pytest.raises(TypeError, match="task names .* must be str, got 0"):
        TwinCheckpoint.build(base, {0: experts["sst2"]})
    with pytest.raises(TypeError, match="experts must be a mapping task name"):
        TwinCheckpoint.build(base, list(experts.values()))
    broken = dict(experts, mnli={k: v for k, v in experts["mnli"].items() if k != "layer.bias"})
    with pytest.raises(ValueError, match=r"experts\['mnli'\] is missing parameter 'layer.bias'"):
        TwinCheckpoint.build(base, broken)
    wrong = dict(experts, qqp=dict(experts["qqp"], **{"layer.bias": torch.zeros(7)}))
    with pytest.raises(ValueError, match=r"'layer.bias' has shape \[6\] in base but \[7\]"):
        TwinCheckpoint.build(base, wrong)
    nan = dict(experts, qqp=dict(experts["qqp"], **{"layer.bias": torch.full((6,), float("nan"))}))
    with pytest.raises(ValueError, match=r"task_arithmetic: parameter 'layer.bias' of "
                                         r"experts\['qqp'\] has 6 NaN/Inf entries"):
        TwinCheckpoint.build(base, nan, rank=1000)
    # A finite shared expert, but θ_sst2 − θs = 3e38 − (−1e38) overflows float32.
    huge = {task: dict(experts[task], **{"layer.weight": torch.full((6, 5), v)})
            for task, v in zip(TASKS, [3e38, -3e38, -3e38])}
    with pytest.raises(ValueError, match=r"'layer.weight': the deltas of tasks \['sst2'\] have"):
        TwinCheckpoint.build(base, huge, rank=1000, shared="average")


def test_merged_state_dict_weight_errors(setup):
    base, experts = setup
    twin = TwinCheckpoint.build(base, experts, rank=1)
    with pytest.raises(ValueError, match=r"weights must have shape \[T=3\].*got \[2\]"):
        twin.merged_state_dict([0.5, 0.5])
    with pytest.raises(TypeError, match="floating tensor"):
        twin.merged_state_dict(torch.tensor([1, 0, 0]))
    with pytest.raises(TypeError, match="tensor \\[T\\] or a list"):
        twin.merged_state_dict(1.0)


# --- save / load --------------------------------------------------------------------------------

@pytest.fixture
def saved(setup, tmp_path):
    base, experts = setup
    twin = TwinCheckpoint.build(base, experts, rank=2)
    path = str(tmp_path / "twin.safetensors")
    twin.save(path)
    return twin, path


def test_save_load_round_trip_is_bit_exact(saved):
    twin, path = saved
    loaded = TwinCheckpoint.load(path)
    assert_twins_equal(twin, loaded)
    assert loaded.report() == twin.report()
    meta = loaded.metadata
    assert meta["format_version"] == FORMAT_VERSION and meta["router"] is None
    assert meta["tasks"] == TASKS and meta["compression"]["rank"] == 2
    assert meta["tensors"]["shared"]["position_ids"] == {"shape": [1, 7], "dtype": "int64"}
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == sorted(twin_tensors(twin))
        assert json.loads(f.metadata()["twinmerge"]) == twin.metadata
        assert sorted(f.metadata()) == ["twinmerge", "twinmerge.checksums"]
    # A loaded twin saves to the same contents.
    loaded.save(path + ".2")
    assert_twins_equal(twin, TwinCheckpoint.load(path + ".2", device="cpu"))


def test_round_trip_bf16(tmp_path):
    base = random_model(0, torch.bfloat16)
    twin = TwinCheckpoint.build(base, make_experts(base), rank_ratio=0.5)
    twin.save(tmp_path / "bf16.safetensors")
    assert_twins_equal(twin, TwinCheckpoint.load(tmp_path / "bf16.safetensors"))


def file_layout(path):
    """(safetensors header, offset of the data, the file's bytes), parsed by hand."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), 8 + n, raw


def file_checksums(path):
    """The checksums a twin file must carry, computed from its raw bytes: sha256 of each
    tensor's byte range and of the twinmerge metadata string."""
    header, start, raw = file_layout(path)
    spans = {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}
    return {"algorithm": "sha256",
            "metadata": hashlib.sha256(header["__metadata__"]["twinmerge"].encode()).hexdigest(),
            "tensors": {k: hashlib.sha256(raw[start + a:start + b]).hexdigest()
                        for k, (a, b) in spans.items()}}


def rewrite(src, dst, tensors=None, meta=None, checksums=True):
    """Copies a saved twin, applying tensors(dict) and meta(dict) edits in place, with checksums
    recomputed for the result (checksums=False: none, a file from before they existed)."""
    with safe_open(src, framework="pt") as f:
        data = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(f.metadata()["twinmerge"])
    if tensors:
        tensors(data)
    if meta:
        meta(header)
    metadata = {"twinmerge": json.dumps(header)}
    save_file(data, dst, metadata=metadata)
    if checksums:
        metadata["twinmerge.checksums"] = json.dumps(file_checksums(dst))
        save_file(data, dst, metadata=metadata)


def _set_ranks(h):
    h["tensors"]["lowrank"]["layer.weight"]["ranks"] = [2, 2, 3]


LOAD_ERRORS = {
    "garbage": (lambda src, dst: open(dst, "wb").write(b"definitely not safetensors" * 10),
                r"not a valid safetensors file"),
    "truncated": (lambda src, dst: open(dst, "wb").write(open(src, "rb").read()[:-100]),
                  r"not a valid safetensors file \(truncated"),
    "no_metadata": (lambda src, dst: save_file({"x": torch.zeros(2)}, dst, metadata={"a": "b"}),
                    r"no 'twinmerge' metadata"),
    "bad_json": (lambda src, dst: save_file({"x": torch.zeros(2)}, dst,
                                            metadata={"twinmerge": "{oops"}),
                 r"not valid JSON"),
    "future_version": (lambda src, dst: rewrite(src, dst,
                                                meta=lambda h: h.update(format_version=2)),
                       r"unknown twin checkpoint format version 2; this library reads format "
                       r"version 1"),
    "missing_tensor": (lambda src, dst: rewrite(src, dst, tensors=lambda d: d.pop(
        "lowrank/embed.weight/V_cat")),
        r"tensor 'lowrank/embed.weight/V_cat' is listed in the metadata but missing"),
    "extra_tensor": (lambda src, dst: rewrite(src, dst, tensors=lambda d: d.update(
        {"router/w": torch.zeros(3)})), r"unexpected tensor 'router/w'"),
    "shape": (lambda src, dst: rewrite(src, dst, tensors=lambda d: d.update(
        {"shared/layer.bias": torch.zeros(7)})),
        r"tensor 'shared/layer.bias' has shape \[7\], the metadata says \[6\]"),
    "dtype": (lambda src, dst: rewrite(src, dst, tensors=lambda d: d.update(
        {"dense/conv.weight/deltas": d["dense/conv.weight/deltas"].double()})),
        r"tensor 'dense/conv.weight/deltas' has dtype float64, the metadata says float32"),
    "ranks_sum": (lambda src, dst: rewrite(src, dst, meta=_set_ranks),
                  r"ranks \[2, 2, 3\] of 'layer.weight' sum to 7, but its U_cat has K = 6"),
    "ranks_count": (lambda src, dst: rewrite(src, dst, meta=lambda h: h["tensors"]["lowrank"][
        "layer.weight"].update(ranks=[2, 2])), r"ranks: a list of T=3 non-negative ints"),
    "meta_shape": (lambda src, dst: rewrite(src, dst, meta=lambda h: h["tensors"]["dense"][
        "layer.bias"].update(shape=[5])), r"shape \[5\] and dtype float32, but the shared"),
    "unchanged_type": (lambda src, dst: rewrite(src, dst, meta=lambda h: h["compression"].update(
        unchanged="embed.weight")),
        r"compression.unchanged must be a list of parameter names, got 'embed.weight'"),
    "unchanged_stored": (lambda src, dst: rewrite(src, dst, meta=lambda h: h["compression"].update(
        unchanged=["layer.weight"])),
        r"compression.unchanged names 'layer.weight', which must be a shared tensor with no "
        r"low-rank or dense delta"),
    "unchanged_unknown": (lambda src, dst: rewrite(src, dst, meta=lambda h: h["compression"].update(
        unchanged=["nope"])), r"compression.unchanged names 'nope'"),
}


@pytest.mark.parametrize("case", sorted(LOAD_ERRORS))
def test_load_rejects_bad_files(saved, tmp_path, case):
    _, path = saved
    make, match = LOAD_ERRORS[case]
    bad = str(tmp_path / "bad.safetensors")
    make(path, bad)
    with pytest.raises(ValueError, match=match) as info:
        TwinCheckpoint.load(bad)
    assert str(info.value).startswith(f"TwinCheckpoint.load: {bad!r}: ")


@pytest.mark.parametrize("where,error,code,problem", [
    ("nope.safetensors", FileNotFoundError, errno.ENOENT, "no such file"),
    ("", IsADirectoryError, errno.EISDIR, "is a directory, not a file"),
    ("file/t.safetensors", NotADirectoryError, errno.ENOTDIR, "{file} is not a directory"),
])
def test_load_names_a_path_that_is_not_a_file(tmp_path, where, error, code, problem):
    (tmp_path / "file").write_bytes(b"")
    path = str(tmp_path / where) if where else str(tmp_path)
    with pytest.raises(error) as info:
        TwinCheckpoint.load(path)
    assert info.value.errno == code
    assert str(info.value) == f"TwinCheckpoint.load: {path!r}: " + problem.format(
        file=repr(str(tmp_path / "file")))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_load_rejects_what_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match=r"'[^']*/fifo': is not a regular file"):
        TwinCheckpoint.load(tmp_path / "fifo")


def _failing_writer(tensors, filename, metadata=None):
    """Writes half of a real file, then fails, like a crash or a full disk mid-save."""
    save_file(tensors, filename, metadata=metadata)
    real = open(filename, "rb").read()
    with open(filename, "wb") as f:
        f.write(real[: len(real) // 2])
    raise OSError("disk full")


def test_interrupted_save_keeps_the_previous_file(saved, setup, monkeypatch):
    old_twin, path = saved
    before = open(path, "rb").read()
    base, experts = setup
    new_twin = TwinCheckpoint.build(base, experts, rank=1)
    monkeypatch.setattr(_twin_file, "save_file", _failing_writer)
    with pytest.raises(OSError, match="disk full"):
        new_twin.save(path)
    assert open(path, "rb").read() == before
    assert os.listdir(os.path.dirname(path)) == ["twin.safetensors"]   # no temp file left
    assert_twins_equal(old_twin, TwinCheckpoint.load(path))
    monkeypatch.undo()
    new_twin.save(path)                                               # a good save replaces it
    assert_twins_equal(new_twin, TwinCheckpoint.load(path))
    assert os.listdir(os.path.dirname(path)) == ["twin.safetensors"]


def test_interrupted_first_save_leaves_nothing(setup, tmp_path, monkeypatch):
    base, experts = setup
    twin = TwinCheckpoint.build(base, experts, rank=1)
    monkeypatch.setattr(_twin_file, "save_file", _failing_writer)
    with pytest.raises(OSError, match="disk full"):
        twin.save(tmp_path / "twin.safetensors")
    assert os.listdir(tmp_path) == []


def test_save_rejects_a_directory(saved, tmp_path):
    twin, _ = saved
    with pytest.raises(IsADirectoryError) as info:
        twin.save(tmp_path)
    assert info.value.errno == errno.EISDIR
    assert str(info.value) == f"TwinCheckpoint.save: {str(tmp_path)!r}: is a directory"


# --- atomic saves: permissions, temporary directories, errors -----------------------------------

def temp_dir_name(name="twin.safetensors", hex16="0123456789abcdef"):
    return f".{name}.{hex16}.tmpdir"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_new_file_gets_the_umasks_permissions_and_a_replaced_one_keeps_its_own(saved, tmp_path,
                                                                                umask):
    twin, path = saved
    os.chmod(path, 0o600)               # a private file stays private
    old = os.umask(umask)
    try:
        twin.save(path)
        twin.save(tmp_path / "new.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "new.safetensors").st_mode) == 0o666 & ~umask
    assert sorted(os.listdir(tmp_path)) == ["new.safetensors", "twin.safetensors"]


@needs_flock
def test_save_removes_dead_saves_temporaries_and_only_those(saved, tmp_path):
    twin, path = saved
    dead = tmp_path / temp_dir_name(hex16="00000000000000aa")
    dead.mkdir()
    (dead / "twin.safetensors").write_bytes(b"half a file")
    (dead / ".tmpAbC123").write_bytes(b"the writer's own temporary")
    empty = tmp_path / temp_dir_name(hex16="00000000000000bb")   # killed after its rename
    empty.mkdir()
    live = tmp_path / temp_dir_name(hex16="00000000000000cc")
    live.mkdir()
    (live / "twin.safetensors").write_bytes(b"being written")
    keep = [temp_dir_name("other.safetensors"),              # another path's
            ".twin.safetensors.0123.tmpdir",                  # not 16 hex digits
            ".twin.safetensors.0123456789abcdef.tmp",         # not a directory name of ours
            temp_dir_name(hex16="00000000000000dd"),          # a file, not a directory
            temp_dir_name(hex16="00000000000000ee")]          # a symlink to a directory
    (tmp_path / keep[0]).mkdir()
    (tmp_path / keep[1]).mkdir()
    (tmp_path / keep[2]).write_bytes(b"")
    (tmp_path / keep[3]).write_bytes(b"")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / keep[4]).symlink_to(tmp_path / "elsewhere")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a live save holds its lock
        twin.save(path)
        assert sorted(os.listdir(tmp_path)) == sorted(keep + [live.name, "elsewhere",
                                                              "twin.safetensors"])
        assert (live / "twin.safetensors").read_bytes() == b"being written"
        assert_twins_equal(twin, TwinCheckpoint.load(path))   # load ignores temporaries
    finally:
        os.close(fd)
    twin.save(tmp_path / "unrelated.safetensors")           # cleans its own name's only
    assert live.exists()
    twin.save(path)                                          # its writer is gone now
    assert not live.exists()


def _racing_cleaner(monkeypatch, tmp_path, hold):
    """Makes a concurrent save's cleanup reach the writer's first temporary directory between
    its creation and its lock: removing it (hold=False) or holding its lock (hold=True, the
    descriptor is returned in the list)."""
    held = []

    class Racing:
        LOCK_EX, LOCK_NB = fcntl.LOCK_EX, fcntl.LOCK_NB

        @staticmethod
        def flock(fd, op):
            monkeypatch.setattr(_files, "fcntl", fcntl)   # once
            if hold:
                entry = next(e for e in os.listdir(tmp_path) if e.endswith(".tmpdir"))
                held.append(os.open(tmp_path / entry, os.O_RDONLY))
                fcntl.flock(held[0], fcntl.LOCK_EX)
            else:
                _files.remove_stale_temps(str(tmp_path), "twin.safetensors")
            return fcntl.flock(fd, op)

    monkeypatch.setattr(_files, "fcntl", Racing)
    return held


@needs_flock
def test_a_temporary_removed_before_its_lock_is_replaced(saved, tmp_path, monkeypatch):
    twin, path = saved
    _racing_cleaner(monkeypatch, tmp_path, hold=False)
    twin.save(path)
    assert _files.fcntl is fcntl                              # the race happened
    assert os.listdir(tmp_path) == ["twin.safetensors"]
    assert_twins_equal(twin, TwinCheckpoint.load(path))


@needs_flock
def test_a_temporary_locked_by_a_cleaner_is_given_up(saved, tmp_path, monkeypatch):
    twin, path = saved
    held = _racing_cleaner(monkeypatch, tmp_path, hold=True)
    twin.save(path)
    assert len(held) == 1 and len(os.listdir(tmp_path)) == 2  # the cleaner's to remove
    assert_twins_equal(twin, TwinCheckpoint.load(path))
    os.close(held[0])
    twin.save(path)
    assert os.listdir(tmp_path) == ["twin.safetensors"]


@pytest.mark.parametrize("where,error,code,problem", [
    ("nope/t.safetensors", FileNotFoundError, errno.ENOENT, "directory {d}/nope' does not exist"),
    ("file/t.safetensors", NotADirectoryError, errno.ENOTDIR, "{d}/file' is not a directory"),
    ("file/sub/t.safetensors", NotADirectoryError, errno.ENOTDIR,
     "{d}/file' is not a directory"),
])
def test_save_names_a_missing_or_unusable_directory(saved, tmp_path, where, error, code, problem):
    twin, _ = saved
    (tmp_path / "file").write_bytes(b"")
    path = str(tmp_path / where)
    with pytest.raises(error) as info:
        twin.save(path)
    assert info.value.errno == code
    assert str(info.value) == f"TwinCheckpoint.save: {path!r}: " + problem.format(
        d=repr(str(tmp_path))[:-1])
    assert sorted(os.listdir(tmp_path)) == ["file", "twin.safetensors"]


def test_save_names_an_unwritable_directory(saved, tmp_path, monkeypatch):
    # As root, permission bits do not stop a write: tests/test_checkpoint_faults.py checks a
    # real read-only directory in a child process without that privilege.
    twin, _ = saved
    path = str(tmp_path / "t.safetensors")

    def refuse(p, mode=0o777):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), p)
    monkeypatch.setattr(_files.os, "mkdir", refuse)
    with pytest.raises(PermissionError) as info:
        twin.save(path)
    assert info.value.errno == errno.EACCES
    assert str(info.value) == (f"TwinCheckpoint.save: {path!r}: directory {str(tmp_path)!r} is "
                               f"not writable: Permission denied")


# --- checksums ----------------------------------------------------------------------------------

def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def test_save_writes_the_checksums_of_the_bytes_in_the_file(saved):
    twin, path = saved
    with safe_open(path, framework="pt") as f:
        stored = json.loads(f.metadata()["twinmerge.checksums"])
    assert stored == file_checksums(path)
    assert sorted(stored["tensors"]) == sorted(twin_tensors(twin))


def test_a_flipped_byte_in_tensor_data_is_caught_and_named(saved):
    twin, path = saved
    header, start, _ = file_layout(path)
    a, b = header["lowrank/embed.weight/V_cat"]["data_offsets"]
    stored = json.loads(header["__metadata__"]["twinmerge.checksums"])["tensors"]
    flip_byte(path, start + (a + b) // 2)
    computed = file_checksums(path)["tensors"]["lowrank/embed.weight/V_cat"]
    with pytest.raises(ValueError) as info:
        TwinCheckpoint.load(path)
    message = str(info.value)
    assert message.startswith(f"TwinCheckpoint.load: {path!r}: tensor 'lowrank/embed.weight/V_cat' "
                              f"does not match its checksum")
    assert stored["lowrank/embed.weight/V_cat"] in message and computed in message
    # verify=False skips the tensors' checksums: the damaged file loads, with a wrong factor.
    loaded = TwinCheckpoint.load(path, verify=False)
    assert not torch.equal(loaded.lowrank["embed.weight"].V_cat, twin.lowrank["embed.weight"].V_cat)
    assert torch.equal(loaded.lowrank["embed.weight"].U_cat, twin.lowrank["embed.weight"].U_cat)


def test_a_flipped_digit_in_the_metadata_is_caught(saved):
    # A compression error (one stored number) changes: the file still parses, every tensor is
    # intact, only the metadata's own checksum can tell.
    twin, path = saved
    raw = open(path, "rb").read()
    at = raw.index(b'errors\\": [0.') + len(b'errors\\": [0.')
    digit = raw[at:at + 1]
    assert digit.isdigit()
    flip_byte(path, at)   # '3' <-> '2', '0' <-> '1', ...: still a digit
    with pytest.raises(ValueError, match=f"{path!r}: the 'twinmerge' metadata does not match its "
                                         f"checksum .*the file is damaged"):
        TwinCheckpoint.load(path)
    with pytest.raises(ValueError, match="'twinmerge' metadata does not match its checksum"):
        TwinCheckpoint.load(path, verify=False)   # the metadata's checksum is always checked


def test_files_without_checksums_load_with_a_warning(saved, tmp_path):
    twin, path = saved
    old = tmp_path / "old.safetensors"
    rewrite(path, old, checksums=False)   # what save wrote before checksums existed
    with pytest.warns(UserWarning, match=f"{str(old)!r} has no checksums .* save it again"):
        loaded = TwinCheckpoint.load(old)
    assert_twins_equal(twin, loaded)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_twins_equal(twin, TwinCheckpoint.load(old, verify=False))
        loaded.save(old)                  # saving it again adds them
        assert_twins_equal(twin, TwinCheckpoint.load(old))
    assert json.loads(file_layout(old)[0]["__metadata__"]["twinmerge.checksums"]) == \
        file_checksums(old)


def _edit_checksums(edit):
    def apply(src, dst):
        rewrite(src, dst)
        with safe_open(dst, framework="pt") as f:
            data = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
        sums = json.loads(metadata["twinmerge.checksums"])
        edit(sums)
        metadata["twinmerge.checksums"] = json.dumps(sums) if isinstance(sums, dict) else sums
        save_file(data, dst, metadata=metadata)
    return apply


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.update(algorithm="crc32"), r"must be an object with algorithm 'sha256'"),
    (lambda s: s.pop("metadata"), r"must hold a 'metadata' digest and a 'tensors' object"),
    (lambda s: s["tensors"].update({"shared/layer.bias": 7}), r"a 'tensors' object of digests"),
    (lambda s: s["tensors"].pop("shared/layer.bias"),
     r"tensor 'shared/layer.bias' is without checksum"),
    (lambda s: s["tensors"].update({"shared/ghost": "00"}),
     r"tensor 'shared/ghost' is in the checksums only"),
    (lambda s: s["tensors"].update({"dense/layer.bias/deltas": "0" * 64}),
     r"tensor 'dense/layer.bias/deltas' does not match its checksum \(sha256 [0-9a-f]{64}, "
     r"the file says 0{64}\)"),
])
def test_load_rejects_bad_checksums(saved, tmp_path, edit, match):
    _, path = saved
    bad = str(tmp_path / "bad.safetensors")
    _edit_checksums(edit)(path, bad)
    with pytest.raises(ValueError, match=match) as info:
        TwinCheckpoint.load(bad)
    assert str(info.value).startswith(f"TwinCheckpoint.load: {bad!r}: ")


def test_load_rejects_checksums_that_are_not_json(saved, tmp_path):
    _, path = saved
    bad = str(tmp_path / "bad.safetensors")
    rewrite(path, bad, checksums=False)
    with safe_open(bad, framework="pt") as f:
        data = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata(), **{"twinmerge.checksums": "{oops"})
    save_file(data, bad, metadata=metadata)
    with pytest.raises(ValueError, match="'twinmerge.checksums' metadata is not valid JSON"):
        TwinCheckpoint.load(bad, verify=False)
    with pytest.raises(TypeError, match="verify must be a bool, got 'yes'"):
        TwinCheckpoint.load(path, verify="yes")


# --- non-finite values --------------------------------------------------------------------------

def _poison(key, value, index=1):
    def edit(d):
        t = d[key].clone()
        t.view(-1)[index] = value
        d[key] = t
    return edit


@pytest.mark.parametrize("key", ["shared/layer.weight", "lowrank/embed.weight/U_cat",
                                 "lowrank/layer.weight/S_cat", "dense/layer.bias/deltas",
                                 "dense/logit_scale/deltas", "heads/mnli/classifier.bias",
                                 "router/net.0.weight", "router/feature_std"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_load_rejects_non_finite_tensors_whatever_verify_says(setup, tmp_path, key, value):
    # Written by hand with valid checksums: only the finiteness check can catch it.
    base, experts = setup
    twin = TwinCheckpoint.build(base, with_heads(experts, [3, 2, 4]), rank=2, heads="^classifier")
    twin = twin.with_router(trained_like_router())
    good, bad = tmp_path / "good.safetensors", str(tmp_path / "bad.safetensors")
    twin.save(good)
    rewrite(good, bad, tensors=_poison(key, value))
    assert json.loads(file_layout(bad)[0]["__metadata__"]["twinmerge.checksums"]) == \
        file_checksums(bad)
    for verify in (True, False):
        with pytest.raises(ValueError, match=rf"tensor '{key}' has a non-finite value "
                                             rf"\({value} at \[\d+(, \d+)*\]\)") as info:
            TwinCheckpoint.load(bad, verify=verify)
        assert str(info.value).startswith(f"TwinCheckpoint.load: {bad!r}: ")


def test_load_rejects_non_finite_tensors_in_files_without_checksums(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "bad.safetensors"
    rewrite(path, bad, tensors=_poison("shared/conv.weight", float("nan"), 5), checksums=False)
    with pytest.raises(ValueError, match=r"tensor 'shared/conv.weight' has a non-finite value "
                                         r"\(nan at \[1, 0, 1\]\)"):
        TwinCheckpoint.load(bad)


def test_save_refuses_non_finite_tensors_before_writing_anything(saved, tmp_path):
    twin, path = saved
    before = open(path, "rb").read()
    meta = twin.metadata
    info = {k: v for k, v in meta.items() if k not in ("tasks", "tensors")}
    errors = {name: spec["errors"] for name, spec in meta["tensors"]["lowrank"].items()}
    dense = dict(twin.dense, **{"layer.bias": twin.dense["layer.bias"].clone()})
    dense["layer.bias"][2, 4] = float("inf")
    by_hand = TwinCheckpoint(twin.tasks, twin.shared, twin.lowrank, dense, errors, info)
    with pytest.raises(ValueError, match=r"^TwinCheckpoint.save: tensor 'dense/layer.bias/deltas' "
                                         r"must be finite, got inf at \[2, 4\]; nothing was "
                                         r"written$"):
        by_hand.save(path)
    with pytest.raises(ValueError, match="'dense/layer.bias/deltas' must be finite"):
        by_hand.save(tmp_path / "new.safetensors")
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["twin.safetensors"]
    # A router attached finite and changed afterwards (it is the twin's own module).
    routed = twin.with_router(trained_like_router())
    with torch.no_grad():
        routed.router.net[0].weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"tensor 'router/net.0.weight' must be finite, got nan "
                                         r"at \[1, 2\]"):
        routed.save(path)
    assert sorted(os.listdir(tmp_path)) == ["twin.safetensors"]


def test_build_and_with_router_refuse_non_finite_heads_and_routers(setup, saved):
    base, experts = setup
    headed = with_heads(experts, [3, 2, 4])
    headed["mnli"]["classifier.bias"][1] = float("nan")
    with pytest.raises(ValueError, match=r"head tensor 'classifier.bias' of experts\['mnli'\] "
                                         r"must be finite, got nan at \[1\]"):
        TwinCheckpoint.build(base, headed, rank=1, heads="^classifier")
    twin, _ = saved
    router = trained_like_router()
    router.feature_std[3] = float("-inf")
    with pytest.raises(ValueError, match=r"router tensor 'feature_std' must be finite, got -inf "
                                         r"at \[3\]"):
        twin.with_router(router)


# --- task heads ---------------------------------------------------------------------------------

def with_heads(models, widths):
    """Adds a classifier of a task-specific width to each state dict (and one to the base)."""
    out = {}
    for (name, sd), width in zip(models.items(), widths):
        g = torch.Generator().manual_seed(100 + width)
        out[name] = {**sd, "classifier.weight": torch.randn(width, 5, generator=g),
                     "classifier.bias": torch.randn(width, generator=g)}
    return out


def test_heads_are_kept_per_task_and_never_merged(setup):
    base, experts = setup
    base_h = with_heads({"base": base}, [2])["base"]
    experts_h = with_heads(experts, [3, 2, 4])
    twin = TwinCheckpoint.build(base_h, experts_h, rank_ratio=1.0, heads=r"^classifier\.")
    plain = TwinCheckpoint.build(base, experts, rank_ratio=1.0)
    assert "classifier.weight" not in twin.shared  # the base's head is dropped
    headed_tensors = {k: v for k, v in twin_tensors(twin).items()
                                  if not k.startswith("heads/")}
    for k, v in twin_tensors(plain).items():
        assert torch.equal(headed_tensors[k], v), k
    for task, width in zip(TASKS, [3, 2, 4]):
        assert torch.equal(twin.heads[task]["classifier.weight"],
                           experts_h[task]["classifier.weight"])
        assert twin.heads[task]["classifier.bias"].shape == (width,)
    w = torch.tensor([0.2, 0.1, 0.7])
    sd = twin.merged_state_dict(w)  # argmax -> qqp's head
    assert torch.equal(sd["classifier.weight"], experts_h["qqp"]["classifier.weight"])
    sd = twin.merged_state_dict(w, head="sst2")
    assert torch.equal(sd["classifier.bias"], experts_h["sst2"]["classifier.bias"])
    assert torch.equal(twin.merged_state_dict(w, head=1)["classifier.bias"],
                       experts_h["mnli"]["classifier.bias"])
    storage = twin.report()["storage"]
    assert storage["heads_bytes"] == 4 * (3 * 6 + 2 * 6 + 4 * 6)
    assert storage["one_model_bytes"] == storage["shared_bytes"] + storage["heads_bytes"] / 3


def test_heads_round_trip_and_old_files_without_heads(setup, tmp_path):
    base, experts = setup
    twin = TwinCheckpoint.build(base, with_heads(experts, [3, 2, 4]), rank=2,
                                heads=["^classifier\\."])
    twin.save(tmp_path / "h.safetensors")
    loaded = TwinCheckpoint.load(tmp_path / "h.safetensors")
    assert_twins_equal(twin, loaded)
    assert loaded.metadata["heads"] == ["^classifier\\."]
    # A file from before heads existed: no "heads" keys at all.
    plain = tmp_path / "plain.safetensors"
    TwinCheckpoint.build(base, experts, rank=2).save(plain)

    def drop(h):
        del h["heads"], h["tensors"]["heads"]
    rewrite(plain, tmp_path / "old.safetensors", meta=drop, checksums=False)
    with pytest.warns(UserWarning, match="has no checksums"):
        old = TwinCheckpoint.load(tmp_path / "old.safetensors")
    assert dict(old.heads) == {} and old.metadata["heads"] is None


def test_head_names_may_come_in_any_order(setup):
    base, experts = setup
    headed = with_heads(experts, [3, 2, 4])
    # Like a safetensors file, which lists its tensors sorted: bias before weight.
    headed["mnli"] = dict(sorted(headed["mnli"].items()))
    twin = TwinCheckpoint.build(base, headed, rank=1, heads="^classifier")
    assert all(list(h) == ["classifier.weight", "classifier.bias"] for h in twin.heads.values())
    assert torch.equal(twin.heads["mnli"]["classifier.bias"], headed["mnli"]["classifier.bias"])


def test_head_errors(setup):
    base, experts = setup
    with pytest.raises(ValueError, match=r"heads '\^nothing' match no tensor of experts\['sst2'\]"):
        TwinCheckpoint.build(base, experts, heads="^nothing")
    odd = with_heads(experts, [3, 2, 4])
    odd["qqp"]["classifier.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="experts must have the same head tensors"):
        TwinCheckpoint.build(base, odd, heads="^classifier")
    twin = TwinCheckpoint.build(base, experts, rank=1)
    with pytest.raises(ValueError, match="head='sst2' given, but the twin has no task heads"):
        twin.merged_state_dict([1.0, 0.0, 0.0], head="sst2")
    headed = TwinCheckpoint.build(base, with_heads(experts, [3, 2, 4]), rank=1, heads="^classifier")
    with pytest.raises(ValueError, match="unknown task 'cola'"):
        headed.merged_state_dict([1.0, 0.0, 0.0], head="cola")
    with pytest.raises(ValueError, match=r"task index must be in \[0, 3\), got 3"):
        headed.merged_state_dict([1.0, 0.0, 0.0], head=3)


# --- the attached router ------------------------------------------------------------------------

def trained_like_router(tasks=TASKS, seed=0):
    torch.manual_seed(seed)
    router = TwinRouter(8, tasks, hidden=6, layer=[0, -2], pooling=["mean", "cls"],
                        standardize=True)
    router.net[1].running_mean.uniform_()  # non-default buffers must round-trip too
    router.net[1].num_batches_tracked.fill_(7)
    router.feature_mean.uniform_()
    router.feature_std.uniform_(0.5, 2.0)
    return router.eval()


def test_router_round_trip(saved, tmp_path):
    twin, _ = saved
    router = trained_like_router()
    with_router = twin.with_router(router, info={"val_accuracy": 0.97})
    assert twin.router is None  # the original is untouched
    assert with_router.router is not router and not with_router.router.training
    path = tmp_path / "routed.safetensors"
    with_router.save(path)
    loaded = TwinCheckpoint.load(path)
    assert_twins_equal(with_router, loaded)
    assert loaded.metadata["router"] == {"config": router.config(),
                                         "info": {"val_accuracy": 0.97}}
    assert (loaded.router.layer, loaded.router.pooling, loaded.router.standardize) == (
        (0, -2), ("mean", "cls"), True)
    assert torch.equal(loaded.router.feature_std, router.feature_std)
    x = torch.randn(5, 8)
    assert torch.equal(loaded.router.weights(x), router.weights(x))
    assert loaded.to("cpu").router is not loaded.router


def test_router_errors(saved, tmp_path):
    twin, path = saved
    with pytest.raises(TypeError, match=r"router must be a Router \(TwinRouter, PrototypeRouter\)"):
        twin.with_router(torch.nn.Linear(2, 3))
    with pytest.raises(ValueError, match=r"router.tasks must be the twin's tasks in order"):
        twin.with_router(trained_like_router(list(reversed(TASKS))))
    with pytest.raises(TypeError, match="info must be JSON-serializable"):
        twin.with_router(trained_like_router(), info={"x": torch.zeros(1)})
    routed = tmp_path / "routed.safetensors"
    twin.with_router(trained_like_router()).save(routed)
    cases = {
        "missing": (dict(tensors=lambda d: d.pop("router/net.0.weight")),
                    r"tensor 'router/net.0.weight' is listed in the metadata but missing"),
        "config": (dict(meta=lambda h: h["router"]["config"].update(hidden=0)),
                   r"router.config is not a valid router config: .*hidden must be >= 1"),
        "tasks": (dict(meta=lambda h: h["router"]["config"].update(tasks=["a", "b", "c"])),
                  r"the router routes tasks \['a', 'b', 'c'\], the twin has"),
        "shape": (dict(tensors=lambda d: d.update({"router/net.0.weight": torch.zeros(6, 9)})),
                  r"tensor 'router/net.0.weight' has shape \[6, 9\], the metadata says \[6, 8\]"),
        "no_config": (dict(meta=lambda h: h.update(router={"info": {}})),
                      r"'router' must hold a 'config' object"),
    }
    for case, (edit, match) in cases.items():
        dst = tmp_path / f"{case}.safetensors"
        rewrite(routed, dst, **edit)
        with pytest.raises(ValueError, match=match):
            TwinCheckpoint.load(dst)
