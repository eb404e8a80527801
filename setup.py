"""Builds twinmerge_ext._C, the twinmerge operators, against the installed torch.

Switches (environment variables):
  FORCE_CUDA=1            compile the CUDA sources, and fail if that is impossible
  FORCE_ONLY_CPU=1        compile the CPU sources only, even where CUDA is available
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0": A100 and H100/H200)
  CUDA_HOME               CUDA toolkit (default /usr/local/cuda when it holds nvcc)

Build with the installed torch, not an isolated one: `pip install --no-build-isolation -e .`
"""

import glob
import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent

# torch resolves CUDA_HOME when torch.utils.cpp_extension is imported, from `which nvcc`; where
# nvcc on the PATH is a wrapper script (e.g. /usr/local/bin/nvcc) that guess is wrong.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def _flag(name):
    return os.environ.get(name, "0") == "1"


def _with_cuda():
    if _flag("FORCE_CUDA") and _flag("FORCE_ONLY_CPU"):
        raise SystemExit("setup.py: FORCE_CUDA=1 and FORCE_ONLY_CPU=1 contradict each other")
    if _flag("FORCE_ONLY_CPU"):
        return False
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if _flag("FORCE_CUDA") and not available:
        raise SystemExit(
            f"setup.py: FORCE_CUDA=1, but torch {torch.__version__} has CUDA "
            f"{torch.version.cuda} and CUDA_HOME is {CUDA_HOME}; install a CUDA build of torch "
            "and set CUDA_HOME to the toolkit that holds bin/nvcc"
        )
    return available


def _cuda_lib_dirs():
    """Directories that may hold cuBLAS, cuBLASLt and cuSOLVER: torch's nvidia-* wheels first
    (the libraries torch itself loads at run time), then the toolkit's."""
    dirs = []
    spec = importlib.util.find_spec("nvidia")
    for root in spec.submodule_search_locations if spec else []:
        dirs += sorted(glob.glob(os.path.join(root, "*", "lib")))
    dirs += [os.path.join(CUDA_HOME, "lib64"), os.path.join(CUDA_HOME, "lib")]
    return [d for d in dirs if os.path.isdir(d)]


def _cuda_link(libraries):
    """(include_dirs, link_args) that link `libraries` from the toolkit or the pip wheels.

    The wheels ship only versioned files (libcusolver.so.12), so link the exact file name
    (-l:NAME) and record its folder as an rpath.
    """
    include_dirs, link_args = [], []
    lib_dirs = _cuda_lib_dirs()
    for lib in libraries:
        for d in lib_dirs:
            found = sorted(glob.glob(os.path.join(d, f"lib{lib}.so*")), key=len)
            if found:
                link_args += [f"-L{d}", f"-l:{os.path.basename(found[0])}", f"-Wl,-rpath,{d}"]
                include = os.path.join(os.path.dirname(d), "include")
                if os.path.isdir(include) and include not in include_dirs:
                    include_dirs.append(include)
                break
        else:
            raise SystemExit(f"setup.py: lib{lib}.so not found in any of {lib_dirs}")
    return include_dirs, link_args


def _sources(*patterns):
    # setuptools wants source paths relative to the project root.
    return sorted(str(p.relative_to(ROOT)) for pattern in patterns for p in ROOT.glob(pattern))


def extensions():
    common = _sources("csrc/ops.cpp", "csrc/checks.cpp", "csrc/unsupported.cpp", "csrc/python_module.cpp",
                      "csrc/cpu/*.cpp", "csrc/autograd/*.cpp")
    extra = {"cxx": ["-O3"]}
    if not _with_cuda():
        print("setup.py: building twinmerge_ext._C for CPU only")
        sources = common + _sources("csrc/no_cuda.cpp")
        return [CppExtension("twinmerge_ext._C", sources, extra_compile_args=extra)]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    print(f"setup.py: building twinmerge_ext._C with CUDA for {os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources = common + _sources("csrc/cuda/*.cpp", "csrc/cuda/*.cu")
    include_dirs, link_args = _cuda_link(["cublas", "cublasLt", "cusolver"])
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    # getCurrentCUDASolverDnHandle lives in libtorch_cuda_linalg.so, which torch loads lazily.
    link_args += [f"-L{torch_lib}", "-ltorch_cuda_linalg", f"-Wl,-rpath,{torch_lib}"]
    extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return [
        CUDAExtension(
            "twinmerge_ext._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args=extra,
            extra_link_args=link_args,
        )
    ]


setup(
    packages=find_packages(include=["twinmerge_ext", "twinmerge_ext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
)
