"""Tensor-parallel serving: twin layers of a model parallelized by torch (`parallelize_module`
with `ColwiseParallel` / `RowwiseParallel` on a 1-D device mesh), served on each rank's shards.

A parallelized layer's tensors are DTensors; torch's parallel style turns its input into a
DTensor of the placement the style wants before the forward (Replicate for column-parallel,
Shard(-1) for row-parallel) and redistributes the output after it. A twin layer keeps those
hooks: inside the forward it computes on the local shards with the same kernels as the
single-process layer, and returns a DTensor of the placement the plain layer's DTensor ops would
have produced, so the style's output hook runs the same collective as for the plain model.

The twin's tensors are sharded like the tensor they mix (W ≈ θs + U_cat diag(s(w)) V_catᵀ, U_cat
along W's dimension 0, V_cat along dimension 1; the scheme of multi-LoRA engines, vLLM, S-LoRA):

    W Shard(0)  column-parallel Linear, vocab-parallel Embedding: U_cat rows sharded, V_cat whole
    W Shard(1)  row-parallel Linear, column-parallel Embedding:   V_cat rows sharded, U_cat whole
    dense deltas [T, *shape] sharded as the tensor is (dimension d + 1); S_cat and w everywhere.

Column-parallel: y_r = x W_rᵀ + b_r + ((x V_cat) ⊙ s(w)) U_rᵀ, the rank's columns of y, exact,
no communication. Row-parallel: x_r W_rᵀ + ((x_r V_r) ⊙ s(w)) U_catᵀ is a partial sum, returned
as Partial and summed by the style's one all-reduce with the base layer's (the bias is added on
the first rank of the mesh only). Vocab-parallel embedding: each rank gathers the rows of its
vocabulary range (θs and U_cat alike), zero elsewhere, summed by the style's all-reduce.

Why local shards rather than DTensor sharding rules (`register_sharding`) for the ops. Our ops
have no DTensor strategy, so a DTensor cannot enter them as is; one could be registered, but the
parallel style already fixes the layer's input and output placements, and within them there is
one local computation (above). A registered rule would have to encode exactly that (one
strategy per op and layout) and still leave the row-parallel bias and the vocabulary mask to
the layer. So the layers unwrap the style's DTensor input, run the single-process code on local
tensors (`lowrank_mix_linear`, `F.linear`, `F.embedding`, the per-row bias mix) and wrap the
result with the placement and global shape the plain layer's DTensor op would give
(`DTensor.from_local(..., run_check=False)`); `lowrank_merge_` and `dense_merge_` merge each
rank's local slices (materialize mode), with no communication. What this gives up: only 1-D
meshes and torch's Colwise/Rowwise styles (no SequenceParallel, no 2-D meshes), and the global
shapes are computed here (`compute_local_shape_and_global_offset`, torch's own offsets).
"""

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # a torch built without distributed support: nothing can be a DTensor
    DTensor = None


def own(module: nn.Module, name: str):
    """The module's own tensor `name` (None if it has none), never a served override."""
    try:
        return nn.Module.__getattr__(module, name)
    except AttributeError:
        return None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """This rank's shard of a DTensor (its storage: writes go to the DTensor), else t."""
    return t.to_local() if is_dtensor(t) else t


def shard_dim(p: Tensor, what: str, fn: str = "TwinMergedModule") -> Optional[int]:
    """The dimension a DTensor on a 1-D mesh is sharded along (None: replicated). `what` names
    the tensor, `fn` the function, in errors."""
    mesh, placements = p.device_mesh, p.placements
    if mesh.ndim != 1 or len(placements) != 1:
        raise ValueError(f"{fn}: {what} is a DTensor on a {mesh.ndim}-D device mesh "
                         f"{tuple(mesh.shape)} with placements {placements}; tensor-parallel "
                         f"serving takes a 1-D mesh (the tensor-parallel one)")
    pl = placements[0]
    if isinstance(pl, Replicate):
        return None
    if isinstance(pl, Shard):
        return pl.dim % p.dim()
    raise ValueError(f"{fn}: {what} is a DTensor with placement {pl}; served tensors must "
                     f"be sharded (Shard) or replicated")


def offset(p: Tensor, dim: int) -> Tuple[int, int]:
    """(start, length) of this rank's shard of DTensor p along `dim`."""
    shape, offsets = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offsets[dim], shape[dim]


def slice_like(full: Tensor, p: Tensor, p_dim: int, dim: int) -> Tensor:
    """The part of `full` (along its dimension `dim`) that this rank's shard of p covers along
    p's dimension p_dim (a view)."""
    start, n = offset(p, p_dim)
    return full.narrow(dim, start, n)


