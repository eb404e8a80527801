"""The twin checkpoint's file: one .safetensors file, its JSON metadata and its checksums (the
layout is in twinmerge_ext.checkpoint's docstring). `write_twin` checks a twin's tensors and
writes them atomically; `read_twin` validates a file against its metadata and checksums.
"""

import errno
import hashlib
import json
import math
import os
import re
from contextlib import ExitStack
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from twinmerge_ext import merging
from twinmerge_ext._files import (DIGEST_ALGORITHM, check_readable, os_error, tensor_digest,
                                  text_digest, write_atomically)
from twinmerge_ext._finite import non_finite
from twinmerge_ext.router import Router, router_from_config

FORMAT_VERSION = 1
METADATA_KEY = "twinmerge"
CHECKSUMS_KEY = "twinmerge.checksums"

SHARED_METHODS = {
    "task_arithmetic": merging.task_arithmetic,
    "ties": merging.ties,
    "dare": merging.dare,
    "average": merging.average,
}

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


INDEX_NAME = "twin.safetensors.index.json"  # a sharded twin: this index in a directory


def _check_finite_tensors(tensors: Dict[str, Tensor], fn: str) -> None:
    for key, t in tensors.items():
        problem = non_finite(t)
        if problem is not None:
            raise ValueError(f"{fn}: tensor {key!r} must be finite, got {problem}; nothing "
                             f"was written")


def _save(tensors: Dict[str, Tensor], tmp: str, header: Optional[Dict[str, str]]) -> None:
    try:
        save_file(tensors, tmp, metadata=header)
    except SafetensorError as e:  # an I/O error, its errno only in the message
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from e


def _header(metadata: Dict[str, Any], digests: Dict[str, str]) -> Dict[str, str]:
    meta = json.dumps(metadata)
    checksums = {"algorithm": DIGEST_ALGORITHM, "metadata": text_digest(meta),
                 "tensors": digests}
    return {METADATA_KEY: meta, CHECKSUMS_KEY: json.dumps(checksums)}


def write_shard(path: str, tensors: Dict[str, Tensor], fn: str) -> Dict[str, str]:
    """One shard file of a sharded twin (its part of the tensors, no twin metadata), written
    atomically; returns the tensors' digests, for the index."""
    _check_finite_tensors(tensors, fn)
    write_atomically(path, lambda tmp: _save(tensors, tmp, None), fn)
    return {key: tensor_digest(t) for key, t in tensors.items()}


def write_index(directory: str, weight_map: Dict[str, str], digests: Dict[str, str],
                metadata: Dict[str, Any], fn: str) -> List[str]:
    """Publishes a sharded twin: the index (the metadata and checksums a single file's header
    holds, and which file holds each tensor) written atomically over any previous one, whose
    shard files no longer named are then removed. Returns the removed files' names.
    Readers see the previous twin or this one, never a mix: shard files have names of their own
    build, and the index is renamed into place last."""
    index_path = os.path.join(directory, INDEX_NAME)
    old = set()
    try:
        with open(index_path) as f:
            old = set(json.load(f).get("weight_map", {}).values())
    except (OSError, ValueError, AttributeError):
        pass  # no previous twin here (or a damaged index): nothing of it to remove
    body = json.dumps({"metadata": _header(metadata, digests), "weight_map": weight_map},
                      indent=1)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(body)
    write_atomically(index_path, write, fn)
    gone = sorted(old - set(weight_map.values()))
    for name in gone:
        try:
            os.remove(os.path.join(directory, name))
        except OSError:
            pass  # already gone (another build removed it)
    return gone


def write_twin(path: str, tensors: Dict[str, Tensor], metadata: Dict[str, Any], fn: str) -> None:
    """The file tensors (name -> CPU tensor) with the metadata and their checksums, written
    atomically at path (`TwinCheckpoint.save` states the guarantees); a non-finite tensor is
    refused before anything is written."""
    if os.path.isdir(path):
        raise os_error(errno.EISDIR, f"{fn}: {path!r}: is a directory")
    _check_finite_tensors(tensors, fn)
    header = _header(metadata, {key: tensor_digest(t) for key, t in tensors.items()})
    write_atomically(path, lambda tmp: _save(tensors, tmp, header), fn)


# (dimension, start, length): the part of a tensor a rank reads (`read_twin`'s slices).
Slice = Tuple[int, int, int]
_STREAM_BYTES = 64 << 20  # a sliced tensor's checksum is computed over blocks of this size


