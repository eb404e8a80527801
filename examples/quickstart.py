"""Twin-Merging on the twinmerge ops, end to end on a small model, in under a minute on a CPU.

Four experts are fine-tuned from one base MLP on four different classification tasks. They are
merged (1) statically by task arithmetic and (2) by Twin-Merging: a shared expert plus each
expert's exclusive knowledge compressed by truncated SVD, mixed per input. A mixed batch with
inputs of every task is served two exact ways: factored (each row mixes in activation space with
lowrank_mix_linear) and materialized (lowrank_merge_ into a preallocated weight buffer per task).

The mixing weights here are one-hot on each input's true task: the router that predicts them
(twinmerge_ext issue #4) is not part of this example, so the Twin rows show what exact per-input
merging recovers, not router accuracy.
"""

import time

import torch
import torch.nn.functional as F

import twinmerge_ext as tm

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

# Stage 1: shared expert by task arithmetic; exclusive knowledge v_t = θ_t − θ_s, compressed.
lam, rank = 0.3, 16
shared = {k: base[k] + lam * sum(e[k] - base[k] for e in experts) for k in base}
twin = {}
for name in LAYERS:
    w = f"{name}.weight"
    deltas = torch.stack([e[w] - shared[w] for e in experts])  # [T, m, n]
    U, S, V = tm.truncated_svd(deltas, rank)                     # batched over the T experts
    err = (tm.reconstruct_delta(U, S, V) - deltas).norm() / deltas.norm()
    print(f"{w}: {tuple(deltas.shape[1:])} -> rank {S.shape[-1]} per expert, "
          f"relative reconstruction error {err:.3f}")
    twin[name] = dict(U=torch.cat(list(U), 1), S=torch.cat(list(S)), V=torch.cat(list(V), 1),
                      ranks=[S.shape[-1]] * T,
                      bias_deltas=torch.stack([e[f"{name}.bias"] - shared[f"{name}.bias"] for e in experts]))

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
        tw = twin[name]
        h = tm.lowrank_mix_linear(h, shared[f"{name}.weight"], shared[f"{name}.bias"], tw["U"], tw["S"],
                                  tw["V"], tw["ranks"], row_weights)
        h = h + row_weights @ tw["bias_deltas"]  # biases are merged too, per row
        h = F.relu(h) if i == 0 else h
    return h


def twin_materialized(x, task_of):
    buffers = {k: torch.empty_like(v) for k, v in shared.items()}  # allocated once
    out = torch.empty(len(x), C)
    for t in range(T):
        w = F.one_hot(torch.tensor(t), T).float()
        for name in LAYERS:
            tw = twin[name]
            tm.lowrank_merge_(buffers[f"{name}.weight"], shared[f"{name}.weight"], tw["U"], tw["S"],
                              tw["V"], tw["ranks"], w)
            tm.dense_merge_(buffers[f"{name}.bias"], shared[f"{name}.bias"], tw["bias_deltas"], w)
        rows = task_of == t
        out[rows] = forward(buffers, x[rows])
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
