"""twinmerge_ext.merging against hand-computed examples, on state dicts and safetensors files."""

import hashlib
import re

import pytest
import torch
from safetensors.torch import save_file

from twinmerge_ext import merging
from twinmerge_ext.merging import average, dare, task_arithmetic, ties

from conftest import DEVICES

METHODS = {
    "task_arithmetic": lambda base, experts, **kw: task_arithmetic(base, experts, scale=0.7, **kw),
    "ties": lambda base, experts, **kw: ties(base, experts, density=0.5, scale=0.8, **kw),
    "dare_ta": lambda base, experts, **kw: dare(base, experts, 0.3, 7, scale=0.7, **kw),
    "dare_ties": lambda base, experts, **kw: dare(base, experts, 0.3, 7, then="ties",
                                                  density=0.5, **kw),
    "average": lambda base, experts, **kw: average(experts, base=base, **kw),
}


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def random_model(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.0.weight": torch.randn(4, 6, generator=g).to(dtype),
        "enc.0.bias": torch.randn(4, generator=g).to(dtype),
        "head.weight": torch.randn(3, 4, generator=g).to(dtype),
        "logit_scale": torch.randn((), generator=g).to(dtype),
        "position_ids": torch.randint(0, 100, (1, 5), generator=g),
        "mask": torch.rand(5, generator=g) > 0.5,
    }


def assert_same(actual, expected, ordered=True):
    """Same names (in the same order if ordered), same dtypes, bit-identical values."""
    assert list(actual) == list(expected) if ordered else sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert torch.equal(actual[name], expected[name]), (name, actual[name], expected[name])


# --- task arithmetic ----------------------------------------------------------------------------

def test_task_arithmetic_hand_computed():
    base = {"a": t([1, 2], [3, 4]), "b": t(0.5, -1), "c": torch.tensor(2.0)}
    e1 = {"a": t([2, 2], [3, 6]), "b": t(1.5, -1), "c": torch.tensor(3.0)}
    e2 = {"a": t([1, 0], [5, 4]), "b": t(0.5, 1), "c": torch.tensor(1.0)}
    # a: τ1 + τ2 = [[1, 0], [0, 2]] + [[0, -2], [2, 0]]; b: [1, 0] + [0, 2]; c: 1 + (-1).
    expected = {"a": t([1.5, 1], [4, 5]), "b": t(1.0, 0.0), "c": torch.tensor(2.0)}
    assert_same(task_arithmetic(base, [e1, e2], scale=0.5), expected)


def test_task_arithmetic_default_scale_is_0_3():
    out = task_arithmetic({"w": t(1.0, 1.0)}, [{"w": t(2.0, 3.0)}])
    torch.testing.assert_close(out["w"], t(1.3, 1.6))


def test_outputs_are_new_tensors_in_base_order():
    base = {"z": t(1.0), "a": t(2.0), "ids": torch.arange(2)}
    out = task_arithmetic(base, [{"a": t(3.0), "ids": torch.arange(2), "z": t(1.0)}],
                          exclude="z")
    assert list(out) == ["z", "a", "ids"]
    for name in base:
        assert out[name].data_ptr() != base[name].data_ptr(), name


# --- TIES ---------------------------------------------------------------------------------------

TIES_BASE = t(1, -1, 0.5, 2, 0, 1)
# density 0.5 keeps 3 of 6 entries per expert (trimmed below); the small entries go.
TIES_TAUS = [
    t(1, 6, -0.5, 0.25, 2, 0.5),       # trimmed: [ 1, 6, 0, 0,  2,  0]
    t(1, 0.5, 3, -0.25, -4, 0.5),      # trimmed: [ 1, 0, 3, 0, -4,  0]
    t(-5, 0.5, 1, -0.75, 0.25, -2),    # trimmed: [-5, 0, 1, 0,  0, -2]
]
# Summed mass [-3, 6, 4, 0, -2, -2] elects signs [-, +, +, 0, -, -]; entry 0 goes negative
# although 2 of 3 experts are positive there. Disjoint means: [-5, 6, (3+1)/2, 0, -4, -2].
TIES_MERGED = t(-5, 6, 2, 0, -4, -2)


def test_ties_hand_computed():
    experts = [{"w": TIES_BASE + tau} for tau in TIES_TAUS]
    out = ties({"w": TIES_BASE}, experts, density=0.5, scale=0.5)
    assert torch.equal(out["w"], TIES_BASE + 0.5 * TIES_MERGED)
    assert out["w"][0] < TIES_BASE[0]  # mass, not head count, elects the sign


