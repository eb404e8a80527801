"""The twinmerge ops against twinmerge_ext.reference, on every device, dtype and edge case."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.library import opcheck

import twinmerge_ext as tm
from twinmerge_ext import reference as ref

from conftest import DEVICES, RTOL, assert_close

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
RANKS = {1: [4], 3: [2, 0, 5], 8: [1, 3, 2, 4, 1, 2, 3, 1]}


def factors(lead, m, n, ranks, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = sum(ranks)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(device)
    base = mk(*lead, m, n)
    U = mk(*lead, m, K) / K**0.5 if K else mk(*lead, m, K)
    V = mk(*lead, n, K)
    S = (torch.rand(*lead, K, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(device)
    w = torch.softmax(torch.randn(len(ranks), generator=g, dtype=torch.float64), 0)
    return base, U, S, V, w.to(torch.float32).to(device)


def traced(fn, tracing):
    """fn itself, or fn run under FakeTensorMode on fake copies of its tensor arguments: the path
    of torch.compile, which must refuse what the compiled kernels refuse, with their messages."""
    if not tracing:
        return fn

    def run(*args, **kwargs):
        with FakeTensorMode() as mode:
            fake = lambda a: mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
            return fn(*map(fake, args), **{k: fake(v) for k, v in kwargs.items()})
    return run


TRACING = pytest.mark.parametrize("tracing", [False, True], ids=["kernel", "fake"])


# --- lowrank_merge_ -----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("lead", [(), (3,), (2, 2)])
def test_lowrank_merge_matches_reference(device, dtype, T, lead):
    base, U, S, V, w = factors(lead, 24, 40, RANKS[T], dtype, device)
    out = torch.empty_like(base)
    ptr = out.data_ptr()
    result = tm.lowrank_merge_(out, base, U, S, V, RANKS[T], w)
    assert result is out and out.data_ptr() == ptr
    assert_close(out, ref.lowrank_merge(base, U, S, V, RANKS[T], w))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n", [(40, 24), (24, 40)])
def test_lowrank_merge_in_place_on_base(device, m, n):
    base, U, S, V, w = factors((2,), m, n, RANKS[3], torch.float32, device)
    expected = ref.lowrank_merge(base, U, S, V, RANKS[3], w)
    ptr = base.data_ptr()
    tm.lowrank_merge_(base, base, U, S, V, RANKS[3], w)
    assert base.data_ptr() == ptr
    assert_close(base, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_merge_rank_above_min_dim_and_weights_dtypes(device):
    base, U, S, V, w = factors((), 6, 5, [7, 9], torch.float32, device)
    for weights in (w, w.double(), w.half()):
        out = torch.empty_like(base)
        tm.lowrank_merge_(out, base, U, S, V, [7, 9], weights)
        assert_close(out, ref.lowrank_merge(base, U, S, V, [7, 9], weights))


@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_merge_non_contiguous_inputs(device):
    base, U, S, V, w = factors((2,), 16, 12, RANKS[3], torch.float32, device)
    base_t = base.mT.contiguous().mT          # same values, transposed strides
    U_nc = torch.cat([U, U], -1)[..., ::2]    # strided columns
    U_nc.copy_(U)
    out = torch.empty_like(base)
    tm.lowrank_merge_(out, base_t, U_nc, S, V.mT.contiguous().mT, RANKS[3], w)
    assert_close(out, ref.lowrank_merge(base, U, S, V, RANKS[3], w))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,m,n,ranks", [((0,), 4, 5, [1, 2]), ((2,), 0, 5, [1, 2]),
                                            ((2,), 4, 0, [1, 2]), ((2,), 4, 5, [0, 0])])
def test_lowrank_merge_empty(device, lead, m, n, ranks):
    base, U, S, V, w = factors(lead, m, n, ranks, torch.float32, device)
    out = torch.full_like(base, float("nan"))
    tm.lowrank_merge_(out, base, U, S, V, ranks, w)
    assert torch.equal(out, base)


def _merge_args(**over):
    base, U, S, V, w = factors((2,), 8, 6, [2, 3], torch.float32, "cpu")
    args = dict(out=torch.empty_like(base), base=base, U_cat=U, S_cat=S, V_cat=V, ranks=[2, 3],
                weights=w)
    args.update(over)
    return args


@pytest.mark.parametrize("over,match", [
    (lambda a: dict(out=torch.empty(2, 6, 8).mT), "out must be contiguous"),
    (lambda a: dict(out=a["out"].half()), "base must have the dtype of out"),
    (lambda a: dict(base=a["base"][:, :4]), "base must have the shape of out"),
    (lambda a: dict(U_cat=a["U_cat"].half()), "U_cat must have the dtype of out"),
    (lambda a: dict(U_cat=a["U_cat"][0]), "U_cat must be a 3-D tensor"),
    (lambda a: dict(V_cat=a["V_cat"][:, :, :4]), "V_cat must have shape"),
    (lambda a: dict(S_cat=a["S_cat"][:, :4]), "S_cat must have shape"),
    (lambda a: dict(ranks=[2, 2]), r"ranks must sum to the factor width K = 5, got sum\(\[2, 2\]\) = 4"),
    (lambda a: dict(ranks=[6, -1]), r"ranks must be non-negative, got ranks\[1\] = -1"),
    (lambda a: dict(ranks=[5]), r"ranks must have one entry per mixing weight \(2\), got 1"),
    (lambda a: dict(ranks=[], weights=a["weights"][:0]), r"ranks must name at least one expert, got \[\]"),
    (lambda a: dict(weights=a["weights"][None]), "weights must be a 1-D tensor"),
    (lambda a: dict(weights=torch.tensor([0, 1])), "weights must be float64, float32"),
])
@TRACING
def test_lowrank_merge_rejects_bad_input(over, match, tracing):
    args = _merge_args()
    args.update(over(args))
    with pytest.raises(RuntimeError, match=match):
        traced(tm.lowrank_merge_, tracing)(**args)


def test_lowrank_merge_rejects_factor_sharing_memory_with_out():
    args = _merge_args()
    args["V_cat"] = args["out"].view(-1)[:60].view(2, 6, 5)
    with pytest.raises(RuntimeError, match="V_cat must not share memory with out"):
        tm.lowrank_merge_(**args)


def test_lowrank_merge_rejects_partial_overlap_with_base():
    buf = torch.randn(2, 9, 6)
    args = _merge_args()
    args["base"] = buf.view(-1)[:96].view(2, 8, 6)
    args["out"] = buf.view(-1)[6:102].view(2, 8, 6)
    with pytest.raises(RuntimeError, match="out must either be base itself or not overlap it, got a "
                                           "partial overlap: out at storage offset 6"):
        tm.lowrank_merge_(**args)


@TRACING
def test_lowrank_merge_rejects_too_many_experts(tracing):
    base = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match="ranks may name at most 256 experts, got 257"):
        traced(tm.lowrank_merge_, tracing)(torch.empty_like(base), base, torch.zeros(4, 257), torch.zeros(257),
                          torch.zeros(4, 257), [1] * 257, torch.zeros(257))


@pytest.mark.parametrize("ranks", [(2, 3.0), "23", torch.tensor([2, 3]), (True, 4)])
def test_lowrank_merge_rejects_non_int_ranks(ranks):
    with pytest.raises(TypeError, match="lowrank_merge_: ranks must"):
        tm.lowrank_merge_(**_merge_args(ranks=ranks))


@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_merge_opcheck(device):
    base, U, S, V, w = factors((2,), 8, 6, [2, 3], torch.float32, device)
    opcheck(torch.ops.twinmerge.lowrank_merge_, (torch.empty_like(base), base, U, S, V, [2, 3], w))


# --- dense_merge_ -------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("shape", [(37,), (5, 7), (0,)])
def test_dense_merge_matches_reference(device, dtype, T, shape):
    g = torch.Generator().manual_seed(T)
    base = torch.randn(shape, generator=g).to(dtype).to(device)
    deltas = torch.randn((T,) + shape, generator=g).to(dtype).to(device)
    w = torch.softmax(torch.randn(T, generator=g), 0).to(device)
    out = torch.empty_like(base)
    tm.dense_merge_(out, base, deltas, w)
    assert_close(out, ref.dense_merge(base, deltas, w))
    expected = ref.dense_merge(base, deltas, w)
    tm.dense_merge_(base, base, deltas, w)  # in place
    assert_close(base, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_dense_merge_non_contiguous_inputs(device):
    base = torch.randn(6, 5, device=device)
    deltas = torch.randn(3, 5, 6, device=device).mT
    w = torch.rand(3, device=device)
    out = torch.empty(6, 5, device=device)
    tm.dense_merge_(out, base.mT.contiguous().mT, deltas, w)
    assert_close(out, ref.dense_merge(base, deltas, w))


@pytest.mark.parametrize("over,match", [
    (dict(out=torch.empty(5, 4).mT), "out must be contiguous"),
    (dict(deltas=torch.randn(3, 4, 4)), r"deltas must have shape \[T=3, \*out.shape=\[4, 5\]\]"),
    (dict(weights=torch.rand(2)), r"deltas must have shape \[T=2"),
    (dict(weights=torch.rand(0)), r"weights must hold at least one expert, got shape \[0\]"),
    (dict(deltas=torch.randn(3, 4, 5).half()), "deltas must have the dtype of out"),
    (dict(base=torch.randn(4, 6)), "base must have the shape of out"),
])
@TRACING
def test_dense_merge_rejects_bad_input(over, match, tracing):
    args = dict(out=torch.empty(4, 5), base=torch.randn(4, 5), deltas=torch.randn(3, 4, 5),
                weights=torch.rand(3))
    args.update(over)
    with pytest.raises(RuntimeError, match=match):
        traced(tm.dense_merge_, tracing)(**args)


@pytest.mark.parametrize("device", DEVICES)
def test_dense_merge_opcheck(device):
    base = torch.randn(4, 5, device=device)
    opcheck(torch.ops.twinmerge.dense_merge_,
            (torch.empty_like(base), base, torch.randn(3, 4, 5, device=device),
             torch.rand(3, device=device)))


# --- lowrank_mix_linear -------------------------------------------------------------------------

def mix_args(B, inner, m, n, ranks, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(device)
    K = sum(ranks)
    x = mk(B, *inner, n)
    W = mk(m, n) / n**0.5
    b = mk(m) if bias else None
    U, V = mk(m, K), mk(n, K) / n**0.5
    S = (torch.rand(K, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(device)
    rw = torch.softmax(torch.randn(B, len(ranks), generator=g, dtype=torch.float64), 1)
    return x, W, b, U, S, V, list(ranks), rw.to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("inner", [(), (5,), (2, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_mix_linear_matches_reference(device, dtype, T, inner, bias):
    args = mix_args(4, inner, 20, 12, RANKS[T], dtype, device, bias)
    y = tm.lowrank_mix_linear(*args)
    assert y.shape == (4, *inner, 20) and y.dtype == dtype
    assert_close(y, ref.lowrank_mix_linear(*args))


@pytest.mark.parametrize("device", DEVICES)
def test_mix_linear_each_row_equals_its_merged_linear(device):
    x, W, b, U, S, V, ranks, rw = mix_args(3, (7,), 16, 10, RANKS[3], torch.float64, device)
    y = tm.lowrank_mix_linear(x, W, b, U, S, V, ranks, rw)
    for i in range(3):
        W_i = ref.lowrank_merge(W, U, S, V, ranks, rw[i])
        torch.testing.assert_close(y[i], torch.nn.functional.linear(x[i], W_i, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,inner,n,ranks", [(0, (3,), 6, [2, 1]), (2, (0,), 6, [2, 1]),
                                             (2, (3,), 6, [0, 0]), (2, (3,), 0, [2, 1])])
def test_mix_linear_empty(device, B, inner, n, ranks):
    args = mix_args(B, inner, 5, n, ranks, torch.float32, device)
    y = tm.lowrank_mix_linear(*args)
    assert_close(y, ref.lowrank_mix_linear(*args))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,inner,m,n,ranks", [(0, (3,), 5, 6, [2, 1]), (2, (0,), 5, 6, [2, 1]),
                                               (2, (3,), 5, 0, [2, 1]), (2, (3,), 0, 6, [2, 1]),
                                               (2, (3,), 5, 6, [0, 0])])
def test_mix_linear_backward_empty(device, B, inner, m, n, ranks):
    args = mix_args(B, inner, m, n, ranks, torch.float64, device)
    leaves = [a.requires_grad_() for a in args if isinstance(a, torch.Tensor)]
    grads = torch.autograd.grad(tm.lowrank_mix_linear(*args).sum(), leaves)
    expected = torch.autograd.grad(ref.lowrank_mix_linear(*args).sum(), leaves, allow_unused=True)
    for leaf, g, e in zip(leaves, grads, expected):
        assert g.shape == leaf.shape
        torch.testing.assert_close(g, torch.zeros_like(leaf) if e is None else e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mix_linear_backward_accumulates_in_fp32(device, dtype):
    # Against float64 autograd on the same rounded inputs, a backward that sums in fp32 is off by
    # the final rounding alone (half an ulp); summing 512 rows in the storage dtype is off by
    # several ulps (measured 4-40x more).
    args = [a.to(dtype) if isinstance(a, torch.Tensor) else a
            for a in mix_args(4, (512,), 32, 48, RANKS[8], torch.float64, device)]
    args64 = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    leaves = [a.requires_grad_() for a in args if isinstance(a, torch.Tensor)]
    leaves64 = [a.requires_grad_() for a in args64 if isinstance(a, torch.Tensor)]
    grad = torch.randn(4, 512, 32, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    grads = torch.autograd.grad(tm.lowrank_mix_linear(*args), leaves, grad)
    grads64 = torch.autograd.grad(tm.lowrank_mix_linear(*args64), leaves64, grad.double())
    names = ["x", "weight", "bias", "U_cat", "S_cat", "V_cat", "row_weights"]
    assert_close(grads[0], grads64[0], dtype)  # dx is the forward op itself, tested above
    for name, g, g64 in list(zip(names, grads, grads64))[1:]:
        assert g.dtype == dtype
        rel = ((g.double() - g64).abs() / g64.abs().clamp_min(1e-3 * g64.abs().max())).max()
        assert rel <= torch.finfo(dtype).eps, f"grad of {name}: relative error {rel:.2e}"


@pytest.mark.parametrize("device", DEVICES)
def test_mix_linear_non_contiguous_inputs(device):
    x, W, b, U, S, V, ranks, rw = mix_args(3, (4,), 8, 6, RANKS[3], torch.float32, device)
    y = tm.lowrank_mix_linear(x.transpose(0, 1).contiguous().transpose(0, 1), W.T.contiguous().T,
                              b, U.T.contiguous().T, S, V, ranks, rw.T.contiguous().T)
    assert_close(y, ref.lowrank_mix_linear(x, W, b, U, S, V, ranks, rw))


@pytest.mark.parametrize("idx,value,match", [
    (0, torch.randn(3, 4, 7), r"x must have n = weight.size\(1\) = 6 features"),
    (0, torch.randn(6), r"x must have shape \[B, ..., n\]"),
    (1, torch.randn(8, 6).double(), "weight must have the dtype of x"),
    (2, torch.randn(9), r"bias must have shape \[m=8\]"),
    (2, torch.randn(8).double(), r"bias must have the dtype of x \(Float\), got Double"),
    (5, torch.randn(6, 5), r"V_cat must have shape \[n=6, K=7\], got \[6, 5\]"),
    (4, torch.rand(3), r"S_cat must have shape \[K=7\], got \[3\]"),
    (7, torch.rand(2, 3), r"row_weights must have one row per batch entry of x \(B=3\)"),
    (7, torch.rand(3, 2), r"ranks must have one entry per mixing weight \(2\), got 3"),
    (7, torch.rand(3, 3).long(), "row_weights must be float64, float32"),
])
@TRACING
def test_mix_linear_rejects_bad_input(idx, value, match, tracing):
    args = list(mix_args(3, (4,), 8, 6, RANKS[3], torch.float32, "cpu"))
    args[idx] = value
    with pytest.raises(RuntimeError, match=match):
        traced(tm.lowrank_mix_linear, tracing)(*args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_mix_linear_gradcheck(device, bias):
    args = mix_args(3, (2,), 5, 4, RANKS[3], torch.float64, device, bias)
    args = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    assert torch.autograd.gradcheck(tm.lowrank_mix_linear, args)


@pytest.mark.parametrize("device", DEVICES)
def test_mix_linear_grad_only_x_and_row_weights(device):
    x, W, b, U, S, V, ranks, rw = mix_args(3, (2,), 5, 4, RANKS[3], torch.float64, device)
    x.requires_grad_()
    rw.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, rw: tm.lowrank_mix_linear(x, W, b, U, S, V, ranks, rw),
                                    (x, rw))


@pytest.mark.parametrize("device", DEVICES)
def test_mix_linear_opcheck(device):
    args = mix_args(3, (2,), 5, 4, RANKS[3], torch.float32, device)
    opcheck(torch.ops.twinmerge.lowrank_mix_linear, args)
    args = mix_args(3, (2,), 5, 4, RANKS[3], torch.float64, device, bias=False)
    opcheck(torch.ops.twinmerge.lowrank_mix_linear,
            [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args])


@pytest.mark.parametrize("device", DEVICES)
def test_mix_linear_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    x, W, b, U, S, V, ranks, rw = mix_args(4, (3,), 8, 6, RANKS[3], torch.float32, device)

    @torch.compile(fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    def layer(x, rw):
        return torch.relu(tm.lowrank_mix_linear(x, W, b, U, S, V, ranks, rw)) * 2

    for new_rw in (rw, torch.softmax(torch.randn_like(rw), 1)):
        expected = torch.relu(ref.lowrank_mix_linear(x, W, b, U, S, V, ranks, new_rw)) * 2
        assert_close(layer(x, new_rw), expected)


# --- reconstruct_delta --------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,m,n,r", [((), 12, 9, 4), ((3,), 9, 12, 1), ((2, 2), 5, 5, 8),
                                        ((2,), 7, 6, 0), ((0,), 3, 4, 2), ((2,), 0, 4, 2)])
def test_reconstruct_delta_matches_reference(device, dtype, lead, m, n, r):
    _, U, S, V, _ = factors(lead, m, n, [r], dtype, device)
    D = tm.reconstruct_delta(U, S, V)
    assert D.shape == (*lead, m, n) and D.dtype == dtype
    assert_close(D, ref.reconstruct_delta(U, S, V))


@pytest.mark.parametrize("device", DEVICES)
def test_reconstruct_delta_gradcheck_and_opcheck(device):
    _, U, S, V, _ = factors((2,), 5, 4, [3], torch.float64, device)
    args = (U.requires_grad_(), S.requires_grad_(), V.requires_grad_())
    assert torch.autograd.gradcheck(tm.reconstruct_delta, args)
    opcheck(torch.ops.twinmerge.reconstruct_delta, args)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(4, 3), torch.rand(2), torch.randn(5, 3)), r"S must have shape \[..., r=3\]"),
    ((torch.randn(4, 3), torch.rand(3), torch.randn(5, 2)), r"V must have shape \[..., n, r=3\]"),
    ((torch.randn(2, 4, 3), torch.rand(3), torch.randn(2, 5, 3)), "S must be a 2-D tensor"),
    ((torch.randn(4, 3), torch.rand(3), torch.randn(5, 3).half()), "V must have the dtype of U"),
    ((torch.randn(3), torch.rand(3), torch.randn(5, 3)), r"U must have shape \[..., m, r\]"),
])
@TRACING
def test_reconstruct_delta_rejects_bad_input(args, match, tracing):
    with pytest.raises(RuntimeError, match=match):
        traced(tm.reconstruct_delta, tracing)(*args)


# --- truncated_svd ------------------------------------------------------------------------------

def decaying(batch, m, n, exponent=0.5, seed=0, dtype=torch.float32, device="cpu"):
    """Matrices with the slowly decaying spectrum σ_i = i^-exponent (fine-tuning deltas look so)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    Uo = torch.linalg.qr(torch.randn(batch, m, k, generator=g, dtype=torch.float64))[0]
    Vo = torch.linalg.qr(torch.randn(batch, n, k, generator=g, dtype=torch.float64))[0]
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -exponent
    return ((Uo * s) @ Vo.mT).to(dtype).to(device)


