"""One rank of the distributed-build tests, launched by torchrun (tests/test_distributed_build.py):

    python -m torch.distributed.run --standalone --nproc-per-node N tests/dist_build_worker.py CASE OUT

ok: rank 0 writes the base and experts as transformers' sharded checkpoints (and one expert as a
single file); every rank builds its share with `TwinCheckpoint.build_distributed`; rank 0 checks
the sharded twin, loaded whole, against `TwinCheckpoint.build` in one process, tensor by tensor
(bit for bit) and metadata; every rank loads its tensor-parallel slices (`like=`) and serves.
nan: one expert has a NaN in a parameter of the last rank's share: every rank must fail.
Both build with progress=True; each rank's stderr during the build is kept.
Each rank writes OUT/rank{r}.json.
"""

import io
import json
import math
import os
import sys
from contextlib import redirect_stderr

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import parallelize_module

from tp_worker import LLAMA_PLAN, experts, llama, rel
from twinmerge_ext import TwinCheckpoint, TwinMergedModule, _distributed_build
from twinmerge_ext._distributed_build import partition
from twinmerge_ext.checkpoint import _BuildPlan


def write_sources(out: str, base_sd, ex):
    """The base and the first experts as sharded checkpoints (several files and an index), the
    last expert as one .safetensors file."""
    from safetensors.torch import save_file
    model = llama()
    paths = {}
    for name, sd in [("base", base_sd)] + list(ex.items()):
        d = os.path.join(out, name)
        if name == list(ex)[-1]:
            os.makedirs(d, exist_ok=True)
            save_file({k: v.contiguous() for k, v in sd.items()},
                      os.path.join(d, "model.safetensors"))
            paths[name] = os.path.join(d, "model.safetensors")
            continue
        model.load_state_dict(sd)
        model.save_pretrained(d, max_shard_size="40KB")
        paths[name] = d
    return paths


def elements(directory: str) -> int:
    """The parameters' elements of a sharded checkpoint, from its files' headers."""
    from safetensors import safe_open
    index = json.load(open(os.path.join(directory, "model.safetensors.index.json")))
    n = 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(os.path.join(directory, shard), framework="pt") as f:
            for k in f.keys():
                n += math.prod(f.get_slice(k).get_shape())
    return n


def main(case: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    base_sd, ex = experts(llama, 11)
    res = {"rank": rank, "world": world}
    kw = dict(rank=5, shared="ties", shared_kwargs={"density": 0.5})
    paths = victim = None
    if rank == 0:
        paths = write_sources(out, base_sd, ex)
        if case == "nan":  # a NaN in a matrix of the last rank's share, as the build plans it
            sizes = _BuildPlan(paths["base"], {k: paths[k] for k in ex}, **kw).sizes()
            owner = partition(sizes, world)
            victim = next(k for k, _ in sizes if owner[k] == world - 1 and
                          k.endswith("proj.weight"))
            ex["task1"][victim][0, 0] = float("nan")
            paths = write_sources(out, base_sd, ex)
    box = [(paths, victim)]
    dist.broadcast_object_list(box, src=0)
    paths, res["victim"] = box[0]
    if res["victim"]:  # where the victim is stored, read from the files themselves
        res["victim_files"] = {
            k: p if p.endswith(".safetensors") else os.path.join(p, json.load(open(os.path.join(
                p, "model.safetensors.index.json")))["weight_map"][res["victim"]])
            for k, p in paths.items()}
    base, sources = paths["base"], {k: paths[k] for k in ex}
    target = os.path.join(out, "twin")
    err = io.StringIO()  # the progress bars (rank 0's only)
    counts = {}  # what rank 0's bar last read from every rank's counter, and the totals
    close = _distributed_build._Progress.close

    def spy(self):
        close(self)
        counts.update(done=list(self.done), totals=list(self.totals))
    _distributed_build._Progress.close = spy
    try:
        with redirect_stderr(err):
            index = TwinCheckpoint.build_distributed(target, base, sources, progress=True, **kw)
        res["index"] = os.path.relpath(index, out)
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
    res["progress"], res["counts"] = err.getvalue(), counts
    res["elements"] = elements(base)
    res["files"] = sorted(os.listdir(target)) if os.path.isdir(target) else []
    if case == "ok" and "error" not in res:
        if rank == 0:
            whole = TwinCheckpoint.load(target)
            single = TwinCheckpoint.build(base, sources, **kw)
            res["metadata_equal"] = whole.metadata == single.metadata
            a, b = dict(whole._file_tensors()), dict(single._file_tensors())
            res["tensors_equal"] = sorted(a) == sorted(b) and all(
                torch.equal(a[k], b[k]) for k in a)
        mesh = init_device_mesh("cpu", (world,))
        model = parallelize_module(llama(), mesh, LLAMA_PLAN)
        part = TwinCheckpoint.load(target, like=model)
        whole = TwinCheckpoint.load(target)
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(2, 90, (3, 6), generator=g)
        w = torch.softmax(torch.randn(3, 3, generator=g), -1)
        with torch.no_grad():
            got = TwinMergedModule(model, part)(input_ids=ids, mix_weights=w).logits
            want = TwinMergedModule(llama(), whole)(input_ids=ids, mix_weights=w).logits
        res["tp_rel"] = rel(got, want)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
