"""What only a GPU can show: CUDA ≡ CPU, CUDA-graph capture and replay, device-mix errors."""

import pytest
import torch

import twinmerge_ext as tm
from twinmerge_ext import reference as ref

from conftest import HAS_CUDA, assert_close
from test_ops import RANKS, decaying, factors, mix_args, rel_error

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]


@pytest.fixture
def no_sync():
    """Fails the test if anything inside synchronizes the host with the device."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    yield
    torch.cuda.set_sync_debug_mode("default")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    base, U, S, V, w = factors((2,), 48, 40, RANKS[8], dtype, "cpu")
    on = lambda *ts: [t.cuda() for t in ts]
    out_cpu, out_gpu = torch.empty_like(base), torch.empty_like(base).cuda()
    tm.lowrank_merge_(out_cpu, base, U, S, V, RANKS[8], w)
    tm.lowrank_merge_(out_gpu, *on(base, U, S, V), RANKS[8], w.cuda())
    assert_close(out_gpu, out_cpu.double(), dtype)

    args = mix_args(4, (9,), 32, 24, RANKS[8], dtype, "cpu")
    gpu_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    assert_close(tm.lowrank_mix_linear(*gpu_args), tm.lowrank_mix_linear(*args).double(), dtype)

    assert_close(tm.reconstruct_delta(*on(U, S, V)), tm.reconstruct_delta(U, S, V).double(), dtype)

    deltas = torch.randn(3, 50, dtype=dtype)
    out_cpu, out_gpu = torch.empty(50, dtype=dtype), torch.empty(50, dtype=dtype, device="cuda")
    tm.dense_merge_(out_cpu, base[0, 0, :1].expand(50).contiguous(), deltas, w[:3])
    tm.dense_merge_(out_gpu, base[0, 0, :1].expand(50).contiguous().cuda(), deltas.cuda(), w[:3].cuda())
    assert_close(out_gpu, out_cpu.double(), dtype)


def _at_offset(t, offset):
    """A contiguous copy of t that starts `offset` elements into its storage (odd alignment)."""
    flat = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = flat[offset:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("m,n", [(40, 56), (56, 40)])
def test_cublaslt_paths_at_any_alignment(monkeypatch, dtype, offset, m, n):
    # Merging is cuBLASLt's D = A B + C; the bias of lowrank_mix_linear is its epilogue.
    # Operands that start off a 16-byte boundary (offset 1, 3) get an algorithm for their
    # alignment, or the cuBLAS path, never a wrong result. Aligned, cuBLASLt must take every case
    # (TWINMERGE_CUBLASLT=require turns a fallback into an error).
    if offset == 0:
        monkeypatch.setenv("TWINMERGE_CUBLASLT", "require")
    ranks = [5, 0, 7, 4, 9, 3, 6, 6]  # K = 40: two column blocks of the scaling kernel
    base, U, S, V, w = factors((3,), m, n, ranks, dtype, "cuda")
    expected = ref.lowrank_merge(base, U, S, V, ranks, w)
    moved_base, mU, mV = (_at_offset(t, offset) for t in (base, U, V))
    out = _at_offset(torch.zeros_like(base), offset)
    tm.lowrank_merge_(out, moved_base, mU, S.double(), mV, ranks, w)
    assert_close(out, expected, dtype)
    assert torch.equal(moved_base, base)
    # In place takes the same GEMM as into a separate buffer: the same bits.
    tm.lowrank_merge_(moved_base, moved_base, mU, S.double(), mV, ranks, w)
    assert torch.equal(moved_base, out)
    for with_bias in (True, False):
        x, W, b, U, S, V, ranks, rw = mix_args(4, (6,), m, n, ranks, dtype, "cuda", bias=with_bias)
        expected = ref.lowrank_mix_linear(x, W, b, U, S, V, ranks, rw)
        moved = [_at_offset(t, offset) if isinstance(t, torch.Tensor) else t for t in (x, W, b, U, S, V)]
        assert_close(tm.lowrank_mix_linear(*moved, ranks, rw), expected, dtype)


@pytest.mark.parametrize("mode", ["off", "require"])
def test_cublaslt_switch_and_large_row_counts(monkeypatch, mode):
    # 9000 rows pass the scaling kernel's row-grid cap (a grid-stride loop covers the rest); a
    # non-contiguous base goes through a contiguous copy. Both GEMM paths agree with the reference.
    monkeypatch.setenv("TWINMERGE_CUBLASLT", mode)
    x, W, b, U, S, V, ranks, rw = mix_args(9, (1000,), 48, 40, RANKS[8], torch.bfloat16, "cuda")
    assert_close(tm.lowrank_mix_linear(x, W, b, U, S, V, ranks, rw),
                 ref.lowrank_mix_linear(x, W, b, U, S, V, ranks, rw))
    base, U, S, V, w = factors((2,), 48, 9000, RANKS[8], torch.float32, "cuda")
    strided = base.mT.contiguous().mT
    out = torch.empty_like(base)
    tm.lowrank_merge_(out, strided, U, S, V, RANKS[8], w)
    assert_close(out, ref.lowrank_merge(base, U, S, V, RANKS[8], w))
    if mode == "require":  # fp64 always takes the cuBLAS path
        with pytest.raises(RuntimeError, match="TWINMERGE_CUBLASLT=require, but fp64"):
            tm.lowrank_merge_(out.double(), base.double(), U.double(), S, V.double(), RANKS[8], w)


def test_cublaslt_reuses_its_choice_across_calls(monkeypatch):
    # The heuristic's answer is cached by problem: shapes, dtypes, in place or not, TF32, and
    # every operand's alignment (the bias's too). Calls that differ in any of these must not
    # reuse another's algorithm; calls that agree reuse it and stay exact.
    monkeypatch.setenv("TWINMERGE_CUBLASLT", "require")
    base, U, S, V, _ = factors((2,), 64, 48, RANKS[8], torch.bfloat16, "cuda")
    for seed in range(3):
        w = torch.softmax(torch.randn(8, generator=torch.Generator().manual_seed(seed)), 0).cuda()
        expected = ref.lowrank_merge(base, U, S, V, RANKS[8], w)
        aligned = torch.full_like(base, float("nan"))
        tm.lowrank_merge_(aligned, base, U, S, V, RANKS[8], w)
        assert_close(aligned, expected)
        odd = _at_offset(torch.full_like(base, float("nan")), 1)  # 2-byte aligned out
        monkeypatch.setenv("TWINMERGE_CUBLASLT", "auto")
        tm.lowrank_merge_(odd, base, U, S, V, RANKS[8], w)
        monkeypatch.setenv("TWINMERGE_CUBLASLT", "require")
        assert_close(odd, expected)
        inplace = base.clone()
        tm.lowrank_merge_(inplace, inplace, U, S, V, RANKS[8], w)
        assert torch.equal(inplace, aligned)

    base, U, S, V, w = factors((2,), 64, 48, RANKS[8], torch.float32, "cuda")
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32 in (True, False, True, False):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            out = torch.empty_like(base)
            tm.lowrank_merge_(out, base, U, S, V, RANKS[8], w)
            expected = ref.lowrank_merge(base, U, S, V, RANKS[8], w)
            if tf32:
                assert_close(out, expected, torch.bfloat16)  # TF32 keeps 10 mantissa bits
            else:
                assert_close(out, expected)  # full fp32: not a TF32 algorithm cached before
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous

    x, W, b, U, S, V, ranks, rw = mix_args(4, (6,), 48, 40, RANKS[8], torch.bfloat16, "cuda")
    expected = ref.lowrank_mix_linear(x, W, b, U, S, V, ranks, rw)
    for offset in (0, 8, 0, 8):  # a 256-byte and a 16-byte aligned bias, alternating
        assert_close(tm.lowrank_mix_linear(x, W, _at_offset(b, offset), U, S, V, ranks, rw), expected)


def test_cublaslt_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("TWINMERGE_CUBLASLT", "fast")
    x, W, b, U, S, V, ranks, rw = mix_args(2, (3,), 8, 6, RANKS[3], torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="TWINMERGE_CUBLASLT must be auto, off or require, got 'fast'"):
        tm.lowrank_mix_linear(x, W, b, U, S, V, ranks, rw)


def test_truncated_svd_cuda_error_matches_cpu():
    A = decaying(4, 512, 384, 0.5)
    err_cpu = rel_error(A, *tm.truncated_svd(A, 32))
    err_gpu = rel_error(A.cuda(), *tm.truncated_svd(A.cuda(), 32)).cpu()
    optimal = rel_error(A, *ref.truncated_svd(A, 32))
    assert (err_gpu / optimal).max() <= 1.005
    torch.testing.assert_close(err_gpu, err_cpu, rtol=5e-3, atol=0)


def test_lowrank_merge_cuda_graph_replays_with_new_weights():
    base, U, S, V, w = factors((4,), 64, 48, RANKS[8], torch.bfloat16, "cuda")
    out = torch.empty_like(base)
    weights = w.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        tm.lowrank_merge_(out, base, U, S, V, RANKS[8], weights)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tm.lowrank_merge_(out, base, U, S, V, RANKS[8], weights)
    for seed in range(3):
        weights.copy_(torch.softmax(torch.randn(8, generator=torch.Generator().manual_seed(seed)), 0))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, ref.lowrank_merge(base, U, S, V, RANKS[8], weights))


def test_mix_linear_cuda_graph_replays_with_new_weights():
    x, W, b, U, S, V, ranks, rw = mix_args(8, (16,), 64, 48, RANKS[8], torch.bfloat16, "cuda")
    static_x, static_rw = x.clone(), rw.clone()
    tm.lowrank_mix_linear(static_x, W, b, U, S, V, ranks, static_rw)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = tm.lowrank_mix_linear(static_x, W, b, U, S, V, ranks, static_rw)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        static_x.copy_(torch.randn(x.shape, generator=g))
        static_rw.copy_(torch.softmax(torch.randn(rw.shape, generator=g), 1))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(static_y, ref.lowrank_mix_linear(static_x, W, b, U, S, V, ranks, static_rw))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_never_synchronize(no_sync, dtype):
    base, U, S, V, w = factors((3,), 40, 24, RANKS[8], dtype, "cuda")
    out = torch.empty_like(base)
    tm.lowrank_merge_(out, base, U, S, V, RANKS[8], w)
    tm.lowrank_merge_(base, base, U, S.float(), V, RANKS[8], w.double())
    tm.dense_merge_(out[0, 0], base[0, 0], U[:2, 0, :24].contiguous(), w[:2])
    tm.reconstruct_delta(U, S, V)
    args = mix_args(4, (5,), 24, 16, RANKS[8], dtype, "cuda")
    leaves = [a.requires_grad_() for a in args if isinstance(a, torch.Tensor)]
    tm.lowrank_mix_linear(*args).sum().backward()  # the backward, too: router training
    assert all(leaf.grad is not None for leaf in leaves)


@pytest.mark.parametrize("shape,rank", [((3, 40, 90), 30), ((2, 2, 90, 40), 35), ((2, 300, 200), 16),
                                        ((2, 2, 200, 300), 16)])
def test_truncated_svd_cuda_shapes(shape, rank):
    A = torch.randn(shape, dtype=torch.float64, device="cuda")
    U, S, V = tm.truncated_svd(A, rank)
    r = min(rank, *shape[-2:])
    assert U.shape == (*shape[:-1], r) and V.shape == (*shape[:-2], shape[-1], r)
    ratio = rel_error(A, U, S, V) / rel_error(A, *ref.truncated_svd(A, rank))
    assert ratio.max() <= 1.05, ratio  # Gaussian spectra are flat: the hardest case for sketches


def test_truncated_svd_ignores_tf32_and_refuses_non_finite_input():
    A = decaying(2, 512, 256, 1.0, device="cuda")
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        ratio = rel_error(A, *tm.truncated_svd(A, 16)) / rel_error(A, *ref.truncated_svd(A, 16))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert ratio.max() <= 1.005, ratio
    A[1, 3, 7] = float("nan")
    # The exact path checks before gesvd; the sketched one reads the flags with R, its one wait.
    for rank in (300, 16):
        with pytest.raises(RuntimeError, match=r"truncated_svd: A must have finite entries only .*"
                                               r"at leading index \[1\] \(batch index 1 of 2\)(?! and)"):
            tm.truncated_svd(A, rank)
    U, S, V = tm.truncated_svd(A[:1], 16)
    ratio = rel_error(A[:1], U, S, V) / rel_error(A[:1], *ref.truncated_svd(A[:1], 16))
    assert ratio.max() <= 1.005, ratio
    B = decaying(2, 300, 200, 1.0, dtype=torch.float64, device="cuda")
    B[0, 5, 5] = float("inf")
    with pytest.raises(RuntimeError, match=r"at leading index \[0\] \(batch index 0 of 2\)(?! and)"):
        tm.truncated_svd(B, 16)


def test_ops_reject_mixed_devices():
    base, U, S, V, w = factors((2,), 8, 6, [2, 3], torch.float32, "cuda")
    with pytest.raises(RuntimeError, match=r"weights must be on the device of out \(cuda:0\), got cpu"):
        tm.lowrank_merge_(torch.empty_like(base), base, U, S, V, [2, 3], w.cpu())
    with pytest.raises(RuntimeError, match="base must be on the device of out"):
        tm.lowrank_merge_(torch.empty_like(base), base.cpu(), U, S, V, [2, 3], w)
    x, W, b, U, S, V, ranks, rw = mix_args(3, (2,), 5, 4, RANKS[3], torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="row_weights must be on the device of x"):
        tm.lowrank_mix_linear(x, W, b, U, S, V, ranks, rw.cpu())
    with pytest.raises(RuntimeError, match="deltas must be on the device of out"):
        tm.dense_merge_(torch.empty(4, device="cuda"), torch.zeros(4, device="cuda"),
                        torch.zeros(2, 4), torch.rand(2, device="cuda"))
