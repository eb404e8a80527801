"""The main job's evaluation cache: its deterministic results stored under the cache directory,
keyed by everything they depend on, the code included, so a rerun recomputes only what changed."""

import functools
import hashlib
import json
import os
import platform
from typing import Callable, Dict

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import twinmerge_ext
from twinmerge_ext._files import write_atomically


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def tensor_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{list(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """twinmerge_ext's code (every file of the package, the compiled extension included), the
    versions of torch, transformers, numpy and scikit-learn (KMeans), the thread count and the
    machine: what every cached result also depends on."""
    import sklearn
    import transformers
    h = hashlib.sha256(json.dumps([torch.__version__, transformers.__version__, np.__version__,
                                   sklearn.__version__, torch.get_num_threads(),
                                   platform.machine()]).encode())
    root = os.path.dirname(twinmerge_ext.__file__)
    for d, _, files in sorted(os.walk(root)):
        if "__pycache__" in d:
            continue
        for f in sorted(files):
            if f.endswith((".py", ".so", ".pyd")):
                h.update(f.encode())
                with open(os.path.join(d, f), "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()[:16]


class EvalCache:
    """The run's deterministic results (scores, router features, weights), stored under
    `directory` keyed by everything they depend on: the code (`code_digest`), the experts, the
    data and the hyper-parameters. A rerun recomputes only what changed; timings are never
    cached. Disabled, it computes everything and overwrites what it stored."""

    def __init__(self, directory: str, enabled: bool = True):
        self.dir, self.enabled = directory, enabled
        self.hits = self.misses = 0

    def _path(self, kind: str, parts, ext: str) -> str:
        return os.path.join(self.dir, f"{kind}-{_digest(code_digest(), kind, parts)}.{ext}")

    def _get(self, path: str, read, compute, write):
        if self.enabled and os.path.isfile(path):
            try:
                value = read(path)
                self.hits += 1
                return value
            except Exception:  # a damaged entry is recomputed and replaced
                pass
        self.misses += 1
        value = compute()
        os.makedirs(self.dir, exist_ok=True)
        write_atomically(path, lambda tmp: write(value, tmp), "twinmerge-demo")
        return value

    def json(self, kind: str, parts, compute: Callable[[], object]):
        def write(value, tmp):
            with open(tmp, "w") as f:
                json.dump(value, f)

        def read(path):
            with open(path) as f:
                return json.load(f)
        return self._get(self._path(kind, parts, "json"), read, compute, write)

    def tensors(self, kind: str, parts,
                compute: Callable[[], Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        return self._get(self._path(kind, parts, "safetensors"), load_file, compute,
                         lambda value, tmp: save_file(
                             {k: v.contiguous() for k, v in value.items()}, tmp))
