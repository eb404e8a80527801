"""Seeded random cases of every twinmerge op against twinmerge_ext.reference.

Each case draws its shapes, dtypes, ranks, memory layouts and values from its own seed, which is in
the test id and in every failure message: `pytest tests/test_fuzz.py -k "lowrank_merge and
seed17"` reruns one case. The draws cover empty dims, 1 x n and n x 1 matrices, leading batch dims,
T = 1..8 experts with zero, mixed and larger-than-min(m, n) ranks, transposed, sliced, offset and
expanded (stride-0) inputs, mixing weights in another floating dtype than the storage, in-place
and out-of-place merges, with and without bias. Besides the values, the cases check invariants: a
merge returns its `out`, keeps its memory and bumps its version once; no op modifies its inputs;
a merge with all-zero weights returns base exactly. truncated_svd's cases check the factors'
shapes, orthonormality, S descending, and the error against the optimal rank-r error; a subset
checks the gradients of the differentiable ops against autograd through the reference (float64).
"""

import math
import random

import pytest
import torch

import twinmerge_ext as tm
from twinmerge_ext import reference as ref

from conftest import DEVICES, RTOL, assert_close

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def seeds(count, start):
    """`count` seeds, disjoint across the ops (each op's cases start at its own `start`)."""
    return pytest.mark.parametrize("seed", range(start, start + count), ids=lambda s: f"seed{s}")


class Draw:
    """The random choices of one case, recorded so that a failure can say what the case was."""

    def __init__(self, seed, device):
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.device = device
        self.facts = [f"seed={seed}", f"device={device}"]

    def note(self, **facts):
        self.facts += [f"{k}={v}" for k, v in facts.items()]

    def __str__(self):
        return " ".join(self.facts)

    def choice(self, options, name=None):
        value = self.rng.choice(options)
        if name:
            self.note(**{name: value})
        return value

    def dim(self, high=24):
        """A matrix dimension: 0 and 1 often, else 2..high."""
        u = self.rng.random()
        return 0 if u < 0.08 else 1 if u < 0.22 else self.rng.randint(2, high)

    def lead(self, max_dims=2, high=3):
        return tuple(self.rng.randint(0 if self.rng.random() < 0.15 else 1, high)
                     for _ in range(self.rng.randint(0, max_dims)))

    def ranks(self, m, n, T):
        """T ranks: zeros, small ones, and now and then more than min(m, n)."""
        if self.rng.random() < 0.08:
            return [0] * T
        out = []
        for _ in range(T):
            u = self.rng.random()
            out.append(0 if u < 0.25 else min(m, n) + self.rng.randint(1, 3) if u < 0.33
                       else self.rng.randint(1, 6))
        return out

    def dtype_near(self, dtype):
        """Mixing weights: usually the storage dtype, else any floating dtype."""
        return dtype if self.rng.random() < 0.5 else self.rng.choice(DTYPES)

    def tensor(self, name, shape, dtype, scale=1.0, positive=False, layouts=None):
        """Random values of `shape` in `dtype` on the case's device, in one of `layouts`:
        contiguous, transposed (the last two dims' strides swapped), sliced (every other element
        of a larger buffer, at an offset) or expanded (stride 0 along a dim of size > 1)."""
        layouts = layouts or ["contiguous", "transposed", "sliced", "expanded"]
        layout = self.rng.choice(layouts)
        shape = tuple(shape)
        if layout == "transposed" and len(shape) < 2:
            layout = "contiguous"
        expand_dims = [d for d, s in enumerate(shape) if s > 1]
        if layout == "expanded" and not expand_dims:
            layout = "contiguous"
        draw_shape = list(shape)
        if layout == "expanded":
            d = self.rng.choice(expand_dims)
            draw_shape[d] = 1
        values = torch.randn(draw_shape, generator=self.gen, dtype=torch.float64) * scale
        if positive:
            values = values.abs() + 0.5 * scale
        t = values.to(dtype).to(self.device)
        if layout == "transposed":
            t = t.mT.contiguous().mT
        elif layout == "sliced" and t.dim() > 0:
            buf = torch.zeros(*shape[:-1], 2 * shape[-1] + 1, dtype=dtype, device=self.device)
            buf[..., 1::2] = t
            t = buf[..., 1::2]
        elif layout == "expanded":
            t = t.expand(shape)
        self.note(**{name: f"{layout}{list(shape)}:{_short(dtype)}"})
        return t


def _short(dtype):
    return str(dtype).removeprefix("torch.")