def rel_error(A, U, S, V):
    A = A.double()
    return (A - (U.double() * S.double().unsqueeze(-2)) @ V.double().mT).norm(dim=(-2, -1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,rank", [(300, 200, 16), (200, 300, 16), (256, 256, 25)])
@pytest.mark.parametrize("exponent", [0.5, 1.0])
def test_truncated_svd_near_optimal_error(device, m, n, rank, exponent):
    A = decaying(3, m, n, exponent, device=device)
    U, S, V = tm.truncated_svd(A, rank)
    ratio = rel_error(A, U, S, V) / rel_error(A, *ref.truncated_svd(A, rank))
    assert ratio.max() <= 1.005, ratio


@pytest.mark.parametrize("device", DEVICES)
def test_truncated_svd_more_iterations_trade_speed_for_accuracy(device):
    A = decaying(2, 300, 200, 0.3, device=device)
    optimal = rel_error(A, *ref.truncated_svd(A, 20))
    ratios = [(rel_error(A, *tm.truncated_svd(A, 20, oversample=p, n_iter=q)) / optimal).max()
              for p, q in [(0, 0), (10, 2), (20, 4)]]
    assert ratios[0] > ratios[1] >= ratios[2] >= 1.0 - 1e-6, ratios


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_truncated_svd_factors(device, dtype):
    A = decaying(2, 60, 40, device=device, dtype=dtype)
    U, S, V = tm.truncated_svd(A, 8)
    assert (U.shape, S.shape, V.shape) == ((2, 60, 8), (2, 8), (2, 40, 8))
    assert U.dtype == S.dtype == V.dtype == dtype
    eye = torch.eye(8, dtype=torch.float64)
    tol = max(RTOL[dtype], 1e-5) * 10
    torch.testing.assert_close((U.double().mT @ U.double()).cpu(), eye.expand(2, 8, 8), atol=tol, rtol=0)
    torch.testing.assert_close((V.double().mT @ V.double()).cpu(), eye.expand(2, 8, 8), atol=tol, rtol=0)
    assert (S[:, :-1] >= S[:, 1:]).all() and (S > 0).all()
    # Singular values of a projection of A never exceed A's own, and a good sketch gets close.
    S_opt = ref.truncated_svd(A, 8)[1].double().cpu()
    assert (S.double().cpu() <= S_opt * (1 + tol)).all()
    assert (S.double().cpu() >= S_opt * 0.98).all()


@pytest.mark.parametrize("device", DEVICES)
def test_truncated_svd_exact_when_sketch_covers_matrix(device):
    A = decaying(2, 30, 20, device=device, dtype=torch.float64)
    U, S, V = tm.truncated_svd(A, 15)  # 15 + 10 >= 20: exact SVD
    torch.testing.assert_close(rel_error(A, U, S, V), rel_error(A, *ref.truncated_svd(A, 15)))
    U, S, V = tm.truncated_svd(A, 20)
    assert rel_error(A, U, S, V).max() < 1e-10


@pytest.mark.parametrize("device", DEVICES)
def test_truncated_svd_rank_clamped_and_deterministic(device):
    A = decaying(1, 1, 9, device=device)[0]  # a 1 x 9 matrix: rank 0.1*1 -> clamped to 1
    U, S, V = tm.truncated_svd(A, 0)
    assert (U.shape, S.shape, V.shape) == ((1, 1), (1,), (9, 1))
    assert rel_error(A, U, S, V) < 1e-5
    B = decaying(2, 50, 40, device=device)
    assert tm.truncated_svd(B, 100)[1].shape == (2, 40)
    first, again = tm.truncated_svd(B, 5, seed=3), tm.truncated_svd(B, 5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 5, 4), (3, 0, 4), (3, 5, 0)])
