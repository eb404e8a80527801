"""PEFT LoRA adapters as Twin-Merging experts.

An adapter trained on a base model is the expert θt = θ0 + scale·B A on each of its target
weights (plus whatever full tensors it saved: `modules_to_save`, trained biases). Its task vector
is the PRODUCT scale·B A. The authors' code merged A and B separately, which is not the sum of
the deltas (Σ wt Bt · Σ wt At has cross terms Bi·Aj, METHOD.md §2); here every merge sees the
product, one tensor at a time, so an adapter never costs more memory than one dense matrix.

`LoraExpert(path)` reads an adapter directory written by PEFT's `save_pretrained` through peft
itself (its config, weights and pattern rules). Pass it to `TwinCheckpoint.build` as an expert,
or `lora.bind(base)` to the functions of `merging`.
"""

import math
import os
from contextlib import ExitStack
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from twinmerge_ext import merging

__all__ = ["LoraExpert"]

_PREFIX = "base_model.model."


class LoraExpert:
    """A PEFT LoRA adapter directory, used as the expert θ0 + scale·B A.

    Semantics: for a target weight W (Linear: [out, in]), θt[W] = θ0[W] + scale·B A with
    A = lora_A [r, in], B = lora_B [out, r], scale = lora_alpha / r (/ sqrt(r) with rsLoRA, the
    alpha and rank patterns applied per module as PEFT does); transposed for fan_in_fan_out
    (transformers' Conv1D) and for embeddings (lora_embedding_A [r, num], lora_embedding_B
    [dim, r]). Tensors the adapter saved in full (modules_to_save, biases) replace the base's;
    everything else is the base's.

    Args:
        path: a directory holding adapter_config.json and the adapter weights.
        prefix: the prefix PEFT puts before the base model's names ("base_model.model.").

    Raises:
        ImportError: peft is not installed.
        ValueError: not an adapter directory, not a LoRA adapter, a DoRA adapter (its magnitude
            vector is not a low-rank delta), an A without its B, or rank disagreeing with the
            config.
    """

    def __init__(self, path: Union[str, os.PathLike], prefix: str = _PREFIX):
        fn = "LoraExpert"
        try:
            from peft import PeftConfig
            from peft.utils import load_peft_weights
            from peft.utils.other import get_pattern_key
        except ImportError as e:
            raise ImportError(f"{fn}: reading LoRA adapters needs peft (pip install peft)") from e
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"{fn}: path must be an adapter directory, got {type(path).__name__}")
        path = os.fspath(path)
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ValueError(f"{fn}: {path!r} is not a PEFT adapter directory (no "
                             f"adapter_config.json)")
        config = PeftConfig.from_pretrained(path)
        if str(getattr(config, "peft_type", "")).split(".")[-1] != "LORA":
            raise ValueError(f"{fn}: {path!r} holds a {config.peft_type} adapter, not LoRA")
        if getattr(config, "use_dora", False):
            raise ValueError(f"{fn}: {path!r} is a DoRA adapter; its magnitude vector rescales "
                             f"whole columns, which is not a low-rank delta")
        self.path = path
        self.config = config
        weights = load_peft_weights(path, device="cpu")

        pairs: Dict[str, Dict[str, Tensor]] = {}
        self.full: Dict[str, Tensor] = {}
        for key, value in weights.items():
            name = key[len(prefix):] if key.startswith(prefix) else key
            if "lora_magnitude_vector" in name:
                raise ValueError(f"{fn}: {path!r} has a DoRA magnitude vector {key!r}")
            for tag, kind in ((".lora_A.weight", "A"), (".lora_B.weight", "B"),
                              (".lora_embedding_A", "eA"), (".lora_embedding_B", "eB")):
                if name.endswith(tag):
                    pairs.setdefault(name[:-len(tag)], {})[kind] = value
                    break
            else:
                self.full[name] = value
        # target weight name -> (B, A, scale, transpose)
        self.targets: Dict[str, Tuple[Tensor, Tensor, float, bool]] = {}
        for module, ab in pairs.items():
            embedding = "eA" in ab or "eB" in ab
            A, B = (ab.get("eA"), ab.get("eB")) if embedding else (ab.get("A"), ab.get("B"))
            if A is None or B is None:
                raise ValueError(f"{fn}: {path!r}: module {module!r} has only one of its LoRA "
                                 f"factors A and B")
            r = A.shape[0]
            want_r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module),
                                             config.r)
            if r != want_r or B.shape[1] != r:
                raise ValueError(f"{fn}: {path!r}: module {module!r} has factors A "
                                 f"{list(A.shape)}, B {list(B.shape)}, but the config says rank "
                                 f"{want_r}")
            alpha = config.alpha_pattern.get(
                get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
            scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
            transpose = embedding or bool(config.fan_in_fan_out)
            self.targets[f"{module}.weight"] = (B, A, scale, transpose)

    def __repr__(self) -> str:
        return (f"LoraExpert({self.path!r}, targets={len(self.targets)}, "
                f"full={len(self.full)})")

    def rank(self, name: str) -> Optional[int]:
        """The rank of this expert's delta on `name`: r for a LoRA target, 0 for an untouched
        tensor, None for a tensor saved in full (any rank)."""
        if name in self.targets:
            return self.targets[name][1].shape[0]
        return None if name in self.full else 0

    def delta(self, name: str) -> Tensor:
        """scale·B A for a target weight, in its layout, float32 (float64 factors stay float64)."""
        B, A, scale, transpose = self.targets[name]
        f = torch.float64 if A.dtype == torch.float64 else torch.float32
        d = scale * (B.to(f) @ A.to(f))
        return d.T if transpose else d

    def bind(self, base: merging.StateSource) -> "_BoundLora":
        """This adapter applied to `base` (a state dict or .safetensors path): a state source."""
        return _BoundLora(self, base)


class _BoundLora(merging._Derived):
    def __init__(self, lora: LoraExpert, base: merging.StateSource):
        self.lora, self.base = lora, base

    def open(self, fn: str, label: str, stack: ExitStack) -> "_LoraReader":
        return _LoraReader(self.lora, merging._Source(self.base, f"{label} (its base)", fn, stack),
                           label, fn)

    def file_of(self, name: str) -> Optional[str]:
        base = merging._file_of(self.base, name)
        if name not in self.lora.targets and name not in self.lora.full:
            return base
        return f"{self.lora.path}" + (f" on {base}" if base else "")


class _LoraReader:
    def __init__(self, lora: LoraExpert, base: "merging._Source", label: str, fn: str):
        self.lora, self.base = lora, base
        keys = set(base.keys())
        unknown = [k for k in list(lora.targets) + list(lora.full) if k not in keys]
        if unknown:
            raise ValueError(f"{fn}: {label}: the adapter {lora.path!r} has tensor {unknown[0]!r} "
                             f"that the base does not have; was it trained on this base (names "
                             f"after {_PREFIX!r} must be the base's)?")
        for name in lora.targets:
            shape, _ = base.meta(name)
            if tuple(lora.delta(name).shape) != tuple(shape):
                raise ValueError(f"{fn}: {label}: the adapter's delta for {name!r} has shape "
                                 f"{list(lora.delta(name).shape)}, the base's tensor "
                                 f"{list(shape)}")

    def keys(self):
        return self.base.keys()

    def meta(self, name: str):
        if name in self.lora.full:
            t = self.lora.full[name]
            return tuple(t.shape), t.dtype
        return self.base.meta(name)

    def get(self, name: str) -> Tensor:
        if name in self.lora.full:
            return self.lora.full[name]
        b = self.base.get(name)
        if name not in self.lora.targets:
            return b
        return (b.to(torch.float64 if b.dtype == torch.float64 else torch.float32)
                + self.lora.delta(name).to(b.device)).to(b.dtype)

    def rank(self, name: str) -> Optional[int]:
        return self.lora.rank(name)
