"""Tensor-parallel serving: per rank, the time and the bytes of the twin's factored forward
against the plain tensor-parallel model at the same shapes, one process per device.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m bench.tensor_parallel \\
        --out bench/results/tp-cpu.json

The model is a Llama built from its config (hidden 512, 8 heads, 4 KV heads, MLP 1536,
vocabulary 8192, `--layers` layers), parallelized by torch (`parallelize_module`: a
vocabulary-parallel embedding, column-parallel q/k/v and gate/up, row-parallel o and down, the
LM head column-parallel with a replicated output), with T LoRA-like experts compressed at their
own rank and loaded by each rank as its slices (`TwinCheckpoint.load(like=)`). Gloo on CPUs, NCCL
on GPUs (one per rank). Cases (twin / plain; < 1 is faster), each rank timing the same calls in
lockstep (a barrier before each), interleaved, the median of `--runs`:
- prefill: one forward of [B, L] with per-row weights (factored) against the plain TP model (θs).
- generate: `generate` of NEW tokens at batch B, per-row weights, against the plain model's.
Each rank also reports the bytes of the tensors it holds (its shards and what it holds whole)
and, per forward of both, the collectives (CommDebugMode) and the bytes this rank puts into them
(`CommBytes`: each collective's input on this rank, e.g. the whole [B, L, hidden] partial sum of
an all-reduce, its local shard for an all-gather; a ring all-reduce moves about 2(N-1)/N of it
over the wire per rank). Both must be equal: the twin adds no communication.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from bench.generation import llama_case
from twinmerge_ext import TwinCheckpoint, TwinMergedModule

WIDTHS = dict(vocab_size=8192, hidden_size=512, num_attention_heads=8, num_key_value_heads=4,
              intermediate_size=1536, tie_word_embeddings=False)

PLAN = {
    "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
    "model.layers.*.self_attn.q_proj": ColwiseParallel(),
    "model.layers.*.self_attn.k_proj": ColwiseParallel(),
    "model.layers.*.self_attn.v_proj": ColwiseParallel(),
    "model.layers.*.self_attn.o_proj": RowwiseParallel(),
    "model.layers.*.mlp.gate_proj": ColwiseParallel(),
    "model.layers.*.mlp.up_proj": ColwiseParallel(),
    "model.layers.*.mlp.down_proj": RowwiseParallel(),
    "lm_head": ColwiseParallel(output_layouts=Replicate()),
}


class CommBytes(CommDebugMode):
    """CommDebugMode that also sums, per kind of collective, the bytes of the tensor this rank
    contributes to each: the first tensor argument of the functional collectives DTensor and
    the tensor-parallel styles emit (`_c10d_functional.all_reduce`, `all_gather_into_tensor`,
    ...: the buffer reduced or this rank's shard). Legacy c10d ops, whose first argument may be
    the output, are counted the same way and would be wrong: the TP paths measured here do not
    use them."""

    def __enter__(self):
        self.comm_bytes = {}
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor.debug._comm_mode import c10d_collective_ops
        packet = getattr(func, "_overloadpacket", None)
        if DTensor not in types and (packet in self.comm_registry
                                     or packet in c10d_collective_ops):
            first = next((a for a in args if isinstance(a, (torch.Tensor, list, tuple))), None)
            tensors = first if isinstance(first, (list, tuple)) else [first]
            n = sum(t.numel() * t.element_size() for t in tensors
                    if isinstance(t, torch.Tensor))
            key = str(packet)
            self.comm_bytes[key] = self.comm_bytes.get(key, 0) + n
        return super().__torch_dispatch__(func, types, args, kwargs)


def held_bytes(module) -> int:
    """Bytes of the tensors this rank holds (a DTensor counts its local shard)."""
    seen, n = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        t = t.to_local() if isinstance(t, DTensor) else t
        n += t.numel() * t.element_size()
    return n


def lockstep(fns, runs: int, device):
    """{name: median ms}: every rank calls the functions the same number of times, in the same
    order (they run collectives), each call after a barrier, interleaved, after one warm-up."""
    times = {k: [] for k in fns}
    for i in range(runs + 1):
        for k, fn in fns.items():
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def run(layers=2, T=6, rank=8, B=8, L=64, new=8, runs=5, widths=None):
    rank_id, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available()
                          else "cpu")
    mesh = init_device_mesh(device.type, (world,))
    widths = widths or WIDTHS
    make, twin = llama_case(layers, T, rank, **widths)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "twin.safetensors")
        if rank_id == 0:
            twin.save(path)
        obj = [path if rank_id == 0 else None]
        dist.broadcast_object_list(obj, src=0)
        path = obj[0]

        def tp_model():
            return parallelize_module(make().to(device), mesh, PLAN)
        plain = tp_model()  # the base's weights: the same shapes and work as θs
        model = tp_model()
        dist.barrier()
        part = TwinCheckpoint.load(path, like=model)
        dist.barrier()  # every rank has read the file before rank 0's directory goes
    served = TwinMergedModule(model, part, mode="factored")
    del twin
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, widths["vocab_size"], (B, L), generator=g).to(device)
    mask = torch.ones_like(ids)
    w = torch.softmax(2 * torch.randn(B, T, generator=g), -1).to(device)
    shape = dict(layers=layers, T=T, rank=rank, B=B, L=L, new=new, world=world,
                 hidden=widths["hidden_size"])
    rows = []
    with torch.no_grad():
        comms, comm_bytes = {}, {}
        for name, fn in (("plain", lambda: plain(input_ids=ids, attention_mask=mask)),
                         ("twin", lambda: served(input_ids=ids, attention_mask=mask,
                                                 mix_weights=w))):
            with CommBytes() as c:
                fn()
            comms[name] = {str(k): v for k, v in c.get_comm_counts().items()}
            comm_bytes[name] = c.comm_bytes
        t = lockstep({"twin": lambda: served(input_ids=ids, attention_mask=mask, mix_weights=w),
                      "plain": lambda: plain(input_ids=ids, attention_mask=mask)}, runs, device)
        rows.append(dict(case="prefill", median_ms=t, ratio=t["twin"] / t["plain"],
                         tokens_per_s={k: B * L / (v * 1e-3) for k, v in t.items()},
                         collectives_per_forward=comms, bytes_per_forward=comm_bytes,
                         shape=shape))
        kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                  pad_token_id=0)
        t = lockstep({"twin": lambda: served.generate(ids, mix_weights=w, **kw),
                      "plain": lambda: plain.generate(ids, **kw)}, runs, device)
        rows.append(dict(case="generate", median_ms=t, ratio=t["twin"] / t["plain"],
                         tokens_per_s={k: B * new / (v * 1e-3) for k, v in t.items()},
                         shape=shape))
    held = {"plain": held_bytes(plain), "twin": held_bytes(served),
            "twin_file_read": sum((v.to_local() if isinstance(v, DTensor) else v).numel()
                                  * v.element_size() for _, v in part._tensors())}
    return dict(rank=rank_id, device=str(device), rows=rows, held_bytes=held)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=6)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="test sizes (bench's own test)")
    args = parser.parse_args(argv)
    dist.init_process_group()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    widths = dict(WIDTHS, vocab_size=128, hidden_size=32, intermediate_size=48) if args.tiny \
        else None
    res = run(args.layers, args.experts, args.rank, args.batch, args.prompt, args.new,
              args.runs, widths)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, res)
    if dist.get_rank() == 0:
        from bench.run import environment
        for r in gathered:
            for row in r["rows"]:
                print(f"rank {r['rank']} {row['case']:<9} twin/plain {row['ratio']:.3f}x  "
                      + ", ".join(f"{k} {v:.1f} ms" for k, v in row["median_ms"].items()),
                      flush=True)
            sent = {k: sum(v.values()) for k, v in r["rows"][0]["bytes_per_forward"].items()}
            print(f"rank {r['rank']} puts into collectives per prefill forward: twin "
                  f"{sent['twin'] / 2**20:.2f} MiB, plain {sent['plain'] / 2**20:.2f} MiB",
                  flush=True)
            h = r["held_bytes"]
            print(f"rank {r['rank']} holds {h['twin'] / 2**20:.1f} MiB (plain TP model "
                  f"{h['plain'] / 2**20:.1f} MiB)", flush=True)
        if args.out:
            env = environment(torch.device(gathered[0]["device"]))
            env["world_size"] = dist.get_world_size()
            env["backend"] = dist.get_backend_config()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(dict(environment=env, ranks=gathered), indent=2))
            print(f"wrote {args.out}")
    dist.barrier()  # no rank leaves while another still works
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
