"""bench/run.py: every case runs at tiny shapes on the CPU and returns a well-formed row, its
correctness checks reject wrong results, and the runner selects, records and reports cases.
Timing values are never asserted on."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import run  # noqa: E402
from bench.timing import measure_all  # noqa: E402

pytest.importorskip("transformers")

CPU = torch.device("cpu")
F32 = torch.float32
TINY_ROBERTA = dict(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                    intermediate_size=32, vocab_size=50, max_position_embeddings=16)
# Constants instead of measurements: the rows' structure does not depend on them.
ENV = dict(copy_bandwidth=1e10, gemm_rate={str(F32): 1e11})


CASES = {
    "merge": lambda: run.bench_merge(24, 16, 3, 2, F32, CPU, ENV),
    "mix_prefill": lambda: run.bench_mix(4, 3, 24, 16, 3, 2, F32, CPU, ENV),
    "mix_decode": lambda: run.bench_mix(1, 3, 24, 16, 3, 2, F32, CPU, ENV),
    "svd": lambda: run.bench_svd(2, 24, 16, 3, CPU, ENV),
    "model_merge": lambda: run.bench_model_merge(2, 16, 24, 3, 2, F32, CPU, ENV),
    "compress": lambda: run.bench_compress(TINY_ROBERTA, 3, CPU, ENV, check=("query.weight",)),
    "serving_rank2": lambda: run.bench_serving(TINY_ROBERTA, 3, 2, 3, 8, F32, CPU, ENV,
                                               authors_samples=2),
    "serving_ratio": lambda: run.bench_serving(TINY_ROBERTA, 3, None, 2, 8, F32, CPU, ENV,
                                               authors_samples=1),
}


_ROWS = {}


def row_of(case):
    """The case's row (computed once per session), timed in one short round: the tests check
    rows, not times."""
    if case not in _ROWS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(run, "measure_all", lambda fns, device="cpu", **kw: measure_all(
                fns, device, rounds=1, runs=1, min_run_time=0.001, warmup=0))
            _ROWS[case] = CASES[case]()
    return _ROWS[case]


def _positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.parametrize("case", list(CASES))
def test_case_row(case):
    row = row_of(case)
    json.dumps(row)  # the runner writes rows as JSON
    assert isinstance(row["op"], str) and isinstance(row["shape"], dict) and row["shape"]
    assert "ours" in row["times"]
    assert set(row["speedup"]) == set(row["times"]) - {"ours"} and row["speedup"]
    for t in row["times"].values():
        assert _positive(t["median_ms"]) and t["runs"] >= 1
    assert all(_positive(v) for v in row["speedup"].values())
    ratios = {k: v for k, v in row.items() if k.startswith("ours_over_")}
    assert all(_positive(v) for v in ratios.values()), ratios
    if row["max_rel_error"] is not None:  # the check ran, and passed
        assert 0 <= row["max_rel_error"] <= run.TOL[F32]


def test_case_specific_fields():
    serving = row_of("serving_rank2")
    assert serving["shape"]["r"] == 2
    assert {"plain_forward", "router_pass", "self_routed", "group", "a_authors",
            "a_authors_nonzero"} <= set(serving["times"])
    assert serving["self_routed_at_layer"] == 0  # 1 layer: the router reads the embeddings
    assert serving["two_pass_over_plain"] > serving["ours_over_plain"]
    assert _positive(serving["self_routed_over_plain"])
    assert serving["cut_short_two_pass_over_plain"] > serving["ours_over_plain"]
    assert "router_pass_cut_short" in serving["times"]
    assert _positive(serving["ours_over_flop_bound"]) and serving["flop_bound_over_plain"] > 1
    assert serving["mixing_effect"] > 10 * serving["check_tolerance"]  # the check can tell
    assert serving["patched_linear_calls"] == 7  # q, k, v, o, fc1, fc2 of 1 layer, the pooler
    assert row_of("serving_ratio")["shape"]["r"] == 1  # floor(0.1 * 16), at least 1

    compress = row_of("compress")
    assert _positive(compress["seconds"]) and 0 < compress["mean_compression_error"] < 1
    assert 0.999 <= compress["error_ratio"] <= 1.05

    merge = row_of("model_merge")
    assert merge["shape"]["matrices"] == 14 and _positive(merge["ours_stacked_over_floor"])
    assert {"ours_stacked", "a_reconstruct_and_sum", "b_per_expert_addmm", "c_best_torch"} == \
        set(merge["speedup"])


@pytest.mark.parametrize("case", [run.bench_mix_memory, run.bench_mix_graph])
def test_cuda_only_cases_skip_on_cpu(case):
    row = case(1, 2, 16, 16, 2, 2, F32, CPU, ENV)
    assert "needs a CUDA device" in row["skipped"] and row["shape"]["K"] == 4


def test_check_rejects_a_wrong_result():
    expected = torch.randn(5, 7, dtype=torch.float64)
    assert run._check("x", expected.float(), expected, F32) < run.TOL[F32]
    with pytest.raises(AssertionError, match="x: relative error .* not timing a wrong result"):
        run._check("x", expected * 1.01, expected, F32)
    assert run._check("x", expected * 1.01, expected, F32, tol=0.02) > run.TOL[F32]


def test_model_merge_checks_every_implementation(monkeypatch):
    def wrong(out, base, U, S, V, ranks, w):  # the deltas forgotten
        return out.copy_(base)

    monkeypatch.setattr(run.tm, "lowrank_merge_", wrong)
    with pytest.raises(AssertionError, match="model merge ours: relative error"):
        CASES["model_merge"]()


def test_serving_check_catches_a_wrong_forward(monkeypatch):
    import twinmerge_ext._layers as layers
    right = layers.lowrank_mix_linear
    monkeypatch.setattr(layers, "lowrank_mix_linear", lambda *a: right(*a) * 1.01)
    with pytest.raises(AssertionError, match="TwinMergedModule row 0: relative error"):
        CASES["serving_rank2"]()


def test_compress_check_catches_a_poor_decomposition(monkeypatch):
    import twinmerge_ext.checkpoint as checkpoint
    right = checkpoint.truncated_svd

    def negated(*args):  # ||v + σ1 u1 v1ᵀ||² = ||v||² + 3σ1²: far from the optimal error
        U, S, V = right(*args)
        return U, -S, V

    monkeypatch.setattr(checkpoint, "truncated_svd", negated)
    with pytest.raises(AssertionError, match="x the optimal rank-1 error"):
        CASES["compress"]()


def test_targets():
    row = dict(ours_over_floor=1.1, speedup=dict(c_best_torch=2.0))
    run._target(row, "floor", "ours_over_floor", "<=", 1.2)
    run._target(row, "(c)", "speedup.c_best_torch", ">=", 3.0)
    assert [(t["met"], t["value"], t["limit"]) for t in row["targets"]] == \
        [(True, 1.1, "<= 1.2"), (False, 2.0, ">= 3")]
    case = run._with_targets(lambda env: dict(skipped="no GPU"), ("x", "missing", "<=", 1.0))
    assert "targets" not in case(ENV)


def test_runner_selects_records_failures_and_writes_json(monkeypatch, tmp_path, capsys):
    def ok(env):
        return run._row("ok_op", dict(n=1), measure_all({"ours": lambda: None, "base": lambda: None},
                                                        rounds=1, min_run_time=0.001), None, 0.0)

    def broken(env):
        raise AssertionError("wrong result")

    monkeypatch.setattr(run, "suites", lambda device: {"cpu": [("first_ok", ok), ("second_broken", broken),
                                                               ("third_ok", ok)], "gpu": []})
    monkeypatch.setattr(run, "environment", lambda device: dict(ENV, device="cpu", torch="x",
                                                                threads=1))
    assert run.main(["--list", "--cases", "_ok"]) == 0
    assert capsys.readouterr().out.split() == ["cpu", "first_ok", "cpu", "third_ok"]
    with pytest.raises(SystemExit):
        run.main(["--cases", "nothing_matches"])

    out = tmp_path / "r.json"
    assert run.main(["--cases", "first,second", "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "[cpu 1/2] first_ok" in printed and "[cpu 2/2] second_broken" in printed
    assert "FAILED: AssertionError: wrong result" in printed
    saved = json.loads(out.read_text())["cpu"]
    assert saved["cases"] == ["first_ok", "second_broken"]
    assert [r["case"] for r in saved["results"]] == ["first_ok", "second_broken"]
    assert saved["results"][1]["error"] == "AssertionError: wrong result"
    assert all(r["case_seconds"] >= 0 for r in saved["results"])


def test_report_renders_targets_and_times(tmp_path):
    from bench import report
    rows = [dict(row_of("merge"), case="merge_tiny"), dict(row_of("svd"), case="svd_tiny"),
            {"op": "lowrank_mix_linear", "shape": {"rows": 32}, "case": "memory", "skipped": "needs CUDA"}]
    rows[0]["targets"] = [dict(target="6: within 1.1x", metric="speedup.c_best_torch", value=0.98,
                               limit=">= 0.909", met=True),
                          dict(target="1: 3x faster", metric="speedup.c_best_torch", value=0.98,
                               limit=">= 3", met=False)]
    results = {"cpu": {"environment": dict(device="cpu", torch="x", cuda=None, threads=2, git="abc",
                                           date="today", copy_bandwidth=1e10, gemm_rate={}),
                       "results": rows}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    out = tmp_path / "r.md"
    report.main([str(path), "--out", str(out)])
    text = out.read_text()
    assert "| `merge_tiny` | 6: within 1.1x | 0.980 | >= 0.909 | met |" in text
    assert "| `merge_tiny` | 1: 3x faster | 0.980 | >= 3 | **not met** |" in text
    assert "`svd_tiny`" in text and "torch_svd_lowrank" in text
    assert "| `memory` | rows=32 | | needs CUDA | |" in text
    assert "floor" in text  # the merge row's ours_over_floor
    path.write_text(json.dumps({"cpu": [1, 2]}))
    with pytest.raises(SystemExit):
        report.main([str(path)])
