"""TwinCheckpoint.build_distributed on 2 gloo processes (torchrun): a tiny Llama whose base
and experts are transformers' sharded checkpoints, built by TIES + truncated SVD. The sharded twin
must be the single-process build's bit for bit, load whole and per tensor-parallel rank, and a
failure on one rank must stop every rank with the same error and leave nothing behind."""

import os

import pytest
import torch
from _torchrun import run_ranks

from twinmerge_ext._distributed_build import partition

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch built without torch.distributed")

WORKER = os.path.join(os.path.dirname(__file__), "dist_build_worker.py")


def _launch(case: str, world: int, out) -> list:
    return run_ranks(WORKER, case, world, out)


@pytest.mark.parametrize("world", [2])
def test_the_sharded_twin_is_the_single_process_build(world, tmp_path):
    results = _launch("ok", world, tmp_path)
    files = results[0]["files"]
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "twin.safetensors.index.json" in files and len(shards) == world
    assert all(f.endswith(f"-of-{world:05d}.safetensors") for f in shards)
    assert results[0]["metadata_equal"] and results[0]["tensors_equal"]
    for r in results:
        assert "error" not in r, r["error"]
        assert r["tp_rel"] < 1e-5, r
    # rank 0 shows one bar for every rank's share, each element counted twice; the others none
    counts = results[0]["counts"]
    assert counts["done"] == counts["totals"] and all(counts["totals"])
    assert sum(counts["totals"]) == 2 * results[0]["elements"]  # counted from the files
    last = results[0]["progress"].split("\r")[-1]
    assert last.startswith(f"TwinCheckpoint.build_distributed ({world} ranks): 100%"), last
    assert ", ".join(f"rank {r} 100%" for r in range(world)) in last, last
    assert all(r["progress"] == "" for r in results[1:])


def test_a_failure_on_one_rank_stops_every_rank(tmp_path):
    results = _launch("nan", 2, tmp_path)
    errors = {r["error"] for r in results}
    assert len(errors) == 1, errors  # the same error on every rank
    error = errors.pop()
    victim = results[0]["victim"]
    assert error.startswith("ValueError: TwinCheckpoint.build_distributed: rank 1 of 2 failed "
                            "while building its share")
    assert victim in error and "NaN" in error
    # the files the parameter is read from: the shards that hold it, the single-file expert
    files = results[0]["victim_files"]
    assert f"(read from base {files['base']}, expert 'task0' {files['task0']}, expert 'task1' " \
           f"{files['task1']}, expert 'task2' {files['task2']})" in error, error
    assert files["base"].endswith(".safetensors") and "-of-" in files["base"]
    assert results[0]["files"] == []  # no shard, no index
    # rank 0's bar closed where the build stopped, rank 1's share unfinished
    assert "TwinCheckpoint.build_distributed (2 ranks)" in results[0]["progress"]
    counts = results[0]["counts"]
    assert counts["done"][1] < counts["totals"][1] and "rank 1 100%" not in results[0]["progress"]


def test_the_partition_is_balanced_and_the_same_everywhere():
    sizes = [("a", 100), ("b", 60), ("c", 50), ("d", 10), ("e", 0)]
    owner = partition(sizes, 2)
    # a (100) to rank 0; b (60), c (50) to rank 1; d, then e (counted as 1) to the lighter 0.
    assert owner == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 0}
    load = [sum(n for k, n in sizes if owner[k] == r) for r in range(2)]
    assert max(load) - min(load) <= max(n for _, n in sizes)  # largest first, least loaded
    assert set(partition(sizes, 8).values()) <= set(range(8))


@pytest.fixture()
def one_process_group(tmp_path):
    """A process group of one (gloo), for the sharded format's single-process checks."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def _sources():
    g = torch.Generator().manual_seed(1)
    base = {"a.weight": torch.randn(24, 16, generator=g), "a.bias": torch.randn(24, generator=g),
            "b.weight": torch.randn(8, 24, generator=g)}
    experts = {f"t{i}": {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
               for i in range(3)}
    return base, experts


def test_a_new_build_replaces_the_old_and_removes_its_shards(one_process_group, tmp_path):
    from twinmerge_ext import TwinCheckpoint
    base, experts = _sources()
    out = tmp_path / "twin"
    TwinCheckpoint.build_distributed(out, base, experts, rank=3)
    first = sorted(os.listdir(out))
    TwinCheckpoint.build_distributed(out, base, experts, rank=5)
    second = sorted(os.listdir(out))
    assert len(first) == len(second) == 2 and set(first) & set(second) == \
        {"twin.safetensors.index.json"}
    twin = TwinCheckpoint.load(out)
    assert all(lr.ranks == (5,) * 3 for lr in twin.lowrank.values())
    single = TwinCheckpoint.build(base, experts, rank=5)
    assert twin.metadata == single.metadata


def test_a_damaged_sharded_twin_is_refused_by_name(one_process_group, tmp_path):
    from twinmerge_ext import TwinCheckpoint
    base, experts = _sources()
    out = tmp_path / "twin"
    index = TwinCheckpoint.build_distributed(out, base, experts, rank=3)
    shard = next(f for f in os.listdir(out) if f.endswith(".safetensors"))
    data = bytearray((out / shard).read_bytes())
    data[-3] ^= 0x40  # the last tensor's data
    (out / shard).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its checksum"):
        TwinCheckpoint.load(out)
    os.remove(out / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        TwinCheckpoint.load(index)
    (out / "twin.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid twin index"):
        TwinCheckpoint.load(out)


def test_bad_calls_are_refused_before_anything_is_written(one_process_group, tmp_path):
    from twinmerge_ext import TwinCheckpoint
    base, experts = _sources()
    with pytest.raises(TypeError, match="unexpected keyword argument 'ranks'"):
        TwinCheckpoint.build_distributed(tmp_path / "a", base, experts, ranks=3)
    with pytest.raises(ValueError, match="rank 0 of 1 failed while checking the arguments.*"
                                         "rank_ratio must be in"):
        TwinCheckpoint.build_distributed(tmp_path / "b", base, experts, rank_ratio=2.0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_progress_counts_every_element_twice_and_cleans_up(one_process_group, tmp_path):
    """One rank: the bar's total is the share's elements twice (shared merge, compression), it
    ends full, and the store's counters are gone afterwards."""
    import io
    from contextlib import redirect_stderr

    from torch.distributed import distributed_c10d as c10d
    from tqdm import tqdm

    from twinmerge_ext import TwinCheckpoint
    base, experts = _sources()
    store = c10d._get_process_group_store(c10d._get_default_group())
    keys = store.num_keys()
    err = io.StringIO()
    with redirect_stderr(err):
        TwinCheckpoint.build_distributed(tmp_path / "twin", base, experts, rank=3, progress=True)
    total = tqdm.format_sizeof(2 * sum(t.numel() for t in base.values()))
    last = err.getvalue().split("\r")[-1]
    assert last.startswith("TwinCheckpoint.build_distributed (1 rank): 100%"), last
    assert f"{total}/{total}" in last and "rank 0 100%" in last, last
    assert store.num_keys() == keys
