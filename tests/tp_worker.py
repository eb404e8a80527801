"""One rank of the tensor-parallel tests, launched by torchrun (tests/test_tensor_parallel.py):

    python -m torch.distributed.run --standalone --nproc-per-node N tests/tp_worker.py CASE OUT

Every rank builds the same experts and twin (same seeds), serves them with a tensor-parallel
module (torch's `parallelize_module`, ColwiseParallel / RowwiseParallel on a 1-D gloo mesh) and
with the single-process wrapper, and writes OUT/rank{r}.json: the largest relative difference of
each check, the collectives per forward of the plain TP model and of the TP twin and the bytes
this rank puts into them (`bench.tensor_parallel.CommBytes`, a CommDebugMode), and the bytes of
the tensors this rank holds.
"""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from bench.tensor_parallel import PLAN, CommBytes
from twinmerge_ext import TwinCheckpoint, TwinMergedModule

T, B, L = 3, 4, 7


def llama():
    # The vocabulary (90) splits unevenly over 4 ranks: 23, 23, 23 and 21 rows of the embedding
    # and the LM head. (An uneven MLP width would not do: a column-parallel output handed on as
    # a local tensor is taken as even shards by the next layer's style, in the plain model too.)
    cfg = transformers.LlamaConfig(vocab_size=90, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4,
                                   intermediate_size=72, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


LLAMA_PLAN = PLAN  # vocabulary-parallel embedding, column/row-parallel attention and MLP


def bert():
    cfg = transformers.BertConfig(vocab_size=90, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48,
                                  max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


BERT_PLAN = {
    "bert.embeddings.word_embeddings": ColwiseParallel(output_layouts=Replicate()),
    "bert.encoder.layer.*.attention.self.query": ColwiseParallel(),
    "bert.encoder.layer.*.attention.self.key": ColwiseParallel(),
    "bert.encoder.layer.*.attention.self.value": ColwiseParallel(),
    "bert.encoder.layer.*.attention.output.dense": RowwiseParallel(),
    "bert.encoder.layer.*.intermediate.dense": ColwiseParallel(),
    "bert.encoder.layer.*.output.dense": RowwiseParallel(),
}

MODELS = {"llama": (llama, LLAMA_PLAN), "bert": (bert, BERT_PLAN)}


def experts(make, seed):
    """T experts: the base with random perturbations of every floating tensor."""
    torch.manual_seed(seed)
    base = make()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    out = {}
    for t in range(T):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        out[f"task{t}"] = {k: v.clone() for k, v in m.state_dict().items()}
    return base_sd, out


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def held_bytes(tp, single) -> dict:
    """Bytes of the tensors this rank holds, against the single-process wrapper's: those split
    over the ranks ("sharded": local and whole) and those every rank holds whole."""
    whole = dict(single.named_parameters())
    whole.update(single.named_buffers())
    out = {"sharded_local": 0, "sharded_whole": 0, "replicated": 0, "single": 0}
    seen = set()
    for name, t in list(tp.named_parameters()) + list(tp.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        loc = _local(t)
        size = loc.numel() * loc.element_size()
        full = whole[name].numel() * whole[name].element_size()
        out["single"] += full
        if size < full:
            out["sharded_local"] += size
            out["sharded_whole"] += full
        else:
            out["replicated"] += size
    return out


def main(case: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    make, plan = MODELS[case]
    base_sd, ex = experts(make, 7)
    twin = TwinCheckpoint.build(base_sd, ex, rank=6)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 90, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :2] = 0  # left padding on one row
    w = torch.softmax(3 * torch.randn(B, T, generator=g), -1)
    vec = torch.softmax(torch.randn(T, generator=g), -1)
    res = {"rank": rank, "world": world, "checks": {}, "comms": {}, "comm_bytes": {}}
    # Materialize mode serves per-row weights in sub-batches, which a KV cache cannot be split
    # into: the forward checks return none (the decode steps below use one).
    x = dict(input_ids=ids, attention_mask=mask, **({"use_cache": False} if case == "llama"
                                                    else {}))

    def tp_model():
        m = make()
        m.load_state_dict(base_sd)
        return parallelize_module(m, mesh, plan)

    def logits(o):
        return o.logits

    plain = tp_model()
    for mode in ("factored", "materialize"):
        ref = TwinMergedModule(make(), twin, mode=mode)
        tw = TwinMergedModule(tp_model(), twin, mode=mode)
        with torch.no_grad():
            for label, kw in (("rows", {"mix_weights": w}), ("vector", {"mix_weights": vec})):
                want = logits(ref(**x, **kw))
                with CommBytes() as comm:
                    got = logits(tw(**x, **kw))
                res["checks"][f"{mode}/{label}"] = rel(got, want)
                res["comms"][f"{mode}/{label}"] = {str(k): v for k, v in
                                                   comm.get_comm_counts().items()}
                res["comm_bytes"][f"{mode}/{label}"] = comm.comm_bytes
            with ref.merged(vec), tw.merged(vec):
                res["checks"][f"{mode}/merged"] = rel(
                    logits(tw(**x)),
                    logits(ref(**x)))
        if case == "llama":
            kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
            a = tw.generate(ids, mix_weights=w if mode == "factored" else vec, **kw)
            b = ref.generate(ids, mix_weights=w if mode == "factored" else vec, **kw)
            res["checks"][f"{mode}/generate_equal_tokens"] = float(torch.equal(a, b))
            if mode == "factored":  # a prefill, then decode steps that read the KV cache
                with torch.no_grad():
                    steps = []
                    for model in (tw, ref):
                        o = model(input_ids=ids[:, :-2], attention_mask=mask[:, :-2],
                                  mix_weights=w, use_cache=True)
                        cache = o.past_key_values
                        ys = []
                        for j in (L - 2, L - 1):
                            o = model(input_ids=ids[:, j:j + 1], attention_mask=mask[:, :j + 1],
                                      past_key_values=cache, mix_weights=w, use_cache=True)
                            cache = o.past_key_values
                            ys.append(o.logits)
                        steps.append(torch.cat(ys, 1))
                    res["checks"]["factored/kv_cache_steps"] = rel(*steps)
        if mode == "factored":
            res["bytes"] = held_bytes(tw, ref)
    with torch.no_grad(), CommBytes() as comm:
        logits(plain(**x))
    res["comms"]["plain"] = {str(k): v for k, v in comm.get_comm_counts().items()}
    res["comm_bytes"]["plain"] = comm.comm_bytes

    # Each rank reads its slices of the saved twin: the same outputs, the same merged tensors.
    path = os.path.join(out, "twin.safetensors")
    if rank == 0:
        twin.save(path)
    dist.barrier()
    model = tp_model()
    part = TwinCheckpoint.load(path, like=model)
    read = sum(_local(t).numel() for _, t in part._tensors())
    res["read_fraction"] = read / sum(t.numel() for _, t in twin._tensors())
    sd = part.merged_state_dict(vec)
    want = twin.merged_state_dict(vec)
    res["checks"]["load_like/merged_state_dict"] = max(
        rel(v.full_tensor() if isinstance(v, DTensor) else v, want[k]) for k, v in sd.items())
    ref = TwinMergedModule(make(), twin, mode="factored")
    tw = TwinMergedModule(model, part, mode="factored")
    with torch.no_grad():
        res["checks"]["load_like/rows"] = rel(
            logits(tw(**x, mix_weights=w)), logits(ref(**x, mix_weights=w)))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()  # no rank leaves while another still works
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
