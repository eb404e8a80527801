"""The distributed build: each rank's time and peak memory for `TwinCheckpoint.build_distributed`
against one process running `TwinCheckpoint.build` on the same files, one launch per size:

    python -m bench.distributed_build --out bench/results/distributed-build-cpu.json

The experts: a Llama (hidden `--hidden`, `--layers` layers, MLP 4×) and T experts, each the base
plus a rank-8 update of every attention and MLP matrix, written as transformers' sharded
checkpoints; the twin at rank 16 by task arithmetic. This script writes them, then launches
`torchrun --nproc-per-node N` of itself for each N in `--ranks` (1 is `build` in one process).
Each process reports its wall time and two peaks above what it held before the build:
- anonymous memory (`RssAnon` of /proc/self/status, sampled every millisecond by a thread):
  what the process allocated and touched, the measure of the claim below;
- resident memory (`ru_maxrss`), which also counts the pages of the expert files it maps and
  reads (they are the page cache's, dropped under pressure).
The claim: peak memory per process is its share plus a few tensors. Each row states an
estimate of that (nothing asserts it): its shard file (its share of θs and its factors, all the
build keeps) plus (T + 2) of its largest parameter in float32 (one parameter's T deltas, its θs
and one expert tensor in flight), and the ratio of the anonymous peak to it.
"""

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class AnonPeak:
    """The largest `anon_mib()` seen while it runs, sampled every millisecond by a thread
    (allocations short enough to fall between two samples can be missed)."""

    def __enter__(self):
        import threading
        self.peak, self.stop = anon_mib(), threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, anon_mib())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, anon_mib())


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_experts(out: str, hidden: int, layers: int, T: int) -> dict:
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=8,
                                   intermediate_size=4 * hidden, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    paths = {"base": os.path.join(out, "base")}
    base.save_pretrained(paths["base"], max_shard_size="100MB")
    for t in range(T):
        expert = copy.deepcopy(base)
        g = torch.Generator().manual_seed(t + 1)
        with torch.no_grad():
            for name, p in expert.named_parameters():
                if name.endswith("proj.weight"):
                    p.add_(0.01 * torch.randn(p.shape[0], 8, generator=g)
                           @ torch.randn(8, p.shape[1], generator=g))
        paths[f"task{t}"] = os.path.join(out, f"task{t}")
        expert.save_pretrained(paths[f"task{t}"], max_shard_size="100MB")
        del expert
    return paths


def share_bound(paths, experts, rank: int, world: int) -> dict:
    """This process's share (float32 MiB of its parameters) and what may be in flight at once:
    (T + 2) of its largest parameter in float32."""
    from twinmerge_ext._distributed_build import partition
    from twinmerge_ext.checkpoint import _BuildPlan
    sizes = _BuildPlan(paths["base"], experts).sizes()
    owner = partition(sizes, world)
    mine = [n for name, n in sizes if owner[name] == rank]
    return {"parameters": len(mine), "share_mib": 4 * sum(mine) / 2**20,
            "in_flight_mib": 4 * (len(experts) + 2) * max(mine) / 2**20}


def rank_main(paths_file: str, result_file: str) -> None:
    """One rank (or the single process, without torchrun)."""
    from twinmerge_ext import TwinCheckpoint
    paths = json.loads(Path(paths_file).read_text())
    experts = {k: v for k, v in paths.items() if k.startswith("task")}
    distributed = "RANK" in os.environ
    if distributed:
        import torch.distributed as dist
        dist.init_process_group("gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    bound = share_bound(paths, experts, rank, world)
    before, anon_before, t0 = rss_mib(), anon_mib(), time.perf_counter()
    with AnonPeak() as anon:
        if distributed:
            TwinCheckpoint.build_distributed(paths["out"], paths["base"], experts, rank=16)
        else:
            twin = TwinCheckpoint.build(paths["base"], experts, rank=16)
            twin.save(os.path.join(paths["out"], "twin.safetensors"))
            del twin
    shard = max(Path(paths["out"]).glob(f"*{rank + 1:05d}-of-{world:05d}.safetensors")
                if distributed else [Path(paths["out"]) / "twin.safetensors"],
                key=lambda f: f.stat().st_mtime)
    bound["shard_mib"] = shard.stat().st_size / 2**20
    bound["bound_mib"] = bound["shard_mib"] + bound["in_flight_mib"]
    row = {"rank": rank, "world": world, "seconds": time.perf_counter() - t0,
           "rss_before_mib": before, "peak_mib": peak_mib(),
           "peak_above_before_mib": peak_mib() - before,
           "anon_before_mib": anon_before, "anon_peak_above_before_mib": anon.peak - anon_before,
           **bound, "anon_peak_over_bound": (anon.peak - anon_before) / bound["bound_mib"]}
    Path(f"{result_file}.{rank}").write_text(json.dumps(row))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--rank-main", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_main:
        rank_main(*args.rank_main)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_experts(tmp, args.hidden, args.layers, args.experts)
        for n in [int(x) for x in args.ranks.split(",")]:
            paths["out"] = os.path.join(tmp, f"twin-{n}")
            os.makedirs(paths["out"], exist_ok=True)
            pf = os.path.join(tmp, "paths.json")
            Path(pf).write_text(json.dumps(paths))
            rf = os.path.join(tmp, f"result-{n}")
            me = [str(Path(__file__).resolve()), "--rank-main", pf, rf]
            cmd = ([sys.executable] + me if n == 1 else
                   [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={n}"] + me)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(Path(__file__).resolve().parents[1])]
                + [x for x in [os.environ.get("PYTHONPATH")] if x]))
            subprocess.run(cmd, check=True, env=env)
            for r in range(n):
                row = json.loads(Path(f"{rf}.{r}").read_text())
                rows.append(row)
                print(f"{n} process(es), rank {r}: {row['seconds']:.1f} s; above its start, "
                      f"anonymous peak {row['anon_peak_above_before_mib']:.0f} MiB = "
                      f"{row['anon_peak_over_bound']:.2f}x the estimate (shard "
                      f"{row['shard_mib']:.0f} + in flight {row['in_flight_mib']:.0f} MiB; its "
                      f"share of θs {row['share_mib']:.0f} MiB), resident peak "
                      f"{row['peak_above_before_mib']:.0f} MiB", flush=True)
        model_mib = sum(f.stat().st_size for f in Path(paths["base"]).glob("*.safetensors")) / 2**20
    if args.out:
        from bench.run import environment
        env = environment(torch.device("cpu"))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(environment=env, model_mib=model_mib,
                                            experts=args.experts, hidden=args.hidden,
                                            layers=args.layers, rows=rows), indent=2))
        print(f"wrote {args.out} (one model: {model_mib:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
