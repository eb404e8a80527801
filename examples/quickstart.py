"""Twin-Merging on the twinmerge ops, end to end on a small model, in under a minute on a CPU.

Four experts are fine-tuned from one base MLP on four different classification tasks. They are
merged (1) statically by task arithmetic and (2) by Twin-Merging: a shared expert plus each
expert's exclusive knowledge compressed by truncated SVD, mixed per input. A mixed batch with
inputs of every task is served two exact ways: factored (each row mixes in activation space with
lowrank_mix_linear) and materialized (lowrank_merge_ into one merged model per task).

The mixing weights here are one-hot on each input's true task: the router that predicts them
is not part of this example, so the Twin rows show what exact per-input
merging recovers, not router accuracy.
"""

import os
import tempfile
import time

import torch
import torch.nn.functional as F

import twinmerge_ext as tm
from twinmerge_ext import TwinCheckpoint

torch.manual_seed(0)
T, D, H, C, N = 4, 32, 64, 6, 4000  # tasks, input dim, hidden, classes, examples per task
LAYERS = ["fc1", "fc2"]


def make_task(t):
    g = torch.Generator().manual_seed(100 + t)
    proj = torch.randn(D, C, generator=g)
    x = torch.randn(N, D, generator=g)
    return x, (x @ proj + 0.5 * torch.sin(2 * x[:, t : t + C])).argmax(1)


def forward(p, x):
    return F.linear(F.relu(F.linear(x, p["fc1.weight"], p["fc1.bias"])), p["fc2.weight"], p["fc2.bias"])


def finetune(p, x, y, steps=200):
    p = {k: v.clone().requires_grad_() for k, v in p.items()}
    opt = torch.optim.Adam(p.values(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,))
        loss = F.cross_entropy(forward(p, x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in p.items()}


def accuracy(logits, y):
    return (logits.argmax(-1) == y).float().mean().item()


tasks = [make_task(t) for t in range(T)]
train = [(x[: N // 2], y[: N // 2]) for x, y in tasks]
test = [(x[N // 2 :], y[N // 2 :]) for x, y in tasks]
base = {"fc1.weight": torch.randn(H, D) / D**0.5, "fc1.bias": torch.zeros(H),
        "fc2.weight": torch.randn(C, H) / H**0.5, "fc2.bias": torch.zeros(C)}
start = time.perf_counter()
experts = [finetune(base, x, y) for x, y in train]
print(f"fine-tuned {T} experts in {time.perf_counter() - start:.1f}s")

# Stage 1 (offline): shared expert by task arithmetic, exclusive knowledge v_t = θ_t − θ_s,
# matrices compressed by truncated SVD, saved and loaded back as one checkpoint.
lam, rank = 0.3, 8
names = [f"task{t}" for t in range(T)]
twin = TwinCheckpoint.build(base, dict(zip(names, experts)), shared="task_arithmetic",
                            shared_kwargs={"scale": lam}, rank=rank)
with tempfile.TemporaryDirectory() as tmp:
    twin.save(os.path.join(tmp, "twin.safetensors"))
    twin = TwinCheckpoint.load(os.path.join(tmp, "twin.safetensors"))
report = twin.report()
for name, errors in report["errors"].items():
    print(f"{name}: {tuple(twin.shared[name].shape)} -> rank {report['ranks'][name][0]} per expert, "
          f"relative reconstruction error {max(errors.values()):.3f} (worst task)")
print(f"twin checkpoint: {report['storage']['storage_ratio']:.2f}x one model "
      f"(the {T} experts: {T}x)")
shared = twin.shared

# Stage 2: a shuffled batch mixing all tasks; each row carries its own mixing weights.
x = torch.cat([x for x, _ in test])
y = torch.cat([y for _, y in test])
task_of = torch.arange(T).repeat_interleave(N // 2)
perm = torch.randperm(len(x))
x, y, task_of = x[perm], y[perm], task_of[perm]
row_weights = F.one_hot(task_of, T).float()


def twin_factored(x, row_weights):
    h = x
    for i, name in enumerate(LAYERS):
        lr = twin.lowrank[f"{name}.weight"]
        h = tm.lowrank_mix_linear(h, shared[f"{name}.weight"], shared[f"{name}.bias"], lr.U_cat,
                                  lr.S_cat, lr.V_cat, lr.ranks, row_weights)
        h = h + row_weights @ twin.dense[f"{name}.bias"]  # biases are merged too, per row
        h = F.relu(h) if i == 0 else h
    return h


def twin_materialized(x, task_of):
    out = torch.empty(len(x), C)
    for t in range(T):  # one merged model per task present in the batch (lowrank_merge_ inside)
        rows = task_of == t
        out[rows] = forward(twin.merged_state_dict(F.one_hot(torch.tensor(t), T).float()), x[rows])
    return out


results = {
    "expert on its own task": [accuracy(forward(e, xt), yt) for e, (xt, yt) in zip(experts, test)],
    "base model": [accuracy(forward(base, xt), yt) for xt, yt in test],
    f"task arithmetic (λ={lam})": [accuracy(forward(shared, xt), yt) for xt, yt in test],
}
factored = twin_factored(x, row_weights)
materialized = twin_materialized(x, task_of)
results[f"Twin-Merging rank {rank}, factored"] = [accuracy(factored[task_of == t], y[task_of == t]) for t in range(T)]
results[f"Twin-Merging rank {rank}, materialized"] = [accuracy(materialized[task_of == t], y[task_of == t]) for t in range(T)]

print(f"\n{'method':<38}" + "".join(f"task {t:<3}" for t in range(T)) + "  mean   normalized")
expert_acc = results["expert on its own task"]
for method, accs in results.items():
    normalized = 100 * sum(a / e for a, e in zip(accs, expert_acc)) / T
    print(f"{method:<38}" + "".join(f"{a:<8.3f}" for a in accs) + f"  {sum(accs) / T:.3f}  {normalized:6.2f}")
print(f"\nfactored vs materialized logits: max |diff| = {(factored - materialized).abs().max():.2e}")