def close(actual, expected, dtype, case):
    try:
        assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
        assert_close(actual, expected, dtype)
    except AssertionError as e:
        raise AssertionError(f"{case}\n{e}") from None


def unmodified(inputs, snapshots, case):
    for name, t in inputs.items():
        assert torch.equal(t, snapshots[name]), f"{case}: {name} was modified"


# --- lowrank_merge_ -----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@seeds(130, 0)
def test_lowrank_merge(seed, device):
    d = Draw(seed, device)
    dtype = d.choice(DTYPES, "dtype")
    lead, m, n, T = d.lead(), d.dim(), d.dim(), d.rng.randint(1, 8)
    ranks = d.ranks(m, n, T)
    K = sum(ranks)
    d.note(lead=lead, m=m, n=n, ranks=ranks)
    base = d.tensor("base", (*lead, m, n), dtype)
    U = d.tensor("U_cat", (*lead, m, K), dtype, scale=1 / math.sqrt(max(K, 1)))
    S = d.tensor("S_cat", (*lead, K), d.dtype_near(dtype), positive=True)
    V = d.tensor("V_cat", (*lead, n, K), dtype)
    zero = d.rng.random() < 0.12
    w = d.tensor("weights", (T,), d.dtype_near(dtype), scale=0.0 if zero else 1.0)
    in_place = d.choice([False, True], "in_place")
    inputs = dict(U_cat=U, S_cat=S, V_cat=V, weights=w)
    if in_place:
        out = base.contiguous().clone()
        base = out
    else:
        inputs["base"] = base
        out = torch.full(base.shape, float("nan"), dtype=dtype, device=device)
    expected = ref.lowrank_merge(base, U, S, V, ranks, w)
    snapshots = {k: v.clone() for k, v in inputs.items()}
    ptr, version = out.data_ptr(), out._version

    assert tm.lowrank_merge_(out, base, U, S, V, ranks, w) is out, d
    assert out.data_ptr() == ptr and out._version == version + 1, d
    close(out, expected, dtype, d)
    unmodified(inputs, snapshots, d)
    if zero:
        assert torch.equal(out, expected), f"{d}: zero weights must return base exactly"


# --- dense_merge_ -------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@seeds(90, 1000)
def test_dense_merge(seed, device):
    d = Draw(seed, device)
    dtype = d.choice(DTYPES, "dtype")
    shape = tuple(d.rng.randint(0, 6) if d.rng.random() < 0.1 else d.rng.randint(1, 9)
                  for _ in range(d.rng.randint(0, 3)))
    T = d.rng.randint(1, 8)
    d.note(shape=shape, T=T)
    base = d.tensor("base", shape, dtype)
    deltas = d.tensor("deltas", (T, *shape), dtype)
    zero = d.rng.random() < 0.12
    w = d.tensor("weights", (T,), d.dtype_near(dtype), scale=0.0 if zero else 1.0)
    in_place = d.choice([False, True], "in_place")
    inputs = dict(deltas=deltas, weights=w)
    if in_place:
        out = base.contiguous().clone()
        base = out
    else:
        inputs["base"] = base
        out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    expected = ref.dense_merge(base, deltas, w)
    snapshots = {k: v.clone() for k, v in inputs.items()}
    ptr, version = out.data_ptr(), out._version

    assert tm.dense_merge_(out, base, deltas, w) is out, d
    assert out.data_ptr() == ptr and out._version == version + 1, d
    close(out, expected, dtype, d)
    unmodified(inputs, snapshots, d)
    if zero:
        assert torch.equal(out, expected), f"{d}: zero weights must return base exactly"


# --- lowrank_mix_linear -------------------------------------------------------------------------

def mix_case(d, dtype):
    B = 0 if d.rng.random() < 0.06 else d.rng.randint(1, 4)
    inner = d.lead(max_dims=2, high=4)
    m, n, T = d.dim(20), d.dim(20), d.rng.randint(1, 8)
    ranks = d.ranks(m, n, T)
    K = sum(ranks)
    d.note(B=B, inner=inner, m=m, n=n, ranks=ranks)
    x = d.tensor("x", (B, *inner, n), dtype)
    W = d.tensor("weight", (m, n), dtype, scale=1 / math.sqrt(max(n, 1)))
    b = d.tensor("bias", (m,), dtype) if d.rng.random() < 0.6 else None
    U = d.tensor("U_cat", (m, K), dtype)
    S = d.tensor("S_cat", (K,), d.dtype_near(dtype), positive=True)
    V = d.tensor("V_cat", (n, K), dtype, scale=1 / math.sqrt(max(n, 1)))
    rw = d.tensor("row_weights", (B, T), d.dtype_near(dtype))
    return dict(x=x, weight=W, bias=b, U_cat=U, S_cat=S, V_cat=V, ranks=ranks, row_weights=rw)