def test_truncated_svd_empty(device, shape):
    U, S, V = tm.truncated_svd(torch.randn(shape, device=device), 3)
    r = 0 if min(shape[1:]) == 0 else 3
    assert (U.shape, S.shape, V.shape) == ((shape[0], shape[1], r), (shape[0], r), (shape[0], shape[2], r))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(rank=-1), RuntimeError, r"rank must be >= 0 \(it is clamped to \[1, min\(m, n\)\]\), got -1"),
    (dict(rank=2, oversample=-3), RuntimeError, "oversample must be >= 0, got -3"),
    (dict(rank=2, n_iter=-1), RuntimeError, "n_iter must be >= 0, got -1"),
    (dict(rank=float("nan")), TypeError, r"truncated_svd: rank must be an int, got nan"),
    (dict(rank=2.5), TypeError, r"truncated_svd: rank must be an int, got 2.5"),
])
@TRACING
def test_truncated_svd_rejects_bad_arguments(kwargs, exc, match, tracing):
    with pytest.raises(exc, match=match):
        traced(tm.truncated_svd, tracing)(torch.randn(5, 4), **kwargs)


@TRACING
def test_truncated_svd_rejects_integer_matrix(tracing):
    with pytest.raises(RuntimeError, match="A must be float64, float32, float16 or bfloat16, got Long"):
        traced(tm.truncated_svd, tracing)(torch.ones(5, 4, dtype=torch.long), 2)


