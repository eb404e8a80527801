"""The adversarial suite: what a careless or hostile caller passes to each public entry point,
and the error it must get: the right type, a message that names the function, the argument and
the value, raised before anything changes (checked for the calls that change state: the ops'
outputs, a wrapped module, a saved file).

Each case is (id, call, exception type, regex of the message). The ops' own cases, with their
shapes and dtypes, are in test_ops.py and test_fuzz.py; the file faults in
test_checkpoint_faults.py.
"""

import functools
import os

import pytest
import torch
from torch import nn

from twinmerge_ext import (LoraExpert, TwinCheckpoint, TwinMergedModule, TwinRouter, fit_router,
                           merging, pooled_features)
from twinmerge_ext.router import pool_hidden_states

NAN, INF = float("nan"), float("inf")
TASKS = ["a", "b", "c"]


class _Tiny(nn.Module):
    """An embedding, a LayerNorm and a Linear: one layer of each kind the factored mode mixes."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.proj = nn.Linear(6, 4)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
        h = self.norm(self.emb(input_ids))
        y = self.proj(h)
        if output_hidden_states:
            return {"hidden_states": (h, y[..., :4]), "logits": y}
        return y


@functools.cache
def _base():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in _Tiny().state_dict().items()}


@functools.cache
def _experts():
    g = torch.Generator().manual_seed(1)
    return {t: {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in _base().items()}
            for t in TASKS}


@functools.cache
def _twin():
    return TwinCheckpoint.build(_base(), _experts(), rank=2)


def _wrapped(**kw):
    return TwinMergedModule(_Tiny(), _twin(), **kw)


def _ids(B=2, L=3):
    return torch.randint(0, 11, (B, L), generator=torch.Generator().manual_seed(B))


def _with(d, **changes):
    out = dict(d)
    out.update(changes)
    return out


def _nan_expert(name="proj.weight", task="b"):
    e = {t: dict(sd) for t, sd in _experts().items()}
    t = e[task][name].clone()
    t.view(-1)[0] = NAN
    e[task][name] = t
    return e


def _router(**kw):
    return TwinRouter(6, TASKS, **kw).eval()


def _make_wrapped_twice():
    w = _wrapped()
    return TwinMergedModule(w.module, _twin())


def _unwrapped_call():
    w = _wrapped()
    w.unwrap()
    return w(_ids(), mix_weights=torch.tensor([1.0, 0, 0]))


def _merged_nested():
    w = _wrapped()
    with w.merged(torch.tensor([1.0, 0, 0])):
        with w.merged(torch.tensor([0, 1.0, 0])):
            pass


def _factored_nan_row():
    rw = torch.softmax(torch.randn(2, 3), -1)
    rw[1, 2] = NAN
    return _wrapped(mode="factored")(_ids(), mix_weights=rw)


def _router_nan_features():
    w = _wrapped(router=_router(), mode="factored",
                 router_features=lambda m, a, k: torch.full((a[0].shape[0], 6), NAN))
    return w(_ids())


CASES = [
    # --- merging ----------------------------------------------------------------------------
    ("ta/experts_str", lambda: merging.task_arithmetic(_base(), "x.safetensors"), TypeError,
     r"task_arithmetic: experts must be a sequence .* got a single str"),
    ("ta/experts_empty", lambda: merging.task_arithmetic(_base(), []), ValueError,
     r"task_arithmetic: experts must hold at least one expert, got 0"),
    ("ta/experts_one_state_dict", lambda: merging.task_arithmetic(_base(), _experts()["a"]),
     TypeError, r"task_arithmetic: experts must be a sequence or a mapping of experts, got a "
                r"single state dict"),
    ("ta/expert_module", lambda: merging.task_arithmetic(_base(), [_Tiny()]), TypeError,
     r"task_arithmetic: experts\[0\] must be a state dict or a .safetensors path, got an "
     r"nn.Module \(_Tiny\)"),
    ("ta/expert_int", lambda: merging.task_arithmetic(_base(), [3]), TypeError,
     r"task_arithmetic: experts\[0\] must be a state dict .* got int"),
    ("ta/expert_bad_value", lambda: merging.task_arithmetic(_base(), [{"emb.weight": 1.0}]),
     TypeError, r"task_arithmetic: experts\[0\] must map parameter names to tensors, got "
                r"'emb.weight': float"),
    ("ta/expert_missing_path", lambda: merging.task_arithmetic(_base(), ["/nonexistent/x"]),
     ValueError, r"task_arithmetic: experts\[0\] path '/nonexistent/x' does not exist"),
    ("ta/expert_missing_param",
     lambda: merging.task_arithmetic(_base(), [{k: v for k, v in _base().items()
                                                if k != "norm.bias"}]),
     ValueError, r"task_arithmetic: experts\[0\] is missing parameter 'norm.bias'"),
    ("ta/expert_extra_param",
     lambda: merging.task_arithmetic(_base(), [_with(_base(), extra=torch.zeros(1))]),
     ValueError, r"task_arithmetic: experts\[0\] has parameter 'extra' that base does not have"),
    ("ta/expert_shape",
     lambda: merging.task_arithmetic(_base(), [_with(_base(), **{"norm.bias": torch.zeros(7)})]),
     ValueError, r"task_arithmetic: parameter 'norm.bias' has shape \[6\] in base but \[7\] in "
                 r"experts\[0\]"),
    ("ta/expert_dtype",
     lambda: merging.task_arithmetic(_base(), [_with(_base(), **{"norm.bias":
                                                                 torch.zeros(6).double()})]),
     ValueError, r"task_arithmetic: parameter 'norm.bias' has dtype torch.float32 in base but "
                 r"torch.float64"),
    ("ta/scale_str", lambda: merging.task_arithmetic(_base(), [_base()], scale="0.3"), TypeError,
     r"task_arithmetic: scale must be a real number, got '0.3'"),
    ("ta/scale_bool", lambda: merging.task_arithmetic(_base(), [_base()], scale=True), TypeError,
     r"task_arithmetic: scale must be a real number, got True"),
    ("ta/scale_nan", lambda: merging.task_arithmetic(_base(), [_base()], scale=NAN), ValueError,
     r"task_arithmetic: scale must be finite, got nan"),
    ("ta/scale_inf", lambda: merging.task_arithmetic(_base(), [_base()], scale=-INF), ValueError,
     r"task_arithmetic: scale must be finite, got -inf"),
    ("ta/include_regex", lambda: merging.task_arithmetic(_base(), [_base()], include="(("),
     ValueError, r"task_arithmetic: include pattern '\(\(' is not a valid regex"),
    ("ta/exclude_type", lambda: merging.task_arithmetic(_base(), [_base()], exclude=3),
     TypeError, r"task_arithmetic: exclude must be a regex string or a list of them, got 3"),
    ("ta/nan_expert", lambda: merging.task_arithmetic(_base(), _nan_expert()), ValueError,
     r"task_arithmetic: parameter 'proj.weight' of experts\['b'\] has 1 NaN/Inf entries"),
    ("ta/nan_base",
     lambda: merging.task_arithmetic(_nan_expert(task="a")["a"], [_base()]), ValueError,
     r"task_arithmetic: parameter 'proj.weight' of base has 1 NaN/Inf entries"),
    ("ties/nan_expert", lambda: merging.ties(_base(), _nan_expert("norm.bias")), ValueError,
     r"ties: parameter 'norm.bias' of experts\['b'\] has 1 NaN/Inf entries"),
    ("ties/density_zero", lambda: merging.ties(_base(), [_base()], density=0), ValueError,
     r"ties: density must be in \(0, 1\], got 0"),
    ("ties/density_big", lambda: merging.ties(_base(), [_base()], density=1.5), ValueError,
     r"ties: density must be in \(0, 1\], got 1.5"),
    ("ties/density_nan", lambda: merging.ties(_base(), [_base()], density=NAN), ValueError,
     r"ties: density must be finite, got nan"),
    ("ties/scale_inf", lambda: merging.ties(_base(), [_base()], scale=INF), ValueError,
     r"ties: scale must be finite, got inf"),
    ("dare/nan_expert", lambda: merging.dare(_base(), _nan_expert(), 0.5, 0), ValueError,
     r"dare: parameter 'proj.weight' of experts\['b'\] has 1 NaN/Inf entries"),
    ("dare/drop_one", lambda: merging.dare(_base(), [_base()], 1.0, 0), ValueError,
     r"dare: drop_rate must be in \[0, 1\), got 1.0"),
    ("dare/drop_nan", lambda: merging.dare(_base(), [_base()], NAN, 0), ValueError,
     r"dare: drop_rate must be finite, got nan"),
    ("dare/seed_float", lambda: merging.dare(_base(), [_base()], 0.5, 1.5), TypeError,
     r"dare: seed must be an int, got 1.5"),
    ("dare/then", lambda: merging.dare(_base(), [_base()], 0.5, 0, then="avg"), ValueError,
     r"dare: then must be one of \['task_arithmetic', 'ties'\], got 'avg'"),
    ("dare/then_kwarg", lambda: merging.dare(_base(), [_base()], 0.5, 0, density=0.3),
     TypeError, r"dare: then='task_arithmetic' takes \['scale'\], got unexpected \['density'\]"),
    ("average/nan_expert", lambda: merging.average(_nan_expert("emb.weight", "c")), ValueError,
     r"average: parameter 'emb.weight' of experts\['c'\] has 1 NaN/Inf entries"),
    ("average/no_experts", lambda: merging.average({}), ValueError,
     r"average: experts must hold at least one expert, got 0"),

    # --- TwinCheckpoint.build and its use -----------------------------------------------------
    ("build/experts_list", lambda: TwinCheckpoint.build(_base(), [_base()]), TypeError,
     r"TwinCheckpoint.build: experts must be a mapping task name"),
    ("build/task_name_int", lambda: TwinCheckpoint.build(_base(), {0: _base()}), TypeError,
     r"TwinCheckpoint.build: task names \(the keys of experts\) must be str, got 0 \(int\)"),
    ("build/no_experts", lambda: TwinCheckpoint.build(_base(), {}), ValueError,
     r"TwinCheckpoint.build: experts must hold at least one expert, got 0"),
    ("build/shared_method", lambda: TwinCheckpoint.build(_base(), _experts(), shared="mean"),
     ValueError, r"TwinCheckpoint.build: shared must be one of .*, got 'mean'"),
    ("build/shared_kwargs_type",
     lambda: TwinCheckpoint.build(_base(), _experts(), shared_kwargs=[("scale", 1)]), TypeError,
     r"TwinCheckpoint.build: shared_kwargs must be a mapping or None, got list"),
    ("build/shared_kwargs_reserved",
     lambda: TwinCheckpoint.build(_base(), _experts(), shared_kwargs={"include": "x"}),
     TypeError, r"TwinCheckpoint.build: shared_kwargs may not set \['include'\]"),
    ("build/shared_kwargs_json",
     lambda: TwinCheckpoint.build(_base(), _experts(), shared_kwargs={"scale": torch.ones(1)}),
     TypeError, r"TwinCheckpoint.build: shared_kwargs must be JSON-serializable"),
    ("build/shared_scale_nan",
     lambda: TwinCheckpoint.build(_base(), _experts(), shared_kwargs={"scale": NAN}),
     (TypeError, ValueError), r"TwinCheckpoint.build: shared_kwargs must be JSON-serializable|"
                              r"task_arithmetic: scale must be finite, got nan"),
    ("build/rank_zero", lambda: TwinCheckpoint.build(_base(), _experts(), rank=0), ValueError,
     r"TwinCheckpoint.build: rank must be >= 1, got 0"),
    ("build/rank_float", lambda: TwinCheckpoint.build(_base(), _experts(), rank=2.0), TypeError,
     r"TwinCheckpoint.build: rank must be an int, got 2.0 \(float\)"),
    ("build/rank_ratio_zero",
     lambda: TwinCheckpoint.build(_base(), _experts(), rank_ratio=0.0), ValueError,
     r"TwinCheckpoint.build: rank_ratio must be in \(0, 1\], got 0.0"),
    ("build/rank_ratio_nan",
     lambda: TwinCheckpoint.build(_base(), _experts(), rank_ratio=NAN), ValueError,
     r"TwinCheckpoint.build: rank_ratio must be finite, got nan"),
    ("build/oversample_negative",
     lambda: TwinCheckpoint.build(_base(), _experts(), oversample=-1), ValueError,
     r"TwinCheckpoint.build: oversample must be >= 0, got -1"),
    ("build/n_iter_str", lambda: TwinCheckpoint.build(_base(), _experts(), n_iter="2"),
     TypeError, r"TwinCheckpoint.build: n_iter must be an int, got '2' \(str\)"),
    ("build/seed_negative", lambda: TwinCheckpoint.build(_base(), _experts(), seed=-3),
     ValueError, r"TwinCheckpoint.build: seed must be >= 0, got -3"),
    ("build/heads_match_nothing",
     lambda: TwinCheckpoint.build(_base(), _experts(), heads=r"^classifier\."), ValueError,
     r"TwinCheckpoint.build: heads '\^classifier\\\\.' match no tensor of experts\['a'\]"),
    ("build/nan_delta", lambda: TwinCheckpoint.build(_base(), _nan_expert()), ValueError,
     r"task_arithmetic: parameter 'proj.weight' of experts\['b'\] has 1 NaN/Inf entries"),
    ("build/inf_in_average",
     lambda: TwinCheckpoint.build(_base(), _nan_expert("norm.weight", "a"), shared="average"),
     ValueError, r"average: parameter 'norm.weight' of experts\['a'\] has 1 NaN/Inf entries"),
    ("merged/weights_shape", lambda: _twin().merged_state_dict(torch.ones(2)), ValueError,
     r"TwinCheckpoint.merged_state_dict: weights must have shape \[T=3\] .* got \[2\]"),
    ("merged/weights_int", lambda: _twin().merged_state_dict(torch.ones(3, dtype=torch.long)),
     TypeError, r"TwinCheckpoint.merged_state_dict: weights must be a floating tensor, got "
                r"torch.int64"),
    ("merged/weights_list_str", lambda: _twin().merged_state_dict([1.0, "a", 0.0]), TypeError,
     r"TwinCheckpoint.merged_state_dict: weights must hold real numbers, got 'a'"),
    ("merged/weights_nan", lambda: _twin().merged_state_dict(torch.tensor([NAN, 0.5, 0.5])),
     ValueError, r"TwinCheckpoint.merged_state_dict: weights has NaN/Inf entries: "
                 r"\[nan, 0.5, 0.5\]"),
    ("merged/weights_list_inf", lambda: _twin().merged_state_dict([INF, 0.0, 0.0]), ValueError,
     r"TwinCheckpoint.merged_state_dict: weights has NaN/Inf entries: \[inf, 0.0, 0.0\]"),
    ("merged/head_without_heads",
     lambda: _twin().merged_state_dict([1.0, 0.0, 0.0], head="a"), ValueError,
     r"TwinCheckpoint.merged_state_dict: head='a' given, but the twin has no task heads"),
    ("task_index/unknown", lambda: _twin().task_index("z"), ValueError,
     r"TwinCheckpoint.task_index: unknown task 'z'; the twin's tasks are \['a', 'b', 'c'\]"),
    ("task_index/out_of_range", lambda: _twin().task_index(3), ValueError,
     r"TwinCheckpoint.task_index: task index must be in \[0, 3\), got 3"),
    ("task_index/float", lambda: _twin().task_index(1.0), TypeError,
     r"TwinCheckpoint.task_index: a task must be a name or an index, got 1.0"),
    ("factors/index", lambda: _twin().lowrank["proj.weight"].factors(3), IndexError,
     r"LowRankDelta.factors: t must be in \[0, 3\), got 3"),
    ("with_router/type", lambda: _twin().with_router(nn.Linear(2, 2)), TypeError,
     r"TwinCheckpoint.with_router: router must be a Router \(TwinRouter, PrototypeRouter\), "
     r"got Linear"),
    ("with_router/tasks", lambda: _twin().with_router(TwinRouter(6, ["x", "y", "z"])),
     ValueError, r"TwinCheckpoint.with_router: router.tasks must be the twin's tasks in order"),
    ("with_router/info", lambda: _twin().with_router(_router(), info={"acc": NAN}), TypeError,
     r"TwinCheckpoint.with_router: info must be JSON-serializable"),
    ("save/path_type", lambda: _twin().save(3), TypeError,
     r"TwinCheckpoint.save: path must be a str or os.PathLike, got int"),
    ("save/path_directory", lambda: _twin().save(os.getcwd()), IsADirectoryError,
     r"TwinCheckpoint.save: '.*': is a directory"),
    ("save/parent_is_file", lambda: _twin().save(os.path.join(__file__, "twin.safetensors")),
     NotADirectoryError, r"TwinCheckpoint.save: '.*twin.safetensors': '.*test_bad_input.py' is "
                         r"not a directory"),
    ("save/missing_directory", lambda: _twin().save("/nonexistent/dir/twin.safetensors"),
     FileNotFoundError, r"TwinCheckpoint.save: '/nonexistent/dir/twin.safetensors': directory "
                        r"'/nonexistent/dir' does not exist"),
    ("load/path_type", lambda: TwinCheckpoint.load(None), TypeError,
     r"TwinCheckpoint.load: path must be a str or os.PathLike, got NoneType"),
    ("load/missing", lambda: TwinCheckpoint.load("/nonexistent/twin.safetensors"),
     FileNotFoundError, r"TwinCheckpoint.load: '/nonexistent/twin.safetensors': no such file"),
    ("load/directory", lambda: TwinCheckpoint.load(os.getcwd()), IsADirectoryError,
     r"TwinCheckpoint.load: '.*': is a directory, not a file"),
    ("load/not_safetensors", lambda: TwinCheckpoint.load(__file__), ValueError,
     r"TwinCheckpoint.load: '.*test_bad_input.py': not a valid safetensors file"),

    # --- the router -------------------------------------------------------------------------
    ("router/in_features", lambda: TwinRouter(0, TASKS), ValueError,
     r"TwinRouter: in_features must be >= 1, got 0"),
    ("router/tasks_empty", lambda: TwinRouter(6, []), ValueError,
     r"TwinRouter: tasks must name at least one task, got \[\]"),
    ("router/tasks_dup", lambda: TwinRouter(6, ["a", "a"]), ValueError,
     r"TwinRouter: task names must be unique, got \['a', 'a'\]"),
    ("router/tasks_int", lambda: TwinRouter(6, [1, 2]), TypeError,
     r"TwinRouter: task names must be str, got 1 \(int\)"),
    ("router/dropout", lambda: TwinRouter(6, TASKS, dropout=1.0), ValueError,
     r"TwinRouter: dropout must be in \[0, 1\), got 1.0"),
    ("router/dropout_nan", lambda: TwinRouter(6, TASKS, dropout=NAN), ValueError,
     r"TwinRouter: dropout must be finite, got nan"),
    ("router/pooling", lambda: TwinRouter(6, TASKS, pooling="sum"), ValueError,
     r"TwinRouter: pooling must be one of \['mean', 'max', 'cls', 'last'\] .* got 'sum'"),
    ("router/layer", lambda: TwinRouter(6, TASKS, layer=[]), ValueError,
     r"TwinRouter: layer must be an int or a non-empty sequence of ints, got \[\]"),
    ("router/standardize", lambda: TwinRouter(6, TASKS, standardize=1), TypeError,
     r"TwinRouter: standardize must be a bool, got 1"),
    ("router/features_shape", lambda: _router()(torch.zeros(2, 5)), ValueError,
     r"TwinRouter.forward: features must have shape \[B, 6\], got \[2, 5\]"),
    ("router/features_int", lambda: _router()(torch.zeros(2, 6, dtype=torch.long)), TypeError,
     r"TwinRouter.forward: features must be floating point, got torch.int64"),
    ("router/features_nan",
     lambda: _router()(torch.tensor([[0.0] * 6, [NAN] + [0.0] * 5])), ValueError,
     r"TwinRouter.forward: features has NaN/Inf entries in rows \[1\]"),
    ("router/weights_nan", lambda: _router().weights(torch.full((3, 6), INF)), ValueError,
     r"TwinRouter.weights: features has NaN/Inf entries in rows \[0, 1, 2\]"),
    ("router/temperature", lambda: _router().weights(torch.zeros(2, 6), temperature=0),
     ValueError, r"TwinRouter.weights: temperature must be > 0, got 0"),
    ("router/temperature_inf", lambda: _router().weights(torch.zeros(2, 6), temperature=INF),
     ValueError, r"TwinRouter.weights: temperature must be finite, got inf"),
    ("router/top_k", lambda: _router().weights(torch.zeros(2, 6), top_k=4), ValueError,
     r"TwinRouter.weights: top_k must be in \[1, T=3\], got 4"),
    ("router/from_config_keys", lambda: TwinRouter.from_config({"tasks": TASKS}), ValueError,
     r"TwinRouter.from_config: cfg is missing keys \['in_features'\]"),
    ("router/from_config_type", lambda: TwinRouter.from_config([]), TypeError,
     r"TwinRouter.from_config: cfg must be a mapping, got list"),
    ("pooled/ids_1d", lambda: pooled_features(_Tiny(), torch.zeros(3, dtype=torch.long),
                                              torch.ones(3)), ValueError,
     r"pooled_features: input_ids must be a 2-D integer tensor \[B, L\], got \[3\] "
     r"torch.int64"),
    ("pooled/mask_shape", lambda: pooled_features(_Tiny(), _ids(), torch.ones(2, 4)), ValueError,
     r"pooled_features: attention_mask must be a tensor of input_ids' shape \[2, 3\], got "
     r"\[2, 4\]"),
    ("pooled/empty_row", lambda: pooled_features(_Tiny(), _ids(), torch.tensor([[1, 1, 0],
                                                                               [0, 0, 0]])),
     ValueError, r"pooled_features: attention_mask rows \[1\] have no non-padding token"),
    ("pooled/layer", lambda: pooled_features(_Tiny(), _ids(), torch.ones(2, 3), layer=5),
     ValueError, r"pooled_features: layer must be in \[-2, 2\) for 2 hidden states, got 5"),
    ("pool_hidden/pooling", lambda: pool_hidden_states([torch.zeros(2, 3, 4)], torch.ones(2, 3),
                                                       pooling=["mean", "avg"]), ValueError,
     r"pool_hidden_states: pooling must be one of .* got \['mean', 'avg'\]"),
    ("fit/one_task", lambda: fit_router(lambda b: b, {"a": [torch.zeros(4, 6)]}), ValueError,
     r"fit_router: data must hold at least 2 tasks to route between, got \['a'\]"),
    ("fit/data_type", lambda: fit_router(lambda b: b, [torch.zeros(4, 6)]), TypeError,
     r"fit_router: data must be a mapping task name -> iterable of batches, got list"),
    ("fit/lr", lambda: fit_router(lambda b: b, {"a": [], "b": []}, lr=0), ValueError,
     r"fit_router: lr must be > 0, got 0"),
    ("fit/val_fraction", lambda: fit_router(lambda b: b, {"a": [], "b": []}, val_fraction=1),
     ValueError, r"fit_router: val_fraction must be in \(0, 1\), got 1"),
    ("fit/epochs", lambda: fit_router(lambda b: b, {"a": [], "b": []}, epochs=0), ValueError,
     r"fit_router: epochs must be >= 1, got 0"),
    ("fit/nan_features",
     lambda: fit_router(lambda b: b, {"a": [torch.zeros(4, 6)],
                                      "b": [torch.zeros(4, 6), torch.full((4, 6), NAN)]}),
     ValueError, r"fit_router: features of task 'b' \(batch 1\) has NaN/Inf entries in rows "
                 r"\[0, 1, 2, 3\]"),
    ("fit/too_few", lambda: fit_router(lambda b: b, {"a": [torch.zeros(1, 6)],
                                                     "b": [torch.zeros(1, 6)]}), ValueError,
     r"fit_router: task 'a' has 1 items, too few for non-empty train and validation splits"),
    ("fit/widths", lambda: fit_router(lambda b: b, {"a": [torch.zeros(4, 6)],
                                                    "b": [torch.zeros(4, 5)]}), ValueError,
     r"fit_router: all tasks must give features of one width, got \{'a': 6, 'b': 5\}"),

    # --- TwinMergedModule --------------------------------------------------------------------
    ("wrap/module_type", lambda: TwinMergedModule("model", _twin()), TypeError,
     r"TwinMergedModule: module must be an nn.Module, got str"),
    ("wrap/twin_type", lambda: TwinMergedModule(_Tiny(), _base()), TypeError,
     r"TwinMergedModule: twin must be a TwinCheckpoint, got dict"),
    ("wrap/mode", lambda: _wrapped(mode="fast"), ValueError,
     r"TwinMergedModule: mode must be one of \['auto', 'factored', 'materialize', 'group'\], "
     r"got 'fast'"),
    ("wrap/router_type", lambda: _wrapped(router=nn.Linear(6, 3)), TypeError,
     r"TwinMergedModule: router must be a Router \(TwinRouter, PrototypeRouter\) or None, "
     r"got Linear"),
    ("wrap/router_tasks", lambda: _wrapped(router=TwinRouter(6, ["c", "b", "a"])), ValueError,
     r"TwinMergedModule: router.tasks must be the twin's tasks in order, \['a', 'b', 'c'\], got "
     r"\['c', 'b', 'a'\]"),
    ("wrap/filter_fn", lambda: _wrapped(filter_fn="proj"), TypeError,
     r"TwinMergedModule: filter_fn must be callable \(layer, name\) -> bool, got str"),
    ("wrap/n_groups", lambda: _wrapped(n_groups=0), ValueError,
     r"TwinMergedModule: n_groups must be an int >= 1, got 0"),
    ("wrap/buffer_sets", lambda: _wrapped(buffer_sets=1.5), ValueError,
     r"TwinMergedModule: buffer_sets must be an int >= 1, got 1.5"),
    ("wrap/temperature_inf", lambda: _wrapped(temperature=INF), ValueError,
     r"TwinMergedModule: temperature must be a finite number > 0, got inf"),
    ("wrap/temperature_nan", lambda: _wrapped(temperature=NAN), ValueError,
     r"TwinMergedModule: temperature must be a finite number > 0, got nan"),
    ("wrap/top_k", lambda: _wrapped(top_k=0), ValueError,
     r"TwinMergedModule: top_k must be None or an int in \[1, 3\], got 0"),
    ("wrap/head_pad_nan", lambda: _wrapped(head_pad_value=NAN), ValueError,
     r"TwinMergedModule: head_pad_value must be a number \(not NaN"),
    ("wrap/seed", lambda: _wrapped(seed="0"), TypeError,
     r"TwinMergedModule: seed must be an int, got '0'"),
    ("wrap/check_finite", lambda: _wrapped(check_finite=1), TypeError,
     r"TwinMergedModule: check_finite must be a bool, got 1"),
    ("wrap/twice", _make_wrapped_twice, ValueError,
     r"TwinMergedModule: module is already wrapped by a TwinMergedModule; unwrap\(\) it first"),
    ("wrap/meta_module", lambda: TwinMergedModule(_Tiny().to("meta"), _twin()), ValueError,
     r"TwinMergedModule: module tensor 'emb.weight' is on the meta device"),
    ("wrap/meta_twin", lambda: TwinMergedModule(_Tiny(), _twin().to("meta")), ValueError,
     r"TwinMergedModule: twin tensor 'shared/emb.weight' is on the meta device"),
    ("wrap/wrong_architecture", lambda: TwinMergedModule(nn.Linear(6, 4), _twin()), ValueError,
     r"TwinMergedModule: the twin has tensor 'emb.weight' that the module does not have"),
    ("call/weights_shape", lambda: _wrapped()(_ids(), mix_weights=torch.ones(2, 4)), ValueError,
     r"TwinMergedModule: mix_weights must have shape \[B, T=3\] or \[T=3\], got \[2, 4\]"),
    ("call/weights_rows", lambda: _wrapped()(_ids(), mix_weights=torch.ones(3, 3)), ValueError,
     r"TwinMergedModule: mix_weights has 3 rows but the batch has B=2"),
    ("call/weights_int", lambda: _wrapped()(_ids(), mix_weights=torch.ones(2, 3).long()),
     TypeError, r"TwinMergedModule: mix_weights must be a floating tensor \[B, T\] or \[T\], got "
                r"torch.int64"),
    ("call/weights_list", lambda: _wrapped()(_ids(), mix_weights=[1.0, 0.0, 0.0]), TypeError,
     r"TwinMergedModule: mix_weights must be a floating tensor \[B, T\] or \[T\], got list"),
    ("call/weights_nan_factored", _factored_nan_row, ValueError,
     r"TwinMergedModule: mix_weights has NaN/Inf entries in rows \[1\]"),
    ("call/weights_nan_materialize",
     lambda: _wrapped(mode="materialize")(_ids(), mix_weights=torch.tensor([NAN, 0.0, 1.0])),
     ValueError, r"TwinMergedModule: mix_weights has NaN/Inf entries in rows \[0\]"),
    ("call/weights_inf_group",
     lambda: _wrapped(mode="group")(_ids(), mix_weights=torch.full((2, 3), INF)), ValueError,
     r"TwinMergedModule: mix_weights has NaN/Inf entries in rows \[0, 1\]"),
    ("call/weights_nan_auto",
     lambda: _wrapped(mode="auto")(_ids(), mix_weights=torch.full((2, 3), NAN)), ValueError,
     r"TwinMergedModule: mix_weights has NaN/Inf entries in rows \[0, 1\]"),
    ("call/weights_grad_materialize",
     lambda: _wrapped(mode="materialize")(_ids(), mix_weights=torch.ones(2, 3).requires_grad_()),
     ValueError, r"TwinMergedModule: mix_weights requires grad, but mode 'materialize' merges "
                 r"without recording gradients"),
    ("call/weights_grad_group",
     lambda: _wrapped(mode="group")(_ids(), mix_weights=torch.ones(3).requires_grad_()),
     ValueError, r"TwinMergedModule: mix_weights requires grad, but mode 'group' merges"),
    ("call/router_nan", _router_nan_features, ValueError,
     r"TwinRouter.weights: features has NaN/Inf entries in rows \[0, 1\]"),
    ("call/no_router", lambda: _wrapped()(_ids()), ValueError,
     r"TwinMergedModule.route: no router: pass mix_weights"),
    ("call/no_batch", lambda: _wrapped()(mix_weights=torch.ones(3)), ValueError,
     r"TwinMergedModule: no batched tensor input to take B from"),
    ("call/head_tasks_without_heads",
     lambda: _wrapped()(_ids(), mix_weights=torch.ones(2, 3), head_tasks=torch.zeros(2).long()),
     ValueError, r"TwinMergedModule: head_tasks given, but the twin has no task heads"),
    ("call/unwrapped", _unwrapped_call, ValueError,
     r"TwinMergedModule: this wrapper was unwrapped"),
    ("merged/shape", lambda: _wrapped().merged(torch.ones(2, 3)).__enter__(), ValueError,
     r"TwinMergedModule.merged: weights must be a floating tensor of shape \[T=3\], got "
     r"torch.float32 \[2, 3\]"),
    ("merged/nan", lambda: _wrapped().merged(torch.tensor([NAN, 0, 1.0])).__enter__(),
     ValueError, r"TwinMergedModule.merged: weights has NaN/Inf entries: \[nan, 0.0, 1.0\]"),
    ("merged/nested", _merged_nested, ValueError,
     r"TwinMergedModule.merged: already inside a merged\(\) block; blocks do not nest"),
    ("groups/shape", lambda: _wrapped().groups(torch.ones(3)), ValueError,
     r"TwinMergedModule.groups: weights must be a floating tensor \[B, T=3\] with B >= 1, got "
     r"torch.float32 \[3\]"),
    ("groups/nan", lambda: _wrapped().groups(torch.full((2, 3), NAN)), ValueError,
     r"TwinMergedModule.groups: weights has NaN/Inf entries"),
    ("groups/n_groups", lambda: _wrapped().groups(torch.ones(2, 3), n_groups=0), ValueError,
     r"TwinMergedModule.groups: n_groups must be None or an int >= 1, got 0"),
    ("route/float_ids", lambda: _wrapped(router=_router()).route(torch.randn(2, 6)),
     ValueError, r"pooled_features: input_ids must be a 2-D integer tensor \[B, L\], got "
                 r"\[2, 6\] torch.float32"),
    ("route/no_ids", lambda: _wrapped(router=_router()).route(attention_mask=torch.ones(2, 3)),
     ValueError, r"TwinMergedModule.route: the default router features need input_ids"),

    # --- LoRA adapters ----------------------------------------------------------------------
    ("lora/path_type", lambda: LoraExpert(3), TypeError,
     r"LoraExpert: path must be an adapter directory, got int"),
    ("lora/not_adapter", lambda: LoraExpert(os.getcwd()), ValueError,
     r"LoraExpert: '.*' is not a PEFT adapter directory \(no adapter_config.json\)"),
    ("lora/unbound", lambda: merging.task_arithmetic(_base(), [_FakeAdapter()]), TypeError,
     r"task_arithmetic: experts\[0\] is a _FakeAdapter, an adapter without its base"),
]


class _FakeAdapter:
    """Anything with bind(), as LoraExpert has: passed to merging unbound."""

    def bind(self, base):
        return self


@pytest.mark.parametrize("call, exc, pattern", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input_gets_a_named_error(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_a_refused_wrap_changes_nothing():
    module = _Tiny()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    classes = [type(m) for m in module.modules()]
    bad_heads = TwinCheckpoint(_twin().tasks, _twin().shared, _twin().lowrank, _twin().dense,
                               {k: [0.0] * 3 for k in _twin().lowrank}, _twin().metadata,
                               heads={t: {"proj.weight": torch.zeros(4, 6)} for t in TASKS})
    for twin, kw in ((bad_heads, {}), (_twin(), {"temperature": -1.0}),
                     (_twin().to("meta"), {})):
        with pytest.raises(ValueError):
            TwinMergedModule(module, twin, **kw)
        assert [type(m) for m in module.modules()] == classes
        for k, v in module.state_dict().items():
            assert torch.equal(v, before[k]), k
    TwinMergedModule(module, _twin())  # and it can still be wrapped


def test_refused_calls_leave_the_wrapper_serving(monkeypatch):
    """Refused inside a merged() block: no merge ran (the block still serves its own), and θs is
    intact."""
    import twinmerge_ext.module as module
    merges = []
    real = module.lowrank_merge_
    monkeypatch.setattr(module, "lowrank_merge_", lambda *a: merges.append(1) or real(*a))
    w = _wrapped(mode="materialize")
    ids = _ids()
    with w.merged(torch.tensor([0.2, 0.3, 0.5])):
        want, count = w(ids), len(merges)
        for bad in (torch.full((2, 3), NAN), torch.ones(2, 4), torch.ones(3)[None].expand(5, 3),
                    torch.ones(2, 3).requires_grad_()):
            with pytest.raises((ValueError, TypeError)):
                w(ids, mix_weights=bad)
        assert len(merges) == count and torch.equal(w(ids), want)
    state = w.module.state_dict()
    for name, value in _twin().shared.items():
        assert torch.equal(state[name], value), name


@pytest.mark.parametrize("mode", ["factored", "materialize", "group", "auto"])
def test_an_empty_batch_gives_an_empty_output_in_every_mode(mode):
    out = _wrapped(mode=mode)(torch.zeros(0, 3, dtype=torch.long), mix_weights=torch.zeros(0, 3))
    assert out.shape == (0, 3, 4)


def test_auto_mode_carries_gradients_to_weights_that_require_them():
    w = _wrapped(mode="auto")
    rw = torch.softmax(torch.randn(2, 3), -1).requires_grad_()
    w(_ids(L=40), mix_weights=rw).sum().backward()
    assert w.last_call["mode"] == "factored" and w.last_call["weights_require_grad"]
    assert rw.grad is not None and rw.grad.abs().sum() > 0


def test_unchecked_weights_flow_as_documented():
    """check_finite=False (graph capture): a NaN weight row gives NaN in that row only."""
    w = _wrapped(mode="factored", check_finite=False)
    rw = torch.softmax(torch.randn(2, 3), -1)
    rw[1, 0] = NAN
    out = w(_ids(), mix_weights=rw)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
