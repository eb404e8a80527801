"""twinmerge_ext.export: the exported program and the AOTInductor package against the eager
wrapper on mixed batches (each row its own weights) of other sizes than the export's example,
the wrapper left as it was, Llama and task heads with a dynamic batch, a per-row fallback
layer that fixes the batch, and bad arguments. The model and batches are tests/cpp/make_aoti_package.py's (the C++ side's)."""

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import twinmerge_ext as tm
from twinmerge_ext.export import compile_twin, export_twin

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent / "cpp"))
import make_aoti_package as case  # noqa: E402

TOL = dict(rtol=1e-5, atol=2e-5)
# (B, L) of mixed batches other than the export's example (3, 8); L up to the position table.
SIZES = [(4, 9), (2, 5), (1, 3), (6, case.POSITIONS)]


@pytest.fixture(scope="module")
def gpt2():
    wrapped, twin = case.twin_case()
    return wrapped, twin, case.export_case(wrapped)


@pytest.fixture(scope="module")
def package(gpt2, tmp_path_factory):
    """One AOTInductor compile per module (about 15-25 s on 2 CPU cores)."""
    path = compile_twin(gpt2[2], tmp_path_factory.mktemp("aoti") / "twin.pt2")
    return path, torch._inductor.aoti_load_package(path)


def _inputs(B, L, seed=3):
    return case.batch(B, L, seed)


@pytest.mark.parametrize("B, L", [(3, 8)] + SIZES)
def test_exported_program_equals_the_wrapper(gpt2, B, L):
    wrapped, _, program = gpt2
    ids, mask, w = _inputs(B, L)
    with torch.no_grad():
        got = program.module()(ids, mask, w)
    torch.testing.assert_close(got, case.logits(wrapped, ids, mask, w), **TOL)


def test_program_signature_and_dynamic_dims(gpt2):
    _, _, program = gpt2
    assert len(program.graph_signature.user_inputs) == 3
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "twinmerge.lowrank_mix_linear.default" in ops
    meta = program.graph_module.meta["twinmerge"]
    assert meta["twinmerge.inputs"] == "input_ids,attention_mask,mix_weights"
    assert meta["twinmerge.dynamic"] == "batch,length"
    # The batch unbounded, the length bounded by max_length.
    bounds = {str(r) for r in program.range_constraints.values()}
    assert {"VR[1, int_oo]", f"VR[1, {case.POSITIONS}]"} <= bounds, bounds


@pytest.mark.parametrize("B, L", SIZES)
def test_aoti_package_equals_the_wrapper(gpt2, package, B, L):
    wrapped = gpt2[0]
    ids, mask, w = _inputs(B, L)
    got = package[1](ids, mask, w)
    torch.testing.assert_close(got, case.logits(wrapped, ids, mask, w), **TOL)


def test_aoti_rows_are_their_own_models(gpt2, package):
    """Row b of a mixed batch equals the twin merged at w[b] (merged_state_dict) and run alone."""
    _, twin, _ = gpt2
    ids, mask, w = _inputs(4, 9)
    got = package[1](ids, mask, w)
    for b in range(4):
        m = case.tiny_gpt2()
        m.load_state_dict(twin.merged_state_dict(w[b]))
        with torch.no_grad():
            ref = m(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], use_cache=False).logits
        torch.testing.assert_close(got[b:b + 1], ref, **TOL)


def test_aoti_package_metadata_and_nan_check(package):
    path, runner = package
    meta = runner.get_metadata()
    assert meta["twinmerge.inputs"] == "input_ids,attention_mask,mix_weights"
    assert meta["twinmerge.tasks"] == "task0,task1,task2"
    assert meta["twinmerge.check_finite"] == "true"
    assert not [e for e in os.listdir(os.path.dirname(path)) if e.endswith(".tmpdir")]
    ids, mask, w = _inputs(2, 5)
    w[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match=r"mix_weights has NaN/Inf entries"):
        runner(ids, mask, w)


