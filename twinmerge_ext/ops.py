"""Typed Python entry points of the twinmerge operators, with their fake and autograd kernels.

Shapes use T for the number of experts, K = sum(ranks) for the concatenated rank, and
`expert(k)` for the expert that owns column k (expert t owns ranks[t] consecutive columns).
Storage dtypes: float64, float32, float16, bfloat16; sums accumulate in float32 (float64 for
float64). Mixing weights are device tensors, so no merging or mixing op synchronizes with the
host (truncated_svd, an offline step, does once on CUDA).

Non-finite values: the merging and mixing ops never wait for the device, so they do not look for
NaN/Inf (that would need a host sync); as in torch.mm, a NaN or Inf input reaches exactly the
outputs that depend on it (a weight of an expert with rank 0 reaches none). truncated_svd refuses
non-finite matrices.

Every tensor argument must be a strided (dense) tensor on a cpu or cuda device: a sparse, mkldnn,
nested, quantized or meta tensor raises a RuntimeError that names the argument, from these wrappers
and from torch.ops.twinmerge alike; so does a tensor on another device type, from the wrappers
(torch.ops answers it with the dispatcher's error for that backend). The fake kernels serve shape
tracing with FakeTensors (torch.compile) and apply the compiled ops' shape, dtype and device rules.
"""

import math
from numbers import Integral
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from twinmerge_ext import _library

_ops = _library.load()

_FLOATING = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_MAX_EXPERTS = 256  # kMaxExperts of csrc/checks.h


def _dispatch(op: str, call, args: tuple, **tensors: Optional[Tensor]):
    """call(*args) through the dispatcher. A call it cannot route (an argument on another device
    type, or not a tensor) fails there, before any kernel runs, with an error that names a
    backend: it is replaced by one that names the argument. Checked only then, so a served
    model's hundreds of op calls per forward pay nothing for it."""
    try:
        return call(*args)
    except (RuntimeError, TypeError):  # the dispatcher's "could not run" is a RuntimeError
        _tensors(op, **tensors)
        raise


def _tensors(op: str, **tensors: Optional[Tensor]) -> None:
    """Every tensor argument is a tensor on a cpu or cuda device (None: an absent optional one).
    Layouts (sparse, mkldnn, nested, quantized) are named by the compiled ops themselves
    (csrc/unsupported.cpp); meta tensors by the fake kernels."""
    for name, t in tensors.items():
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if t.device.type not in ("cpu", "cuda", "meta"):
            raise RuntimeError(f"{op}: {name} must be on a cpu or cuda device, got {t.device}")


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
    return _dispatch("reconstruct_delta", _ops.reconstruct_delta, (U, S, V), U=U, S=S, V=V)


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

    Autograd: not differentiable (use lowrank_mix_linear or reconstruct_delta for gradients).
    With grad mode on, an argument that requires grad raises a RuntimeError naming it (a leaf
    `out` that requires grad as torch refuses in-place writes into one); under torch.no_grad()
    the merge may write into such a leaf, like an optimizer step. A dual tensor of forward-mode AD
    raises in any grad mode (its tangent would be lost). Like torch's in-place ops, it bumps out's
    version counter, so backward() notices when it overwrote a saved tensor.
    """
    _dispatch("lowrank_merge_", _ops.lowrank_merge_,
              (out, base, U_cat, S_cat, V_cat, _ranks(ranks, "lowrank_merge_"), weights),
              out=out, base=base, U_cat=U_cat, S_cat=S_cat, V_cat=V_cat, weights=weights)
    return out


def dense_merge_(out: Tensor, base: Tensor, deltas: Tensor, weights: Tensor) -> Tensor:
    """Weighted merge of T dense deltas (1-D parameters, uncompressed matrices) into a buffer.

    Semantics: out = base + Σt weights[t] · deltas[t]

    Shape:
        out, base: [...]
        deltas: [T, ...]
        weights: [T]

    Same in-place and autograd rules as lowrank_merge_. Returns `out`.
    """
    _dispatch("dense_merge_", _ops.dense_merge_, (out, base, deltas, weights), out=out,
              base=base, deltas=deltas, weights=weights)
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
    return _dispatch("lowrank_mix_linear", _ops.lowrank_mix_linear,
                     (x, weight, bias, U_cat, S_cat, V_cat, _ranks(ranks, "lowrank_mix_linear"),
                      row_weights),
                     x=x, weight=weight, bias=bias, U_cat=U_cat, S_cat=S_cat, V_cat=V_cat,
                     row_weights=row_weights)


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
    draw different sketches). The CUDA op takes the small projected SVD on the host (it waits for
    the device once per call) and seeds its own generator per call, so it cannot be captured in a
    CUDA graph.

    Errors: a matrix with NaN or Inf entries raises a RuntimeError naming its index in the batch,
    on CPU and CUDA alike (its SVD is undefined; on CUDA the check's flags come back in the op's
    one wait for the device). Not differentiable: with grad mode on, an A that requires grad
    raises, and so does a forward-mode dual A in any mode (use torch.linalg.svd or
    torch.svd_lowrank for gradients, or pass A.detach()).
    """
    op = "truncated_svd"
    return _dispatch(op, _ops.truncated_svd, (A, _int(rank, "rank", op),
                                              _int(oversample, "oversample", op),
                                              _int(n_iter, "n_iter", op), _int(seed, "seed", op)),
                     A=A)