@pytest.mark.parametrize("device", DEVICES)
@seeds(110, 2000)
def test_lowrank_mix_linear(seed, device):
    d = Draw(seed, device)
    dtype = d.choice(DTYPES, "dtype")
    args = mix_case(d, dtype)
    inputs = {k: v for k, v in args.items() if isinstance(v, torch.Tensor)}
    snapshots = {k: v.clone() for k, v in inputs.items()}
    expected = ref.lowrank_mix_linear(**args)
    y = tm.lowrank_mix_linear(**args)
    x, W = args["x"], args["weight"]
    assert y.shape == (*x.shape[:-1], W.shape[0]), f"{d}: shape {tuple(y.shape)}"
    close(y, expected, dtype, d)
    unmodified(inputs, snapshots, d)


# --- reconstruct_delta --------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@seeds(50, 3000)
def test_reconstruct_delta(seed, device):
    d = Draw(seed, device)
    dtype = d.choice(DTYPES, "dtype")
    lead, m, n = d.lead(), d.dim(), d.dim()
    r = 0 if d.rng.random() < 0.1 else d.rng.randint(1, 10)
    d.note(lead=lead, m=m, n=n, r=r)
    U = d.tensor("U", (*lead, m, r), dtype)
    S = d.tensor("S", (*lead, r), d.dtype_near(dtype), positive=True)
    V = d.tensor("V", (*lead, n, r), dtype)
    snapshots = dict(U=U.clone(), S=S.clone(), V=V.clone())
    D = tm.reconstruct_delta(U, S, V)
    assert D.shape == (*lead, m, n), f"{d}: shape {tuple(D.shape)}"
    close(D, ref.reconstruct_delta(U, S, V), dtype, d)
    unmodified(dict(U=U, S=S, V=V), snapshots, d)


# --- truncated_svd ------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@seeds(70, 4000)
def test_truncated_svd(seed, device):
    d = Draw(seed, device)
    dtype = d.choice(DTYPES, "dtype")
    lead = d.lead(max_dims=2, high=3)
    m, n = d.dim(64), d.dim(64)
    k = min(m, n)
    rank = d.rng.randint(0, 8) if d.rng.random() < 0.7 else d.rng.randint(0, k + 3)
    oversample, n_iter = d.rng.choice([0, 1, 2, 4, 10]), d.rng.randint(0, 3)
    sketch_seed = d.rng.randint(0, 99)
    exponent = d.rng.uniform(0.3, 1.5)
    d.note(lead=lead, m=m, n=n, rank=rank, oversample=oversample, n_iter=n_iter,
           sketch_seed=sketch_seed, exponent=f"{exponent:.2f}")
    # A = Uo diag(s) Voᵀ with the known spectrum s_i = i^-exponent (fine-tuning deltas decay so).
    batch = math.prod(lead)
    Uo = torch.linalg.qr(torch.randn(batch, m, k, generator=d.gen, dtype=torch.float64))[0]
    Vo = torch.linalg.qr(torch.randn(batch, n, k, generator=d.gen, dtype=torch.float64))[0]
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -exponent
    A = ((Uo * s) @ Vo.mT).reshape(*lead, m, n).to(dtype).to(device)
    if d.choice([False, True], "transposed_input"):
        A = A.mT.contiguous().mT
    snapshot = A.clone()

    U, S, V = tm.truncated_svd(A, rank, oversample, n_iter, sketch_seed)
    r = 0 if k == 0 else max(1, min(rank, k))
    assert (U.shape, S.shape, V.shape) == ((*lead, m, r), (*lead, r), (*lead, n, r)), d
    assert U.dtype == S.dtype == V.dtype == dtype, d
    assert torch.equal(A, snapshot), f"{d}: A was modified"
    if A.numel() == 0:
        return
    Ud, Sd, Vd, Ad = (t.double().cpu() for t in (U, S, V, A))
    # The factors' own rounding to the storage dtype bounds how orthonormal they can be.
    tol = 10 * max(RTOL[dtype], 1e-6)
    eye = torch.eye(r, dtype=torch.float64)
    for name, F in (("U", Ud), ("V", Vd)):
        err = (F.mT @ F - eye).abs().max().item()
        assert err <= tol, f"{d}: {name} is not orthonormal: max |{name}ᵀ{name} - I| = {err:.2e}"
    assert (Sd[..., :-1] >= Sd[..., 1:]).all() and (Sd >= 0).all(), f"{d}: S not descending: {Sd}"
    # Against the spectrum of A as stored (rounded to dtype): S never exceeds it (a projection's
    # singular values do not), and the error lies between the optimal rank-r error and a loose
    # multiple of it: 1 for the exact SVD (sketch >= min(m, n)); for a sketch, 1.5 with
    # oversampling and power iterations and 5 with one of them (3,000 draws of these cases on
    # CPU stayed at 1.12 and 1.93); without either, a sketch can miss a direction by chance, and
    # only the bound every projection meets holds (the error of U S Vᵀ = 0).
    sigma = torch.linalg.svdvals(Ad)
    assert (Sd <= sigma[..., :r] * (1 + tol) + tol * sigma[..., :1]).all(), f"{d}: S above A's: {Sd}"
    err = (Ad - (Ud * Sd.unsqueeze(-2)) @ Vd.mT).norm(dim=(-2, -1))
    norm = sigma.norm(dim=-1)
    optimal = sigma[..., r:].norm(dim=-1)
    noise = 4 * RTOL[dtype] * norm * math.sqrt(r)  # the factors' rounding to dtype
    if oversample + r >= k:
        factor = 1.0
    elif oversample >= 2 and n_iter >= 1:
        factor = 1.5
    elif oversample >= 2 or n_iter >= 1:
        factor = 5.0
    else:
        factor = math.inf
    bound = torch.minimum(factor * optimal, norm) + noise
    ratio = (err / optimal.clamp_min(1e-300)).max().item()
    assert (err <= bound).all(), f"{d}: error {err} above {factor} x optimal {optimal} (ratio {ratio:.3f})"
    assert (err >= optimal - noise).all(), f"{d}: error {err} below the optimal {optimal}"