def test_export_leaves_the_wrapper_as_it_was():
    """Any mode exports factored; the wrapper keeps its mode, NaN check and last call."""
    wrapped, _ = case.twin_case(seed=4)
    wrapped.mode = "auto"
    ids, mask, w = _inputs(4, 6)
    ref = case.logits(wrapped, ids, mask, w)
    last = wrapped.last_call
    program = case.export_case(wrapped, check_finite=False)
    assert wrapped.mode == "auto" and wrapped.check_finite is True
    assert wrapped.last_call is last
    assert all(not p.__class__.__name__.startswith("Fake") for p in wrapped.parameters())
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids, mask, w), ref, **TOL)
        w[0, 0] = float("nan")
        assert torch.isnan(program.module()(ids, mask, w)[0]).all()  # no check in the program
    with pytest.raises(ValueError, match="mix_weights has NaN/Inf entries"):
        case.logits(wrapped, ids, mask, w)  # the wrapper still checks


def _serves_fixed_batch(program, wrapped, B, lengths):
    """The program of a fixed batch B equals the wrapper on mixed batches of these lengths."""
    for L in lengths:
        ids, mask, w = _inputs(B, L, seed=L)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(ids, mask, w),
                                       case.logits(wrapped, ids, mask, w), **TOL)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=case.VOCAB, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=48, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _serves(program, wrapped, sizes):
    """The program equals the wrapper on mixed batches of these (B, L)."""
    for B, L in sizes:
        ids, mask, w = _inputs(B, L, seed=L)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(ids, mask, w),
                                       case.logits(wrapped, ids, mask, w), **TOL)


def test_llama_dynamic_batch_and_length():
    """Llama's RMSNorm mixes as weight ⊙ f(x), one pass for the batch: B stays dynamic."""
    torch.manual_seed(5)
    base = _llama()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    experts = {f"task{t}": {k: v + 0.05 * torch.randn_like(v) for k, v in base_sd.items()}
               for t in range(case.T)}
    wrapped = tm.TwinMergedModule(_llama(), tm.TwinCheckpoint.build(base_sd, experts,
                                                                     rank_ratio=0.25),
                                  mode="factored")
    ids, mask, w = _inputs(3, 8)
    program = export_twin(wrapped, {"input_ids": ids, "attention_mask": mask}, w,
                          module_kwargs={"use_cache": False}, max_length=32)
    _serves(program, wrapped, [(3, 8), (5, 13), (1, 4)])


class _AffineNorm(nn.Module):
    """(1 + weight) ⊙ x: not weight ⊙ f(x), so the wrapper mixes it row by row (fallback)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x * (1 + self.weight)


def test_a_per_row_fallback_layer_fixes_the_batch():
    """A layer mixed by the per-row fallback loops over the rows in Python: the trace fixes B
    (torch.export says so), the length stays dynamic."""
    torch.manual_seed(6)
    make = lambda: case.tiny_gpt2()  # noqa: E731
    model = make()
    model.transformer.ln_f = _AffineNorm(model.config.n_embd)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    experts = {f"task{t}": {k: v + 0.05 * torch.randn_like(v) for k, v in base_sd.items()}
               for t in range(case.T)}
    twin = tm.TwinCheckpoint.build(base_sd, experts, rank_ratio=0.25)
    served = make()
    served.transformer.ln_f = _AffineNorm(served.config.n_embd)
    wrapped = tm.TwinMergedModule(served, twin, mode="factored")
    ids, mask, w = _inputs(3, 8)
    inputs = {"input_ids": ids, "attention_mask": mask}
    with pytest.raises(torch._dynamo.exc.UserError, match=r"batch"):
        export_twin(wrapped, inputs, w)
    program = export_twin(wrapped, inputs, w, dynamic_batch=False, max_length=case.POSITIONS)
    _serves_fixed_batch(program, wrapped, 3, (8, 13))


def _bert_twin_wrapper():
    torch.manual_seed(7)
    cfg = transformers.BertConfig(vocab_size=case.VOCAB, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48,
                                  max_position_embeddings=32, num_labels=3)
    make = lambda: transformers.BertForSequenceClassification(cfg).eval()  # noqa: E731
    base_sd = {k: v.clone() for k, v in make().state_dict().items()}
    experts = {}
    for t in range(case.T):
        head = make().state_dict()  # each task its own classifier
        experts[f"task{t}"] = {k: head[k] if k.startswith("classifier") else
                               v + 0.05 * torch.randn_like(v) for k, v in base_sd.items()}
    twin = tm.TwinCheckpoint.build(base_sd, experts, rank_ratio=0.25, heads=r"^classifier\.")
    return tm.TwinMergedModule(make(), twin, mode="factored")


def test_task_heads_fixed_batch():
    """Each row's head is the argmax of its weights, in the program too."""
    wrapped = _bert_twin_wrapper()
    ids, mask, w = _inputs(4, 8)
    program = export_twin(wrapped, {"input_ids": ids, "attention_mask": mask}, w,
                          dynamic_batch=False, max_length=32)
    _serves_fixed_batch(program, wrapped, 4, (8, 5))


