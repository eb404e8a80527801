"""Export of a TwinMergedModule for serving without Python: torch.export, then AOTInductor.

`export_twin` traces the wrapper in factored mode with the mixing weights as a graph input, so
one program serves every batch row with its own weights: y[b] = module_{θ(w[b])}(x[b]) with
θ(w) = θs + Σt w[t]·v̂t (METHOD.md §3). `compile_twin` compiles that program with AOTInductor
into a `.pt2` package, which Python loads with `torch._inductor.aoti_load_package` and C++ with
`torch::inductor::AOTIModelPackageLoader`.

The twinmerge operators stay operators in the package: AOTInductor has no C shim for them and
calls them by name through its proxy executor, i.e. through the dispatcher. A C++ process that
runs the package must have them registered: link TwinMerge::twinmerge (docs/export.md).
"""

import contextvars
import copy
import os
from numbers import Integral
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch._inductor
from torch import Tensor, nn

from twinmerge_ext._files import write_atomically
from twinmerge_ext.module import TwinMergedModule

__all__ = ["export_twin", "compile_twin"]

# graph_module.meta key under which export_twin leaves what compile_twin puts in the package.
_META = "twinmerge"
_NAN_MESSAGE = "TwinMergedModule (exported): mix_weights has NaN/Inf entries"


def _describe(v) -> str:
    return f"Tensor {v.dtype} {list(v.shape)}" if isinstance(v, Tensor) else repr(v)


