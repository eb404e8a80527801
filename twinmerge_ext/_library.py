"""Loads the compiled operators (twinmerge_ext._C) into torch.ops.twinmerge."""

import ctypes
import os

import torch


def load():
    if torch.version.cuda is not None:
        # The CUDA ops take cuSOLVER handles from libtorch_cuda_linalg.so, which torch itself
        # loads only on first use of torch.linalg on a GPU. Load it (and cuSOLVER with it) first.
        linalg = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cuda_linalg.so")
        if os.path.exists(linalg):
            ctypes.CDLL(linalg, mode=ctypes.RTLD_GLOBAL)
    try:
        from twinmerge_ext import _C  # noqa: F401  (registers the operators)
    except ImportError as e:
        raise ImportError(
            "twinmerge_ext._C is not built or does not match this torch "
            f"({torch.__version__}): {e}. Build it with "
            "`pip install --no-build-isolation -e .` from the repository root."
        ) from e
    return torch.ops.twinmerge
