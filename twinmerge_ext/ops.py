"""Typed Python entry points of the twinmerge operators, with their fake and autograd kernels.

Shapes use T for the number of experts, K = sum(ranks) for the concatenated rank, and
`expert(k)` for the expert that owns column k (expert t owns ranks[t] consecutive columns).
Storage dtypes: float64, float32, float16, bfloat16; sums accumulate in float32 (float64 for
float64). Mixing weights are device tensors, so no merging or mixing op synchronizes with the
host (truncated_svd, an offline step, does once on CUDA).
"""

import math
from numbers import Integral
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from twinmerge_ext import _library

_ops = _library.load()


def _ranks(ranks: Sequence[int], op: str) -> List[int]:
    if isinstance(ranks, Tensor) or not isinstance(ranks, (list, tuple)):
        raise TypeError(f"{op}: ranks must be a list or tuple of ints, got {type(ranks).__name__}")
    bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, Integral)]
    if bad:
        raise TypeError(f"{op}: ranks must hold ints, got {ranks!r}")
    return [int(r) for r in ranks]


def _int(value, name: str, op: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{op}: {name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def reconstruct_delta(U: Tensor, S: Tensor, V: Tensor) -> Tensor:
    """Low-rank delta reconstruction.

    Semantics: out = U diag(S) Vᵀ, batched over leading dims.

    Shape:
        U: [..., m, r]
        S: [..., r]
        V: [..., n, r]
        returns: [..., m, n], dtype of U

    Differentiable in U, S and V.
    """
    return _ops.reconstruct_delta(U, S, V)


def lowrank_merge_(out: Tensor, base: Tensor, U_cat: Tensor, S_cat: Tensor, V_cat: Tensor,
                   ranks: Sequence[int], weights: Tensor) -> Tensor:
    """Materialized merge of T low-rank experts into a preallocated buffer.

    Semantics: out = base + U_cat diag(weights[expert(k)] ⊙ S_cat[k]) V_catᵀ

    Shape:
        out, base: [..., m, n] (leading dims: a stack of L same-shaped matrices)
        U_cat: [..., m, K]
        S_cat: [..., K]
        V_cat: [..., n, K]
        ranks: T ints summing to K
        weights: [T]

    `out` must be contiguous (never silently copied); it may be `base` itself (an in-place
    update), but may not partially overlap it or overlap any factor. Returns `out`.

    Precision: products accumulate in fp32. On CUDA with fp16/bf16 storage, the scaled factor
    U_cat·diag(s) is rounded once to the storage dtype before the GEMM (the CPU keeps it in fp32).
    """
    _ops.lowrank_merge_(out, base, U_cat, S_cat, V_cat, _ranks(ranks, "lowrank_merge_"), weights)
    return out


def dense_merge_(out: Tensor, base: Tensor, deltas: Tensor, weights: Tensor) -> Tensor:
    """Weighted merge of T dense deltas (1-D parameters, uncompressed matrices) into a buffer.

    Semantics: out = base + Σt weights[t] · deltas[t]

    Shape:
        out, base: [...]
        deltas: [T, ...]
        weights: [T]

    Same in-place rules as lowrank_merge_. Returns `out`.
    """
    _ops.dense_merge_(out, base, deltas, weights)
    return out


def lowrank_mix_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], U_cat: Tensor,
                       S_cat: Tensor, V_cat: Tensor, ranks: Sequence[int],
                       row_weights: Tensor) -> Tensor:
    """Factored Twin-Merging of a Linear layer: each batch entry uses its own merged weights.

    Semantics: y[b] = x[b] Wᵀ + bias + ((x[b] V_cat) ⊙ (row_weights[b, expert(k)] ⊙ S_cat[k])) U_catᵀ

    Shape:
        x: [B, ..., n]
        weight: [m, n]
        bias: [m] or None
        U_cat: [m, K]
        S_cat: [K]
        V_cat: [n, K]
        ranks: T ints summing to K
        row_weights: [B, T]
        returns: [B, ..., m]

    Exact per batch entry; no merged weight is materialized. Differentiable in every tensor
    argument (x and row_weights, so a router can be trained through it); the backward sums in
    fp32 and never synchronizes. On CUDA with fp16/bf16 storage, (x V_cat) ⊙ s is rounded once to
    the storage dtype before its GEMM, and y once after each of its two GEMMs.
    """
    return _ops.lowrank_mix_linear(x, weight, bias, U_cat, S_cat, V_cat,
                                   _ranks(ranks, "lowrank_mix_linear"), row_weights)


