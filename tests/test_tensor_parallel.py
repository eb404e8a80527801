"""Tensor-parallel serving under torch.distributed: 2 and 4 ranks launched by torchrun on gloo
(CPU), a tiny Llama (vocabulary-parallel embedding and column-parallel LM head, uneven over 4
ranks; column/row-parallel attention and MLP) and a tiny BERT (column-parallel embedding, biases
mixed per row, LayerNorms),
each parallelized by torch's `parallelize_module` and wrapped by TwinMergedModule.

Each rank (tests/tp_worker.py) checks its outputs against the single-process wrapper's: per-row
mixed batches, one [T] weight vector, `merged(w)`, and for the Llama generate() and decode steps
that read a KV cache, in factored and materialize modes."""

import os

import pytest
import torch
from _torchrun import run_ranks

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch built without torch.distributed")

WORKER = os.path.join(os.path.dirname(__file__), "tp_worker.py")


def _launch(case: str, world: int, out) -> list:
    return run_ranks(WORKER, case, world, out)


@pytest.fixture(scope="module", params=[("llama", 2), ("llama", 4), ("bert", 2), ("bert", 4)],
                ids=lambda p: f"{p[0]}-{p[1]}ranks")
def ranks(request, tmp_path_factory):
    case, world = request.param
    return case, world, _launch(case, world, tmp_path_factory.mktemp(f"{case}{world}"))


def test_every_rank_serves_what_the_single_process_wrapper_does(ranks):
    case, world, results = ranks
    assert len(results) == world
    for r in results:
        checks = r["checks"]
        expected = {f"{m}/{c}" for m in ("factored", "materialize")
                    for c in ("rows", "vector", "merged")}
        expected |= {"load_like/merged_state_dict", "load_like/rows"}
        if case == "llama":
            expected |= {"factored/generate_equal_tokens", "materialize/generate_equal_tokens",
                         "factored/kv_cache_steps"}
        assert set(checks) == expected
        for name, value in checks.items():
            if name.endswith("equal_tokens"):
                assert value == 1.0, (r["rank"], name)
            else:
                assert value < 1e-5, (r["rank"], name, value)


def test_the_twin_adds_no_collective(ranks):
    """Per forward, the TP twin runs the plain TP model's collectives, no more, no other kind,
    and puts the same bytes into them: materialize mode serves per-row weights as one forward
    per distinct row."""
    _, _, results = ranks
    for r in results:
        for count in ("comms", "comm_bytes"):
            plain = r[count]["plain"]
            assert plain and all(v > 0 for v in plain.values())
            for label in ("factored/rows", "factored/vector", "materialize/vector"):
                assert r[count][label] == plain, (r["rank"], count, label)
            # one forward per distinct row: the rows' share of the batch each time
            rows = r[count]["materialize/rows"]
            assert rows == ({k: 4 * v for k, v in plain.items()} if count == "comms" else plain)



def test_each_rank_holds_its_shard(ranks):
    """The tensors split over the ranks partition the single-process wrapper's (uneven shards
    included), each rank holding about 1/N of them; the rest (norms, the replicated factor of
    each matrix, S_cat) every rank holds whole."""
    _, world, results = ranks
    held = [r["bytes"] for r in results]
    whole = held[0]["sharded_whole"]
    assert whole > 0 and all(h["sharded_whole"] == whole for h in held)
    assert sum(h["sharded_local"] for h in held) == whole
    for h in held:
        assert h["sharded_local"] <= 1.1 * whole / world, h
        assert h["replicated"] + whole == h["single"]


def test_each_rank_reads_what_it_holds_from_the_file(ranks):
    """TwinCheckpoint.load(like=) reads a rank's slices: the fraction of the twin file's
    elements it loads is the fraction of the wrapper's it holds, not the whole file."""
    _, world, results = ranks
    for r in results:
        h = r["bytes"]
        share = (h["sharded_local"] + h["replicated"]) / h["single"]
        assert share < 1 and abs(r["read_fraction"] - share) < 0.01, (r["read_fraction"], share)
