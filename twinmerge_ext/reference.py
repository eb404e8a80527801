"""Plain-PyTorch definitions of every twinmerge op, computed in float64.

These are the specification the compiled ops are tested against, and the documentation of what
they compute. They favour clarity over speed: do not use them on hot paths.
"""

from typing import Optional, Sequence

import torch
from torch import Tensor


def expert_of_col(ranks: Sequence[int], device=None) -> Tensor:
    """Index [K] of the expert that owns each concatenated column: expert t owns ranks[t] columns."""
    counts = torch.as_tensor(list(ranks), dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(counts)), counts).to(device)


def mixing_scale(weights: Tensor, S: Tensor, ranks: Sequence[int]) -> Tensor:
    """s(w) = w[..., expert(k)] * S[..., k], broadcast over leading dims, in float64."""
    index = expert_of_col(ranks, weights.device)
    return weights.double().index_select(-1, index) * S.double()


def reconstruct_delta(U: Tensor, S: Tensor, V: Tensor) -> Tensor:
    """U diag(S) Vᵀ. U [..., m, r], S [..., r], V [..., n, r] -> [..., m, n]."""
    return ((U.double() * S.double().unsqueeze(-2)) @ V.double().mT).to(U.dtype)


def lowrank_merge(base: Tensor, U_cat: Tensor, S_cat: Tensor, V_cat: Tensor,
                  ranks: Sequence[int], weights: Tensor) -> Tensor:
    """base + U_cat diag(weights[expert(k)] ⊙ S_cat) V_catᵀ, batched over leading dims."""
    s = mixing_scale(weights, S_cat, ranks)
    delta = (U_cat.double() * s.unsqueeze(-2)) @ V_cat.double().mT
    return (base.double() + delta).to(base.dtype)


def dense_merge(base: Tensor, deltas: Tensor, weights: Tensor) -> Tensor:
    """base + Σt weights[t] · deltas[t]. base [...], deltas [T, ...], weights [T]."""
    w = weights.double().reshape((-1,) + (1,) * base.dim())
    return (base.double() + (w * deltas.double()).sum(0)).to(base.dtype)


def lowrank_mix_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], U_cat: Tensor,
                       S_cat: Tensor, V_cat: Tensor, ranks: Sequence[int],
                       row_weights: Tensor) -> Tensor:
    """x Wᵀ + b + ((x V_cat) ⊙ s(row_weights[b])) U_catᵀ, batch entry b of x with its own weights.

    x [B, ..., n], weight [m, n], bias [m] or None, U_cat [m, K], S_cat [K], V_cat [n, K],
    row_weights [B, T] -> [B, ..., m].
    """
    xd = x.double()
    y = xd @ weight.double().T
    if bias is not None:
        y = y + bias.double()
    s = mixing_scale(row_weights, S_cat, ranks)  # [B, K]
    s = s.reshape((s.shape[0],) + (1,) * (x.dim() - 2) + (s.shape[1],))
    y = y + ((xd @ V_cat.double()) * s) @ U_cat.double().T
    return y.to(x.dtype)


def truncated_svd(A: Tensor, rank: int):
    """The optimal rank-r factors from the full SVD: (U [..., m, r], S [..., r], V [..., n, r])."""
    U, S, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    r = max(1, min(rank, min(A.shape[-2:])))
    return U[..., :r].to(A.dtype), S[..., :r].to(A.dtype), Vh[..., :r, :].mT.to(A.dtype)