@pytest.mark.parametrize("density, numel, kept", [
    (0.7, 10, 7), (0.25, 10, 3), (0.05, 10, 1), (0.5, 10, 5), (1.0, 10, 10),
    (0.07, 100, 7),  # 0.07 * 100 == 7.000000000000001 in binary floating point
])
def test_ties_keeps_ceil_of_density_times_numel(density, numel, kept):
    tau = torch.arange(1.0, numel + 1.0) * torch.tensor([1.0, -1.0]).repeat(numel // 2)
    out = ties({"w": torch.zeros(numel)}, [{"w": tau}], density=density, scale=1.0)
    expected = torch.where(tau.abs() > numel - kept, tau, 0)  # one expert: merged = trimmed τ
    assert torch.equal(out["w"], expected)


def test_ties_breaks_magnitude_ties_by_lowest_flat_index():
    tau = t([1, -3, 2], [3, 2, 2])  # keep 3: both 3s, then the first of the three 2s
    out = ties({"w": torch.zeros(2, 3)}, [{"w": tau}], density=0.5, scale=1.0)
    assert torch.equal(out["w"], t([0, -3, 2], [3, 0, 0]))


def test_ties_zero_mass_and_fully_trimmed_entries_stay_at_base():
    base = {"w": t(1, 1, 1, 1)}
    experts = [{"w": t(3, 1, 1.5, 1)}, {"w": t(-1, 1, 1, 1)}]  # τ = [2, 0, 0.5, 0], [-2, 0, 0, 0]
    out = ties(base, experts, density=0.25, scale=1.0)  # keeps one entry each: the ±2
    assert torch.equal(out["w"], t(1, 1, 1, 1))


def test_ties_density_one_is_disjoint_mean_without_trimming():
    out = ties({"w": torch.zeros(3)}, [{"w": t(1, -2, 4)}, {"w": t(3, 1, -1)}], density=1.0,
               scale=1.0)
    # sums [4, -1, 3] -> means over agreeing experts [2, -2, 4]
    assert torch.equal(out["w"], t(2, -2, 4))


# --- DARE ---------------------------------------------------------------------------------------

def test_dare_without_drops_is_the_then_method():
    base, experts = random_model(0), [random_model(s) for s in (1, 2, 3)]
    assert_same(dare(base, experts, 0.0, 5, scale=0.7), task_arithmetic(base, experts, 0.7))
    assert_same(dare(base, experts, 0.0, 5, then="ties", density=0.5, scale=0.8),
                ties(base, experts, density=0.5, scale=0.8))


def test_dare_default_then_kwargs():
    base, experts = random_model(0), [random_model(s) for s in (1, 2)]
    assert_same(dare(base, experts, 0.0, 5), task_arithmetic(base, experts, scale=0.3))
    assert_same(dare(base, experts, 0.0, 5, then="ties"), ties(base, experts, 0.2, 1.0))


@pytest.mark.parametrize("then", ["task_arithmetic", "ties"])
def test_dare_is_reproducible_and_depends_on_the_seed(then):
    base, experts = random_model(0), [random_model(s) for s in (1, 2)]
    first = dare(base, experts, 0.5, 11, then=then)
    assert_same(dare(base, experts, 0.5, 11, then=then), first)
    other = dare(base, experts, 0.5, 12, then=then)
    assert not torch.equal(other["enc.0.weight"], first["enc.0.weight"])


@pytest.mark.parametrize("then", ["task_arithmetic", "ties"])
def test_dare_is_independent_of_expert_and_parameter_order(then):
    # Integer task vectors and p = 0.5 (rescale by 2) make every sum exact, so the comparison
    # is bitwise whatever the summation order.
    def model(seed):
        g = torch.Generator().manual_seed(seed)
        return {name: torch.randint(-8, 8, shape, generator=g).float()
                for name, shape in [("a", (8, 8)), ("b", (16,)), ("c", (4, 4))]}

    base = model(0)
    experts = {"x": model(1), "y": model(2), "z": model(3)}
    forward = dare(base, experts, 0.5, 3, then=then, scale=1.0)
    reverse = lambda sd: dict(reversed(list(sd.items())))
    backward = dare(reverse(base), {k: reverse(v) for k, v in reverse(experts).items()}, 0.5, 3,
                    then=then, scale=1.0)
    assert list(backward) == ["c", "b", "a"]
    for name in base:
        assert torch.equal(backward[name], forward[name]), name


def test_dare_survivors_are_rescaled_by_one_over_keep_probability():
    p = 0.3
    tau = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    out = dare({"w": torch.zeros(1000)}, [{"w": tau}], p, 0, scale=1.0)["w"]
    kept = out != 0
    assert 600 < kept.sum() < 800
    assert torch.equal(out[kept], tau[kept] / (1 - p))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dare_drop_fraction_is_near_p(p):
    n = 200_000
    out = dare({"w": torch.zeros(n)}, [{"w": torch.ones(n)}], p, 1, scale=1.0)["w"]
    assert abs((out == 0).float().mean().item() - p) < 0.01  # > 10 standard deviations


def test_dare_masks_differ_across_parameters_and_experts():
    n = 1000
    base = {"a": torch.zeros(n), "b": torch.zeros(n)}
    experts = [{"a": torch.ones(n), "b": torch.ones(n)},
               {"a": torch.full((n,), 1000.0), "b": torch.full((n,), 1000.0)}]
    out = dare(base, experts, 0.5, 0, scale=1.0)
    # Entries are 2·m1 + 2000·m2, so both masks can be read back.
    masks = {name: ((out[name] % 1000 != 0), out[name] >= 2000) for name in base}
    assert not torch.equal(masks["a"][0], masks["a"][1])
    assert not torch.equal(masks["a"][0], masks["b"][0])
    assert not torch.equal(masks["a"][1], masks["b"][1])


def test_dare_ties_applies_the_same_masks_then_ties():
    base, experts = random_model(0), [random_model(1)]
    # With one expert and density 1, TIES returns the (dropped, rescaled) task vector.
    assert_same(dare(base, experts, 0.4, 9, then="ties", density=1.0, scale=1.0),
                dare(base, experts, 0.4, 9, scale=1.0))


def test_dare_seed_derivation_is_stable():
    # A salted hash() or a change of derivation would break reproducibility across processes
    # and releases: pin the value.
    assert merging._dare_seed(0, "w", "0") == 477311401669530093
    assert merging._dare_seed(1234, "encoder.layer.0.weight", "cola") == 3105397149074329054


def test_dare_expert_keys_are_names_for_mappings_and_positions_for_sequences():
    base, e1, e2 = random_model(0), random_model(1), random_model(2)
    as_list = dare(base, [e1, e2], 0.5, 3)
    assert_same(dare(base, {"0": e1, "1": e2}, 0.5, 3), as_list)
    assert not torch.equal(dare(base, {"a": e1, "b": e2}, 0.5, 3)["enc.0.weight"],
                           as_list["enc.0.weight"])


# --- average ------------------------------------------------------------------------------------

def test_average_hand_computed():
    experts = [{"w": t([1, 2], [3, 4])}, {"w": t([3, 2], [1, 0])}, {"w": t([2, 5], [2, 2])}]
    assert torch.equal(average(experts)["w"], t([2, 3], [2, 2]))


def test_average_takes_unmerged_tensors_from_base_or_first_expert():
    experts = [{"w": t(1, 3), "v": t(5.0), "ids": torch.arange(3) + 1},
               {"w": t(3, 5), "v": t(7.0), "ids": torch.arange(3) + 2}]
    base = {"w": t(0, 0), "v": t(9.0), "ids": torch.arange(3)}
    out = average(experts, exclude="^v$")
    assert_same(out, {"w": t(2, 4), "v": t(5.0), "ids": torch.arange(3) + 1})
    out = average(experts, base=base, exclude="^v$")
    assert_same(out, {"w": t(2, 4), "v": t(9.0), "ids": torch.arange(3)})


def test_average_with_base_equals_task_arithmetic_with_scale_one_over_t():
    base = random_model(0, torch.float64)
    experts = [random_model(s, torch.float64) for s in (1, 2, 3, 4)]
    out, ta = average(experts, base=base), task_arithmetic(base, experts, scale=0.25)
    for name in base:
        torch.testing.assert_close(out[name], ta[name], rtol=1e-12, atol=1e-12)


# --- selection and non-floating tensors ---------------------------------------------------------

NAMES = ["enc.0.weight", "enc.0.bias", "head.weight", "head.bias"]


@pytest.mark.parametrize("include, exclude, merged", [
    (None, None, NAMES),
    (r"\.weight$", None, ["enc.0.weight", "head.weight"]),
    (None, [r"^head\."], ["enc.0.weight", "enc.0.bias"]),
    ("enc", "bias", ["enc.0.weight"]),
    ([r"bias", r"^head"], r"head\.bias", ["enc.0.bias", "head.weight"]),
    ([], None, []),
])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_include_exclude_select_parameters(method, include, exclude, merged):
    base = {name: torch.zeros(4) for name in NAMES}
    experts = [{name: torch.full((4,), 2.0) for name in NAMES} for _ in range(2)]
    out = METHODS[method](base, experts, include=include, exclude=exclude)
    assert [name for name in NAMES if not torch.equal(out[name], base[name])] == merged


@pytest.mark.parametrize("method", sorted(METHODS))
def test_non_floating_tensors_are_copied_from_the_base(method):
    base = random_model(0)
    experts = [random_model(s) for s in (1, 2)]
    out = METHODS[method](base, experts)
    for name in ("position_ids", "mask"):
        assert out[name].dtype == base[name].dtype
        assert torch.equal(out[name], base[name]) and not torch.equal(out[name], experts[0][name])
        assert out[name].data_ptr() != base[name].data_ptr()
    assert not torch.equal(out["enc.0.weight"], base["enc.0.weight"])


# --- dtypes and devices -------------------------------------------------------------------------

def test_bf16_is_computed_in_fp32():
    step = 2.0**-7  # one bf16 ulp at 1.0
    base = {"w": torch.ones(4, dtype=torch.bfloat16)}
    experts = [{"w": torch.full((4,), 1 + step, dtype=torch.bfloat16)} for _ in range(3)]
    out = task_arithmetic(base, experts, scale=0.3)["w"]
    # fp32: 1 + 0.9·step rounds up to 1 + step. Adding each 0.3·step in bf16 would round away
    # every time and leave 1.0.
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.full((4,), 1 + step, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_half_inputs_match_fp32_merge_cast_back(method, dtype):
    base, experts = random_model(0, dtype), [random_model(s, dtype) for s in (1, 2, 3)]
    up = lambda sd: {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    expected = METHODS[method](up(base), [up(e) for e in experts])
    out = METHODS[method](base, experts)
    assert_same(out, {k: v.to(base[k].dtype) for k, v in expected.items()})


def test_float64_is_computed_in_float64():
    out = task_arithmetic({"w": torch.ones(3, dtype=torch.float64)},
                          [{"w": torch.full((3,), 1 + 1e-12, dtype=torch.float64)}], scale=1.0)
    assert out["w"].dtype == torch.float64
    torch.testing.assert_close(out["w"] - 1, torch.full((3,), 1e-12, dtype=torch.float64),
                               rtol=1e-3, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_outputs_live_on_the_base_device(method, device):
    base, experts = random_model(0), [random_model(s) for s in (1, 2)]
    on_device = {k: v.to(device) for k, v in base.items()}
    out = METHODS[method](on_device, experts)  # experts stay on the CPU
    expected = METHODS[method](base, experts)
    for name in base:
        assert out[name].device.type == device, name
        torch.testing.assert_close(out[name].cpu(), expected[name], rtol=1e-5, atol=1e-5)


# --- safetensors --------------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    models = {"base": random_model(0)}
    models.update({name: random_model(s) for s, name in enumerate(("x", "y", "z"), 1)})
    for sd in models.values():
        sd["enc.0.bias"] = sd["enc.0.bias"].bfloat16()
    paths = {}
    for name, sd in models.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(sd, str(paths[name]))
    return models, paths


@pytest.mark.parametrize("method", sorted(METHODS))
def test_safetensors_inputs_match_state_dicts(files, method):
    models, paths = files
    names = ["x", "y", "z"]
    # A file's names come in safetensors' order (sorted), a state dict's in insertion order.
    expected = METHODS[method](models["base"], {n: models[n] for n in names})
    assert_same(METHODS[method](paths["base"], {n: paths[n] for n in names}), expected, False)
    assert_same(METHODS[method](str(paths["base"]), {n: str(paths[n]) for n in names}), expected,
                False)
    assert_same(METHODS[method](models["base"], {n: paths[n] for n in names}), expected)
    expected = METHODS[method](models["base"], [models[n] for n in names])
    assert_same(METHODS[method](paths["base"], [paths[n] for n in names]), expected, False)


def test_files_are_read_one_tensor_at_a_time(files, monkeypatch):
    models, paths = files
    reads = []
    get = merging._Source.get
    monkeypatch.setattr(merging._Source, "get",
                        lambda self, name: reads.append((self.label, name)) or get(self, name))
    ties(paths["base"], [paths[n] for n in ("x", "y", "z")], include=r"^head\.weight$")
    # Unselected parameters of the experts are never read; each selected one exactly once.
    assert sorted(reads) == [("base", "head.weight")] + [
        (f"experts[{i}]", "head.weight") for i in range(3)]


# --- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_experts(method):
    for empty in ([], {}):
        with pytest.raises(ValueError, match="experts must hold at least one expert, got 0"):
            METHODS[method]({"w": t(1.0)}, empty)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_expert_missing_or_extra_parameter(method):
    base = {"a": t(1.0), "b": t(2.0)}
    with pytest.raises(ValueError, match=r"experts\[1\] is missing parameter 'b' that base has"):
        METHODS[method](base, [{"a": t(1.0), "b": t(1.0)}, {"a": t(1.0)}])
    with pytest.raises(ValueError, match=r"experts\['y'\] is missing parameter 'a'"):
        METHODS[method](base, {"x": dict(base), "y": {"b": t(1.0)}})
    with pytest.raises(ValueError, match=r"experts\[0\] has parameter 'c' that base does not"):
        METHODS[method](base, [{"a": t(1.0), "b": t(1.0), "c": t(1.0)}])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_shape_and_dtype_mismatch(method):
    base = {"w": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match=r"parameter 'w' has shape \[2, 3\] in base but \[3, 2\] "
                                         r"in experts\[0\]"):
        METHODS[method](base, [{"w": torch.zeros(3, 2)}])
    with pytest.raises(ValueError, match=r"parameter 'w' has dtype torch.float32 in base but "
                                         r"torch.float16 in experts\[1\]"):
        METHODS[method](base, [{"w": torch.zeros(2, 3)}, {"w": torch.zeros(2, 3).half()}])


def test_average_without_base_checks_against_the_first_expert():
    with pytest.raises(ValueError, match=r"shape \[2\] in experts\[0\] but \[3\] in experts\[1\]"):
        average([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}])


@pytest.mark.parametrize("density", [0, -0.1, 1.5])
def test_bad_density(density):
    with pytest.raises(ValueError, match=r"ties: density must be in \(0, 1\], got"):
        ties({"w": t(1.0)}, [{"w": t(2.0)}], density=density)
    with pytest.raises(ValueError, match=r"dare: density must be in \(0, 1\], got"):
        dare({"w": t(1.0)}, [{"w": t(2.0)}], 0.1, 0, then="ties", density=density)


@pytest.mark.parametrize("drop_rate", [1.0, -0.1, 2])
def test_bad_drop_rate(drop_rate):
    with pytest.raises(ValueError, match=rf"dare: drop_rate must be in \[0, 1\), got {drop_rate}"):
        dare({"w": t(1.0)}, [{"w": t(2.0)}], drop_rate, 0)


def test_bad_dare_arguments():
    args = ({"w": t(1.0)}, [{"w": t(2.0)}], 0.1)
    with pytest.raises(ValueError, match=r"dare: then must be one of .*got 'magnitude'"):
        dare(*args, 0, then="magnitude")
    with pytest.raises(TypeError, match=r"dare: then='task_arithmetic' takes \['scale'\], got "
                                        r"unexpected \['density'\]"):
        dare(*args, 0, density=0.5)
    with pytest.raises(TypeError, match=r"dare: seed must be an int, got 0.5"):
        dare(*args, 0.5)


def test_bad_paths(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ValueError, match=r"task_arithmetic: base path '.*missing.safetensors' "
                                         r"does not exist"):
        task_arithmetic(missing, [{"w": t(1.0)}])
    text = tmp_path / "notes.safetensors"
    text.write_text("not a safetensors file at all")
    with pytest.raises(ValueError, match=r"ties: experts\[0\] path '.*notes.safetensors' is not a "
                                         r"safetensors file"):
        ties({"w": t(1.0)}, [text])
    with pytest.raises(ValueError, match=r"average: experts\['a'\] path .* is not a safetensors"):
        average({"a": tmp_path})


@pytest.mark.parametrize("arg", ["include", "exclude"])
def test_bad_regex(arg):
    with pytest.raises(ValueError, match=rf"task_arithmetic: {arg} pattern 'enc\[' is not a "
                                         rf"valid regex"):
        task_arithmetic({"w": t(1.0)}, [{"w": t(2.0)}], **{arg: ["ok", "enc["]})
    with pytest.raises(TypeError, match=rf"average: {arg} must be a regex string or a list"):
        average([{"w": t(2.0)}], **{arg: 3})


def test_bad_types():
    base, expert = {"w": t(1.0)}, {"w": t(2.0)}
    with pytest.raises(TypeError, match="experts must be a sequence or a mapping of experts, got "
                                        "a single state dict"):
        task_arithmetic(base, expert)
    with pytest.raises(TypeError, match="got a single str; wrap it in a list"):
        task_arithmetic(base, "expert.safetensors")
    with pytest.raises(TypeError, match="base must be a state dict .* got int"):
        task_arithmetic(3, [expert])
    with pytest.raises(TypeError, match=r"base must be a state dict .* nn.Module \(Linear\)"):
        task_arithmetic(torch.nn.Linear(2, 2), [expert])
    with pytest.raises(TypeError, match=r"experts\[0\] must map parameter names to tensors, got "
                                        r"'w': list"):
        ties(base, [{"w": [2.0]}])
    with pytest.raises(TypeError, match="task_arithmetic: scale must be a real number, got '0.3'"):
        task_arithmetic(base, [expert], scale="0.3")


# --- inputs are left alone ----------------------------------------------------------------------

def test_inputs_are_not_modified(files):
    models, paths = files
    digests = {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in paths.items()}
    snapshot = {n: {k: v.clone() for k, v in sd.items()} for n, sd in models.items()}
    experts = [models[n] for n in ("x", "y", "z")]
    for method in METHODS.values():
        method(models["base"], experts)
        method(paths["base"], [paths[n] for n in ("x", "y", "z")])
    ties(models["base"], experts, density=1.0)
    dare(models["base"], experts, 0.0, 0, then="ties", density=1.0)
    for name, sd in snapshot.items():
        assert_same(models[name], sd)
    assert digests == {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in paths.items()}


def test_progress_bar_gives_the_same_result():
    base, experts = random_model(0), [random_model(s) for s in (1, 2)]
    assert_same(ties(base, experts, progress=True), ties(base, experts))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare", "average"])
@pytest.mark.parametrize("where", ["base", "expert"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensors_are_named_not_merged(method, where, value):
    base = {"w": torch.randn(4, 5), "b": torch.randn(5)}
    experts = {t: {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for t in "xyz"}
    bad = (base if where == "base" else experts["y"])["w"]
    bad[1, 2] = value
    kwargs = {"dare": dict(drop_rate=0.5, seed=0, then="ties")}.get(method, {})
    label = "base" if where == "base" else "experts['y']"
    with pytest.raises(ValueError, match=rf"{method}: parameter 'w' of {re.escape(label)} has 1 "
                                         rf"NaN/Inf entries \(of 20\)"):
        if method == "average":
            merging.average(experts, base=base, **kwargs)
        else:
            getattr(merging, method)(base, experts, **kwargs)


@pytest.mark.parametrize("arg", ["scale", "density"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_hyper_parameters_are_refused(arg, value):
    base = {"w": torch.randn(3, 3)}
    experts = [{"w": base["w"] + 1}]
    with pytest.raises(ValueError, match=re.escape(f"ties: {arg} must be finite, got {value!r}")):
        merging.ties(base, experts, **{arg: value})


@pytest.mark.parametrize("shape", [(7,), (13, 9), (40, 33)])
@pytest.mark.parametrize("density", [0.1, 0.2, 0.5, 0.9, 1.0])
def test_ties_trim_keeps_the_largest_entries_lowest_index_first_on_ties(shape, density):
    """TIES' trim of a stack of task vectors against a full stable sort: exactly
    ceil(density·n) entries kept per expert, ties at the threshold broken by the lowest flat
    index, an expert that leaves the tensor unchanged left at zero."""
    from twinmerge_ext.merging import _kept_count, _trim_stack
    g = torch.Generator().manual_seed(0)
    taus = torch.randn((4,) + shape, generator=g)
    taus[1] = 0
    taus[2] = torch.randint(-2, 3, shape, generator=g).float()  # many ties
    out = _trim_stack(taus, density)
    n, k = taus[0].numel(), _kept_count(taus[0].numel(), density)
    for tau, got in zip(taus, out):
        order = torch.sort(tau.abs().flatten(), descending=True, stable=True).indices
        want = torch.zeros(n)
        want[order[:k]] = tau.flatten()[order[:k]]
        assert torch.equal(got.flatten(), want)
