import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]),
]

# Relative tolerances per storage dtype (accumulation is fp32, fp64 for fp64).
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def assert_close(actual, expected, dtype=None):
    """Compares against a float64 reference, relative to the reference's magnitude."""
    dtype = dtype or actual.dtype
    expected = expected.to(torch.float64).cpu()
    actual = actual.to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=RTOL[dtype], atol=RTOL[dtype] * max(scale, 1.0))


@pytest.fixture(scope="session")
def lm_twins():
    """{"gpt2" | "llama": (make, twin)}: tiny causal LMs from configs (test_module's) and the
    twin of 3 experts perturbed from one base, at full rank."""
    from twinmerge_ext import TwinCheckpoint
    from test_module import _experts, _gpt2, _llama
    out = {}
    for i, (name, make) in enumerate((("gpt2", _gpt2), ("llama", _llama))):
        _, base_sd, experts = _experts(lambda *_, make=make: make(), 3, 10 + i)
        out[name] = (make, TwinCheckpoint.build(base_sd, experts, rank_ratio=1.0))
    return out
