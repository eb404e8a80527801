"""Twin-Merging for a model larger than one device: built by several processes, served with
tensor parallelism, checked against one process. Launch with torchrun:

    torchrun --nproc-per-node 2 examples/tp_serve.py [--out DIR]

1. The experts: a Llama (small here, so the example runs anywhere) and three fine-tuned experts,
   written as transformers' sharded checkpoints (`save_pretrained` with a small shard size), as
   large experts come.
2. The twin, built by every rank on its share of the parameters
   (`TwinCheckpoint.build_distributed`): a sharded twin, each rank reading only its tensors.
3. Serving: every rank parallelizes the model with torch's own plan (`parallelize_module`,
   ColwiseParallel / RowwiseParallel), loads only its slices of the twin (`load(like=)`), and
   serves a mixed batch, each row with its own weights, in factored mode: logits and greedy
   generation, with the plain tensor-parallel model's collectives only.
4. The check: rank 0 serves the same batch from the whole twin in one process; the logits agree
   to float32 rounding and the generated tokens are identical. A mismatch exits with status 1.

Gloo on CPUs (one thread per rank), NCCL on GPUs (one per rank).
"""

import argparse
import copy
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from twinmerge_ext import TwinCheckpoint, TwinMergedModule

CONFIG = transformers.LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4,
                                  intermediate_size=128, max_position_embeddings=128,
                                  bos_token_id=0, eos_token_id=1, pad_token_id=0)
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
TASKS = ("math", "code", "law")


def write_experts(out: str) -> dict:
    """The base and each expert (the base plus a low-rank update of every attention and MLP
    matrix, as fine-tuning leaves) as sharded checkpoints under `out`."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(CONFIG)
    paths = {"base": os.path.join(out, "base")}
    base.save_pretrained(paths["base"], max_shard_size="200KB")
    for i, task in enumerate(TASKS):
        expert = copy.deepcopy(base)
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for name, p in expert.named_parameters():
                if name.endswith("proj.weight"):
                    a = torch.randn(p.shape[0], 4, generator=g)
                    b = torch.randn(4, p.shape[1], generator=g)
                    p.add_(0.02 * a @ b)
        paths[task] = os.path.join(out, task)
        expert.save_pretrained(paths[task], max_shard_size="200KB")
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where the experts and the twin go (default: a temporary "
                                      "directory)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    else:
        torch.set_num_threads(1)
    device = torch.device("cuda" if cuda else "cpu")
    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    box = [args.out or tmp.name]
    dist.broadcast_object_list(box, src=0)  # rank 0's directory, for every rank
    out = box[0]

    # 1. the experts, as sharded checkpoints
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        paths = write_experts(out)
    else:
        paths = None
    box = [paths]
    dist.broadcast_object_list(box, src=0)
    paths = box[0]

    # 2. the twin, built by every rank on its share
    twin_dir = os.path.join(out, "twin")
    TwinCheckpoint.build_distributed(twin_dir, paths["base"], {t: paths[t] for t in TASKS},
                                     rank=4)
    shards = sorted(f for f in os.listdir(twin_dir) if f.endswith(".safetensors"))
    if rank == 0:
        print(f"built by {world} ranks: {twin_dir} ({len(shards)} shards and an index)")

    # 3. tensor-parallel serving of a mixed batch
    mesh = init_device_mesh(device.type, (world,))
    model = parallelize_module(transformers.LlamaForCausalLM(CONFIG).to(device).eval(), mesh,
                               PLAN)
    part = TwinCheckpoint.load(twin_dir, like=model)  # this rank's slices only
    served = TwinMergedModule(model, part, mode="factored")
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, CONFIG.vocab_size, (4, 12), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a shorter prompt, left-padded
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
                      [0.5, 0.3, 0.2]], device=device)  # each row its own model
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits = served(input_ids=ids, attention_mask=mask, mix_weights=w,
                        use_cache=False).logits
    tokens = served.generate(ids, mix_weights=w, **kw)

    # 4. the same batch from the whole twin in one process
    ok = True
    if rank == 0:
        whole = TwinCheckpoint.load(twin_dir)
        single = TwinMergedModule(transformers.LlamaForCausalLM(CONFIG).to(device).eval(),
                                  whole.to(device), mode="factored")
        with torch.no_grad():
            want = single(input_ids=ids, attention_mask=mask, mix_weights=w,
                          use_cache=False).logits
        rel = ((logits - want).abs().max() / want.abs().max()).item()
        same = torch.equal(tokens, single.generate(ids, mix_weights=w, **kw))
        ok = rel < 1e-4 and same
        print(f"tensor-parallel on {world} ranks against one process: max relative difference "
              f"of the logits {rel:.1e}, generated tokens identical: {same}")
        print("OK" if ok else "MISMATCH")
    box = [ok]
    dist.broadcast_object_list(box, src=0)
    dist.barrier()
    dist.destroy_process_group()
    if tmp is not None:
        tmp.cleanup()
    return 0 if box[0] else 1


if __name__ == "__main__":
    sys.exit(main())