def _read_part(f, key: str, shape: List[int], part: Optional[Slice], verify: bool, bad):
    """The tensor `key` (its part along one dimension, read alone: safetensors' get_slice),
    and with verify its whole bytes' sha256, streamed in row blocks of at most _STREAM_BYTES
    (each block checked finite too), never the whole tensor in memory."""
    if part is None:
        t = f.get_tensor(key)
        return t, (tensor_digest(t) if verify else None)
    dim, start, n = part
    if not 0 <= dim < len(shape) or start < 0 or start + n > shape[dim]:
        raise bad(f"tensor {key!r} of shape {shape}: cannot read rows {start}..{start + n} "
                  f"of dimension {dim}")
    sl = f.get_slice(key)
    # safetensors hands back a view of the whole tensor, mapped from the file: only the slice's
    # pages are read, and the copy lets the mapping go (it is not kept alive by the slice).
    t = sl[(slice(None),) * dim + (slice(start, start + n),)].clone(
        memory_format=torch.contiguous_format)
    digest = None
    if verify:
        h = hashlib.sha256()
        row = max(1, t.element_size() * math.prod(shape[1:]))
        step = max(1, _STREAM_BYTES // row)
        for i in range(0, shape[0], step):
            block = sl[i:i + step]
            problem = non_finite(block)
            if problem is not None:
                raise bad(f"tensor {key!r} has a non-finite value in rows {i}.. ({problem}); a "
                          f"twin's tensors must be finite")
            h.update(block.reshape(-1).view(torch.uint8).numpy())
        digest = h.hexdigest()
    return t, digest


def read_twin(path: str, device, verify: bool, fn: str,
              slices: Optional[Callable[[str, List[int]], Optional[Slice]]] = None):
    """(info, tasks, specs, tensors, router, digests) of the file at path, every tensor checked
    against the metadata (names, shapes, dtypes, ranks), finite, and with verify against its
    checksum; digests is None for a file written before checksums existed. The router is built
    from its config, its tensors not yet loaded. Errors name the path (`TwinCheckpoint.load`
    lists them).

    slices(key, shape) -> (dim, start, length) or None: read only that part of the tensor (a
    rank's shard); with verify, its checksum is still of the whole tensor, hashed from the file
    in blocks."""

    def bad(msg: str) -> ValueError:
        return ValueError(f"{fn}: {path!r}: {msg}")

    with ExitStack() as stack:
        f = _open_twin(path, stack, fn, bad)
        header = f.metadata() or {}
        raw = header.get(METADATA_KEY)
        if raw is None:
            raise bad(f"no {METADATA_KEY!r} metadata in the safetensors header: not a twin "
                      f"checkpoint")
        digests = _checked_checksums(header.get(CHECKSUMS_KEY), raw, bad)
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as e:
            raise bad(f"the {METADATA_KEY!r} metadata is not valid JSON: {e}") from e
        info, tasks, specs = _parse_metadata(meta, bad)
        expected = {}
        for name, spec in specs["shared"].items():
            expected[f"shared/{name}"] = (spec["shape"], spec["dtype"])
        for name, spec in specs["lowrank"].items():
            (m, n), K = spec["shape"], sum(spec["ranks"])
            expected[f"lowrank/{name}/U_cat"] = ([m, K], spec["dtype"])
            expected[f"lowrank/{name}/S_cat"] = ([K], spec["dtype"])
            expected[f"lowrank/{name}/V_cat"] = ([n, K], spec["dtype"])
        for name, spec in specs["dense"].items():
            expected[f"dense/{name}/deltas"] = ([len(tasks)] + spec["shape"], spec["dtype"])
        for task, head in specs["heads"].items():
            for name, spec in head.items():
                expected[f"heads/{task}/{name}"] = (spec["shape"], spec["dtype"])
        router = _router_from_metadata(info["router"], tasks, bad)
        if router is not None:
            for name, t in router.state_dict().items():
                expected[f"router/{name}"] = (list(t.shape), dtype_name(t.dtype))
        keys = list(f.keys())
        missing = [k for k in expected if k not in set(keys)]
        if missing:
            raise bad(f"tensor {missing[0]!r} is listed in the metadata but missing from the "
                      f"file" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = [k for k in keys if k not in expected]
        if extra:
            raise bad(f"unexpected tensor {extra[0]!r} not listed in the metadata"
                      + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        if digests is not None and set(digests) != set(keys):
            odd = sorted(set(digests) ^ set(keys))[0]
            raise bad(f"the checksums do not list the file's tensors: tensor {odd!r} is "
                      f"{'in the checksums only' if odd in digests else 'without checksum'}")
        for name, spec in specs["lowrank"].items():
            for factor, axis in (("U_cat", 1), ("S_cat", 0), ("V_cat", 1)):
                shape = list(f.get_slice(f"lowrank/{name}/{factor}").get_shape())
                K = sum(spec["ranks"])
                if len(shape) == axis + 1 and shape[axis] != K:
                    raise bad(f"ranks {spec['ranks']} of {name!r} sum to {K}, but its "
                              f"{factor} has K = {shape[axis]} (shape {shape})")
        tensors = {}
        for key, (shape, dtype) in expected.items():
            stored = list(f.get_slice(key).get_shape())
            if stored != shape:
                raise bad(f"tensor {key!r} has shape {stored}, the metadata says {shape}")
            part = slices(key, shape) if slices is not None else None
            t, actual = _read_part(f, key, shape, part, verify and digests is not None, bad)
            if dtype_name(t.dtype) != dtype:
                raise bad(f"tensor {key!r} has dtype {dtype_name(t.dtype)}, the metadata "
                          f"says {dtype}")
            if actual is not None:
                if actual != digests[key]:
                    raise bad(f"tensor {key!r} does not match its checksum ({DIGEST_ALGORITHM} "
                              f"{actual}, the file says {digests[key]}): the file is damaged")
            problem = non_finite(t)
            if problem is not None:
                raise bad(f"tensor {key!r} has a non-finite value ({problem}); a twin's "
                          f"tensors must be finite")
            tensors[key] = t if device is None else t.to(device)
    return info, tasks, specs, tensors, router, digests


def _open_safetensors(path: str, stack: ExitStack, fn: str, bad):
    check_readable(path, fn)
    try:
        return stack.enter_context(safe_open(path, framework="pt", device="cpu"))
    except Exception as e:  # SafetensorError: bad header, or data cut short
        raise bad(f"not a valid safetensors file (truncated or corrupt?): "
                  f"{type(e).__name__}: {e}") from e


class _Sharded:
    """A sharded twin read through its index: metadata() from the index, each tensor from the
    shard file the index names (opened when first read), as one safetensors file reads."""

    def __init__(self, index_path: str, stack: ExitStack, fn: str, bad):
        self.dir = os.path.dirname(index_path)
        self.stack, self.fn, self.bad = stack, fn, bad
        check_readable(index_path, fn)
        try:
            with open(index_path) as fh:
                index = json.load(fh)
            header, self.map = index["metadata"], index["weight_map"]
            if not (isinstance(header, dict) and isinstance(self.map, dict) and all(
                    isinstance(k, str) and isinstance(v, str) and os.path.basename(v) == v
                    for k, v in self.map.items())):
                raise ValueError("metadata must be an object and weight_map map tensor names "
                                 "to file names in the index's directory")
        except (ValueError, KeyError, TypeError) as e:
            raise bad(f"not a valid twin index ({type(e).__name__}: {e})") from e
        self.header = header
        self.files: Dict[str, Any] = {}

    def metadata(self) -> Dict[str, str]:
        return self.header

    def keys(self) -> List[str]:
        return list(self.map)

    def _file(self, key: str):
        name = self.map[key]
        if name not in self.files:
            path = os.path.join(self.dir, name)
            f = _open_safetensors(path, self.stack, self.fn, self.bad)
            if key not in set(f.keys()):
                raise self.bad(f"shard file {name!r} does not hold tensor {key!r}, which the "
                               f"index places there")
            self.files[name] = f
        return self.files[name]

    def get_slice(self, key: str):
        return self._file(key).get_slice(key)

    def get_tensor(self, key: str) -> Tensor:
        return self._file(key).get_tensor(key)


def _open_twin(path: str, stack: ExitStack, fn: str, bad):
    """A twin file, or a sharded twin: a directory holding INDEX_NAME, or that index's path."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, INDEX_NAME)):
        return _Sharded(os.path.join(path, INDEX_NAME), stack, fn, bad)
    if path.endswith(".index.json"):
        return _Sharded(path, stack, fn, bad)
    return _open_safetensors(path, stack, fn, bad)


def _checked_checksums(raw: Optional[str], meta: str, bad) -> Optional[Dict[str, str]]:
    """The tensors' digests (file name -> hex) from the checksums metadata, after checking the
    metadata string `meta` against its own digest; None for a file without checksums."""
    if raw is None:
        return None
    try:
        sums = json.loads(raw)
    except json.JSONDecodeError as e:
        raise bad(f"the {CHECKSUMS_KEY!r} metadata is not valid JSON: {e}") from e
    if not isinstance(sums, dict) or sums.get("algorithm") != DIGEST_ALGORITHM:
        raise bad(f"the {CHECKSUMS_KEY!r} metadata must be an object with algorithm "
                  f"{DIGEST_ALGORITHM!r}, got {raw[:200]!r}")
    tensors = sums.get("tensors")
    if not (isinstance(sums.get("metadata"), str) and isinstance(tensors, dict)
            and all(isinstance(v, str) for v in tensors.values())):
        raise bad(f"the {CHECKSUMS_KEY!r} metadata must hold a 'metadata' digest and a "
                  f"'tensors' object of digests, got {raw[:200]!r}")
    actual = text_digest(meta)
    if actual != sums["metadata"]:
        raise bad(f"the {METADATA_KEY!r} metadata does not match its checksum "
                  f"({DIGEST_ALGORITHM} {actual}, the file says {sums['metadata']}): the file "
                  f"is damaged")
    return tensors


def _router_from_metadata(meta: Any, tasks: List[str], bad) -> Optional[Router]:
    """An untrained router of the saved kind and architecture (its tensors are checked against it),
    or None."""
    if meta is None:
        return None
    cfg = meta.get("config")
    if not isinstance(cfg, dict) or not isinstance(meta.get("info", {}), dict):
        raise bad(f"metadata field 'router' must hold a 'config' object and an 'info' object, "
                  f"got {meta!r}")
    try:
        router = router_from_config(cfg)
    except (TypeError, ValueError) as e:
        raise bad(f"metadata field router.config is not a valid router config: {e}") from e
    if list(router.tasks) != tasks:
        raise bad(f"the router routes tasks {list(router.tasks)}, the twin has {tasks}")
    return router


def _parse_metadata(meta: Any, bad) -> Tuple[Dict[str, Any], List[str], Dict[str, Dict]]:
    """Checks the structure of the JSON metadata; returns (info without tasks and tensors,
    tasks, tensor specs). `bad(msg)` makes the ValueError that names the file."""
    if not isinstance(meta, dict):
        raise bad(f"the {METADATA_KEY!r} metadata must be a JSON object, got "
                  f"{type(meta).__name__}")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise bad(f"the metadata has no integer format_version (got {version!r})")
    if version != FORMAT_VERSION:
        raise bad(f"unknown twin checkpoint format version {version}; this library "
                  f"reads format version {FORMAT_VERSION}")
    for key, kind in (("library_version", str), ("tasks", list), ("shared", dict),
                      ("compression", dict), ("tensors", dict)):
        if not isinstance(meta.get(key), kind):
            raise bad(f"metadata field {key!r} must be a JSON {kind.__name__}, got "
                      f"{meta.get(key)!r}")
    if "router" not in meta or not (meta["router"] is None or isinstance(meta["router"], dict)):
        raise bad(f"metadata field 'router' must be null or an object, got {meta.get('router')!r}")
    tasks = meta["tasks"]
    if not tasks or not all(isinstance(x, str) for x in tasks) or len(set(tasks)) != len(tasks):
        raise bad(f"metadata field 'tasks' must be a non-empty list of distinct strings, got "
                  f"{tasks!r}")
    shared_cfg = meta["shared"]
    method = shared_cfg.get("method")
    if not (isinstance(method, str) and method in SHARED_METHODS
            and isinstance(shared_cfg.get("kwargs"), dict)):
        raise bad(f"metadata field 'shared' must name a method in {sorted(SHARED_METHODS)} and "
                  f"its kwargs, got {shared_cfg!r}")
    T = len(tasks)
    specs: Dict[str, Dict[str, Dict]] = {}
    heads = meta.get("heads")
    if not (heads is None or (isinstance(heads, list) and all(isinstance(p, str) for p in heads))):
        raise bad(f"metadata field 'heads' must be null or a list of regex strings, got {heads!r}")
    for section in ("shared", "lowrank", "dense"):
        entries = meta["tensors"].get(section)
        if not isinstance(entries, dict):
            raise bad(f"metadata field tensors.{section} must be an object, got {entries!r}")
        specs[section] = {}
        for name, spec in entries.items():
            where = f"tensors.{section}[{name!r}]"
            if not isinstance(spec, dict):
                raise bad(f"metadata {where} must be an object, got {spec!r}")
            shape, dtype = spec.get("shape"), spec.get("dtype")
            if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                                    and d >= 0 for d in shape)):
                raise bad(f"metadata {where} has an invalid shape {shape!r}")
            if dtype not in _DTYPES:
                raise bad(f"metadata {where} has an unknown dtype {dtype!r}")
            if section != "shared":
                ref = specs["shared"].get(name)
                if ref is None:
                    raise bad(f"metadata {where} names a parameter that is not in "
                              f"tensors.shared")
                if ref["shape"] != shape or ref["dtype"] != dtype:
                    raise bad(f"metadata {where} has shape {shape} and dtype {dtype}, but the "
                              f"shared parameter has {ref['shape']} and {ref['dtype']}")
            if section == "lowrank":
                ranks, errors = spec.get("ranks"), spec.get("errors")
                if len(shape) != 2:
                    raise bad(f"metadata {where} must be a matrix, got shape {shape}")
                if not (isinstance(ranks, list) and len(ranks) == T
                        and all(isinstance(r, int) and not isinstance(r, bool) and r >= 0
                                for r in ranks)):
                    raise bad(f"metadata {where} must have ranks: a list of T={T} non-negative "
                              f"ints, got {ranks!r}")
                if not (isinstance(errors, list) and len(errors) == T
                        and all(isinstance(e, (int, float)) and not isinstance(e, bool)
                                for e in errors)):
                    raise bad(f"metadata {where} must have errors: a list of T={T} numbers, got "
                              f"{errors!r}")
            specs[section][name] = spec
    overlap = sorted(set(specs["lowrank"]) & set(specs["dense"]))
    if overlap:
        raise bad(f"parameter {overlap[0]!r} is listed both as low-rank and as dense")
    unchanged = meta["compression"].get("unchanged", [])
    if not (isinstance(unchanged, list) and all(isinstance(x, str) for x in unchanged)):
        raise bad(f"metadata field compression.unchanged must be a list of parameter names, got "
                  f"{unchanged!r}")
    for name in unchanged:
        if name not in specs["shared"] or name in specs["lowrank"] or name in specs["dense"]:
            raise bad(f"metadata compression.unchanged names {name!r}, which must be a shared "
                      f"tensor with no low-rank or dense delta")
    specs["heads"] = _parse_heads(meta["tensors"].get("heads", {}), tasks, specs["shared"], bad)
    info = {k: v for k, v in meta.items() if k not in ("tasks", "tensors")}
    return info, list(tasks), specs


def _parse_heads(entries: Any, tasks: List[str], shared: Dict[str, Dict], bad) -> Dict[str, Dict]:
    """tensors.heads: task -> {name: spec}; every task, the same names, none of them shared."""
    if not isinstance(entries, dict):
        raise bad(f"metadata field tensors.heads must be an object, got {entries!r}")
    if entries and sorted(entries) != sorted(tasks):
        raise bad(f"metadata tensors.heads must hold every task {tasks} or none, got "
                  f"{sorted(entries)}")
    names = None
    for task in tasks if entries else []:
        head = entries[task]
        if not isinstance(head, dict) or not head:
            raise bad(f"metadata tensors.heads[{task!r}] must be a non-empty object, got {head!r}")
        if names is not None and set(head) != set(names):
            raise bad(f"metadata tensors.heads: tasks have different head tensors "
                      f"({sorted(names)} vs {sorted(head)} for {task!r})")
        names = names or list(head)
        for name, spec in head.items():
            where = f"tensors.heads[{task!r}][{name!r}]"
            if name in shared:
                raise bad(f"metadata {where} is also a shared tensor")
            shape, dtype = (spec.get("shape"), spec.get("dtype")) if isinstance(spec, dict) \
                else (None, None)
            if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                                    and d >= 0 for d in shape)):
                raise bad(f"metadata {where} has an invalid shape {shape!r}")
            if dtype not in _DTYPES:
                raise bad(f"metadata {where} has an unknown dtype {dtype!r}")
    return {task: {name: entries[task][name] for name in names} for task in tasks} \
        if entries else {}