# --- gradients of the differentiable ops, against autograd through the reference ---------------

def _grads(fn, args, names, grad_out):
    leaves = [args[k] for k in names]
    got = torch.autograd.grad(fn(**args), leaves, grad_out, allow_unused=True)
    return [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, got)]


@pytest.mark.parametrize("device", DEVICES)
@seeds(25, 5000)
def test_lowrank_mix_linear_gradients(seed, device):
    d = Draw(seed, device)
    args = mix_case(d, torch.float64)
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and d.rng.random() < 0.7]
    names = names or ["x"]
    d.note(requires_grad=names)
    for k in names:
        args[k] = args[k].detach().clone().requires_grad_()
    x, W = args["x"], args["weight"]
    grad_out = torch.randn(*x.shape[:-1], W.shape[0], generator=d.gen, dtype=torch.float64).to(device)
    got = _grads(tm.lowrank_mix_linear, args, names, grad_out)
    expected = _grads(ref.lowrank_mix_linear, args, names, grad_out)
    for name, g, e in zip(names, got, expected):
        assert g.shape == args[name].shape, f"{d}: grad of {name} has shape {tuple(g.shape)}"
        close(g, e, torch.float64, f"{d} grad of {name}")


@pytest.mark.parametrize("device", DEVICES)
@seeds(20, 6000)
def test_reconstruct_delta_gradients(seed, device):
    d = Draw(seed, device)
    lead, m, n, r = d.lead(), d.dim(12), d.dim(12), d.rng.randint(0, 6)
    d.note(lead=lead, m=m, n=n, r=r)
    args = dict(U=d.tensor("U", (*lead, m, r), torch.float64),
                S=d.tensor("S", (*lead, r), torch.float64, positive=True),
                V=d.tensor("V", (*lead, n, r), torch.float64))
    names = [k for k in args if d.rng.random() < 0.7] or ["S"]
    d.note(requires_grad=names)
    for k in names:
        args[k] = args[k].detach().clone().requires_grad_()
    grad_out = torch.randn(*lead, m, n, generator=d.gen, dtype=torch.float64).to(device)
    got = _grads(tm.reconstruct_delta, args, names, grad_out)
    expected = _grads(ref.reconstruct_delta, args, names, grad_out)
    for name, g, e in zip(names, got, expected):
        assert g.shape == args[name].shape, f"{d}: grad of {name} has shape {tuple(g.shape)}"
        close(g, e, torch.float64, f"{d} grad of {name}")