def _twin_dim(p: Tensor, kind: str, what: str, fn: str = "TwinMergedModule") -> Optional[int]:
    """The dimension along which a twin tensor of kind "shared" (θs), "U" / "V" (factors of a
    low-rank matrix), "S" or "dense" ([T, *p.shape]) is sharded when it mixes into DTensor p;
    None: every rank holds it whole."""
    d = shard_dim(p, what, fn)
    if d is None or kind == "S":
        return None
    if kind == "shared":
        return d
    if kind == "dense":
        return d + 1
    if p.dim() != 2:
        raise ValueError(f"{fn}: {what} is a sharded {p.dim()}-D DTensor; low-rank "
                         f"tensors are served sharded only as matrices")
    return 0 if (kind == "U") == (d == 0) else None


def shard_twin_tensor(t: Tensor, p: Tensor, kind: str, what: str, copy: bool = True) -> Tensor:
    """This rank's part of a twin tensor of `kind` (`_twin_dim`) mixing into p: sliced from a
    whole tensor, or the local shard of one loaded sharded (`TwinCheckpoint.load(like=)`),
    which must be placed as p's sharding implies. A plain p keeps a plain t whole."""
    if not is_dtensor(p):
        if is_dtensor(t):
            raise ValueError(f"TwinMergedModule: twin tensor {what!r} is sharded (DTensor) but the "
                             f"module's tensor it mixes into is a plain tensor")
        return t
    dim = _twin_dim(p, kind, what)
    if is_dtensor(t):
        want = Replicate() if dim is None else Shard(dim)
        if t.device_mesh != p.device_mesh or tuple(t.placements) != (want,):
            raise ValueError(f"TwinMergedModule: twin tensor {what!r} is sharded as "
                             f"{tuple(t.placements)} on mesh {t.device_mesh}, but the module's "
                             f"tensor {tuple(p.placements)} on {p.device_mesh} needs {want}; "
                             f"load the twin with like= the module as it is parallelized")
        return t.to_local()
    if dim is None:
        return t
    part = slice_like(t, p, _twin_dim(p, "shared", what), dim)
    # A copy: a view would keep the whole tensor alive on every rank.
    return part.clone(memory_format=torch.contiguous_format) if copy else part


def check_twin(module: nn.Module, twin) -> None:
    """Raises ValueError if a twin tensor cannot be served on this rank of the module (a sharded
    twin tensor placed otherwise than the module's tensor implies, or mixing into a plain one)."""
    own = module.state_dict(keep_vars=True)
    for name, t in twin.shared.items():
        shard_twin_tensor(t, own[name], "shared", name)
    for name, lr in twin.lowrank.items():
        for kind, t in zip("USV", (lr.U_cat, lr.S_cat, lr.V_cat)):
            shard_twin_tensor(t, own[name], kind, name)
    for name, d in twin.dense.items():
        shard_twin_tensor(d, own[name], "dense", name)
    for name in next(iter(twin.heads.values()), {}):
        if is_dtensor(own.get(name)):
            raise ValueError(f"TwinMergedModule: task head tensor {name!r} is a DTensor; task "
                             f"heads are served replicated: leave the head out of the "
                             f"tensor-parallel plan")


def file_parts(module: nn.Module, fn: str) -> dict:
    """{key of the twin file: (the module's DTensor p, kind)} for the tensors a rank of this
    tensor-parallel module holds in part (`_twin_dim`). Raises ValueError if it has none."""
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    out = {}
    for name, p in tensors.items():
        if not is_dtensor(p) or shard_dim(p, f"module tensor {name!r}", fn) is None:
            continue
        out[f"shared/{name}"] = (p, "shared")
        out[f"dense/{name}/deltas"] = (p, "dense")
        if p.dim() == 2:
            for factor in "UV":
                if _twin_dim(p, factor, name, fn) is not None:
                    out[f"lowrank/{name}/{factor}_cat"] = (p, factor)
    if not out:
        raise ValueError(f"{fn}: like= {type(module).__name__} has no sharded DTensor tensor: "
                         f"pass the module parallelized by parallelize_module (the module itself, "
                         f"before wrapping: a TwinMergedModule's names carry a 'module.' prefix)")
    return out


def read_part(p: Tensor, kind: str, key: str, shape: Sequence[int]) -> Tuple[int, int, int]:
    """(dimension, start, length) of a twin file tensor of this shape that this rank reads;
    ValueError (its message without the function) if the shape does not fit p."""
    dim = _twin_dim(p, kind, key)
    want = p.shape[_twin_dim(p, "shared", key)]
    if len(shape) <= dim or shape[dim] != want:
        raise ValueError(f"twin tensor {key!r} has shape {list(shape)}, which does not fit the "
                         f"module's tensor of shape {list(p.shape)}")
    start, n = offset(p, _twin_dim(p, "shared", key))
    return dim, start, n


def sharded(t: Tensor, p: Tensor, kind: str, shape: Sequence[int]) -> Tensor:
    """A rank's part t of a twin tensor of global `shape`, as a DTensor on p's mesh."""
    return DTensor.from_local(t, p.device_mesh, [Shard(_twin_dim(p, kind, "tensor"))],
                              run_check=False, shape=torch.Size(shape), stride=_contiguous(shape))


def local_part(full: Tensor, p: Tensor, what: str) -> Tensor:
    """The part of `full` (θs's tensor shaped like p) that this rank's shard of p holds."""
    return shard_twin_tensor(full, p, "shared", what, copy=False)