def truncated_svd(A: Tensor, rank: int, oversample: int = 10, n_iter: int = 2,
                  seed: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """Randomized truncated SVD.

    Semantics: A ≈ U diag(S) Vᵀ with r = clamp(rank, 1, min(m, n)) singular triplets, S descending.

    Shape:
        A: [..., m, n]
        returns U [..., m, r], S [..., r], V [..., n, r], dtype of A

    Computes in float32 (float64 for float64 input). A sketch of rank + oversample columns is
    refined by n_iter power iterations: raise either to trade speed for accuracy. When the sketch
    would cover min(m, n), the exact SVD is used. Deterministic for a given seed (CPU and CUDA
    draw different sketches). On CUDA, a matrix with NaN or Inf entries gets NaN singular values
    rather than an error, so one bad matrix does not fail a batch. The CUDA op takes the small
    projected SVD on the host (it waits for the device once per call) and seeds its own
    generator per call, so it cannot be captured in a CUDA graph.
    """
    op = "truncated_svd"
    return _ops.truncated_svd(A, _int(rank, "rank", op), _int(oversample, "oversample", op),
                              _int(n_iter, "n_iter", op), _int(seed, "seed", op))


# --- fake (meta) kernels: shapes only, for torch.compile and FakeTensor tracing -----------------

@torch.library.register_fake("twinmerge::reconstruct_delta")
def _(U, S, V):
    torch._check(U.dim() >= 2 and V.dim() == U.dim(), lambda: "reconstruct_delta: U and V must be [..., m, r], [..., n, r]")
    return U.new_empty(U.shape[:-1] + V.shape[-2:-1])


@torch.library.register_fake("twinmerge::lowrank_merge_")
def _(out, base, U_cat, S_cat, V_cat, ranks, weights):
    return None


@torch.library.register_fake("twinmerge::dense_merge_")
def _(out, base, deltas, weights):
    return None


@torch.library.register_fake("twinmerge::lowrank_mix_linear")
def _(x, weight, bias, U_cat, S_cat, V_cat, ranks, row_weights):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "lowrank_mix_linear: x and weight disagree on n")
    return x.new_empty(x.shape[:-1] + weight.shape[:1])


@torch.library.register_fake("twinmerge::truncated_svd")
def _(A, rank, oversample=10, n_iter=2, seed=0):
    torch._check(rank >= 0, lambda: f"truncated_svd: rank must be >= 0, got {rank}")
    m, n = A.shape[-2], A.shape[-1]
    k = min(m, n)
    r = 0 if k == 0 else max(1, min(rank, k))
    lead = A.shape[:-2]
    return A.new_empty(lead + (m, r)), A.new_empty(lead + (r,)), A.new_empty(lead + (n, r))


# --- autograd -----------------------------------------------------------------------------------

def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_column(w: Tensor, ranks: List[int]) -> Tensor:
    """w[..., expert(k)] for the K concatenated columns, built on w's device (no index tensor,
    so no host-to-device copy and no sync)."""
    return torch.cat([w[..., t:t + 1].expand(*w.shape[:-1], r) for t, r in enumerate(ranks)], -1)


def _per_expert(p: Tensor, ranks: List[int]) -> Tensor:
    """Σ over each expert's columns: [..., K] -> [..., T]."""
    return torch.stack([c.sum(-1) for c in p.split(ranks, -1)], -1)


def _reconstruct_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _reconstruct_backward(ctx, grad):
    U, S, V = ctx.saved_tensors
    f = _opmath(grad.dtype)
    g, Uf, Vf, Sf = grad.to(f), U.to(f), V.to(f), S.to(f).unsqueeze(-2)
    need = ctx.needs_input_grad
    dU = ((g @ Vf) * Sf).to(U.dtype) if need[0] else None
    dS = ((Uf.mT @ g) * Vf.mT).sum(-1).to(S.dtype) if need[1] else None
    dV = ((g.mT @ Uf) * Sf).to(V.dtype) if need[2] else None
    return dU, dS, dV


torch.library.register_autograd("twinmerge::reconstruct_delta", _reconstruct_backward,
                                setup_context=_reconstruct_setup)


def _mix_setup(ctx, inputs, output):
    x, weight, bias, U, S, V, ranks, row_weights = inputs
    ctx.ranks = ranks
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, U, S, V, row_weights)


def _mix_backward(ctx, grad):
    """Gradients of y = x Wᵀ + b + ((x V) ⊙ c) Uᵀ with c[b, k] = row_weights[b, expert(k)] S[k],
    accumulated in fp32 (fp64 for fp64) whatever the storage dtype."""
    x, weight, U, S, V, row_weights = ctx.saved_tensors
    need, ranks = ctx.needs_input_grad, ctx.ranks
    n, m, K, B = x.shape[-1], weight.shape[0], U.shape[1], x.shape[0]
    rows = math.prod(x.shape[:-1])
    per_b = rows // B if B else 0
    # dx = g W + ((g U) ⊙ c) Vᵀ is this op itself, with (W, U, V) -> (Wᵀ, V, U).
    dx = (_ops.lowrank_mix_linear(grad, weight.T.contiguous(), None, V, S, U, ranks, row_weights)
          if need[0] else None)
    f = _opmath(x.dtype)
    g2, x2 = grad.reshape(rows, m).to(f), x.reshape(rows, n).to(f)
    dW = (g2.T @ x2).to(weight.dtype) if need[1] else None
    db = g2.sum(0).to(grad.dtype) if ctx.has_bias and need[2] else None
    dU = dS = dV = drw = None
    if any(need[3:6]) or need[7]:
        w_cols = _per_column(row_weights.to(f), ranks)                   # [B, K]
        coef = (w_cols * S.to(f)).unsqueeze(1)                           # [B, 1, K]
        h = (x2 @ V.to(f)).reshape(B, per_b, K)
        gU = (g2 @ U.to(f)).reshape(B, per_b, K)
        if need[3]:
            dU = (g2.T @ (h * coef).reshape(rows, K)).to(U.dtype)
        if need[5]:
            dV = (x2.T @ (gU * coef).reshape(rows, K)).to(V.dtype)
        P = (h * gU).sum(1)                                              # [B, K] = dy/dc
        if need[4]:
            dS = (P * w_cols).sum(0).to(S.dtype)
        if need[7]:
            drw = _per_expert(P * S.to(f), ranks).to(row_weights.dtype)
    return dx, dW, db, dU, dS, dV, None, drw


torch.library.register_autograd("twinmerge::lowrank_mix_linear", _mix_backward,
                                setup_context=_mix_setup)