# --- fake kernels: shapes only, for torch.compile and FakeTensor tracing -------------------------
# They apply the shape, dtype and device rules of csrc/checks.cpp, with its messages, so that a
# traced program fails where the compiled one would. register_fake also makes each of them the
# op's Meta kernel: a real meta tensor holds no values, and a merge into one would silently do
# nothing, so they refuse real (non-fake) meta tensors.

def _fake_args(op: str, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device.type == "meta" and not is_fake(t):
            raise RuntimeError(f"{op}: {name} must be on a cpu or cuda device, got meta (a meta "
                               f"tensor holds no values; trace shapes with FakeTensors, as "
                               f"torch.compile does)")


def _check(op: str, cond, message) -> None:
    torch._check(cond, lambda: f"{op}: {message()}")


# Dtypes as the C++ checks print them (c10::ScalarType), so both say the same.
_DTYPE_NAMES = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
                torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int",
                torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool"}


def _dtype(t: Tensor) -> str:
    return _DTYPE_NAMES.get(t.dtype, str(t.dtype))


def _floating(op: str, name: str, t: Tensor) -> None:
    _check(op, t.dtype in _FLOATING,
           lambda: f"{name} must be float64, float32, float16 or bfloat16, got {_dtype(t)}")


def _same_device(op: str, ref_name: str, ref: Tensor, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        _check(op, t.device == ref.device,
               lambda: f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def _same_dtype(op: str, ref_name: str, ref: Tensor, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        _check(op, t.dtype == ref.dtype,
               lambda: f"{name} must have the dtype of {ref_name} ({_dtype(ref)}), got {_dtype(t)}")


def _leading(op: str, name: str, t: Tensor, lead, trailing: int) -> None:
    _check(op, t.dim() == len(lead) + trailing,
           lambda: f"{name} must be a {len(lead) + trailing}-D tensor (leading dims {list(lead)}), "
                   f"got shape {list(t.shape)}")
    _check(op, tuple(t.shape[:len(lead)]) == tuple(lead),
           lambda: f"{name} must have leading dims {list(lead)}, got shape {list(t.shape)}")


def _expert_ranks(op: str, ranks: Sequence[int], K, T) -> None:
    _check(op, len(ranks) > 0, lambda: "ranks must name at least one expert, got []")
    _check(op, len(ranks) <= _MAX_EXPERTS,
           lambda: f"ranks may name at most {_MAX_EXPERTS} experts, got {len(ranks)}")
    _check(op, len(ranks) == T, lambda: f"ranks must have one entry per mixing weight ({T}), got "
                                        f"{len(ranks)} entries: {list(ranks)}")
    for t, r in enumerate(ranks):
        _check(op, r >= 0, lambda: f"ranks must be non-negative, got ranks[{t}] = {r}")
    _check(op, sum(ranks) == K,
           lambda: f"ranks must sum to the factor width K = {K}, got sum({list(ranks)}) = {sum(ranks)}")


def _out_contiguous(op: str, out: Tensor) -> None:
    _check(op, out.is_contiguous(), lambda: f"out must be contiguous (it is written in place, never "
                                            f"through a copy), got strides {list(out.stride())}")


@torch.library.register_fake("twinmerge::reconstruct_delta")
def _(U, S, V):
    op = "reconstruct_delta"
    _fake_args(op, U=U, S=S, V=V)
    _check(op, U.dim() >= 2, lambda: f"U must have shape [..., m, r], got shape {list(U.shape)}")
    _floating(op, "U", U)
    _same_dtype(op, "U", U, V=V)
    _floating(op, "S", S)
    _same_device(op, "U", U, S=S, V=V)
    lead = U.shape[:-2]
    _leading(op, "V", V, lead, 2)
    _leading(op, "S", S, lead, 1)
    r = U.shape[-1]
    _check(op, V.shape[-1] == r, lambda: f"V must have shape [..., n, r={r}], got {list(V.shape)}")
    _check(op, S.shape[-1] == r, lambda: f"S must have shape [..., r={r}], got {list(S.shape)}")
    return U.new_empty(U.shape[:-1] + V.shape[-2:-1])


@torch.library.register_fake("twinmerge::lowrank_merge_")
def _(out, base, U_cat, S_cat, V_cat, ranks, weights):
    op = "lowrank_merge_"
    _fake_args(op, out=out, base=base, U_cat=U_cat, S_cat=S_cat, V_cat=V_cat, weights=weights)
    _check(op, out.dim() >= 2, lambda: f"out must have shape [..., m, n], got shape {list(out.shape)}")
    _check(op, base.shape == out.shape,
           lambda: f"base must have the shape of out ({list(out.shape)}), got {list(base.shape)}")
    _floating(op, "out", out)
    _same_dtype(op, "out", out, base=base, U_cat=U_cat, V_cat=V_cat)
    _floating(op, "S_cat", S_cat)
    _floating(op, "weights", weights)
    _same_device(op, "out", out, base=base, U_cat=U_cat, S_cat=S_cat, V_cat=V_cat, weights=weights)
    lead, m, n = out.shape[:-2], out.shape[-2], out.shape[-1]
    _leading(op, "U_cat", U_cat, lead, 2)
    _leading(op, "V_cat", V_cat, lead, 2)
    _leading(op, "S_cat", S_cat, lead, 1)
    K = U_cat.shape[-1]
    _check(op, U_cat.shape[-2] == m,
           lambda: f"U_cat must have shape [..., m={m}, K], got {list(U_cat.shape)}")
    _check(op, V_cat.shape[-2] == n and V_cat.shape[-1] == K,
           lambda: f"V_cat must have shape [..., n={n}, K={K}], got {list(V_cat.shape)}")
    _check(op, S_cat.shape[-1] == K, lambda: f"S_cat must have shape [..., K={K}], got {list(S_cat.shape)}")
    _check(op, weights.dim() == 1,
           lambda: f"weights must be a 1-D tensor [T], got shape {list(weights.shape)}")
    _out_contiguous(op, out)
    _expert_ranks(op, ranks, K, weights.shape[0])
    return None


@torch.library.register_fake("twinmerge::dense_merge_")
def _(out, base, deltas, weights):
    op = "dense_merge_"
    _fake_args(op, out=out, base=base, deltas=deltas, weights=weights)
    _check(op, base.shape == out.shape,
           lambda: f"base must have the shape of out ({list(out.shape)}), got {list(base.shape)}")
    _floating(op, "out", out)
    _same_dtype(op, "out", out, base=base, deltas=deltas)
    _floating(op, "weights", weights)
    _same_device(op, "out", out, base=base, deltas=deltas, weights=weights)
    _check(op, weights.dim() == 1,
           lambda: f"weights must be a 1-D tensor [T], got shape {list(weights.shape)}")
    T = weights.shape[0]
    _check(op, T >= 1, lambda: f"weights must hold at least one expert, got shape {list(weights.shape)}")
    _check(op, tuple(deltas.shape) == (T, *out.shape),
           lambda: f"deltas must have shape [T={T}, *out.shape={list(out.shape)}], got "
                   f"{list(deltas.shape)}")
    _out_contiguous(op, out)
    return None


@torch.library.register_fake("twinmerge::lowrank_mix_linear")
def _(x, weight, bias, U_cat, S_cat, V_cat, ranks, row_weights):
    op = "lowrank_mix_linear"
    _fake_args(op, x=x, weight=weight, bias=bias, U_cat=U_cat, S_cat=S_cat, V_cat=V_cat,
               row_weights=row_weights)
    _check(op, x.dim() >= 2, lambda: f"x must have shape [B, ..., n], got shape {list(x.shape)}")
    _floating(op, "x", x)
    _same_dtype(op, "x", x, weight=weight, U_cat=U_cat, V_cat=V_cat)
    _floating(op, "S_cat", S_cat)
    _floating(op, "row_weights", row_weights)
    _same_device(op, "x", x, weight=weight, U_cat=U_cat, S_cat=S_cat, V_cat=V_cat, row_weights=row_weights)
    for name, t, d in (("weight", weight, 2), ("U_cat", U_cat, 2), ("S_cat", S_cat, 1),
                       ("V_cat", V_cat, 2), ("row_weights", row_weights, 2)):
        _check(op, t.dim() == d, lambda: f"{name} must be a {d}-D tensor, got shape {list(t.shape)}")
    m, n, K, B = weight.shape[0], weight.shape[1], U_cat.shape[1], x.shape[0]
    _check(op, x.shape[-1] == n, lambda: f"x must have n = weight.size(1) = {n} features in its "
                                         f"last dim, got shape {list(x.shape)}")
    if bias is not None:
        _same_dtype(op, "x", x, bias=bias)
        _same_device(op, "x", x, bias=bias)
        _check(op, bias.dim() == 1 and bias.shape[0] == m,
               lambda: f"bias must have shape [m={m}], got {list(bias.shape)}")
    _check(op, U_cat.shape[0] == m, lambda: f"U_cat must have shape [m={m}, K], got {list(U_cat.shape)}")
    _check(op, V_cat.shape[0] == n and V_cat.shape[1] == K,
           lambda: f"V_cat must have shape [n={n}, K={K}], got {list(V_cat.shape)}")
    _check(op, S_cat.shape[0] == K, lambda: f"S_cat must have shape [K={K}], got {list(S_cat.shape)}")
    _check(op, row_weights.shape[0] == B,
           lambda: f"row_weights must have one row per batch entry of x (B={B}), got shape "
                   f"{list(row_weights.shape)}")
    _expert_ranks(op, ranks, K, row_weights.shape[1])
    return x.new_empty(x.shape[:-1] + weight.shape[:1])


@torch.library.register_fake("twinmerge::truncated_svd")
def _(A, rank, oversample=10, n_iter=2, seed=0):
    op = "truncated_svd"
    _fake_args(op, A=A)
    _check(op, A.dim() >= 2, lambda: f"A must have shape [..., m, n], got shape {list(A.shape)}")
    _floating(op, "A", A)
    _check(op, rank >= 0, lambda: f"rank must be >= 0 (it is clamped to [1, min(m, n)]), got {rank}")
    _check(op, oversample >= 0, lambda: f"oversample must be >= 0, got {oversample}")
    _check(op, n_iter >= 0, lambda: f"n_iter must be >= 0, got {n_iter}")
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