@pytest.mark.parametrize("device", DEVICES)
def test_truncated_svd_opcheck(device):
    opcheck(torch.ops.twinmerge.truncated_svd, (decaying(2, 30, 20, device=device), 4, 3, 1, 7))


# --- autograd rules of the ops that are not differentiable ------------------------------------

def _inplace_args(op, dtype, device="cpu"):
    """Keyword arguments of a small call of the in-place op `op` and its float64 reference."""
    if op == "lowrank_merge_":
        base, U, S, V, w = factors((2,), 8, 6, [2, 3], dtype, device)
        args = dict(out=torch.zeros_like(base), base=base, U_cat=U, S_cat=S, V_cat=V,
                    ranks=[2, 3], weights=w)
        return args, lambda a: ref.lowrank_merge(a["base"], a["U_cat"], a["S_cat"], a["V_cat"],
                                                 a["ranks"], a["weights"])
    g = torch.Generator().manual_seed(1)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(device)
    args = dict(out=torch.zeros(4, 5, dtype=dtype, device=device), base=mk(4, 5),
                deltas=mk(3, 4, 5), weights=torch.rand(3, generator=g).to(device))
    return args, lambda a: ref.dense_merge(a["base"], a["deltas"], a["weights"])


INPLACE_OPS = {"lowrank_merge_": tm.lowrank_merge_, "dense_merge_": tm.dense_merge_}
INPLACE_INPUTS = [("lowrank_merge_", name) for name in ("base", "U_cat", "S_cat", "V_cat", "weights")]
INPLACE_INPUTS += [("dense_merge_", name) for name in ("base", "deltas", "weights")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", INPLACE_OPS)
def test_inplace_ops_refuse_a_leaf_out_that_requires_grad(device, dtype, op):
    args, _ = _inplace_args(op, dtype, device)
    out = args["out"].requires_grad_()
    with pytest.raises(RuntimeError, match=rf"{op}: out must not be a leaf tensor that requires "
                                           r"grad while grad mode is on \(a leaf Variable that "
                                           r"requires grad is being used in an in-place operation; "
                                           r"merge into it under torch.no_grad\(\).*\), got a leaf "
                                           r"of shape \[.*\] with requires_grad=True"):
        INPLACE_OPS[op](**args)
    assert out._version == 0 and not out.detach().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", INPLACE_OPS)
def test_inplace_ops_refuse_an_out_in_a_graph(device, dtype, op):
    args, _ = _inplace_args(op, dtype, device)
    leaf = torch.zeros_like(args["out"], requires_grad=True)
    args["out"] = leaf * 1  # not a leaf, but part of a graph that a merge would cut silently
    with pytest.raises(RuntimeError, match=rf"{op}: out must not require grad while grad mode is "
                                           rf"on \({op} is not differentiable; .*\), got a tensor "
                                           r"with requires_grad=True"):
        INPLACE_OPS[op](**args)
    assert args["out"]._version == 0 and not args["out"].detach().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op,name", INPLACE_INPUTS)
def test_inplace_ops_refuse_inputs_that_require_grad(device, dtype, op, name):
    args, _ = _inplace_args(op, dtype, device)
    args[name].requires_grad_()
    instead = ("use lowrank_mix_linear or reconstruct_delta, which are differentiable"
               if op == "lowrank_merge_" else r"write base \+ .* in torch ops")
    with pytest.raises(RuntimeError, match=rf"{op}: {name} must not require grad while grad mode "
                                           rf"is on \({op} is not differentiable; for gradients "
                                           rf"{instead}; to merge without gradients, call it "
                                           r"under torch.no_grad\(\)\), got a tensor with "
                                           r"requires_grad=True"):
        INPLACE_OPS[op](**args)
    assert args["out"]._version == 0 and not args["out"].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", INPLACE_OPS)
def test_inplace_ops_under_no_grad_write_into_a_leaf_like_an_optimizer_step(device, dtype, op):
    args, reference = _inplace_args(op, dtype, device)
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            value.requires_grad_()
    out = args["out"]
    with torch.no_grad():
        assert INPLACE_OPS[op](**args) is out
    assert out.is_leaf and out.requires_grad and out.grad_fn is None and out._version == 1
    assert_close(out.detach(), reference({k: v.detach() if isinstance(v, torch.Tensor) else v
                                          for k, v in args.items()}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", INPLACE_OPS)
@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_inplace_ops_bump_the_version_so_backward_sees_the_overwrite(device, dtype, op, mode):
    args, reference = _inplace_args(op, dtype, device)
    out = args["out"]
    leaf = torch.ones_like(out, requires_grad=True)
    y = (leaf * out).sum()  # saves out for the backward
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad,
               "inference_mode": torch.inference_mode}[mode]
    with context():
        INPLACE_OPS[op](**args)
    assert out._version == 1
    assert_close(out, reference(args))
    with pytest.raises(RuntimeError, match="one of the variables needed for gradient computation "
                                           "has been modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", INPLACE_OPS)
def test_inplace_ops_write_into_inference_tensors(device, dtype, op):
    with torch.inference_mode():
        args, reference = _inplace_args(op, dtype, device)
        INPLACE_OPS[op](**args)
    assert args["out"].is_inference()
    assert_close(args["out"], reference(args))
    INPLACE_OPS[op](**args)  # and outside inference mode: an inference tensor has no version
    assert_close(args["out"], reference(args))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op,name", INPLACE_INPUTS + [(op, "out") for op in INPLACE_OPS]
                         + [("truncated_svd", "A")])
@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_non_differentiable_ops_refuse_forward_mode_dual_tensors(device, dtype, op, name, grad_mode):
    # Forward AD ignores torch.no_grad(): a tangent would be dropped silently in either mode.
    if op == "truncated_svd":
        args, call = dict(A=decaying(2, 12, 9, device=device, dtype=dtype), rank=3), tm.truncated_svd
    else:
        args, call = _inplace_args(op, dtype, device)[0], INPLACE_OPS[op]
    with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
        primal = args[name]
        args[name] = fwAD.make_dual(primal, torch.ones_like(primal))
        with pytest.raises(RuntimeError, match=rf"^{op}: {name} must not be a dual tensor of "
                                               rf"forward-mode AD \({op} is not differentiable; "
                                               rf"pass {name}.detach\(\), its primal\), got one "
                                               r"with a tangent"):
            call(**args)
        args[name] = args[name].detach()
        call(**args)
    if op != "truncated_svd":
        assert args["out"].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_truncated_svd_refuses_A_that_requires_grad(device, dtype):
    A = decaying(2, 12, 9, device=device, dtype=dtype).requires_grad_()
    with pytest.raises(RuntimeError, match=r"truncated_svd: A must not require grad while grad "
                                           r"mode is on \(truncated_svd is not differentiable; for "
                                           r"gradients use torch.linalg.svd or torch.svd_lowrank; "
                                           r"to decompose without gradients, pass A.detach\(\) or "
                                           r"call it under torch.no_grad\(\)\), got a tensor with "
                                           r"requires_grad=True"):
        tm.truncated_svd(A, 3)
    expected = tm.truncated_svd(A.detach(), 3)
    with torch.no_grad():
        factors_ = tm.truncated_svd(A, 3)
    with torch.inference_mode():
        in_inference = tm.truncated_svd(A.detach(), 3)
    for got in (expected, factors_, in_inference):
        assert all(t.grad_fn is None and not t.requires_grad for t in got)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("device", DEVICES)
def test_differentiable_ops_work_in_inference_mode(device):
    with torch.inference_mode():
        args = mix_args(3, (2,), 5, 4, RANKS[3], torch.float32, device)
        y = tm.lowrank_mix_linear(*args)
        _, U, S, V, _ = factors((2,), 5, 4, [3], torch.float32, device)
        D = tm.reconstruct_delta(U, S, V)
    assert y.is_inference() and D.is_inference()
    assert_close(y, ref.lowrank_mix_linear(*args))
    assert_close(D, ref.reconstruct_delta(U, S, V))


# --- non-finite values --------------------------------------------------------------------------
# The merging and mixing ops never wait for the device, so they do not look for NaN/Inf: like
# torch.mm they pass it to exactly the outputs that depend on it, never to others, and never
# leave an output unwritten.

def _poison(t, index, value=float("nan")):
    t = t.clone()
    t[index] = value
    return t


def _nonfinite_cases(dtype, device):
    """(name, run, reference, mask of the outputs that must not be finite) per case."""
    ranks = [2, 0, 3]
    base, U, S, V, w = factors((3,), 6, 5, ranks, dtype, device)
    merge = lambda base=base, U=U, S=S, V=V, w=w: (
        lambda: tm.lowrank_merge_(torch.full_like(base, 7.0), base, U, S, V, ranks, w),
        lambda: ref.lowrank_merge(base, U, S, V, ranks, w))
    mask = lambda f: f(torch.zeros(3, 6, 5, dtype=torch.bool))

    def at(*index):
        def f(m):
            m[index] = True
            return m
        return f

    cases = [
        ("merge: weight of a rank-0 expert", *merge(w=_poison(w, 1)), mask(lambda m: m)),
        ("merge: weight of a rank-3 expert", *merge(w=_poison(w, 2)), mask(lambda m: m.fill_(True))),
        ("merge: one singular value", *merge(S=_poison(S, (1, 3))), mask(at(1))),
        ("merge: one entry of U_cat", *merge(U=_poison(U, (2, 4, 0))), mask(at(2, 4))),
        ("merge: Inf in V_cat", *merge(V=_poison(V, (0, 3, 4), float("inf"))), mask(at(0, slice(None), 3))),
        ("merge: one entry of base", *merge(base=_poison(base, (1, 2, 3))), mask(at(1, 2, 3))),
    ]
    dense_base, deltas = base[0], torch.stack([base[1], base[2], U[0, :, :5]])
    dense = lambda base=dense_base, deltas=deltas, w=w: (
        lambda: tm.dense_merge_(torch.full_like(base, 7.0), base, deltas, w),
        lambda: ref.dense_merge(base, deltas, w))
    dmask = lambda f: f(torch.zeros(6, 5, dtype=torch.bool))
    cases += [
        ("dense: one weight", *dense(w=_poison(w, 0)), dmask(lambda m: m.fill_(True))),
        ("dense: one delta entry", *dense(deltas=_poison(deltas, (2, 4, 1))), dmask(at(4, 1))),
        ("dense: Inf in base", *dense(base=_poison(dense_base, (0, 0), float("inf"))), dmask(at(0, 0))),
    ]
    x, W, b, U, S, V, _, rw = mix_args(3, (4,), 7, 5, ranks, dtype, device)
    mix = lambda x=x, b=b, U=U, S=S, rw=rw: (
        lambda: tm.lowrank_mix_linear(x, W, b, U, S, V, ranks, rw),
        lambda: ref.lowrank_mix_linear(x, W, b, U, S, V, ranks, rw))
    mmask = lambda f: f(torch.zeros(3, 4, 7, dtype=torch.bool))
    cases += [
        ("mix: row weight of a rank-0 expert", *mix(rw=_poison(rw, (1, 1))), mmask(lambda m: m)),
        ("mix: row weight of a rank-2 expert", *mix(rw=_poison(rw, (1, 0))), mmask(at(1))),
        ("mix: one entry of x", *mix(x=_poison(x, (2, 1, 3))), mmask(at(2, 1))),
        ("mix: one singular value", *mix(S=_poison(S, 4)), mmask(lambda m: m.fill_(True))),
        ("mix: one entry of U_cat", *mix(U=_poison(U, (5, 0))), mmask(at(slice(None), slice(None), 5))),
        ("mix: Inf in bias", *mix(b=_poison(b, 6, float("inf"))), mmask(at(slice(None), slice(None), 6))),
    ]
    _, Ur, Sr, Vr, _ = factors((2,), 6, 5, [3], dtype, device)
    Sr = _poison(Sr, (1, 2))
    cases += [("reconstruct: one singular value", lambda: tm.reconstruct_delta(Ur, Sr, Vr),
               lambda: ref.reconstruct_delta(Ur, Sr, Vr),
               torch.zeros(2, 6, 5, dtype=torch.bool).index_fill_(0, torch.tensor([1]), True))]
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_inputs_reach_exactly_the_outputs_that_depend_on_them(device, dtype):
    for name, run, reference, affected in _nonfinite_cases(dtype, device):
        got, expected = run().cpu(), reference().cpu()
        assert torch.equal(~torch.isfinite(got), affected), name
        assert torch.equal(~torch.isfinite(expected), affected), name  # the test's own premise
        assert torch.equal(torch.isnan(got), torch.isnan(expected)), name
        assert torch.equal(got[torch.isinf(got)], expected[torch.isinf(expected)]), name
        assert_close(got[~affected], expected[~affected], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [5, 15], ids=["sketched", "exact"])
def test_truncated_svd_refuses_non_finite_matrices_by_index(device, dtype, rank):
    A = decaying(6, 30, 20, device=device, dtype=dtype).reshape(2, 3, 30, 20)
    A[1, 0, 2, 3] = float("nan")
    A[1, 2, 0, 0] = float("inf")
    with pytest.raises(RuntimeError, match=r"^truncated_svd: A must have finite entries only \(the "
                                           r"SVD of a matrix with NaN or Inf is undefined\), got NaN "
                                           r"or Inf entries in the matrix at leading index \[1, 0\] "
                                           r"\(batch index 3 of 6\) and in 1 more"):
        tm.truncated_svd(A, rank)
    with pytest.raises(RuntimeError, match=r"^truncated_svd: A must have finite entries only .*, got "
                                           r"NaN or Inf entries(?! in)"):
        tm.truncated_svd(A[1, 2].mT, rank)
    U, S, V = tm.truncated_svd(A[0], rank)  # the finite matrices alone
    assert torch.isfinite(S).all()


# --- tensors no op supports: other layouts, devices, quantized dtypes -----------------------------

def _valid_args(op):
    """Keyword arguments (in schema order) of a small valid CPU float32 call of `op`."""
    if op in INPLACE_OPS:
        return _inplace_args(op, torch.float32)[0]
    if op == "lowrank_mix_linear":
        names = ["x", "weight", "bias", "U_cat", "S_cat", "V_cat", "ranks", "row_weights"]
        return dict(zip(names, mix_args(3, (2,), 5, 4, RANKS[3], torch.float32, "cpu")))
    if op == "reconstruct_delta":
        _, U, S, V, _ = factors((2,), 5, 4, [3], torch.float32, "cpu")
        return dict(U=U, S=S, V=V)
    return dict(A=decaying(2, 12, 9), rank=3)


OPS = {name: getattr(tm, name) for name in ("reconstruct_delta", "lowrank_merge_", "dense_merge_",
                                            "lowrank_mix_linear", "truncated_svd")}
TENSOR_ARGS = [(op, name) for op in OPS for name, value in _valid_args(op).items()
               if isinstance(value, torch.Tensor)]

# Each kind of unsupported tensor and the message of the op's refusal, from the Python wrapper
# and from the dispatcher (the C++ kernels for these keys, or the fake kernel for real meta).
UNSUPPORTED = {
    "sparse_coo": (lambda t: t.to_sparse(), r"must be a strided \(dense\) tensor, got layout "
                                            r"torch.sparse_coo"),
    "sparse_csr": (lambda t: t.to_sparse_csr() if t.dim() >= 2 else None,
                   r"must be a strided \(dense\) tensor, got layout torch.sparse_csr"),
    "mkldnn": (lambda t: t.to_mkldnn(), r"must be a strided \(dense\) tensor, got layout "
                                        r"torch._mkldnn"),
    "nested": (lambda t: torch.nested.nested_tensor([t]),
               r"must be a strided \(dense\) tensor, got a nested tensor"),
    "quantized": (lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8),
                  "must be float64, float32, float16 or bfloat16, got QInt8"),
    "meta": (lambda t: t.to("meta"), "must be on a cpu or cuda device, got meta"),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # nested, sparse CSR and quantized tensors warn
@pytest.mark.parametrize("path", ["wrapper", "dispatcher", "dispatcher in inference mode"])
@pytest.mark.parametrize("op,name", TENSOR_ARGS)
def test_ops_refuse_unsupported_tensors_by_name(op, name, path):
    call = OPS[op] if path == "wrapper" else getattr(torch.ops.twinmerge, op)
    for kind, (convert, match) in UNSUPPORTED.items():
        args = _valid_args(op)
        bad = convert(args[name])
        if bad is None:
            continue
        args[name] = bad
        with torch.inference_mode(path.endswith("inference mode")):
            with pytest.raises(RuntimeError, match=rf"^{op}: {name} {match}"):
                call(**args)
        if op in INPLACE_OPS and name != "out":
            assert not args["out"].any(), f"{kind}: out was written before the error"


@pytest.mark.parametrize("op", OPS)
def test_unsupported_kernels_refuse_even_without_an_unsupported_argument(op):
    # Reached only by a call dispatched to a sparse key by hand: it must still refuse.
    sparse = torch._C.DispatchKeySet(torch._C.DispatchKey.SparseCPU)
    with pytest.raises(RuntimeError, match=rf"^{op}: its tensors must be strided \(dense\) tensors "
                                           r"of a floating dtype on a cpu or cuda device, got a call "
                                           r"dispatched to SparseCPU"):
        getattr(torch.ops.twinmerge, op).default.redispatch(sparse, **_valid_args(op))


@pytest.mark.parametrize("op,name", TENSOR_ARGS)
def test_wrappers_refuse_non_tensors_by_name(op, name):
    args = _valid_args(op)
    args[name] = args[name].tolist()
    with pytest.raises(TypeError, match=rf"^{op}: {name} must be a Tensor, got list"):
        OPS[op](**args)


def test_fake_kernels_trace_fake_meta_tensors():
    # FakeTensors on the meta device are shape tracing, which the fake kernels serve.
    with FakeTensorMode():
        args = _valid_args("lowrank_merge_")
        meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        torch.ops.twinmerge.lowrank_merge_(**meta)
        assert torch.ops.twinmerge.truncated_svd(torch.empty(3, 9, 7, device="meta"), 4)[0].shape == (3, 9, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_merge_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    base, U, S, V, w = factors((2,), 8, 6, RANKS[3], torch.float32, device)
    deltas = torch.randn(3, 8, 6, device=device)

    @torch.compile(fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    def merge(out, w):
        tm.lowrank_merge_(out, base, U, S, V, RANKS[3], w)
        tm.dense_merge_(out[0], base[0], deltas, w)
        return out.sum()

    for new_w in (w, torch.softmax(torch.randn_like(w), 0)):
        out = torch.empty_like(base)
        expected = ref.lowrank_merge(base, U, S, V, RANKS[3], new_w)
        expected[0] = ref.dense_merge(base[0], deltas, new_w)
        total = merge(out, new_w)
        assert_close(out, expected)
        assert_close(total, expected.sum())


# --- builds -------------------------------------------------------------------------------------

def _built_without_cuda():
    return "no_cuda.cpp" in torch._C._dispatch_dump("twinmerge::reconstruct_delta")


@pytest.mark.skipif(not _built_without_cuda(), reason="this build has the CUDA kernels")
def test_cpu_only_build_rejects_cuda_tensors_clearly():
    op = torch.ops.twinmerge.reconstruct_delta.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(RuntimeError, match="twinmerge::reconstruct_delta: got CUDA tensors, but "
                                           "twinmerge_ext was built without CUDA support"):
        op.redispatch(keys, torch.randn(3, 2), torch.rand(2), torch.randn(4, 2))