def _size_bound(value, name: str, example: int, fn: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or value < max(example, 2):
        raise ValueError(f"{fn}: {name} must be None or an int >= {max(example, 2)} (the "
                         f"example's size, and at least 2), got {value!r}")
    return int(value)


def _bool(value, name: str, fn: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {value!r}")
    return value


class _ExportRoot(nn.Module):
    """What export_twin traces: forward(*inputs, mix_weights) -> the wrapper's output (or one
    field of it), with the inputs passed to the wrapper by name."""

    def __init__(self, wrapped: TwinMergedModule, names: Tuple[str, ...],
                 module_kwargs: Dict[str, Any], output: Union[None, str, int],
                 check_finite: bool):
        super().__init__()
        self.wrapped = wrapped
        self.names = names
        self.module_kwargs = module_kwargs
        self.output = output
        self.check_finite = check_finite

    def forward(self, *tensors: Tensor):
        *inputs, mix_weights = tensors
        if self.check_finite:
            # In the graph (the wrapper's check reads the values on the host, which a trace
            # cannot): the package raises this message on CPU.
            torch._assert_async(torch.isfinite(mix_weights).all(), _NAN_MESSAGE)
        out = self.wrapped(**dict(zip(self.names, inputs)), mix_weights=mix_weights,
                           **self.module_kwargs)
        if self.output is None:
            return out
        try:
            return out[self.output] if isinstance(self.output, int) or \
                isinstance(out, Mapping) else getattr(out, self.output)
        except (KeyError, IndexError, AttributeError, TypeError) as e:
            have = list(out.keys()) if isinstance(out, Mapping) else type(out).__name__
            raise ValueError(f"export_twin: output {self.output!r} is not in the module's "
                             f"output ({have})") from e


def export_twin(wrapped: TwinMergedModule, inputs: Mapping[str, Tensor], mix_weights: Tensor, *,
                module_kwargs: Optional[Mapping[str, Any]] = None,
                output: Union[None, str, int] = "logits", dynamic_batch: bool = True,
                dynamic_length: bool = True, max_batch: Optional[int] = None,
                max_length: Optional[int] = None,
                check_finite: Optional[bool] = None) -> torch.export.ExportedProgram:
    """Exports a wrapper as one program of its inputs and per-row mixing weights.

    Semantics: program(*inputs.values(), mix_weights)[b] = wrapped(**inputs,
        mix_weights=mix_weights, **module_kwargs)[output][b] = module_{θ(w[b])}(x[b])[output],
    computed in factored mode whatever wrapped.mode is (the other modes choose sub-batches from
    the weights' values, which a traced program cannot; factored is exact per row, so it equals
    'materialize' and 'auto' within rounding, and is what 'group' approximates).

    Shape:
        inputs: name -> tensor [B, ...] (e.g. input_ids [B, L], attention_mask [B, L]), passed
            to the wrapper by keyword, in this order the program's leading inputs
        mix_weights: [B, T] floating, the program's last input
        returns: the module's output, or its field `output` (default "logits"; None: all of it)

    Dynamic sizes: B (dimension 0 of every input and of mix_weights) when dynamic_batch, in
    [1, max_batch]; L (dimension 1 of every input of 2 or more dimensions) when dynamic_length,
    in [1, max_length]. None is unbounded; bound L by what the model supports (its position
    table). An example size must be at least 2 to be dynamic (torch.export specializes 0 and 1).
    A model with a layer mixed by the per-row fallback (a loop over the rows: e.g. a norm that
    is not weight ⊙ f(x)) fixes B: export it with dynamic_batch=False.

    check_finite (default: wrapped.check_finite): the program asserts that mix_weights is
    finite. On CPU a NaN/Inf raises "TwinMergedModule (exported): mix_weights has NaN/Inf
    entries"; on CUDA it is a device-side assert, which ends the CUDA context.

    The wrapper is not changed: export traces a shallow copy (its own mode and check_finite),
    isolates the call's last_call, and holds off the wrapper's other calls meanwhile (export
    swaps fake tensors into the module while it traces).

    Errors: TypeError/ValueError naming the argument and its value (not a TwinMergedModule, an
    unwrapped wrapper or one with calls in flight, inputs not a non-empty name -> tensor mapping,
    mix_weights not floating [B, T] with B the inputs' batch, an example size < 2 for a dynamic
    dimension, inputs disagreeing on L, a bad bound, flag, output or module_kwargs), raised before
    anything is traced; torch.export's own errors pass through.
    """
    fn = "export_twin"
    if not isinstance(wrapped, TwinMergedModule):
        raise TypeError(f"{fn}: wrapped must be a TwinMergedModule, got {type(wrapped).__name__}")
    if not isinstance(inputs, Mapping) or not inputs:
        raise TypeError(f"{fn}: inputs must be a non-empty mapping of name -> Tensor, got "
                        f"{inputs!r}")
    for name, t in inputs.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{fn}: inputs keys must be argument names, got {name!r}")
        if name in ("mix_weights", "head_tasks"):
            raise ValueError(f"{fn}: inputs must not hold {name!r} (mix_weights is its own "
                             f"argument; head_tasks follow the argmax of the weights)")
        if not isinstance(t, Tensor) or t.dim() == 0:
            raise TypeError(f"{fn}: inputs[{name!r}] must be a Tensor [B, ...], got "
                            f"{_describe(t)}")
    T = len(wrapped.tasks)
    batch = {name: t.shape[0] for name, t in inputs.items()}
    B = next(iter(batch.values()))
    if len(set(batch.values())) != 1:
        raise ValueError(f"{fn}: inputs must share the batch size (dimension 0), got {batch}")
    if not isinstance(mix_weights, Tensor) or not mix_weights.is_floating_point() or \
            tuple(mix_weights.shape) != (B, T):
        raise ValueError(f"{fn}: mix_weights must be a floating tensor [B={B}, T={T}], got "
                         f"{_describe(mix_weights)}")
    module_kwargs = dict(module_kwargs or {})
    if not all(isinstance(k, str) for k in module_kwargs):
        raise TypeError(f"{fn}: module_kwargs must be a mapping of str -> value, got "
                        f"{list(module_kwargs)}")
    clash = sorted(set(module_kwargs) & (set(inputs) | {"mix_weights", "head_tasks"}))
    if clash:
        raise ValueError(f"{fn}: module_kwargs must not repeat an input or mix_weights/"
                         f"head_tasks, got {clash}")
    if output is not None and (isinstance(output, bool) or not isinstance(output, (str, Integral))):
        raise TypeError(f"{fn}: output must be None, a str (field) or an int (index), got "
                        f"{output!r}")
    dynamic_batch = _bool(dynamic_batch, "dynamic_batch", fn)
    dynamic_length = _bool(dynamic_length, "dynamic_length", fn)
    check_finite = wrapped.check_finite if check_finite is None else \
        _bool(check_finite, "check_finite", fn)
    lengths = {name: t.shape[1] for name, t in inputs.items() if t.dim() >= 2}
    if dynamic_batch and B < 2:
        raise ValueError(f"{fn}: a dynamic batch needs an example of at least 2 rows "
                         f"(torch.export specializes sizes 0 and 1), got B={B}; pass "
                         f"dynamic_batch=False for a program of exactly this batch size")
    if dynamic_length:
        if not lengths:
            raise ValueError(f"{fn}: dynamic_length needs an input of 2 or more dimensions; "
                             f"pass dynamic_length=False")
        if len(set(lengths.values())) != 1 or min(lengths.values()) < 2:
            raise ValueError(f"{fn}: a dynamic length needs every input of 2 or more "
                             f"dimensions to share dimension 1, of at least 2, got {lengths}; "
                             f"pass dynamic_length=False")
    max_batch = _size_bound(max_batch, "max_batch", B, fn)
    max_length = _size_bound(max_length, "max_length", max(lengths.values(), default=0), fn)

    batch_dim = torch.export.Dim("batch", min=1, max=max_batch) if dynamic_batch else None
    length_dim = torch.export.Dim("length", min=1, max=max_length) if dynamic_length else None

    def spec(t: Tensor) -> Dict[int, Any]:
        dims = {0: batch_dim} if batch_dim is not None else {}
        if length_dim is not None and t.dim() >= 2:
            dims[1] = length_dim
        return dims

    names = tuple(inputs)
    shapes = tuple(spec(t) for t in inputs.values()) + \
        ({0: batch_dim} if batch_dim is not None else {},)
    args = tuple(inputs.values()) + (mix_weights,)
    # A shallow copy: its own mode and flag, the module, tensors and per-thread state shared.
    traced = copy.copy(wrapped)
    traced.mode, traced.check_finite = "factored", False
    root = _ExportRoot(traced, names, module_kwargs, output, check_finite)
    wrapped._calls._refuse_closed(fn)
    with wrapped._calls.idle(fn):
        # The call records its last_call (fake tensors) in a context of its own.
        program = contextvars.copy_context().run(
            torch.export.export, root, args, dynamic_shapes={"tensors": shapes})
    program.graph_module.meta[_META] = {
        "twinmerge.inputs": ",".join(names + ("mix_weights",)),
        "twinmerge.tasks": ",".join(wrapped.tasks),
        "twinmerge.output": "" if output is None else str(output),
        "twinmerge.dynamic": ",".join(d for d, on in (("batch", dynamic_batch),
                                                      ("length", dynamic_length)) if on),
        "twinmerge.check_finite": str(check_finite).lower(),
    }
    return program


def compile_twin(program: torch.export.ExportedProgram, package_path: Union[str, os.PathLike], *,
                 inductor_configs: Optional[Mapping[str, Any]] = None) -> str:
    """Compiles an exported program with AOTInductor into a .pt2 package, written atomically.

    Semantics: package_path := torch._inductor.aoti_compile_and_package(program); readers see the
    old file or the complete new one, never a part. The package's metadata holds what
    export_twin recorded ("twinmerge.inputs": the input names in call order, "twinmerge.tasks",
    "twinmerge.output", "twinmerge.dynamic", "twinmerge.check_finite"), readable with
    AOTIModelPackageLoader::get_metadata() in C++.

    Shape: the program's (export_twin: *inputs, mix_weights [B, T] -> output).
    Returns: the package's absolute path.
    Errors: TypeError/ValueError naming the argument and its value (not an ExportedProgram, a
    path not ending in .pt2, inductor_configs not a str-keyed mapping or setting
    "aot_inductor.package"), raised before compiling; OSError "compile_twin: <path>: <problem>"
    for a directory that is missing or not writable; the compiler's errors pass through.
    """
    fn = "compile_twin"
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"{fn}: program must be a torch.export.ExportedProgram (from "
                        f"export_twin), got {type(program).__name__}")
    if not isinstance(package_path, (str, os.PathLike)):
        raise TypeError(f"{fn}: package_path must be a str or os.PathLike, got "
                        f"{type(package_path).__name__}")
    path = os.path.abspath(os.fspath(package_path))
    if not path.endswith(".pt2") or os.path.basename(path) == ".pt2":
        raise ValueError(f"{fn}: package_path must name a file ending in .pt2, got "
                         f"{os.fspath(package_path)!r}")
    if inductor_configs is not None and (not isinstance(inductor_configs, Mapping) or
                                         not all(isinstance(k, str) for k in inductor_configs)):
        raise TypeError(f"{fn}: inductor_configs must be None or a mapping of str -> value, got "
                        f"{inductor_configs!r}")
    configs = dict(inductor_configs or {})
    if "aot_inductor.package" in configs:
        raise ValueError(f"{fn}: inductor_configs must not set 'aot_inductor.package' (the "
                         f"package is always written), got {configs['aot_inductor.package']!r}")
    user_meta = configs.get("aot_inductor.metadata", {})
    if not isinstance(user_meta, Mapping):
        raise TypeError(f"{fn}: inductor_configs['aot_inductor.metadata'] must be a mapping of "
                        f"str -> str, got {user_meta!r}")
    configs["aot_inductor.metadata"] = {**program.graph_module.meta.get(_META, {}), **user_meta}

    def write(tmp: str) -> None:
        torch._inductor.aoti_compile_and_package(program, package_path=tmp,
                                                 inductor_configs=configs)

    write_atomically(path, write, fn)
    return path