def test_task_heads_dynamic_batch():
    wrapped = _bert_twin_wrapper()
    ids, mask, w = _inputs(4, 8)
    program = export_twin(wrapped, {"input_ids": ids, "attention_mask": mask}, w, max_length=32)
    _serves(program, wrapped, [(4, 8), (2, 5), (6, 11)])


# --- bad arguments ----------------------------------------------------------------------------

def _args(gpt2):
    ids, mask, w = _inputs(3, 8)
    return gpt2[0], {"input_ids": ids, "attention_mask": mask}, w


EXPORT_ERRORS = [
    ("wrapped", lambda m, i, w: export_twin(nn.Linear(2, 2), i, w), TypeError,
     r"export_twin: wrapped must be a TwinMergedModule, got Linear"),
    ("inputs empty", lambda m, i, w: export_twin(m, {}, w), TypeError,
     r"export_twin: inputs must be a non-empty mapping of name -> Tensor, got \{\}"),
    ("inputs tensor", lambda m, i, w: export_twin(m, i["input_ids"], w), TypeError,
     r"export_twin: inputs must be a non-empty mapping"),
    ("inputs key", lambda m, i, w: export_twin(m, {"input ids": i["input_ids"]}, w), ValueError,
     r"export_twin: inputs keys must be argument names, got 'input ids'"),
    ("inputs mix_weights", lambda m, i, w: export_twin(m, {**i, "mix_weights": w}, w), ValueError,
     r"export_twin: inputs must not hold 'mix_weights'"),
    ("inputs value", lambda m, i, w: export_twin(m, {"input_ids": [1, 2]}, w), TypeError,
     r"export_twin: inputs\['input_ids'\] must be a Tensor \[B, \.\.\.\], got \[1, 2\]"),
    ("inputs batch", lambda m, i, w: export_twin(
        m, {**i, "attention_mask": i["attention_mask"][:2]}, w), ValueError,
     r"export_twin: inputs must share the batch size \(dimension 0\), got "
     r"\{'input_ids': 3, 'attention_mask': 2\}"),
    ("mix_weights shape", lambda m, i, w: export_twin(m, i, w[:, :2]), ValueError,
     r"export_twin: mix_weights must be a floating tensor \[B=3, T=3\], got Tensor "
     r"torch.float32 \[3, 2\]"),
    ("mix_weights vector", lambda m, i, w: export_twin(m, i, w[0]), ValueError,
     r"mix_weights must be a floating tensor \[B=3, T=3\], got Tensor torch.float32 \[3\]"),
    ("mix_weights dtype", lambda m, i, w: export_twin(m, i, w.long()), ValueError,
     r"mix_weights must be a floating tensor \[B=3, T=3\], got Tensor torch.int64"),
    ("module_kwargs clash", lambda m, i, w: export_twin(m, i, w, module_kwargs={"input_ids": 1}),
     ValueError, r"export_twin: module_kwargs must not repeat an input or mix_weights/head_tasks, "
                 r"got \['input_ids'\]"),
    ("module_kwargs keys", lambda m, i, w: export_twin(m, i, w, module_kwargs={1: 2}), TypeError,
     r"export_twin: module_kwargs must be a mapping of str -> value, got \[1\]"),
    ("output", lambda m, i, w: export_twin(m, i, w, output=1.5), TypeError,
     r"export_twin: output must be None, a str \(field\) or an int \(index\), got 1.5"),
    ("dynamic_batch", lambda m, i, w: export_twin(m, i, w, dynamic_batch=1), TypeError,
     r"export_twin: dynamic_batch must be a bool, got 1"),
    ("check_finite", lambda m, i, w: export_twin(m, i, w, check_finite="yes"), TypeError,
     r"export_twin: check_finite must be a bool, got 'yes'"),
    ("batch of one", lambda m, i, w: export_twin(m, {k: v[:1] for k, v in i.items()}, w[:1]),
     ValueError, r"export_twin: a dynamic batch needs an example of at least 2 rows .* got B=1"),
    ("length of one", lambda m, i, w: export_twin(m, {k: v[:, :1] for k, v in i.items()}, w),
     ValueError, r"export_twin: a dynamic length needs every input of 2 or more dimensions to "
                 r"share dimension 1, of at least 2, got \{'input_ids': 1, 'attention_mask': 1\}"),
    ("lengths differ", lambda m, i, w: export_twin(
        m, {**i, "attention_mask": i["attention_mask"][:, :5]}, w), ValueError,
     r"share dimension 1, of at least 2, got \{'input_ids': 8, 'attention_mask': 5\}"),
    ("max_length", lambda m, i, w: export_twin(m, i, w, max_length=4), ValueError,
     r"export_twin: max_length must be None or an int >= 8 \(the example's size, and at least "
     r"2\), got 4"),
    ("max_batch", lambda m, i, w: export_twin(m, i, w, max_batch=True), ValueError,
     r"export_twin: max_batch must be None or an int >= 3 .* got True"),
    ("output field", lambda m, i, w: export_twin(m, i, w, output="nope",
                                                 module_kwargs={"use_cache": False}), ValueError,
     r"export_twin: output 'nope' is not in the module's output \(\['logits'\]\)"),
]