def like(t: Tensor, p: Tensor) -> Tensor:
    """t (a local shard shaped like p's) as a DTensor placed like p; t itself if p is local."""
    if not is_dtensor(p):
        return t
    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride())


def first_rank(p: Tensor) -> bool:
    return p.device_mesh.get_local_rank() == 0


def _contiguous(shape: Sequence[int]) -> Tuple[int, ...]:
    stride = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        stride[i] = stride[i + 1] * shape[i + 1]
    return tuple(stride)


def _out(y: Tensor, mesh, placement, global_last: int) -> Tensor:
    shape = torch.Size(tuple(y.shape[:-1]) + (global_last,))
    return DTensor.from_local(y, mesh, [placement], run_check=False, shape=shape,
                              stride=_contiguous(shape))


def _input(x: Tensor, mesh, placement, what: str) -> Tensor:
    """x as a local tensor of the placement the layer computes from (a DTensor input of another
    placement is redistributed, as the plain layer's DTensor op would)."""
    if not is_dtensor(x):
        raise ValueError(f"TwinMergedModule: {what} has DTensor weights but its input is a plain "
                         f"tensor; parallelize it with torch's ColwiseParallel / RowwiseParallel "
                         f"(whose hooks make the input a DTensor)")
    if x.device_mesh != mesh:
        raise ValueError(f"TwinMergedModule: {what}: its input lives on another device mesh "
                         f"than its weight")
    if tuple(x.placements) != (placement,):
        x = x.redistribute(placements=[placement])
    return x.to_local()


def linear(layer, x: Tensor, compute: Callable[[Tensor, Tensor, Optional[Tensor], bool], Tensor]
           ) -> Tensor:
    """A twin Linear's factored forward on shards. compute(x, W, bias, add_bias) is the
    single-process computation on local tensors (add_bias False: neither the bias nor the mixed
    bias rows). Returns the output DTensor: Shard(-1) column-parallel, Partial row-parallel."""
    W = own(layer, "weight")
    what = f"layer {layer._twin_name!r}"
    d = shard_dim(W, what)
    mesh = W.device_mesh
    bias = local(own(layer, "bias"))
    if d == 1:   # row-parallel: partial sums, the bias on one rank
        xl = _input(x, mesh, Shard(x.dim() - 1), what)
        y = compute(xl, W.to_local(), bias, first_rank(W))
        placement = Partial()
    else:        # column-parallel (or replicated): this rank's output columns
        xl = _input(x, mesh, Replicate(), what)
        y = compute(xl, W.to_local(), bias, True)
        placement = Replicate() if d is None else Shard(y.dim() - 1)
    return _out(y, mesh, placement, W.shape[0])


def embedding(layer, ids: Tensor, compute: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """A twin Embedding's factored forward on shards. compute(ids, W) is the single-process
    computation on local tensors. Returns the output DTensor (Partial vocabulary-parallel)."""
    W = own(layer, "weight")
    what = f"layer {layer._twin_name!r}"
    d = shard_dim(W, what)
    mesh = W.device_mesh
    il = _input(ids, mesh, Replicate(), what)
    if d == 0:   # vocabulary-parallel: the rows of this rank's range, zero elsewhere
        start, n = offset(W, 0)
        if n == 0:   # more ranks than rows: this rank holds none
            Wl = W.to_local()
            y = Wl.new_zeros(tuple(il.shape) + (W.shape[1],))
            return _out(y, mesh, Partial(), W.shape[1])
        outside = (il < start) | (il >= start + n)
        y = compute((il - start).masked_fill(outside, 0), W.to_local())
        y = y.masked_fill(outside.unsqueeze(-1), 0)
        return _out(y, mesh, Partial(), W.shape[1])
    y = compute(il, W.to_local())
    return _out(y, mesh, Replicate() if d is None else Shard(y.dim() - 1), W.shape[1])


def check_layer(layer, kind: str, attrs: Sequence[str], name: str) -> bool:
    """Whether the layer has DTensor tensors (it is tensor-parallel); raises for layers whose
    parallel serving is not supported: only Linear (lowrank weight, dense bias) and Embedding
    layers may hold DTensors, sharded along dimension 0 or 1."""
    dist = [a for a in attrs if is_dtensor(own(layer, a))]
    if not dist:
        return False
    if kind not in ("linear", "embedding"):
        raise ValueError(f"TwinMergedModule: layer {name!r} ({type(layer).__name__}) has DTensor "
                         f"tensors {dist}; tensor-parallel serving mixes nn.Linear and "
                         f"nn.Embedding layers parallelized by ColwiseParallel / RowwiseParallel "
                         f"(keep norms and other layers replicated as plain tensors)")
    for a in attrs:
        p = own(layer, a)
        if not is_dtensor(p):
            raise ValueError(f"TwinMergedModule: layer {name!r}: {a!r} is a plain tensor while "
                             f"other tensors of the layer are DTensors")
        shard_dim(p, f"tensor {name}.{a}")
    return True