@pytest.mark.parametrize("name, call, exc, match", EXPORT_ERRORS, ids=[e[0] for e in EXPORT_ERRORS])
def test_export_bad_arguments(gpt2, name, call, exc, match):
    wrapped = gpt2[0]
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    with pytest.raises(exc, match=match):
        call(*_args(gpt2))
    after = wrapped.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert wrapped.mode == "factored" and wrapped.check_finite is True


def test_export_refuses_an_unwrapped_wrapper_and_calls_in_flight():
    wrapped, _ = case.twin_case(seed=6)
    _, inputs, w = _args((wrapped,))
    with wrapped.merged(w[0]):
        with pytest.raises(ValueError, match=r"export_twin: 1 call\(s\) or merged\(\) block\(s\) "
                                             r"are in flight on this wrapper"):
            export_twin(wrapped, inputs, w)
    wrapped.unwrap()
    with pytest.raises(ValueError, match=r"export_twin: this wrapper was unwrapped"):
        export_twin(wrapped, inputs, w)


def test_compile_bad_arguments(gpt2, tmp_path):
    program = gpt2[2]
    with pytest.raises(TypeError, match=r"compile_twin: program must be a "
                                        r"torch.export.ExportedProgram \(from export_twin\), "
                                        r"got TwinMergedModule"):
        compile_twin(gpt2[0], tmp_path / "a.pt2")
    with pytest.raises(TypeError, match=r"compile_twin: package_path must be a str or "
                                        r"os.PathLike, got int"):
        compile_twin(program, 3)
    with pytest.raises(ValueError, match=r"compile_twin: package_path must name a file ending in "
                                         r"\.pt2, got '.*a\.zip'"):
        compile_twin(program, tmp_path / "a.zip")
    with pytest.raises(TypeError, match=r"compile_twin: inductor_configs must be None or a "
                                        r"mapping of str -> value, got \[\]"):
        compile_twin(program, tmp_path / "a.pt2", inductor_configs=[])
    with pytest.raises(ValueError, match=r"compile_twin: inductor_configs must not set "
                                         r"'aot_inductor.package'"):
        compile_twin(program, tmp_path / "a.pt2", inductor_configs={"aot_inductor.package": True})
    with pytest.raises(FileNotFoundError, match=r"compile_twin: .*: directory .*missing.* does "
                                                r"not exist"):
        compile_twin(program, tmp_path / "missing" / "a.pt2")
    assert os.listdir(tmp_path) == []


def test_compile_failure_keeps_the_old_file(gpt2, tmp_path):
    """A compile that fails leaves the file it would have replaced, and no temporary."""
    target = tmp_path / "twin.pt2"
    target.write_bytes(b"old package")
    with pytest.raises(Exception) as info:
        compile_twin(gpt2[2], target, inductor_configs={"no_such_inductor_option": 1})
    assert "no_such_inductor_option" in str(info.value)
    assert target.read_bytes() == b"old package"
    assert os.listdir(tmp_path) == ["twin.pt2"]
